"""The one real cold JIT build of the suite (minutes on 2 cores; marked cold_build).

From an empty TORCH_EXTENSIONS_DIR, with the ninja package's folder off PATH, two processes
import triplet_cuda at once from two different paths holding the same sources (the source tree
and a copy laid out like an installed package): exactly one builds, the other waits for it, and
a third import is silent and reuses the build.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triplet_cuda import _build

REPO = Path(__file__).resolve().parents[1]


def _env(extensions_dir: Path, pythonpath: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    env["PYTHONPATH"] = str(pythonpath)
    env["TRIPLET_CUDA_FORCE_JIT"] = "1"  # an installed ahead-of-time _C must not hide the JIT build
    env["TRIPLET_CUDA_NO_CUDA"] = "1"  # the CPU build: the CUDA sources would take many minutes more
    env.pop("TRIPLET_CUDA_VERBOSE", None)
    ninja_dir = _build.ninja_bin_dir()
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and not (ninja_dir and os.path.realpath(p) == os.path.realpath(ninja_dir))]
    env["PATH"] = os.pathsep.join(path)
    return env


def _import(cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    code = ("import torch, triplet_cuda as tc; print(tc.loaded_from()); "
            "x = torch.randn(6, 3); print(tc.batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1, 2, 2])).item() >= 0)")
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.cold_build
def test_cold_build_once_then_reused_from_another_path(tmp_path):
    # a copy of the package laid out like an installation: triplet_cuda/ with csrc/ inside
    site = tmp_path / "site"
    shutil.copytree(REPO / "triplet_cuda", site / "triplet_cuda",
                    ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "csrc"))
    shutil.copytree(_build.source_root(), site / "triplet_cuda" / "csrc")
    extensions = tmp_path / "torch_extensions"
    env_tree, env_copy = _env(extensions, REPO), _env(extensions, site)
    # With no other ninja on PATH (as on CI and this project's machines), the build below must
    # find the ninja package's binary by itself.
    ninja_off_path = shutil.which("ninja", path=env_tree["PATH"]) is None

    # two first imports at once, from the source tree and from the copy
    procs = [_import(tmp_path, env_tree), _import(tmp_path, env_copy)]
    results = [p.communicate(timeout=3000) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
        loaded, ok = out.split()
        assert loaded.startswith("jit:triplet_cuda_cpu_") and ok == "True", out
    assert results[0][0] == results[1][0]  # the same build, from both paths
    errs = [err for _, err in results]
    building = [e for e in errs if "triplet_cuda: building the C++ ops in" in e]
    assert len(building) == 1, errs
    assert "no cached build for digest" in building[0] and str(extensions) in building[0]
    assert "triplet_cuda: built " in building[0]
    if not ninja_off_path:
        print("note: a system ninja is on PATH; finding the ninja package's binary was not exercised")
    other = errs[1 - errs.index(building[0])]
    assert "building the C++ ops" not in other, other  # it waited ("waiting for pid N to finish building")
    name = results[0][0].split()[0][len("jit:"):]
    assert sorted(p.name for p in extensions.iterdir()) == [name]
    assert (extensions / name / f"{name}.so").is_file()

    # a third import, from the copy: silent, no rebuild
    mtime = (extensions / name / f"{name}.so").stat().st_mtime_ns
    out, err = _import(tmp_path, env_copy).communicate(timeout=600)
    assert out.split()[0] == f"jit:{name}", out
    assert "triplet_cuda:" not in err, err
    assert (extensions / name / f"{name}.so").stat().st_mtime_ns == mtime
