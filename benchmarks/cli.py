"""Command line: ``python -m benchmarks [--quick | --preset NAME] [overrides]``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

import torch

from . import harness, impls, report, sweep


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v)


def _strs(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks triplet_cuda against naive eager PyTorch, torch.compile, "
                    "pytorch-metric-learning (if installed) and the matmul / bytes limits.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + "; ".join(f"{n}: {sweep.preset(n, 'cpu').description}" for n in sweep.PRESETS)
               + ".\nThe grid options override the preset's grid (on explicit-case presets they filter the "
                 "cases).",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=sweep.PRESETS, default=None, help="default: full")
    g.add_argument("--quick", action="store_true", help="same as --preset quick")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--impl", type=_strs, help=f"comma-separated, of {','.join(impls.IMPLS)}")
    g.add_argument("--loss", type=_strs, help=f"comma-separated, of {','.join(impls.LOSSES)}")
    g.add_argument("--pass", dest="passes", type=_strs, help="fwd, fwd+bwd or both (comma-separated)")
    g.add_argument("--n", type=_ints, help="batch sizes, comma-separated (e.g. 256,1024)")
    g.add_argument("--d", type=_ints, help="embedding sizes, comma-separated")
    g.add_argument("--dtype", type=_strs, help="float32,bfloat16,float16 (unsupported ones are skipped)")
    g.add_argument("--k", type=int, help="samples per class (P x K batches; default 4)")
    t = p.add_argument_group("how")
    t.add_argument("--threads", type=int, help="CPU threads (default: every core this process may use)")
    t.add_argument("--min-reps", type=int)
    t.add_argument("--max-reps", type=int)
    t.add_argument("--target-s", type=float, help="seconds of timed repetitions per case (roughly)")
    t.add_argument("--warmup-s", type=float)
    t.add_argument("--max-call-s", type=float, help="skip a case whose extrapolated time per call exceeds it")
    t.add_argument("--mem-budget-gib", type=float, help="default: 80%% of free device memory / available RAM")
    t.add_argument("--timer", choices=("auto", "loop", "triton"))
    iso = t.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one child process per case (default on CPU)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="run cases in this process")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results/<device-slug>/)")
    o.add_argument("--name", default=None, help="file stem (default: the preset, 'custom' with overrides)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--render", type=Path, metavar="JSON",
                   help="only rewrite the Markdown and plots of a results JSON (beside it) and print the tables")
    return p


def build_config(args) -> sweep.SweepConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = "quick" if args.quick else (args.preset or "full")
    if name == "gpu" and args.device is None and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device (add --device cpu to run its cases on the CPU anyway)")
    config = sweep.preset(name, device)
    grid = {"impls": args.impl, "losses": args.loss, "passes": args.passes, "ns": args.n, "ds": args.d,
            "dtypes": args.dtype}
    changes = {k: v for k, v in grid.items() if v}
    if changes and config.cases is not None:
        # an explicit-case preset: keep its cases that match the filters
        keep = []
        for c in config.cases:
            if ((not args.impl or c["impl"] in args.impl) and (not args.loss or c["loss"] in args.loss)
                    and (not args.passes or c["pass"] in args.passes) and (not args.n or c["n"] in args.n)
                    and (not args.d or c["d"] in args.d) and (not args.dtype or c["dtype"] in args.dtype)):
                keep.append(c)
        config = dataclasses.replace(config, cases=keep)
    elif changes:
        config = dataclasses.replace(config, **changes)
    timing = {"k": args.k, "threads": args.threads, "min_reps": args.min_reps, "max_reps": args.max_reps,
              "target_s": args.target_s, "warmup_s": args.warmup_s, "max_call_s": args.max_call_s,
              "timer": args.timer, "isolate": args.isolate}
    config = dataclasses.replace(config, **{k: v for k, v in timing.items() if v is not None})
    if args.mem_budget_gib:
        config = dataclasses.replace(config, mem_budget_bytes=int(args.mem_budget_gib * harness.GIB))
    if changes or args.k:
        config = dataclasses.replace(config, name=args.name or (f"{name}-custom" if name != "full" else "custom"))
    elif args.name:
        config = dataclasses.replace(config, name=args.name)
    for bad in set(config.impls) - set(impls.IMPLS) - {i for i in config.impls if i.startswith("_")}:
        raise SystemExit(f"unknown implementation {bad!r}; choose from {', '.join(impls.IMPLS)}")
    for bad in set(config.losses) - set(impls.LOSSES):
        raise SystemExit(f"unknown loss {bad!r}; choose from {', '.join(impls.LOSSES)}")
    for bad in set(config.passes) - set(harness.PASSES):
        raise SystemExit(f"unknown pass {bad!r}; choose from fwd, fwd+bwd")
    for bad in set(config.dtypes) - set(harness.DTYPES):
        raise SystemExit(f"unknown dtype {bad!r}")
    return config


def run(config: sweep.SweepConfig, *, out_dir: Path | None = None, plots: bool = True, progress: bool = True,
        argv=None, stream=None, step_factory=None) -> dict:
    """Runs a sweep and writes <out>/<name>.json, <name>.md and the plots. Returns the document."""
    stream = sys.stdout if stream is None else stream
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch has no CUDA device here")
    if config.device == "cuda":
        config = dataclasses.replace(config, device=f"cuda:{torch.cuda.current_device()}")
    ok, why = impls.availability(impls.OURS, config.device)  # builds / loads the extension once, up front
    if not ok:
        print(f"note: {why}; its rows are skipped", file=sys.stderr)
    load_before = _loadavg()
    cores = sweep.default_threads()
    threads = config.threads or cores
    if not config.device.startswith("cuda") and load_before and load_before[0] + threads > cores + 0.5:
        print(f"warning: load average {load_before[0]:.2f} on {cores} cores: other processes compete for the "
              "CPU and the times will be inflated (use an idle machine, or fewer --threads)", file=sys.stderr)
    rows, info = sweep.run(config, progress=progress, step_factory=step_factory)
    info["loadavg"] = {"start": load_before, "end": _loadavg()}
    meta = report.collect_meta(config, info, config.device, argv)
    checks = sweep.evaluate_checks(config.checks, rows)
    doc = report.to_document(meta, rows, checks)
    out_dir = Path(out_dir) if out_dir is not None else report.RESULTS_DIR / meta["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, out_dir / f"{config.name}.json")
    _write_report(doc, out_dir, config.name, plots, stream)
    print(f"results: {out_dir / (config.name + '.json')}", file=stream)
    return doc


def _write_report(doc: dict, out_dir: Path, stem: str, plots: bool, stream) -> None:
    """<stem>.md (the tables and links to the plots) and the plots; prints the tables."""
    md = report.markdown(doc)
    notes, md_plots = [], ""
    if plots:
        files, note = report.plot(doc, out_dir, stem)
        if note:
            notes.append(note)
        md_plots = "\n".join(f"![{f.stem}]({f.name})" for f in files)
    (out_dir / f"{stem}.md").write_text(md + ("\n" + md_plots + "\n" if md_plots else ""))
    print(md, file=stream)
    for n in notes:
        print(f"note: {n}", file=stream)


def render(path: Path, plots: bool = True, stream=None) -> dict:
    """Rewrites the Markdown and plots of a saved results JSON."""
    import json

    doc = json.loads(Path(path).read_text())
    errors = report.validate(doc)
    if errors:
        raise SystemExit(f"{path}: not a valid results file: {errors[:3]}")
    _write_report(doc, Path(path).parent, Path(path).stem, plots, sys.stdout if stream is None else stream)
    return doc


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    args = parser().parse_args(argv[1:])
    # torch.compile's internals warn about their own deprecations on every compilation
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
    if args.render:
        render(args.render, plots=not args.no_plots)
        return 0
    config = build_config(args)
    run(config, out_dir=args.out, plots=not args.no_plots, progress=not args.no_progress, argv=argv)
    return 0
