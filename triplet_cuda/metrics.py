"""Retrieval metrics of an embedding: k nearest neighbours, Recall@K and mAP@R.

    import triplet_cuda as tc
    tc.metrics.recall_at_k(emb, labels, k=(1, 5))       # {1: 0.93, 5: 0.98}
    tc.metrics.map_at_r(emb, labels)                     # 0.71
    dist, idx = tc.metrics.knn(emb, k=10)                # (N, 10) each, self excluded

Every function runs on the fused ``knn`` op (``torch.ops.triplet_cuda.knn``): distances are
computed block by block and reduced to each row's k nearest at once, so no N x M matrix is
ever held (CPU: row blocks of about 32 MiB; CUDA: chunks of query rows).

Semantics (shared by every function):

* Without ``ref_embeddings`` the reference set is the query set itself and each query's own
  row is left out (leave-one-out retrieval). With ``ref_embeddings`` / ``ref_labels`` the
  queries are searched in that set and nothing is left out.
* Neighbours are ordered by ascending distance; equal distances by the lowest reference index.
* Recall@K: the fraction of queries that have at least one reference of their own label
  among their K nearest references (the "Recall@K" of the metric-learning literature).
* mAP@R (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020): for a query
  with R references of its label, AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i) over its R nearest
  references, P(i) the precision among the first i; the mean over the queries.
* Queries without any reference of their label (R = 0) are left out of both means; with no
  query left the result is NaN. Any NaN or infinite value in the embeddings makes every
  result NaN.
"""
from __future__ import annotations

import torch

from . import _validation as v
from ._ops import METRICS, ops

__all__ = ["knn", "map_at_r", "recall_at_k", "retrieval_metrics"]

# Query rows per knn call so that one call's (rows, k) outputs stay near 4M entries.
_CHUNK_ENTRIES = 1 << 22


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    return k


def _check_ks(k) -> tuple[int, ...]:
    if isinstance(k, int) and not isinstance(k, bool):
        return (_check_k(k),)
    try:
        ks = tuple(k)
    except TypeError:
        raise ValueError(f"k must be a positive int or a sequence of them, got {k!r}") from None
    if not ks:
        raise ValueError("k must be a positive int or a non-empty sequence of them, got an empty sequence")
    for kk in ks:
        _check_k(kk, "every k")
    return ks


def _check_inputs(embeddings, labels, ref_embeddings, ref_labels, metric):
    v.check_embeddings(embeddings)
    v.check_labels(labels, embeddings)
    v.check_choice(metric, "metric", METRICS)
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together (or neither)")
    if ref_embeddings is None:
        return embeddings, labels, True
    v.check_embeddings(ref_embeddings, "ref_embeddings")
    v.check_same_device(embeddings, ref_embeddings, "embeddings", "ref_embeddings")
    if ref_embeddings.dtype != embeddings.dtype:
        raise TypeError(f"ref_embeddings must have the dtype of embeddings ({embeddings.dtype}), got {ref_embeddings.dtype}")
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings must have the feature size of embeddings ({embeddings.shape[1]}), "
            f"got {ref_embeddings.shape[1]}"
        )
    if not isinstance(ref_labels, torch.Tensor):
        raise TypeError(f"ref_labels must be a torch.Tensor, got {type(ref_labels).__name__}")
    try:
        v.check_labels(ref_labels, ref_embeddings)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("labels", "ref_labels").replace("embeddings", "ref_embeddings")) from None
    return ref_embeddings, ref_labels, False


def knn(query: torch.Tensor, ref: torch.Tensor | None = None, k: int = 1, *, metric: str = "euclidean"):
    """The k nearest rows of ``ref`` for every row of ``query``: ``(dist (N, k), idx (N, k) int64)``.

    ``ref=None`` searches the query set itself, leaving each query's own row out. Ascending
    distance, ties by the lowest index, NaN distances last; rows with fewer than k candidates
    are padded with ``inf`` / ``-1``. Not differentiable (the outputs are detached values).
    """
    v.check_embeddings(query, "query")
    v.check_choice(metric, "metric", METRICS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    self_offset = -1
    if ref is None:
        ref, self_offset = query, 0
    else:
        v.check_embeddings(ref, "ref")
        v.check_same_device(query, ref, "query", "ref")
        if ref.dtype != query.dtype:
            raise TypeError(f"ref must have the dtype of query ({query.dtype}), got {ref.dtype}")
        if ref.shape[1] != query.shape[1]:
            raise ValueError(f"ref must have the feature size of query ({query.shape[1]}), got {ref.shape[1]}")
    with torch.no_grad():
        return ops.knn(query.detach(), ref.detach(), k, METRICS[metric], self_offset)


def _relevant_counts(labels, ref_labels, leave_one_out):
    """R per query: the number of references with the query's label (itself excluded)."""
    both = torch.cat([ref_labels.to(torch.int64), labels.to(torch.int64)])
    _, inverse = torch.unique(both, return_inverse=True)
    m = ref_labels.shape[0]
    counts = torch.bincount(inverse[:m], minlength=int(inverse.max()) + 1 if inverse.numel() else 0)
    r = counts[inverse[m:]]
    return r - 1 if leave_one_out else r


def _evaluate(embeddings, labels, ref_embeddings, ref_labels, metric, ks, with_map):
    """{k: Recall@k for k in ks} and mAP@R (None unless with_map), one knn pass per row chunk."""
    ref, ref_lab, leave_one_out = _check_inputs(embeddings, labels, ref_embeddings, ref_labels, metric)
    nan = float("nan")
    n = embeddings.shape[0]
    r = _relevant_counts(labels, ref_lab, leave_one_out)
    has = r > 0
    num_queries = int(has.sum())
    finite = bool(torch.isfinite(embeddings).all()) and (leave_one_out or bool(torch.isfinite(ref).all()))
    if num_queries == 0 or not finite:
        return {kk: nan for kk in ks}, (nan if with_map else None)
    kmax = max(ks)
    if with_map:
        kmax = max(kmax, int(r.max()))
    kmax = min(kmax, ref.shape[0] - (1 if leave_one_out else 0))
    chunk = max(1, _CHUNK_ENTRIES // max(kmax, 1))
    found = {kk: torch.zeros((), dtype=torch.int64, device=embeddings.device) for kk in ks}
    ap_sum = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    positions = torch.arange(1, kmax + 1, device=embeddings.device)
    code = METRICS[metric]
    with torch.no_grad():
        for s in range(0, n, chunk):
            q = embeddings[s:s + chunk].detach()
            _, idx = ops.knn(q, ref.detach(), kmax, code, s if leave_one_out else -1)
            hits = (ref_lab[idx.clamp_min(0)] == labels[s:s + chunk, None]) & (idx >= 0)
            rs, hs = r[s:s + chunk], has[s:s + chunk]
            for kk in ks:
                found[kk] += (hits[:, :kk].any(1) & hs).sum()
            if with_map:
                in_r = positions[None, :] <= rs[:, None]
                rel = (hits & in_r).double()
                precision = rel.cumsum(1) / positions.double()
                ap = (precision * rel).sum(1) / rs.clamp_min(1).double()
                ap_sum += ap[hs].sum()
    recalls = {kk: found[kk].item() / num_queries for kk in ks}
    return recalls, (ap_sum.item() / num_queries if with_map else None)


def recall_at_k(embeddings, labels, k=(1, 5), ref_embeddings=None, ref_labels=None, metric="euclidean"):
    """Recall@K: the fraction of queries with a reference of their label among their K nearest.

    embeddings (N, D), labels (N,) are the queries; the references are ``ref_embeddings`` /
    ``ref_labels`` when given, else the queries themselves with each query's own row left out.
    ``k`` an int gives a float; a sequence of ints gives ``{k: recall}``. See the module
    docstring for ties, queries without a relevant reference and non-finite input.
    """
    ks = _check_ks(k)
    recalls, _ = _evaluate(embeddings, labels, ref_embeddings, ref_labels, metric, ks, with_map=False)
    return recalls[ks[0]] if isinstance(k, int) else recalls


def map_at_r(embeddings, labels, ref_embeddings=None, ref_labels=None, metric="euclidean") -> float:
    """mAP@R (Musgrave et al. 2020) of the queries (embeddings, labels) against the references
    (the queries themselves, own row left out, when ``ref_embeddings`` is None)."""
    _, m = _evaluate(embeddings, labels, ref_embeddings, ref_labels, metric, (1,), with_map=True)
    return m


def retrieval_metrics(embeddings, labels, k=(1, 5), ref_embeddings=None, ref_labels=None,
                      metric="euclidean") -> dict[str, float]:
    """Recall@K for every K and mAP@R from one pass: ``{"recall@1": ..., "recall@5": ..., "map@r": ...}``."""
    ks = _check_ks(k)
    recalls, m = _evaluate(embeddings, labels, ref_embeddings, ref_labels, metric, ks, with_map=True)
    out = {f"recall@{kk}": val for kk, val in recalls.items()}
    out["map@r"] = m
    return out

