"""nn.Module wrappers: drop-in losses taking (embeddings, labels)."""
from __future__ import annotations

import torch

from . import _validation as v
from . import functional as F
from ._ops import METRICS

# mining -> (loss function, default reduction, allowed reductions)
_MINING = {
    "batch_hard": (F.batch_hard_triplet_loss, "mean", F.BATCH_HARD_REDUCTIONS),
    "batch_all": (F.batch_all_triplet_loss, "mean_nonzero", F.REDUCTIONS),
    "semi_hard": (F.semi_hard_triplet_loss, "mean", F.REDUCTIONS),
}


class TripletLoss(torch.nn.Module):
    """Triplet loss with in-batch mining. reduction=None takes the mining's default
    ("mean" for batch_hard and semi_hard, "mean_nonzero" for batch_all)."""

    def __init__(self, margin=0.2, mining="batch_hard", metric="euclidean", soft_margin=False, reduction=None):
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

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fn = _MINING[self.mining][0]
        kwargs = {"soft_margin": self.soft_margin} if self.mining == "batch_hard" else {}
        return fn(embeddings, labels, self.margin, metric=self.metric, reduction=self.reduction, **kwargs)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mining={self.mining!r}, metric={self.metric!r}, "
                f"soft_margin={self.soft_margin}, reduction={self.reduction!r}")


class ContrastiveLoss(torch.nn.Module):
    """Contrastive loss over all in-batch pairs."""

    def __init__(self, margin=1.0, metric="euclidean", reduction="mean"):
        super().__init__()
        v.check_choice(metric, "metric", METRICS)
        v.check_choice(reduction, "reduction", F.REDUCTIONS)
        self.margin = v.check_margin(margin)
        self.metric = metric
        self.reduction = reduction

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.contrastive_loss(embeddings, labels, self.margin, metric=self.metric, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}, reduction={self.reduction!r}"
