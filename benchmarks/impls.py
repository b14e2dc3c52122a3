"""The implementations compared, each behind one interface.

An implementation turns (loss, pass, margin) into ``step(x, labels)``: one forward
("fwd") or one forward and backward ("fwd+bwd") of the loss on (N, D) embeddings and (N,)
labels. Loss implementations only provide ``fn(embeddings, labels) -> 0-d loss``; the
backward is ``torch.autograd.grad(loss, x)``. The limits provide their own step per pass.

    triplet_cuda   the fused ops of this package (tc.batch_hard_triplet_loss, ...)
    naive          the classic mask recipe in eager PyTorch (benchmarks/naive.py)
    compile        torch.compile of the naive recipe (static shapes, default mode)
    pml            pytorch-metric-learning, when installed (benchmarks/peers.py)
    matmul         limit: torch.matmul(x, x.T) of the same shape and dtype, the GEMM every
                   distance-based method must at least do; fwd+bwd: x @ x.T then (N x N) @ x,
                   the two GEMMs a forward and backward must at least do
    read_once      limit, the bytes floor: fwd reads the embeddings once (x.sum());
                   fwd+bwd reads them and writes a gradient-sized tensor once (x * 2)

``mem_estimate(impl, loss, pass, n, d, itemsize)`` is a rough upper bound of the bytes a
step allocates beyond its inputs, used to skip cases that cannot fit ("skipped: needs X
GiB") before trying them. Its coefficients were measured on CPU (peak RSS growth at small
N, rounded up).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import naive, peers

LOSSES = naive.LOSSES
OURS = "triplet_cuda"


class Unavailable(Exception):
    """The implementation cannot run this case (not installed, loss not provided, ...)."""


@dataclass(frozen=True)
class Impl:
    name: str
    label: str
    kind: str  # "ours", "baseline", "limit", "selftest"
    losses: tuple  # the losses it implements; limits: all (loss-independent)
    description: str

    @property
    def loss_independent(self) -> bool:
        return self.kind == "limit"


IMPLS = {
    OURS: Impl(OURS, "triplet_cuda", "ours", LOSSES, "the fused ops of this package"),
    "naive": Impl("naive", "naive eager", "baseline", LOSSES, "classic mask recipe, eager PyTorch"),
    "compile": Impl("compile", "torch.compile(naive)", "baseline", LOSSES, "torch.compile of the naive recipe"),
    "pml": Impl("pml", "pytorch-metric-learning", "baseline", peers.LOSSES,
                "BatchHardMiner + TripletMarginLoss; TripletMarginLoss (all triplets); ContrastiveLoss"),
    "matmul": Impl("matmul", "matmul x@x.T (limit)", "limit", LOSSES, "the GEMM of the distances"),
    "read_once": Impl("read_once", "bytes floor (limit)", "limit", LOSSES, "read the embeddings once"),
}
DEFAULT_IMPLS = tuple(IMPLS)


def default_margin(loss: str) -> float:
    return naive.DEFAULT_MARGIN[loss]


# ----------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def _ours_module():
    import triplet_cuda

    return triplet_cuda


def availability(name: str, device: str = "cpu") -> tuple[bool, str]:
    """(available, reason if not)."""
    if name.startswith("_"):
        return True, ""
    if name not in IMPLS:
        return False, f"unknown implementation {name!r}"
    if name == OURS:
        try:
            _ours_module()
        except Exception as e:  # the extension failed to build or load
            return False, f"triplet_cuda failed to load: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if name == "pml":
        return peers.available()
    if name == "compile" and device == "cpu" and not _has_cxx():
        return False, "torch.compile on CPU needs a C++ compiler"
    return True, ""


@functools.lru_cache(maxsize=None)
def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# ----------------------------------------------------------------------------- loss functions
def loss_fn(name: str, loss: str, margin: float) -> Callable:
    """fn(embeddings, labels) -> 0-d loss."""
    if name == OURS:
        tc = _ours_module()
        f = {
            "batch_hard": tc.batch_hard_triplet_loss,
            "batch_all": tc.batch_all_triplet_loss,
            "semi_hard": tc.semi_hard_triplet_loss,
            "contrastive": tc.contrastive_loss,
        }[loss]
        return lambda x, labels: f(x, labels, margin)
    if name == "naive":
        f = naive.FUNCTIONS[loss]
        return lambda x, labels: f(x, labels, margin)
    if name == "compile":
        return _compiled(loss, margin)
    if name == "pml":
        return peers.make(loss, margin)
    raise Unavailable(f"{name} has no loss function")


def _compiled(loss: str, margin: float):
    f = naive.FUNCTIONS[loss]

    def fn(x, labels):
        return f(x, labels, margin)

    # Every case compiles afresh: in a long in-process sweep (CUDA) the closures of all cases
    # share one code object, whose recompilations would otherwise hit dynamo's recompile
    # limit and silently fall back to eager.
    torch._dynamo.reset()
    # static shapes: each N is compiled for (what a training loop with a fixed batch does)
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- limits
def _matmul_step(pass_: str):
    if pass_ == "fwd":
        return lambda x, labels: torch.matmul(x, x.T)

    def fwd_bwd(x, labels):
        g = torch.matmul(x, x.T)
        return torch.matmul(g, x)

    return fwd_bwd


def _read_once_step(pass_: str):
    if pass_ == "fwd":
        return lambda x, labels: x.sum()
    return lambda x, labels: x * 2


# ----------------------------------------------------------------------------- steps
def make_step(case) -> Callable:
    """step(x, labels) for a harness.Case; step.needs_grad says if x must require grad."""
    name = case.impl
    if name.startswith("_"):
        from . import _selftest

        return _selftest.make_step(case)
    ok, why = availability(name, case.device)
    if not ok:
        raise Unavailable(why)
    impl = IMPLS[name]
    if case.loss not in impl.losses:
        raise Unavailable(f"{name} has no {case.loss} loss")
    if impl.kind == "limit":
        step = _matmul_step(case.pass_) if name == "matmul" else _read_once_step(case.pass_)
        return _Step(step, needs_grad=False)
    margin = default_margin(case.loss) if case.margin is None else case.margin
    fn = loss_fn(name, case.loss, margin)
    if case.pass_ == "fwd":
        return _Step(fn, needs_grad=False)

    def fwd_bwd(x, labels):
        (grad,) = torch.autograd.grad(fn(x, labels), x)
        return grad

    return _Step(fwd_bwd, needs_grad=True)


class _Step:
    def __init__(self, fn, needs_grad: bool):
        self.fn = fn
        self.needs_grad = needs_grad

    def __call__(self, x, labels):
        return self.fn(x, labels)


# ----------------------------------------------------------------------------- memory estimates
# Peak bytes beyond the inputs, per (impl, loss), as multiples of N^2 * max(itemsize, 4) bytes
# and of N^3 bytes, for (fwd, fwd+bwd): the peak RSS growth measured on CPU at N = 256 ... 2048
# (D = 64, float32), rounded up by about 25%.
_N2 = {
    ("naive", "batch_hard"): (12, 20),
    ("naive", "contrastive"): (11, 28),
    ("naive", "batch_all"): (4, 6),
    ("naive", "semi_hard"): (6, 8),
    ("compile", "batch_hard"): (2, 7),
    ("compile", "contrastive"): (2, 4),
    ("compile", "batch_all"): (2, 4),
    ("compile", "semi_hard"): (6, 8),
    ("pml", "batch_hard"): (15, 15),
    ("pml", "batch_all"): (4, 8),
    ("pml", "contrastive"): (8, 8),
}
_N3 = {
    ("naive", "batch_all"): (20, 25),
    ("naive", "semi_hard"): (24, 24),
    ("compile", "batch_all"): (5, 5),
    ("compile", "semi_hard"): (0, 12),
}


def mem_estimate(name: str, loss: str, pass_: str, n: int, d: int, itemsize: int, k: int = 4) -> int:
    """Rough upper bound of the bytes a step allocates beyond its inputs."""
    bwd = pass_ == "fwd+bwd"
    s = max(itemsize, 4)
    nd = n * d * s
    slack = 64 * 2**20
    if name.startswith("_"):
        from . import _selftest

        return _selftest.mem_estimate(name, n, d)
    if name == OURS:
        return 6 * nd + 64 * n + slack  # O(N D): distances are recomputed block by block
    if name == "matmul":
        return n * n * itemsize + (nd if bwd else 0) + slack
    if name == "read_once":
        return nd + slack
    est = _N2.get((name, loss), (16, 28))[bwd] * n * n * s + 4 * nd + slack
    est += _N3.get((name, loss), (0, 0))[bwd] * n**3
    if name == "pml" and loss == "batch_all":
        triplets = n * max(k - 1, 0) * max(n - k, 0)
        if n**3 < 2**31:  # PML builds an N^3 boolean mask, else loops over anchors
            est += n**3
        est += triplets * (3 * 8 + (6 if bwd else 3) * s)
    if name == "pml" and loss == "contrastive":
        est += 2 * n * n * 8  # the pair indices (int64)
    return int(est)
