"""Fake implementations that exercise the harness's failure paths (used by the tests).

    _ok     a cheap real step (x.sum(), or x * 2 for fwd+bwd)
    _oom    raises torch.OutOfMemoryError
    _alloc  raises the CPU allocator's RuntimeError ("can't allocate memory")
    _error  raises ValueError
    _kill   the process kills itself with SIGKILL, as the kernel's OOM killer does
    _huge   claims to need 2^50 bytes, so the memory estimate skips it

They are never part of a default sweep; name them explicitly (impls=["_oom", ...]).
"""
from __future__ import annotations

import os
import signal

import torch

NAMES = ("_ok", "_oom", "_alloc", "_error", "_kill", "_huge")


class _Step:
    needs_grad = False

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, labels):
        return self.fn(x, labels)


def _raise(exc):
    def step(x, labels):
        raise exc

    return step


def make_step(case):
    name = case.impl
    if name in ("_ok", "_huge"):
        return _Step((lambda x, labels: x.sum()) if case.pass_ == "fwd" else (lambda x, labels: x * 2))
    if name == "_oom":
        return _Step(_raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 TiB (selftest)")))
    if name == "_alloc":
        return _Step(_raise(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                         "1099511627776 bytes (selftest)")))
    if name == "_error":
        return _Step(_raise(ValueError("selftest error")))
    if name == "_kill":
        def kill(x, labels):
            os.kill(os.getpid(), signal.SIGKILL)

        return _Step(kill)
    raise ValueError(f"unknown selftest implementation {name!r}")


def mem_estimate(name: str, n: int, d: int) -> int:
    return 2**50 if name == "_huge" else n * d * 8
