"""Packaging. By default nothing is compiled here: `pip install .` ships the C++/CUDA sources
inside the package and they are JIT-compiled on first use.

Ahead-of-time build (needs torch and a compiler in the build environment):
    TRIPLET_CUDA_BUILD_EXT=1 pip install --no-build-isolation .
builds triplet_cuda._C with CUDAExtension when torch has CUDA and nvcc is found, else with
CppExtension. CUDA architectures: TORCH_CUDA_ARCH_LIST (e.g. "8.0;8.6;9.0+PTX"), else those of
the visible GPUs, else (no GPU visible) _build.DEFAULT_CUDA_ARCH_LIST ("8.0;9.0+PTX").
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_sources(build_py):
    """Copies csrc/ into the built package (triplet_cuda/csrc) so the JIT build works from a
    non-editable install."""

    def run(self):
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "triplet_cuda" / "csrc", dirs_exist_ok=True)


def _build_config():
    # Loaded by path: importing the package itself would import torch and load the ops.
    spec = importlib.util.spec_from_file_location("_tc_build", ROOT / "triplet_cuda" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cmdclass = {"build_py": build_py_with_sources}
ext_modules = []
if os.environ.get("TRIPLET_CUDA_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cfg = _build_config()
    with_cuda = cfg.cuda_buildable()
    if with_cuda and cfg.default_cuda_arch_list():
        # No GPU visible and no TORCH_CUDA_ARCH_LIST: torch would fail; build for the default list.
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.default_cuda_arch_list()
        print(f"triplet_cuda: TORCH_CUDA_ARCH_LIST not set and no GPU visible: building for "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    extension = CUDAExtension if with_cuda else CppExtension
    ext_modules.append(
        extension(
            name=cfg.EXTENSION_NAME,
            sources=[os.path.relpath(s, ROOT) for s in cfg.sources(ROOT / "csrc", with_cuda)],
            extra_compile_args=cfg.extra_compile_args(with_cuda),
            extra_link_args=cfg.extra_link_args(),
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(cmdclass=cmdclass, ext_modules=ext_modules)
