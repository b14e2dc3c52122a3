"""``python -m benchmarks``: see benchmarks/README.md or ``python -m benchmarks --help``."""
import sys

from .cli import main

if __name__ == "__main__":  # guarded: multiprocessing children import this module too
    sys.exit(main())
