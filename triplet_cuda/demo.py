"""A short demo: the fused losses against the naive reference on one P x K batch.

    python -m triplet_cuda.demo [--n 512] [--dim 128] [--device cpu|cuda]

For each loss it checks that the fused value and gradient match the naive implementation
(full N x N distance matrix and masks; N x N x N for batch all and semi hard) and prints
both forward+backward times. The benchmarks/ folder of the repository has the full suite.
"""
from __future__ import annotations

import argparse
import time

import torch

import triplet_cuda as tc
from triplet_cuda import reference

LOSSES = ("batch_hard_triplet_loss", "batch_all_triplet_loss", "semi_hard_triplet_loss", "contrastive_loss")


def _timed(fn, x, labels, repeats):
    best = float("inf")
    for _ in range(repeats):
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fn(x, labels)
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return loss.detach(), x.grad.clone(), best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="batch size N (P classes x K samples)")
    parser.add_argument("--k", type=int, default=4, help="samples per class K")
    parser.add_argument("--dim", type=int, default=128, help="embedding size D")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    labels = torch.arange(args.n, device=device) // args.k
    x = torch.nn.functional.normalize(torch.randn(args.n, args.dim, device=device), dim=1).requires_grad_()
    print(f"triplet_cuda {tc.__version__} ({tc.loaded_from()}), torch {torch.__version__}, device {device}")
    print(f"batch: N={args.n} (K={args.k} per class), D={args.dim}, float32; best of {args.repeats} forward+backward\n")
    print(f"{'loss':<26}{'fused':>12}{'naive':>12}{'|diff|':>10}{'grad |diff|':>13}{'t fused':>11}{'t naive':>11}{'speedup':>9}")
    for name in LOSSES:
        ours, g_ours, t_ours = _timed(getattr(tc, name), x, labels, args.repeats)
        ref, g_ref, t_ref = _timed(getattr(reference, name), x, labels, args.repeats)
        print(f"{name:<26}{ours.item():>12.6f}{ref.item():>12.6f}{(ours - ref).abs().item():>10.1e}"
              f"{(g_ours - g_ref).abs().max().item():>13.1e}{t_ours * 1e3:>9.2f}ms{t_ref * 1e3:>9.2f}ms"
              f"{t_ref / t_ours:>8.1f}x")


if __name__ == "__main__":
    main()
