"""The naive eager baselines: the classic mask recipes, ported from the TensorFlow originals.

Distances come from the Gram matrix (||a||^2 - 2 a.b + ||b||^2, one N x N GEMM), mining
and losses from dense boolean masks, exactly as in Olivier Moindrot's "Triplet Loss and
Online Triplet Mining in TensorFlow" (batch hard, batch all: an N x N x N tensor of
triplets) and TensorFlow Addons' ``triplet_semihard_loss`` (semi hard: the distance matrix
tiled to N^2 x N). They are baselines, so they must be right: they follow the semantics of
``triplet_cuda.reference`` (the same defaults: margin, reduction, invalid anchors left out),
which tests/test_benchmarks.py checks. (benchmarks/naive.py re-exports this module.)

Every function has the signature ``(embeddings, labels, margin, *, metric) -> 0-d loss``.
"""
from __future__ import annotations

import torch

LOSSES = ("batch_hard", "batch_all", "semi_hard", "contrastive")
DEFAULT_MARGIN = {"batch_hard": 0.2, "batch_all": 0.2, "semi_hard": 0.2, "contrastive": 1.0}


def pairwise_distances(x: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(N, D) -> (N, N) distances through the Gram matrix (Moindrot's ``_pairwise_distances``)."""
    dot = x @ x.T
    if metric == "cosine":
        norm = torch.diagonal(dot).clamp_min(0).sqrt().clamp_min(1e-8)
        return 1 - dot / (norm[:, None] * norm[None, :])
    square_norm = torch.diagonal(dot)
    d = square_norm[None, :] - 2.0 * dot + square_norm[:, None]
    d = torch.relu(d)  # rounding can make it slightly negative
    if metric == "squared_euclidean":
        return d
    if metric != "euclidean":
        raise ValueError(f"unknown metric {metric!r}")
    # the gradient of sqrt is infinite at 0: add a tiny epsilon where d == 0, then zero it again
    mask = (d == 0.0).to(d.dtype)
    d = torch.sqrt(d + mask * 1e-16)
    return d * (1.0 - mask)


def _masks(labels: torch.Tensor):
    """(same label, positive = same label and i != j, negative = different label), (N, N) bool."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same, same & ~eye, ~same


def batch_hard_triplet_loss(embeddings, labels, margin=0.2, *, metric="euclidean"):
    """Moindrot's ``batch_hard_triplet_loss``: mean over anchors with a positive and a negative."""
    d = pairwise_distances(embeddings, metric)
    _, pos, neg = _masks(labels)
    # hardest positive: the largest d(a, p) (d >= 0, so masking with 0 is enough)
    hardest_positive = (pos.to(d.dtype) * d).max(1).values
    # hardest negative: add the row maximum to the non-negatives, then take the minimum
    max_an = d.max(1, keepdim=True).values
    hardest_negative = (d + max_an * (~neg).to(d.dtype)).min(1).values
    valid = (pos.any(1) & neg.any(1)).to(d.dtype)
    terms = torch.relu(hardest_positive - hardest_negative + margin) * valid
    return terms.sum() / valid.sum().clamp_min(1)


def _triplet_mask(labels: torch.Tensor) -> torch.Tensor:
    """Moindrot's ``_get_triplet_mask``: (N, N, N) bool, True for valid (anchor, positive, negative)."""
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    not_equal = ~eye
    distinct = not_equal[:, :, None] & not_equal[:, None, :] & not_equal[None, :, :]
    label_equal = labels[None, :] == labels[:, None]
    valid_labels = label_equal[:, :, None] & ~label_equal[:, None, :]
    return distinct & valid_labels


def batch_all_triplet_loss(embeddings, labels, margin=0.2, *, metric="euclidean"):
    """Moindrot's ``batch_all_triplet_loss``: every valid triplet in an N x N x N tensor, averaged
    over the triplets with a positive loss ("mean_nonzero")."""
    d = pairwise_distances(embeddings, metric)
    triplet_loss = d[:, :, None] - d[:, None, :] + margin  # (anchor, positive, negative)
    mask = _triplet_mask(labels)
    triplet_loss = torch.relu(mask.to(d.dtype) * triplet_loss)
    num_positive = (triplet_loss > 0).sum()
    return triplet_loss.sum() / num_positive.clamp_min(1).to(d.dtype)


def _masked_maximum(data, mask, dim=1):
    """TF Addons' ``_masked_maximum``: the maximum of data over mask, along dim (keepdim)."""
    axis_minimums = data.min(dim, keepdim=True).values
    return ((data - axis_minimums) * mask).max(dim, keepdim=True).values + axis_minimums


def _masked_minimum(data, mask, dim=1):
    """TF Addons' ``_masked_minimum``: the minimum of data over mask, along dim (keepdim)."""
    axis_maximums = data.max(dim, keepdim=True).values
    return ((data - axis_maximums) * mask).min(dim, keepdim=True).values + axis_maximums


def semi_hard_triplet_loss(embeddings, labels, margin=0.2, *, metric="euclidean"):
    """TF Addons' ``triplet_semihard_loss``: for each (anchor, positive) the nearest negative
    farther than the positive, else the farthest negative; mean over the (anchor, positive)
    pairs of anchors that have a negative. The N x N distance matrix is tiled to (N^2, N)."""
    pdist = pairwise_distances(embeddings, metric)
    n = pdist.shape[0]
    adjacency = labels[:, None] == labels[None, :]
    adjacency_not = ~adjacency
    # row b * n + i of the tile holds anchor i's distances, compared with d(i, positive b)
    pdist_tile = pdist.repeat(n, 1)
    mask = adjacency_not.repeat(n, 1) & (pdist_tile > pdist.T.reshape(-1, 1))
    mask_f = mask.to(pdist.dtype)
    mask_final = (mask_f.sum(1, keepdim=True) > 0.0).reshape(n, n).T
    negatives_outside = _masked_minimum(pdist_tile, mask_f).reshape(n, n).T
    negatives_inside = _masked_maximum(pdist, adjacency_not.to(pdist.dtype)).repeat(1, n)
    semi_hard_negatives = torch.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist - semi_hard_negatives
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    mask_positives = (adjacency & ~eye & adjacency_not.any(1, keepdim=True)).to(pdist.dtype)
    return (torch.relu(loss_mat) * mask_positives).sum() / mask_positives.sum().clamp_min(1)


def contrastive_loss(embeddings, labels, margin=1.0, *, metric="euclidean"):
    """Hadsell et al. over unordered pairs i < j: d^2 for the same label, relu(margin - d)^2
    otherwise; mean over the pairs."""
    d = pairwise_distances(embeddings, metric)
    n = d.shape[0]
    same = labels[:, None] == labels[None, :]
    terms = torch.where(same, d.pow(2), torch.relu(margin - d).pow(2))
    upper = torch.ones(n, n, dtype=torch.bool, device=d.device).triu(1)
    terms = terms * upper.to(d.dtype)
    return terms.sum() / max(n * (n - 1) // 2, 1)


FUNCTIONS = {
    "batch_hard": batch_hard_triplet_loss,
    "batch_all": batch_all_triplet_loss,
    "semi_hard": semi_hard_triplet_loss,
    "contrastive": contrastive_loss,
}
