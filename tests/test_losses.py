"""Every loss against the pure-PyTorch reference: values, reductions, stats, margins, gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import FLOAT_DTYPES, METRICS, assert_close, cpu_and_cuda, make_batch, tolerances

# name -> (kernel, reference, reductions, default reduction, default margin)
LOSSES = {
    "batch_hard": (tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss, ("mean", "mean_nonzero", "sum", "none"), "mean", 0.2),
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss, ("mean", "mean_nonzero", "sum"), "mean_nonzero", 0.2),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss, ("mean", "mean_nonzero", "sum"), "mean", 0.2),
    "contrastive": (tc.contrastive_loss, R.contrastive_loss, ("mean", "mean_nonzero", "sum"), "mean", 1.0),
}
LOSS_REDUCTIONS = [(name, red) for name, spec in LOSSES.items() for red in spec[2]]

# (N, D, classes): N not a multiple of any block size, D odd; few classes so that most
# anchors have positives, many so that some are singletons.
SIZES = [(1, 3, 1), (2, 1, 1), (2, 3, 2), (5, 3, 2), (37, 13, 5), (67, 3, 7), (67, 13, 30)]


def loss_tolerances(dtype, name):
    """(rtol, atol) of a loss against the float64 reference on the same (upcast) input.

    float16/bfloat16: the kernels accumulate in float32, but the loss is returned in the
    half dtype (rounding to 11 / 8 bits), and batch hard's per-anchor terms are computed
    from the mined distances, which are themselves returned in the half dtype, so each term
    carries two half-dtype roundings of a distance (relative 2^-11 / 2^-8 of d ~ 1..10).
    """
    if dtype == torch.float16:
        return (1e-2, 1e-2) if name == "batch_hard" else (4e-3, 4e-3)
    if dtype == torch.bfloat16:
        return (4e-2, 4e-2) if name == "batch_hard" else (2e-2, 2e-2)
    return tolerances(dtype)


def count_slack(dtype, num_valid):
    """How many terms may legitimately fall on the other side of 0 (terms within rounding of 0)."""
    if dtype == torch.float64:
        return 0
    if dtype == torch.float32:
        return 1
    return max(1, int(0.02 * num_valid))


def check_loss(out, ref, dtype, name, msg):
    rtol, atol = loss_tolerances(dtype, name)
    if dtype in (torch.float16, torch.bfloat16):
        big = ref.abs() > torch.finfo(dtype).max
        if big.any():  # the true value is not representable: the half result is inf
            assert torch.isinf(out.cpu()[big]).all(), msg
            out, ref = out.cpu()[~big], ref[~big]
    assert_close(out, ref, dtype, msg=msg, rtol=rtol, atol=atol)


def check_stats(stats, ref_stats, dtype, msg):
    assert stats.num_valid.dtype == torch.int64 and stats.num_positive.dtype == torch.int64, msg
    assert stats.fraction_positive.dtype == torch.float64, msg
    assert stats.num_valid.dim() == 0 and stats.num_positive.dim() == 0 and stats.fraction_positive.dim() == 0
    assert stats.num_valid.item() == ref_stats.num_valid.item(), msg
    slack = count_slack(dtype, ref_stats.num_valid.item())
    assert abs(stats.num_positive.item() - ref_stats.num_positive.item()) <= slack, (
        f"{msg}: num_positive {stats.num_positive.item()} vs reference {ref_stats.num_positive.item()}"
    )
    expected_fraction = stats.num_positive.item() / max(stats.num_valid.item(), 1)
    assert stats.fraction_positive.item() == pytest.approx(expected_fraction, rel=1e-12, abs=1e-15)


def reduce_reference(terms, stats, reduction):
    """The contract's reductions of the reference's per-term losses: "sum"; "mean" over the valid
    terms; "mean_nonzero" over the terms > 0; "none" (batch hard only): the per-anchor terms."""
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    count = stats.num_valid if reduction == "mean" else stats.num_positive
    return total / max(count.item(), 1)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}D{}C{}".format(*s))
def test_loss_matches_reference(device, dtype, metric, name, size):
    fn, ref_fn, reductions = LOSSES[name][:3]
    n, d, c = size
    for seed in range(2):
        x, labels = make_batch(n, d, c, seed=seed * 100 + n, dtype=dtype, device=device)
        # the reference's per-term losses (the N^3 reference runs once, in float64, on the upcast input)
        terms, ref_stats = ref_fn(x.cpu().double(), labels.cpu(), metric=metric, reduction="none", return_stats=True)
        for reduction in reductions:
            out, stats = fn(x, labels, metric=metric, reduction=reduction, return_stats=True)
            ref = reduce_reference(terms, ref_stats, reduction)
            msg = f"{name} {metric} {reduction} {dtype} N={n} D={d} C={c} seed={seed}"
            assert out.dtype == dtype, msg
            assert out.device == x.device, msg
            assert out.shape == ref.shape, msg
            check_loss(out, ref, dtype, name, msg)
            check_stats(stats, ref_stats, dtype, msg)


@pytest.mark.parametrize("name,reduction", LOSS_REDUCTIONS, ids=[f"{n}-{r}" for n, r in LOSS_REDUCTIONS])
def test_reduction_matches_reference_reduction(name, reduction):
    # the reference's own reductions agree with reduce_reference (guards the helper above)
    fn, ref_fn = LOSSES[name][:2]
    x, labels = make_batch(23, 5, 4, seed=5)
    terms, stats = ref_fn(x, labels, reduction="none", return_stats=True)
    ref = ref_fn(x, labels, reduction=reduction)
    torch.testing.assert_close(reduce_reference(terms, stats, reduction), ref, rtol=1e-12, atol=1e-12)
    assert_close(fn(x, labels, reduction=reduction), ref, torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("margin", [0.0, 0.05, 1.5, 3])
def test_loss_margins(device, dtype, metric, name, margin):
    fn, ref_fn = LOSSES[name][:2]
    x, labels = make_batch(29, 5, 4, seed=21, dtype=dtype, device=device)
    for reduction in LOSSES[name][2]:
        out = fn(x, labels, margin, metric=metric, reduction=reduction)
        ref = ref_fn(x.cpu().double(), labels.cpu(), margin, metric=metric, reduction=reduction)
        check_loss(out, ref, dtype, name, f"{name} margin={margin} {reduction}")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(LOSSES))
def test_default_reduction_and_margin(device, name):
    fn, ref_fn, _, default_reduction, default_margin = LOSSES[name]
    x, labels = make_batch(23, 5, 4, seed=4, device=device)
    expected = ref_fn(x.cpu(), labels.cpu(), default_margin, reduction=default_reduction)
    assert_close(fn(x, labels), expected, torch.float64)
    assert_close(fn(x, labels, metric="euclidean"), expected, torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
def test_batch_hard_soft_margin_matches_reference(device, dtype, metric, reduction):
    for n, d, c in [(5, 3, 2), (37, 13, 5), (67, 3, 20)]:
        x, labels = make_batch(n, d, c, seed=n, dtype=dtype, device=device)
        out, stats = tc.batch_hard_triplet_loss(x, labels, metric=metric, soft_margin=True, reduction=reduction,
                                                return_stats=True)
        ref, ref_stats = R.batch_hard_triplet_loss(x.cpu().double(), labels.cpu(), metric=metric, soft_margin=True,
                                                   reduction=reduction, return_stats=True)
        msg = f"soft {metric} {reduction} {dtype} N={n}"
        check_loss(out, ref, dtype, "batch_hard", msg)
        check_stats(stats, ref_stats, dtype, msg)


def test_soft_margin_ignores_margin():
    x, labels = make_batch(19, 4, 3, seed=9)
    a = tc.batch_hard_triplet_loss(x, labels, 0.2, soft_margin=True)
    b = tc.batch_hard_triplet_loss(x, labels, 5.0, soft_margin=True)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- hand-computed cases
# 1-D embeddings [0, 1, 3, 6], labels [0, 0, 1, 1], euclidean, margin 0.5. Distances:
#        0  1  3  6
#   0 [  0  1  3  6 ]
#   1 [  1  0  2  5 ]
#   3 [  3  2  0  3 ]
#   6 [  6  5  3  0 ]
HAND_X = [[0.0], [1.0], [3.0], [6.0]]
HAND_LABELS = [0, 0, 1, 1]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_batch_hard_hand_computed(device, dtype):
    # batch hard, per anchor (hardest positive, hardest negative, relu(d_ap - d_an + 0.5)):
    #   a0: p1 d=1, n2 d=3 -> relu(1 - 3 + .5) = 0
    #   a1: p0 d=1, n2 d=2 -> relu(1 - 2 + .5) = 0
    #   a2: p3 d=3, n1 d=2 -> relu(3 - 2 + .5) = 1.5
    #   a3: p2 d=3, n1 d=5 -> relu(3 - 5 + .5) = 0
    x = torch.tensor(HAND_X, dtype=dtype, device=device, requires_grad=True)
    labels = torch.tensor(HAND_LABELS, device=device)
    m = tc.batch_hard_mine(x, labels)
    assert m.pos_idx.tolist() == [1, 0, 3, 2]
    assert m.neg_idx.tolist() == [2, 2, 1, 1]
    assert m.pos_dist.tolist() == [1.0, 1.0, 3.0, 3.0]
    assert m.neg_dist.tolist() == [3.0, 2.0, 2.0, 5.0]
    none = tc.batch_hard_triplet_loss(x, labels, 0.5, reduction="none")
    assert none.tolist() == [0.0, 0.0, 1.5, 0.0]
    assert tc.batch_hard_triplet_loss(x, labels, 0.5, reduction="sum").item() == 1.5
    assert tc.batch_hard_triplet_loss(x, labels, 0.5, reduction="mean").item() == 0.375
    loss, stats = tc.batch_hard_triplet_loss(x, labels, 0.5, reduction="mean_nonzero", return_stats=True)
    assert loss.item() == 1.5
    assert (stats.num_valid.item(), stats.num_positive.item(), stats.fraction_positive.item()) == (4, 1, 0.25)
    # gradient of the sum: d(x2, x3) - d(x2, x1) + .5 = (x3 - x2) - (x2 - x1) + .5
    # -> d/dx = [0, 1, -2, 1]
    tc.batch_hard_triplet_loss(x, labels, 0.5, reduction="sum").backward()
    assert x.grad.flatten().tolist() == [0.0, 1.0, -2.0, 1.0]
    # soft margin: softplus(d_ap - d_an) = log(1 + exp(gap)), gaps [-2, -1, 1, -2]
    soft = tc.batch_hard_triplet_loss(x, labels, soft_margin=True, reduction="none")
    expected = [math.log1p(math.exp(g)) for g in (-2.0, -1.0, 1.0, -2.0)]
    torch.testing.assert_close(soft.double().cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=loss_tolerances(dtype, "x")[0], atol=loss_tolerances(dtype, "x")[1])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batch_all_hand_computed(device):
    # valid triplets (a, p, n), relu(d_ap - d_an + 0.5):
    #   (0,1,2): 1-3+.5 <0   (0,1,3): 1-6+.5 <0   (1,0,2): 1-2+.5 <0   (1,0,3): 1-5+.5 <0
    #   (2,3,0): 3-3+.5 = .5 (2,3,1): 3-2+.5 = 1.5 (3,2,0): 3-6+.5 <0  (3,2,1): 3-5+.5 <0
    # sum 2, 8 valid, 2 positive
    x = torch.tensor(HAND_X, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor(HAND_LABELS, device=device)
    loss, stats = tc.batch_all_triplet_loss(x, labels, 0.5, reduction="sum", return_stats=True)
    assert loss.item() == 2.0
    assert (stats.num_valid.item(), stats.num_positive.item(), stats.fraction_positive.item()) == (8, 2, 0.25)
    assert tc.batch_all_triplet_loss(x, labels, 0.5, reduction="mean").item() == 0.25
    assert tc.batch_all_triplet_loss(x, labels, 0.5).item() == 1.0  # mean_nonzero
    # gradient of the sum: [d(2,3) - d(2,0)] + [d(2,3) - d(2,1)] = 2(x3 - x2) - (x2 - x0) - (x2 - x1)
    # -> d/dx = [1, 1, -4, 2]
    loss.backward()
    assert x.grad.flatten().tolist() == [1.0, 1.0, -4.0, 2.0]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_semi_hard_hand_computed(device):
    # per (a, p): the nearest negative with d_an > d_ap, else the farthest negative:
    #   (0,1): d_ap=1, negatives d=3 (n2), 6 (n3) -> n2: relu(1-3+.5) = 0
    #   (1,0): d_ap=1, negatives d=2, 5 -> n2: relu(1-2+.5) = 0
    #   (2,3): d_ap=3, negatives d=3 (n0, not > 3), 2 (n1) -> none farther: farthest n0 (d=3):
    #          relu(3-3+.5) = .5
    #   (3,2): d_ap=3, negatives d=6, 5 -> n1 (d=5): relu(3-5+.5) = 0
    x = torch.tensor(HAND_X, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor(HAND_LABELS, device=device)
    loss, stats = tc.semi_hard_triplet_loss(x, labels, 0.5, reduction="sum", return_stats=True)
    assert loss.item() == 0.5
    assert (stats.num_valid.item(), stats.num_positive.item()) == (4, 1)
    assert tc.semi_hard_triplet_loss(x, labels, 0.5).item() == 0.125  # mean over 4 pairs
    assert tc.semi_hard_triplet_loss(x, labels, 0.5, reduction="mean_nonzero").item() == 0.5
    a, p, n = tc.mine_triplets(x, labels, strategy="semi_hard")
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 1)]
    # gradient of d(2,3) - d(2,0) = (x3 - x2) - (x2 - x0) -> [1, 0, -2, 1]
    loss.backward()
    assert x.grad.flatten().tolist() == [1.0, 0.0, -2.0, 1.0]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_contrastive_hand_computed(device):
    # pairs i < j, margin 2.5: same label d^2, else relu(2.5 - d)^2
    #   (0,1) same d=1 -> 1      (2,3) same d=3 -> 9
    #   (0,2) d=3 -> 0   (0,3) d=6 -> 0   (1,2) d=2 -> .25   (1,3) d=5 -> 0
    # sum 10.25 over 6 pairs, 3 nonzero
    x = torch.tensor(HAND_X, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor(HAND_LABELS, device=device)
    loss = tc.contrastive_loss(x, labels, 2.5, reduction="sum")
    assert loss.item() == 10.25
    assert tc.contrastive_loss(x, labels, 2.5).item() == pytest.approx(10.25 / 6, rel=1e-15)
    assert tc.contrastive_loss(x, labels, 2.5, reduction="mean_nonzero").item() == pytest.approx(10.25 / 3, rel=1e-15)
    # gradient: (x1-x0)^2 + (x3-x2)^2 + (2.5 - (x2-x1))^2
    #   d/dx0 = -2(x1-x0) = -2;   d/dx1 = 2(x1-x0) + 2(2.5-2) = 2 + 1 = 3
    #   d/dx2 = -2(x3-x2) - 2(.5) = -6 - 1 = -7;   d/dx3 = 2(x3-x2) = 6
    loss.backward()
    assert x.grad.flatten().tolist() == [-2.0, 3.0, -7.0, 6.0]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_squared_and_cosine_hand_computed(device):
    # squared euclidean: batch hard a2: d_ap = 9, d_an = 4 -> relu(9 - 4 + .5) = 5.5; a3: 9 - 25 < 0;
    # a0: 1 - 9 < 0; a1: 1 - 4 < 0.
    x = torch.tensor(HAND_X, dtype=torch.float64, device=device)
    labels = torch.tensor(HAND_LABELS, device=device)
    out = tc.batch_hard_triplet_loss(x, labels, 0.5, metric="squared_euclidean", reduction="none")
    assert out.tolist() == [0.0, 0.0, 5.5, 0.0]
    # cosine: a0 = (1, 0), p = (0, 1) [d 1], (-1, 0) [d 2]; n = (1, 1) [d 1 - 1/sqrt2], (0, -1) [d 1]
    # labels [0, 0, 0, 1, 1]; anchor 0: hardest positive (-1, 0) d=2, hardest negative (1, 1):
    # relu(2 - (1 - 1/sqrt2) + .2) = 1.2 + 1/sqrt2
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [0.0, -1.0]], dtype=torch.float64, device=device)
    yl = torch.tensor([0, 0, 0, 1, 1], device=device)
    out = tc.batch_hard_triplet_loss(y, yl, 0.2, metric="cosine", reduction="none")
    assert out[0].item() == pytest.approx(1.2 + 1 / math.sqrt(2), rel=1e-12)


# ----------------------------------------------------------------------------- gradients
def _grad_inputs(n, d, c, seed, device):
    x, labels = make_batch(n, d, c, seed=seed, device=device)
    # every class has >= 2 members so that most anchors are valid
    labels = torch.arange(n, device=device) % c
    return x.requires_grad_(), labels


GRAD_CASES = [
    ("batch_hard", {}),
    ("batch_hard", {"soft_margin": True}),
    ("batch_hard", {"reduction": "none"}),
    ("batch_hard", {"reduction": "sum"}),
    ("batch_hard", {"reduction": "mean_nonzero"}),
    ("batch_all", {}),
    ("batch_all", {"reduction": "mean"}),
    ("batch_all", {"reduction": "sum"}),
    ("semi_hard", {}),
    ("semi_hard", {"reduction": "sum"}),
    ("semi_hard", {"reduction": "mean_nonzero"}),
    ("contrastive", {}),
    ("contrastive", {"reduction": "sum"}),
    ("contrastive", {"reduction": "mean_nonzero"}),
]
GRAD_IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in GRAD_CASES]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name,kwargs", GRAD_CASES, ids=GRAD_IDS)
def test_gradcheck_losses(device, metric, name, kwargs):
    fn = LOSSES[name][0]
    # margin large enough that many terms are active; random float64 points have distinct
    # distances (no ties or kinks within gradcheck's 1e-6 step)
    margin = 1.0 if metric != "cosine" else 0.5
    seed = GRAD_CASES.index((name, kwargs)) + 17 * METRICS.index(metric)  # a different batch per case
    x, labels = _grad_inputs(8, 3, 3, seed, device)
    assert gradcheck(lambda e: fn(e, labels, margin, metric=metric, **kwargs), (x,)), f"seed {seed}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name,kwargs", GRAD_CASES, ids=GRAD_IDS)
def test_loss_grad_matches_reference(device, dtype, metric, name, kwargs):
    fn, ref_fn = LOSSES[name][:2]
    x0, labels = make_batch(37, 7, 5, seed=13, dtype=dtype)
    x = x0.clone().to(device).requires_grad_()
    out = fn(x, labels.to(device), 0.7, metric=metric, **kwargs)
    xr = x0.double().clone().requires_grad_()
    ref = ref_fn(xr, labels, 0.7, metric=metric, **kwargs)
    w = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.double().cpu() * w).sum().backward()
    (ref * w).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()
    rtol, atol = loss_tolerances(dtype, name)
    scale = max(1.0, xr.grad.abs().max().item())
    assert_close(x.grad, xr.grad, dtype, msg=f"{name} {kwargs} {metric}", rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_with_exact_ties(device, metric, name):
    # small-integer embeddings in float64: exact arithmetic and many exactly tied distances
    # (semi hard's strict d_an > d_ap included); losses and counts equal the reference's
    fn, ref_fn, reductions = LOSSES[name][:3]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        n = (23, 41, 67)[seed]
        x = torch.randint(-2, 3, (n, 3), generator=g).double()
        labels = torch.randint(0, 4, (n,), generator=g)
        terms, ref_stats = ref_fn(x, labels, metric=metric, reduction="none", return_stats=True)
        for reduction in reductions:
            out, stats = fn(x.to(device), labels.to(device), metric=metric, reduction=reduction, return_stats=True)
            msg = f"{name} {metric} {reduction} seed {seed}"
            assert_close(out, reduce_reference(terms, ref_stats, reduction), torch.float64, msg=msg)
            assert (stats.num_valid.item(), stats.num_positive.item()) == (
                ref_stats.num_valid.item(), ref_stats.num_positive.item()), msg


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,n", [("batch_hard", 301), ("contrastive", 301), ("batch_all", 131), ("semi_hard", 131)])
def test_larger_batch_spans_tiles(device, dtype, name, n):
    # N past typical GPU tile sizes (64, 128, 256) and not a multiple of any; D = 33 past a
    # 32-wide feature chunk
    fn, ref_fn, reductions = LOSSES[name][:3]
    x, labels = make_batch(n, 33, 11, seed=n, dtype=dtype, device=device)
    x.requires_grad_()
    terms, ref_stats = ref_fn(x.detach().cpu().double(), labels.cpu(), metric="euclidean", reduction="none",
                              return_stats=True)
    for reduction in [r for r in reductions if r != "none"]:
        out, stats = fn(x, labels, reduction=reduction, return_stats=True)
        check_loss(out, reduce_reference(terms, ref_stats, reduction), dtype, name, f"{name} {reduction}")
        check_stats(stats, ref_stats, dtype, f"{name} {reduction}")
    (grad,) = torch.autograd.grad(fn(x, labels, reduction="sum"), x)
    xr = x.detach().cpu().double().requires_grad_()
    ref_fn(xr, labels.cpu(), reduction="sum").backward()
    scale = max(1.0, xr.grad.abs().max().item())
    rtol, atol = tolerances(dtype)
    assert_close(grad, xr.grad, dtype, rtol=rtol, atol=atol * scale)
