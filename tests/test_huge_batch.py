"""Huge batches on CPU: batch hard beyond N*N > 2^31 without an N x N allocation, and
mine_triplets refusing outputs that cannot fit.

The batch-hard case is marked `slow`: by default (CI) it runs at N=8,000 (N*N = 6.4e7); with
TRIPLET_CUDA_SLOW=1 at N=50,000, D=32 (N*N = 2.5e9 > 2^31: about 15-70 s on 2 cores).
"""
from __future__ import annotations

import os

import pytest
import torch

import triplet_cuda as tc

FULL = os.environ.get("TRIPLET_CUDA_SLOW", "0") == "1"
N = 50_000 if FULL else 8_000


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS: {e}")


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no VmHWM in /proc/self/status")


@pytest.mark.slow
def test_batch_hard_huge_batch():
    d = 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g)
    labels = torch.randint(0, N // 4, (N,), generator=g)
    tc.batch_hard_mine(x[:64], labels[:64])  # warm up (thread pools, allocator)
    _reset_peak_rss()
    before = _peak_rss()
    m = tc.batch_hard_mine(x, labels)
    growth = _peak_rss() - before
    bound = (48 << 20) + 2048 * N  # an N x N float32 matrix would be 4 * N * N bytes
    assert growth < bound < 4 * N * N, f"peak RSS grew by {growth / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB)"
    # sampled anchors against a direct float64 computation over all N candidates
    anchors = torch.randint(0, N, (48,), generator=g)
    x64 = x.double()
    for a in anchors.tolist():
        dist = (x64 - x64[a]).norm(dim=1)
        pos = (labels == labels[a]) & (torch.arange(N) != a)
        neg = labels != labels[a]
        if not pos.any():
            assert m.pos_idx[a] == -1 and m.neg_idx[a] == -1
            continue
        hard_pos = dist.masked_fill(~pos, float("-inf")).max()
        hard_neg = dist.masked_fill(~neg, float("inf")).min()
        assert pos[m.pos_idx[a]] and neg[m.neg_idx[a]]
        torch.testing.assert_close(m.pos_dist[a].double(), hard_pos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.neg_dist[a].double(), hard_neg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dist[m.pos_idx[a]], hard_pos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dist[m.neg_idx[a]], hard_neg, rtol=1e-5, atol=1e-5)


def test_mine_triplets_refuses_what_cannot_fit():
    # 2^17 rows in two classes: batch all has about N^3 / 4 = 5.6e14 triplets (12.8 PiB)
    n = 1 << 17
    x = torch.zeros(n, 1)
    labels = torch.arange(n) % 2
    with pytest.raises(ValueError, match=r"mine_triplets\(strategy='batch_all'\) would return 562941363486720 "
                                         r"triplets \(.* GiB as three int64 tensors\) .* more than the memory of cpu"):
        tc.mine_triplets(x, labels, strategy="batch_all")
    # the same labels are fine for batch hard (N triplets)
    a, _, _ = tc.mine_triplets(x[:1000], labels[:1000], strategy="batch_hard")
    assert a.shape == (1000,)


@pytest.mark.parametrize("self_index", [None, 0])
def test_mine_triplets_refuses_what_cannot_fit_against_a_reference_set(self_index):
    # 64 anchors against 2^17 reference rows in two classes: 64 * P * Q triplets, P = 2^16
    # positives (less the anchor's own row when the anchors are reference rows 0..63), Q = 2^16
    m, n = 1 << 17, 64
    ref = torch.zeros(m, 1)
    ref_labels = torch.arange(m) % 2
    x, labels = ref[:n], ref_labels[:n]
    p = (m // 2) - (1 if self_index is not None else 0)
    total = n * p * (m // 2)
    with pytest.raises(ValueError, match=rf"mine_triplets\(strategy='batch_all'\) would return {total} triplets"):
        tc.mine_triplets(x, labels, strategy="batch_all", ref_embeddings=ref, ref_labels=ref_labels,
                         ref_self_index=self_index)
    # semi hard: one triplet per (anchor, positive), which fits
    a, pos, _ = tc.mine_triplets(x[:3], labels[:3], strategy="semi_hard", ref_embeddings=ref[:50],
                                 ref_labels=ref_labels[:50], ref_self_index=self_index)
    assert a.numel() == 3 * (25 - (1 if self_index is not None else 0))
