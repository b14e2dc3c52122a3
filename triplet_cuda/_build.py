"""Build configuration shared by setup.py (ahead of time) and the JIT loader.

Importing this module must not import torch: setup.py loads it by path in an
isolated build environment that may have no torch. Functions that need torch
import it themselves.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

EXTENSION_NAME = "triplet_cuda._C"


def source_root() -> Path:
    """The csrc/ folder: inside the installed package, else beside it (source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"triplet_cuda: C++ sources not found in {here / 'csrc'} or {here.parent / 'csrc'}; "
        "reinstall the package (pip install .) so its sources ship with it"
    )


def sources(root: Path, with_cuda: bool) -> list[str]:
    """ops.cpp and every CPU kernel, plus the .cu files when building with CUDA."""
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def cuda_buildable() -> bool:
    """True when torch has CUDA and nvcc can be found (TRIPLET_CUDA_NO_CUDA=1 turns it off)."""
    if os.environ.get("TRIPLET_CUDA_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _openmp_flags() -> list[str]:
    # at::parallel_for runs in the caller's translation unit: without -fopenmp it is serial.
    import torch

    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def extra_compile_args(with_cuda: bool) -> dict[str, list[str]]:
    args = {"cxx": ["-O3", *_openmp_flags()]}
    if with_cuda:
        args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return args


def extra_link_args() -> list[str]:
    return _openmp_flags()
