"""Argument checks of the public API: each error names the argument, what was expected and what came."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_no_functorch_grad() -> None:
    """torch.func.grad / vjp / jacrev / jacfwd / jvp are not supported (the ops' autograd formulas
    are torch.library ones, which functorch's grad transforms cannot use); vmap is."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return
    grad_like = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    active = [i.key() for i in torch._C._functorch.get_interpreter_stack()]
    if any(k in grad_like for k in active):
        raise NotImplementedError(
            "triplet_cuda does not support torch.func's differentiation transforms (torch.func.grad, vjp, "
            "jacrev, jacfwd, jvp, hessian): the ops' autograd formulas are registered with torch.library, "
            "which those transforms cannot use; compute gradients with torch.autograd.grad or "
            "loss.backward() (torch.func.vmap is supported)"
        )


def check_embeddings(x, name: str = "embeddings") -> None:
    check_no_functorch_grad()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def check_labels(labels, embeddings) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D (N,) tensor, got {labels.dim()}-D with shape {tuple(labels.shape)}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must have one entry per embedding: expected length {embeddings.shape[0]} "
            f"(embeddings.shape[0]), got {labels.shape[0]}"
        )
    check_same_device(embeddings, labels, "embeddings", "labels")


def check_same_device(a, b, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def check_choice(value, name: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_margin(margin, name: str = "margin") -> float:
    """A finite real margin >= 0: a Python int / float, a numpy scalar or a 0-d real tensor (read
    with .item(): a tensor margin costs a device sync on CUDA and a graph break under
    torch.compile). Negative margins are refused: for the triplet losses they only shift the
    loss to reward triplets already in order, for the contrastive loss they silently switch the
    negative pairs off."""
    expected = "a finite number >= 0 (Python, numpy or 0-d tensor real scalar)"
    if isinstance(margin, torch.Tensor):
        if margin.dim() != 0 or margin.dtype.is_complex or margin.dtype == torch.bool:
            raise ValueError(f"{name} must be {expected}, got a {margin.dim()}-D {margin.dtype} tensor "
                             f"with shape {tuple(margin.shape)}")
        if margin.requires_grad:
            raise ValueError(f"{name} must be {expected} that does not require grad (the margin is not "
                             f"differentiable), got a tensor with requires_grad=True")
        value = margin.item()
    elif isinstance(margin, numbers.Real) and not isinstance(margin, bool) and type(margin).__name__ != "bool_":
        value = margin
    else:
        raise ValueError(f"{name} must be {expected}, got {margin!r} ({type(margin).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be {expected}: negative margins are not supported, got {value!r}")
    return value


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device an output would live on (physical RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_triplets_fit(labels: torch.Tensor, strategy: str, ref_labels: torch.Tensor | None = None,
                       self_index: torch.Tensor | None = None) -> None:
    """mine_triplets returns three int64 tensors of T triplets: refuse when they cannot fit in the
    device's memory (batch all has sum_a P_a Q_a triplets, cubic in N: P_a positives and Q_a
    negatives of anchor a in the batch, or in the reference set ``ref_labels`` with the anchor's
    own row ``self_index`` (-1: none) left out)."""
    if strategy == "batch_hard" or torch.compiler.is_compiling() or labels.numel() == 0:
        return
    n = labels.numel()
    if ref_labels is None:
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        c = counts[inverse].double()
        pos, neg = c - 1, n - c
    else:
        lab, cand = labels.long(), ref_labels.long()
        values, counts = torch.unique(cand, return_counts=True)
        if values.numel() == 0:
            return  # an empty reference set: no triplet
        at = torch.searchsorted(values, lab).clamp_max(values.numel() - 1)
        c = torch.where(values[at] == lab, counts[at], torch.zeros_like(counts[at])).double()
        own = (self_index >= 0) & (cand[self_index.clamp_min(0)] == lab) if self_index is not None else False
        pos, neg = c - torch.as_tensor(own, dtype=torch.float64, device=c.device), cand.numel() - c
    per_anchor = pos * neg if strategy == "batch_all" else pos * (neg > 0)
    total = int(per_anchor.sum().item())
    need = 3 * 8 * total
    have = device_memory_bytes(labels.device)
    if need > have:
        raise ValueError(
            f"mine_triplets(strategy={strategy!r}) would return {total} triplets ({need / 2**30:.1f} GiB as three "
            f"int64 tensors) for these {n} labels, more than the memory of {labels.device} ({have / 2**30:.1f} GiB); "
            f"use batch_all_triplet_loss / semi_hard_triplet_loss, which never materialise the triplets, or a "
            f"smaller batch"
        )


def check_reference_set(embeddings, labels, ref_embeddings, ref_labels, ref_self_index):
    """The keyword arguments of query-vs-reference mining. Returns None without a reference set,
    else (ref_embeddings, ref_labels, self_index) with self_index an int64 (N,) tensor on the
    device of embeddings (-1: the anchor is not in the reference set)."""
    if ref_embeddings is None and ref_labels is None:
        if ref_self_index is not None:
            raise ValueError("ref_self_index needs a reference set: pass ref_embeddings and ref_labels too "
                             f"(got ref_self_index={ref_self_index!r} without them)")
        return None
    if ref_embeddings is None or ref_labels is None:
        missing, given = ("ref_labels", "ref_embeddings") if ref_labels is None else ("ref_embeddings", "ref_labels")
        raise ValueError(f"ref_embeddings and ref_labels go together: {given} was given, {missing} is missing")
    check_embeddings(ref_embeddings, "ref_embeddings")
    check_same_device(embeddings, ref_embeddings, "embeddings", "ref_embeddings")
    if ref_embeddings.dtype != embeddings.dtype:
        raise TypeError(f"ref_embeddings must have the dtype of embeddings ({embeddings.dtype}), "
                        f"got {ref_embeddings.dtype}")
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_embeddings must have the feature size of embeddings ({embeddings.shape[1]}), "
                         f"got {ref_embeddings.shape[1]}")
    if not isinstance(ref_labels, torch.Tensor):
        raise TypeError(f"ref_labels must be a torch.Tensor, got {type(ref_labels).__name__}")
    if ref_labels.dtype.is_floating_point or ref_labels.dtype.is_complex or ref_labels.dtype == torch.bool:
        raise TypeError(f"ref_labels must have an integer dtype, got {ref_labels.dtype}")
    if ref_labels.dim() != 1 or ref_labels.shape[0] != ref_embeddings.shape[0]:
        raise ValueError(f"ref_labels must be a 1-D tensor of length {ref_embeddings.shape[0]} "
                         f"(ref_embeddings.shape[0]), got shape {tuple(ref_labels.shape)}")
    check_same_device(embeddings, ref_labels, "embeddings", "ref_labels")
    n, m = embeddings.shape[0], ref_embeddings.shape[0]
    if ref_self_index is None:
        self_index = torch.full((n,), -1, dtype=torch.int64, device=embeddings.device)
    elif isinstance(ref_self_index, int) and not isinstance(ref_self_index, bool):
        if ref_self_index < 0 or ref_self_index + n > m:
            raise ValueError(f"ref_self_index as an int k says anchor i is reference row k + i, so it must satisfy "
                             f"0 <= k and k + N <= M (N={n} anchors, M={m} reference rows), got {ref_self_index}")
        self_index = torch.arange(ref_self_index, ref_self_index + n, dtype=torch.int64, device=embeddings.device)
    elif isinstance(ref_self_index, torch.Tensor):
        if ref_self_index.dtype.is_floating_point or ref_self_index.dtype.is_complex or ref_self_index.dtype == torch.bool:
            raise TypeError(f"ref_self_index must be None, an int or an integer (N,) tensor, got a "
                            f"{ref_self_index.dtype} tensor")
        if ref_self_index.shape != (n,):
            raise ValueError(f"ref_self_index must have shape ({n},) (one entry per anchor), got "
                             f"{tuple(ref_self_index.shape)}")
        check_same_device(embeddings, ref_self_index, "embeddings", "ref_self_index")
        self_index = ref_self_index.to(torch.int64)
        if n and not torch.compiler.is_compiling():
            lo, hi = int(self_index.min().item()), int(self_index.max().item())
            if lo < -1 or hi >= m:
                raise ValueError(f"ref_self_index must hold reference rows in [0, {m}) or -1 (not in the set), "
                                 f"got values in [{lo}, {hi}]")
    else:
        raise TypeError(f"ref_self_index must be None, an int or an integer (N,) tensor, got "
                        f"{type(ref_self_index).__name__}")
    return ref_embeddings, ref_labels, self_index
