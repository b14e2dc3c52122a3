"""Determinism: the same call twice gives bitwise-identical losses, indices and gradients,
whatever the number of threads."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import METRICS, cpu_and_cuda, make_batch

CALLS = {
    "batch_hard": lambda x, l, m: tc.batch_hard_triplet_loss(x, l, 0.3, metric=m),
    "batch_hard_none": lambda x, l, m: tc.batch_hard_triplet_loss(x, l, 0.3, metric=m, reduction="none"),
    "batch_hard_soft": lambda x, l, m: tc.batch_hard_triplet_loss(x, l, metric=m, soft_margin=True),
    "batch_all": lambda x, l, m: tc.batch_all_triplet_loss(x, l, 0.3, metric=m),
    "semi_hard": lambda x, l, m: tc.semi_hard_triplet_loss(x, l, 0.3, metric=m),
    "contrastive": lambda x, l, m: tc.contrastive_loss(x, l, 1.0, metric=m),
    "pairwise": lambda x, l, m: tc.pairwise_distance(x, metric=m),
    "pairwise_xy": lambda x, l, m: tc.pairwise_distance(x, x[::3] * 0.5, metric=m),
    "mine_dists": lambda x, l, m: torch.stack(list(tc.batch_hard_mine(x, l, metric=m)[::2])),
}


def _run(name, x0, labels, metric):
    x = x0.clone().requires_grad_()
    out = CALLS[name](x, labels, metric)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), grad


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                  torch.bfloat16: torch.int16}


def _bitwise_equal(a, b):
    """Equal bit patterns (unlike torch.equal, tells -0.0 from 0.0 and compares NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _SAME_SIZE_INT.get(a.dtype)
    if as_int is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(CALLS))
def test_same_call_twice_is_bitwise_identical(device, dtype, metric, name):
    # large enough to span several row blocks / parallel chunks
    x0, labels = make_batch(150, 17, 9, seed=3, dtype=dtype, device=device)
    out1, grad1 = _run(name, x0, labels, metric)
    for _ in range(2):
        out2, grad2 = _run(name, x0, labels, metric)
        assert _bitwise_equal(out1, out2), f"{name}: outputs differ between identical calls"
        assert _bitwise_equal(grad1, grad2), f"{name}: gradients differ between identical calls"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", ["batch_hard", "batch_all", "semi_hard"])
def test_mine_triplets_deterministic(device, strategy):
    x, labels = make_batch(90, 5, 6, seed=4, dtype=torch.float32, device=device)
    first = tc.mine_triplets(x, labels, strategy=strategy)
    for _ in range(2):
        again = tc.mine_triplets(x, labels, strategy=strategy)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CALLS))
def test_independent_of_thread_count(name):
    # CPU kernels split rows across threads: 1 thread and the default give the same bits
    x0, labels = make_batch(150, 17, 9, seed=5, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grad1 = _run(name, x0, labels, "euclidean")
        torch.set_num_threads(max(2, threads))
        out2, grad2 = _run(name, x0, labels, "euclidean")
    finally:
        torch.set_num_threads(threads)
    assert _bitwise_equal(out1, out2), f"{name}: outputs depend on the number of threads"
    assert _bitwise_equal(grad1, grad2), f"{name}: gradients depend on the number of threads"


def test_deterministic_algorithms_mode():
    # nothing in the CPU path should refuse torch.use_deterministic_algorithms(True)
    x, labels = make_batch(40, 5, 4, seed=6, dtype=torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for name in CALLS:
            _run(name, x, labels, "cosine")
    finally:
        torch.use_deterministic_algorithms(previous)
