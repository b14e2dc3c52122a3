"""``python benchmarks/run.py``: the same as ``python -m benchmarks`` from the repository root."""
import sys
from pathlib import Path

if __name__ == "__main__":  # guarded: multiprocessing children import this module too
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.cli import main

    sys.exit(main())
