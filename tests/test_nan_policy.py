"""The NaN / Inf policy (README "NaN and Inf"; csrc/epilogue.h):

* a distance involving a row with a non-finite entry (NaN, +-Inf, or a float32 squared norm
  that overflows) is NaN;
* a NaN distance ranks as the hardest candidate (farthest positive, nearest negative), ties
  between NaNs to the lowest index: the same total order on every backend;
* any NaN distance in an anchor's row makes its loss terms and gradient NaN: a loss over a
  batch holding a non-finite embedding is NaN, never a finite value.
"""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import METRICS, cpu_and_cuda

LOSSES = {
    "batch_hard": tc.batch_hard_triplet_loss,
    "batch_all": tc.batch_all_triplet_loss,
    "semi_hard": tc.semi_hard_triplet_loss,
    "contrastive": tc.contrastive_loss,
}
BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _batch(device, dtype, bad=None, row=3, n=16, d=8):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n) // 4
    if bad is not None:
        x[row, 2] = bad
    return x.to(device=device, dtype=dtype), labels.to(device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_non_finite_embedding_gives_nan_loss_and_gradient(device, dtype, metric, bad, loss):
    x, labels = _batch(device, dtype, BAD_VALUES[bad])
    x.requires_grad_(True)
    for reduction in ("mean", "sum", "mean_nonzero"):
        value = LOSSES[loss](x, labels, metric=metric, reduction=reduction)
        assert torch.isnan(value), f"{loss} {reduction}: {value} from a {bad} embedding"
    value = LOSSES[loss](x, labels, metric=metric)
    (grad,) = torch.autograd.grad(value, x)
    assert not torch.isfinite(grad).all(), f"{loss}: a finite gradient from a {bad} embedding"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_reference_agrees_that_nan_input_gives_nan(device, loss):
    x, labels = _batch(device, torch.float64, float("nan"))
    ref = getattr(tc.reference, loss + ("_loss" if loss == "contrastive" else "_triplet_loss"))
    assert torch.isnan(ref(x, labels)) and torch.isnan(LOSSES[loss](x, labels))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_pairwise_distance_is_nan_exactly_where_a_row_is_not_finite(device, metric, bad):
    x, _ = _batch(device, torch.float64, BAD_VALUES[bad], row=3)
    d = tc.pairwise_distance(x, metric=metric)
    nan = torch.zeros(d.shape, dtype=torch.bool, device=device)
    nan[3, :] = True
    nan[:, 3] = True
    assert torch.equal(torch.isnan(d), nan)
    keep = [i for i in range(x.shape[0]) if i != 3]
    expected = tc.reference.pairwise_distance(x[keep], metric=metric)
    torch.testing.assert_close(d[keep][:, keep], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad_row", [0, 3, 9, 15])
def test_nan_ranks_hardest_with_the_lowest_index(device, metric, bad_row):
    """Every anchor that can pick the bad row picks it; the bad anchor itself sees only NaN
    distances and picks its lowest-index positive and negative. Expected indices come from
    the labels alone."""
    x, labels = _batch(device, torch.float32, float("nan"), row=bad_row)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    lab = labels.tolist()
    n = len(lab)
    for a in range(n):
        positives = [j for j in range(n) if lab[j] == lab[a] and j != a]
        negatives = [j for j in range(n) if lab[j] != lab[a]]
        if a == bad_row:
            exp_p, exp_n = positives[0], negatives[0]
        else:
            exp_p = bad_row if bad_row in positives else None
            exp_n = bad_row if bad_row in negatives else None
        if exp_p is not None:
            assert m.pos_idx[a].item() == exp_p, (a, m.pos_idx[a].item(), exp_p)
            assert torch.isnan(m.pos_dist[a])
        if exp_n is not None:
            assert m.neg_idx[a].item() == exp_n, (a, m.neg_idx[a].item(), exp_n)
            assert torch.isnan(m.neg_dist[a])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mine_triplets_batch_hard_follows_the_nan_rule(device):
    x, labels = _batch(device, torch.float32, float("nan"), row=5)
    a, p, n = tc.mine_triplets(x, labels, strategy="batch_hard")
    m = tc.batch_hard_mine(x, labels)
    assert torch.equal(p, m.pos_idx[a]) and torch.equal(n, m.neg_idx[a])
    # anchor 4 shares row 5's class: its hardest positive is the NaN row
    assert p[a == 4].item() == 5


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("loss", list(LOSSES))
def test_float32_overflow_gives_nan_not_a_finite_value(device, loss):
    """Squared norms above float32's range (embeddings scaled by 1e20) cannot be represented:
    the result is NaN (documented), never the silent 0.0 a clipped computation gives."""
    x, labels = _batch(device, torch.float32)
    assert torch.isnan(LOSSES[loss](x * 1e20, labels))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("loss", list(LOSSES))
def test_finite_inputs_stay_finite_near_the_overflow_edge(device, loss):
    """Scaled by 1e15 the float32 squared norms (~1e31) still fit: the loss is finite and
    matches the float64 reference in relative terms."""
    x, labels = _batch(device, torch.float32)
    x = x * 1e15
    value = LOSSES[loss](x, labels, margin=0.0)
    ref = getattr(tc.reference, loss + ("_loss" if loss == "contrastive" else "_triplet_loss"))
    expected = ref(x.double(), labels, margin=0.0)
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), expected, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_overflowing_rows_close_to_each_other_are_nan_too(device, metric, loss):
    """Rows whose float32 squared norms overflow but whose differences are small: the exact
    recomputation of a mined pair must not turn the NaN the mining saw into a finite value."""
    x = torch.tensor([[1e20, 0.0], [1e20, 0.0], [1e20, 1e6], [1e20, 2e6]], device=device)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    assert torch.isnan(LOSSES[loss](x, labels, metric=metric))
    m = tc.batch_hard_mine(x, labels, metric=metric)
    assert torch.isnan(m.pos_dist).all() and torch.isnan(m.neg_dist).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("n", [17, 18])  # 17: the fused CPU paths; 18: the fallback (a class of 18)
@pytest.mark.parametrize("loss", ["batch_all", "semi_hard", "batch_hard"])
def test_nothing_valid_gives_zero_loss_and_zero_gradient_even_with_nan(device, n, loss):
    """One class: no negative anywhere, so the loss is the constant 0 and its gradient is 0,
    whatever the embeddings hold (the NaN rule applies to terms that exist)."""
    x = torch.randn(n, 5, dtype=torch.float64, device=device)
    x[3, 1] = float("nan")
    x.requires_grad_(True)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    value = LOSSES[loss](x, labels)
    (grad,) = torch.autograd.grad(value, x)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
