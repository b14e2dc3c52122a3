"""The CPU kernels' multi-block paths (upper-triangle row blocks of batch hard, batch all and
contrastive; row blocks of semi hard), made reachable at small N by shrinking the block with
TRIPLET_CUDA_CPU_BLOCK_BYTES, against the reference."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import METRICS

LOSSES = {
    "batch_hard": (tc.batch_hard_triplet_loss, tc.reference.batch_hard_triplet_loss),
    "batch_all": (tc.batch_all_triplet_loss, tc.reference.batch_all_triplet_loss),
    "semi_hard": (tc.semi_hard_triplet_loss, tc.reference.semi_hard_triplet_loss),
    "contrastive": (tc.contrastive_loss, tc.reference.contrastive_loss),
}


@pytest.fixture
def tiny_blocks(monkeypatch):
    # 3 KiB blocks: N=97 float64 rows make 4-row blocks, so about 25 blocks per pass
    monkeypatch.setenv("TRIPLET_CUDA_CPU_BLOCK_BYTES", "3072")


def _batch(n, per_class, seed, d=13):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = (torch.arange(n) // per_class)[torch.randperm(n, generator=g)] * 7 - 5
    return x, labels


# per_class 4: the fused few-positives paths; 30: batch all's and semi hard's sort paths
@pytest.mark.parametrize("per_class", [1, 4, 30])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_many_blocks_match_the_reference(tiny_blocks, loss, metric, per_class):
    fn, ref = LOSSES[loss]
    x, labels = _batch(97, per_class, seed=per_class)
    x.requires_grad_(True)
    value = fn(x, labels, metric=metric)
    (grad,) = torch.autograd.grad(value, x)
    xr = x.detach().clone().requires_grad_(True)
    expected = ref(xr, labels, metric=metric)
    (expected_grad,) = torch.autograd.grad(expected, xr)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("metric", METRICS)
def test_many_blocks_mine_like_the_reference(tiny_blocks, metric):
    x, labels = _batch(101, 3, seed=11)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    r = tc.reference.batch_hard_mine(x, labels, metric=metric)
    torch.testing.assert_close(m.pos_dist, r.pos_dist, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.neg_dist, r.neg_dist, rtol=1e-9, atol=1e-10)
    assert torch.equal(m.pos_idx >= 0, r.pos_idx >= 0)


def test_block_size_does_not_change_the_mined_distances(monkeypatch):
    """Duplicated rows make near-ties everywhere; a GEMM of another block shape may round a
    distance differently and so legitimately pick the other copy, but never a worse one."""
    x, labels = _batch(60, 4, seed=3)
    x = torch.cat([x, x[:30]])
    labels = torch.cat([labels, labels[:30]])
    default = tc.batch_hard_mine(x, labels)
    monkeypatch.setenv("TRIPLET_CUDA_CPU_BLOCK_BYTES", "2048")
    tiny = tc.batch_hard_mine(x, labels)
    for name in ("pos_dist", "neg_dist"):
        torch.testing.assert_close(getattr(tiny, name), getattr(default, name), rtol=1e-12, atol=1e-12)
    r = tc.reference.batch_hard_mine(x, labels)
    torch.testing.assert_close(tiny.neg_dist, r.neg_dist, rtol=1e-9, atol=1e-10)


def _ragged_labels(sizes, seed):
    """Shuffled labels of classes with the given member counts."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), 3 * c - 4, dtype=torch.int64) for c, s in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=g)]


# Batch all's fused scan keeps each anchor's positives in 4, 8 or 16 lanes (the fewest that hold
# the largest class); ragged classes leave lanes of padding. 18 members: the sort path.
@pytest.mark.parametrize("largest", [2, 5, 6, 9, 10, 17, 18])
@pytest.mark.parametrize("metric", METRICS)
def test_batch_all_lane_widths_match_the_reference(tiny_blocks, metric, largest):
    sizes = [largest, 1, 3, largest - 1, 2, largest, 1] * 3
    labels = _ragged_labels(sizes, seed=largest)
    g = torch.Generator().manual_seed(100 + largest)
    x = torch.randn(len(labels), 11, generator=g, dtype=torch.float64, requires_grad=True)
    value, stats = tc.batch_all_triplet_loss(x, labels, 0.7, metric=metric, reduction="sum",
                                             return_stats=True)
    (grad,) = torch.autograd.grad(value, x)
    xr = x.detach().clone().requires_grad_(True)
    expected, expected_stats = tc.reference.batch_all_triplet_loss(xr, labels, 0.7, metric=metric,
                                                                   reduction="sum", return_stats=True)
    (expected_grad,) = torch.autograd.grad(expected, xr)
    assert stats.num_valid == expected_stats.num_valid
    assert stats.num_positive == expected_stats.num_positive
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("per_class", [4, 17])
def test_batch_all_long_rows_and_tall_blocks(monkeypatch, per_class):
    """Rows of more than 512 candidates and blocks of more than 64 rows (the fused scans' partial
    sums are flushed every 64 terms), against the batch-all sum written out per anchor."""
    n = 700
    monkeypatch.setenv("TRIPLET_CUDA_CPU_BLOCK_BYTES", str(100 * n * 8))  # first block: 100 rows
    g = torch.Generator().manual_seed(per_class)
    labels = (torch.arange(n) // per_class)[torch.randperm(n, generator=g)]
    x = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    value, stats = tc.batch_all_triplet_loss(x, labels, 0.5, reduction="sum", return_stats=True)
    (grad,) = torch.autograd.grad(value, x)
    xr = x.detach().clone().requires_grad_(True)
    d = tc.reference.pairwise_distance(xr)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    p = int(pos.sum(1).max())
    # each anchor's positives (padded with the anchor itself, masked out below)
    pos_idx = torch.where(pos, torch.arange(n), n).sort(1).values[:, :p]
    pos_ok = pos_idx < n
    pos_idx = torch.where(pos_ok, pos_idx, torch.arange(n)[:, None])
    d_ap = d.gather(1, pos_idx)
    valid = pos_ok[:, :, None] & ~same[:, None, :]
    terms = torch.relu(d_ap[:, :, None] - d[:, None, :] + 0.5) * valid
    expected = terms.sum()
    (expected_grad,) = torch.autograd.grad(expected, xr)
    assert int(stats.num_valid) == int(valid.sum())
    assert int(stats.num_positive) == int(((terms > 0) & valid).sum())
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)
