"""nn.Module losses taking (embeddings, labels): TripletLoss (batch hard, batch all, semi hard)
and ContrastiveLoss, configured once in the constructor like torch.nn's losses.

Example:
    >>> import torch
    >>> import triplet_cuda as tc
    >>> criterion = tc.TripletLoss(margin=2.5, mining="batch_hard")
    >>> criterion
    TripletLoss(margin=2.5, mining='batch_hard', metric='euclidean', soft_margin=False, reduction='mean', return_stats=False)
    >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]], requires_grad=True)
    >>> loss = criterion(embeddings, torch.tensor([0, 0, 1, 1]))
    >>> loss.backward()
    >>> loss.item()
    0.5
    >>> embeddings.grad
    tensor([[ 0.5000, -0.5000],
            [ 0.5000,  0.5000],
            [-0.5000, -0.5000],
            [-0.5000,  0.5000]])
"""
from __future__ import annotations

from typing import Literal

import torch

from . import _validation as v
from . import functional as F
from ._ops import METRICS
from ._types import TripletStats
from .functional import BatchHardReduction, Metric, Reduction

__all__ = ["ContrastiveLoss", "PMLContrastiveLoss", "TripletLoss"]

Mining = Literal["batch_hard", "batch_all", "semi_hard"]
"""A mining strategy of TripletLoss."""

# mining -> (loss function, default reduction, allowed reductions)
_MINING = {
    "batch_hard": (F.batch_hard_triplet_loss, "mean", F.BATCH_HARD_REDUCTIONS),
    "batch_all": (F.batch_all_triplet_loss, "mean_nonzero", F.REDUCTIONS),
    "semi_hard": (F.semi_hard_triplet_loss, "mean", F.REDUCTIONS),
}


class TripletLoss(torch.nn.Module):
    """Triplet loss with in-batch mining; forward(embeddings, labels) -> loss.

    The module form of batch_hard_triplet_loss, batch_all_triplet_loss and
    semi_hard_triplet_loss (see them for the exact definitions). It has no parameters or
    buffers.

    Args:
        margin: The margin, a finite number.
        mining: ``"batch_hard"`` (per anchor the hardest positive and negative),
            ``"batch_all"`` (every valid triplet) or ``"semi_hard"`` (per positive pair the
            nearest negative farther than the positive, FaceNet).
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        soft_margin: ``softplus(d_ap - d_an)`` instead of the hinge; only with
            ``mining="batch_hard"``.
        reduction: ``"mean"``, ``"mean_nonzero"``, ``"sum"``, or (batch hard) ``"none"``; None
            takes the mining's default: ``"mean"`` for batch_hard and semi_hard,
            ``"mean_nonzero"`` for batch_all.
        return_stats: forward returns ``(loss, TripletStats)`` instead of the loss; the
            TripletStats (num_valid, num_positive, fraction_positive) are 0-d tensors to log.
        gather_across_ranks: Under torch.distributed, the loss of every rank's batch together
            (this rank's anchors against all ranks' embeddings; see triplet_cuda.distributed).

    Shapes:
        embeddings: (N, D) floating point; labels: (N,) integer; loss: (), or (N,) with
        ``reduction="none"``.

    Raises:
        ValueError: An unknown ``mining``, ``metric`` or ``reduction``, a non-finite
            ``margin``, or ``soft_margin`` without batch_hard mining. forward raises what the
            functional losses raise for bad embeddings or labels.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> criterion = tc.TripletLoss(margin=2.5, mining="semi_hard", return_stats=True)
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> loss, stats = criterion(embeddings, torch.tensor([0, 0, 1, 1]))
        >>> loss, stats.num_positive
        (tensor(0.5000), tensor(4))
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: Mining = "batch_hard",
        metric: Metric = "euclidean",
        soft_margin: bool = False,
        reduction: BatchHardReduction | None = None,
        return_stats: bool = False,
        gather_across_ranks: bool = False,
    ) -> None:
        super().__init__()
        v.check_choice(mining, "mining", _MINING)
        v.check_choice(metric, "metric", METRICS)
        if soft_margin and mining != "batch_hard":
            raise ValueError(f"soft_margin is only defined for mining='batch_hard', got mining={mining!r}")
        self.margin = v.check_margin(margin)
        self.mining = mining
        self.metric = metric
        self.soft_margin = bool(soft_margin)
        if reduction is not None:
            v.check_choice(reduction, "reduction", _MINING[mining][2])
        self.reduction = _MINING[mining][1] if reduction is None else reduction
        self.return_stats = bool(return_stats)
        self.gather_across_ranks = bool(gather_across_ranks)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_self_index: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
        """The loss of a batch (see the class docstring).

        Args:
            embeddings: (N, D) floating point embeddings (the anchors).
            labels: (N,) integer class labels.
            ref_embeddings: Optional (M, D) reference set the positives and negatives are
                taken from (with ``ref_labels`` (M,)); gradients flow to it when it requires
                grad.
            ref_labels: (M,) integer labels of ``ref_embeddings``; given together with it.
            ref_self_index: Which reference row is each anchor itself: None (none), an int k
                (anchor i is reference row k + i) or an integer (N,) tensor, -1 for none.

        Returns:
            The loss, or ``(loss, TripletStats)`` when the module was made with
            ``return_stats=True``.
        """
        fn = _MINING[self.mining][0]
        kwargs = {"soft_margin": self.soft_margin} if self.mining == "batch_hard" else {}
        return fn(embeddings, labels, self.margin, metric=self.metric, reduction=self.reduction,
                  return_stats=self.return_stats, gather_across_ranks=self.gather_across_ranks, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                  ref_self_index=ref_self_index, **kwargs)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mining={self.mining!r}, metric={self.metric!r}, "
                f"soft_margin={self.soft_margin}, reduction={self.reduction!r}, return_stats={self.return_stats}"
                + (", gather_across_ranks=True" if self.gather_across_ranks else ""))


class ContrastiveLoss(torch.nn.Module):
    """Contrastive loss over all in-batch pairs; forward(embeddings, labels) -> loss.

    The module form of contrastive_loss: over unordered pairs i < j, ``d^2`` for the same
    label and ``relu(margin - d)^2`` otherwise. It has no parameters or buffers.

    Args:
        margin: The margin, a finite number.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        reduction: ``"mean"`` (over pairs), ``"mean_nonzero"`` (over pairs with a loss > 0) or
            ``"sum"``.
        return_stats: forward returns ``(loss, TripletStats)`` instead of the loss (num_valid:
            pairs, num_positive: pairs with a loss > 0).
        gather_across_ranks: Under torch.distributed, the loss of every rank's batch together
            (this rank's anchors against all ranks' embeddings; see triplet_cuda.distributed).

    Shapes:
        embeddings: (N, D) floating point; labels: (N,) integer; loss: ().

    Raises:
        ValueError: An unknown ``metric`` or ``reduction`` or a non-finite ``margin``. forward
            raises what contrastive_loss raises for bad embeddings or labels.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> criterion = tc.ContrastiveLoss(margin=1.0)
        >>> criterion
        ContrastiveLoss(margin=1.0, metric='euclidean', reduction='mean', return_stats=False)
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> criterion(embeddings, torch.tensor([0, 0, 1, 1]))
        tensor(0.3333)
    """

    def __init__(
        self,
        margin: float = 1.0,
        metric: Metric = "euclidean",
        reduction: Reduction = "mean",
        return_stats: bool = False,
        gather_across_ranks: bool = False,
    ) -> None:
        super().__init__()
        v.check_choice(metric, "metric", METRICS)
        v.check_choice(reduction, "reduction", F.REDUCTIONS)
        self.margin = v.check_margin(margin)
        self.metric = metric
        self.reduction = reduction
        self.return_stats = bool(return_stats)
        self.gather_across_ranks = bool(gather_across_ranks)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_self_index: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
        """The loss of a batch (see the class docstring).

        Args:
            embeddings: (N, D) floating point embeddings (the anchors).
            labels: (N,) integer class labels.
            ref_embeddings: Optional (M, D) reference set the positives and negatives are
                taken from (with ``ref_labels`` (M,)); gradients flow to it when it requires
                grad.
            ref_labels: (M,) integer labels of ``ref_embeddings``; given together with it.
            ref_self_index: Which reference row is each anchor itself: None (none), an int k
                (anchor i is reference row k + i) or an integer (N,) tensor, -1 for none.

        Returns:
            The loss, or ``(loss, TripletStats)`` when the module was made with
            ``return_stats=True``.
        """
        return F.contrastive_loss(embeddings, labels, self.margin, metric=self.metric, reduction=self.reduction,
                                  return_stats=self.return_stats, gather_across_ranks=self.gather_across_ranks, ref_embeddings=ref_embeddings,
                                  ref_labels=ref_labels, ref_self_index=ref_self_index)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, metric={self.metric!r}, reduction={self.reduction!r}, "
                f"return_stats={self.return_stats}" + (", gather_across_ranks=True" if self.gather_across_ranks else ""))


class PMLContrastiveLoss(torch.nn.Module):
    """pytorch-metric-learning's ContrastiveLoss; forward(embeddings, labels) -> loss.

    The module form of pml_contrastive_loss, a drop-in for pml's
    ``losses.ContrastiveLoss(pos_margin, neg_margin)`` with its default distance and reducer:
    ``relu(d - pos_margin)`` over positive pairs and ``relu(neg_margin - d)`` over negative
    pairs, each part averaged over its terms > 0, the parts added; rows L2-normalised first
    unless ``normalize_embeddings=False``. It has no parameters or buffers.

    Args:
        pos_margin: A finite number >= 0.
        neg_margin: A finite number >= 0.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        normalize_embeddings: L2-normalise the rows first, as pml's default ``LpDistance``.

    Shapes:
        embeddings: (N, D) floating point; labels: (N,) integer; loss: ().

    Raises:
        ValueError: An unknown ``metric`` or a negative or non-finite margin. forward raises
            what pml_contrastive_loss raises for bad embeddings or labels.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> criterion = tc.PMLContrastiveLoss(pos_margin=0.5, neg_margin=3.5, normalize_embeddings=False)
        >>> criterion
        PMLContrastiveLoss(pos_margin=0.5, neg_margin=3.5, metric='euclidean', normalize_embeddings=False)
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
        >>> criterion(embeddings, torch.tensor([0, 0, 1, 1]))
        tensor(0.9189)
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        metric: Metric = "euclidean",
        normalize_embeddings: bool = True,
    ) -> None:
        super().__init__()
        v.check_choice(metric, "metric", METRICS)
        self.pos_margin = v.check_margin(pos_margin, "pos_margin")
        self.neg_margin = v.check_margin(neg_margin, "neg_margin")
        self.metric = metric
        self.normalize_embeddings = bool(normalize_embeddings)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a batch (see the class docstring).

        Args:
            embeddings: (N, D) floating point embeddings.
            labels: (N,) integer class labels.

        Returns:
            The loss, 0-d.
        """
        return F.pml_contrastive_loss(embeddings, labels, self.pos_margin, self.neg_margin, metric=self.metric,
                                      normalize_embeddings=self.normalize_embeddings)

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, metric={self.metric!r}, "
                f"normalize_embeddings={self.normalize_embeddings}")
