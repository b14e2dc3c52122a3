"""Pure-PyTorch reference of every triplet_cuda op, written for clarity, not speed.

Everything here materialises the full N x N distance matrix (and N x N x N for
batch all and semi hard), exactly like the classic mask recipe. With a reference set
(`ref_embeddings` (M, D), `ref_labels` (M,), keyword-only) the anchors are the rows of
`embeddings` and the positives / negatives (contrastive: the pair partners) are reference
rows: the matrices are N x M (N x M x M), and `ref_self_index` says which reference row is
the anchor itself (never its own positive, nor a contrastive pair): None = no anchor is in
the reference set, an int k = anchor i is reference row k + i, an int64 (N,) tensor with -1
for "not in the set". Without a reference set the batch is the reference set and anchor i
is its row i, but the contrastive loss keeps its unordered pairs i < j (with a reference set
it sums ordered pairs (a, j), so the batch as its own reference set with self index 0 gives
twice the sum and the same mean). The tests check
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


def self_index_tensor(n: int, m: int, ref_self_index, device) -> torch.Tensor:
    """ref_self_index (None, int k or an int64 (N,) tensor, -1 = none) -> int64 (N,) tensor of
    the reference row that is each anchor itself, -1 where none."""
    if ref_self_index is None:
        return torch.full((n,), -1, dtype=torch.int64, device=device)
    if isinstance(ref_self_index, int):
        if ref_self_index < 0 or ref_self_index + n > m:
            raise ValueError(f"ref_self_index must satisfy 0 <= k and k + N <= M (N={n}, M={m}), got {ref_self_index}")
        return torch.arange(n, dtype=torch.int64, device=device) + ref_self_index
    idx = ref_self_index.to(device=device, dtype=torch.int64)
    if idx.shape != (n,) or bool(((idx < -1) | (idx >= m)).any()):
        raise ValueError(f"ref_self_index must be an int64 ({n},) tensor with values in [-1, {m}), got {ref_self_index}")
    return idx


def reference_set(embeddings, labels, ref_embeddings=None, ref_labels=None, ref_self_index=None):
    """-> (ref_embeddings (M, D), ref_labels (M,), self index (N,) int64): the batch itself with
    self index arange(N) when no reference set is given."""
    if (ref_embeddings is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"ref_embeddings and ref_labels go together: {missing} is missing")
    n = labels.numel()
    if ref_embeddings is None:
        if ref_self_index is not None:
            raise ValueError("ref_self_index needs a reference set (ref_embeddings, ref_labels)")
        return embeddings, labels, torch.arange(n, dtype=torch.int64, device=labels.device)
    return ref_embeddings, ref_labels, self_index_tensor(n, ref_labels.numel(), ref_self_index, labels.device)


def label_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None, self_index: torch.Tensor | None = None):
    """(positive, negative) boolean (N, M) masks of anchors `labels` (N,) against candidates
    `ref_labels` (M,) (default: labels itself): positive excludes each anchor's own row
    `self_index` (N,) (-1: none; default: the diagonal)."""
    if ref_labels is None:
        ref_labels = labels
    if self_index is None:
        self_index = torch.arange(labels.numel(), device=labels.device)
    same = labels[:, None] == ref_labels[None, :]
    own = torch.arange(ref_labels.numel(), device=labels.device)[None, :] == self_index[:, None]
    return same & ~own, ~same


def _setup(embeddings, labels, metric, ref_embeddings, ref_labels, ref_self_index):
    """-> (d (N, M), positive mask, negative mask, self index) of anchors vs the reference set."""
    ref, ref_lab, self_idx = reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    d = pairwise_distance(embeddings, ref, metric=metric)
    pos, neg = label_masks(labels, ref_lab, self_idx)
    return d, pos, neg, self_idx


def batch_hard_mine(embeddings, labels, metric="euclidean", *, ref_embeddings=None, ref_labels=None,
                    ref_self_index=None) -> HardMining:
    """Per anchor the farthest positive and the nearest negative of the reference set (default:
    the batch); pos_idx / neg_idx index the reference set."""
    d, pos, neg, _ = _setup(embeddings, labels, metric, ref_embeddings, ref_labels, ref_self_index)
    valid = pos.any(1) & neg.any(1)
    # argmax/argmin return the first extreme value: ties go to the lowest index.
    if d.shape[1] == 0:  # argmax of an empty row: every anchor is invalid anyway
        d = d.new_zeros((d.shape[0], 1))
        pos = neg = torch.zeros_like(d, dtype=torch.bool)
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
                            reduction="mean", return_stats=False, *, ref_embeddings=None, ref_labels=None,
                            ref_self_index=None):
    m = batch_hard_mine(embeddings, labels, metric, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                        ref_self_index=ref_self_index)
    valid = m.pos_idx >= 0
    gap = m.pos_dist - m.neg_dist
    terms = torch.nn.functional.softplus(gap) if soft_margin else torch.relu(gap + margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    loss, stats = _reduce(terms, valid, reduction)
    return (loss, stats) if return_stats else loss


def batch_all_triplet_loss(embeddings, labels, margin=0.2, metric="euclidean", reduction="mean_nonzero",
                           return_stats=False, *, ref_embeddings=None, ref_labels=None, ref_self_index=None):
    d, pos, neg, _ = _setup(embeddings, labels, metric, ref_embeddings, ref_labels, ref_self_index)
    valid = pos[:, :, None] & neg[:, None, :]  # (anchor, positive, negative)
    terms = torch.relu(d[:, :, None] - d[:, None, :] + margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    loss, stats = _reduce(terms, valid, reduction)
    return (loss, stats) if return_stats else loss


def semi_hard_negatives(embeddings, labels, metric="euclidean", *, ref_embeddings=None, ref_labels=None,
                        ref_self_index=None):
    """-> (d (N, M), valid pairs (N, M), selected negative index (N, M)) for every (a, p),
    p and the negative being reference rows (default: the batch)."""
    d, pos, neg, _ = _setup(embeddings, labels, metric, ref_embeddings, ref_labels, ref_self_index)
    n, m = d.shape
    d_ap = d[:, :, None]                       # (a, p, 1)
    d_an = d[:, None, :].expand(n, m, m)       # (a, p, n)
    outside = neg[:, None, :] & (d_an > d_ap)  # negatives farther than the positive
    has_outside = outside.any(-1)
    if m == 0:  # no pair at all
        empty = torch.zeros((n, 0), dtype=torch.int64, device=d.device)
        return d, torch.zeros((n, 0), dtype=torch.bool, device=d.device), empty
    # nearest negative that is farther than the positive (ties: lowest index)
    idx_outside = d_an.masked_fill(~outside, float("inf")).argmin(-1)
    # otherwise the farthest negative (ties: lowest index)
    idx_inside = d.masked_fill(~neg, float("-inf")).argmax(-1)[:, None].expand(n, m)
    sel = torch.where(has_outside, idx_outside, idx_inside)
    valid = pos & neg.any(1)[:, None]
    return d, valid, sel


def semi_hard_triplet_loss(embeddings, labels, margin=0.2, metric="euclidean", reduction="mean",
                           return_stats=False, *, ref_embeddings=None, ref_labels=None, ref_self_index=None):
    d, valid, sel = semi_hard_negatives(embeddings, labels, metric, ref_embeddings=ref_embeddings,
                                        ref_labels=ref_labels, ref_self_index=ref_self_index)
    d_an = d.gather(1, sel) if d.numel() else d
    terms = torch.relu(d - d_an + margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    loss, stats = _reduce(terms, valid, reduction)
    return (loss, stats) if return_stats else loss


def contrastive_loss(embeddings, labels, margin=1.0, metric="euclidean", reduction="mean", return_stats=False,
                     *, ref_embeddings=None, ref_labels=None, ref_self_index=None):
    """Without a reference set: over the unordered pairs i < j of the batch. With one: over the
    ordered pairs (a, j), j any reference row but the anchor's own (ref_self_index)."""
    if ref_embeddings is not None or ref_labels is not None:
        d, pos, neg, self_idx = _setup(embeddings, labels, metric, ref_embeddings, ref_labels, ref_self_index)
        own = torch.arange(d.shape[1], device=d.device)[None, :] == self_idx[:, None]
        terms = torch.where(pos, d.pow(2), torch.relu(margin - d).pow(2))
        terms = torch.where(own, torch.zeros_like(terms), terms)
        loss, stats = _reduce(terms, ~own, reduction)
        return (loss, stats) if return_stats else loss
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


def mine_triplets(embeddings, labels, strategy="batch_hard", metric="euclidean", *, ref_embeddings=None,
                  ref_labels=None, ref_self_index=None):
    """(anchor, positive, negative) int64 index tensors, sorted by (anchor, positive, negative);
    positive and negative index the reference set (default: the batch)."""
    ref = dict(ref_embeddings=ref_embeddings, ref_labels=ref_labels, ref_self_index=ref_self_index)
    if strategy == "batch_hard":
        m = batch_hard_mine(embeddings, labels, metric, **ref)
        a = torch.nonzero(m.pos_idx >= 0)[:, 0]
        return a, m.pos_idx[a], m.neg_idx[a]
    _, ref_lab, self_idx = reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    pos, neg = label_masks(labels, ref_lab, self_idx)
    if strategy == "batch_all":
        a, p, n = torch.nonzero(pos[:, :, None] & neg[:, None, :], as_tuple=True)
        return a, p, n
    if strategy == "semi_hard":
        _, valid, sel = semi_hard_negatives(embeddings, labels, metric, **ref)
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
