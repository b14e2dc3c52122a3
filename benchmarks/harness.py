"""Measuring one case: inputs, warm-up, timing, peak memory, OOM handling, isolation.

A *case* is one (implementation, loss, pass, N, D, dtype, K) point. ``run_case`` turns it
into one result row (see ``report.ROW_KEYS``) and never raises: an allocation failure is
recorded as ``"OOM"``, anything else as ``"error: ..."``.

Timing
    The first call (compilation, allocator and library start-up) is timed apart
    (``first_call_s``) and followed by warm-up calls; then the number of repetitions is
    chosen from the warm-up estimate (between ``min_reps`` and ``max_reps``, aiming at
    ``target_s`` of measurement) and the median and inter-quartile range of the per-call
    times are kept, with every raw time. The inputs are rotated between calls (several
    copies of the embeddings, each with its own shuffled P x K labels) so a small case is
    not served from a cache warmed by the previous call.
    CUDA: CUDA events around each call, the L2 cache flushed (a 256 MiB buffer zeroed)
    before each, outside the timed region; ``timer="triton"`` uses
    ``triton.testing.do_bench`` instead. CPU: ``time.perf_counter`` around each call
    (CPU ops are synchronous) with the thread count pinned by ``torch.set_num_threads``.

Peak memory (bytes above what was allocated before the call: the inputs do not count)
    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.
    CPU: growth of the process's peak resident set size over one call: freed heap memory is
    returned to the system first (glibc ``malloc_trim``), then the high-water mark is reset
    (``/proc/self/clear_refs``) and ``VmHWM`` read after the call. Without ``clear_refs``
    the growth over the first (cold) call is used instead.

Isolation
    On CPU each case runs in its own child process (``multiprocessing`` "forkserver": the
    server imports torch, triplet_cuda and the baselines once, each case is a cheap fork of
    it), so its peak RSS is its own, and a case killed by the kernel's OOM killer is
    recorded as "OOM" instead of ending the sweep. The child also caps its address space
    (``RLIMIT_AS``) at the memory budget, which turns most would-be kills into an ordinary
    allocation error. On CUDA cases run in-process by default (``torch.OutOfMemoryError``
    is recoverable there, and compiled graphs stay cached).
"""
from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing as mp
import os
import resource
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

GIB = 2**30
MIB = 2**20
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
L2_FLUSH_BYTES = 256 * MIB


@dataclass
class Case:
    impl: str
    loss: str
    pass_: str
    n: int
    d: int
    dtype: str = "float32"
    k: int = 4
    device: str = "cpu"
    margin: float | None = None  # None: the loss's default (0.2, contrastive 1.0)
    seed: int = 0
    min_reps: int = 5
    max_reps: int = 100
    target_s: float = 1.0  # time spent on the timed repetitions, roughly
    warmup_s: float = 0.2  # warm-up after the first call
    rotations: int = 0  # input copies rotated between calls; 0: automatic
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: leave as is
    timer: str = "auto"  # "auto" / "loop" / "triton"
    measure_memory: bool = True
    mem_budget_bytes: int = 0  # for the child's RLIMIT_AS; 0: none
    extra: dict = field(default_factory=dict)

    def key(self):
        return (self.impl, self.loss, self.pass_, self.n, self.d, self.dtype, self.k)

    def describe(self) -> str:
        return f"{self.impl} {self.loss} {self.pass_} N={self.n} D={self.d} {self.dtype}"


# ----------------------------------------------------------------------------- rows
def empty_row(case: Case) -> dict:
    """A result row with every key of the schema (see report.ROW_KEYS), values unset."""
    return {
        "impl": case.impl,
        "loss": case.loss,
        "pass": case.pass_,
        "n": case.n,
        "d": case.d,
        "dtype": case.dtype,
        "k": case.k,
        "status": None,
        "time_s_median": None,
        "time_s_iqr": None,
        "peak_mem_bytes": None,
        "ratio_vs_ours": None,
        "reps": 0,
        "times_s": [],
        "first_call_s": None,
        "mem_estimate_bytes": None,
        "note": "",
    }


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or an allocator's RuntimeError / MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in ("out of memory", "can't allocate", "cannot allocate", "failed to allocate",
                                      "bad_alloc", "alloc"))
    return False


def _note_join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- memory
def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """The process's peak RSS: VmHWM, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    kib = _read_status_kib("VmHWM")
    if kib is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Returns the heap's free memory to the system (glibc), so reusing it shows as growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_ram_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), else total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget_bytes(device: str, fraction: float = 0.8) -> int:
    """fraction of the free device memory (CUDA) or of the available system RAM (CPU)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(fraction * free)
    return int(fraction * available_ram_bytes())


def input_bytes(case: Case, rotations: int) -> int:
    """The embeddings copies, their gradients and the labels the harness allocates."""
    itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    x = case.n * case.d * itemsize
    grads = x if case.pass_ == "fwd+bwd" else 0
    flush = L2_FLUSH_BYTES if case.device.startswith("cuda") else 0
    return rotations * (x + case.n * 8) + grads + flush


def choose_rotations(case: Case) -> int:
    if case.rotations > 0:
        return case.rotations
    itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    x = max(case.n * case.d * itemsize, 1)
    # enough copies to cover a large last-level cache, between 2 and 8
    return int(min(8, max(2, math.ceil(64 * MIB / x))))


# ----------------------------------------------------------------------------- inputs
def pk_labels(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """P x K labels: ceil(n / k) classes of k samples (the last one may be smaller), shuffled."""
    labels = torch.arange(n, dtype=torch.int64) // k
    return labels[torch.randperm(n, generator=generator)]


def make_inputs(case: Case, rotations: int, requires_grad: bool):
    dtype = DTYPES[case.dtype]
    out = []
    for r in range(rotations):
        g = torch.Generator().manual_seed(case.seed * 1000 + r)
        x = torch.randn(case.n, case.d, generator=g).to(device=case.device, dtype=dtype)
        labels = pk_labels(case.n, case.k, g).to(case.device)
        out.append((x.requires_grad_(requires_grad), labels))
    return out


# ----------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _time_loop(call, device: str, reps: int, flush) -> list[float]:
    times = []
    if device.startswith("cuda"):
        events = []
        for i in range(reps):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call(i)
            end.record()
            events.append((start, end))
        _sync(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
    return times


def _time_triton(call, reps: int, est_s: float) -> list[float]:
    from triton.testing import do_bench

    counter = iter(range(1 << 62))
    rep_ms = max(100.0, 1.1 * reps * est_s * 1e3)
    ms = do_bench(lambda: call(next(counter)), warmup=max(25.0, est_s * 1e3), rep=rep_ms, return_mode="all")
    return [t / 1e3 for t in ms]


def _quartiles(times):
    if len(times) < 2:
        return times[0], 0.0
    q = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q[2] - q[0]


def measure(step, inputs, case: Case, row: dict) -> None:
    """Warm-up, peak memory and timing of step(x, labels); fills row in place."""
    device = case.device
    n_in = len(inputs)
    keep = []  # the last output stays alive until the next call, as in a training loop

    def call(i):
        x, labels = inputs[i % n_in]
        out = step(x, labels)
        keep[:] = [out]

    # first call, then warm-up
    cpu = not device.startswith("cuda")
    if cpu and case.measure_memory:  # the fallback where the high-water mark cannot be reset
        gc.collect()
        trim_heap()
        rss0, hwm0 = rss_bytes(), peak_rss_bytes()
    _sync(device)
    t0 = time.perf_counter()
    call(0)
    _sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    cold_growth = None
    if cpu and case.measure_memory:
        hwm1 = peak_rss_bytes()
        # with the RSS before the call: an upper bound (the mark may predate the call);
        # without it, the rise of the mark: a lower bound
        cold_growth = max(0, hwm1 - rss0) if rss0 is not None else max(0, hwm1 - hwm0)
    warm_times = []
    i = 1
    t_warm = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        call(i)
        _sync(device)
        warm_times.append(time.perf_counter() - t1)
        i += 1
        if time.perf_counter() - t_warm >= case.warmup_s or i > 1000:
            break
    est = statistics.median(warm_times[-5:])

    # peak memory over one call
    if case.measure_memory:
        keep.clear()
        row["peak_mem_bytes"], mem_note = _peak_memory(lambda: call(i), device, cold_growth)
        row["note"] = _note_join(row["note"], mem_note)
        i += 1

    # timing
    reps = int(min(case.max_reps, max(case.min_reps, math.ceil(case.target_s / max(est, 1e-9)))))
    use_triton = case.timer == "triton" or (case.timer == "auto" and device.startswith("cuda") and _has_triton())
    times = None
    if use_triton and device.startswith("cuda"):
        try:
            times = _time_triton(call, reps, est)
            row["note"] = _note_join(row["note"], "timer: triton do_bench")
        except Exception as e:  # an older triton without return_mode="all", ...
            row["note"] = _note_join(row["note"], f"triton do_bench failed ({type(e).__name__}), own loop used")
    if times is None:
        flush = None
        if device.startswith("cuda"):
            flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        times = _time_loop(call, device, reps, flush)
        del flush
    keep.clear()
    row["times_s"] = times
    row["reps"] = len(times)
    row["time_s_median"], row["time_s_iqr"] = _quartiles(times)


def _has_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:
        return False
    return True


def _peak_memory(run_once, device: str, cold_growth=None):
    if device.startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        run_once()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base, ""
    gc.collect()
    trim_heap()
    if reset_peak_rss():
        base = rss_bytes()
        run_once()
        return max(0, peak_rss_bytes() - base), ""
    return cold_growth, ("peak RSS growth over the first call (no /proc/self/clear_refs to reset the "
                         "high-water mark after warm-up)")


# ----------------------------------------------------------------------------- one case
def run_case(case: Case, step_factory) -> dict:
    """Runs one case in this process. step_factory(case) -> step(x, labels), or raises
    ``Unavailable`` (recorded as "skipped: ..."). Never raises."""
    from .impls import Unavailable

    row = empty_row(case)
    inputs = step = None
    try:
        if case.threads and not case.device.startswith("cuda"):
            torch.set_num_threads(case.threads)
        rotations = choose_rotations(case)
        step = step_factory(case)
        inputs = make_inputs(case, rotations, requires_grad=getattr(step, "needs_grad", False))
        measure(step, inputs, case, row)
        row["status"] = "ok"
    except Unavailable as e:
        row["status"] = f"skipped: {e}"
    except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt included: the sweep decides)
        if isinstance(e, KeyboardInterrupt):
            raise
        if is_oom(e):
            row["status"] = "OOM"
            row["note"] = _note_join(row["note"], _short(e))
        else:
            row["status"] = f"error: {type(e).__name__}: {_short(e)}"
            row["note"] = _note_join(row["note"], traceback.format_exc(limit=3)[-600:])
    finally:
        del inputs, step
        gc.collect()
        if case.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def _short(e: BaseException, limit: int = 200) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ----------------------------------------------------------------------------- isolation
_PRELOAD = ["benchmarks._preload"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(conn, case_dict: dict) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # be the OOM killer's first choice
            f.write("1000")
    except OSError:
        pass
    case = Case(**case_dict)
    if case.mem_budget_bytes and not case.device.startswith("cuda"):
        try:
            vm = (_read_status_kib("VmSize") or 0) * 1024
            limit = vm + case.mem_budget_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    from .impls import make_step

    row = run_case(case, make_step)
    conn.send(row)
    conn.close()


def run_case_isolated(case: Case, timeout_s: float = 900.0) -> dict:
    """run_case in a child process. A child killed by SIGKILL (the kernel's OOM killer) is
    "OOM"; one that outlives timeout_s is killed and recorded as an error."""
    ctx = _context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, asdict(case)), daemon=True)
    proc.start()
    child_conn.close()
    row = None
    try:
        if parent_conn.poll(timeout_s):
            try:
                row = parent_conn.recv()
            except EOFError:
                row = None
        else:
            proc.kill()
            row = empty_row(case)
            row["status"] = f"error: timeout after {timeout_s:.0f} s"
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
    if row is None:
        row = empty_row(case)
        code = proc.exitcode
        if code == -signal.SIGKILL:
            row["status"] = "OOM"
            row["note"] = "child process killed by SIGKILL (the kernel's OOM killer)"
        else:
            row["status"] = f"error: child process exited with code {code}"
    return row
