"""triplet_cuda: fused triplet and contrastive losses with in-batch mining for PyTorch.

    import triplet_cuda as tc
    loss = tc.batch_hard_triplet_loss(embeddings, labels, margin=0.2)
"""
from . import metrics, reference
from ._loader import loaded_from
from ._types import HardMining, TripletStats
from .functional import (
    batch_all_triplet_loss,
    batch_hard_mine,
    batch_hard_triplet_loss,
    contrastive_loss,
    mine_triplets,
    pairwise_distance,
    semi_hard_triplet_loss,
)
from .modules import ContrastiveLoss, TripletLoss

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "HardMining",
    "TripletLoss",
    "TripletStats",
    "batch_all_triplet_loss",
    "batch_hard_mine",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "loaded_from",
    "metrics",
    "mine_triplets",
    "pairwise_distance",
    "reference",
    "semi_hard_triplet_loss",
]
