"""The public functions: fused distance, mining and losses with autograd."""
from __future__ import annotations

import torch

from . import _validation as v
from ._ops import METRICS, STRATEGIES, ops, result_dtype
from ._types import HardMining, TripletStats

REDUCTIONS = ("mean", "mean_nonzero", "sum")
BATCH_HARD_REDUCTIONS = REDUCTIONS + ("none",)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, *, metric: str = "euclidean") -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) distances; y=None means y=x. Differentiable in x and y."""
    v.check_embeddings(x, "x")
    v.check_choice(metric, "metric", METRICS)
    if y is None:
        y = x
    else:
        v.check_embeddings(y, "y")
        v.check_same_device(x, y, "x", "y")
        if y.dtype != x.dtype:
            raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have the feature size of x ({x.shape[1]}), got {y.shape[1]}")
    return ops.pairwise_distance(x, y, METRICS[metric])


def _check_batch(embeddings, labels, metric):
    v.check_embeddings(embeddings)
    v.check_labels(labels, embeddings)
    v.check_choice(metric, "metric", METRICS)
    return METRICS[metric]


def batch_hard_mine(embeddings: torch.Tensor, labels: torch.Tensor, *, metric: str = "euclidean") -> HardMining:
    """Per anchor the hardest positive (largest distance) and hardest negative (smallest distance).

    Ties go to the lowest index. Anchors without a positive or without a negative get -1
    indices and 0 distances. The distances are differentiable.
    """
    code = _check_batch(embeddings, labels, metric)
    return HardMining(*ops.batch_hard_mine(embeddings, labels, code))


def _stats(num_valid, num_positive) -> TripletStats:
    return TripletStats(num_valid, num_positive, num_positive.double() / num_valid.clamp_min(1).double())


def _reduce_sum(loss_sum, num_valid, num_positive, reduction, dtype):
    if reduction == "mean":
        loss_sum = loss_sum / num_valid.clamp_min(1).to(loss_sum.dtype)
    elif reduction == "mean_nonzero":
        loss_sum = loss_sum / num_positive.clamp_min(1).to(loss_sum.dtype)
    return loss_sum.to(dtype)


def batch_hard_triplet_loss(embeddings, labels, margin=0.2, *, metric="euclidean", soft_margin=False,
                            reduction="mean", return_stats=False):
    """Batch-hard triplet loss (Hermans et al. 2017): per anchor relu(d_ap - d_an + margin),
    or softplus(d_ap - d_an) with soft_margin, over the hardest positive and negative.

    reduction: "mean" (over valid anchors), "mean_nonzero", "sum", or "none" (per anchor, 0 for
    invalid anchors). Returns the loss, or (loss, TripletStats) with return_stats.
    """
    code = _check_batch(embeddings, labels, metric)
    margin = v.check_margin(margin)
    v.check_choice(reduction, "reduction", BATCH_HARD_REDUCTIONS)
    pos_dist, pos_idx, neg_dist, _ = ops.batch_hard_mine(embeddings, labels, code)
    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    gap = pos_dist.to(acc) - neg_dist.to(acc)
    terms = torch.nn.functional.softplus(gap) if soft_margin else torch.relu(gap + margin)
    valid = pos_idx >= 0
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    num_valid = valid.sum()
    num_positive = (terms > 0).sum()
    if reduction == "none":
        loss = terms.to(result_dtype(embeddings))
    else:
        loss = _reduce_sum(terms.sum(), num_valid, num_positive, reduction, result_dtype(embeddings))
    return (loss, _stats(num_valid, num_positive)) if return_stats else loss


def _fused_loss(op, embeddings, labels, margin, metric, reduction, reductions, return_stats):
    code = _check_batch(embeddings, labels, metric)
    margin = v.check_margin(margin)
    v.check_choice(reduction, "reduction", reductions)
    loss_sum, num_valid, num_positive = op(embeddings, labels, margin, code)
    loss = _reduce_sum(loss_sum, num_valid, num_positive, reduction, result_dtype(embeddings))
    return (loss, _stats(num_valid, num_positive)) if return_stats else loss


def batch_all_triplet_loss(embeddings, labels, margin=0.2, *, metric="euclidean", reduction="mean_nonzero",
                           return_stats=False):
    """Batch-all triplet loss: relu(d_ap - d_an + margin) over every valid (a, p, n), without
    an N x N x N tensor. reduction: "mean_nonzero" (over terms > 0), "mean" (over valid
    triplets) or "sum"."""
    return _fused_loss(ops.batch_all_loss, embeddings, labels, margin, metric, reduction, REDUCTIONS,
                       return_stats)


def semi_hard_triplet_loss(embeddings, labels, margin=0.2, *, metric="euclidean", reduction="mean",
                           return_stats=False):
    """Semi-hard triplet loss (FaceNet; TensorFlow Addons' TripletSemiHardLoss): for each (a, p)
    the nearest negative farther than d_ap, else the farthest negative. reduction: "mean" (over
    (a, p) pairs of anchors with a negative), "mean_nonzero" or "sum"."""
    return _fused_loss(ops.semi_hard_loss, embeddings, labels, margin, metric, reduction, REDUCTIONS,
                       return_stats)


def contrastive_loss(embeddings, labels, margin=1.0, *, metric="euclidean", reduction="mean",
                     return_stats=False):
    """Contrastive loss (Hadsell, Chopra, LeCun 2006) over unordered pairs i < j: d^2 for the same
    label, relu(margin - d)^2 otherwise. reduction: "mean" (over pairs), "mean_nonzero" or "sum"."""
    return _fused_loss(ops.contrastive_loss, embeddings, labels, margin, metric, reduction, REDUCTIONS,
                       return_stats)


def mine_triplets(embeddings, labels, *, strategy="batch_hard", metric="euclidean"):
    """(anchor_idx, positive_idx, negative_idx), int64, sorted by (anchor, positive, negative):
    the index-tuple format pytorch-metric-learning's losses accept. Not differentiable."""
    code = _check_batch(embeddings, labels, metric)
    v.check_choice(strategy, "strategy", STRATEGIES)
    v.check_triplets_fit(labels, strategy)
    with torch.no_grad():
        return tuple(ops.mine_triplets(embeddings, labels, STRATEGIES[strategy], code))
