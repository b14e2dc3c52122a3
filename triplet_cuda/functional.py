"""Fused pairwise distances, in-batch triplet mining and metric-learning losses, with autograd.

Every function takes embeddings of shape (N, D) (float32, float64, float16 or bfloat16, any
strides, CPU or CUDA) and, for mining and losses, integer labels of shape (N,) (any integer
dtype, any values). Metrics: ``"euclidean"`` (||a - b||), ``"squared_euclidean"``
(||a - b||^2) and ``"cosine"`` (1 - cos(a, b), norms clamped at 1e-8). The losses differentiate
through the C++/CUDA backward ops; nothing builds the N x N x N tensor of the mask recipe.

Example:
    >>> import torch
    >>> import triplet_cuda as tc
    >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> tc.batch_hard_triplet_loss(embeddings, labels, margin=2.5)
    tensor(0.5000)
"""
from __future__ import annotations

from typing import Literal, overload

import torch

from . import _validation as v
from . import distributed as _distributed
from ._ops import METRICS, STRATEGIES, ops, result_dtype
from ._types import HardMining, TripletStats

__all__ = [
    "batch_all_triplet_loss",
    "batch_hard_mine",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "mine_triplets",
    "pairwise_distance",
    "pml_contrastive_loss",
    "semi_hard_triplet_loss",
]

REDUCTIONS = ("mean", "mean_nonzero", "sum")
BATCH_HARD_REDUCTIONS = REDUCTIONS + ("none",)

Metric = Literal["euclidean", "squared_euclidean", "cosine"]
"""A distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``."""
Reduction = Literal["mean", "mean_nonzero", "sum"]
"""How a loss reduces its terms: over valid terms, over terms > 0, or their sum."""
BatchHardReduction = Literal["mean", "mean_nonzero", "sum", "none"]
"""A Reduction, or ``"none"`` for the per-anchor loss vector of batch hard."""
Strategy = Literal["batch_hard", "batch_all", "semi_hard"]
"""A mining strategy of mine_triplets."""



def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, *, metric: Metric = "euclidean") -> torch.Tensor:
    """Distances between every row of ``x`` and every row of ``y``, differentiable in both.

    Args:
        x: Embeddings, floating point.
        y: Embeddings of the dtype, device and feature size of ``x``; None means ``x``.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

    Shapes:
        x: (N, D); y: (M, D); returns (N, M).

    Returns:
        The distances, in the dtype of ``x`` (half types accumulate in float32). Distances
        within rounding noise of 0 are recomputed exactly, so ``d(x, x)`` has a 0 diagonal.

    Raises:
        TypeError: ``x`` or ``y`` is not a floating tensor, or their dtypes differ.
        ValueError: A tensor is not 2-D, the feature sizes or devices differ, or ``metric`` is
            unknown.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> tc.pairwise_distance(x)
        tensor([[0., 5.],
                [5., 0.]])
    """
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


def _check_batch(embeddings: torch.Tensor, labels: torch.Tensor, metric: str) -> int:
    v.check_embeddings(embeddings)
    v.check_labels(labels, embeddings)
    v.check_choice(metric, "metric", METRICS)
    return METRICS[metric]


def batch_hard_mine(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: Metric = "euclidean",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_self_index: int | torch.Tensor | None = None,
) -> HardMining:
    """Per anchor the hardest positive (largest distance) and hardest negative (smallest distance).

    Ties go to the lowest index. Anchors without a positive or without a negative get -1
    indices and 0 distances. Never builds the N x N distance matrix. With a reference set the
    candidates are its rows and the indices point into it (never builds N x M).

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        ref_embeddings: Optional reference set: positives and negatives are taken from its
            rows (with ``ref_labels``) instead of the batch; same dtype, device and feature
            size as ``embeddings``. Gradients flow to it when it requires grad.
        ref_labels: Integer labels of ``ref_embeddings``; given together with it.
        ref_self_index: Which reference row is each anchor itself (never its own positive):
            None (no anchor is in the reference set), an int k (anchor i is reference row
            k + i) or an integer (N,) tensor with -1 for "not in the set".

    Shapes:
        embeddings: (N, D); labels: (N,); ref_embeddings: (M, D); ref_labels: (M,); every field of the result: (N,).

    Returns:
        HardMining(pos_dist, pos_idx, neg_dist, neg_idx): distances in the dtype of
        ``embeddings`` (differentiable), indices int64.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, or an unknown ``metric``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> mined = tc.batch_hard_mine(embeddings, torch.tensor([0, 0, 1, 1]))
        >>> mined.pos_idx, mined.neg_idx
        (tensor([1, 0, 3, 2]), tensor([2, 3, 0, 1]))
        >>> mined.neg_dist
        tensor([3., 3., 3., 3.])
    """
    code = _check_batch(embeddings, labels, metric)
    ref = v.check_reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    if ref is not None:
        return HardMining(*ops.batch_hard_mine_ref(embeddings, labels, *ref, code))
    return HardMining(*ops.batch_hard_mine(embeddings, labels, code))


def _stats(num_valid: torch.Tensor, num_positive: torch.Tensor) -> TripletStats:
    return TripletStats(num_valid, num_positive, num_positive.double() / num_valid.clamp_min(1).double())


def _reduce_sum(loss_sum: torch.Tensor, num_valid: torch.Tensor, num_positive: torch.Tensor, reduction: str,
                dtype: torch.dtype) -> torch.Tensor:
    if reduction == "mean":
        loss_sum = loss_sum / num_valid.clamp_min(1).to(loss_sum.dtype)
    elif reduction == "mean_nonzero":
        loss_sum = loss_sum / num_positive.clamp_min(1).to(loss_sum.dtype)
    return loss_sum.to(dtype)


@overload
def batch_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    soft_margin: bool = ..., reduction: BatchHardReduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[False] = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor: ...
@overload
def batch_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    soft_margin: bool = ..., reduction: BatchHardReduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[True],
    gather_across_ranks: bool = ...,
) -> tuple[torch.Tensor, TripletStats]: ...
@overload
def batch_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    soft_margin: bool = ..., reduction: BatchHardReduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: bool = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]: ...


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    *,
    metric: Metric = "euclidean",
    soft_margin: bool = False,
    reduction: BatchHardReduction = "mean",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_self_index: int | torch.Tensor | None = None,
    return_stats: bool = False,
    gather_across_ranks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
    """Batch-hard triplet loss (Hermans et al. 2017).

    Per anchor ``relu(d_ap - d_an + margin)``, or ``softplus(d_ap - d_an)`` with
    ``soft_margin``, over its hardest (farthest) positive and hardest (nearest) negative; anchors
    without a positive or a negative are not valid.

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        margin: The margin, a finite number.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        ref_embeddings: Optional reference set: positives and negatives are taken from its
            rows (with ``ref_labels``) instead of the batch; same dtype, device and feature
            size as ``embeddings``. Gradients flow to it when it requires grad.
        ref_labels: Integer labels of ``ref_embeddings``; given together with it.
        ref_self_index: Which reference row is each anchor itself (never its own positive):
            None (no anchor is in the reference set), an int k (anchor i is reference row
            k + i) or an integer (N,) tensor with -1 for "not in the set".
        soft_margin: Use ``softplus(d_ap - d_an)`` instead of the hinge (``margin`` is unused).
        reduction: ``"mean"`` (over valid anchors), ``"mean_nonzero"`` (over anchors with a loss
            > 0), ``"sum"``, or ``"none"`` (per anchor, 0 for invalid anchors).
        return_stats: Also return a TripletStats (num_valid, num_positive, fraction_positive)
            of 0-d tensors, for logging.
        gather_across_ranks: Under torch.distributed, the loss of the batch of every rank:
            this rank's anchors mined against all ranks' embeddings, the global value on every
            rank, gradients scaled for DistributedDataParallel (see triplet_cuda.distributed).

    Shapes:
        embeddings: (N, D); labels: (N,); ref_embeddings: (M, D); ref_labels: (M,); loss: () or (N,) with ``reduction="none"``.

    Returns:
        The loss (0-d; (N,) with ``reduction="none"``) in the dtype of ``embeddings``, or
        ``(loss, stats)`` with ``return_stats=True``. With nothing valid the loss is 0, still
        attached to the graph.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, a non-finite ``margin``, or an unknown
            ``metric`` or ``reduction``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> loss, stats = tc.batch_hard_triplet_loss(embeddings, labels, margin=2.5, return_stats=True)
        >>> loss, stats.num_valid, stats.fraction_positive
        (tensor(0.5000), tensor(4), tensor(1., dtype=torch.float64))
    """
    if gather_across_ranks:
        return _distributed.loss_across_ranks(batch_hard_triplet_loss, embeddings, labels, margin, metric=metric,
                                              soft_margin=soft_margin, reduction=reduction, return_stats=return_stats,
                                              ref_embeddings=ref_embeddings,
                                              ref_labels=ref_labels, ref_self_index=ref_self_index)
    code = _check_batch(embeddings, labels, metric)
    margin = v.check_margin(margin)
    v.check_choice(reduction, "reduction", BATCH_HARD_REDUCTIONS)
    ref = v.check_reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    if ref is not None:
        pos_dist, pos_idx, neg_dist, _ = ops.batch_hard_mine_ref(embeddings, labels, *ref, code)
    else:
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


def _fused_loss(name: str, embeddings: torch.Tensor, labels: torch.Tensor, margin: float, metric: str, reduction: str,
                reductions: tuple[str, ...], return_stats: bool, ref_embeddings=None, ref_labels=None,
                ref_self_index=None) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
    code = _check_batch(embeddings, labels, metric)
    margin = v.check_margin(margin)
    v.check_choice(reduction, "reduction", reductions)
    ref = v.check_reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    if ref is not None:
        loss_sum, num_valid, num_positive = getattr(ops, name + "_ref")(embeddings, labels, *ref, margin, code)
    else:
        op = _contrastive_op if name == "contrastive_loss" else getattr(ops, name)
        loss_sum, num_valid, num_positive = op(embeddings, labels, margin, code)
    loss = _reduce_sum(loss_sum, num_valid, num_positive, reduction, result_dtype(embeddings))
    return (loss, _stats(num_valid, num_positive)) if return_stats else loss


@overload
def batch_all_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[False] = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor: ...
@overload
def batch_all_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[True],
    gather_across_ranks: bool = ...,
) -> tuple[torch.Tensor, TripletStats]: ...
@overload
def batch_all_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: bool = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]: ...


def batch_all_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    *,
    metric: Metric = "euclidean",
    reduction: Reduction = "mean_nonzero",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_self_index: int | torch.Tensor | None = None,
    return_stats: bool = False,
    gather_across_ranks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
    """Batch-all triplet loss: ``relu(d_ap - d_an + margin)`` over every valid (a, p, n).

    A triplet is valid when ``labels[a] == labels[p]``, ``a != p`` and ``labels[n] !=
    labels[a]``. Computed in O(N^2 log N) time without an N x N x N tensor.

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        margin: The margin, a finite number.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        ref_embeddings: Optional reference set: positives and negatives are taken from its
            rows (with ``ref_labels``) instead of the batch; same dtype, device and feature
            size as ``embeddings``. Gradients flow to it when it requires grad.
        ref_labels: Integer labels of ``ref_embeddings``; given together with it.
        ref_self_index: Which reference row is each anchor itself (never its own positive):
            None (no anchor is in the reference set), an int k (anchor i is reference row
            k + i) or an integer (N,) tensor with -1 for "not in the set".
        reduction: ``"mean_nonzero"`` (over triplets with a loss > 0), ``"mean"`` (over valid
            triplets) or ``"sum"``.
        return_stats: Also return a TripletStats (num_valid, num_positive, fraction_positive)
            of 0-d tensors, for logging.
        gather_across_ranks: Under torch.distributed, the loss of the batch of every rank:
            this rank's anchors mined against all ranks' embeddings, the global value on every
            rank, gradients scaled for DistributedDataParallel (see triplet_cuda.distributed).

    Shapes:
        embeddings: (N, D); labels: (N,); ref_embeddings: (M, D); ref_labels: (M,); loss: ().

    Returns:
        The loss (0-d; (N,) with ``reduction="none"``) in the dtype of ``embeddings``, or
        ``(loss, stats)`` with ``return_stats=True``. With nothing valid the loss is 0, still
        attached to the graph.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, a non-finite ``margin``, or an unknown
            ``metric`` or ``reduction``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> tc.batch_all_triplet_loss(embeddings, torch.tensor([0, 0, 1, 1]), margin=2.5)
        tensor(0.4189)
    """
    if gather_across_ranks:
        return _distributed.loss_across_ranks(batch_all_triplet_loss, embeddings, labels, margin, metric=metric, reduction=reduction,
                                              return_stats=return_stats, ref_embeddings=ref_embeddings,
                                              ref_labels=ref_labels, ref_self_index=ref_self_index)
    return _fused_loss("batch_all_loss", embeddings, labels, margin, metric, reduction, REDUCTIONS,
                       return_stats, ref_embeddings, ref_labels, ref_self_index)


@overload
def semi_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[False] = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor: ...
@overload
def semi_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[True],
    gather_across_ranks: bool = ...,
) -> tuple[torch.Tensor, TripletStats]: ...
@overload
def semi_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: bool = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]: ...


def semi_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    *,
    metric: Metric = "euclidean",
    reduction: Reduction = "mean",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_self_index: int | torch.Tensor | None = None,
    return_stats: bool = False,
    gather_across_ranks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
    """Semi-hard triplet loss (FaceNet; TensorFlow Addons' ``TripletSemiHardLoss``).

    For each positive pair (a, p), ``relu(d_ap - d_an + margin)`` with n the nearest negative
    farther than ``d_ap``, else (no such negative) the farthest negative.

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        margin: The margin, a finite number.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        ref_embeddings: Optional reference set: positives and negatives are taken from its
            rows (with ``ref_labels``) instead of the batch; same dtype, device and feature
            size as ``embeddings``. Gradients flow to it when it requires grad.
        ref_labels: Integer labels of ``ref_embeddings``; given together with it.
        ref_self_index: Which reference row is each anchor itself (never its own positive):
            None (no anchor is in the reference set), an int k (anchor i is reference row
            k + i) or an integer (N,) tensor with -1 for "not in the set".
        reduction: ``"mean"`` (over the (a, p) pairs of anchors that have a negative),
            ``"mean_nonzero"`` (over pairs with a loss > 0) or ``"sum"``.
        return_stats: Also return a TripletStats (num_valid, num_positive, fraction_positive)
            of 0-d tensors, for logging.
        gather_across_ranks: Under torch.distributed, the loss of the batch of every rank:
            this rank's anchors mined against all ranks' embeddings, the global value on every
            rank, gradients scaled for DistributedDataParallel (see triplet_cuda.distributed).

    Shapes:
        embeddings: (N, D); labels: (N,); ref_embeddings: (M, D); ref_labels: (M,); loss: ().

    Returns:
        The loss (0-d; (N,) with ``reduction="none"``) in the dtype of ``embeddings``, or
        ``(loss, stats)`` with ``return_stats=True``. With nothing valid the loss is 0, still
        attached to the graph.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, a non-finite ``margin``, or an unknown
            ``metric`` or ``reduction``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> tc.semi_hard_triplet_loss(embeddings, torch.tensor([0, 0, 1, 1]), margin=2.5)
        tensor(0.5000)
    """
    if gather_across_ranks:
        return _distributed.loss_across_ranks(semi_hard_triplet_loss, embeddings, labels, margin, metric=metric, reduction=reduction,
                                              return_stats=return_stats, ref_embeddings=ref_embeddings,
                                              ref_labels=ref_labels, ref_self_index=ref_self_index)
    return _fused_loss("semi_hard_loss", embeddings, labels, margin, metric, reduction, REDUCTIONS,
                       return_stats, ref_embeddings, ref_labels, ref_self_index)


@overload
def contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[False] = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor: ...
@overload
def contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: Literal[True],
    gather_across_ranks: bool = ...,
) -> tuple[torch.Tensor, TripletStats]: ...
@overload
def contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = ..., *, metric: Metric = ...,
    reduction:     Reduction = ..., ref_embeddings: torch.Tensor | None = ..., ref_labels: torch.Tensor | None = ...,
    ref_self_index: int | torch.Tensor | None = ..., return_stats: bool = ...,
    gather_across_ranks: bool = ...,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]: ...


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 1.0,
    *,
    metric: Metric = "euclidean",
    reduction: Reduction = "mean",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_self_index: int | torch.Tensor | None = None,
    return_stats: bool = False,
    gather_across_ranks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
    """Contrastive loss (Hadsell, Chopra, LeCun 2006) over all in-batch pairs.

    Over unordered pairs i < j: ``d^2`` for the same label, ``relu(margin - d)^2`` otherwise.
    With a reference set: over ordered pairs (a, j), a an anchor and j any reference row but
    the anchor itself (so the batch as its own reference set, ``ref_self_index=0``, gives twice
    the sum and the same mean).

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        margin: The margin, a finite number.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        ref_embeddings: Optional reference set: positives and negatives are taken from its
            rows (with ``ref_labels``) instead of the batch; same dtype, device and feature
            size as ``embeddings``. Gradients flow to it when it requires grad.
        ref_labels: Integer labels of ``ref_embeddings``; given together with it.
        ref_self_index: Which reference row is each anchor itself (never its own positive):
            None (no anchor is in the reference set), an int k (anchor i is reference row
            k + i) or an integer (N,) tensor with -1 for "not in the set".
        reduction: ``"mean"`` (over pairs), ``"mean_nonzero"`` (over pairs with a loss > 0) or
            ``"sum"``.
        return_stats: Also return a TripletStats (num_valid, num_positive, fraction_positive)
            of 0-d tensors, for logging.
        gather_across_ranks: Under torch.distributed, the loss of the batch of every rank:
            this rank's anchors mined against all ranks' embeddings, the global value on every
            rank, gradients scaled for DistributedDataParallel (see triplet_cuda.distributed).

    Shapes:
        embeddings: (N, D); labels: (N,); ref_embeddings: (M, D); ref_labels: (M,); loss: ().

    Returns:
        The loss (0-d; (N,) with ``reduction="none"``) in the dtype of ``embeddings``, or
        ``(loss, stats)`` with ``return_stats=True``. With nothing valid the loss is 0, still
        attached to the graph.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, a non-finite ``margin``, or an unknown
            ``metric`` or ``reduction``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> tc.contrastive_loss(embeddings, torch.tensor([0, 0, 1, 1]), margin=1.0)
        tensor(0.3333)
    """
    if gather_across_ranks:
        return _distributed.loss_across_ranks(contrastive_loss, embeddings, labels, margin, metric=metric, reduction=reduction,
                                              return_stats=return_stats, ref_embeddings=ref_embeddings,
                                              ref_labels=ref_labels, ref_self_index=ref_self_index)
    return _fused_loss("contrastive_loss", embeddings, labels, margin, metric, reduction, REDUCTIONS,
                       return_stats, ref_embeddings, ref_labels, ref_self_index)


def _contrastive_op(embeddings, labels, margin, code):
    # When a gradient will be wanted, the forward computes it in the same pass (the backward is
    # then a scaling): 1.5 GEMMs of N x N x D instead of 2. Without one it stays a forward.
    if torch.is_grad_enabled() and embeddings.requires_grad:
        return ops.contrastive_loss_with_grad(embeddings, labels, margin, code)[:3]
    return ops.contrastive_loss(embeddings, labels, margin, code)


def pml_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    *,
    metric: Metric = "euclidean",
    normalize_embeddings: bool = True,
) -> torch.Tensor:
    """pytorch-metric-learning's ``ContrastiveLoss``: linear hinges over all in-batch pairs.

    ``relu(d - pos_margin)`` over pairs of the same label and ``relu(neg_margin - d)`` over
    pairs of different labels; each part is divided by its number of terms > 0 (a part without
    one is 0) and the two parts are added. This is ``losses.ContrastiveLoss(pos_margin,
    neg_margin)`` of pytorch-metric-learning with its default ``AvgNonZeroReducer``: pml takes
    ordered pairs (i, j), i != j, which counts every pair twice in both a part's sum and its
    count, so its means equal these over pairs i < j. With ``normalize_embeddings=True`` (as
    pml's default ``LpDistance``) the rows are L2-normalised first
    (``torch.nn.functional.normalize``); ``False`` matches
    ``LpDistance(normalize_embeddings=False)`` and uses the embeddings as given.
    ``metric="squared_euclidean"`` matches ``LpDistance(power=2)``; pml's ``CosineSimilarity``
    with margins (p, n) is ``metric="cosine"`` with margins (1 - p, 1 - n). Unlike pml, a NaN
    term is not dropped by the "> 0" filter: a NaN embedding gives a NaN loss.

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        pos_margin: Distance below which a positive pair costs nothing, a finite number >= 0.
        neg_margin: Distance beyond which a negative pair costs nothing, a finite number >= 0.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        normalize_embeddings: L2-normalise the rows first, as pml's default distance.

    Shapes:
        embeddings: (N, D); labels: (N,); loss: ().

    Returns:
        The loss (0-d) in the dtype of ``embeddings``. With no term > 0 it is 0, still
        attached to the graph.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, a negative or non-finite margin, or
            an unknown ``metric``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> tc.pml_contrastive_loss(embeddings, labels, 0.5, 3.5, normalize_embeddings=False)
        tensor(0.9189)
    """
    code = _check_batch(embeddings, labels, metric)
    pos_margin = v.check_margin(pos_margin, "pos_margin")
    neg_margin = v.check_margin(neg_margin, "neg_margin")
    x = torch.nn.functional.normalize(embeddings, p=2, dim=1) if normalize_embeddings else embeddings
    pos_sum, pos_nonzero, neg_sum, neg_nonzero = ops.contrastive_hinge_loss(x, labels, pos_margin, neg_margin, code)
    loss = (pos_sum / pos_nonzero.clamp_min(1).to(pos_sum.dtype)
            + neg_sum / neg_nonzero.clamp_min(1).to(neg_sum.dtype))
    return loss.to(result_dtype(embeddings))


def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: Strategy = "batch_hard",
    metric: Metric = "euclidean",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_self_index: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index triplets (anchor, positive, negative) chosen by a mining strategy.

    The index-tuple format pytorch-metric-learning's losses accept (``indices_tuple``). Not
    differentiable (computed under ``torch.no_grad()``).

    Args:
        embeddings: Floating point embeddings.
        labels: Integer class labels (any integer dtype, any values), on the device of
            ``embeddings``.
        strategy: ``"batch_hard"`` (one triplet per valid anchor: its hardest positive and
            negative), ``"batch_all"`` (every valid triplet) or ``"semi_hard"`` (per positive
            pair, the negative the semi-hard loss uses).
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        ref_embeddings: Optional reference set: positives and negatives are taken from its
            rows (with ``ref_labels``) instead of the batch; same dtype, device and feature
            size as ``embeddings``. Gradients flow to it when it requires grad.
        ref_labels: Integer labels of ``ref_embeddings``; given together with it.
        ref_self_index: Which reference row is each anchor itself (never its own positive):
            None (no anchor is in the reference set), an int k (anchor i is reference row
            k + i) or an integer (N,) tensor with -1 for "not in the set".

    Shapes:
        embeddings: (N, D); labels: (N,); ref_embeddings: (M, D); ref_labels: (M,); each returned tensor: (T,), T depending on the data.

    Returns:
        (anchor_idx, positive_idx, negative_idx): int64, on the device of ``embeddings``, sorted
        by (anchor, positive, negative); with a reference set positive_idx and negative_idx
        index it.

    Raises:
        TypeError: ``embeddings`` is not floating point or ``labels`` not integer.
        ValueError: Wrong dimensions, lengths or devices, or an unknown ``strategy`` or
            ``metric``.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> tc.mine_triplets(embeddings, torch.tensor([0, 0, 1, 1]), strategy="batch_hard")
        (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 3, 0, 1]))
    """
    code = _check_batch(embeddings, labels, metric)
    v.check_choice(strategy, "strategy", STRATEGIES)
    ref = v.check_reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    if ref is not None:
        v.check_triplets_fit(labels, strategy, ref[1], ref[2])
        with torch.no_grad():
            return tuple(ops.mine_triplets_ref(embeddings, labels, *ref, STRATEGIES[strategy], code))
    v.check_triplets_fit(labels, strategy)
    with torch.no_grad():
        return tuple(ops.mine_triplets(embeddings, labels, STRATEGIES[strategy], code))
