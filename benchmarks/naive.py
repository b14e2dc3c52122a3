"""The naive eager baselines (the classic Gram-matrix mask recipes) live in the package now,
in triplet_cuda/naive.py, so that `python -m triplet_cuda` can time them without importing
benchmarks/; this module re-exports them for the benchmark suite."""
from triplet_cuda.naive import (  # noqa: F401
    DEFAULT_MARGIN,
    FUNCTIONS,
    LOSSES,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    contrastive_loss,
    pairwise_distances,
    semi_hard_triplet_loss,
)
