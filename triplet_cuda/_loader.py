"""Loads the compiled ops exactly once: the ahead-of-time `_C` if it was built, else a JIT build."""
from __future__ import annotations

import os
import threading

import torch

from . import _build

_lock = threading.Lock()
_loaded_from: str | None = None


def load() -> str:
    """Registers torch.ops.triplet_cuda.* and returns where they came from ("aot:<path>" or "jit:<path>").

    TRIPLET_CUDA_FORCE_JIT=1 skips the ahead-of-time build. The JIT build is cached in
    TORCH_EXTENSIONS_DIR (torch's default otherwise) and reused across processes.
    """
    global _loaded_from
    with _lock:
        if _loaded_from is None:
            _loaded_from = _load_aot() or _load_jit()
        return _loaded_from


def loaded_from() -> str | None:
    return _loaded_from


def _load_aot() -> str | None:
    if os.environ.get("TRIPLET_CUDA_FORCE_JIT") == "1":
        return None
    try:
        from . import _C  # noqa: F401  (importing it registers the ops)
    except ImportError:
        return None
    return f"aot:{_C.__file__}"


def _load_jit() -> str:
    from torch.utils import cpp_extension

    try:
        import ninja  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "triplet_cuda: no prebuilt extension and no ninja for the JIT build; "
            "install it with `pip install ninja` (and a C++20 compiler)"
        ) from e
    with_cuda = _build.cuda_buildable()
    name = "triplet_cuda_jit_cuda" if with_cuda else "triplet_cuda_jit_cpu"
    try:
        cpp_extension.load(
            name=name,
            sources=_build.sources(_build.source_root(), with_cuda),
            extra_cflags=_build.extra_compile_args(False)["cxx"],
            extra_cuda_cflags=_build.extra_compile_args(True)["nvcc"] if with_cuda else None,
            extra_ldflags=_build.extra_link_args(),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("TRIPLET_CUDA_VERBOSE") == "1",
        )
    except (RuntimeError, OSError) as e:
        raise RuntimeError(
            "triplet_cuda: the JIT build of the C++ ops failed. It needs a C++20 compiler "
            "(g++ or clang++), ninja, and for CUDA a toolkit matching torch.version.cuda. "
            "Set TRIPLET_CUDA_VERBOSE=1 to see the compiler output."
        ) from e
    # load(..., is_python_module=False) loads the library into the process (torch.ops.load_library)
    return f"jit:{name}"
