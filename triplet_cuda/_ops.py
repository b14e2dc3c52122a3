"""The custom ops: fake (meta) kernels for torch.compile and autograd formulas.

The C++/CUDA kernels are registered by the compiled library (see _loader); this module
adds what torch.library wants from Python: register_fake for every op (so torch.compile
traces them) and register_autograd for every forward op, whose backward is its own op.
"""
from __future__ import annotations

import torch

from ._loader import load

load()

METRICS = {"euclidean": 0, "squared_euclidean": 1, "cosine": 2}
STRATEGIES = {"batch_hard": 0, "batch_all": 1, "semi_hard": 2}

ops = torch.ops.triplet_cuda
_LIB = "triplet_cuda::"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake(_LIB + "pairwise_distance")
def _(x, y, metric):
    return x.new_empty((x.shape[0], y.shape[0]))


@torch.library.register_fake(_LIB + "pairwise_distance_backward")
def _(grad, x, y, dist, metric):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


@torch.library.register_fake(_LIB + "batch_hard_mine")
def _(embeddings, labels, metric):
    n = embeddings.shape[0]
    dist = embeddings.new_empty((n,))
    idx = embeddings.new_empty((n,), dtype=torch.int64)
    return dist, idx, torch.empty_like(dist), torch.empty_like(idx)


@torch.library.register_fake(_LIB + "batch_hard_mine_backward")
def _(grad_pos_dist, grad_neg_dist, embeddings, pos_dist, pos_idx, neg_dist, neg_idx, metric):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


def _loss_fake(embeddings, labels, margin, metric):
    loss = embeddings.new_empty((), dtype=_acc_dtype(embeddings.dtype))
    count = embeddings.new_empty((), dtype=torch.int64)
    return loss, count, torch.empty_like(count)


def _loss_backward_fake(grad_loss_sum, embeddings, labels, margin, metric):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    torch.library.register_fake(_LIB + _name)(_loss_fake)
    torch.library.register_fake(_LIB + _name + "_backward")(_loss_backward_fake)


@torch.library.register_fake(_LIB + "mine_triplets")
def _(embeddings, labels, strategy, metric):
    ctx = torch.library.get_ctx()
    t = ctx.new_dynamic_size()
    idx = embeddings.new_empty((t,), dtype=torch.int64)
    return idx, torch.empty_like(idx), torch.empty_like(idx)


# ----------------------------------------------------------------------------- autograd
def _pairwise_setup(ctx, inputs, output):
    x, y, metric = inputs
    ctx.save_for_backward(x, y, output)
    ctx.metric = metric


def _pairwise_backward(ctx, grad):
    x, y, dist = ctx.saved_tensors
    gx, gy = ops.pairwise_distance_backward(grad, x, y, dist, ctx.metric)
    return gx, gy, None


torch.library.register_autograd(_LIB + "pairwise_distance", _pairwise_backward, setup_context=_pairwise_setup)


def _hard_setup(ctx, inputs, output):
    embeddings, labels, metric = inputs
    ctx.save_for_backward(embeddings, *output)
    ctx.metric = metric


def _hard_backward(ctx, g_pos_dist, g_pos_idx, g_neg_dist, g_neg_idx):
    embeddings, pos_dist, pos_idx, neg_dist, neg_idx = ctx.saved_tensors
    if g_pos_dist is None:
        g_pos_dist = torch.zeros_like(pos_dist)
    if g_neg_dist is None:
        g_neg_dist = torch.zeros_like(neg_dist)
    grad = ops.batch_hard_mine_backward(
        g_pos_dist, g_neg_dist, embeddings, pos_dist, pos_idx, neg_dist, neg_idx, ctx.metric
    )
    return grad, None, None


torch.library.register_autograd(_LIB + "batch_hard_mine", _hard_backward, setup_context=_hard_setup)


def _loss_setup(ctx, inputs, output):
    embeddings, labels, margin, metric = inputs
    ctx.save_for_backward(embeddings, labels)
    ctx.margin = margin
    ctx.metric = metric


def _make_loss_backward(backward_op):
    def backward(ctx, g_loss_sum, g_num_valid, g_num_positive):
        embeddings, labels = ctx.saved_tensors
        grad = backward_op(g_loss_sum, embeddings, labels, ctx.margin, ctx.metric)
        return grad, None, None, None

    return backward


for _name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss"):
    torch.library.register_autograd(
        _LIB + _name,
        _make_loss_backward(getattr(ops, _name + "_backward")),
        setup_context=_loss_setup,
    )


# ----------------------------------------------------------------------------- knn (metrics)
@torch.library.register_fake(_LIB + "knn")
def _(query, ref, k, metric, self_offset):
    n = query.shape[0]
    return query.new_empty((n, k)), query.new_empty((n, k), dtype=torch.int64)
