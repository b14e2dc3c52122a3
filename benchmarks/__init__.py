"""Benchmark suite of triplet_cuda: ``python -m benchmarks --help`` (see benchmarks/README.md)."""
