"""The compute-sanitizer subset: every CUDA kernel of csrc/cuda/ runs at least once, on CUDA only.

`benchmarks/gpu_check.sh` runs this module (marker `sanitize`) under compute-sanitizer's
memcheck, racecheck, synccheck and initcheck; the full suite runs it as ordinary tests too.
Each case is a real test against `triplet_cuda.reference` (float64 on the upcast input), kept
small so that four sanitizer passes fit in a few minutes:

* N = 270 anchors (two full 128-row tiles of the float32 / half mainloops and a ragged tail of
  14, so symmetric batch hard runs diagonal and off-diagonal upper-triangle tiles; five
  64-row float64 tiles; more columns than the 256 threads of the per-row kernels, so their
  strided loops run twice), M = 67 rows for the two-operand distance;
* four (dtype, D) configurations, one per mainloop load path: float32 D = 33 (SimtMainloop's
  converting register path, D % 4 != 0: two 16-wide feature stages and a tail of 1), float32
  D = 36 (its cp.async path with the zero-filled feature tail), float16 D = 135 (MmaMainloop's
  register-staged path, D % 8 != 0; three 64-wide gradient column tiles, the last of 7; two
  128-column passes of the batch-hard backward) and bfloat16 D = 136 (MmaMainloop's cp.async
  pipeline, five 32-wide stages, the last of 8);
* labels with several members per class, singletons and one far label value; two exact
  duplicate rows (the exact recompute of near-zero Gram distances), one of them also in y;
* every metric, every op forward and backward, and each mining strategy, in both dtypes;
* for the Euclidean metrics, embeddings that are random multiples of 1/4 in [-3/4, 3/4]:
  exact in every dtype, so the kernels' products and squared distances are exact in float32
  and their choices (hardest pair, semi-hard negative, active term, ties to the lowest index)
  equal the float64 reference's exactly; for cosine, normal random embeddings (quantized
  vectors have exactly tied cosines that rounding breaks either way), whose mined indices are
  checked up to near-ties;
* batch hard and semi hard: the choices are checked against the reference, then the loss and
  its gradient against the reference computed on those choices, so a near-tie cannot turn
  into a gradient mismatch.

Kernels and the cases that launch them:

| kernel (csrc/cuda/) | cases |
|---|---|
| row_stats_kernel (distance.cuh), distance_kernel (tiles.cu) | every case |
| pair_grad_kernel, combine_splits_kernel (pair_grad.cuh, compiled in tiles.cu) | pairwise distance, batch all, semi hard, contrastive backward |
| hard_mine_sym_kernel, hard_sym_merge_kernel, hard_mine_finalize_kernel (batch_hard.cu) | batch hard, mine_triplets batch_hard |
| hard_mine_partial_kernel (batch_hard.cu) | batch hard over a reference set |
| hard_pair_keys_kernel, hard_backward_kernel, hub_chunk_kernel (batch_hard_backward.cu) | batch hard backward |
| row_prefix_sums_kernel, batch_all_rows_kernel (batch_all.cu) | batch all forward / backward |
| semi_hard_rows_kernel (forward, backward, mine), semi_hard_counts_kernel (semi_hard.cu) | semi hard, mine_triplets semi_hard |
| contrastive_rows_kernel (contrastive.cu) | contrastive forward / backward |
| inverse_permutation_kernel, sort_keys_kernel, finalize_loss_kernel, scale_grad_kernel (loss_common.cuh) | batch all, semi hard, contrastive |
| batch_all_counts_kernel, batch_all_fill_kernel (mine_triplets.cu) | mine_triplets batch_all |
| all of the above over a reference set (RowLabels with candidate labels and a self index; hard_backward_kernel's anchor-only and partner-only forms) | test_sanitize_reference_set_* (the *_ref ops) |

Not covered here: the multi-chunk path of the loss ops (anchor chunks at i0 > 0), which
starts only past N ~ 2000 (chunk_rows in loss_common.cuh keeps a 256 MiB workspace).
"""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import CUDA_AVAILABLE, METRICS, assert_close, assert_distances_close, tolerances

N, M = 270, 67
# (dtype, D): each mainloop load path once (see the module docstring)
CONFIGS = [(torch.float32, 33), (torch.float32, 36), (torch.float16, 135), (torch.bfloat16, 136)]
CASES = [pytest.param(dt, d, metric, id=f"{str(dt).split('.')[-1]}-D{d}-{metric}")
         for dt, d in CONFIGS for metric in METRICS]

pytestmark = [
    pytest.mark.sanitize,
    pytest.mark.needs_cuda,
    pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs_cuda: torch.cuda.is_available() is False"),
]
DEVICE = "cuda"
MARGIN = {"batch_hard": 0.7, "batch_all": 0.7, "semi_hard": 0.7, "contrastive": 1.5}


def sanitize_batch(d, dtype, metric, seed, n=N):
    """(n, d) embeddings in dtype (on the CPU) and int64 labels: ~90 classes of a few members,
    some singletons, one far label value; rows 100 and 3 are exact duplicates. Multiples of 1/4
    for the Euclidean metrics, normal for cosine (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if metric == "cosine":
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    else:
        x = (torch.randint(-3, 4, (n, d), generator=g).double() / 4).to(dtype)
    x[100 % n] = x[3]
    labels = torch.randint(0, 90, (n,), generator=g)
    labels[7] = 10**12  # a singleton with a label far from the others
    return x, labels


def tol(dtype, name):
    """(rtol, atol) of a loss or a gradient (atol to be scaled by the gradient's magnitude):
    the half dtypes round the returned value (batch hard also its mined distances)."""
    if dtype == torch.float16:
        return (1e-2, 1e-2) if name == "batch_hard" else (4e-3, 4e-3)
    if dtype == torch.bfloat16:
        return (5e-2, 5e-2) if name == "batch_hard" else tolerances(dtype)
    return tolerances(dtype)


def check_value(out, ref, dtype, name, msg):
    assert out.dtype == dtype and out.shape == ref.shape, msg
    if ref.abs().item() > torch.finfo(dtype).max:  # not representable: the half result is inf
        assert torch.isinf(out).item(), f"{msg}: {out.item()} for {ref.item()}"
        return
    rtol, atol = tol(dtype, name)
    assert_close(out, ref, dtype, msg=msg, rtol=rtol, atol=atol)


def check_grad(grad, ref_grad, dtype, name, msg):
    assert grad.dtype == dtype and grad.shape == ref_grad.shape, msg
    assert torch.isfinite(grad).all(), f"{msg}: non-finite gradient"
    rtol, atol = tol(dtype, name)
    scale = max(1.0, ref_grad.abs().max().item())
    assert_close(grad, ref_grad, dtype, msg=msg, rtol=rtol, atol=atol * scale)


def check_hard_choice(idx, labels, dist, want_idx, metric, dtype, positive, msg):
    """Batch-hard indices (N,) against the reference's: equal (exact distances), or for cosine
    a positive / negative of the anchor as far / near as the reference's, within tolerance."""
    if metric != "cosine":
        assert torch.equal(idx, want_idx), msg
        return
    assert torch.equal(idx >= 0, want_idx >= 0), msg
    rows = torch.nonzero(want_idx >= 0)[:, 0]
    same = labels[idx[rows]] == labels[rows]
    assert bool(same.all() if positive else not same.any()), f"{msg}: an index with the wrong label"
    assert (idx[rows] != rows).all(), f"{msg}: the anchor itself"
    rtol, atol = tolerances(dtype)
    assert_close(dist[rows, idx[rows]], dist[rows, want_idx[rows]], dtype, msg=msg, rtol=rtol, atol=atol)


def check_semi_hard_choice(got, want, dist, dtype, msg):
    """Semi-hard triplets (a, p, n) against the reference's: the same (a, p); each negative the
    reference's, or differing only where a decisive distance is within tolerance of another
    (two candidates, or a candidate and d(a, p)): near-ties that rounding may break either way."""
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), msg
    a, p, n_got, n_ref = got[0], got[1], got[2], want[2]
    rtol, atol = tolerances(dtype)
    d_ap, d_got, d_ref = dist[a, p], dist[a, n_got], dist[a, n_ref]

    def near(u, v):
        return (u - v).abs() <= atol + rtol * v.abs()

    ok = (n_got == n_ref) | near(d_got, d_ref) | near(d_ref, d_ap) | near(d_got, d_ap)
    assert ok.all(), f"{msg}: {int((~ok).sum())} semi-hard negatives differ beyond near-ties"


@pytest.mark.parametrize("dtype,d,metric", CASES)
def test_sanitize_pairwise_distance(dtype, d, metric, device=DEVICE):
    x0, _ = sanitize_batch(d, dtype, metric, seed=1)
    y0, _ = sanitize_batch(d, dtype, metric, seed=2, n=M)
    y0[5] = x0[17]  # a zero distance between x and y
    w = torch.randn(N, M, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
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
    x0, labels = sanitize_batch(d, dtype, metric, seed=4)
    x = x0.clone().to(device).requires_grad_()
    lab = labels.to(device)
    msg = f"batch_hard {metric} {dtype} D={d}"
    # the mining op: the choices, and the distances it returns
    m = tc.batch_hard_mine(x.detach(), lab, metric=metric)
    r = R.batch_hard_mine(x0.double(), labels, metric=metric)
    dist = R.pairwise_distance(x0.double(), metric=metric)
    pi, ni = m.pos_idx.cpu(), m.neg_idx.cpu()
    check_hard_choice(pi, labels, dist, r.pos_idx, metric, dtype, True, msg + " pos_idx")
    check_hard_choice(ni, labels, dist, r.neg_idx, metric, dtype, False, msg + " neg_idx")
    assert_close(m.pos_dist, r.pos_dist, dtype, msg=msg + " pos_dist")
    assert_close(m.neg_dist, r.neg_dist, dtype, msg=msg + " neg_dist")
    # the loss and its backward (hard_pair_keys_kernel, hard_backward_kernel), against the
    # reference computed on the kernel's choices
    out, stats = tc.batch_hard_triplet_loss(x, lab, MARGIN["batch_hard"], metric=metric, reduction="sum",
                                            return_stats=True)
    xr = x0.double().requires_grad_()
    rows = torch.nonzero(pi >= 0)[:, 0]
    dr = R.pairwise_distance(xr, metric=metric)
    ref = torch.relu(dr[rows, pi[rows]] - dr[rows, ni[rows]] + MARGIN["batch_hard"]).sum()
    check_value(out, ref, dtype, "batch_hard", msg)
    assert stats.num_valid.item() == int((r.pos_idx >= 0).sum()), msg
    out.backward()
    ref.backward()
    check_grad(x.grad, xr.grad, dtype, "batch_hard", msg + " grad")


@pytest.mark.parametrize("name", ["batch_all", "semi_hard", "contrastive"])
@pytest.mark.parametrize("dtype,d,metric", CASES)
def test_sanitize_loss(name, dtype, d, metric, device=DEVICE):
    fn = {"batch_all": tc.batch_all_triplet_loss, "semi_hard": tc.semi_hard_triplet_loss,
          "contrastive": tc.contrastive_loss}[name]
    ref_fn = {"batch_all": R.batch_all_triplet_loss, "semi_hard": R.semi_hard_triplet_loss,
              "contrastive": R.contrastive_loss}[name]
    margin = MARGIN[name]
    x0, labels = sanitize_batch(d, dtype, metric, seed=5 + list(MARGIN).index(name))
    x = x0.clone().to(device).requires_grad_()
    lab = labels.to(device)
    msg = f"{name} {metric} {dtype} D={d}"
    out, stats = fn(x, lab, margin, metric=metric, reduction="sum", return_stats=True)
    assert out.device.type == torch.device(device).type, msg
    xr = x0.double().requires_grad_()
    ref, ref_stats = ref_fn(xr, labels, margin, metric=metric, reduction="sum", return_stats=True)
    if name == "semi_hard":
        # the choices (mine_triplets shares the selection), then the reference on them
        got = [t.cpu() for t in tc.mine_triplets(x.detach(), lab, strategy="semi_hard", metric=metric)]
        want = R.mine_triplets(x0.double(), labels, strategy="semi_hard", metric=metric)
        check_semi_hard_choice(got, want, R.pairwise_distance(x0.double(), metric=metric), dtype, msg)
        dr = R.pairwise_distance(xr, metric=metric)
        ref = torch.relu(dr[got[0], got[1]] - dr[got[0], got[2]] + margin).sum()
    check_value(out, ref, dtype, name, msg)
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
    x0, labels = sanitize_batch(d, dtype, metric, seed=9)
    got = [t.cpu() for t in tc.mine_triplets(x0.to(device), labels.to(device), strategy=strategy, metric=metric)]
    want = R.mine_triplets(x0.double(), labels, strategy=strategy, metric=metric)
    msg = f"mine_triplets {strategy} {metric} {dtype} D={d}"
    for t in got:
        assert t.dtype == torch.int64 and t.shape == want[0].shape, msg
    if strategy == "batch_all" or metric != "cosine":  # exact distances, or none needed
        for g, w, what in zip(got, want, ("anchor", "positive", "negative")):
            assert torch.equal(g, w), f"{msg}: {what} indices differ"
        return
    dist = R.pairwise_distance(x0.double(), metric=metric)
    if strategy == "semi_hard":
        check_semi_hard_choice(got, want, dist, dtype, msg)
    else:  # batch_hard: one triplet per valid anchor
        assert torch.equal(got[0], want[0]), msg
        for k, positive in ((1, True), (2, False)):
            full, full_want = torch.full((N,), -1), torch.full((N,), -1)
            full[got[0]], full_want[want[0]] = got[k], want[k]
            check_hard_choice(full, labels, dist, full_want, metric, dtype, positive, msg)


# Query vs reference set (the *_ref ops): 67 anchors that are reference rows 130 .. 196 of
# M_REF = 270 (ragged candidate tiles, several candidate splits), a self index tensor naming
# them except every fourth anchor (-1: that anchor's own row is then an ordinary candidate, a
# positive at distance 0). Euclidean metrics only (quantized rows: exact choices, see the
# module docstring); both dtypes; every op forward and backward, both gradients; each mining
# strategy. Covers the same kernels as above run over RowLabels with a separate candidate set
# (hard_backward_kernel's anchor-only and partner-only forms included).
REF_CASES = [pytest.param(dt, d, metric, id=f"{str(dt).split('.')[-1]}-D{d}-{metric}")
             for (dt, d), metric in zip(CONFIGS, ("euclidean", "squared_euclidean"))]
REF_FIRST, REF_N = 130, 67


def sanitize_reference_set(d, dtype, metric, seed):
    ref0, ref_labels = sanitize_batch(d, dtype, metric, seed=seed)
    x0 = ref0[REF_FIRST:REF_FIRST + REF_N].clone()
    labels = ref_labels[REF_FIRST:REF_FIRST + REF_N].clone()
    labels[:4] = 10**12 + 1  # anchors whose label the reference set lacks: no positive
    self_index = torch.arange(REF_FIRST, REF_FIRST + REF_N)
    self_index[::4] = -1
    return x0, labels, ref0, ref_labels, self_index


@pytest.mark.parametrize("dtype,d,metric", REF_CASES)
def test_sanitize_reference_set_batch_hard(dtype, d, metric, device=DEVICE):
    x0, labels, r0, rl, si = sanitize_reference_set(d, dtype, metric, seed=12)
    x, r = x0.clone().to(device).requires_grad_(), r0.clone().to(device).requires_grad_()
    kw = dict(ref_labels=rl.to(device), ref_self_index=si.to(device), metric=metric)
    kw_ref = dict(ref_labels=rl, ref_self_index=si, metric=metric)
    msg = f"batch_hard ref {metric} {dtype} D={d}"
    m = tc.batch_hard_mine(x.detach(), labels.to(device), ref_embeddings=r.detach(), **kw)
    want = R.batch_hard_mine(x0.double(), labels, ref_embeddings=r0.double(), **kw_ref)
    pi, ni = m.pos_idx.cpu(), m.neg_idx.cpu()
    assert torch.equal(pi, want.pos_idx) and torch.equal(ni, want.neg_idx), msg
    assert_close(m.pos_dist, want.pos_dist, dtype, msg=msg + " pos_dist")
    assert_close(m.neg_dist, want.neg_dist, dtype, msg=msg + " neg_dist")
    out = tc.batch_hard_triplet_loss(x, labels.to(device), MARGIN["batch_hard"], reduction="sum",
                                     ref_embeddings=r, **kw)
    xr, rr = x0.double().requires_grad_(), r0.double().requires_grad_()
    ref = R.batch_hard_triplet_loss(xr, labels, MARGIN["batch_hard"], reduction="sum", ref_embeddings=rr,
                                    **kw_ref)
    check_value(out, ref, dtype, "batch_hard", msg)
    out.backward()
    ref.backward()
    check_grad(x.grad, xr.grad, dtype, "batch_hard", msg + " grad embeddings")
    check_grad(r.grad, rr.grad, dtype, "batch_hard", msg + " grad ref")


@pytest.mark.parametrize("name", ["batch_all", "semi_hard", "contrastive"])
@pytest.mark.parametrize("dtype,d,metric", REF_CASES)
def test_sanitize_reference_set_loss(name, dtype, d, metric, device=DEVICE):
    fn = {"batch_all": tc.batch_all_triplet_loss, "semi_hard": tc.semi_hard_triplet_loss,
          "contrastive": tc.contrastive_loss}[name]
    ref_fn = {"batch_all": R.batch_all_triplet_loss, "semi_hard": R.semi_hard_triplet_loss,
              "contrastive": R.contrastive_loss}[name]
    x0, labels, r0, rl, si = sanitize_reference_set(d, dtype, metric, seed=13 + list(MARGIN).index(name))
    x, r = x0.clone().to(device).requires_grad_(), r0.clone().to(device).requires_grad_()
    kw = dict(ref_labels=rl.to(device), ref_self_index=si.to(device), metric=metric)
    kw_ref = dict(ref_labels=rl, ref_self_index=si, metric=metric)
    msg = f"{name} ref {metric} {dtype} D={d}"
    out, stats = fn(x, labels.to(device), MARGIN[name], reduction="sum", return_stats=True, ref_embeddings=r, **kw)
    xr, rr = x0.double().requires_grad_(), r0.double().requires_grad_()
    ref, ref_stats = ref_fn(xr, labels, MARGIN[name], reduction="sum", return_stats=True, ref_embeddings=rr,
                            **kw_ref)
    check_value(out, ref, dtype, name, msg)
    assert stats.num_valid.item() == ref_stats.num_valid.item(), msg
    slack = 1 if dtype == torch.float32 else max(1, ref_stats.num_valid.item() // 50)
    assert abs(stats.num_positive.item() - ref_stats.num_positive.item()) <= slack, msg
    out.backward()
    ref.backward()
    check_grad(x.grad, xr.grad, dtype, name, msg + " grad embeddings")
    check_grad(r.grad, rr.grad, dtype, name, msg + " grad ref")
    # a detached reference set: the backward ops' ref_grad=False path
    x.grad = None
    fn(x, labels.to(device), MARGIN[name], reduction="sum", ref_embeddings=r.detach(), **kw).backward()
    check_grad(x.grad, xr.grad, dtype, name, msg + " grad embeddings (detached ref)")


@pytest.mark.parametrize("strategy", ["batch_hard", "batch_all", "semi_hard"])
@pytest.mark.parametrize("dtype,d,metric", REF_CASES)
def test_sanitize_reference_set_mine_triplets(strategy, dtype, d, metric, device=DEVICE):
    x0, labels, r0, rl, si = sanitize_reference_set(d, dtype, metric, seed=17)
    got = tc.mine_triplets(x0.to(device), labels.to(device), strategy=strategy, metric=metric,
                           ref_embeddings=r0.to(device), ref_labels=rl.to(device), ref_self_index=si.to(device))
    want = R.mine_triplets(x0.double(), labels, strategy, metric, ref_embeddings=r0.double(), ref_labels=rl,
                           ref_self_index=si)
    msg = f"mine_triplets ref {strategy} {metric} {dtype} D={d}"
    for g, w, what in zip(got, want, ("anchor", "positive", "negative")):
        assert g.dtype == torch.int64 and torch.equal(g.cpu(), w), f"{msg}: {what} indices differ"
