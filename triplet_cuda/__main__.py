"""`python -m triplet_cuda`: the training job of triplet_cuda.train_demo (see --help).
The one-batch comparison of the fused losses with the reference is `python -m triplet_cuda.demo`."""
from .train_demo import main

if __name__ == "__main__":
    main()
