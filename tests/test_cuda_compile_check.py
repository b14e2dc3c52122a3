""".ci/check_cuda_compile.sh's symbol check on a two-file stand-in for csrc/cuda/: a template
declared in one file (as tiles.cuh declares the tile kernels) and instantiated in another (as
tiles.cu does) must be instantiated for every combination the first one calls, or the check
fails naming the missing one; a complete set passes. Needs nvcc (skips without it); seconds."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "check_cuda_compile.sh"


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
    )


pytestmark = pytest.mark.skipif(_nvcc() is None or shutil.which("nm") is None,
                                reason="needs nvcc and nm (binutils)")

USER = """
namespace triplet_cuda { namespace cuda {
template <typename T> void launch_fill(T* p);
void use(float* p, double* q) { launch_fill(p); launch_fill(q); }
}}
"""

KERNELS = """
namespace triplet_cuda { namespace cuda {
template <typename T> __global__ void fill_kernel(T* p) { p[0] = T(1); }
template <typename T> void launch_fill(T* p) { fill_kernel<<<1, 1>>>(p); }
%s
}}
"""


def _check(tree: Path, instantiations: str) -> subprocess.CompletedProcess:
    (tree / "csrc" / "cuda" / "kernels.cu").write_text(KERNELS % instantiations)
    env = dict(os.environ, CUDA_CHECK_ARCHS="80", PYTHON=sys.executable, NVCC=_nvcc())
    return subprocess.run(["bash", str(tree / ".ci" / "check_cuda_compile.sh")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_missing_instantiation_fails_and_complete_set_passes(tmp_path):
    tree = tmp_path / "repo"
    (tree / ".ci").mkdir(parents=True)
    (tree / "csrc" / "cuda").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / ".ci" / SCRIPT.name)
    (tree / "csrc" / "tensor_ops.cpp").write_text("namespace triplet_cuda { int unused() { return 0; } }\n")
    (tree / "csrc" / "cuda" / "user.cu").write_text(USER)

    partial = _check(tree, "template void launch_fill<float>(float*);")
    assert partial.returncode != 0, partial.stdout + partial.stderr
    assert "defined nowhere" in partial.stdout
    assert "launch_fill<double>(double*)" in partial.stdout
    assert "launch_fill<float>" not in partial.stdout.split("defined nowhere")[1]

    full = _check(tree, "template void launch_fill<float>(float*);\n"
                        "template void launch_fill<double>(double*);")
    assert full.returncode == 0, full.stdout + full.stderr
    assert "2 triplet_cuda symbol(s) used across files, all defined" in full.stdout
