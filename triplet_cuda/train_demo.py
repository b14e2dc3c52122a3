"""Train a small embedding network on scikit-learn's handwritten digits with a fused triplet loss.

    python -m triplet_cuda [--mining batch_hard] [--metric euclidean] [--margin 0.2]
                           [--epochs 15] [--batch-size 10x16] [--device cuda|cpu]
                           [--seed 0] [--out triplet_cuda_run]

The 1797 8 x 8 digit images ship inside scikit-learn (no download). 30 % of each class is held
out. An MLP (64 -> 128 -> 128 -> 32, L2-normalised output) is trained with Adam on P x K
batches (P classes, K images each) and the fused loss of --mining. Every epoch prints the mean
loss, the fraction of active triplets (the loss's return_stats), the mean step time and the
held-out Recall@1; before and after training it prints the held-out Recall@1, Recall@5 and mAP@R
(triplet_cuda.metrics, leave-one-out retrieval within the held-out set). The loss's forward +
backward is also timed on every step's embeddings with the naive Gram-matrix mask recipe
(triplet_cuda.naive) for a side-by-side line. Writes <out>/digits.png (2-D PCA of the held-out
embeddings before / after, loss and Recall@1 curves) and <out>/metrics.json.

Deterministic for a seed on a given device and thread count. Needs scikit-learn and matplotlib:
pip install "triplet_cuda[demo]" (from a checkout: pip install ".[demo]").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import triplet_cuda as tc
from triplet_cuda import naive

LOSSES = {
    "batch_hard": tc.batch_hard_triplet_loss,
    "batch_all": tc.batch_all_triplet_loss,
    "semi_hard": tc.semi_hard_triplet_loss,
}
HOLDOUT_FRACTION = 0.3
EMBEDDING_DIM = 32


def _pk(text: str) -> tuple[int, int]:
    try:
        p, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P x K like 10x16, got {text!r}") from None
    if not (1 <= p <= 10) or k < 2:
        raise argparse.ArgumentTypeError(f"need 1 <= P <= 10 (digits has 10 classes) and K >= 2, got {text!r}")
    return p, k


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m triplet_cuda", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mining", choices=tuple(LOSSES), default="batch_hard",
                        help="triplet mining / loss: batch_hard (hardest positive and negative per anchor), "
                             "batch_all (every valid triplet, mean over the active ones) or semi_hard "
                             "(FaceNet's semi-hard negatives). Default: %(default)s")
    parser.add_argument("--metric", choices=("euclidean", "squared_euclidean", "cosine"), default="euclidean",
                        help="distance of the loss and of the retrieval metrics. Default: %(default)s")
    parser.add_argument("--margin", type=float, default=0.2,
                        help="triplet margin (embeddings are L2-normalised: euclidean distances lie in [0, 2]). "
                             "Default: %(default)s")
    parser.add_argument("--epochs", type=_positive_int, default=15, help="passes over the training split. Default: %(default)s")
    parser.add_argument("--batch-size", type=_pk, default=(10, 16), metavar="PxK",
                        help="P classes x K images per batch, e.g. 10x16 (N = P * K). Default: 10x16")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the initialisation and the batches. Default: %(default)s")
    parser.add_argument("--out", default="triplet_cuda_run",
                        help="output folder for digits.png and metrics.json (created). Default: %(default)s")
    return parser


def load_digits_split(seed: int):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], float32; a stratified split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit('python -m triplet_cuda needs scikit-learn: pip install "triplet_cuda[demo]"') from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        members = torch.nonzero(y == c)[:, 0]
        members = members[torch.randperm(members.numel(), generator=g)]
        n_test = round(HOLDOUT_FRACTION * members.numel())
        test.append(members[:n_test])
        train.append(members[n_test:])
    train, test = torch.cat(train).sort().values, torch.cat(test).sort().values
    return x[train], y[train], x[test], y[test]


def pk_batches(labels: torch.Tensor, p: int, k: int, g: torch.Generator):
    """One epoch of P x K index batches: len(labels) // (P * K) batches, each P distinct classes
    with K distinct images each (with replacement only for a class smaller than K)."""
    classes = labels.unique()
    members = [torch.nonzero(labels == c)[:, 0] for c in classes]
    for _ in range(max(1, labels.numel() // (p * k))):
        chosen = torch.randperm(classes.numel(), generator=g)[:p]
        idx = []
        for c in chosen.tolist():
            m = members[c]
            if m.numel() >= k:
                idx.append(m[torch.randperm(m.numel(), generator=g)[:k]])
            else:
                idx.append(m[torch.randint(0, m.numel(), (k,), generator=g)])
        yield torch.cat(idx)


class EmbeddingNet(torch.nn.Module):
    def __init__(self, dim: int = EMBEDDING_DIM):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, dim)
        )

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loss(fn, emb: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Seconds of one forward + backward of fn on a detached copy of the embeddings."""
    e = emb.detach().clone().requires_grad_()
    _sync(device)
    t0 = time.perf_counter()
    fn(e, labels).backward()
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, x, y, metric):
    model.eval()
    emb = model(x)
    model.train()
    return emb, tc.metrics.retrieval_metrics(emb, y, k=(1, 5), metric=metric)


def _pca2(emb: torch.Tensor) -> torch.Tensor:
    centred = emb.double() - emb.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:2].T).float()


def save_figure(path, before_emb, after_emb, labels, history, before, after) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit('python -m triplet_cuda needs matplotlib: pip install "triplet_cuda[demo]"') from None
    fig = Figure(figsize=(11, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    y = labels.cpu().numpy()
    for ax, emb, title, m in ((axes[0, 0], before_emb, "before training", before),
                              (axes[0, 1], after_emb, "after training", after)):
        xy = _pca2(emb.cpu()).numpy()
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
        ax.set_title(f"held-out embeddings, {title} (PCA)\nRecall@1 {m['recall@1']:.3f}, mAP@R {m['map@r']:.3f}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0, :], ticks=range(10), label="digit")
    steps = range(1, len(history["step_loss"]) + 1)
    axes[1, 0].plot(steps, history["step_loss"], lw=1)
    axes[1, 0].set_xlabel("step")
    axes[1, 0].set_ylabel("training loss")
    axes[1, 0].set_title("loss")
    axes[1, 1].plot(range(0, len(history["recall@1"])), history["recall@1"], marker="o")
    axes[1, 1].set_xlabel("epoch (0 = before training)")
    axes[1, 1].set_ylabel("held-out Recall@1")
    axes[1, 1].set_title("Recall@1")
    fig.savefig(path, dpi=100)


def _progress(epoch, epochs, step, steps, loss):
    if sys.stdout.isatty():
        width = 24
        done = width * step // steps
        print(f"\repoch {epoch:>2}/{epochs} [{'#' * done}{'.' * (width - done)}] loss {loss:.4f}",
              end="", flush=True)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p, k = args.batch_size
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_digits_split(args.seed))
    model = EmbeddingNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = torch.Generator().manual_seed(args.seed + 1)
    fused = LOSSES[args.mining]

    def loss_fn(e, lab, **kw):
        return fused(e, lab, args.margin, metric=args.metric, **kw)

    def naive_fn(e, lab):
        return naive.FUNCTIONS[args.mining](e, lab, args.margin, metric=args.metric)

    print(f"triplet_cuda {tc.__version__} ({tc.loaded_from()}), torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"digits: {len(y_train)} train / {len(y_test)} held-out images; {args.mining} loss, metric {args.metric}, "
          f"margin {args.margin}, P x K = {p} x {k} (N = {p * k}), {args.epochs} epochs, seed {args.seed}")
    before_emb, before = evaluate(model, x_test, y_test, args.metric)
    print(f"held-out before training: Recall@1 {before['recall@1']:.4f}  Recall@5 {before['recall@5']:.4f}  "
          f"mAP@R {before['map@r']:.4f}")

    history = {"step_loss": [], "epoch_loss": [], "active_fraction": [], "step_ms": [], "recall@1": [before["recall@1"]]}
    t_fused = t_naive = 0.0
    n_steps = 0
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses, actives, step_times = [], [], []
        epoch_batches = list(pk_batches(y_train, p, k, batches))
        for i, idx in enumerate(epoch_batches, 1):
            _sync(device)
            t0 = time.perf_counter()
            emb = model(x_train[idx])
            loss, stats = loss_fn(emb, y_train[idx], return_stats=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            actives.append(stats.fraction_positive.item())
            # the loss alone, fused and naive, on this step's embeddings (training is unaffected)
            t_fused += _timed_loss(loss_fn, emb, y_train[idx], device)
            t_naive += _timed_loss(naive_fn, emb, y_train[idx], device)
            n_steps += 1
            _progress(epoch, args.epochs, i, len(epoch_batches), loss.item())
        _, m = evaluate(model, x_test, y_test, args.metric)
        history["step_loss"] += losses
        history["epoch_loss"].append(sum(losses) / len(losses))
        history["active_fraction"].append(sum(actives) / len(actives))
        history["step_ms"].append(1e3 * sum(step_times) / len(step_times))
        history["recall@1"].append(m["recall@1"])
        if sys.stdout.isatty():
            print("\r", end="")
        print(f"epoch {epoch:>2}/{args.epochs}  loss {history['epoch_loss'][-1]:.4f}  "
              f"active triplets {100 * history['active_fraction'][-1]:5.1f}%  "
              f"step {history['step_ms'][-1]:6.2f} ms  held-out Recall@1 {m['recall@1']:.4f}", flush=True)
    train_s = time.perf_counter() - t_start

    after_emb, after = evaluate(model, x_test, y_test, args.metric)
    print(f"held-out after training:  Recall@1 {after['recall@1']:.4f}  Recall@5 {after['recall@5']:.4f}  "
          f"mAP@R {after['map@r']:.4f}")
    fused_ms, naive_ms = 1e3 * t_fused / n_steps, 1e3 * t_naive / n_steps
    print(f"loss forward+backward on the same {n_steps} batches (N = {p * k}, D = {EMBEDDING_DIM}): "
          f"fused {fused_ms:.3f} ms/step, naive Gram-matrix masks {naive_ms:.3f} ms/step "
          f"({naive_ms / fused_ms:.1f}x)")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "digits.png")
    save_figure(png, before_emb, after_emb, y_test, history, before, after)
    result = {
        "args": {"mining": args.mining, "metric": args.metric, "margin": args.margin, "epochs": args.epochs,
                 "batch_size": f"{p}x{k}", "seed": args.seed},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "before": before,
        "after": after,
        "history": history,
        "train_seconds": train_s,
        "loss_ms_per_step": {"fused": fused_ms, "naive": naive_ms},
        "png": os.path.abspath(png),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.abspath(png)} (and metrics.json beside it)")
    return result


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))
