"""Query vs reference set: N anchors mined against M reference rows (a memory bank, a gathered
global batch), forward + backward, against the naive N x M recipe and pytorch-metric-learning's
`ref_emb` path.

    python -m benchmarks.reference_set                     # 4096 x 65536, D=128, float32, CPU
    python -m benchmarks.reference_set --n 512 --m 8192    # smaller

Implementations (the reference set is detached, as in a memory bank; the anchors require grad):
  triplet_cuda   tc.<loss>(x, labels, ref_embeddings=r, ref_labels=rl): row blocks, never N x M
  naive          Gram-matrix distances (N x M), label masks (N x M), masked max / min
  pml            pytorch-metric-learning: BatchHardMiner + TripletMarginLoss with ref_emb (batch
                 hard only)

Each (loss, impl) runs in its own child process: time = median of --reps calls after one
warm-up call; peak memory = growth of the peak RSS over one call (the high-water mark reset
first). Cases whose N x M float32 matrices would not fit are reported as skipped. Results go to
benchmarks/results/<device>/reference-set.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .knn import RESULTS, _device_name, _fmt_bytes, _fmt_s

LOSSES = ("batch_hard", "contrastive")
IMPLS = ("triplet_cuda", "naive", "pml")


def _naive(loss, x, y, r, rl):
    import torch

    sq = x.square().sum(1)[:, None] + r.square().sum(1)[None, :] - 2 * x @ r.T
    d = sq.clamp_min(0).add(1e-12).sqrt()
    same = y[:, None] == rl[None, :]
    if loss == "batch_hard":
        pos = d.masked_fill(~same, float("-inf")).amax(1)
        neg = d.masked_fill(same, float("inf")).amin(1)
        valid = same.any(1) & (~same).any(1)
        return torch.relu(pos - neg + 0.2)[valid].mean()
    return torch.where(same, d.square(), torch.relu(1.0 - d).square()).mean()


def _one(loss: str, impl: str, n: int, m: int, dim: int, reps: int) -> dict:
    import torch

    import triplet_cuda as tc

    from .harness import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    y = torch.randint(0, n // 4, (n,), generator=g)
    r = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=1)
    rl = torch.randint(0, n // 4, (m,), generator=g)

    if impl == "pml":
        from pytorch_metric_learning import losses, miners

        miner, pml_loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)

    def call():
        x.grad = None
        if impl == "triplet_cuda":
            fn = tc.batch_hard_triplet_loss if loss == "batch_hard" else tc.contrastive_loss
            out = fn(x, y, ref_embeddings=r, ref_labels=rl)
        elif impl == "naive":
            out = _naive(loss, x, y, r, rl)
        else:
            idx = miner(x, y, ref_emb=r, ref_labels=rl)
            out = pml_loss(x, y, idx, ref_emb=r, ref_labels=rl)
        out.backward()
        return out

    call()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    trim_heap()
    reset_peak_rss()
    base = rss_bytes() or 0
    call()
    peak = peak_rss_bytes() - base
    return {"loss": loss, "impl": impl, "n": n, "m": m, "dim": dim, "median_s": statistics.median(times),
            "times_s": times, "peak_bytes": peak, "threads": torch.get_num_threads()}


def _skip(loss: str, impl: str, n: int, m: int) -> str | None:
    if impl == "pml" and loss != "batch_hard":
        return "n/a"
    if impl == "triplet_cuda":
        return None
    need = 8 * 4 * n * m  # a handful of N x M float32 / bool matrices and their gradients
    with open("/proc/meminfo") as f:
        avail = 0.7 * 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return None if need <= avail else f"skipped: needs ~{need / 2**30:.0f} GiB"


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"# Query vs reference set, N={meta['n']} anchors x M={meta['m']} reference rows", "",
             f"Device: {meta['device_name']}; torch {meta['torch']}, {meta['threads']} threads; commit {meta['commit']}; "
             f"load average at start {meta['loadavg_start']:.2f}, end {meta['loadavg_end']:.2f}.", "",
             f"Command: `{meta['command']}`", "",
             f"Forward + backward, float32, D={meta['dim']}, anchors requiring grad, reference set detached; time: "
             "median after a warm-up; memory: peak RSS growth over one call.", "",
             "| loss | impl | time | vs triplet_cuda | peak memory |", "|---|---|---:|---:|---:|"]
    by = {(r["loss"], r["impl"]): r for r in doc["rows"]}
    for loss in LOSSES:
        ours = by.get((loss, "triplet_cuda"), {})
        for impl in IMPLS:
            row = by.get((loss, impl))
            if row is None:
                continue
            if "median_s" not in row:
                lines.append(f"| {loss} | {impl} | {row.get('note', '-')} | | |")
                continue
            ratio = f"{row['median_s'] / ours['median_s']:.1f}x" if "median_s" in ours else "-"
            lines.append(f"| {loss} | {impl} | {_fmt_s(row['median_s'])} | {ratio} | {_fmt_bytes(row['peak_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_set", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--m", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--name", default="reference-set")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: loss,impl,n,m,dim,reps
    args = p.parse_args(argv)
    if args.one:
        loss, impl, n, m, dim, reps = args.one.split(",")
        print(json.dumps(_one(loss, impl, int(n), int(m), int(dim), int(reps))))
        return 0

    import torch

    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    meta = {"n": args.n, "m": args.m, "dim": args.dim, "reps": args.reps, "device_name": _device_name("cpu"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit,
            "loadavg_start": os.getloadavg()[0],
            "command": "python -m benchmarks.reference_set " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows = []
    for loss in args.losses.split(","):
        for impl in args.impls.split(","):
            note = _skip(loss, impl, args.n, args.m)
            if note == "n/a":
                continue
            if note:
                rows.append({"loss": loss, "impl": impl, "note": note})
                print(f"{loss} {impl}: {note}", file=sys.stderr)
                continue
            cmd = [sys.executable, "-m", "benchmarks.reference_set", "--one",
                   f"{loss},{impl},{args.n},{args.m},{args.dim},{args.reps}"]
            res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if res.returncode != 0:
                tail = (res.stderr.strip().splitlines() or ["failed"])[-1][:200]
                rows.append({"loss": loss, "impl": impl, "note": f"failed: {tail}"})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{loss} {impl}: {rows[-1].get('median_s', rows[-1].get('note'))}", file=sys.stderr)
    meta["loadavg_end"] = os.getloadavg()[0]
    doc = {"meta": meta, "rows": rows}
    slug = "".join(c if c.isalnum() else "-" for c in meta["device_name"].split(",")[0].lower()).strip("-")
    out = args.out or RESULTS / f"cpu-{slug}-{os.cpu_count()}c"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
