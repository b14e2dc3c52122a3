"""Argument checks of the public API: each error names the argument, what was expected and what came."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_embeddings(x, name: str = "embeddings") -> None:
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
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"{name} must be a finite number, got {margin!r}")
    return float(margin)
