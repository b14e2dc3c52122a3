"""Numerical edge cases against the float64 reference: extreme norms, duplicates, training
collapse, cosine with zero vectors, huge margins. Tolerances: docs/numerics.md."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import METRICS
from triplet_cuda import reference as R

LOSSES = {
    "batch_hard": (tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss),
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss),
    "contrastive": (tc.contrastive_loss, R.contrastive_loss),
}
# relative tolerance of a loss against the float64 reference on the same (rounded) input
RTOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _batch(n=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.arange(n) % 5


def _check(fn, ref, x, labels, margin, metric, dtype, reduction="sum"):
    got = fn(x.to(dtype), labels, margin, metric=metric, reduction=reduction)
    want = ref(x.to(dtype).double(), labels, margin, metric=metric, reduction=reduction)
    assert torch.isfinite(got).all()
    scale = float(want.abs()) if want.numel() == 1 else float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=RTOL[dtype] * max(scale, 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", [1e4, 1e-4], ids=["norm1e4", "norm1e-4"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_extreme_norms(dtype, norm, loss):
    x, labels = _batch()
    x = x / x.norm(dim=1, keepdim=True) * norm
    fn, ref = LOSSES[loss]
    for metric in ("euclidean", "cosine"):
        # margin in the units of the distances
        margin = 0.3 * norm if metric == "euclidean" else 0.3
        if dtype == torch.float16 and norm == 1e-4 and metric == "euclidean":
            continue  # 1e-4 embeddings are float16 subnormals (10 bits -> fewer): no relative accuracy left
        if dtype == torch.float16 and norm == 1e4 and loss == "contrastive":
            continue  # d^2 ~ 4e8 is beyond float16's range: the float16 result is inf by definition
        # "mean": a float16 sum of 24 terms ~1e4 is itself beyond float16's range
        _check(fn, ref, x, labels, margin, metric, dtype, reduction="mean")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_exact_duplicates(dtype, metric):
    x, labels = _batch(12, 7)
    x = torch.cat([x, x])  # every row twice, same label: d_ap = 0 exactly for the duplicate
    labels = torch.cat([labels, labels])
    m = tc.batch_hard_mine(x.to(dtype), labels, metric=metric)
    d = tc.pairwise_distance(x.to(dtype), metric=metric)
    if metric != "cosine":  # the near-zero rule: exactly 0 (cosine: 1 - cos within rounding of 0)
        assert bool((d.diagonal() == 0).all()) and bool((d[:12, 12:].diagonal() == 0).all())
    x_ = x.to(dtype).requires_grad_()
    tc.batch_hard_triplet_loss(x_, labels, metric=metric).backward()
    assert torch.isfinite(x_.grad).all()
    r = R.batch_hard_mine(x.to(dtype).double(), labels, metric)
    torch.testing.assert_close(m.neg_dist.double(), r.neg_dist, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_training_collapse(dtype, loss, metric):
    # every embedding within 1e-3 of one point of norm ~4: distances are ~1e-3, the Gram form's
    # cancellation error is ~eps * 16; the near-zero rule recomputes them from differences
    g = torch.Generator().manual_seed(1)
    center = torch.randn(1, 16, generator=g, dtype=torch.float64)
    x = center + 1e-3 * torch.rand(20, 16, generator=g, dtype=torch.float64) / 4
    labels = torch.arange(20) % 4
    fn, ref = LOSSES[loss]
    # (cosine is left out: its distances here, ~1e-8, are below the accuracy of 1 - cos)
    margin = 1e-4 if metric == "euclidean" else 1e-8
    _check(fn, ref, x, labels, margin, metric, dtype)
    xg = x.to(dtype).requires_grad_()
    fn(xg, labels, margin, metric=metric).backward()
    assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_cosine_with_zero_vectors(dtype, loss):
    x, labels = _batch(15, 6)
    x[[0, 3, 7]] = 0  # cosine distance to a zero vector is 1 (norms clamped at 1e-8)
    fn, ref = LOSSES[loss]
    _check(fn, ref, x, labels, 0.2, "cosine", dtype)
    xg = x.to(dtype).requires_grad_()
    fn(xg, labels, 0.2, metric="cosine").backward()
    assert torch.isfinite(xg.grad).all()
    d = tc.pairwise_distance(x.to(dtype), metric="cosine")
    assert bool((d[0].double() - 1).abs().max() < RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("margin", [1e6, 1e30])
def test_huge_margins(dtype, loss, margin):
    x, labels = _batch(16, 5)
    fn, ref = LOSSES[loss]
    if loss == "contrastive" and dtype == torch.float32 and margin == 1e30:
        # (1e30 - d)^2 = 1e60 overflows float32: the float32 loss is inf, as the float32 reference's
        got = fn(x.float(), labels, margin)
        assert got == float("inf") and R.contrastive_loss(x.float(), labels, margin) == float("inf")
        return
    _check(fn, ref, x, labels, margin, "euclidean", dtype, reduction="mean")
