"""Result types of the public API: HardMining (batch_hard_mine) and TripletStats (return_stats)."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["HardMining", "TripletStats"]


class HardMining(NamedTuple):
    """Batch-hard mining result of batch_hard_mine, one entry per anchor.

    Attributes:
        pos_dist: (N,) distance to the hardest (farthest) positive, in the dtype of the
            embeddings, differentiable; 0 for invalid anchors (without a positive or without a
            negative).
        pos_idx: (N,) int64 index of the hardest positive (ties: the lowest index); -1 for
            invalid anchors.
        neg_dist: (N,) distance to the hardest (nearest) negative, as pos_dist.
        neg_idx: (N,) int64 index of the hardest negative, as pos_idx.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> mined = tc.batch_hard_mine(torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0, 0, 1]))
        >>> mined.pos_idx, mined.neg_idx
        (tensor([ 1,  0, -1]), tensor([ 2,  2, -1]))
    """

    pos_dist: torch.Tensor
    pos_idx: torch.Tensor
    neg_dist: torch.Tensor
    neg_idx: torch.Tensor


class TripletStats(NamedTuple):
    """What to log during training (``return_stats=True``), as 0-d tensors.

    Attributes:
        num_valid: int64, valid terms (anchors for batch hard, (anchor, positive) pairs for
            semi hard, triplets for batch all, pairs for contrastive).
        num_positive: int64, valid terms with a loss > 0 (the "active" ones).
        fraction_positive: float64, num_positive / max(num_valid, 1).

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> x, labels = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0, 0, 1])
        >>> _, stats = tc.batch_all_triplet_loss(x, labels, margin=3.5, return_stats=True)
        >>> stats
        TripletStats(num_valid=tensor(2), num_positive=tensor(1), fraction_positive=tensor(0.5000, dtype=torch.float64))
    """

    num_valid: torch.Tensor
    num_positive: torch.Tensor
    fraction_positive: torch.Tensor
