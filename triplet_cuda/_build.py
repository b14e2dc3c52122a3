"""Build configuration shared by setup.py (ahead of time) and the JIT loader.

Importing this module must not import torch: setup.py loads it by path in an
isolated build environment that may have no torch. Functions that need torch
import it themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

EXTENSION_NAME = "triplet_cuda._C"

# Bump when the way the JIT build is made changes in a way the digest inputs below do not see.
BUILD_SCHEME = 2

# Files of csrc/ that make the binary: every source and header.
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


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
    """ops.cpp, tensor_ops.cpp and every CPU kernel, plus csrc/cuda/ (its .cu kernels and the
    register.cpp that registers them) when building with CUDA."""
    files = [root / "ops.cpp", root / "tensor_ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    return [str(f) for f in files]


def cuda_buildable() -> bool:
    """True when torch has CUDA and nvcc can be found (TRIPLET_CUDA_NO_CUDA=1 turns it off)."""
    if os.environ.get("TRIPLET_CUDA_NO_CUDA") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False  # (before importing cpp_extension, which is slow to import)
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _openmp_flags() -> list[str]:
    # at::parallel_for runs in the caller's translation unit: without -fopenmp it is serial.
    import torch

    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def extra_compile_args(with_cuda: bool) -> dict[str, list[str]]:
    # TORCH_ASSERT_ONLY_METHOD_OPERATORS: the C++ sources include <ATen/core/Tensor.h> and the
    # per-op headers they use (<ATen/ops/*.h>), never the whole of <ATen/ATen.h>, which
    # roughly doubled the compile time of each file.
    # -fno-math-errno -fno-trapping-math: no kernel reads errno or floating-point exception
    # flags; without them std::sqrt and the NaN-rule selects of the epilogue never vectorise.
    # (NaN and Inf arithmetic stays IEEE: these are not -ffast-math.)
    args = {"cxx": ["-O3", "-fno-math-errno", "-fno-trapping-math", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS",
                    *_openmp_flags()]}
    if with_cuda:
        args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return args


def extra_link_args() -> list[str]:
    return _openmp_flags()


# ----------------------------------------------------------------------------- JIT cache key
def source_files(root: Path, with_cuda: bool = True) -> list[Path]:
    """Every source and header under csrc/ (sorted) that a build can include; without CUDA the
    .cu / .cuh files and csrc/cuda/ are left out (a CPU build cannot see them)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
    if with_cuda:
        return files
    return [p for p in files if not p.suffix.startswith(".cu") and p.parent.name != "cuda"]


# Architectures of a CUDA build made where no GPU is visible and TORCH_CUDA_ARCH_LIST is unset
# (torch's own default is the visible GPUs' architectures, and it fails without one).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def default_cuda_arch_list() -> str | None:
    """DEFAULT_CUDA_ARCH_LIST when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible, else None
    (torch then uses TORCH_CUDA_ARCH_LIST, or the visible GPUs)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def cuda_arch_flags() -> list[str]:
    """The -gencode flags torch's extension build will use (TORCH_CUDA_ARCH_LIST, else the
    visible GPUs, else DEFAULT_CUDA_ARCH_LIST)."""
    from torch.utils import cpp_extension

    default = default_cuda_arch_list()
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        if default:
            os.environ["TORCH_CUDA_ARCH_LIST"] = default
        return list(cpp_extension._get_cuda_arch_flags())
    except Exception as e:  # private helper of torch: fall back to what determines its answer
        return [f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}", f"error={type(e).__name__}"]
    finally:
        if default:
            if saved is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def build_inputs(root: Path, with_cuda: bool) -> dict:
    """Everything that determines the JIT-built binary except the source bytes (hashed
    separately): torch, Python ABI, platform, compiler, flags and (CUDA) architectures."""
    import torch

    inputs = {
        "scheme": BUILD_SCHEME,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python_abi": sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "cxx": os.environ.get("CXX") or shutil.which("c++") or "",
        "with_cuda": with_cuda,
        "sources": [os.path.relpath(s, root) for s in sources(root, with_cuda)],
        "cflags": extra_compile_args(False)["cxx"],
        "ldflags": extra_link_args(),
    }
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        inputs["cuda_home"] = CUDA_HOME
        inputs["nvcc_flags"] = extra_compile_args(True)["nvcc"]
        inputs["cuda_arch_flags"] = cuda_arch_flags()
    return inputs


def build_digest(root: Path, with_cuda: bool) -> tuple[str, dict]:
    """(hex digest, inputs): sha256 over build_inputs() and the path and bytes of every file of
    source_files(root). Equal digests mean equal binaries, whatever the path of the sources."""
    inputs = build_inputs(root, with_cuda)
    h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
    for path in source_files(root, with_cuda):
        data = path.read_bytes()
        h.update(f"\0{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest(), inputs


def jit_extension_name(digest: str, with_cuda: bool) -> str:
    """triplet_cuda_<cpu|cuda>_<first 16 hex digits of the digest>: one cache entry per binary."""
    return f"triplet_cuda_{'cuda' if with_cuda else 'cpu'}_{digest[:16]}"


def extensions_root() -> Path:
    """Where torch's JIT builds live: TORCH_EXTENSIONS_DIR, else torch's per-user default
    (~/.cache/torch_extensions/py<ver>_<cpu|cuXYZ>)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch
    import torch._appdirs

    # torch.utils.cpp_extension.get_default_build_root(), without importing cpp_extension
    base = os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(base) / f"{py}_{accelerator}"


def ninja_bin_dir() -> str | None:
    """The bin folder of the installed `ninja` package (None without it)."""
    try:
        import ninja
    except ImportError:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and os.path.isfile(os.path.join(bin_dir, "ninja" + (".exe" if os.name == "nt" else ""))):
        return str(bin_dir)
    return None
