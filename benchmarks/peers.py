"""pytorch-metric-learning (PML) adapters, behind the (embeddings, labels) -> loss interface.

PML is an optional peer: nothing here imports it at module import time, and
``available()`` says whether (and why not) it can be used.

The adapters use plain Euclidean distances (``LpDistance(normalize_embeddings=False, p=2,
power=1)``; PML's default normalises the embeddings first) and the same margins as
triplet_cuda, so the work is comparable:

* batch_hard: ``BatchHardMiner`` + ``TripletMarginLoss`` averaged over the mined triplets
  (``MeanReducer``), which is triplet_cuda's "mean" over valid anchors;
* batch_all: ``TripletMarginLoss`` with no miner, i.e. over all triplets, averaged over the
  triplets with a positive loss (PML's default ``AvgNonZeroReducer``, triplet_cuda's
  "mean_nonzero");
* contrastive: ``ContrastiveLoss(pos_margin=0, neg_margin=margin)``. PML's contrastive loss
  is not squared (d and relu(margin - d)) and runs over ordered pairs, so its value differs
  from Hadsell et al.'s; its cost is what is compared.

PML has no semi-hard loss of the FaceNet kind (its "semihard" miner uses the margin), so it
is not compared there.
"""
from __future__ import annotations

LOSSES = ("batch_hard", "batch_all", "contrastive")


def available() -> tuple[bool, str]:
    try:
        import pytorch_metric_learning  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"pytorch-metric-learning not installed ({type(e).__name__})"
    return True, ""


def version() -> str | None:
    try:
        import pytorch_metric_learning

        return pytorch_metric_learning.__version__
    except Exception:
        return None


def make(loss: str, margin: float):
    """Returns fn(embeddings, labels) -> 0-d loss for one of LOSSES."""
    from pytorch_metric_learning import distances, losses, miners, reducers

    dist = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
    if loss == "batch_hard":
        miner = miners.BatchHardMiner(distance=dist)
        criterion = losses.TripletMarginLoss(margin=margin, distance=dist, reducer=reducers.MeanReducer())

        def batch_hard(embeddings, labels):
            return criterion(embeddings, labels, miner(embeddings, labels))

        return batch_hard
    if loss == "batch_all":
        criterion = losses.TripletMarginLoss(margin=margin, distance=dist, triplets_per_anchor="all")
        return lambda embeddings, labels: criterion(embeddings, labels)
    if loss == "contrastive":
        criterion = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin, distance=dist)
        return lambda embeddings, labels: criterion(embeddings, labels)
    raise ValueError(f"pytorch-metric-learning has no {loss!r} adapter (it has {LOSSES})")
