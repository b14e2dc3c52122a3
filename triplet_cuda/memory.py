"""CrossBatchMemory: a loss against the current batch plus a FIFO ring of past embeddings (XBM).

Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020;
pytorch-metric-learning's ``CrossBatchMemory``): the embeddings of the last ``memory_size``
samples are kept, detached, and every step mines the batch's anchors against the batch and that
memory, so hard mining sees many more candidates than one batch holds. With the fused
query-vs-reference kernels the cost is N x (N + memory_size) distances, computed block by
block, never held (batch hard, semi hard, contrastive).
"""
from __future__ import annotations

from typing import Any

import torch

from . import _validation as v
from ._types import TripletStats

__all__ = ["CrossBatchMemory"]


def _check_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CrossBatchMemory(torch.nn.Module):
    """Wraps a loss so that each batch is mined against itself plus a memory of past batches.

    Each forward computes ``loss(embeddings, labels, ref_embeddings=R, ref_labels=L,
    ref_self_index=0)`` with the reference set ``R = cat([embeddings, memory])``: the batch's
    own rows first (so anchor i is reference row i and is never its own positive or pair), then
    the filled rows of the memory in ring order (not in time order: the order only decides exact
    ties, which go to the lowest reference index). Then, after the loss, the batch is written
    into the ring, detached, overwriting the oldest rows (FIFO). So the candidates of a step are
    the current batch and the ``memory_size`` samples before it; gradients flow only to the
    current batch, through its anchors and through its rows of the reference set.

    * Warm-up: while the ring fills, only the rows written so far are used (the first step is
      the plain in-batch loss).
    * A batch larger than ``memory_size``: the loss uses the whole batch; only its last
      ``memory_size`` rows are kept (what a FIFO of that capacity holds after the batch). No
      error, no index out of bounds (pytorch-metric-learning issue #748).
    * The ring (``embedding_memory`` (memory_size, embedding_size), ``label_memory``
      (memory_size,) int64) is made of registered buffers: it follows ``.to()`` and is saved by
      ``state_dict`` together with the filled count and the write position (extra state), so a
      checkpoint resumes the exact stream. It moves to the embeddings' device and takes their
      dtype on the first forward that differs. ``reset()`` empties it.
    * The contrastive loss against a reference set sums ordered pairs (a, j): pairs within the
      batch count twice, batch-memory pairs once (as with pml's CrossBatchMemory).
    * Difference from pml's CrossBatchMemory: pml writes the batch into the ring before the
      loss and removes the self comparisons, so once full its candidates are the newest
      ``memory_size`` samples including the batch; here they are the batch plus the
      ``memory_size`` samples before it (the brief of XBM: enqueue after the step).

    Args:
        loss: A triplet_cuda loss module (``TripletLoss`` or ``ContrastiveLoss``, any
            configuration) or any callable with the signature ``loss(embeddings, labels, *,
            ref_embeddings, ref_labels, ref_self_index)``.
        embedding_size: D, the feature size of the embeddings.
        memory_size: How many past embeddings the ring holds.

    Shapes:
        embeddings: (N, D) floating point; labels: (N,) integer; the loss: what ``loss``
        returns (0-d, or (N,) with ``reduction="none"``).

    Raises:
        ValueError: ``embedding_size`` or ``memory_size`` not a positive int, ``loss`` not
            callable. forward: embeddings not (N, embedding_size), bad labels, and what the
            loss raises.

    Example:
        >>> import torch
        >>> import triplet_cuda as tc
        >>> xbm = tc.CrossBatchMemory(tc.TripletLoss(margin=0.5), embedding_size=2, memory_size=3)
        >>> loss = xbm(torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 1]))
        >>> xbm.filled, xbm.position
        (3, 0)
        >>> # anchor 0 of the next batch (label 1) has its only positive, [3., 0.], in the memory
        >>> xbm(torch.tensor([[1.0, 0.0], [0.0, 0.5]]), torch.tensor([1, 0]))
        tensor(0.7500)
        >>> xbm.filled, xbm.position
        (3, 2)
    """

    embedding_memory: torch.Tensor
    label_memory: torch.Tensor

    def __init__(self, loss: Any, embedding_size: int, memory_size: int = 1024) -> None:
        super().__init__()
        if not callable(loss):
            raise ValueError(f"loss must be a loss module or callable, got {type(loss).__name__}")
        self.loss = loss
        self.embedding_size = _check_size(embedding_size, "embedding_size")
        self.memory_size = _check_size(memory_size, "memory_size")
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.int64))
        self.filled = 0
        self.position = 0

    def reset(self) -> None:
        """Empty the memory (zero the ring, filled count and write position)."""
        with torch.no_grad():
            self.embedding_memory.zero_()
            self.label_memory.zero_()
        self.filled = 0
        self.position = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, TripletStats]:
        """The loss of the batch against the batch plus the memory; then enqueue the batch.

        Args:
            embeddings: (N, embedding_size) floating point embeddings.
            labels: (N,) integer labels (any integer dtype), on the device of ``embeddings``.

        Returns:
            What the wrapped loss returns.
        """
        v.check_embeddings(embeddings)
        v.check_labels(labels, embeddings)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have embedding_size={self.embedding_size} columns, got shape "
                             f"{tuple(embeddings.shape)}")
        if self.embedding_memory.device != embeddings.device or self.embedding_memory.dtype != embeddings.dtype:
            self.embedding_memory = self.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
        if self.label_memory.device != embeddings.device:
            self.label_memory = self.label_memory.to(device=embeddings.device)
        labels64 = labels.to(torch.int64)
        ref_embeddings = torch.cat([embeddings, self.embedding_memory[: self.filled]])
        ref_labels = torch.cat([labels64, self.label_memory[: self.filled]])
        out = self.loss(embeddings, labels64, ref_embeddings=ref_embeddings, ref_labels=ref_labels, ref_self_index=0)
        self._enqueue(embeddings, labels64)
        return out

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(embeddings.shape[0], self.memory_size)
        if k == 0:
            return
        rows = (self.position + torch.arange(k, device=embeddings.device)) % self.memory_size
        self.embedding_memory[rows] = embeddings[-k:].detach()
        self.label_memory[rows] = labels[-k:]
        self.position = (self.position + k) % self.memory_size
        self.filled = min(self.filled + k, self.memory_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The ring keeps the checkpoint's dtype: copying a float64 ring into this module's
        # (default float32) buffer would round the stored rows, and the resumed stream would
        # differ from the uninterrupted one.
        saved = state_dict.get(prefix + "embedding_memory")
        if isinstance(saved, torch.Tensor) and saved.is_floating_point() and saved.dtype != self.embedding_memory.dtype:
            self.embedding_memory = self.embedding_memory.to(dtype=saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, int]:
        return {"filled": self.filled, "position": self.position}

    def set_extra_state(self, state: dict[str, int]) -> None:
        filled, position = int(state["filled"]), int(state["position"])
        if not (0 <= filled <= self.memory_size and 0 <= position < self.memory_size):
            raise ValueError(f"CrossBatchMemory state must have 0 <= filled <= memory_size={self.memory_size} and "
                             f"0 <= position < memory_size, got filled={filled}, position={position}")
        self.filled, self.position = filled, position

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, filled={self.filled}"
