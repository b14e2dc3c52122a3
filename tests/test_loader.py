"""Where the compiled ops came from, and the JIT cache rules: the digest, the build lock, ninja.

The cheap tests here exercise the digest and the lock with a fake build (no compiler); the one
real cold build of the suite is in test_cold_build.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import _build, _loader


def test_loaded_from_reports_a_known_loader():
    where = tc.loaded_from()
    assert isinstance(where, str), where
    prefix, sep, rest = where.partition(":")
    assert sep == ":" and prefix in ("aot", "jit"), where
    assert rest, where


def test_expected_loader():
    # CI sets TRIPLET_CUDA_EXPECT_LOADER to "aot" (installed wheel / `pip install .`) or "jit":
    # this proves which build the tests ran against.
    expected = os.environ.get("TRIPLET_CUDA_EXPECT_LOADER")
    where = tc.loaded_from()
    if not expected:
        return
    assert expected in ("aot", "jit"), f"TRIPLET_CUDA_EXPECT_LOADER must be 'aot' or 'jit', got {expected!r}"
    assert where.split(":", 1)[0] == expected, f"expected the {expected} build, but the ops were loaded from {where!r}"


def test_aot_path_is_the_package_extension():
    where = tc.loaded_from()
    if where.startswith("aot:"):
        path = where[len("aot:"):]
        assert os.path.isfile(path), path
        assert os.path.basename(path).startswith("_C"), path


def test_jit_name_is_the_digest_of_these_sources():
    where = tc.loaded_from()
    if not where.startswith("jit:"):
        pytest.skip(f"ops loaded from {where}")
    build = _loader.JitBuild()
    assert where == f"jit:{build.name}"
    assert build.is_complete(), build.directory


def test_ops_registered_once():
    # loading again is a no-op returning the same origin
    assert _loader.load() == tc.loaded_from()
    assert hasattr(torch.ops.triplet_cuda, "batch_hard_mine")


def test_public_api():
    for name in ["pairwise_distance", "batch_hard_mine", "batch_hard_triplet_loss", "batch_all_triplet_loss",
                 "semi_hard_triplet_loss", "contrastive_loss", "mine_triplets", "TripletLoss", "ContrastiveLoss",
                 "HardMining", "TripletStats", "loaded_from", "reference"]:
        assert hasattr(tc, name), name
    assert tc.HardMining._fields == ("pos_dist", "pos_idx", "neg_dist", "neg_idx")
    assert tc.TripletStats._fields == ("num_valid", "num_positive", "fraction_positive")


# ----------------------------------------------------------------------------- digest
def _copy_sources(dst: Path) -> Path:
    shutil.copytree(_build.source_root(), dst)
    return dst


def test_digest_does_not_depend_on_the_source_path(tmp_path):
    here, _ = _build.build_digest(_build.source_root(), with_cuda=False)
    there, _ = _build.build_digest(_copy_sources(tmp_path / "elsewhere" / "csrc"), with_cuda=False)
    assert here == there
    assert _build.jit_extension_name(here, False) == f"triplet_cuda_cpu_{here[:16]}"


@pytest.mark.parametrize("with_cuda", [False, True])
def test_digest_changes_with_any_source_or_header(tmp_path, with_cuda, monkeypatch):
    monkeypatch.setattr(_build, "cuda_arch_flags", lambda: ["-gencode=arch=compute_80,code=sm_80"])
    if with_cuda:
        monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", "/nonexistent/cuda", raising=False)
    root = _copy_sources(tmp_path / "csrc")
    base, _ = _build.build_digest(root, with_cuda)
    files = _build.source_files(root, with_cuda)
    assert any(f.suffix == ".h" for f in files) and any(f.name == "ops.cpp" for f in files)
    assert any(f.suffix in (".cu", ".cuh") for f in files) == with_cuda
    for f in files:
        original = f.read_bytes()
        f.write_bytes(original + b"\n// edited\n")
        changed, _ = _build.build_digest(root, with_cuda)
        assert changed != base, f"editing {f.relative_to(root)} left the digest unchanged"
        f.write_bytes(original)
    assert _build.build_digest(root, with_cuda)[0] == base
    # a new header changes it too (it may be included by a changed source later)
    (root / "cpu" / "new_header.h").write_text("#pragma once\n")
    assert _build.build_digest(root, with_cuda)[0] != base


def test_cpu_digest_ignores_cuda_sources(tmp_path):
    root = _copy_sources(tmp_path / "csrc")
    base, _ = _build.build_digest(root, with_cuda=False)
    cu = sorted((root / "cuda").glob("*.cu"))[0]
    cu.write_text(cu.read_text() + "\n// edited\n")
    assert _build.build_digest(root, with_cuda=False)[0] == base
    # csrc/cuda/register.cpp (host C++, but CUDA-only) is not part of a CPU build either
    reg = root / "cuda" / "register.cpp"
    reg.write_text(reg.read_text() + "\n// edited\n")
    assert _build.build_digest(root, with_cuda=False)[0] == base


def test_sources_list_cuda_registration_only_with_cuda():
    root = _build.source_root()
    cpu = [Path(s) for s in _build.sources(root, with_cuda=False)]
    gpu = [Path(s) for s in _build.sources(root, with_cuda=True)]
    assert not any(p.parent.name == "cuda" for p in cpu)
    assert root / "cuda" / "register.cpp" in gpu and (root / "cpu" / "register.cpp") in cpu
    assert {p.name for p in gpu if p.suffix == ".cu"} == {p.name for p in (root / "cuda").glob("*.cu")}
    assert set(cpu) < set(gpu)


def test_digest_changes_with_flags_torch_python_and_arch(tmp_path, monkeypatch):
    root = _build.source_root()
    base, inputs = _build.build_digest(root, with_cuda=False)
    assert inputs["torch"] == torch.__version__ and inputs["cflags"] == _build.extra_compile_args(False)["cxx"]
    assert inputs["python_abi"] and inputs["platform"]

    def digest_with(attr, value):
        with monkeypatch.context() as m:
            m.setattr(*attr, value)
            return _build.build_digest(root, with_cuda=False)[0]

    assert digest_with((torch, "__version__"), "0.0.0") != base
    assert digest_with((_build, "extra_compile_args"), lambda with_cuda: {"cxx": ["-O2"], "nvcc": []}) != base
    assert digest_with((_build, "extra_link_args"), lambda: ["-lfoo"]) != base
    assert digest_with((_build.sysconfig, "get_config_var"), lambda name: "cpython-999-x") != base
    assert digest_with((_build, "BUILD_SCHEME"), -1) != base
    with monkeypatch.context() as m:
        m.setenv("CXX", "/opt/some/other/c++")
        assert _build.build_digest(root, with_cuda=False)[0] != base
    # CUDA builds: the architectures are part of the key
    m = monkeypatch
    m.setattr("torch.utils.cpp_extension.CUDA_HOME", "/nonexistent/cuda", raising=False)
    m.setattr(_build, "cuda_arch_flags", lambda: ["-gencode=arch=compute_80,code=sm_80"])
    sm80, _ = _build.build_digest(root, with_cuda=True)
    m.setattr(_build, "cuda_arch_flags", lambda: ["-gencode=arch=compute_90,code=sm_90"])
    sm90, _ = _build.build_digest(root, with_cuda=True)
    assert len({base, sm80, sm90}) == 3


def test_cuda_arch_flags_follow_torch_cuda_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    flags = _build.cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _build.cuda_arch_flags() == ["-gencode=arch=compute_86,code=sm_86"]
    if torch.cuda.device_count() == 0:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
        assert _build.default_cuda_arch_list() == _build.DEFAULT_CUDA_ARCH_LIST
        assert "-gencode=arch=compute_80,code=sm_80" in _build.cuda_arch_flags()
        assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_extensions_root_honours_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _build.extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    from torch.utils.cpp_extension import get_default_build_root

    default = _build.extensions_root()
    assert default.parent == Path(get_default_build_root())
    assert default.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}")


# ----------------------------------------------------------------------------- lock (fake builds)
class FakeBuild:
    """The attributes of _loader.JitBuild that build_locked uses, in a temporary folder."""

    def __init__(self, root: Path, name: str = "triplet_cuda_cpu_00000000deadbeef"):
        self.with_cuda = False
        self.digest = name.rsplit("_", 1)[1] + "0" * 48
        self.inputs = {"fake": True}
        self.name = name
        self.directory = root / name
        self.library = self.directory / f"{name}.so"
        self.marker = self.directory / _loader.MARKER_NAME
        self.lock_path = self.directory / _loader.LOCK_NAME

    def is_complete(self) -> bool:
        return self.marker.is_file() and self.library.is_file()


def _fake_compile(build):
    build.library.write_bytes(b"not really a library")


def test_build_locked_builds_once_and_says_so(tmp_path, capsys):
    build = FakeBuild(tmp_path)
    assert _loader.build_locked(build, _fake_compile) is True
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("triplet_cuda:")]
    assert len(lines) == 2, err
    assert "building the C++ ops in" in lines[0] and str(build.directory) in lines[0]
    assert f"no cached build for digest {build.digest[:16]}" in lines[0]
    assert lines[1].startswith(f"triplet_cuda: built {build.library.name} in ") and lines[1].endswith(" s")
    assert build.is_complete()
    # complete: nothing is rebuilt and nothing is said
    assert _loader.build_locked(build, lambda b: pytest.fail("rebuilt a complete build")) is False
    assert capsys.readouterr().err == ""


def test_build_locked_rebuilds_an_incomplete_build(tmp_path, capsys):
    # a library without the marker (a build killed while linking) is not trusted
    build = FakeBuild(tmp_path)
    build.directory.mkdir(parents=True)
    build.library.write_bytes(b"half a library")
    calls = []
    assert _loader.build_locked(build, lambda b: (calls.append(1), _fake_compile(b))) is True
    assert calls == [1] and build.is_complete()


def test_build_locked_mentions_other_cached_builds(tmp_path, capsys):
    old = FakeBuild(tmp_path, "triplet_cuda_cpu_1111111111111111")
    _loader.build_locked(old, _fake_compile)
    capsys.readouterr()
    _loader.build_locked(FakeBuild(tmp_path), _fake_compile)
    assert "1 other cached build(s) are for other sources or settings" in capsys.readouterr().err


def test_failed_build_leaves_no_marker_and_releases_the_lock(tmp_path):
    build = FakeBuild(tmp_path)

    def failing(b):
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="compiler exploded"):
        _loader.build_locked(build, failing)
    assert not build.marker.exists()
    assert _loader.build_locked(build, _fake_compile) is True  # the lock was released


def test_stale_torch_lock_of_a_killed_build_is_removed(tmp_path, capsys):
    # torch's FileBaton leaves <build dir>/lock behind when its build is SIGKILLed; the next
    # torch build would then wait for it forever
    build = FakeBuild(tmp_path)
    build.directory.mkdir(parents=True)
    stale = build.directory / _loader.TORCH_LOCK_NAME
    stale.write_text("")
    seen = []
    assert _loader.build_locked(build, lambda b: (seen.append(stale.exists()), _fake_compile(b))) is True
    assert seen == [False]
    assert f"removed a stale lock left by an interrupted build: {stale}" in capsys.readouterr().err


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from triplet_cuda import _loader
    with _loader.build_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _spawn(code, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1], **kwargs)


def test_lock_of_a_sigkilled_holder_is_free(tmp_path):
    lock = tmp_path / "b" / _loader.LOCK_NAME
    holder = _spawn(_HOLD_LOCK, lock, 600)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        assert "pid" in lock.read_text()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        start = time.monotonic()
        with _loader.build_lock(lock):
            pass
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.communicate()


_FAKE_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_loader import FakeBuild
    from triplet_cuda import _loader

    def compile_fn(build):
        with open(Path(sys.argv[1]) / "compiles.txt", "a") as f:
            f.write("compiled\\n")
        time.sleep(3)
        build.library.write_bytes(b"fake")

    built = _loader.build_locked(FakeBuild(Path(sys.argv[1])), compile_fn)
    print("built" if built else "reused", flush=True)
""")


def test_concurrent_builds_wait_for_one(tmp_path):
    tests_dir = Path(__file__).resolve().parent
    procs = [_spawn(_FAKE_BUILD, tmp_path, tests_dir)]
    time.sleep(0.2)
    procs.append(_spawn(_FAKE_BUILD, tmp_path, tests_dir))
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    outs = sorted(out.strip() for out, _ in results)
    assert outs == ["built", "reused"], results
    assert (tmp_path / "compiles.txt").read_text() == "compiled\n"
    errs = "".join(err for _, err in results)
    assert errs.count("triplet_cuda: building the C++ ops") == 1, errs
    # whichever started second either waited (and said so) or found the build complete
    waited = [err for out, err in results if out.strip() == "reused"][0]
    assert waited == "" or "waiting for pid" in waited, waited


# ----------------------------------------------------------------------------- ninja
def test_ninja_of_the_ninja_package_is_found_off_path(monkeypatch):
    from torch.utils import cpp_extension

    bin_dir = _build.ninja_bin_dir()
    if bin_dir is None:
        pytest.skip("the ninja package is not installed")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.realpath(p) != os.path.realpath(bin_dir))
    if shutil.which("ninja", path=path):
        path = ""  # a system ninja is on PATH too: take everything away
    monkeypatch.setenv("PATH", path)
    assert not cpp_extension.is_ninja_available()
    with _loader.ninja_on_path():
        assert cpp_extension.is_ninja_available()
        assert os.environ["PATH"].split(os.pathsep)[0] == bin_dir
    assert os.environ["PATH"] == path


def test_no_ninja_at_all_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_build, "ninja_bin_dir", lambda: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match=r"needs ninja.*pip install ninja"):
        with _loader.ninja_on_path():
            pass
