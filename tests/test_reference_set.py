"""Query vs reference set (ref_embeddings, ref_labels, ref_self_index) in every mining function,
loss and module, against the pure-PyTorch oracle triplet_cuda.reference (N x M / N x M x M)."""
from __future__ import annotations

import pytest
import torch
from conftest import METRICS, assert_close, cpu_and_cuda

import triplet_cuda as tc
import triplet_cuda.reference as R
from triplet_cuda._ops import ops

LOSSES = ("batch_hard_triplet_loss", "batch_all_triplet_loss", "semi_hard_triplet_loss", "contrastive_loss")
REDUCTIONS = {"batch_hard_triplet_loss": ("mean", "sum", "mean_nonzero", "none")}


def _set(n, m, d, classes, ref_classes, *, seed, device, dtype=torch.float64, grad=True):
    """Anchors (n, d) with labels in [0, classes) and a reference set (m, d) with labels in
    [0, ref_classes), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    r = torch.randn(m, d, generator=g, dtype=torch.float64)
    rl = torch.randint(0, ref_classes, (m,), generator=g)
    x, r = x.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)
    return x.requires_grad_(grad), y.to(device), r.requires_grad_(grad), rl.to(device)


def _self_index(kind, n, m, device, seed=0):
    if kind == "none":
        return None
    if kind == "int":
        return m - n if m >= n else 0
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(m, generator=g)[:n]
    idx = torch.cat([idx, torch.full((max(n - m, 0),), -1, dtype=torch.int64)])
    idx[::3] = -1  # some anchors are not in the set
    return idx.to(device)


# (n, m, anchor classes, reference classes): M >> N; M < N; reference labels absent from the
# batch (classes 0..2 vs 0..9); anchors without any positive in the reference set (classes 5..8
# never appear there).
CASES = {
    "m_much_larger": (7, 300, 4, 6),
    "m_smaller": (13, 5, 3, 3),
    "ref_labels_absent_from_batch": (9, 40, 3, 10),
    "anchors_without_positive": (11, 17, 9, 5),
}


def _self_index_for(case, kind, n, m, device):
    if kind == "int" and m < n:
        return None  # an int k needs k + N <= M
    return _self_index(kind, n, m, device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("self_kind", ["none", "int", "tensor"])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_matches_reference(device, case, self_kind, name):
    n, m, c, rc = CASES[case]
    # one metric per (case, self index kind), every metric over the grid: keeps the file fast
    metric_i = (list(CASES).index(case) + ["none", "int", "tensor"].index(self_kind)) % 3
    for metric in (METRICS[metric_i],):
        x, y, r, rl = _set(n, m, 6, c, rc, seed=metric_i + 10 * len(case), device=device)
        si = _self_index_for(case, self_kind, n, m, device)
        kw = dict(ref_embeddings=r, ref_labels=rl, ref_self_index=si, metric=metric)
        for reduction in REDUCTIONS.get(name, ("mean", "sum", "mean_nonzero")):
            got, stats = getattr(tc, name)(x, y, 0.3, reduction=reduction, return_stats=True, **kw)
            want, want_stats = getattr(R, name)(x, y, 0.3, reduction=reduction, return_stats=True, **kw)
            msg = f"{name} {case} self={self_kind} {metric} {reduction}"
            assert_close(got, want, torch.float64, msg)
            assert int(stats.num_valid) == int(want_stats.num_valid), msg
            assert int(stats.num_positive) == int(want_stats.num_positive), msg
            w = torch.randn_like(want) if reduction == "none" else None
            g_got = torch.autograd.grad(got, (x, r), w)
            g_want = torch.autograd.grad(want, (x, r), w)
            assert_close(g_got[0], g_want[0], torch.float64, msg + " grad embeddings")
            assert_close(g_got[1], g_want[1], torch.float64, msg + " grad ref")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("self_kind", ["none", "int", "tensor"])
def test_mining_matches_reference(device, case, self_kind):
    n, m, c, rc = CASES[case]
    metric_i = (list(CASES).index(case) + ["none", "int", "tensor"].index(self_kind)) % 3
    for metric in (METRICS[metric_i],):
        x, y, r, rl = _set(n, m, 6, c, rc, seed=100 + metric_i, device=device, grad=False)
        si = _self_index_for(case, self_kind, n, m, device)
        kw = dict(ref_embeddings=r, ref_labels=rl, ref_self_index=si)
        got = tc.batch_hard_mine(x, y, metric=metric, **kw)
        want = R.batch_hard_mine(x, y, metric, **kw)
        assert torch.equal(got.pos_idx.cpu(), want.pos_idx.cpu()) and torch.equal(got.neg_idx.cpu(), want.neg_idx.cpu())
        assert_close(got.pos_dist, want.pos_dist, torch.float64)
        assert_close(got.neg_dist, want.neg_dist, torch.float64)
        for strategy in ("batch_hard", "batch_all", "semi_hard"):
            got_t = tc.mine_triplets(x, y, strategy=strategy, metric=metric, **kw)
            want_t = R.mine_triplets(x, y, strategy, metric, **kw)
            for a, b in zip(got_t, want_t):
                assert torch.equal(a.cpu(), b.cpu()), f"{strategy} {case} {self_kind} {metric}"


def test_self_index_excludes_the_anchor():
    # anchor i is reference row 2 + i, alone in its class there: no positive; without the self
    # index it would be its own positive at distance 0.
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    y = torch.tensor([0, 1])
    r = torch.cat([torch.tensor([[1.0, 0.0], [9.0, 9.0]]), x])
    rl = torch.tensor([0, 2, 0, 1])
    m = tc.batch_hard_mine(x, y, ref_embeddings=r, ref_labels=rl, ref_self_index=2)
    assert m.pos_idx.tolist() == [0, -1] and m.neg_idx.tolist() == [3, -1]
    m = tc.batch_hard_mine(x, y, ref_embeddings=r, ref_labels=rl)  # None: nothing excluded
    assert m.pos_idx.tolist() == [0, 3] and m.pos_dist.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES + ("batch_hard_mine",))
def test_batch_as_its_own_reference_set_is_todays_result(device, name):
    x, y, _, _ = _set(10, 1, 5, 3, 1, seed=3, device=device)
    for si in (0, torch.arange(10, device=device)):
        for reduction in ("mean", "sum") if name != "batch_hard_mine" else (None,):
            if name == "batch_hard_mine":
                today = tc.batch_hard_mine(x, y).pos_dist.sum() + tc.batch_hard_mine(x, y).neg_dist.sum()
                out = tc.batch_hard_mine(x, y, ref_embeddings=x, ref_labels=y, ref_self_index=si)
                assert torch.equal(out.pos_idx, tc.batch_hard_mine(x, y).pos_idx)
                with_ref = out.pos_dist.sum() + out.neg_dist.sum()
            else:
                today = getattr(tc, name)(x, y, reduction=reduction)
                with_ref = getattr(tc, name)(x, y, reduction=reduction, ref_embeddings=x, ref_labels=y,
                                             ref_self_index=si)
                if name == "contrastive_loss" and reduction == "sum":
                    today = 2 * today  # ordered pairs: each unordered pair twice
            assert_close(with_ref, today, torch.float64, f"{name} {reduction}")
            # the same tensor as both sets: autograd adds both gradients, = today's gradient
            g_ref, = torch.autograd.grad(with_ref, x)
            g_today, = torch.autograd.grad(today, x)
            assert_close(g_ref, g_today, torch.float64, f"{name} {reduction} grad")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES + ("batch_hard_mine",))
def test_gradcheck_both_sets(device, name):
    x, y, r, rl = _set(4, 7, 3, 2, 3, seed=5, device=device)
    si = torch.tensor([5, -1, 2, -1], device=device)

    def f(a, b):
        kw = dict(ref_embeddings=b, ref_labels=rl, ref_self_index=si)
        if name == "batch_hard_mine":
            m = tc.batch_hard_mine(a, y, **kw)
            return m.pos_dist, m.neg_dist
        return getattr(tc, name)(a, y, 0.7, reduction="sum", **kw)

    assert torch.autograd.gradcheck(f, (x, r))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
def test_detached_reference_set(device, name):
    x, y, r, rl = _set(7, 30, 4, 3, 3, seed=6, device=device)
    got = getattr(tc, name)(x, y, ref_embeddings=r.detach(), ref_labels=rl)
    got.backward()
    assert r.grad is None
    x2 = x.detach().requires_grad_()
    getattr(R, name)(x2, y, ref_embeddings=r.detach(), ref_labels=rl).backward()
    assert_close(x.grad, x2.grad, torch.float64, name)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("op", ["batch_all_loss", "semi_hard_loss", "contrastive_loss"])
def test_backward_op_skips_reference_gradient(device, op):
    x, y, r, rl = _set(5, 9, 3, 2, 2, seed=7, device=device, grad=False)
    si = torch.full((5,), -1, dtype=torch.int64, device=device)
    g = torch.tensor(1.0, dtype=torch.float64, device=device)
    backward = getattr(ops, op + "_ref_backward")
    ge, gr = backward(g, x, y, r, rl, si, 0.5, 0, False)
    assert gr.shape == (0,)
    ge2, gr2 = backward(g, x, y, r, rl, si, 0.5, 0, True)
    assert gr2.shape == r.shape
    assert torch.equal(ge, ge2)


def _op_samples(name, device):
    out = []
    for i, (dtype, metric) in enumerate([(torch.float32, 0), (torch.float64, 1), (torch.bfloat16, 2)]):
        fwd = not name.endswith("_backward") and name != "mine_triplets_ref"
        x, y, r, rl = _set(6, 11, 4, 2, 3, seed=20 + i, device=device, dtype=dtype, grad=fwd)
        si = torch.tensor([3, -1, 0, 10, -1, 7], device=device)
        if name == "batch_hard_mine_ref":
            out.append((x, y, r, rl, si, metric))
        elif name == "batch_hard_mine_ref_backward":
            pd, pi, nd, ni = ops.batch_hard_mine_ref(x, y, r, rl, si, metric)
            gp, gn = torch.randn_like(pd), torch.randn_like(nd)
            out.append((gp, gn, x, r, pd, pi, nd, ni, metric, i % 2 == 0))
        elif name == "mine_triplets_ref":
            out.append((x, y, r, rl, si, i % 3, metric))
        elif name.endswith("_backward"):
            g = torch.tensor(1.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
            out.append((g, x, y, r, rl, si, 0.3, metric, i % 2 == 0))
        else:
            out.append((x, y, r, rl, si, 0.3, metric))
    return out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", tc._ops.REF_FORWARD_OPS + tc._ops.REF_BACKWARD_OPS)
def test_opcheck(device, name):
    for args in _op_samples(name, device):
        torch.library.opcheck(getattr(ops, name), args)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compile(device):
    x, y, r, rl = _set(9, 23, 4, 3, 4, seed=8, device=device, dtype=torch.float32)

    def f(a, b, bl):
        return (tc.batch_hard_triplet_loss(a, y, ref_embeddings=b, ref_labels=bl, ref_self_index=2)
                + tc.contrastive_loss(a, y, ref_embeddings=b, ref_labels=bl)
                + tc.batch_all_triplet_loss(a, y, ref_embeddings=b, ref_labels=bl)
                + tc.semi_hard_triplet_loss(a, y, ref_embeddings=b, ref_labels=bl))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, r, rl), f(x, r, rl)
    assert_close(got, want, torch.float32)
    g_got = torch.autograd.grad(got, (x, r))
    g_want = torch.autograd.grad(want, (x, r))
    for a, b in zip(g_got, g_want):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_autocast(device):
    x, y, r, rl = _set(8, 15, 4, 3, 3, seed=9, device=device, dtype=torch.float32)
    want = tc.semi_hard_triplet_loss(x, y, ref_embeddings=r, ref_labels=rl)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = tc.semi_hard_triplet_loss(x, y, ref_embeddings=r, ref_labels=rl)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32)


def test_modules_forward_reference_set():
    x, y, r, rl = _set(7, 20, 4, 3, 3, seed=11, device="cpu")
    kw = dict(ref_embeddings=r, ref_labels=rl, ref_self_index=1)
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        got = tc.TripletLoss(margin=0.3, mining=mining)(x, y, **kw)
        want = getattr(R, f"{mining}_triplet_loss")(x, y, 0.3, **kw) if mining != "batch_all" else \
            R.batch_all_triplet_loss(x, y, 0.3, reduction="mean_nonzero", **kw)
        assert_close(got, want, torch.float64, mining)
    assert_close(tc.ContrastiveLoss(margin=0.8)(x, y, **kw), R.contrastive_loss(x, y, 0.8, **kw), torch.float64)


def test_small_blocks(monkeypatch):
    # tiny distance blocks: the rectangular row drivers span many blocks
    monkeypatch.setenv("TRIPLET_CUDA_CPU_BLOCK_BYTES", "512")
    x, y, r, rl = _set(9, 70, 5, 3, 4, seed=12, device="cpu")
    for name in LOSSES:
        got = getattr(tc, name)(x, y, ref_embeddings=r, ref_labels=rl, ref_self_index=3)
        want = getattr(R, name)(x, y, ref_embeddings=r, ref_labels=rl, ref_self_index=3)
        assert_close(got, want, torch.float64, name)
        for a, b in zip(torch.autograd.grad(got, (x, r)), torch.autograd.grad(want, (x, r))):
            assert_close(a, b, torch.float64, name)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("n,m", [(0, 5), (4, 0), (0, 0)])
def test_empty_sets(device, n, m):
    x, y, r, rl = _set(n, m, 3, 2, 2, seed=13, device=device)
    for name in LOSSES:
        loss = getattr(tc, name)(x, y, ref_embeddings=r, ref_labels=rl)
        assert loss.item() == 0.0
        loss.backward()
    assert tc.batch_hard_mine(x, y, ref_embeddings=r, ref_labels=rl).pos_idx.tolist() == [-1] * n
    for strategy in ("batch_hard", "batch_all", "semi_hard"):
        assert all(t.numel() == 0 for t in tc.mine_triplets(x, y, strategy=strategy, ref_embeddings=r, ref_labels=rl))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_in_reference_set_gives_nan(device):
    x, y, r, rl = _set(5, 12, 3, 2, 2, seed=14, device=device, grad=False)
    r[4, 1] = float("nan")
    for name in LOSSES:
        assert torch.isnan(getattr(tc, name)(x, y, ref_embeddings=r, ref_labels=rl)), name


BAD = [
    (dict(ref_labels=torch.zeros(4, dtype=torch.long)), ValueError, "ref_embeddings is missing"),
    (dict(ref_embeddings=torch.zeros(4, 3)), ValueError, "ref_labels is missing"),
    (dict(ref_self_index=0), ValueError, "ref_self_index needs a reference set"),
    (dict(ref_embeddings=torch.zeros(4, 3, dtype=torch.float64), ref_labels=torch.zeros(4, dtype=torch.long)),
     TypeError, "ref_embeddings must have the dtype of embeddings"),
    (dict(ref_embeddings=torch.zeros(4, 2), ref_labels=torch.zeros(4, dtype=torch.long)),
     ValueError, "ref_embeddings must have the feature size"),
    (dict(ref_embeddings=torch.zeros(4), ref_labels=torch.zeros(4, dtype=torch.long)),
     ValueError, "ref_embeddings must be a 2-D"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4)), TypeError, "ref_labels must have an integer"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(5, dtype=torch.long)),
     ValueError, "ref_labels must be a 1-D tensor of length 4"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long), ref_self_index=2),
     ValueError, "ref_self_index as an int"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long), ref_self_index=-1),
     ValueError, "ref_self_index as an int"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long),
          ref_self_index=torch.tensor([0, 4, -1])), ValueError, "ref_self_index must hold reference rows"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long),
          ref_self_index=torch.tensor([0, -2, -1])), ValueError, "ref_self_index must hold reference rows"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long),
          ref_self_index=torch.tensor([0, 1])), ValueError, r"ref_self_index must have shape \(3,\)"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long),
          ref_self_index=torch.tensor([0.0, 1.0, 2.0])), TypeError, "ref_self_index must be None, an int"),
    (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=torch.zeros(4, dtype=torch.long), ref_self_index=True),
     TypeError, "ref_self_index must be None, an int"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
@pytest.mark.parametrize("name", LOSSES + ("batch_hard_mine", "mine_triplets"))
def test_bad_inputs(kwargs, exc, match, name):
    x, y = torch.zeros(3, 3), torch.zeros(3, dtype=torch.long)
    with pytest.raises(exc, match=match):
        getattr(tc, name)(x, y, **kwargs)


def test_direct_op_errors_name_the_argument():
    x, y = torch.zeros(3, 3), torch.zeros(3, dtype=torch.long)
    r, rl, si = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.full((3,), -1)
    with pytest.raises(RuntimeError, match="ref must have the feature size"):
        ops.batch_all_loss_ref(x, y, torch.zeros(4, 2), rl, si, 0.2, 0)
    with pytest.raises(RuntimeError, match="ref_labels must have length 4"):
        ops.contrastive_loss_ref(x, y, r, rl[:3], si, 0.2, 0)
    with pytest.raises(RuntimeError, match="self_index must hold values in"):
        ops.semi_hard_loss_ref(x, y, r, rl, torch.tensor([0, 4, -1]), 0.2, 0)
    with pytest.raises(RuntimeError, match="self_index must have shape"):
        ops.batch_hard_mine_ref(x, y, r, rl, si[:2], 0)
    with pytest.raises(RuntimeError, match="neg_idx must hold indices in"):
        ops.batch_hard_mine_ref_backward(torch.zeros(3), torch.zeros(3), x, r, torch.zeros(3),
                                         torch.full((3,), -1), torch.zeros(3), torch.tensor([0, 9, 1]), 0, True)


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs_cuda: torch.cuda.is_available() is False")
def test_cuda_many_anchor_chunks_match_cpu():
    # M = 40000 reference rows in float64: the CUDA loss driver's (rows, M) workspace of about
    # 256 MiB then holds fewer rows than the 700 anchors (batch all ~83 rows, semi hard ~152,
    # contrastive ~419), so anchor chunks at i0 > 0 run, each adding to grad_ref. The CPU kernels
    # (tested against reference.py above; its N x M x M oracle does not fit here) are the oracle.
    x, y, r, rl = _set(700, 40000, 8, 100, 100, seed=15, device="cpu")
    si = torch.randperm(40000, generator=torch.Generator().manual_seed(16))[:700]
    si[::5] = -1
    for name in LOSSES[1:]:
        kw = dict(ref_labels=rl, ref_self_index=si)
        want = getattr(tc, name)(x, y, 0.3, reduction="sum", ref_embeddings=r, **kw)
        g_want = torch.autograd.grad(want, (x, r))
        xc, rc = x.detach().cuda().requires_grad_(), r.detach().cuda().requires_grad_()
        got = getattr(tc, name)(xc, y.cuda(), 0.3, reduction="sum", ref_embeddings=rc,
                                ref_labels=rl.cuda(), ref_self_index=si.cuda())
        g_got = torch.autograd.grad(got, (xc, rc))
        assert_close(got.cpu(), want, torch.float64, name)
        for g, w, what in zip(g_got, g_want, ("embeddings", "ref")):
            # sums of many terms of both signs: an absolute tolerance on the gradient's scale
            assert_close(g.cpu(), w, torch.float64, f"{name} grad {what}", atol=1e-9 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bad", [4, -2])
@pytest.mark.parametrize("op", ["batch_hard_mine_ref", "mine_triplets_ref", "batch_all_loss_ref",
                                "semi_hard_loss_ref", "contrastive_loss_ref"])
def test_raw_ops_range_check_self_index(device, bad, op):
    # The raw ops (no Python wrapper in front) raise on a self_index outside [-1, M) on every
    # backend, naming the value and its position, rather than treating it as "none".
    x, y = torch.zeros(3, 3, device=device), torch.zeros(3, dtype=torch.long, device=device)
    r, rl = torch.zeros(4, 3, device=device), torch.zeros(4, dtype=torch.long, device=device)
    si = torch.tensor([0, bad, -1], device=device)
    args = {"batch_hard_mine_ref": (0,), "mine_triplets_ref": (2, 0)}.get(op, (0.2, 0))
    with pytest.raises(RuntimeError, match=rf"self_index must hold values in \[-1, 4\) \(ref.size\(0\) = 4\), "
                                           rf"got {bad} at 1"):
        getattr(ops, op)(x, y, r, rl, si, *args)
    getattr(ops, op)(x, y, r, rl, torch.tensor([0, 3, -1], device=device), *args)  # in range: runs
