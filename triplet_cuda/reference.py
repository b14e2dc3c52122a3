"""Pure-PyTorch reference of every triplet_cuda op, written for clarity, not speed.

Everything here materialises the full N x N distance matrix (and N x N x N for
batch all and semi hard), exactly like the classic mask recipe. The tests check
the fused kernels against these functions; the benchmarks use them as the
"naive" baseline. Computations run in the dtype of the input: pass float64 for
a tight reference.
"""
from __future__ import annotations

import torch

from ._types import HardMining, TripletStats

COSINE_EPS = 1e-8


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, metric: str = "euclidean") -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) distances, from explicit differences (no Gram trick)."""
    y = x if y is None else y
    if metric == "cosine":
        xn = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(COSINE_EPS)
        yn = y / torch.linalg.vector_norm(y, dim=1, keepdim=True).clamp_min(COSINE_EPS)
        return 1 - xn @ yn.T
    diff = x[:, None, :] - y[None, :, :]
    if metric == "euclidean":
        return torch.linalg.vector_norm(diff, dim=-1)  # its gradient at 0 is 0
    if metric == "squared_euclidean":
        return diff.pow(2).sum(-1)
    raise ValueError(f"unknown metric {metric!r}")


def label_masks(labels: torch.Tensor):
    """(positive, negative) boolean (N, N) masks: positive excludes the diagonal."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def batch_hard_mine(embeddings, labels, metric="euclidean") -> HardMining:
    d = pairwise_distance(embeddings, metric=metric)
    pos, neg = label_masks(labels)
    valid = pos.any(1) & neg.any(1)
    # argmax/argmin return the first extreme value: ties go to the lowest index.
    pos_idx = d.masked_fill(~pos, float("-inf")).argmax(1)
    neg_idx = d.masked_fill(~neg, float("inf")).argmin(1)
    pos_dist = d.gather(1, pos_idx[:, None])[:, 0]
    neg_dist = d.gather(1, neg_idx[:, None])[:, 0]
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    minus_one = torch.full_like(pos_idx, -1)
    return HardMining(
        torch.where(valid, pos_dist, zero),
        torch.where(valid, pos_idx, minus_one),
        torch.where(valid, neg_dist, zero),
        torch.where(valid, neg_idx, minus_one),
    )


def _reduce(terms, valid, reduction):
    """terms and valid of one shape; invalid terms must already be 0."""
    num_valid = valid.sum()
    num_positive = ((terms > 0) & valid).sum()
    if reduction == "sum":
        loss = terms.sum()
    elif reduction == "mean":
        loss = terms.sum() / num_valid.clamp_min(1)
    elif reduction == "mean_nonzero":
        loss = terms.sum() / num_positive.clamp_min(1)
    elif reduction == "none":
        loss = terms
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    fraction = num_positive.double() / num_valid.clamp_min(1).double()
    return loss, TripletStats(num_valid, num_positive, fraction)


def batch_hard_triplet_loss(embeddings, labels, margin=0.2, metric="euclidean", soft_margin=False,
                            reduction="mean", return_stats=False):
    m = batch_hard_mine(embeddings, labels, metric)
    valid = m.pos_idx >= 0
    gap = m.pos_dist - m.neg_dist
    terms = torch.nn.functional.softplus(gap) if soft_margin else torch.relu(gap + margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    loss, stats = _reduce(terms, valid, reduction)
    return (loss, stats) if return_stats else loss


def batch_all_triplet_loss(embeddings, labels, margin=0.2, metric="euclidean", reduction="mean_nonzero",
                           return_stats=False):
    d = pairwise_distance(embeddings, metric=metric)
    pos, neg = label_masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]  # (anchor, positive, negative)
    terms = torch.relu(d[:, :, None] - d[:, None, :] + margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    loss, stats = _reduce(terms, valid, reduction)
    return (loss, stats) if return_stats else loss


def semi_hard_negatives(embeddings, labels, metric="euclidean"):
    """-> (d (N, N), valid pairs (N, N), selected negative index (N, N)) for every (a, p)."""
    d = pairwise_distance(embeddings, metric=metric)
    pos, neg = label_masks(labels)
    n = d.shape[0]
    d_ap = d[:, :, None]                       # (a, p, 1)
    d_an = d[:, None, :].expand(n, n, n)       # (a, p, n)
    outside = neg[:, None, :] & (d_an > d_ap)  # negatives farther than the positive
    has_outside = outside.any(-1)
    # nearest negative that is farther than the positive (ties: lowest index)
    idx_outside = d_an.masked_fill(~outside, float("inf")).argmin(-1)
    # otherwise the farthest negative (ties: lowest index)
    idx_inside = d.masked_fill(~neg, float("-inf")).argmax(-1)[:, None].expand(n, n)
    sel = torch.where(has_outside, idx_outside, idx_inside)
    valid = pos & neg.any(1)[:, None]
    return d, valid, sel


def semi_hard_triplet_loss(embeddings, labels, margin=0.2, metric="euclidean", reduction="mean",
                           return_stats=False):
    d, valid, sel = semi_hard_negatives(embeddings, labels, metric)
    d_an = d.gather(1, sel) if d.numel() else d
    terms = torch.relu(d - d_an + margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    loss, stats = _reduce(terms, valid, reduction)
    return (loss, stats) if return_stats else loss


def contrastive_loss(embeddings, labels, margin=1.0, metric="euclidean", reduction="mean", return_stats=False):
    n = labels.numel()
    d = pairwise_distance(embeddings, metric=metric)
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    dij = d[i, j]
    same = labels[i] == labels[j]
    terms = torch.where(same, dij.pow(2), torch.relu(margin - dij).pow(2))
    loss, stats = _reduce(terms, torch.ones_like(same), reduction)
    return (loss, stats) if return_stats else loss


def pml_contrastive_loss(embeddings, labels, pos_margin=0.0, neg_margin=1.0, metric="euclidean"):
    """pytorch-metric-learning's ContrastiveLoss (AvgNonZeroReducer) on the embeddings as given.

    Over pairs i < j: relu(d - pos_margin) for the same label, relu(neg_margin - d) otherwise;
    each part summed and divided by its number of terms > 0 (a part with none is 0), the two
    parts added. pml takes ordered pairs (i != j), which counts every pair twice in both sum
    and count: the same means. A NaN term is kept in the sum (pml's filter would drop it).
    """
    n = labels.numel()
    d = pairwise_distance(embeddings, metric=metric)
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    dij = d[i, j]
    same = labels[i] == labels[j]
    pos = torch.relu(dij[same] - pos_margin)
    neg = torch.relu(neg_margin - dij[~same])

    def avg_nonzero(t):
        return t.sum() / (t > 0).sum().clamp_min(1).to(t.dtype)

    return avg_nonzero(pos) + avg_nonzero(neg)


def mine_triplets(embeddings, labels, strategy="batch_hard", metric="euclidean"):
    """(anchor, positive, negative) int64 index tensors, sorted by (anchor, positive, negative)."""
    if strategy == "batch_hard":
        m = batch_hard_mine(embeddings, labels, metric)
        a = torch.nonzero(m.pos_idx >= 0)[:, 0]
        return a, m.pos_idx[a], m.neg_idx[a]
    pos, neg = label_masks(labels)
    if strategy == "batch_all":
        a, p, n = torch.nonzero(pos[:, :, None] & neg[:, None, :], as_tuple=True)
        return a, p, n
    if strategy == "semi_hard":
        _, valid, sel = semi_hard_negatives(embeddings, labels, metric)
        a, p = torch.nonzero(valid, as_tuple=True)
        return a, p, sel[a, p]
    raise ValueError(f"unknown strategy {strategy!r}")


def knn(query, ref, k, metric="euclidean", self_offset=-1):
    """Brute force k nearest neighbours: (N, k) distances and int64 indices into ref.

    Ascending distance, ties by the lowest index (a stable sort), NaN last; query row i skips
    ref row self_offset + i when self_offset >= 0; rows with fewer than k candidates are padded
    with +inf / -1.
    """
    d = pairwise_distance(query, ref, metric)
    n, m = d.shape
    idx = torch.arange(m, device=d.device).expand(n, m)
    if self_offset >= 0:
        keep = idx != (torch.arange(n, device=d.device) + self_offset)[:, None]
        d = d[keep].view(n, m - 1)
        idx = idx[keep].view(n, m - 1)
    d, order = torch.sort(d, dim=1, stable=True)  # NaN sorts after +inf
    idx = idx.gather(1, order)
    pad = k - d.shape[1]
    if pad > 0:
        d = torch.cat([d, d.new_full((n, pad), float("inf"))], 1)
        idx = torch.cat([idx, idx.new_full((n, pad), -1)], 1)
    return d[:, :k], idx[:, :k]


def _retrieval_setup(embeddings, labels, ref_embeddings, ref_labels, metric):
    """(query labels, neighbour labels sorted by distance (N, M'), relevant count R per query)."""
    if ref_embeddings is None:
        _, idx = knn(embeddings, embeddings, max(embeddings.shape[0] - 1, 0), metric, self_offset=0)
        ref_labels = labels
    else:
        _, idx = knn(embeddings, ref_embeddings, ref_embeddings.shape[0], metric)
    hits = ref_labels[idx] == labels[:, None]
    return hits, hits.sum(1)


def recall_at_k(embeddings, labels, k=(1, 5), ref_embeddings=None, ref_labels=None, metric="euclidean"):
    """Fraction of the queries that have a reference of their label among their k nearest
    references (the batch itself without the query when no reference set is given); queries
    without any reference of their label are left out (NaN when none is left)."""
    ks = (k,) if isinstance(k, int) else tuple(k)
    hits, r = _retrieval_setup(embeddings, labels, ref_embeddings, ref_labels, metric)
    has = r > 0
    out = {kk: hits[has, :kk].any(1).double().mean().item() if has.any() else float("nan") for kk in ks}
    return out[ks[0]] if isinstance(k, int) else out


def map_at_r(embeddings, labels, ref_embeddings=None, ref_labels=None, metric="euclidean"):
    """mAP@R (Musgrave et al. 2020): per query, R = its number of references of its label and
    AP@R = (1/R) sum_{i<=R} precision@i * relevant(i) over its R nearest; mean over the queries
    with R > 0 (NaN when none)."""
    hits, r = _retrieval_setup(embeddings, labels, ref_embeddings, ref_labels, metric)
    has = r > 0
    if not has.any():
        return float("nan")
    aps = []
    for row, rr in zip(hits[has].double(), r[has].tolist()):
        top = row[:rr]
        precision = top.cumsum(0) / torch.arange(1, rr + 1, dtype=torch.float64, device=row.device)
        aps.append((precision * top).sum() / rr)
    return torch.stack(aps).mean().item()
