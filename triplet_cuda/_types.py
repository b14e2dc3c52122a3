"""Result types of the public API."""
from typing import NamedTuple

import torch


class HardMining(NamedTuple):
    """Batch-hard mining result, one entry per anchor.

    pos_dist, neg_dist: (N,) distances, in the dtype of the embeddings; 0 for invalid anchors.
    pos_idx, neg_idx: (N,) int64 indices of the hardest positive / negative; -1 for anchors
    without a positive or without a negative.
    """

    pos_dist: torch.Tensor
    pos_idx: torch.Tensor
    neg_dist: torch.Tensor
    neg_idx: torch.Tensor


class TripletStats(NamedTuple):
    """What to log during training, as 0-d tensors.

    num_valid: int64, valid terms (anchors for batch hard, (anchor, positive) pairs for semi
    hard, triplets for batch all, pairs for contrastive).
    num_positive: int64, valid terms with a loss > 0 (the "active" ones).
    fraction_positive: float64, num_positive / max(num_valid, 1).
    """

    num_valid: torch.Tensor
    num_positive: torch.Tensor
    fraction_positive: torch.Tensor
