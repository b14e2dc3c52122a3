"""The compute-sanitizer subset: every CUDA kernel of csrc/cuda/ runs at least once, on CUDA only.

`benchmarks/gpu_check.sh` runs this module (marker `sanitize`) under compute-sanitizer's
memcheck, racecheck, synccheck and initcheck; the full suite runs it as ordinary tests too.
Each case is a real test against `triplet_cuda.reference` (float64 on the upcast input), kept
small so that four sanitizer passes fit in a few minutes:

* N = 130 anchors (2 full 64-row tiles and a ragged tail of 2; three 64-wide candidate tiles,
  so batch hard's candidate splits are combined), M = 67 rows for the two-operand distance;
* D = 33 in float32 (two 16-wide feature stages of the dot tiles and a tail of 1) and D = 135
  in float16 (three 64-wide gradient column tiles, the last of 7; two 128-column passes of
  the batch-hard backward);
* labels with several members per class, singletons and one far label value; two exact
  duplicate rows (the exact recompute of near-zero Gram distances), one of them also in y;
* every metric, every op forward and backward, and each mining strategy, in both dtypes;
* embeddings that are random multiples of 1/4 in [-3/4, 3/4]: exact in every dtype, so the
  kernels' products and squared distances are exact in float32, and with the Euclidean
  metrics their choices (hardest pair, semi-hard negative, active term, ties to the lowest
  index) equal the float64 reference's exactly: only the rounding of the returned values is
  tolerated, and a wrong index or a missed row shows as a plain mismatch. (Cosine distances
  are rounded; its mined indices are checked up to near-ties.)

Kernels and the cases that launch them:

| kernel (csrc/cuda/) | cases |
|---|---|
| row_stats_kernel, distance_kernel (distance.cuh) | every case |
| pair_grad_kernel, combine_splits_kernel (pair_grad.cuh) | pairwise distance, batch all, semi hard, contrastive backward |
| hard_mine_partial_kernel, hard_mine_finalize_kernel (batch_hard.cu) | batch hard, mine_triplets batch_hard |
| hard_pair_keys_kernel, hard_backward_kernel (batch_hard.cu) | batch hard backward |
| row_prefix_sums_kernel, batch_all_rows_kernel (batch_all.cu) | batch all forward / backward |
| semi_hard_rows_kernel (forward, backward, mine), semi_hard_counts_kernel (semi_hard.cu) | semi hard, mine_triplets semi_hard |
| contrastive_rows_kernel (contrastive.cu) | contrastive forward / backward |
| inverse_permutation_kernel, sort_keys_kernel, finalize_loss_kernel, scale_grad_kernel (loss_common.cuh) | batch all, semi hard, contrastive |
| batch_all_counts_kernel, batch_all_fill_kernel (mine_triplets.cu) | mine_triplets batch_all |

Not covered here: the multi-chunk path of the loss ops (anchor chunks at i0 > 0), which
starts only past N ~ 2000 (chunk_rows in loss_common.cuh keeps a 256 MiB workspace).
"""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import CUDA_AVAILABLE, METRICS, assert_close, assert_distances_close, tolerances

N, M = 130, 67
# (dtype, D): float32 and one half type, each at its own ragged feature size
CONFIGS = [(torch.float32, 33), (torch.float16, 135)]
CASES = [pytest.param(dt, d, metric, id=f"{str(dt).split('.')[-1]}-D{d}-{metric}")
         for dt, d in CONFIGS for metric in METRICS]

pytestmark = [
    pytest.mark.sanitize,
    pytest.mark.needs_cuda,
    pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs_cuda: torch.cuda.is_available() is False"),
]
DEVICE = "cuda"

# name -> (function, reference, margin)
LOSSES = {
    "batch_hard": (tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss, 0.7),
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss, 0.7),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss, 0.7),
    "contrastive": (tc.contrastive_loss, R.contrastive_loss, 1.5),
}


def quarters(n, d, g):
    """(n, d) float64 random multiples of 1/4 in [-3/4, 3/4] (exact in float16 too)."""
    return torch.randint(-3, 4, (n, d), generator=g).double() / 4


def sanitize_batch(d, dtype, seed):
    """(N, d) embeddings in dtype (on the CPU) and int64 labels: ~40 classes of a few members,
    some singletons, one far label value; rows 100 and 3 are exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    x = quarters(N, d, g).to(dtype)
    x[100] = x[3]
    labels = torch.randint(0, 40, (N,), generator=g)
    labels[7] = 10**12  # a singleton with a label far from the others
    return x, labels


def loss_tolerances(dtype, name):
    """(rtol, atol) of a loss or its gradient (atol to be scaled by the gradient's magnitude):
    the half dtypes round the returned value (batch hard also its mined distances)."""
    if dtype == torch.float16:
        return (1e-2, 1e-2) if name == "batch_hard" else (4e-3, 4e-3)
    return tolerances(dtype)


def check_grad(grad, ref_grad, dtype, name, msg):
    assert grad.dtype == dtype and grad.shape == ref_grad.shape, msg
    assert torch.isfinite(grad).all(), f"{msg}: non-finite gradient"
    rtol, atol = loss_tolerances(dtype, name)
    scale = max(1.0, ref_grad.abs().max().item())
    assert_close(grad, ref_grad, dtype, msg=msg, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype,d,metric", CASES)
def test_sanitize_pairwise_distance(dtype, d, metric, device=DEVICE):
    x0, _ = sanitize_batch(d, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    y0 = quarters(M, d, g).to(dtype)
    y0[5] = x0[17]  # a zero distance between x and y
    w = torch.randn(N, M, generator=g, dtype=torch.float64).to(dtype)
    x = x0.clone().to(device).requires_grad_()
    y = y0.clone().to(device).requires_grad_()
    out = tc.pairwise_distance(x, y, metric=metric)
    msg = f"pairwise_distance {metric} {dtype} D={d}"
    assert out.dtype == dtype and out.shape == (N, M), msg
    assert_distances_close(out, x0, y0, metric, dtype, msg=msg)
    (out * w.to(device)).sum().backward()
    xr, yr = x0.double().requires_grad_(), y0.double().requires_grad_()
    (R.pairwise_distance(xr, yr, metric=metric) * w.double()).sum().backward()
    check_grad(x.grad, xr.grad, dtype, "distance", msg + " grad x")
    check_grad(y.grad, yr.grad, dtype, "distance", msg + " grad y")


@pytest.mark.parametrize("dtype,d,metric", CASES)
def test_sanitize_batch_hard(dtype, d, metric, device=DEVICE):
    x0, labels = sanitize_batch(d, dtype, seed=3)
    x = x0.clone().to(device).requires_grad_()
    lab = labels.to(device)
    msg = f"batch_hard {metric} {dtype} D={d}"
    # the mining op: indices are valid and extreme (near-ties may pick either), distances match
    m = tc.batch_hard_mine(x.detach(), lab, metric=metric)
    r = R.batch_hard_mine(x0.double(), labels, metric=metric)
    dist = R.pairwise_distance(x0.double(), metric=metric)
    valid = r.pos_idx >= 0
    assert torch.equal(m.pos_idx.cpu() >= 0, valid) and torch.equal(m.neg_idx.cpu() >= 0, valid), msg
    rows = torch.nonzero(valid)[:, 0]
    for got_idx, got_dist, want_idx, want_dist, same in [(m.pos_idx, m.pos_dist, r.pos_idx, r.pos_dist, True),
                                                         (m.neg_idx, m.neg_dist, r.neg_idx, r.neg_dist, False)]:
        idx = got_idx.cpu()[rows]
        if metric != "cosine":  # exact distances: the same choice, ties to the lowest index
            assert torch.equal(got_idx.cpu(), want_idx), msg
        assert torch.equal(labels[idx] == labels[rows], torch.full_like(rows, same, dtype=torch.bool)), msg
        assert_close(got_dist.cpu()[rows], want_dist[rows], dtype, msg=msg)
        assert_close(dist[rows, idx], want_dist[rows], dtype, msg=msg + " (distance of the mined index)")
    # the loss and its backward (hard_pair_keys_kernel, hard_backward_kernel)
    fn, ref_fn, margin = LOSSES["batch_hard"]
    out, stats = fn(x, lab, margin, metric=metric, reduction="sum", return_stats=True)
    xr = x0.double().requires_grad_()
    ref, ref_stats = ref_fn(xr, labels, margin, metric=metric, reduction="sum", return_stats=True)
    assert_close(out, ref, dtype, msg=msg, rtol=loss_tolerances(dtype, "batch_hard")[0],
                 atol=loss_tolerances(dtype, "batch_hard")[1])
    assert stats.num_valid.item() == ref_stats.num_valid.item(), msg
    out.backward()
    ref.backward()
    check_grad(x.grad, xr.grad, dtype, "batch_hard", msg + " grad")


@pytest.mark.parametrize("name", ["batch_all", "semi_hard", "contrastive"])
@pytest.mark.parametrize("dtype,d,metric", CASES)
def test_sanitize_loss(name, dtype, d, metric, device=DEVICE):
    fn, ref_fn, margin = LOSSES[name]
    x0, labels = sanitize_batch(d, dtype, seed=4 + list(LOSSES).index(name))
    x = x0.clone().to(device).requires_grad_()
    msg = f"{name} {metric} {dtype} D={d}"
    out, stats = fn(x, labels.to(device), margin, metric=metric, reduction="sum", return_stats=True)
    xr = x0.double().requires_grad_()
    ref, ref_stats = ref_fn(xr, labels, margin, metric=metric, reduction="sum", return_stats=True)
    rtol, atol = loss_tolerances(dtype, name)
    assert out.dtype == dtype and out.device.type == torch.device(device).type, msg
    assert_close(out, ref, dtype, msg=msg, rtol=rtol, atol=atol)
    assert stats.num_valid.item() == ref_stats.num_valid.item(), msg
    # terms within rounding of 0 may land on either side of it
    slack = 1 if dtype == torch.float32 else max(1, ref_stats.num_valid.item() // 50)
    assert abs(stats.num_positive.item() - ref_stats.num_positive.item()) <= slack, msg
    out.backward()
    ref.backward()
    check_grad(x.grad, xr.grad, dtype, name, msg + " grad")


MINE_CASES = [pytest.param(s, dt, d, metric, id=f"{s}-{str(dt).split('.')[-1]}-{metric}")
              for (dt, d), metrics in zip(CONFIGS, [METRICS, METRICS[::-1]])
              for s, metric in zip(("batch_hard", "batch_all", "semi_hard"), metrics)]


@pytest.mark.parametrize("strategy,dtype,d,metric", MINE_CASES)
def test_sanitize_mine_triplets(strategy, dtype, d, metric, device=DEVICE):
    x0, labels = sanitize_batch(d, dtype, seed=9)
    got = [t.cpu() for t in tc.mine_triplets(x0.to(device), labels.to(device), strategy=strategy, metric=metric)]
    want = R.mine_triplets(x0.double(), labels, strategy=strategy, metric=metric)
    msg = f"mine_triplets {strategy} {metric} {dtype} D={d}"
    for t in got:
        assert t.dtype == torch.int64 and t.shape == want[0].shape, msg
    # anchors and positives do not depend on distances; a negative may differ from the
    # reference's only by a near-tie: then it is as far from the anchor, within tolerance
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), msg
    if strategy == "batch_all" or metric != "cosine":
        assert torch.equal(got[2], want[2]), msg
        return
    a, n_got, n_ref = got[0], got[2], want[2]
    assert (labels[n_got] != labels[a]).all(), msg + ": a negative with the anchor's label"
    dist = R.pairwise_distance(x0.double(), metric=metric)
    rtol, atol = tolerances(dtype)
    assert_close(dist[a, n_got], dist[a, n_ref], dtype, msg=msg, rtol=rtol, atol=atol)
