"""The custom ops themselves: torch.library.opcheck (schema, fake kernels, autograd registration,
AOT dispatch) of every forward and backward op, output metadata, and errors of direct calls."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc  # noqa: F401  (registers the ops)
from conftest import cpu_and_cuda, make_batch

ops = torch.ops.triplet_cuda

ALL_OPS = [
    "pairwise_distance",
    "pairwise_distance_backward",
    "batch_hard_mine",
    "batch_hard_mine_backward",
    "batch_all_loss",
    "batch_all_loss_backward",
    "semi_hard_loss",
    "semi_hard_loss_backward",
    "contrastive_loss",
    "contrastive_loss_backward",
    "contrastive_loss_with_grad",
    "contrastive_hinge_loss",
    "contrastive_hinge_loss_backward",
    "mine_triplets",
]
LOSS_OPS = ["batch_all_loss", "semi_hard_loss", "contrastive_loss"]


def test_every_op_is_registered():
    for name in ALL_OPS:
        assert hasattr(ops, name), name
        assert isinstance(getattr(ops, name).default, torch._ops.OpOverload)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(n, d, dtype, device, requires_grad, seed=0, layout="contiguous"):
    x, labels = make_batch(n, d, 3, seed=seed, dtype=dtype, device=device)
    if layout == "transposed":
        x = x.t().contiguous().t()  # same values, column-major strides
    elif layout == "int32_labels":
        labels = labels.to(torch.int32)
    if requires_grad:
        x.requires_grad_()
    return x, labels


def sample_args(name, dtype, device, requires_grad, metric, layout="contiguous", n=7):
    """One argument tuple of op `name` (valid inputs)."""
    x, labels = _inputs(n, 5, dtype, device, requires_grad, seed=metric, layout=layout)
    if name == "pairwise_distance":
        y, _ = _inputs(4, 5, dtype, device, requires_grad, seed=10 + metric, layout=layout)
        return (x, y, metric)
    if name == "pairwise_distance_backward":
        y, _ = _inputs(4, 5, dtype, device, False, seed=10 + metric, layout=layout)
        xd = x.detach()
        dist = ops.pairwise_distance(xd, y, metric)
        grad = torch.randn(n, 4, dtype=torch.float64).to(device=device, dtype=dtype)
        return (grad, xd, y, dist, metric)
    if name == "batch_hard_mine":
        return (x, labels, metric)
    if name == "batch_hard_mine_backward":
        xd = x.detach()
        pos_dist, pos_idx, neg_dist, neg_idx = ops.batch_hard_mine(xd, labels, metric)
        gp = torch.randn(n, dtype=torch.float64).to(device=device, dtype=dtype)
        gn = torch.randn(n, dtype=torch.float64).to(device=device, dtype=dtype)
        return (gp, gn, xd, pos_dist, pos_idx, neg_dist, neg_idx, metric)
    if name in LOSS_OPS or name == "contrastive_loss_with_grad":
        return (x, labels, 0.3, metric)
    if name == "contrastive_hinge_loss":
        return (x, labels, 0.1, 0.9, metric)
    if name == "contrastive_hinge_loss_backward":
        gp = torch.tensor(1.5, dtype=_acc(dtype), device=device)
        return (gp, -0.5 * gp, x.detach(), labels, 0.1, 0.9, metric)
    if name.endswith("_loss_backward"):
        g = torch.tensor(1.5, dtype=_acc(dtype), device=device)
        return (g, x.detach(), labels, 0.3, metric)
    if name == "mine_triplets":
        return (x.detach(), labels, metric % 3, metric)  # strategy cycles with the metric
    raise AssertionError(name)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck(device, name):
    # forward ops are checked with inputs that require grad (exercising the autograd
    # registration); backward ops have no autograd formula of their own and get plain inputs
    forward = not name.endswith("_backward") and name != "mine_triplets"
    samples = []
    for dtype in (torch.float32, torch.float64):
        for metric in (0, 1, 2):
            samples.append(sample_args(name, dtype, device, forward, metric))
    samples.append(sample_args(name, torch.float16, device, forward, 0))
    samples.append(sample_args(name, torch.bfloat16, device, forward, 2))
    samples.append(sample_args(name, torch.float32, device, forward, 1, layout="transposed"))
    samples.append(sample_args(name, torch.float32, device, forward, 2, layout="int32_labels"))
    samples.append(sample_args(name, torch.float64, device, forward, 0, n=1))
    # mine_triplets has a data-dependent output length (its fake kernel uses
    # ctx.new_dynamic_size()); the full opcheck, test_aot_dispatch_dynamic included, supports it.
    for args in samples:
        torch.library.opcheck(getattr(ops, name), args)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", [0, 1, 2])
def test_opcheck_mine_triplets_every_strategy(device, strategy):
    for metric in (0, 1, 2):
        x, labels = _inputs(9, 3, torch.float32, device, False, seed=strategy * 3 + metric)
        torch.library.opcheck(ops.mine_triplets, (x, labels, strategy, metric))
    # nothing valid (one class) -> zero-length outputs
    x, _ = _inputs(5, 3, torch.float32, device, False)
    torch.library.opcheck(ops.mine_triplets, (x, torch.zeros(5, dtype=torch.long, device=device), strategy, 0))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_op_output_metadata(device, dtype):
    # what the schemas in csrc/ops.cpp promise: distances in the embeddings' dtype, loss sums
    # 0-d in the accumulation dtype (float64 for float64, else float32), counts 0-d int64
    x, labels = _inputs(6, 3, dtype, device, False)
    acc = _acc(dtype)
    d = ops.pairwise_distance(x, x[:4], 0)
    assert d.shape == (6, 4) and d.dtype == dtype
    gx, gy = ops.pairwise_distance_backward(torch.ones_like(d), x, x[:4], d, 0)
    assert gx.shape == x.shape and gy.shape == (4, 3) and gx.dtype == gy.dtype == dtype
    pd, pi, nd, ni = ops.batch_hard_mine(x, labels, 0)
    assert pd.dtype == nd.dtype == dtype and pi.dtype == ni.dtype == torch.int64
    assert pd.shape == pi.shape == nd.shape == ni.shape == (6,)
    g = ops.batch_hard_mine_backward(torch.ones_like(pd), torch.ones_like(nd), x, pd, pi, nd, ni, 0)
    assert g.shape == x.shape and g.dtype == dtype
    for name in LOSS_OPS:
        s, nv, npos = getattr(ops, name)(x, labels, 0.2, 0)
        assert s.dtype == acc and s.dim() == 0, name
        assert nv.dtype == npos.dtype == torch.int64 and nv.dim() == npos.dim() == 0, name
        gb = getattr(ops, name + "_backward")(torch.tensor(1.0, dtype=acc, device=device), x, labels, 0.2, 0)
        assert gb.shape == x.shape and gb.dtype == dtype, name
    s, nv, npos, gs = ops.contrastive_loss_with_grad(x, labels, 0.2, 0)
    assert s.dtype == acc and nv.dtype == npos.dtype == torch.int64 and gs.shape == x.shape and gs.dtype == acc
    for strategy in (0, 1, 2):
        a, p, n = ops.mine_triplets(x, labels, strategy, 0)
        assert a.dtype == p.dtype == n.dtype == torch.int64 and a.dim() == 1


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSS_OPS)
@pytest.mark.parametrize("metric", [0, 1, 2])
def test_loss_backward_op_is_linear_in_grad(device, name, metric):
    # backward(g) = g * backward(1); and matches autograd of the forward op
    x, labels = _inputs(11, 4, torch.float64, device, False, seed=metric)
    bw = getattr(ops, name + "_backward")
    one = bw(torch.tensor(1.0, dtype=torch.float64, device=device), x, labels, 0.7, metric)
    three = bw(torch.tensor(-3.0, dtype=torch.float64, device=device), x, labels, 0.7, metric)
    torch.testing.assert_close(three, -3.0 * one, rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()
    s, _, _ = getattr(ops, name)(xr, labels, 0.7, metric)
    (grad,) = torch.autograd.grad(s, xr)
    torch.testing.assert_close(grad, one, rtol=1e-12, atol=1e-12)
    assert one.abs().sum() > 0  # the batch has active terms: the check above is not 0 == 0


# ----------------------------------------------------------------------------- direct-call errors
x4 = torch.randn(4, 3)
l4 = torch.tensor([0, 0, 1, 1])

DIRECT_ERRORS = [
    ("pairwise_distance 1-D x", lambda: ops.pairwise_distance(torch.randn(3), x4, 0), r"\bx\b.*2-D.*got 1-D"),
    ("pairwise_distance 3-D y", lambda: ops.pairwise_distance(x4, torch.randn(1, 4, 3), 0), r"\by\b.*2-D.*got 3-D"),
    ("pairwise_distance feature size", lambda: ops.pairwise_distance(x4, torch.randn(4, 2), 0),
     r"y must have the feature size of x \(3\), got 2"),
    ("pairwise_distance dtype", lambda: ops.pairwise_distance(x4, x4.double(), 0), r"y must have the dtype of x.*Float.*Double"),
    ("pairwise_distance metric", lambda: ops.pairwise_distance(x4, x4, 7), r"metric must be 0 .*got 7"),
    ("pairwise_distance integer x", lambda: ops.pairwise_distance(x4.long(), x4.long(), 0), r"\bx must be float32.*got Long"),
    ("batch_hard_mine float labels", lambda: ops.batch_hard_mine(x4, l4.float(), 0), r"labels must have an integer dtype, got Float"),
    ("batch_hard_mine bool labels", lambda: ops.batch_hard_mine(x4, l4.bool(), 0), r"labels must have an integer dtype, got Bool"),
    ("batch_hard_mine length", lambda: ops.batch_hard_mine(x4, l4[:3], 0), r"labels must have length 4.*got 3"),
    ("batch_hard_mine 2-D labels", lambda: ops.batch_hard_mine(x4, l4[None], 0), r"labels must be a 1-D.*got 2-D"),
    ("batch_hard_mine metric", lambda: ops.batch_hard_mine(x4, l4, 3), r"metric must be 0 .*got 3"),
    ("batch_hard_mine 1-D embeddings", lambda: ops.batch_hard_mine(torch.randn(4), l4, 0), r"embeddings must be a 2-D.*got 1-D"),
    ("batch_all_loss integer embeddings", lambda: ops.batch_all_loss(x4.int(), l4, 0.2, 0), r"embeddings must be float32.*got Int"),
    ("semi_hard_loss metric", lambda: ops.semi_hard_loss(x4, l4, 0.2, -1), r"metric must be 0 .*got -1"),
    ("contrastive_loss 3-D embeddings", lambda: ops.contrastive_loss(x4[None], l4, 0.2, 0), r"embeddings must be a 2-D.*got 3-D"),
    ("contrastive_loss length", lambda: ops.contrastive_loss(x4, l4[:2], 1.0, 0), r"labels must have length 4.*got 2"),
    ("mine_triplets strategy", lambda: ops.mine_triplets(x4, l4, 5, 0), r"strategy must be 0 .*got 5"),
    ("mine_triplets bool labels", lambda: ops.mine_triplets(x4, l4.bool(), 0, 0), r"labels must have an integer dtype, got Bool"),
    ("mine_triplets metric", lambda: ops.mine_triplets(x4, l4, 0, 9), r"metric must be 0 .*got 9"),
    ("pairwise_distance_backward grad shape",
     lambda: ops.pairwise_distance_backward(torch.zeros(3, 3), x4, x4, torch.zeros(4, 4), 0), r"grad must have shape \[4, 4\], got \[3, 3\]"),
    ("pairwise_distance_backward dist shape",
     lambda: ops.pairwise_distance_backward(torch.zeros(4, 4), x4, x4, torch.zeros(4, 5), 0), r"dist must have shape \[4, 4\], got \[4, 5\]"),
    ("batch_hard_mine_backward grad shape",
     lambda: ops.batch_hard_mine_backward(torch.zeros(3), torch.zeros(4), x4, torch.zeros(4), torch.zeros(4, dtype=torch.long),
                                          torch.zeros(4), torch.zeros(4, dtype=torch.long), 0), r"grad_pos_dist must have shape \[4\], got \[3\]"),
    ("batch_all_loss_backward labels", lambda: ops.batch_all_loss_backward(torch.zeros(()), x4, l4[:2], 0.2, 0),
     r"labels must have length 4.*got 2"),
    ("semi_hard_loss_backward metric", lambda: ops.semi_hard_loss_backward(torch.zeros(()), x4, l4, 0.2, 4), r"metric must be 0 .*got 4"),
    ("contrastive_loss_backward float labels", lambda: ops.contrastive_loss_backward(torch.zeros(()), x4, l4.double(), 0.2, 0),
     r"labels must have an integer dtype, got Double"),
]


@pytest.mark.parametrize("case", DIRECT_ERRORS, ids=[c[0] for c in DIRECT_ERRORS])
def test_direct_op_errors(case):
    _, call, pattern = case
    with pytest.raises(RuntimeError, match=pattern):
        call()


@pytest.mark.needs_cuda
def test_direct_op_mismatched_devices():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"labels must be on the device of embeddings \(cuda:0\), got cpu"):
        ops.batch_hard_mine(x, l4, 0)
    with pytest.raises(RuntimeError, match=r"y must be on the device of x \(cuda:0\), got cpu"):
        ops.pairwise_distance(x, x4, 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_contrastive_with_grad_is_forward_plus_backward(device, metric, dtype):
    # the forward that also returns d loss_sum / d embeddings: its loss and counts are the
    # forward op's, bitwise (one code path), and its gradient the backward op's at g = 1
    x, labels = _inputs(37, 5, dtype, device, False, seed=metric)
    x = torch.cat([x, x[:3]])  # duplicates: near-zero pairs take the exact path
    labels = torch.cat([labels, labels[:3]])
    s, nv, npos, gs = ops.contrastive_loss_with_grad(x, labels, 0.7, metric)
    s0, nv0, npos0 = ops.contrastive_loss(x, labels, 0.7, metric)
    assert torch.equal(s, s0) and torch.equal(nv, nv0) and torch.equal(npos, npos0)
    g = ops.contrastive_loss_backward(torch.tensor(1.0, dtype=_acc(dtype), device=device), x, labels, 0.7, metric)
    torch.testing.assert_close(gs.to(dtype), g)
    # and autograd through it is g * grad_sum
    xr = x.clone().requires_grad_()
    loss = ops.contrastive_loss_with_grad(xr, labels, 0.7, metric)[0] * 2.5
    (got,) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(got, 2.5 * g)
