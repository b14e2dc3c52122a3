"""Shared pytest configuration and helpers of the triplet_cuda test suite.

Test modules import the helpers with `from conftest import ...` (this folder is on
sys.path: pytest's default import mode puts it there, and the line below does otherwise).
"""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

import triplet_cuda as tc  # noqa: F401  (loads -- JIT-compiles if needed -- the ops once, up front)

METRICS = ("euclidean", "squared_euclidean", "cosine")
STRATEGIES = ("batch_hard", "batch_all", "semi_hard")
REDUCTIONS = ("mean", "mean_nonzero", "sum")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)

CUDA_AVAILABLE = torch.cuda.is_available()

# `from conftest import ...` in the test modules also under --import-mode=importlib
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: the test needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers",
        "sanitize: the small CUDA subset that benchmarks/gpu_check.sh runs under compute-sanitizer "
        "(tests/test_cuda_sanitize.py; every CUDA kernel at least once)",
    )


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs_cuda: torch.cuda.is_available() is False")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def cpu_and_cuda():
    """Device parameters: "cpu", and "cuda" marked needs_cuda (skipped cleanly without CUDA)."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.needs_cuda,
                pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs_cuda: torch.cuda.is_available() is False"),
            ],
        ),
    ]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    yield


# ----------------------------------------------------------------------------- helpers
def make_batch(n, d, num_classes, *, seed, dtype=torch.float64, device="cpu", scale=1.0):
    """Random embeddings (n, d) and int64 labels in [0, num_classes), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, max(num_classes, 1), (n,), generator=g)
    return x.to(device=device, dtype=dtype), labels.to(device)


def tolerances(dtype):
    """(rtol, atol) of a kernel of `dtype` against the float64 reference on the same (upcast) input.

    float64: tight. float32: the kernels use the Gram expansion in float32. float16/bfloat16:
    the kernels accumulate in float32 and round the result to the half dtype (8 / 11 bits of
    mantissa), so the tolerance is a few ulps of the half dtype.
    """
    return {
        torch.float64: (1e-9, 1e-9),
        torch.float32: (1e-4, 1e-4),
        torch.float16: (4e-3, 4e-3),
        torch.bfloat16: (2e-2, 2e-2),
    }[dtype]


def assert_close(actual, expected, dtype, msg="", rtol=None, atol=None):
    r, a = tolerances(dtype)
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected.detach().cpu().double(),
        rtol=r if rtol is None else rtol,
        atol=a if atol is None else atol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )




def gram_error_bound(x, y, metric, dtype):
    """Per-pair bound (N, M) on the error of a distance computed by the Gram expansion.

    The kernels compute ||a - b||^2 as |a|^2 + |b|^2 - 2<a, b> in the accumulation dtype
    (float64 for float64 input, float32 otherwise), whose absolute error is a few ulps of
    |a|^2 + |b|^2: E = 4 (D + 4) eps (|a|^2 + |b|^2). For the euclidean metric the square root
    turns that into min(E / d, sqrt(E)) (large relative error only for near-zero distances).
    """
    x64, y64 = x.detach().cpu().double(), y.detach().cpu().double()
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    d = x64.shape[1]
    if metric == "cosine":
        return torch.full((x64.shape[0], y64.shape[0]), 4 * (d + 4) * eps, dtype=torch.float64)
    e = 4 * (d + 4) * eps * (x64.square().sum(1)[:, None] + y64.square().sum(1)[None, :])
    if metric == "squared_euclidean":
        return e
    ref = tc.reference.pairwise_distance(x64, y64, "euclidean")
    return torch.minimum(e / ref.clamp_min(1e-300), e.sqrt())


def assert_distances_close(actual, x, y, metric, dtype, msg=""):
    """actual (N, M) against the float64 reference on the (upcast) inputs, within tolerances(dtype)
    plus the Gram-expansion bound."""
    x64 = x.detach().cpu().double()
    y64 = x64 if y is None else y.detach().cpu().double()
    ref = tc.reference.pairwise_distance(x64, y64, metric)
    assert actual.shape == ref.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    rtol, atol = tolerances(dtype)
    bound = atol + rtol * ref.abs() + gram_error_bound(x64, y64, metric, dtype)
    err = (actual.detach().cpu().double() - ref).abs()
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        i, j = (int(v) for v in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{msg}: {int(bad.sum())} of {bad.numel()} distances out of tolerance; first at ({i}, {j}): "
            f"got {actual[i, j].item()!r}, expected {ref[i, j].item()!r} (bound {bound[i, j].item():.3g})"
        )
