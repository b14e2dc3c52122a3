"""Sweeps: presets, the list of cases, running them, ratios and bar checks.

A sweep is either a grid (impls x losses x passes x N x D x dtypes, K fixed) or an
explicit list of cases (the bar presets). Cases run in order of increasing N within each
series (impl, loss, pass, D, dtype), so a series stops early: after an OOM the larger N are
"skipped: OOM at N=...", and a case whose time per call, extrapolated from the previous N,
exceeds ``max_call_s`` is "skipped: est. X s per call". Before running, each case's memory
is estimated (impls.mem_estimate) and a case over the budget is "skipped: needs X GiB".
Nothing a case does stops the sweep.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import harness, impls
from .harness import GIB, MIB, Case

ALL_DTYPES = ("float32", "bfloat16", "float16")
ALL_IMPLS = impls.DEFAULT_IMPLS
ALL_LOSSES = impls.LOSSES
FULL_NS = tuple(256 * 2**i for i in range(9))  # 256 ... 65536


@dataclass
class Check:
    """One line of a bar: a measured value against a target.

    kind: "speedup"    time(versus) / time(row)   (how many times faster row is)
          "time_ratio" time(row) / time(versus)
          "time"       time(row) in seconds
          "memory"     peak memory growth of row in bytes
    row, versus: selectors, dicts of impl / loss / pass / n / d / dtype.
    op, target: ">=" / "<" / "<=" / ">" and the number, or None (informational).
    """

    name: str
    kind: str
    row: dict
    versus: dict | None = None
    op: str | None = None
    target: float | None = None


@dataclass
class SweepConfig:
    name: str = "custom"
    device: str = "cpu"
    impls: tuple = ALL_IMPLS
    losses: tuple = ALL_LOSSES
    passes: tuple = harness.PASSES
    ns: tuple = FULL_NS
    ds: tuple = (64, 128, 512)
    dtypes: tuple = ALL_DTYPES
    k: int = 4
    cases: list | None = None  # explicit cases: dicts of impl, loss, pass, n, d, dtype
    checks: list = field(default_factory=list)
    min_reps: int = 5
    max_reps: int = 100
    target_s: float = 1.0
    warmup_s: float = 0.2
    threads: int = 0  # 0: every core the process may use (CPU)
    mem_budget_bytes: int = 0  # 0: 80% of free device memory / available RAM
    mem_fraction: float = 0.8
    isolate: bool | None = None  # None: yes on CPU, no on CUDA
    max_call_s: float = 60.0  # skip a case whose extrapolated time per call exceeds this
    case_timeout_s: float = 900.0  # isolated cases only
    timer: str = "auto"
    seed: int = 0
    description: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["checks"] = [dataclasses.asdict(c) for c in self.checks]
        return d


# ----------------------------------------------------------------------------- presets
def _sel(impl, loss, pass_, n, d=128, dtype="float32"):
    return {"impl": impl, "loss": loss, "pass": pass_, "n": n, "d": d, "dtype": dtype}


def preset(name: str, device: str) -> SweepConfig:
    """The named presets: full, quick, cpu-bar, gpu."""
    cuda = device.startswith("cuda")
    if name == "full":
        return SweepConfig(name="full", device=device, warmup_s=0.1 if cuda else 0.2,
                           max_call_s=10.0 if cuda else 60.0,
                           description="every implementation, loss and pass; N 256..65536, D 64/128/512, "
                                       "every dtype the device supports")
    if name == "quick":
        return SweepConfig(name="quick", device=device, passes=("fwd+bwd",), ns=(256, 512), ds=(64,),
                           dtypes=("float32",), min_reps=3, max_reps=50, target_s=0.2, warmup_s=0.05,
                           max_call_s=1.0, case_timeout_s=120.0,
                           description="smoke run: every implementation and loss, fwd+bwd, N 256/512, D 64, "
                                       "float32 (under 2 minutes on 2 CPU cores)")
    if name == "cpu-bar":
        return _cpu_bar(device)
    if name == "gpu":
        return _gpu_bar(device)
    raise ValueError(f"unknown preset {name!r} (full, quick, cpu-bar, gpu)")


PRESETS = ("full", "quick", "cpu-bar", "gpu")


def _cpu_bar(device: str) -> SweepConfig:
    """The foundation issue's CPU bar: fwd+bwd, float32, D=128, K=4."""
    fb = "fwd+bwd"
    cases = [
        _sel(impls.OURS, "batch_hard", fb, 4096), _sel("naive", "batch_hard", fb, 4096),
        _sel("pml", "batch_hard", fb, 4096),
        _sel(impls.OURS, "batch_hard", fb, 20000), _sel("naive", "batch_hard", fb, 20000),
        _sel(impls.OURS, "batch_all", fb, 512), _sel("naive", "batch_all", fb, 512),
        _sel(impls.OURS, "batch_all", fb, 2048), _sel("pml", "batch_all", fb, 2048),
        _sel(impls.OURS, "batch_all", fb, 4096),
    ]
    o = impls.OURS
    checks = [
        Check("batch hard, N=4096: speedup vs naive eager", "speedup", _sel(o, "batch_hard", fb, 4096),
              _sel("naive", "batch_hard", fb, 4096), ">=", 4.0),
        Check("batch hard, N=4096: speedup vs pytorch-metric-learning", "speedup", _sel(o, "batch_hard", fb, 4096),
              _sel("pml", "batch_hard", fb, 4096), ">=", 4.0),
        Check("batch hard, N=20000: peak memory growth (triplet_cuda)", "memory", _sel(o, "batch_hard", fb, 20000),
              None, "<", 200.0 * MIB),
        Check("batch hard, N=20000: peak memory growth (naive eager, where it fits)", "memory",
              _sel("naive", "batch_hard", fb, 20000)),
        Check("batch all, N=512: speedup vs naive eager", "speedup", _sel(o, "batch_all", fb, 512),
              _sel("naive", "batch_all", fb, 512), ">=", 100.0),
        Check("batch all, N=2048: speedup vs pytorch-metric-learning", "speedup", _sel(o, "batch_all", fb, 2048),
              _sel("pml", "batch_all", fb, 2048), ">=", 10.0),
        Check("batch all, N=4096: time (triplet_cuda alone)", "time", _sel(o, "batch_all", fb, 4096), None,
              "<", 1.0),
    ]
    return SweepConfig(name="cpu-bar", device=device, cases=cases, checks=checks, min_reps=5, max_reps=30,
                       target_s=2.0, warmup_s=0.2, max_call_s=600.0,
                       description="the foundation issue's CPU bar: fwd+bwd, float32, D=128, K=4, "
                                   "against naive eager and pytorch-metric-learning")


def _gpu_bar(device: str) -> SweepConfig:
    """The CUDA bar (issue 3). The targets are not encoded: the values are reported."""
    fb, fw = "fwd+bwd", "fwd"
    o = impls.OURS
    cases = [_sel(i, "batch_hard", fb, 8192) for i in (o, "naive", "compile", "pml")]
    for dt in ("bfloat16", "float32"):
        cases += [_sel(o, "batch_hard", fw, 16384, 256, dt), _sel("matmul", "batch_hard", fw, 16384, 256, dt)]
    cases += [_sel(o, "batch_hard", fb, 65536), _sel(o, "batch_all", fb, 8192)]
    checks = [
        Check(f"batch hard fwd+bwd, N=8192: speedup vs {impls.IMPLS[i].label}", "speedup",
              _sel(o, "batch_hard", fb, 8192), _sel(i, "batch_hard", fb, 8192))
        for i in ("naive", "compile", "pml")
    ]
    checks += [
        Check(f"fused batch-hard fwd, N=16384, D=256, {dt}: time / torch.matmul(x, x.T)", "time_ratio",
              _sel(o, "batch_hard", fw, 16384, 256, dt), _sel("matmul", "batch_hard", fw, 16384, 256, dt))
        for dt in ("bfloat16", "float32")
    ]
    checks += [
        Check("batch hard fwd+bwd, N=65536: peak memory growth", "memory", _sel(o, "batch_hard", fb, 65536)),
        Check("batch all fwd+bwd, N=8192: time / batch hard's", "time_ratio", _sel(o, "batch_all", fb, 8192),
              _sel(o, "batch_hard", fb, 8192)),
    ]
    return SweepConfig(name="gpu", device=device, cases=cases, checks=checks, min_reps=10, max_reps=200,
                       target_s=1.0, warmup_s=0.2, max_call_s=30.0, isolate=False,
                       description="the CUDA bar: batch hard fwd+bwd N=8192 D=128 fp32 vs naive/compile/PML; "
                                   "fused batch-hard fwd N=16384 D=256 bf16/fp32 vs torch.matmul(x, x.T); "
                                   "batch hard fwd+bwd N=65536 peak memory; batch all vs batch hard fwd+bwd N=8192")


# ----------------------------------------------------------------------------- device facts
def dtype_supported(device: str, dtype: str) -> bool:
    dt = harness.DTYPES[dtype]
    if device.startswith("cuda"):
        if dt == torch.bfloat16:
            return torch.cuda.is_bf16_supported()
        return True
    try:
        a = torch.ones(4, 4, dtype=dt, device=device)
        (a @ a.T).sum().item()
        return True
    except Exception:
        return False


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- the case list
def plan(config: SweepConfig) -> list[dict]:
    """The case selectors, in run order."""
    if config.cases is not None:
        cases = [dict(c) for c in config.cases]
        return sorted(cases, key=lambda c: (c["dtype"], c["d"], c["loss"], c["pass"], c["n"]))
    out = []
    for dtype in config.dtypes:
        for d in config.ds:
            for loss in config.losses:
                for pass_ in config.passes:
                    for n in config.ns:
                        for impl in config.impls:
                            out.append({"impl": impl, "loss": loss, "pass": pass_, "n": n, "d": d, "dtype": dtype})
    return out


_CUBIC = {("naive", "batch_all"), ("naive", "semi_hard"), ("compile", "batch_all"), ("compile", "semi_hard")}


def _exponent(impl: str, loss: str) -> float:
    if (impl, loss) in _CUBIC:
        return 3.0
    return 1.0 if impl == "read_once" else 2.0


def _series_key(sel: dict):
    loss = "*" if _is_limit(sel["impl"]) else sel["loss"]
    return (sel["impl"], loss, sel["pass"], sel["d"], sel["dtype"])


def _is_limit(impl: str) -> bool:
    return impl in impls.IMPLS and impls.IMPLS[impl].loss_independent


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=harness.DTYPES[dtype]).element_size()


# ----------------------------------------------------------------------------- running
class _Progress:
    """tqdm when installed, else one line per case on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.i, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def start(self, desc: str):
        self.t0 = time.perf_counter()
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(desc[:60])
        else:
            print(f"[{self.i + 1}/{self.total}] {desc} ...", end="", file=sys.stderr, flush=True)

    def done(self, status: str, seconds: float | None):
        self.i += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        else:
            t = f" {seconds * 1e3:.3g} ms" if seconds is not None else ""
            print(f" {status}{t} [{time.perf_counter() - self.t0:.1f} s]", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(config: SweepConfig, *, progress: bool = True, step_factory=None) -> tuple[list[dict], dict]:
    """Runs every case of the sweep. Returns (rows, run_info). Never raises for a case.

    step_factory: for in-process runs, the factory of steps (default impls.make_step); the
    tests pass their own. Isolated runs always use impls.make_step in the child.
    """
    device = config.device
    cuda = device.startswith("cuda")
    isolate = (not cuda) if config.isolate is None else config.isolate
    threads = config.threads or (0 if cuda else default_threads())
    budget = config.mem_budget_bytes or harness.default_budget_bytes(device, config.mem_fraction)
    step_factory = step_factory or impls.make_step

    selectors = plan(config)
    available = {}
    for impl in {s["impl"] for s in selectors}:
        available[impl] = impls.availability(impl, device)
    dtype_ok = {dt: dtype_supported(device, dt) for dt in {s["dtype"] for s in selectors}}

    rows: list[dict] = []
    limit_cache: dict = {}
    last_ok: dict = {}  # series -> (n, median seconds)
    failed_at: dict = {}  # series -> N of an OOM
    bar = _Progress(len(selectors), progress)
    t_start = time.time()
    threads_before = torch.get_num_threads()
    try:
        for sel in selectors:
            case = Case(impl=sel["impl"], loss=sel["loss"], pass_=sel["pass"], n=sel["n"], d=sel["d"],
                        dtype=sel["dtype"], k=config.k, device=device, seed=config.seed,
                        min_reps=config.min_reps, max_reps=config.max_reps, target_s=config.target_s,
                        warmup_s=config.warmup_s, threads=threads, timer=config.timer,
                        mem_budget_bytes=budget)
            bar.start(case.describe())
            row = _run_one(case, sel, config, isolate, budget, available, dtype_ok, limit_cache, last_ok,
                           failed_at, step_factory)
            rows.append(row)
            bar.done(row["status"], row["time_s_median"])
    finally:
        bar.close()
        torch.set_num_threads(threads_before)  # in-process cases set it (harness.run_case)
    add_ratios(rows)
    info = {"threads": threads, "isolated": isolate, "mem_budget_bytes": budget,
            "wall_s": time.time() - t_start}
    return rows, info


def _run_one(case, sel, config, isolate, budget, available, dtype_ok, limit_cache, last_ok, failed_at,
             step_factory) -> dict:
    series = _series_key(sel)
    limit_key = (case.impl, case.pass_, case.n, case.d, case.dtype) if _is_limit(case.impl) else None
    if limit_key is not None and limit_key in limit_cache:
        row = dict(limit_cache[limit_key], loss=case.loss)
        return row

    row = harness.empty_row(case)
    est = impls.mem_estimate(case.impl, case.loss, case.pass_, case.n, case.d, _itemsize(case.dtype), case.k)
    est += harness.input_bytes(case, harness.choose_rotations(case))
    row["mem_estimate_bytes"] = est

    ok, why = available.get(case.impl, (True, ""))
    impl = impls.IMPLS.get(case.impl)
    if not ok:
        row["status"] = f"skipped: {why}"
    elif impl is not None and case.loss not in impl.losses:
        row["status"] = f"skipped: {case.impl} has no {case.loss} loss"
    elif not dtype_ok.get(case.dtype, True):
        row["status"] = f"skipped: {case.dtype} not supported on {case.device}"
    elif est > budget:
        row["status"] = f"skipped: needs {est / GIB:.1f} GiB"
        row["note"] = f"estimated peak {est / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB"
    elif series in failed_at and failed_at[series] < case.n:
        row["status"] = f"skipped: OOM at N={failed_at[series]}"
    elif series in last_ok and config.max_call_s:
        n0, t0 = last_ok[series]
        guess = t0 * (case.n / n0) ** _exponent(case.impl, case.loss)
        if guess > config.max_call_s:
            row["status"] = f"skipped: est. {guess:.3g} s per call"
            row["note"] = f"extrapolated from N={n0} ({t0:.3g} s); limit {config.max_call_s:g} s"
    if row["status"] is None:
        if isolate:
            row = harness.run_case_isolated(case, timeout_s=config.case_timeout_s)
        else:
            row = harness.run_case(case, step_factory)
        row["mem_estimate_bytes"] = est
        if row["status"] == "ok":
            last_ok[series] = (case.n, row["time_s_median"])
        elif row["status"] == "OOM":
            failed_at.setdefault(series, case.n)
    if limit_key is not None:
        note = "loss-independent: measured once per shape"
        row["note"] = f"{row['note']}; {note}" if row["note"] else note
        limit_cache[limit_key] = row
    return row


def _row_key(r: dict):
    return (r["loss"], r["pass"], r["n"], r["d"], r["dtype"], r["k"])


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_ours = time / triplet_cuda's time for the same loss, pass, N, D, dtype, K."""
    ours = {_row_key(r): r["time_s_median"] for r in rows if r["impl"] == impls.OURS and r["status"] == "ok"}
    for r in rows:
        t0 = ours.get(_row_key(r))
        if r["status"] == "ok" and t0 and r["time_s_median"] is not None:
            r["ratio_vs_ours"] = r["time_s_median"] / t0
        else:
            r["ratio_vs_ours"] = None


# ----------------------------------------------------------------------------- checks
def _find(rows, sel: dict):
    for r in rows:
        if all(r.get(k) == v for k, v in sel.items()):
            return r
    return None


def evaluate_checks(checks: list, rows: list[dict]) -> list[dict]:
    out = []
    for c in checks:
        row = _find(rows, c.row)
        vs = _find(rows, c.versus) if c.versus else None
        value, why = None, ""
        if row is None or row["status"] != "ok":
            why = f"{c.row['impl']}: {row['status'] if row else 'not run'}"
        elif c.versus and (vs is None or vs["status"] != "ok"):
            why = f"{c.versus['impl']}: {vs['status'] if vs else 'not run'}"
        elif c.kind == "speedup":
            value = vs["time_s_median"] / row["time_s_median"]
        elif c.kind == "time_ratio":
            value = row["time_s_median"] / vs["time_s_median"]
        elif c.kind == "time":
            value = row["time_s_median"]
        elif c.kind == "memory":
            value = row["peak_mem_bytes"]
            if value is None:
                why = "peak memory not measured"
        met = None
        if value is not None and c.op is not None and c.target is not None:
            met = {">=": value >= c.target, ">": value > c.target, "<": value < c.target,
                   "<=": value <= c.target}[c.op]
        out.append({"name": c.name, "kind": c.kind, "row": c.row, "versus": c.versus, "value": value,
                    "op": c.op, "target": c.target, "met": met, "note": why})
    return out
