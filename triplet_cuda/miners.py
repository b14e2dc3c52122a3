"""pytorch-metric-learning-style miners: nn.Modules returning pml's (anchor, positive, negative) index tuple.

A one-line switch for pytorch-metric-learning users: ``miner(embeddings, labels)`` returns the
index tuple that pml's losses take as ``indices_tuple``, mined by the fused ops
(tc.mine_triplets), so nothing builds the N x N x N tensor of pml's
``get_all_triplets_indices`` and (batch hard, semi hard) nothing holds the N x N matrix::

    from pytorch_metric_learning import losses, distances
    loss_fn = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(normalize_embeddings=False))
    miner = tc.miners.BatchHardMiner()          # instead of pytorch_metric_learning.miners.BatchHardMiner()
    loss = loss_fn(embeddings, labels, miner(embeddings, labels))

Differences from pml's miners (each exact; tests/test_miners.py checks the parts that agree):

* Distances: ``metric`` is ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"`` (1 - cos),
  on the embeddings as given. pml's default distance, ``LpDistance()``, L2-normalises the
  embeddings first: pass ``normalize_embeddings=False`` to pml's distance, or normalise the
  embeddings yourself, to get the same triplets.
* BatchHardMiner: pml's BatchHardMiner (hardest positive, hardest negative per anchor, anchors
  without either left out). Ties go to the lowest index here; pml's torch.max / torch.min
  leave ties unspecified.
* SemiHardMiner: FaceNet's (and TF Addons' ``TripletSemiHardLoss``) rule, the one of
  tc.semi_hard_triplet_loss: one triplet per positive pair (a, p), with the nearest negative
  farther than ``d_ap``, else the farthest negative. pml has no miner with this rule.
  ``TripletMarginMiner(margin, type_of_triplets="semihard")`` returns *every* negative with
  ``d_ap < d_an <= d_ap + margin`` and no fallback; for each (a, p) our negative is the nearest
  of those whenever that set is not empty. ``BatchEasyHardMiner(pos_strategy="hard",
  neg_strategy="semihard")`` keeps one positive per anchor (the hardest) and drops the anchor
  when no negative is farther; for that (a, p) it picks our negative.
* AllTripletsMiner: every valid triplet (what pml's losses use without a miner, pml's
  ``lmu.get_all_triplets_indices``); with ``margin`` only those with ``d_an - d_ap <= margin``,
  exactly pml's ``TripletMarginMiner(margin, type_of_triplets="all")``.
* A ``margin`` filter keeps triplets whose ``d_an - d_ap`` is NaN (a NaN embedding), so that
  the loss on them is NaN rather than silently finite.
* Reference sets: ``forward(embeddings, labels, ref_emb, ref_labels)`` mines anchors from
  ``embeddings`` against ``ref_emb`` with nothing excluded, as pml does; the returned positive
  and negative indices point into ``ref_emb``. The keyword ``ref_self_index`` (an int k: anchor
  i is reference row k + i; or an int64 tensor with -1 for anchors not in the set) excludes
  the anchors' own rows, as in tc.mine_triplets.
"""
from __future__ import annotations

import torch

from . import _validation as v
from . import functional as F
from ._ops import METRICS
from .functional import Metric

__all__ = ["AllTripletsMiner", "BatchHardMiner", "SemiHardMiner"]

IndexTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(anchor, positive, negative) int64 index tensors of one length: pml's ``indices_tuple``."""

# rows of (anchor, other) pairs whose distances are computed at once by _pair_distance
_PAIR_CHUNK = 1 << 16


def _pair_distance(x: torch.Tensor, y: torch.Tensor, i: torch.Tensor, j: torch.Tensor, metric: str) -> torch.Tensor:
    """d(x[i[t]], y[j[t]]) for every t, exactly (from differences, no Gram form), in float64 for
    float64 input and float32 otherwise; O(chunk * D) memory."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(i.shape[0], dtype=acc, device=x.device)
    for s in range(0, i.shape[0], _PAIR_CHUNK):
        a, b = x[i[s:s + _PAIR_CHUNK]].to(acc), y[j[s:s + _PAIR_CHUNK]].to(acc)
        if metric == "cosine":
            a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(1e-8)
            b = b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(1e-8)
            out[s:s + _PAIR_CHUNK] = 1 - (a * b).sum(1)
        else:
            sq = (a - b).square().sum(1)
            out[s:s + _PAIR_CHUNK] = sq.sqrt() if metric == "euclidean" else sq
    return out


class _Miner(torch.nn.Module):
    """Shared forward: argument handling of pml's BaseMiner.forward, no_grad, then _mine."""

    strategy: str

    def __init__(self, metric: Metric = "euclidean", margin: float | None = None) -> None:
        super().__init__()
        v.check_choice(metric, "metric", METRICS)
        self.metric = metric
        self.margin = None if margin is None else v.check_margin(margin)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        *,
        ref_self_index: int | torch.Tensor | None = None,
    ) -> IndexTuple:
        """Mine triplets (pml's ``miner(embeddings, labels, ref_emb, ref_labels)``).

        Args:
            embeddings: (N, D) floating point anchors (may require grad; mining does not
                differentiate).
            labels: (N,) integer labels; moved to the embeddings' device like pml does.
            ref_emb: (M, D) reference embeddings, or None to mine within the batch (own row
                never its own positive).
            ref_labels: (M,) integer labels of ``ref_emb``; required with it.
            ref_self_index: With ``ref_emb``: None (nothing excluded, pml's semantics), an int
                k (anchor i is reference row k + i) or an (N,) int64 tensor (-1: not in the set).

        Returns:
            (anchor, positive, negative) int64 tensors on the embeddings' device, sorted by
            (anchor, positive, negative); positive and negative index ``ref_emb`` when given.
        """
        if isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor):
            labels = labels.to(embeddings.device)
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels was given without ref_emb: pass both or neither")
            if ref_self_index is not None:
                raise ValueError("ref_self_index was given without ref_emb: pass it with ref_emb and ref_labels")
            kwargs = {}
        else:
            if ref_labels is None:
                raise ValueError("ref_emb was given without ref_labels: pass both or neither")
            if isinstance(ref_labels, torch.Tensor) and isinstance(ref_emb, torch.Tensor):
                ref_labels = ref_labels.to(ref_emb.device)
            kwargs = {"ref_embeddings": ref_emb, "ref_labels": ref_labels, "ref_self_index": ref_self_index}
        with torch.no_grad():
            a, p, n = F.mine_triplets(embeddings, labels, strategy=self.strategy, metric=self.metric, **kwargs)
            if self.margin is not None and a.numel():
                ref = embeddings if ref_emb is None else ref_emb
                keep = ~(self._triplet_margin(embeddings, ref, a, p, n) > self.margin)  # NaN is kept
                a, p, n = a[keep], p[keep], n[keep]
        return a, p, n

    def _triplet_margin(self, x, ref, a, p, n) -> torch.Tensor:
        """d_an - d_ap of every triplet."""
        return _pair_distance(x, ref, a, n, self.metric) - _pair_distance(x, ref, a, p, self.metric)

    def extra_repr(self) -> str:
        margin = "" if self.margin is None or self.strategy == "batch_hard" else f", margin={self.margin}"
        return f"metric={self.metric!r}{margin}"


class BatchHardMiner(_Miner):
    """Per anchor its hardest (farthest) positive and hardest (nearest) negative, pml's format.

    The miner form of tc.batch_hard_mine / tc.mine_triplets(strategy="batch_hard"); a drop-in
    for ``pytorch_metric_learning.miners.BatchHardMiner`` (with a non-normalising distance; see
    the module docstring). Anchors without a positive or a negative are left out; ties go to
    the lowest index. Never holds the N x M distance matrix.

    Args:
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

    Shapes:
        embeddings: (N, D); labels: (N,); ref_emb: (M, D); each returned tensor: (T,), T <= N.

    Returns:
        forward returns (anchor, positive, negative) int64 index tensors.

    Raises:
        ValueError: An unknown ``metric``. forward raises what tc.mine_triplets raises.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> miner = tc.miners.BatchHardMiner()
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [3.0, 0.0], [3.0, 1.0]])
        >>> miner(embeddings, torch.tensor([0, 0, 0, 1, 1]))
        (tensor([0, 1, 2, 3, 4]), tensor([2, 2, 0, 4, 3]), tensor([3, 4, 4, 0, 1]))
    """

    strategy = "batch_hard"

    def __init__(self, metric: Metric = "euclidean") -> None:
        super().__init__(metric)


class SemiHardMiner(_Miner):
    """Per positive pair (a, p) the semi-hard negative of FaceNet, pml's format.

    For each (a, p) with ``labels[a] == labels[p]``, ``a != p``: the nearest negative farther
    than ``d_ap``, else (none is farther) the farthest negative: the triplets of
    tc.semi_hard_triplet_loss (tc.mine_triplets(strategy="semi_hard")). With ``margin``, only
    the triplets with ``d_an - d_ap <= margin`` are kept (pml's "violates the margin"; the
    others have a zero hinge loss). pml's closest miners differ: see the module docstring.

    Args:
        margin: None (every (a, p) of an anchor that has a negative), or a number >= 0.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

    Shapes:
        embeddings: (N, D); labels: (N,); ref_emb: (M, D); each returned tensor: (T,).

    Returns:
        forward returns (anchor, positive, negative) int64 index tensors.

    Raises:
        ValueError: An unknown ``metric`` or a bad ``margin``. forward raises what
            tc.mine_triplets raises.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [3.0, 0.0], [3.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 0, 1, 1])
        >>> tc.miners.SemiHardMiner()(embeddings, labels)
        (tensor([0, 0, 1, 1, 2, 2, 3, 4]), tensor([1, 2, 0, 2, 0, 1, 4, 3]), tensor([3, 4, 4, 4, 4, 4, 0, 1]))
        >>> tc.miners.SemiHardMiner(margin=1.0)(embeddings, labels)
        (tensor([0, 1, 2]), tensor([2, 2, 0]), tensor([4, 4, 4]))
    """

    strategy = "semi_hard"

    def __init__(self, margin: float | None = None, metric: Metric = "euclidean") -> None:
        super().__init__(metric, margin)


class AllTripletsMiner(_Miner):
    """Every valid triplet (a, p, n), or those within ``margin``, pml's format.

    A triplet is valid when ``labels[a] == labels[p]``, ``a != p`` (with a reference set: p is
    not the anchor's own row, see ``ref_self_index``) and ``labels[n] != labels[a]``. With
    ``margin`` only those with ``d_an - d_ap <= margin``: exactly pml's
    ``TripletMarginMiner(margin, type_of_triplets="all")``. Without it, pml's
    ``lmu.get_all_triplets_indices`` (what pml's triplet losses use without a miner). The
    number of triplets grows like N^3 (N * M * K with a reference set); the margin filter
    computes the distances of the returned pairs only.

    Args:
        margin: None (every valid triplet), or a number >= 0.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

    Shapes:
        embeddings: (N, D); labels: (N,); ref_emb: (M, D); each returned tensor: (T,).

    Returns:
        forward returns (anchor, positive, negative) int64 index tensors.

    Raises:
        ValueError: An unknown ``metric`` or a bad ``margin``. forward raises what
            tc.mine_triplets raises (also when the triplets cannot fit in memory).

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> embeddings = torch.tensor([[0.0], [1.0], [5.0]])
        >>> tc.miners.AllTripletsMiner()(embeddings, torch.tensor([0, 0, 1]))
        (tensor([0, 1]), tensor([1, 0]), tensor([2, 2]))
        >>> tc.miners.AllTripletsMiner(margin=3.5)(embeddings, torch.tensor([0, 0, 1]))
        (tensor([1]), tensor([0]), tensor([2]))
    """

    strategy = "batch_all"

    def __init__(self, margin: float | None = None, metric: Metric = "euclidean") -> None:
        super().__init__(metric, margin)

    def _triplet_margin(self, x, ref, a, p, n) -> torch.Tensor:
        # T grows like N * M * K: gather from one (N, M) distance matrix, no larger than the output
        d = F.pairwise_distance(x, ref, metric=self.metric)
        return d[a, n] - d[a, p]
