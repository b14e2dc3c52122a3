"""Output: the run's metadata, the JSON file, the Markdown tables and the PNG plots.

JSON schema (``SCHEMA_VERSION`` 1), a dict with exactly these top-level keys:

    schema_version  1
    meta            device, device_slug, torch, cuda, triplet_cuda, loaded_from, pml, commit,
                    dirty, command, threads, date, python, platform, preset, config, timer,
                    memory, mem_budget_bytes, isolated, loadavg, wall_s (see META_KEYS)
    results         a list of rows, each with exactly ROW_KEYS:
        impl, loss, pass ("fwd" / "fwd+bwd"), n, d, dtype, k,
        status          "ok" | "OOM" | "skipped: <why>" (e.g. "skipped: needs 12.0 GiB") | "error: <what>"
        time_s_median   seconds per call (null unless ok)
        time_s_iqr      inter-quartile range of the per-call times
        peak_mem_bytes  peak memory above the inputs over one call (see harness.py)
        ratio_vs_ours   time_s_median / triplet_cuda's for the same loss, pass, n, d, dtype, k
        reps, times_s   number of timed calls and every per-call time
        first_call_s    the first call (compilation, start-up), not part of the median
        mem_estimate_bytes  the estimate the budget was checked against
        note            free text: why skipped, memory method caveats, ...
    checks          the bar of a preset (empty otherwise): name, kind, row, versus, value, op,
                    target, met (true / false / null when informational or not measured), note
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from . import impls

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "meta", "results", "checks")
ROW_KEYS = ("impl", "loss", "pass", "n", "d", "dtype", "k", "status", "time_s_median", "time_s_iqr",
            "peak_mem_bytes", "ratio_vs_ours", "reps", "times_s", "first_call_s", "mem_estimate_bytes", "note")
META_KEYS = ("device", "device_slug", "torch", "cuda", "triplet_cuda", "loaded_from", "pml", "commit", "dirty",
             "command", "threads", "date", "python", "platform", "preset", "config", "timer", "memory",
             "mem_budget_bytes", "isolated", "loadavg", "wall_s")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- device, meta
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        dev = torch.device(device)
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"@.*$", "", text)  # the clock
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(device: str) -> str:
    if device.startswith("cuda"):
        return slugify(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu-{slugify(cpu_name()).replace('cpu-', '')}-{os.cpu_count()}c"


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line(argv=None) -> str:
    argv = sys.argv if argv is None else argv
    prog = argv[0] if argv else ""
    if prog.endswith("__main__.py"):
        head = "python -m benchmarks"
    elif prog.endswith("run.py"):
        head = "python benchmarks/run.py"
    else:
        head = shlex.join(["python", prog]) if prog else "python"
    return " ".join([head, shlex.join(argv[1:])]).strip()


def collect_meta(config, info: dict, device: str, argv=None) -> dict:
    ours_version = loaded_from = None
    try:
        ok, _ = impls.availability(impls.OURS, device)
        if ok:
            tc = impls._ours_module()
            ours_version, loaded_from = getattr(tc, "__version__", None), tc.loaded_from()
    except Exception:
        pass
    from . import peers

    dirty = _git("status", "--porcelain", "--", "triplet_cuda", "csrc")
    cuda = device.startswith("cuda")
    return {
        "device": ("cuda: " if cuda else "cpu: ") + device_description(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triplet_cuda": ours_version,
        "loaded_from": loaded_from,
        "pml": peers.version(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(dirty) if dirty is not None else None,
        "command": command_line(argv),
        "threads": info.get("threads"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "preset": config.name,
        "config": config.to_dict(),
        "timer": ("CUDA events, L2 flushed before each call (or triton.testing.do_bench)" if cuda
                  else f"time.perf_counter per call, torch.set_num_threads({info.get('threads')})"),
        "memory": ("torch.cuda.max_memory_allocated() - memory_allocated() before the call" if cuda
                   else "peak RSS growth over one call in a child process (malloc_trim, clear_refs, VmHWM)"
                   if info.get("isolated") else "peak RSS growth over one call, in-process (malloc_trim, "
                                                "clear_refs, VmHWM)"),
        "mem_budget_bytes": info.get("mem_budget_bytes"),
        "isolated": info.get("isolated"),
        "loadavg": info.get("loadavg"),
        "wall_s": info.get("wall_s"),
    }


# ----------------------------------------------------------------------------- JSON
def _finite(v):
    """JSON has no NaN / infinity: they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def to_document(meta: dict, rows: list[dict], checks: list[dict]) -> dict:
    results = [{k: _finite(r.get(k)) for k in ROW_KEYS} for r in rows]
    checks = [_finite(c) for c in checks]
    return {"schema_version": SCHEMA_VERSION, "meta": {k: meta.get(k) for k in META_KEYS}, "results": results,
            "checks": list(checks)}


def validate(doc: dict) -> list[str]:
    """The schema violations of a document (an empty list when it is valid)."""
    errors = []
    if tuple(doc) != TOP_KEYS:
        errors.append(f"top-level keys {tuple(doc)} != {TOP_KEYS}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        errors.append(f"schema_version {doc.get('schema_version')!r} != {SCHEMA_VERSION}")
    meta = doc.get("meta", {})
    if tuple(meta) != META_KEYS:
        errors.append(f"meta keys {tuple(meta)} != {META_KEYS}")
    for i, r in enumerate(doc.get("results", [])):
        if tuple(r) != ROW_KEYS:
            errors.append(f"results[{i}] keys {tuple(r)} != {ROW_KEYS}")
            continue
        st = r["status"]
        if not (st in ("ok", "OOM") or str(st).startswith(("skipped: ", "error: "))):
            errors.append(f"results[{i}] status {st!r}")
        if r["pass"] not in ("fwd", "fwd+bwd"):
            errors.append(f"results[{i}] pass {r['pass']!r}")
        if st == "ok" and not isinstance(r["time_s_median"], float):
            errors.append(f"results[{i}] ok without a time")
    return errors


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- Markdown
def fmt_time(s) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b} B"


def _status_cell(r: dict) -> str:
    st = r["status"]
    if st.startswith("error: "):
        return "error: " + st[7:].split(":")[0]
    return st.replace("|", "/")


def _impl_order(rows):
    order = [i for i in impls.IMPLS if any(r["impl"] == i for r in rows)]
    return order + sorted({r["impl"] for r in rows} - set(order))


def _label(impl: str) -> str:
    return impls.IMPLS[impl].label if impl in impls.IMPLS else impl


def markdown(doc: dict) -> str:
    meta, rows, checks = doc["meta"], doc["results"], doc["checks"]
    out = [f"## triplet_cuda benchmarks: {meta['preset']}", ""]
    commit = (meta.get("commit") or "?")[:10] + ("+dirty" if meta.get("dirty") else "")
    out.append(f"- device: {meta['device']}; threads: {meta['threads']}; torch {meta['torch']}; "
               f"triplet_cuda {meta.get('triplet_cuda')} ({meta.get('loaded_from')}); "
               f"pytorch-metric-learning {meta.get('pml') or 'not installed'}")
    load = meta.get("loadavg") or {}
    load_txt = ""
    if load.get("start") and load.get("end"):
        load_txt = f"; load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end"
    out.append(f"- commit {commit}; {meta['date']}; `{meta['command']}`{load_txt}")
    out.append(f"- time: median per call over the timed repetitions ({meta['timer']}); "
               "`(Nx)`: time / triplet_cuda's time in the same row (> 1: triplet_cuda is faster)")
    out.append(f"- memory: {meta['memory']}")
    out.append("")
    if checks:
        out += ["### Bar", "", "| check | measured | target | met |", "|---|---:|---:|---|"]
        for c in checks:
            out.append(f"| {c['name']} | {_fmt_check(c, c['value'])} | "
                       f"{(c['op'] + ' ' + _fmt_check(c, c['target'])) if c['target'] is not None else '-'} | "
                       f"{_fmt_met(c)} |")
        out.append("")
    order = _impl_order(rows)
    groups = {}
    for r in rows:
        groups.setdefault((r["loss"], r["pass"], r["n"], r["d"], r["dtype"], r["k"]), {})[r["impl"]] = r
    head = "| loss | pass | N | D | dtype | " + " | ".join(_label(i) for i in order) + " |"
    sep = "|---|---|---:|---:|---|" + "---:|" * len(order)
    for title, cell in (("Time", _time_cell), ("Peak memory (growth over one call)", _mem_cell)):
        out += [f"### {title}", "", head, sep]
        for key, by_impl in groups.items():
            loss, pass_, n, d, dtype, _ = key
            cells = [cell(by_impl.get(i)) for i in order]
            out.append(f"| {loss} | {pass_} | {n} | {d} | {dtype} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _time_cell(r) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return _status_cell(r)
    t = fmt_time(r["time_s_median"])
    if r["impl"] != impls.OURS and r["ratio_vs_ours"] is not None:
        t += f" ({r['ratio_vs_ours']:.3g}x)"
    return t


def _mem_cell(r) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return _status_cell(r)
    return fmt_bytes(r["peak_mem_bytes"])


def _fmt_check(c, v) -> str:
    if v is None:
        return "-"
    if c["kind"] in ("speedup", "time_ratio"):
        return f"{v:.3g}x"
    if c["kind"] == "time":
        return fmt_time(v)
    if c["kind"] == "memory":
        return fmt_bytes(v)
    return f"{v:.3g}"


def _fmt_met(c) -> str:
    if c["met"] is None:
        return c["note"] or ("info" if c["target"] is None else "not measured")
    return "yes" if c["met"] else "**no**"


# ----------------------------------------------------------------------------- plots
def _color(impl: str) -> str:
    """One fixed colour per implementation, whatever is missing from a panel."""
    names = list(impls.IMPLS)
    i = names.index(impl) if impl in names else len(names) + sum(map(ord, impl)) % 4
    return f"C{i % 10}"


def plot(doc: dict, out_dir: Path, stem: str) -> tuple[list[Path], str]:
    """Time vs N and peak memory vs N, log-log, one line per implementation: one PNG per
    (metric, pass, dtype), one panel per (D, loss). Returns (files, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install matplotlib)"
    rows = [r for r in doc["results"] if r["status"] == "ok"]
    files = []
    combos = sorted({(r["pass"], r["dtype"]) for r in rows})
    for metric, key, ylabel in (("time", "time_s_median", "time per call (s)"),
                                ("memory", "peak_mem_bytes", "peak memory growth (bytes)")):
        for pass_, dtype in combos:
            sub = [r for r in rows if r["pass"] == pass_ and r["dtype"] == dtype and r[key]]
            ds = sorted({r["d"] for r in sub})
            losses = [loss for loss in impls.LOSSES if any(r["loss"] == loss for r in sub)]
            if not ds or not losses:
                continue
            fig, axes = plt.subplots(len(ds), len(losses), figsize=(4.2 * len(losses), 3.4 * len(ds)),
                                     squeeze=False)
            for a, d in enumerate(ds):
                for b, loss in enumerate(losses):
                    ax = axes[a][b]
                    for impl in _impl_order(sub):
                        pts = sorted((r["n"], r[key]) for r in sub if r["impl"] == impl and r["d"] == d
                                     and r["loss"] == loss)
                        if not pts:
                            continue
                        style = "--" if impl in ("matmul", "read_once") else "-"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3,
                                label=_label(impl), color=_color(impl),
                                linewidth=2.2 if impl == impls.OURS else 1.2)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_title(f"{loss}, D={d}", fontsize=10)
                    ax.set_xlabel("N")
                    ax.set_ylabel(ylabel)
                    ax.grid(True, which="both", alpha=0.3)
            handles, labels = {}, {}
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
            fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)),
                       fontsize=9, frameon=False)
            fig.suptitle(f"{doc['meta']['device']}: {metric}, {pass_}, {dtype}", fontsize=11)
            fig.tight_layout(rect=(0, 0.06, 1, 0.95))
            path = out_dir / f"{stem}-{metric}-{pass_.replace('+', '')}-{dtype}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files, ""
