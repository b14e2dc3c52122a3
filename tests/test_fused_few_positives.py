"""The fused few-positives paths of batch all and semi hard (every anchor at most 16 positives)
and their fallback (more), against the pure-PyTorch reference, on both sides of the switch and
for the label patterns that stress them: lane widths 4 / 8 / 16, one huge class, all
singletons, all-equal embeddings, several anchor tiles and candidate splits, a reference set.
Also the batch-hard backward's hub split (one row the nearest negative of most anchors)."""
from __future__ import annotations

import pytest
import torch
from conftest import METRICS, assert_close, cpu_and_cuda

import triplet_cuda as tc
from triplet_cuda import reference as R

LOSSES = {
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss),
}
MAX_FUSED_POSITIVES = 16  # csrc/cpu/fused.h kFusedMaxPositives == csrc/cuda/few_positives.cuh's


def _labels(sizes, seed):
    """Labels with the given class sizes, shuffled."""
    lab = torch.cat([torch.full((s,), c, dtype=torch.int64) for c, s in enumerate(sizes)])
    g = torch.Generator().manual_seed(seed)
    return lab[torch.randperm(lab.numel(), generator=g)]


def _check(name, x, labels, metric, margin=0.3, **kw):
    fn, ref_fn = LOSSES[name]
    xg = x.clone().requires_grad_()
    xr = x.detach().cpu().double().requires_grad_()
    for reduction in ("sum", "mean", "mean_nonzero"):
        out, stats = fn(xg, labels, margin, metric=metric, reduction=reduction, return_stats=True, **kw)
        ref, ref_stats = ref_fn(xr, labels.cpu(), margin, metric=metric, reduction=reduction, return_stats=True,
                                **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
        msg = f"{name} {metric} {reduction} N={x.shape[0]}"
        assert_close(out, ref, torch.float64, msg=msg)
        assert int(stats.num_valid) == int(ref_stats.num_valid), msg
        assert int(stats.num_positive) == int(ref_stats.num_positive), msg
    (g,) = torch.autograd.grad(fn(xg, labels, margin, metric=metric, reduction="sum", **kw), xg)
    ref_fn(xr, labels.cpu(), margin, metric=metric, reduction="sum",
           **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}).backward()
    assert torch.isfinite(g).all()
    scale = max(1.0, xr.grad.abs().max().item())
    assert_close(g, xr.grad, torch.float64, msg=f"{name} {metric} grad", atol=1e-9 * scale)


# class sizes: the largest class fixes the lane width (positives = size - 1): 4, 8, 16 lanes;
# 17 positives: the fallback; mixed sizes with singletons
SIZES = {
    "lanes4": [5, 5, 4, 3, 5, 1, 5, 2],
    "lanes8": [9, 2, 7, 9, 1, 4],
    "lanes16": [17, 3, 17, 6, 1],
    "fallback17": [18, 3, 17, 6, 1],
    "one_huge_class": [60, 1, 1, 1, 2, 1],
}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("name", LOSSES)
def test_both_sides_of_the_positive_limit(device, metric, sizes, name):
    labels = _labels(SIZES[sizes], seed=len(sizes)).to(device)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(labels.numel(), 11, generator=g, dtype=torch.float64).to(device)
    _check(name, x, labels, metric)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
def test_many_tiles_and_splits(device, name):
    # 203 anchors: 4 anchor tiles of 64 and 4 candidate splits on CUDA; classes of 4
    labels = _labels([4] * 50 + [3], seed=3).to(device)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(labels.numel(), 33, generator=g, dtype=torch.float64).to(device)
    _check(name, x, labels, "euclidean", margin=1.0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
def test_all_singletons(device, name):
    # no positive anywhere: the loss is 0 with no valid term, the gradient exactly 0
    x = torch.randn(70, 5, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.arange(70, device=device)
    out, stats = LOSSES[name][0](x, labels, return_stats=True)
    assert out.item() == 0.0 and int(stats.num_valid) == 0
    (grad,) = torch.autograd.grad(out, x)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n_per_class", [4, 17, 18])  # lanes 4, lanes 16, the fallback
@pytest.mark.parametrize("name", LOSSES)
def test_all_equal_embeddings(device, dtype, n_per_class, name):
    # every distance exactly 0 (the near-zero rule): every term is the margin, ties everywhere
    labels = _labels([n_per_class] * 4 + [1], seed=n_per_class).to(device)
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype, device=device).repeat(labels.numel(), 1)
    x.requires_grad_()
    fn, ref_fn = LOSSES[name]
    out, stats = fn(x, labels, 0.3, reduction="sum", return_stats=True)
    ref, ref_stats = ref_fn(x.detach().cpu().double(), labels.cpu(), 0.3, reduction="sum", return_stats=True)
    assert_close(out, ref, dtype)
    assert (int(stats.num_valid), int(stats.num_positive)) == (int(ref_stats.num_valid), int(ref_stats.num_positive))
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])  # the reference's exact forms
def test_semi_hard_duplicated_positive_ties(device, metric):
    # negatives that duplicate positives exactly (d_an == d_ap): "d_an > d_ap" is false for
    # them on every backend, although the fused path computes d_ap and d_an in different orders
    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 7, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[1::2]]).to(device)  # rows 12.. duplicate the odd rows
    labels = torch.tensor([i // 3 for i in range(12)] + [10 + i for i in range(6)], device=device)
    # (values and choices only: at an exact tie the gradient is a matter of convention)
    for reduction in ("sum", "mean_nonzero"):
        out, stats = tc.semi_hard_triplet_loss(x, labels, 0.5, metric=metric, reduction=reduction, return_stats=True)
        ref, ref_stats = R.semi_hard_triplet_loss(x.cpu(), labels.cpu(), 0.5, metric=metric, reduction=reduction,
                                                  return_stats=True)
        assert_close(out, ref, torch.float64)
        assert int(stats.num_positive) == int(ref_stats.num_positive)
    if device == "cpu":
        # the CPU's Gram-form distances of two identical negatives may differ by an ulp (GEMM
        # blocking), so its choice between them is not the reference's lowest index; the CUDA
        # tile computes identical rows' dot products by the same operations: equal values
        return
    got = tc.mine_triplets(x, labels, strategy="semi_hard", metric=metric)
    want = R.mine_triplets(x.cpu(), labels.cpu(), "semi_hard", metric)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("ref_sizes", [[3, 5, 2, 4], [30, 5, 2, 4]])  # fused; fallback (29 positives)
def test_reference_set_both_paths(device, name, ref_sizes):
    g = torch.Generator().manual_seed(sum(ref_sizes))
    rl = _labels(ref_sizes, seed=1).to(device)
    r = torch.randn(rl.numel(), 6, generator=g, dtype=torch.float64).to(device)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 5, (9,), generator=g).to(device)  # label 4: no positive in the set
    fn, ref_fn = LOSSES[name]
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    xr, rr = x.cpu().clone().requires_grad_(), r.cpu().clone().requires_grad_()
    out, stats = fn(xg, labels, 0.4, reduction="sum", return_stats=True, ref_embeddings=rg, ref_labels=rl)
    ref, ref_stats = ref_fn(xr, labels.cpu(), 0.4, reduction="sum", return_stats=True, ref_embeddings=rr,
                            ref_labels=rl.cpu())
    assert_close(out, ref, torch.float64)
    assert (int(stats.num_valid), int(stats.num_positive)) == (int(ref_stats.num_valid), int(ref_stats.num_positive))
    g_got = torch.autograd.grad(out, (xg, rg))
    g_want = torch.autograd.grad(ref, (xr, rr))
    assert_close(g_got[0], g_want[0], torch.float64)
    assert_close(g_got[1], g_want[1], torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_batch_hard_backward_hub_row(device, metric):
    # row 0 at the origin is the nearest negative of most anchors (gaussian points are farther
    # from each other than from the origin): a partner list far longer than the CUDA backward's
    # 64-pair chunks, split across warps and summed in a fixed order
    g = torch.Generator().manual_seed(2)
    x = torch.randn(301, 64, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)  # unit sphere: other points ~1.4 apart, the origin 1
    x[0] = 0.01 * torch.randn(64, generator=g, dtype=torch.float64)  # not 0: cosine is defined
    labels = torch.arange(301) % 3
    m = tc.batch_hard_mine(x, labels, metric=metric)
    if metric != "cosine":
        assert (m.neg_idx == 0).sum().item() > 128, "row 0 is not a hub"
    xg = x.clone().to(device).requires_grad_()
    xr = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(tc.batch_hard_triplet_loss(xg, labels.to(device), 0.5, metric=metric), xg)
    R.batch_hard_triplet_loss(xr, labels, 0.5, metric=metric).backward()
    assert_close(got, xr.grad, torch.float64)
    (again,) = torch.autograd.grad(tc.batch_hard_triplet_loss(xg, labels.to(device), 0.5, metric=metric), xg)
    assert torch.equal(got, again)
