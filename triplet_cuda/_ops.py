"""The custom ops: fake (meta) kernels, autocast rules and autograd formulas.

The C++/CUDA kernels are registered by the compiled library (see _loader); this module
adds what torch.library wants from Python: register_fake for every op (so torch.compile
traces them), register_autocast (every op runs in float32 under torch.autocast) and
register_autograd for every forward op, whose backward is its own op.

Higher-order gradients: when a backward runs with create_graph=True, pairwise_distance and
batch_hard_mine compute their gradient with pure-PyTorch formulas (O(N*M) and O(N*D)) that
autograd differentiates again exactly; the dense loss ops (batch all, semi hard, contrastive)
have no second derivative, and their backward ops raise a clear error the moment one is
requested. The backward ops themselves are not differentiable when called directly.
"""
from __future__ import annotations

import torch

from ._loader import load

load()

METRICS = {"euclidean": 0, "squared_euclidean": 1, "cosine": 2}
STRATEGIES = {"batch_hard": 0, "batch_all": 1, "semi_hard": 2}

ops = torch.ops.triplet_cuda
_LIB = "triplet_cuda::"


COSINE_EPS = 1e-8  # the norm floor of the cosine metric (csrc/common.h kCosineEps)

FORWARD_OPS = ("pairwise_distance", "batch_hard_mine", "batch_all_loss", "semi_hard_loss", "contrastive_loss",
               "contrastive_loss_with_grad", "contrastive_hinge_loss", "mine_triplets")
BACKWARD_OPS = ("pairwise_distance_backward", "batch_hard_mine_backward", "batch_all_loss_backward",
                "semi_hard_loss_backward", "contrastive_loss_backward", "contrastive_hinge_loss_backward")
# the public loss function of each dense loss op, for error messages
_LOSS_NAMES = {"batch_all_loss": "batch_all_triplet_loss", "semi_hard_loss": "semi_hard_triplet_loss",
               "contrastive_loss": "contrastive_loss", "contrastive_hinge_loss": "pml_contrastive_loss"}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(embeddings: torch.Tensor) -> torch.dtype:
    """The dtype of a loss / distance of `embeddings`: their own dtype, or float32 inside a
    torch.autocast region of their device (the ops run in float32 there, see below)."""
    if embeddings.dtype != torch.float64 and torch.is_autocast_enabled(embeddings.device.type):
        return torch.float32
    return embeddings.dtype


# ----------------------------------------------------------------------------- autocast
# Under torch.autocast every op casts its floating inputs (float16 / bfloat16 / float32; float64
# stays) to float32 and runs with autocast disabled, so the GEMM inside the kernels is not
# autocast to a half type and the math is float32 throughout. Backward ops too: loss.backward()
# may be called inside the autocast region.
for _name in FORWARD_OPS + BACKWARD_OPS:
    for _device_type in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(_device_type):
            torch.library.register_autocast(_LIB + _name, _device_type, torch.float32)


# ----------------------------------------------------------------------------- fake kernels
def _fake_same_device(a, b, name_a, name_b):
    # the dispatcher sends a call with mixed devices (say cpu embeddings, meta labels) here
    if a.device != b.device:
        raise RuntimeError(f"triplet_cuda: {name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


@torch.library.register_fake(_LIB + "pairwise_distance")
def _(x, y, metric):
    _fake_same_device(x, y, "x", "y")
    return x.new_empty((x.shape[0], y.shape[0]))


@torch.library.register_fake(_LIB + "pairwise_distance_backward")
def _(grad, x, y, dist, metric):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


@torch.library.register_fake(_LIB + "batch_hard_mine")
def _(embeddings, labels, metric):
    _fake_same_device(embeddings, labels, "embeddings", "labels")
    n = embeddings.shape[0]
    dist = embeddings.new_empty((n,))
    idx = embeddings.new_empty((n,), dtype=torch.int64)
    return dist, idx, torch.empty_like(dist), torch.empty_like(idx)


@torch.library.register_fake(_LIB + "batch_hard_mine_backward")
def _(grad_pos_dist, grad_neg_dist, embeddings, pos_dist, pos_idx, neg_dist, neg_idx, metric):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


def _loss_fake(embeddings, labels, margin, metric):
    _fake_same_device(embeddings, labels, "embeddings", "labels")
    loss = embeddings.new_empty((), dtype=_acc_dtype(embeddings.dtype))
    count = embeddings.new_empty((), dtype=torch.int64)
    return loss, count, torch.empty_like(count)


def _loss_backward_fake(grad_loss_sum, embeddings, labels, margin, metric):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    torch.library.register_fake(_LIB + _name)(_loss_fake)
    torch.library.register_fake(_LIB + _name + "_backward")(_loss_backward_fake)


@torch.library.register_fake(_LIB + "contrastive_loss_with_grad")
def _(embeddings, labels, margin, metric):
    loss, count, positive = _loss_fake(embeddings, labels, margin, metric)
    return loss, count, positive, embeddings.new_empty(embeddings.shape, dtype=_acc_dtype(embeddings.dtype))


@torch.library.register_fake(_LIB + "mine_triplets")
def _(embeddings, labels, strategy, metric):
    _fake_same_device(embeddings, labels, "embeddings", "labels")
    ctx = torch.library.get_ctx()
    t = ctx.new_dynamic_size()
    idx = embeddings.new_empty((t,), dtype=torch.int64)
    return idx, torch.empty_like(idx), torch.empty_like(idx)


# ----------------------------------------------------------------------------- autograd
def _pairwise_setup(ctx, inputs, output):
    x, y, metric = inputs
    ctx.save_for_backward(x, y, output)
    ctx.metric = metric


def _inv_norm_and_scale(x):
    """1 / max(||x||, eps) and s = 1 / ||x||^2 (0 where ||x|| <= eps), per row, differentiable
    without NaN at zero rows (the cosine kernels' aux and scale)."""
    sq = x.square().sum(1)
    big = sq > COSINE_EPS * COSINE_EPS
    safe = torch.where(big, sq, torch.ones_like(sq))
    inv = torch.where(big, safe.rsqrt(), torch.full_like(sq, 1.0 / COSINE_EPS))
    scale = torch.where(big, safe.reciprocal(), torch.zeros_like(sq))
    return inv, scale


def _pairwise_grad_torch(grad, x, y, dist, metric):
    """The gradient of pairwise_distance in pure PyTorch (differentiable again): the formulas of
    csrc/cpu/distance.cpp. dist is the forward's output (itself differentiable in x, y)."""
    grad = grad.to(dist.dtype)
    if metric == METRICS["cosine"]:
        inv_x, s_x = _inv_norm_and_scale(x)
        inv_y, s_y = _inv_norm_and_scale(y)
        k = grad * inv_x[:, None] * inv_y[None, :]       # cross coefficients
        q = grad * (1 - dist)                              # self coefficients (times s)
        gx = -(k @ y) + (q.sum(1) * s_x)[:, None] * x
        gy = -(k.T @ x) + (q.sum(0) * s_y)[:, None] * y
        return gx, gy
    if metric == METRICS["euclidean"]:
        pos = dist > 0
        w = torch.where(pos, grad / torch.where(pos, dist, torch.ones_like(dist)), torch.zeros_like(dist))
    else:
        w = 2 * grad
    gx = w.sum(1)[:, None] * x - w @ y
    gy = w.sum(0)[:, None] * y - w.T @ x
    return gx, gy


def _pairwise_backward(ctx, grad):
    x, y, dist = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
        gx, gy = _pairwise_grad_torch(grad, x, y, dist, ctx.metric)
        return gx.to(x.dtype), gy.to(y.dtype), None
    gx, gy = ops.pairwise_distance_backward(grad, x, y, dist, ctx.metric)
    return gx, gy, None


torch.library.register_autograd(_LIB + "pairwise_distance", _pairwise_backward, setup_context=_pairwise_setup)


def _hard_setup(ctx, inputs, output):
    embeddings, labels, metric = inputs
    ctx.save_for_backward(embeddings, *output)
    ctx.metric = metric


def _pair_grad_torch(a, b, metric):
    """Rows a, b (K, D) -> (d d(a_k, b_k) / d a_k, d d / d b_k), each (K, D), in pure PyTorch
    (differentiable again; the gradient of the Euclidean distance at 0 is 0, no NaN)."""
    r = a - b
    if metric == METRICS["squared_euclidean"]:
        return 2 * r, -2 * r
    if metric == METRICS["euclidean"]:
        sq = r.square().sum(1)
        pos = sq > 0
        inv = torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).rsqrt(), torch.zeros_like(sq))
        u = r * inv[:, None]
        return u, -u
    inv_a, s_a = _inv_norm_and_scale(a)
    inv_b, s_b = _inv_norm_and_scale(b)
    inv_ab = (inv_a * inv_b)[:, None]
    c = (a * b).sum(1, keepdim=True) * inv_ab
    return -(b * inv_ab - c * s_a[:, None] * a), -(a * inv_ab - c * s_b[:, None] * b)


def _hard_grad_torch(g_pos, g_neg, embeddings, pos_idx, neg_idx, metric):
    """The gradient of batch_hard_mine over the mined pairs in pure PyTorch, O(N * D):
    differentiable again (exact double backward), used when create_graph=True."""
    acc = _acc_dtype(embeddings.dtype)
    e = embeddings.to(acc)
    grad = torch.zeros_like(e)
    anchors = torch.arange(e.shape[0], device=e.device)
    for g, idx in ((g_pos, pos_idx), (g_neg, neg_idx)):
        keep = idx >= 0
        a, b = anchors[keep], idx[keep]
        ga, gb = _pair_grad_torch(e[a], e[b], metric)
        w = g.to(acc)[keep][:, None]
        grad = grad.index_add(0, a, w * ga).index_add(0, b, w * gb)
    return grad.to(embeddings.dtype)


def _hard_backward(ctx, g_pos_dist, g_pos_idx, g_neg_dist, g_neg_idx):
    embeddings, pos_dist, pos_idx, neg_dist, neg_idx = ctx.saved_tensors
    if g_pos_dist is None:
        g_pos_dist = torch.zeros_like(pos_dist)
    if g_neg_dist is None:
        g_neg_dist = torch.zeros_like(neg_dist)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
        return _hard_grad_torch(g_pos_dist, g_neg_dist, embeddings, pos_idx, neg_idx, ctx.metric), None, None
    grad = ops.batch_hard_mine_backward(
        g_pos_dist, g_neg_dist, embeddings, pos_dist, pos_idx, neg_dist, neg_idx, ctx.metric
    )
    return grad, None, None


torch.library.register_autograd(_LIB + "batch_hard_mine", _hard_backward, setup_context=_hard_setup)


def _loss_setup(ctx, inputs, output):
    embeddings, labels, margin, metric = inputs
    ctx.save_for_backward(embeddings, labels, output[1])
    ctx.margin = margin
    ctx.metric = metric


def _make_loss_backward(backward_op):
    def backward(ctx, g_loss_sum, g_num_valid, g_num_positive):
        embeddings, labels, num_valid = ctx.saved_tensors
        grad = backward_op(g_loss_sum, embeddings, labels, ctx.margin, ctx.metric)
        # With nothing valid the loss is the constant 0: its gradient is 0, also where a
        # non-finite embedding would put NaN distances (0 * NaN) into the backward's GEMMs.
        # A select, not a branch: no host sync on CUDA.
        grad = torch.where(num_valid > 0, grad, torch.zeros_like(grad))
        return grad, None, None, None

    return backward


for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    torch.library.register_autograd(
        _LIB + _name,
        _make_loss_backward(getattr(ops, _name + "_backward")),
        setup_context=_loss_setup,
    )


# contrastive_loss_with_grad: the forward also returned grad_sum = d loss_sum / d embeddings, so
# the backward is a scaling. With create_graph=True it takes the backward op instead, whose own
# derivative raises (a scaled constant would be a silently wrong second derivative).
def _with_grad_setup(ctx, inputs, output):
    embeddings, labels, margin, metric = inputs
    ctx.save_for_backward(embeddings, labels, output[1], output[3])
    ctx.mark_non_differentiable(output[3])
    ctx.margin = margin
    ctx.metric = metric


def _with_grad_backward(ctx, g_loss_sum, g_num_valid, g_num_positive, g_grad_sum):
    embeddings, labels, num_valid, grad_sum = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad = ops.contrastive_loss_backward(g_loss_sum, embeddings, labels, ctx.margin, ctx.metric)
    else:
        grad = (grad_sum * g_loss_sum.to(grad_sum.dtype)).to(embeddings.dtype)
    grad = torch.where(num_valid > 0, grad, torch.zeros_like(grad))  # as _make_loss_backward
    return grad, None, None, None


torch.library.register_autograd(_LIB + "contrastive_loss_with_grad", _with_grad_backward,
                                setup_context=_with_grad_setup)


# contrastive_hinge_loss: the positive and negative sums are differentiable apart (the reduction
# divides each by its own count), so the backward op takes both gradients.
@torch.library.register_fake(_LIB + "contrastive_hinge_loss")
def _(embeddings, labels, pos_margin, neg_margin, metric):
    pos_sum, pos_nonzero, _ = _loss_fake(embeddings, labels, pos_margin, metric)
    return pos_sum, pos_nonzero, torch.empty_like(pos_sum), torch.empty_like(pos_nonzero)


@torch.library.register_fake(_LIB + "contrastive_hinge_loss_backward")
def _(grad_pos_sum, grad_neg_sum, embeddings, labels, pos_margin, neg_margin, metric):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


def _hinge_setup(ctx, inputs, output):
    embeddings, labels, pos_margin, neg_margin, metric = inputs
    ctx.save_for_backward(embeddings, labels)
    ctx.margins = (pos_margin, neg_margin)
    ctx.metric = metric


def _hinge_backward(ctx, g_pos_sum, g_pos_nonzero, g_neg_sum, g_neg_nonzero):
    embeddings, labels = ctx.saved_tensors
    zero = torch.zeros((), dtype=_acc_dtype(embeddings.dtype), device=embeddings.device)
    g_pos_sum = zero if g_pos_sum is None else g_pos_sum
    g_neg_sum = zero if g_neg_sum is None else g_neg_sum
    grad = ops.contrastive_hinge_loss_backward(g_pos_sum, g_neg_sum, embeddings, labels, *ctx.margins, ctx.metric)
    return grad, None, None, None, None


torch.library.register_autograd(_LIB + "contrastive_hinge_loss", _hinge_backward, setup_context=_hinge_setup)


# ----------------------------------------------------------------------------- second derivatives
# The backward ops are not differentiable themselves: differentiating one (a gradient penalty,
# gradgradcheck, a Hessian) raises here instead of torch's silent "no autograd kernel" zero.
def _no_double_backward(name):
    if name in _LOSS_NAMES:
        msg = (f"triplet_cuda: the second derivative of {_LOSS_NAMES[name]} is not implemented (its "
               f"backward, triplet_cuda::{name}_backward, is not differentiable); batch_hard_triplet_loss, "
               f"batch_hard_mine and pairwise_distance support double backward")
    else:
        fwd = name[: -len("_backward")]
        msg = (f"triplet_cuda: triplet_cuda::{name} is not differentiable when called directly; "
               f"differentiate {fwd} with create_graph=True instead (it takes an exact, differentiable "
               f"pure-PyTorch path then)")

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(msg)

    return backward, setup


for _name in BACKWARD_OPS:
    _bw, _setup = _no_double_backward(_name[: -len("_backward")] if _name.endswith("_loss_backward") else _name)
    torch.library.register_autograd(_LIB + _name, _bw, setup_context=_setup)


# ----------------------------------------------------------------------------- knn (metrics)
@torch.library.register_fake(_LIB + "knn")
def _(query, ref, k, metric, self_offset):
    n = query.shape[0]
    return query.new_empty((n, k)), query.new_empty((n, k), dtype=torch.int64)


# ----------------------------------------------------------------------------- query vs reference
# The *_ref ops (csrc/ops.cpp): anchors from embeddings (N, D), candidates from ref (M, D),
# self_index (N,) int64. Their backward ops take ref_grad = ctx.needs_input_grad of ref, so a
# reference set that does not require grad costs no gradient work.
REF_FORWARD_OPS = ("batch_hard_mine_ref", "batch_all_loss_ref", "semi_hard_loss_ref", "contrastive_loss_ref",
                   "mine_triplets_ref")
REF_BACKWARD_OPS = ("batch_hard_mine_ref_backward", "batch_all_loss_ref_backward", "semi_hard_loss_ref_backward",
                    "contrastive_loss_ref_backward")

for _name in REF_FORWARD_OPS + REF_BACKWARD_OPS:
    for _device_type in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(_device_type):
            torch.library.register_autocast(_LIB + _name, _device_type, torch.float32)


def _fake_ref(embeddings, labels, ref, ref_labels, self_index):
    _fake_same_device(embeddings, labels, "embeddings", "labels")
    _fake_same_device(embeddings, ref, "embeddings", "ref")
    _fake_same_device(embeddings, ref_labels, "embeddings", "ref_labels")
    _fake_same_device(embeddings, self_index, "embeddings", "self_index")


def _ref_grad_fake(ref, ref_grad):
    if ref_grad:
        return torch.empty_like(ref, memory_format=torch.contiguous_format)
    return ref.new_empty((0,))


@torch.library.register_fake(_LIB + "batch_hard_mine_ref")
def _(embeddings, labels, ref, ref_labels, self_index, metric):
    _fake_ref(embeddings, labels, ref, ref_labels, self_index)
    n = embeddings.shape[0]
    dist = embeddings.new_empty((n,))
    idx = embeddings.new_empty((n,), dtype=torch.int64)
    return dist, idx, torch.empty_like(dist), torch.empty_like(idx)


@torch.library.register_fake(_LIB + "batch_hard_mine_ref_backward")
def _(grad_pos_dist, grad_neg_dist, embeddings, ref, pos_dist, pos_idx, neg_dist, neg_idx, metric, ref_grad):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format), _ref_grad_fake(ref, ref_grad)


def _loss_ref_fake(embeddings, labels, ref, ref_labels, self_index, margin, metric):
    _fake_ref(embeddings, labels, ref, ref_labels, self_index)
    loss = embeddings.new_empty((), dtype=_acc_dtype(embeddings.dtype))
    count = embeddings.new_empty((), dtype=torch.int64)
    return loss, count, torch.empty_like(count)


def _loss_ref_backward_fake(grad_loss_sum, embeddings, labels, ref, ref_labels, self_index, margin, metric,
                            ref_grad):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format), _ref_grad_fake(ref, ref_grad)


for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    torch.library.register_fake(_LIB + _name + "_ref")(_loss_ref_fake)
    torch.library.register_fake(_LIB + _name + "_ref_backward")(_loss_ref_backward_fake)


@torch.library.register_fake(_LIB + "mine_triplets_ref")
def _(embeddings, labels, ref, ref_labels, self_index, strategy, metric):
    _fake_ref(embeddings, labels, ref, ref_labels, self_index)
    ctx = torch.library.get_ctx()
    t = ctx.new_dynamic_size()
    idx = embeddings.new_empty((t,), dtype=torch.int64)
    return idx, torch.empty_like(idx), torch.empty_like(idx)


def _hard_ref_setup(ctx, inputs, output):
    embeddings, labels, ref, ref_labels, self_index, metric = inputs
    ctx.save_for_backward(embeddings, ref, *output)
    ctx.metric = metric


def _hard_ref_grad_torch(g_pos, g_neg, embeddings, ref, pos_idx, neg_idx, metric):
    """The gradient of batch_hard_mine_ref in pure PyTorch (differentiable again), for
    create_graph=True: -> (grad_embeddings, grad_ref)."""
    acc = _acc_dtype(embeddings.dtype)
    e, r = embeddings.to(acc), ref.to(acc)
    ge, gr = torch.zeros_like(e), torch.zeros_like(r)
    anchors = torch.arange(e.shape[0], device=e.device)
    for g, idx in ((g_pos, pos_idx), (g_neg, neg_idx)):
        keep = idx >= 0
        a, b = anchors[keep], idx[keep]
        ga, gb = _pair_grad_torch(e[a], r[b], metric)
        w = g.to(acc)[keep][:, None]
        ge = ge.index_add(0, a, w * ga)
        gr = gr.index_add(0, b, w * gb)
    return ge.to(embeddings.dtype), gr.to(ref.dtype)


def _hard_ref_backward(ctx, g_pos_dist, g_pos_idx, g_neg_dist, g_neg_idx):
    embeddings, ref, pos_dist, pos_idx, neg_dist, neg_idx = ctx.saved_tensors
    if g_pos_dist is None:
        g_pos_dist = torch.zeros_like(pos_dist)
    if g_neg_dist is None:
        g_neg_dist = torch.zeros_like(neg_dist)
    ref_grad = ctx.needs_input_grad[2]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
        ge, gr = _hard_ref_grad_torch(g_pos_dist, g_neg_dist, embeddings, ref, pos_idx, neg_idx, ctx.metric)
    else:
        ge, gr = ops.batch_hard_mine_ref_backward(
            g_pos_dist, g_neg_dist, embeddings, ref, pos_dist, pos_idx, neg_dist, neg_idx, ctx.metric, ref_grad
        )
    return ge, None, gr if ref_grad else None, None, None, None


torch.library.register_autograd(_LIB + "batch_hard_mine_ref", _hard_ref_backward, setup_context=_hard_ref_setup)


def _loss_ref_setup(ctx, inputs, output):
    embeddings, labels, ref, ref_labels, self_index, margin, metric = inputs
    ctx.save_for_backward(embeddings, labels, ref, ref_labels, self_index, output[1])
    ctx.margin = margin
    ctx.metric = metric


def _make_loss_ref_backward(backward_op):
    def backward(ctx, g_loss_sum, g_num_valid, g_num_positive):
        embeddings, labels, ref, ref_labels, self_index, num_valid = ctx.saved_tensors
        ref_grad = ctx.needs_input_grad[2]
        ge, gr = backward_op(g_loss_sum, embeddings, labels, ref, ref_labels, self_index, ctx.margin, ctx.metric,
                             ref_grad)
        # nothing valid: the constant 0, gradient 0 (as the batch ops; a select, no host sync)
        ge = torch.where(num_valid > 0, ge, torch.zeros_like(ge))
        gr = torch.where(num_valid > 0, gr, torch.zeros_like(gr)) if ref_grad else None
        return ge, None, gr, None, None, None, None

    return backward


for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    torch.library.register_autograd(
        _LIB + _name + "_ref",
        _make_loss_ref_backward(getattr(ops, _name + "_ref_backward")),
        setup_context=_loss_ref_setup,
    )

for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    _LOSS_NAMES[_name + "_ref"] = _LOSS_NAMES[_name] + " (with a reference set)"
for _name in REF_BACKWARD_OPS:
    _bw, _setup = _no_double_backward(_name[: -len("_backward")] if _name.endswith("_loss_ref_backward") else _name)
    torch.library.register_autograd(_LIB + _name, _bw, setup_context=_setup)
