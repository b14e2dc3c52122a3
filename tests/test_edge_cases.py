"""Edge cases: nothing valid, tiny and empty batches, label dtypes and values, strides,
duplicates, zero rows."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import FLOAT_DTYPES, METRICS, assert_close, cpu_and_cuda, make_batch

TRIPLET_LOSSES = {
    "batch_hard": (tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss),
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss),
}
ALL_LOSSES = {**TRIPLET_LOSSES, "contrastive": (tc.contrastive_loss, R.contrastive_loss)}
REDUCTIONS = {
    "batch_hard": ("mean", "mean_nonzero", "sum", "none"),
    "batch_all": ("mean", "mean_nonzero", "sum"),
    "semi_hard": ("mean", "mean_nonzero", "sum"),
    "contrastive": ("mean", "mean_nonzero", "sum"),
}


def check_zero_attached(loss, x, expected_shape=()):
    """loss is exactly 0, still part of the graph, and back-propagates a zero gradient."""
    assert loss.shape == expected_shape
    assert loss.dtype == x.dtype
    assert torch.all(loss == 0), loss
    assert loss.requires_grad and loss.grad_fn is not None, "the zero loss is detached from the graph"
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.shape == x.shape
    assert torch.all(grad == 0), grad


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(TRIPLET_LOSSES))
@pytest.mark.parametrize("case", ["single_class", "all_distinct", "single_row"])
def test_nothing_valid_triplet_losses(device, dtype, metric, name, case):
    n = 1 if case == "single_row" else 9
    x, _ = make_batch(n, 4, 1, seed=n, dtype=dtype, device=device)
    x.requires_grad_()
    labels = torch.arange(n, device=device) if case == "all_distinct" else torch.full((n,), 5, device=device)
    fn = TRIPLET_LOSSES[name][0]
    for reduction in REDUCTIONS[name]:
        loss, stats = fn(x, labels, 0.5, metric=metric, reduction=reduction, return_stats=True)
        check_zero_attached(loss, x, (n,) if reduction == "none" else ())
        assert (stats.num_valid.item(), stats.num_positive.item(), stats.fraction_positive.item()) == (0, 0, 0.0)
    if name == "batch_hard":
        loss = fn(x, labels, metric=metric, soft_margin=True)
        check_zero_attached(loss, x)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_contrastive_single_row(device, dtype, metric):
    # one row: no pair at all
    x = torch.randn(1, 3, dtype=dtype, device=device, requires_grad=True)
    labels = torch.tensor([3], device=device)
    for reduction in REDUCTIONS["contrastive"]:
        loss, stats = tc.contrastive_loss(x, labels, metric=metric, reduction=reduction, return_stats=True)
        check_zero_attached(loss, x)
        assert (stats.num_valid.item(), stats.num_positive.item()) == (0, 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["single_class", "all_distinct"])
def test_contrastive_one_class_or_all_distinct(device, dtype, metric, case):
    # contrastive has valid pairs in both cases: all "same" pairs, or all "different" pairs
    x, _ = make_batch(11, 4, 1, seed=2, dtype=dtype, device=device, scale=0.3)
    labels = torch.arange(11, device=device) if case == "all_distinct" else torch.zeros(11, dtype=torch.long, device=device)
    for reduction in REDUCTIONS["contrastive"]:
        loss, stats = tc.contrastive_loss(x, labels, metric=metric, reduction=reduction, return_stats=True)
        ref, ref_stats = R.contrastive_loss(x.cpu().double(), labels.cpu(), metric=metric, reduction=reduction,
                                            return_stats=True)
        assert_close(loss, ref, dtype)
        assert stats.num_valid.item() == 55 == ref_stats.num_valid.item()
        assert loss.item() > 0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_empty_batch(device, dtype, metric, name):
    x = torch.empty(0, 5, dtype=dtype, device=device, requires_grad=True)
    labels = torch.empty(0, dtype=torch.long, device=device)
    fn = ALL_LOSSES[name][0]
    for reduction in REDUCTIONS[name]:
        loss, stats = fn(x, labels, metric=metric, reduction=reduction, return_stats=True)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert loss.dtype == dtype
        assert torch.all(loss == 0)
        assert (stats.num_valid.item(), stats.num_positive.item(), stats.fraction_positive.item()) == (0, 0, 0.0)
        if reduction != "none":
            assert loss.item() == 0.0
            (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
            assert grad is None or grad.shape == (0, 5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_empty_batch_mining(device, metric):
    x = torch.empty(0, 5, device=device)
    labels = torch.empty(0, dtype=torch.int32, device=device)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    for t in m:
        assert t.shape == (0,)
    assert m.pos_idx.dtype == torch.int64
    assert tc.pairwise_distance(x, metric=metric).shape == (0, 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_zero_feature_dimension(device):
    # D = 0: every euclidean distance is 0, so for batch hard d_ap - d_an + margin = margin
    x = torch.empty(4, 0, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    assert torch.all(tc.pairwise_distance(x) == 0)
    assert tc.batch_hard_triplet_loss(x, labels, 0.25).item() == 0.25
    assert tc.batch_all_triplet_loss(x, labels, 0.25).item() == 0.25


# ----------------------------------------------------------------------------- labels
LABEL_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def relabel(canonical, values, dtype):
    """canonical labels 0..C-1 -> the same partition with arbitrary values of dtype."""
    table = torch.tensor(values, dtype=torch.int64)
    return table[canonical].to(dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_label_dtypes_and_values(device, label_dtype, metric):
    x, canonical = make_batch(37, 5, 6, seed=9, device=device)
    canonical = canonical.cpu()
    values = {
        torch.int8: [-128, 127, -1, 0, 5, -7],
        torch.int16: [-32768, 32767, -300, 2, 1000, -1],
        torch.int32: [-(2**31), 2**31 - 1, -5, 123456, 0, 7],
        torch.int64: [-(2**63), 2**63 - 1, 2**40, -(2**40) - 3, 2**32, 2**32 + 1],  # equal low 32 bits pairs
        torch.uint8: [255, 0, 128, 1, 254, 127],
    }[label_dtype]
    labels = relabel(canonical, values, label_dtype).to(device)
    base = canonical.to(device)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    mb = tc.batch_hard_mine(x, base, metric=metric)
    for a, b in zip(m, mb):
        assert torch.equal(a, b)
    for name, (fn, ref_fn) in ALL_LOSSES.items():
        for reduction in REDUCTIONS[name]:
            out = fn(x, labels, metric=metric, reduction=reduction)
            ref = ref_fn(x.cpu(), canonical, metric=metric, reduction=reduction)
            assert_close(out, ref, torch.float64, msg=f"{name} {reduction}")
    for strategy in ("batch_hard", "batch_all", "semi_hard"):
        got = tc.mine_triplets(x, labels, strategy=strategy, metric=metric)
        want = R.mine_triplets(x.cpu(), canonical, strategy=strategy, metric=metric)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), strategy


def test_labels_differing_only_in_high_bits():
    # 2**32 and 0 (and 1 and 2**32 + 1) must be different classes: no truncation to 32 bits
    x, _ = make_batch(4, 3, 1, seed=1)
    labels = torch.tensor([0, 2**32, 0, 2**32])
    m = tc.batch_hard_mine(x, labels)
    assert m.pos_idx.tolist() == [2, 3, 0, 1]
    assert m.neg_idx[0].item() in (1, 3) and m.neg_idx[1].item() in (0, 2)
    loss, stats = tc.batch_all_triplet_loss(x, labels, return_stats=True)
    assert stats.num_valid.item() == 8  # 4 anchors x 1 positive x 2 negatives


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_non_contiguous_labels(device):
    x, canonical = make_batch(29, 4, 5, seed=3, device=device)
    wide = torch.stack([canonical * 3 - 1, torch.zeros_like(canonical)], 1)  # (N, 2)
    labels = wide[:, 0]  # stride 2
    assert not labels.is_contiguous()
    for name, (fn, ref_fn) in ALL_LOSSES.items():
        assert_close(fn(x, labels), ref_fn(x.cpu(), canonical.cpu()), torch.float64, msg=name)
    assert torch.equal(tc.mine_triplets(x, labels, strategy="batch_all")[2],
                       tc.mine_triplets(x, canonical, strategy="batch_all")[2])


# ----------------------------------------------------------------------------- strides
def _views(base):
    return {
        "transposed": base[:, :29].t(),        # (29, 7) from (7, 40)
        "column_slice": base.t()[:29, ::2],    # (29, 4), strided columns
        "row_slice": base.t()[1:39:2, 1:6],    # (19, 5), every other row
        "expanded": base[:, :1].t().expand(29, 7),  # stride-0 rows: all identical
    }


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("view", ["transposed", "column_slice", "row_slice", "expanded"])
def test_non_contiguous_embeddings(device, dtype, metric, view):
    g = torch.Generator().manual_seed(17)
    base = torch.randn(7, 40, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x = _views(base)[view]
    assert not x.is_contiguous()
    n = x.shape[0]
    labels = (torch.arange(n, device=device) * 7) % 4
    xc = x.contiguous()
    for name, (fn, ref_fn) in ALL_LOSSES.items():
        for reduction in REDUCTIONS[name]:
            if view == "expanded" and metric == "cosine" and reduction == "mean_nonzero":
                # all rows identical: every cosine distance is 1 - <a,a>/|a|^2, rounding noise
                # around 0 in any implementation (the reference's included), and which noisy
                # terms are > 0 decides the divisor: not a well-posed comparison
                continue
            out = fn(x, labels, metric=metric, reduction=reduction)
            same = fn(xc, labels, metric=metric, reduction=reduction)
            assert_close(out, same, dtype, msg=f"{name} {reduction} strided vs contiguous")
            ref = ref_fn(xc.cpu().double(), labels.cpu(), metric=metric, reduction=reduction)
            if dtype == torch.bfloat16:
                assert_close(out, ref, dtype, rtol=5e-2, atol=5e-2, msg=f"{name} {reduction}")
            else:
                assert_close(out, ref, dtype, msg=f"{name} {reduction}")
    # gradients through the view land in the base tensor's layout
    xg = base.detach().clone().requires_grad_()
    tc.batch_hard_triplet_loss(_views(xg)[view], labels, metric=metric).backward()
    xg2 = base.detach().clone().requires_grad_()
    tc.batch_hard_triplet_loss(_views(xg2)[view].contiguous(), labels, metric=metric).backward()
    assert_close(xg.grad, xg2.grad, dtype)


# ----------------------------------------------------------------------------- duplicates, zero rows
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_duplicated_embeddings_euclidean_grad_finite_and_correct(device, dtype, name):
    # many exact duplicates, within and across classes: distances of exactly 0 are common
    g = torch.Generator().manual_seed(23)
    rows = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x0 = rows[torch.tensor([0, 0, 1, 1, 2, 0, 3, 3, 2, 1, 0, 3])].to(dtype)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 3, 3], device=device)
    fn, ref_fn = ALL_LOSSES[name]
    for reduction in REDUCTIONS[name]:
        x = x0.clone().to(device).requires_grad_()
        loss = fn(x, labels, 1.0, reduction=reduction)
        loss.sum().backward()
        assert torch.isfinite(loss).all(), f"{reduction}: {loss}"
        assert torch.isfinite(x.grad).all(), f"{reduction}: NaN/inf gradient {x.grad}"
        xr = x0.double().clone().requires_grad_()
        ref_fn(xr, labels.cpu(), 1.0, reduction=reduction).sum().backward()
        if name == "batch_hard" or dtype == torch.float64:
            # batch hard recomputes the mined distances exactly; the other losses compute d by
            # the Gram expansion, whose float64 error at d = 0 is ~1e-8 (sqrt of rounding noise)
            # hence the 1e-6 tolerance; in lower precision only finiteness is required
            assert_close(x.grad, xr.grad, dtype, atol=1e-6 if dtype == torch.float64 else None,
                         rtol=1e-6 if dtype == torch.float64 else None, msg=reduction)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_contrastive_duplicate_same_label_pairs_are_not_positive(device, dtype, metric):
    # 12 random rows, each twice, the two copies sharing a label of their own; margin 0.01 is
    # far below every distance between different rows (~3). So by hand: every same-label pair
    # has d = 0 -> term d^2 = 0, every different-label pair has d > margin -> relu(.)^2 = 0:
    # loss 0, num_valid = C(24, 2) = 276, num_positive 0.
    g = torch.Generator().manual_seed(29)
    rows = torch.randn(12, 5, generator=g, dtype=torch.float64)
    assert torch.pdist(rows).min() > 0.5
    x = rows.repeat_interleave(2, 0).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.arange(12, device=device).repeat_interleave(2)
    loss, stats = tc.contrastive_loss(x, labels, 0.01, metric=metric, reduction="sum", return_stats=True)
    assert stats.num_valid.item() == 276
    assert stats.num_positive.item() == 0, (
        f"{stats.num_positive.item()} zero-distance same-label pairs counted as positive terms "
        f"(loss sum {loss.item()!r}; largest d(x_2i, x_2i+1) of the identical copies: "
        f"{tc.pairwise_distance(x.detach(), metric=metric).diagonal(1)[::2].max().item()!r})"
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_all_rows_identical(device, dtype, name):
    # every distance 0: finite loss equal to the reference, finite (zero) gradient
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype, device=device).repeat(8, 1).requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1], device=device)
    fn, ref_fn = ALL_LOSSES[name]
    loss = fn(x, labels, 0.3, metric="euclidean")
    ref = ref_fn(x.detach().cpu().double(), labels.cpu(), 0.3)
    assert_close(loss, ref, dtype)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad == 0), x.grad


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_cosine_zero_row(device, dtype, name):
    x0, labels = make_batch(10, 4, 3, seed=31, dtype=dtype)
    x0[2] = 0
    x0[7] = 0
    x = x0.clone().to(device).requires_grad_()
    fn, ref_fn = ALL_LOSSES[name]
    loss = fn(x, labels.to(device), metric="cosine")
    assert torch.isfinite(loss).all()
    ref = ref_fn(x0.double(), labels, metric="cosine")
    assert_close(loss, ref, dtype, rtol=5e-2 if dtype == torch.bfloat16 else None,
                 atol=5e-2 if dtype == torch.bfloat16 else None)
    loss.backward()
    assert torch.isfinite(x.grad).all(), x.grad


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_large_magnitude_float32(device, name):
    # embeddings of norm ~1e3 in float32: no overflow or NaN, matches the reference relatively
    x, labels = make_batch(23, 8, 4, seed=5, dtype=torch.float32, device=device, scale=300.0)
    fn, ref_fn = ALL_LOSSES[name]
    xg = x.clone().requires_grad_()
    loss = fn(xg, labels, 50.0)
    loss.backward()
    ref = ref_fn(x.cpu().double(), labels.cpu(), 50.0)
    assert torch.isfinite(loss) and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-4, atol=1e-3)
