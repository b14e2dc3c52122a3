"""k-nearest-neighbour retrieval (the op behind tc.metrics) against the brute-force recipe.

    python -m benchmarks.knn --preset cpu    # 20k x 20k, D=128, float32, k=10, CPU
    python -m benchmarks.knn --preset gpu    # 100k x 100k on CUDA (when a GPU is there)
    python -m benchmarks.knn --n 5000 --device cpu --impls triplet_cuda,cdist_topk

Both implementations answer the same question: the k nearest other rows of every row of an
(N, D) set (leave-one-out, as Recall@K and mAP@R use it).

  triplet_cuda   tc.metrics.knn(x, k=k): the fused op (row blocks, never N x N)
  cdist_topk     torch.cdist(x, x), the diagonal set to +inf, .topk(k, largest=False):
                 the brute-force recipe (the whole N x N matrix)

Each (impl, N) runs in its own child process: time = median of --reps calls after one warm-up
call; peak memory = growth of the peak RSS over one call (CPU; the high-water mark reset
first) or torch.cuda.max_memory_allocated above the inputs (CUDA). A case whose N x N float32
matrix would not fit in the memory budget is reported as skipped. Results go to
benchmarks/results/<device>/knn-<preset>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    "cpu": {"device": "cpu", "n": [20000], "dim": 128, "k": 10, "reps": 3},
    "gpu": {"device": "cuda", "n": [20000, 100000], "dim": 128, "k": 10, "reps": 5},
    "quick": {"device": "cpu", "n": [2000], "dim": 64, "k": 10, "reps": 3},
}
IMPLS = ("triplet_cuda", "cdist_topk")
RESULTS = Path(__file__).resolve().parent / "results"


def _one(impl: str, n: int, dim: int, k: int, device: str, reps: int) -> dict:
    """Runs in the child: one (impl, N) case -> its row."""
    import torch

    import triplet_cuda as tc

    from .harness import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)

    def call():
        if impl == "triplet_cuda":
            return tc.metrics.knn(x, k=k)
        d = torch.cdist(x, x)
        d.fill_diagonal_(float("inf"))
        return d.topk(k, dim=1, largest=False)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = call()
        sync()
        times.append(time.perf_counter() - t0)
        del out
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        trim_heap()
        reset_peak_rss()
        base = rss_bytes() or 0
        out = call()
        peak = peak_rss_bytes() - base
    return {"impl": impl, "n": n, "dim": dim, "k": k, "device": device, "median_s": statistics.median(times),
            "times_s": times, "peak_bytes": peak, "threads": torch.get_num_threads()}


def _fits(impl: str, n: int, device: str) -> str | None:
    if impl != "cdist_topk":
        return None
    need = 4 * n * n * 1.1
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        avail = 0.8 * free
    else:
        with open("/proc/meminfo") as f:
            avail = 0.8 * 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return None if need <= avail else f"skipped: needs {need / 2**30:.1f} GiB"


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {os.cpu_count()} logical cores"


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _fmt_s(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# knn, preset {m['preset']}", "",
             f"Device: {m['device_name']}; torch {m['torch']}, {m['threads']} threads; commit {m['commit']}; "
             f"load average at start {m['loadavg_start']:.2f}, end {m['loadavg_end']:.2f}.", "",
             f"Command: `{m['command']}`", "",
             f"Leave-one-out k nearest neighbours of N normalised float32 rows, D={m['dim']}, k={m['k']}; "
             "time: median of the calls after a warm-up; memory: peak growth over one call.", "",
             "| N | triplet_cuda time | cdist + topk time | speedup | triplet_cuda peak memory | cdist + topk peak memory |",
             "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["impl"], r["n"]): r for r in doc["rows"]}
    for n in m["n"]:
        ours, base = by.get(("triplet_cuda", n), {}), by.get(("cdist_topk", n), {})
        t_o = _fmt_s(ours["median_s"]) if "median_s" in ours else ours.get("note", "-")
        t_b = _fmt_s(base["median_s"]) if "median_s" in base else base.get("note", "-")
        sp = f"{base['median_s'] / ours['median_s']:.1f}x" if "median_s" in ours and "median_s" in base else "-"
        m_o = _fmt_bytes(ours["peak_bytes"]) if "peak_bytes" in ours else "-"
        m_b = _fmt_bytes(base["peak_bytes"]) if "peak_bytes" in base else "-"
        lines.append(f"| {n} | {t_o} | {t_b} | {sp} | {m_o} | {m_b} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.knn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    p.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], help="N values (comma separated)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: impl,n,dim,k,device,reps
    args = p.parse_args(argv)
    if args.one:
        impl, n, dim, k, device, reps = args.one.split(",")
        print(json.dumps(_one(impl, int(n), int(dim), int(k), device, int(reps))))
        return 0

    import torch

    cfg = dict(PRESETS[args.preset])
    if args.n:
        cfg["n"] = args.n
    if args.device:
        cfg["device"] = args.device
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print("benchmarks.knn: no CUDA device; nothing to run", file=sys.stderr)
        return 1
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    meta = {"preset": args.preset, **cfg, "device_name": _device_name(cfg["device"]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "commit": commit or "unknown", "loadavg_start": os.getloadavg()[0],
            "command": "python -m benchmarks.knn " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows = []
    for n in cfg["n"]:
        for impl in args.impls.split(","):
            skip = _fits(impl, n, cfg["device"])
            if skip:
                rows.append({"impl": impl, "n": n, "note": skip})
                print(f"{impl:>13} N={n}: {skip}", flush=True)
                continue
            one = f"{impl},{n},{cfg['dim']},{cfg['k']},{cfg['device']},{cfg['reps']}"
            proc = subprocess.run([sys.executable, "-m", "benchmarks.knn", "--one", one], cwd=root,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                note = "OOM" if proc.returncode in (-9, 137) else f"failed: {proc.stderr.strip().splitlines()[-1:]}"
                rows.append({"impl": impl, "n": n, "note": note})
                print(f"{impl:>13} N={n}: {note}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{impl:>13} N={n}: {_fmt_s(row['median_s'])}, peak {_fmt_bytes(row['peak_bytes'])}", flush=True)
    meta["loadavg_end"] = os.getloadavg()[0]
    doc = {"meta": meta, "rows": rows}
    slug = meta["device_name"].split(",")[0].lower()
    slug = "".join(c if c.isalnum() else "-" for c in slug).strip("-")
    out = args.out or RESULTS / (f"cuda-{slug}" if cfg["device"] == "cuda" else f"cpu-{slug}-{os.cpu_count()}c")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"knn-{args.preset}.json").write_text(json.dumps(doc, indent=1))
    (out / f"knn-{args.preset}.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {out / f'knn-{args.preset}.md'} (and .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
