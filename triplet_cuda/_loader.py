"""Loads the compiled ops exactly once: the ahead-of-time `_C` if it was built, else a cached JIT build.

The JIT build is cached under a name that carries a digest of everything that determines the
binary (every source and header, torch version, Python ABI, compiler, flags, CUDA
architectures; see `_build.build_digest`): an unchanged build is reused from any source path
or virtual environment, and a changed one gets a new name, so stale code is never loaded.

One process builds, others wait: the build holds an exclusive `flock` on
`<build dir>/triplet_cuda.lock`, which the kernel releases when the process dies, even by
SIGKILL. A lock file of torch's own (`<build dir>/lock`) left by a killed build is therefore
stale whenever we hold ours, and is removed.

A build says so on stderr (one line when it starts, with where and why, one when it ends,
with the time); a warm cache is silent. The lines go to the `triplet_cuda` logger instead
when logging is configured to show its INFO records.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import _build

_lock = threading.Lock()
_loaded_from: str | None = None

log = logging.getLogger("triplet_cuda")

LOCK_NAME = "triplet_cuda.lock"  # ours (flock), inside the build dir
TORCH_LOCK_NAME = "lock"  # torch's FileBaton, inside the build dir
MARKER_NAME = "triplet_cuda_build.json"  # written once the library is complete
LIB_EXT = ".pyd" if os.name == "nt" else ".so"


def load() -> str:
    """Registers torch.ops.triplet_cuda.* and returns where they came from ("aot:<path>" or "jit:<name>").

    TRIPLET_CUDA_FORCE_JIT=1 skips the ahead-of-time build. The JIT build is cached in
    TORCH_EXTENSIONS_DIR (torch's default otherwise) and reused across processes.
    """
    global _loaded_from
    with _lock:
        if _loaded_from is None:
            _loaded_from = _load_aot() or _load_jit()
        return _loaded_from


def loaded_from() -> str | None:
    """Where the compiled ops came from.

    Returns:
        ``"aot:<path of triplet_cuda/_C>"`` for the ahead-of-time build,
        ``"jit:<extension name>"`` for the JIT build (the name ends with the build digest), or
        None before the ops are loaded (they are loaded by ``import triplet_cuda``).

    Example:
        >>> import triplet_cuda as tc
        >>> tc.loaded_from().split(":")[0] in ("aot", "jit")
        True
    """
    return _loaded_from


def _say(message: str) -> None:
    """One line: to the `triplet_cuda` logger if logging shows its INFO records, else to stderr."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
    else:
        print(f"triplet_cuda: {message}", file=sys.stderr, flush=True)


def _load_aot() -> str | None:
    if os.environ.get("TRIPLET_CUDA_FORCE_JIT") == "1":
        return None
    try:
        from . import _C  # noqa: F401  (importing it registers the ops)
    except ImportError:
        return None
    return f"aot:{_C.__file__}"


class JitBuild:
    """Where and under which name the JIT build of the current sources and settings lives."""

    def __init__(self, root: Path | None = None, with_cuda: bool | None = None):
        self.with_cuda = _build.cuda_buildable() if with_cuda is None else with_cuda
        self.source_root = _build.source_root() if root is None else root
        self.digest, self.inputs = _build.build_digest(self.source_root, self.with_cuda)
        self.name = _build.jit_extension_name(self.digest, self.with_cuda)
        self.directory = _build.extensions_root() / self.name
        self.library = self.directory / f"{self.name}{LIB_EXT}"
        self.marker = self.directory / MARKER_NAME
        self.lock_path = self.directory / LOCK_NAME

    def is_complete(self) -> bool:
        return self.marker.is_file() and self.library.is_file()


def _load_jit() -> str:
    build = JitBuild()
    if not build.is_complete():
        build_locked(build, _compile)
    torch.ops.load_library(str(build.library))
    return f"jit:{build.name}"


def build_locked(build: JitBuild, compile_fn) -> bool:
    """Runs compile_fn(build) under the build lock unless the build is (or becomes) complete.

    Returns True when this process built it. compile_fn must leave build.library in place;
    the marker is written here once it returns.
    """
    with build_lock(build.lock_path):
        if build.is_complete():  # another process built it while we waited
            return False
        stale = build.directory / TORCH_LOCK_NAME
        if stale.exists():
            # Only a holder of our lock builds here, so torch's lock is a killed build's leftover.
            stale.unlink()
            _say(f"removed a stale lock left by an interrupted build: {stale}")
        others = sorted(
            p.name for p in build.directory.parent.glob(f"triplet_cuda_{'cuda' if build.with_cuda else 'cpu'}_*")
            if p.name != build.name and (p / MARKER_NAME).is_file()
        )
        why = f"no cached build for digest {build.digest[:16]}"
        if others:
            why += f" ({len(others)} other cached build(s) are for other sources or settings)"
        what = "C++ and CUDA ops" if build.with_cuda else "C++ ops"
        _say(f"building the {what} in {build.directory} ({why}); "
             f"this takes a minute or more, once")
        start = time.monotonic()
        compile_fn(build)
        seconds = time.monotonic() - start
        if not build.library.is_file():
            raise RuntimeError(f"triplet_cuda: the JIT build finished without producing {build.library}")
        record = {"digest": build.digest, "seconds": round(seconds, 1), "built_at": time.time(),
                  "pid": os.getpid(), "inputs": build.inputs}
        tmp = build.marker.with_name(f"{MARKER_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, build.marker)
        _say(f"built {build.library.name} in {seconds:.1f} s")
        return True


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created with its folder), released when the process ends,
    however it ends. Waiting for it says once who holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if not _try_lock(f):
            f.seek(0)
            owner = f.read().strip() or "another process"
            _say(f"waiting for {owner} to finish building (lock: {path})")
            _lock_blocking(f)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
                f.flush()
            _unlock(f)


if os.name == "nt":  # pragma: no cover - the project is built and tested on Linux
    import msvcrt

    def _try_lock(f) -> bool:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock_blocking(f) -> None:
        while not _try_lock(f):
            time.sleep(0.5)

    def _unlock(f) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(f) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock_blocking(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    def _unlock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def ninja_on_path() -> Iterator[None]:
    """Puts the installed `ninja` package's binary on PATH for the build (torch calls `ninja`
    by name, and the package's bin folder is not on PATH when its venv is not activated)."""
    from torch.utils import cpp_extension

    bin_dir = _build.ninja_bin_dir()
    old_path = os.environ.get("PATH")
    if bin_dir and bin_dir not in (old_path or "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + (os.pathsep + old_path if old_path else "")
    try:
        if not cpp_extension.is_ninja_available():
            raise RuntimeError(
                "triplet_cuda: the JIT build needs ninja, found neither `ninja` on PATH nor the ninja "
                "package's binary; install it with `pip install ninja`, or build ahead of time "
                "(TRIPLET_CUDA_BUILD_EXT=1 pip install --no-build-isolation .)"
            )
        yield
    finally:
        if old_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old_path


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Sets os.environ[name] = value for the block (nothing when value is None)."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _compile(build: JitBuild) -> None:
    from torch.utils import cpp_extension

    arch_default = _build.default_cuda_arch_list() if build.with_cuda else None
    with ninja_on_path(), _env("TORCH_CUDA_ARCH_LIST", arch_default):
        try:
            cpp_extension.load(
                name=build.name,
                sources=_build.sources(build.source_root, build.with_cuda),
                extra_cflags=_build.extra_compile_args(False)["cxx"],
                extra_cuda_cflags=_build.extra_compile_args(True)["nvcc"] if build.with_cuda else None,
                extra_ldflags=_build.extra_link_args(),
                build_directory=str(build.directory),
                with_cuda=build.with_cuda,
                is_python_module=False,
                verbose=os.environ.get("TRIPLET_CUDA_VERBOSE") == "1",
            )
        except (RuntimeError, OSError) as e:
            raise RuntimeError(
                f"triplet_cuda: the JIT build of the C++ ops in {build.directory} failed (above: the "
                "compiler's output). It needs a "
                "C++20 compiler (g++ or clang++) and, for CUDA, a toolkit matching torch.version.cuda. "
                "Set TRIPLET_CUDA_VERBOSE=1 to see the compiler output."
            ) from e
