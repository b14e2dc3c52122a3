"""triplet_cuda: fused triplet and contrastive losses with in-batch mining for PyTorch.

C++ and CUDA kernels, exposed as torch custom ops (``torch.ops.triplet_cuda.*``) with autograd
and torch.compile support, that compute pairwise distances, mine batch-hard / semi-hard
triplets or reduce over all triplets without building the N x N x N tensor of the mask recipe.

Functions (triplet_cuda.functional): pairwise_distance, batch_hard_mine, mine_triplets,
batch_hard_triplet_loss, batch_all_triplet_loss, semi_hard_triplet_loss, contrastive_loss.
Modules (triplet_cuda.modules): TripletLoss, ContrastiveLoss; CrossBatchMemory (a memory bank
of past embeddings around either). Miners in pytorch-metric-learning's index-tuple format:
triplet_cuda.miners. Mining across ranks (torch.distributed): triplet_cuda.distributed and
``gather_across_ranks=True``. Result types: HardMining, TripletStats. triplet_cuda.reference is
the pure-PyTorch oracle of the tests.

Importing the package loads the compiled ops: the ahead-of-time build (triplet_cuda._C) when
it was installed, else a JIT build, cached per digest of the sources and build settings
(compiled once, with a message on stderr; see loaded_from()).

Example:
    >>> import torch
    >>> import triplet_cuda as tc
    >>> embeddings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> tc.batch_hard_triplet_loss(embeddings, labels, margin=2.5)
    tensor(0.5000)
    >>> tc.TripletLoss(margin=2.5, mining="batch_all")(embeddings, labels)
    tensor(0.4189)
"""
from . import distributed, metrics, miners, reference
from ._loader import loaded_from
from ._types import HardMining, TripletStats
from .functional import (
    batch_all_triplet_loss,
    batch_hard_mine,
    batch_hard_triplet_loss,
    contrastive_loss,
    mine_triplets,
    pairwise_distance,
    pml_contrastive_loss,
    semi_hard_triplet_loss,
)
from .memory import CrossBatchMemory
from .modules import ContrastiveLoss, PMLContrastiveLoss, TripletLoss

__version__: str = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "CrossBatchMemory",
    "HardMining",
    "PMLContrastiveLoss",
    "TripletLoss",
    "TripletStats",
    "batch_all_triplet_loss",
    "batch_hard_mine",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "distributed",
    "loaded_from",
    "metrics",
    "miners",
    "mine_triplets",
    "pairwise_distance",
    "pml_contrastive_loss",
    "reference",
    "semi_hard_triplet_loss",
]
