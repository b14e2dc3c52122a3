"""Mining across ranks on torch.distributed: each rank's anchors against the global batch.

With data parallel training (DistributedDataParallel, one process per GPU) each rank holds a
shard of the batch. ``gather_across_ranks=True`` on a loss (tc.batch_hard_triplet_loss and the
others, tc.TripletLoss, tc.ContrastiveLoss), or :func:`loss_across_ranks`, makes the loss that
of the concatenated global batch:

1. :func:`gather_batch` all-gathers the embeddings (with autograd) and the labels of every rank
   with torch.distributed's collectives (NCCL on GPUs, gloo on CPU); shards may have different
   sizes (the sizes are gathered first, the shards padded to the largest and sliced back).
2. The rank's LOCAL anchors are mined against the GLOBAL batch with the query-vs-reference
   kernels (``ref_self_index`` = the rank's offset in the global batch, so an anchor is never
   its own positive): each rank computes its share of the loss, N_local x N_global distances.
3. The counts behind "mean" / "mean_nonzero" (valid terms, terms > 0) and the loss sums are
   all-reduced, so every rank divides by the GLOBAL count and returns the loss VALUE of the
   global batch (the same on every rank, for logging).
4. The gradient: the rank's loss is built as ``world_size * local_sum / global_count`` (plus a
   detached constant that makes its value the global loss), and the gather's backward sums,
   over the ranks, the gradients that reach each rank's rows. So each rank's embeddings get
   ``world_size`` times the gradient of the global loss, which DistributedDataParallel's
   averaging over ``world_size`` ranks divides back: training equals single-process training
   on the concatenated batch (up to floating-point summation order).

Rules: every rank must call the loss (and its backward) the same number of times, as with any
collective. The reduced loss values are the global ones; with ``reduction="none"`` (batch hard)
the result is the per-anchor vector of the LOCAL anchors against the global batch, not scaled
(``return_stats`` still gives the global counts). The contrastive loss against a reference set
sums ordered pairs, so the ranks together count every pair twice: the sum is halved and the
counts too, which gives exactly the single-process loss over pairs i < j. Without an
initialised process group ``gather_across_ranks=True`` is an error (never a silent local loss).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from ._types import TripletStats

__all__ = ["GlobalBatch", "all_gather_rows", "gather_batch", "loss_across_ranks"]


class GlobalBatch(NamedTuple):
    """The batch of every rank, concatenated in rank order (what :func:`gather_batch` returns).

    Attributes:
        embeddings: (N_global, D) every rank's embeddings, differentiable (the gradient that
            reaches the rows of another rank is sent back to it in the backward pass).
        labels: (N_global,) int64 labels.
        offset: The row of this rank's first embedding in the global batch (the
            ``ref_self_index`` of its anchors).
        sizes: The number of rows of each rank, in rank order.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    offset: int
    sizes: tuple[int, ...]


def _check_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised torch.distributed process group (torch.distributed.init_process_group, "
            f"e.g. by torchrun or DistributedDataParallel's launcher); none is initialised"
        )


def _gather_sizes(n: int, device: torch.device, group) -> tuple[int, ...]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return tuple(int(s.item()) for s in sizes)


def _gather_padded(x: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
    """All-gather rows of x (this rank's sizes[rank] rows) padded to max(sizes); concatenate the
    real rows in rank order."""
    largest = max(sizes)
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Forward: the rows of every rank, concatenated. Backward: each rank receives the sum over
    the ranks of the gradient of its own rows (reduce-scatter on NCCL; all-reduce elsewhere)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.n = sizes, group, x.shape[0]
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, group = ctx.sizes, ctx.group
        rank, largest = dist.get_rank(group), max(sizes)
        padded = grad.new_zeros((len(sizes) * largest, *grad.shape[1:]))
        start = 0
        for r, s in enumerate(sizes):
            padded[r * largest: r * largest + s] = grad[start: start + s]
            start += s
        if dist.get_backend(group) == dist.Backend.NCCL:
            mine = grad.new_empty((largest, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, padded, group=group)
        else:  # gloo has no reduce-scatter: all-reduce the whole buffer and keep this rank's rows
            dist.all_reduce(padded, group=group)
            mine = padded[rank * largest: (rank + 1) * largest]
        return mine[: ctx.n], None, None


def all_gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """All-gather the rows of a tensor over the ranks, differentiably; shards may differ in size.

    Args:
        x: This rank's rows, (n_rank, ...); the same trailing shape and dtype on every rank, on
            the device the backend needs (CUDA for NCCL).
        group: The process group (None: the default group).

    Shapes:
        x: (n_rank, ...); returns (sum of n_rank over the ranks, ...).

    Returns:
        (gathered, offset): the rows of every rank in rank order, and the row at which this
        rank's rows start. The backward pass sends each rank the sum over the ranks of the
        gradient of its rows.

    Raises:
        RuntimeError: No initialised process group.

    Example:
        >>> import torch, torch.distributed as dist, tempfile, os
        >>> import triplet_cuda as tc
        >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "f"),
        ...                         rank=0, world_size=1)
        >>> tc.distributed.all_gather_rows(torch.ones(2, 3))
        (tensor([[1., 1., 1.],
                [1., 1., 1.]]), 0)
        >>> dist.destroy_process_group()
    """
    _check_initialized("all_gather_rows")
    sizes = _gather_sizes(x.shape[0], x.device, group)
    offset = sum(sizes[: dist.get_rank(group)])
    return _AllGatherRows.apply(x, sizes, group), offset


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, group=None) -> GlobalBatch:
    """All-gather the embeddings (differentiably) and labels of every rank (uneven sizes work).

    Use it to mine across ranks with any function that takes a reference set, e.g.
    ``g = gather_batch(emb, labels); tc.mine_triplets(emb, labels, ref_embeddings=g.embeddings,
    ref_labels=g.labels, ref_self_index=g.offset)``.

    Args:
        embeddings: This rank's embeddings, (n_rank, D), the same D and dtype on every rank.
        labels: This rank's integer labels, (n_rank,).
        group: The process group (None: the default group).

    Shapes:
        embeddings: (n_rank, D); labels: (n_rank,); the result: (N_global, D) and (N_global,).

    Returns:
        GlobalBatch(embeddings, labels (int64), offset, sizes).

    Raises:
        RuntimeError: No initialised process group.
        ValueError: ``labels`` does not have one entry per embedding.

    Example:
        >>> import torch, torch.distributed as dist, tempfile, os
        >>> import triplet_cuda as tc
        >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "f"),
        ...                         rank=0, world_size=1)
        >>> g = tc.distributed.gather_batch(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
        >>> g.labels, g.offset, g.sizes
        (tensor([0, 1, 1]), 0, (3,))
        >>> dist.destroy_process_group()
    """
    _check_initialized("gather_batch")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be a 1-D tensor with one entry per embedding (length {embeddings.shape[0]}), "
                         f"got shape {tuple(labels.shape)}")
    sizes = _gather_sizes(embeddings.shape[0], embeddings.device, group)
    offset = sum(sizes[: dist.get_rank(group)])
    all_embeddings = _AllGatherRows.apply(embeddings, sizes, group)
    with torch.no_grad():
        all_labels = _gather_padded(labels.to(device=embeddings.device, dtype=torch.int64), sizes, group)
    return GlobalBatch(all_embeddings, all_labels, offset, sizes)


def _is_pair_loss(loss_fn) -> bool:
    from . import functional, reference

    return loss_fn in (functional.contrastive_loss, reference.contrastive_loss)


def loss_across_ranks(
    loss_fn: Callable[..., Any],
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *args: Any,
    reduction: str = "mean",
    return_stats: bool = False,
    ordered_pairs: bool | None = None,
    group=None,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
    """A loss of the global batch from each rank's shard: local anchors against every rank's rows.

    What ``gather_across_ranks=True`` does (see the module docstring for the scaling that makes
    DistributedDataParallel training equal single-process training on the concatenated batch).

    Args:
        loss_fn: A loss function taking ``(embeddings, labels, *args, reduction=...,
            return_stats=True, ref_embeddings=..., ref_labels=..., ref_self_index=...,
            **kwargs)`` and returning ``(loss, TripletStats)``: tc.batch_hard_triplet_loss,
            batch_all_triplet_loss, semi_hard_triplet_loss, contrastive_loss (or their
            tc.reference versions).
        embeddings: This rank's embeddings (n_rank, D).
        labels: This rank's labels (n_rank,).
        *args: Passed on to ``loss_fn`` (e.g. the margin).
        reduction: ``"mean"``, ``"mean_nonzero"`` or ``"sum"`` over the global batch, or
            ``"none"`` (batch hard: the local anchors' terms, unscaled).
        return_stats: Also return the global TripletStats.
        ordered_pairs: Whether ``loss_fn`` sums ordered pairs against a reference set, so that
            the ranks together count each pair twice (None: True for the contrastive losses).
        group: The process group (None: the default group).
        **kwargs: Passed on to ``loss_fn`` (e.g. ``metric``).

    Shapes:
        embeddings: (n_rank, D); labels: (n_rank,); loss: (), or (n_rank,) with
        ``reduction="none"``.

    Returns:
        The loss of the global batch (the same value on every rank), or ``(loss, stats)``.

    Raises:
        RuntimeError: No initialised process group.
        ValueError: A reference set was passed (not supported across ranks), or what
            ``loss_fn`` raises.

    Example:
        >>> import torch, torch.distributed as dist, tempfile, os
        >>> import triplet_cuda as tc
        >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "f"),
        ...                         rank=0, world_size=1)
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> tc.distributed.loss_across_ranks(tc.batch_hard_triplet_loss, embeddings, torch.tensor([0, 0, 1, 1]), 2.5)
        tensor(0.5000)
        >>> dist.destroy_process_group()
    """
    _check_initialized("gather_across_ranks=True")
    if reduction not in ("mean", "mean_nonzero", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'mean_nonzero', 'sum', 'none', got {reduction!r}")
    for name in ("ref_embeddings", "ref_labels", "ref_self_index"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} cannot be combined with gather_across_ranks=True: the reference set is the "
                             f"global batch")
        kwargs.pop(name, None)
    world = dist.get_world_size(group)
    g = gather_batch(embeddings, labels, group)
    local_reduction = "none" if reduction == "none" else "sum"
    out, stats = loss_fn(embeddings, labels, *args, reduction=local_reduction, return_stats=True,
                         ref_embeddings=g.embeddings, ref_labels=g.labels, ref_self_index=g.offset, **kwargs)
    pairs = 2 if (_is_pair_loss(loss_fn) if ordered_pairs is None else ordered_pairs) else 1
    # one all-reduce: [local sum, valid terms, terms > 0] in float64 (counts are exact below 2^53)
    local_sum = out.detach().double().sum() if reduction == "none" else out.detach().double()
    totals = torch.stack([local_sum, stats.num_valid.double(), stats.num_positive.double()])
    dist.all_reduce(totals, group=group)
    total_sum, num_valid, num_positive = totals.unbind()
    num_valid, num_positive = (num_valid / pairs).round().long(), (num_positive / pairs).round().long()
    global_stats = TripletStats(num_valid, num_positive, num_positive.double() / num_valid.clamp_min(1).double())
    if reduction == "none":
        return (out, global_stats) if return_stats else out
    if reduction == "mean":
        count = num_valid.clamp_min(1).double() * pairs
    elif reduction == "mean_nonzero":
        count = num_positive.clamp_min(1).double() * pairs
    else:  # "sum"
        count = torch.full_like(total_sum, float(pairs))
    scaled = out.double() * (world / count)  # its gradient: world_size x the global loss's
    loss = scaled + (total_sum / count - scaled).detach()  # its value: the global loss
    loss = loss.to(out.dtype)
    return (loss, global_stats) if return_stats else loss
