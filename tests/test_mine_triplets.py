"""mine_triplets: exact index equality with the reference, order, format, edge cases."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import FLOAT_DTYPES, METRICS, STRATEGIES, assert_close, cpu_and_cuda, make_batch

SIZES = [(1, 3, 1), (2, 3, 1), (2, 3, 2), (5, 3, 2), (37, 13, 5), (67, 3, 7), (67, 13, 40)]


def as_rows(t):
    a, p, n = (v.cpu() for v in t)
    return list(zip(a.tolist(), p.tolist(), n.tolist()))


def check_format(t, device):
    """The index-tuple format pytorch-metric-learning's losses take as indices_tuple:
    a tuple of three 1-D int64 tensors of one length, on the embeddings' device."""
    assert isinstance(t, tuple) and len(t) == 3
    for v in t:
        assert isinstance(v, torch.Tensor)
        assert v.dtype == torch.int64
        assert v.dim() == 1
        assert v.shape == t[0].shape
        assert v.device.type == torch.device(device).type
        assert not v.requires_grad


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}D{}C{}".format(*s))
def test_mine_triplets_matches_reference_exactly(device, strategy, metric, size):
    n, d, c = size
    for seed in range(3):
        x, labels = make_batch(n, d, c, seed=seed * 31 + n + d, device=device)
        got = tc.mine_triplets(x, labels, strategy=strategy, metric=metric)
        check_format(got, device)
        want = R.mine_triplets(x.cpu(), labels.cpu(), strategy=strategy, metric=metric)
        for g, w, what in zip(got, want, ("anchor", "positive", "negative")):
            assert torch.equal(g.cpu(), w), f"{what} indices differ (seed {seed})"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_mine_triplets_valid_and_sorted(device, strategy, dtype):
    x, labels = make_batch(37, 5, 6, seed=12, dtype=dtype, device=device)
    labels[3] = 1000  # a singleton
    t = tc.mine_triplets(x, labels, strategy=strategy)
    check_format(t, device)
    rows = as_rows(t)
    assert rows == sorted(rows), "not sorted by (anchor, positive, negative)"
    assert len(set(rows)) == len(rows), "duplicate triplets"
    lab = labels.cpu().tolist()
    for a, p, n in rows:
        assert a != p and lab[a] == lab[p] and lab[a] != lab[n], (a, p, n)
    anchors = {a for a, _, _ in rows}
    assert 3 not in anchors
    # the batch-all set is every valid triplet, whatever the dtype
    if strategy == "batch_all":
        assert rows == as_rows(R.mine_triplets(x.cpu().double(), labels.cpu(), strategy="batch_all"))
    if strategy == "batch_hard":
        valid = [a for a in range(37) if lab.count(lab[a]) > 1]
        assert sorted(anchors) == valid and len(rows) == len(valid)
    if strategy == "semi_hard":
        # one triplet per (anchor, positive) pair
        pairs = [(a, p) for a in range(37) for p in range(37) if a != p and lab[a] == lab[p]]
        assert [(a, p) for a, p, _ in rows] == pairs


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mine_triplets_agrees_with_losses(device, strategy):
    # the mined triplets reproduce the corresponding loss's sum
    x, labels = make_batch(29, 4, 4, seed=2, device=device)
    a, p, n = tc.mine_triplets(x, labels, strategy=strategy)
    d = R.pairwise_distance(x.cpu())
    a, p, n = a.cpu(), p.cpu(), n.cpu()
    total = torch.relu(d[a, p] - d[a, n] + 0.2).sum()
    loss = {
        "batch_hard": tc.batch_hard_triplet_loss,
        "batch_all": tc.batch_all_triplet_loss,
        "semi_hard": tc.semi_hard_triplet_loss,
    }[strategy](x, labels, 0.2, reduction="sum")
    torch.testing.assert_close(loss.cpu(), total, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mine_triplets_hand_computed(device):
    # 1-D [0, 1, 3, 6], labels [0, 0, 1, 1] (see test_losses.py for the distance table)
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64, device=device)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    assert as_rows(tc.mine_triplets(x, labels)) == [(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)]
    assert as_rows(tc.mine_triplets(x, labels, strategy="batch_all")) == [
        (0, 1, 2), (0, 1, 3), (1, 0, 2), (1, 0, 3), (2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1)]
    assert as_rows(tc.mine_triplets(x, labels, strategy="semi_hard")) == [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 1)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", ["empty", "single", "one_class", "all_distinct"])
def test_mine_triplets_nothing_valid(device, strategy, case):
    n = {"empty": 0, "single": 1, "one_class": 6, "all_distinct": 6}[case]
    x = torch.randn(n, 3, device=device)
    labels = torch.arange(n, device=device) if case == "all_distinct" else torch.zeros(n, dtype=torch.long, device=device)
    t = tc.mine_triplets(x, labels, strategy=strategy)
    check_format(t, device)
    assert all(v.numel() == 0 for v in t)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mine_triplets_semi_hard_and_batch_hard_ties(device, strategy):
    # small-integer embeddings in float64: exact arithmetic and many exact ties
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-2, 3, (41, 2), generator=g).double().to(device)
    labels = torch.randint(0, 3, (41,), generator=g).to(device)
    for metric in ("euclidean", "squared_euclidean"):
        got = tc.mine_triplets(x, labels, strategy=strategy, metric=metric)
        want = R.mine_triplets(x.cpu(), labels.cpu(), strategy=strategy, metric=metric)
        assert as_rows(got) == as_rows(want), metric


def test_mine_triplets_not_differentiable():
    x, labels = make_batch(9, 3, 2, seed=0)
    x.requires_grad_()
    for strategy in STRATEGIES:
        for v in tc.mine_triplets(x, labels, strategy=strategy):
            assert not v.requires_grad and v.grad_fn is None


def test_mine_triplets_pml_indices_tuple_usage():
    """What pytorch-metric-learning does with an indices_tuple (without needing it installed):
    index the embeddings and a distance matrix with the three int64 tensors."""
    x, labels = make_batch(16, 4, 3, seed=8, dtype=torch.float32)
    a, p, n = tc.mine_triplets(x, labels, strategy="batch_all")
    anchors, positives, negatives = x[a], x[p], x[n]
    assert anchors.shape == positives.shape == negatives.shape == (a.numel(), 4)
    assert torch.equal(labels[a], labels[p]) and not (labels[a] == labels[n]).any()
    # PML's lmu.convert_to_triplets accepts a 3-tuple as is: indices must be usable as a
    # LongTensor index and sized alike
    assert len({a.numel(), p.numel(), n.numel()}) == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mine_triplets_with_pytorch_metric_learning(strategy):
    """Optional: when pytorch-metric-learning is installed, its TripletMarginLoss accepts the
    tuple as indices_tuple and, on the mined triplets, gives the mean over nonzero terms."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
    x, labels = make_batch(24, 5, 4, seed=6)
    t = tc.mine_triplets(x, labels, strategy=strategy)
    loss_fn = pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distances.LpDistance(normalize_embeddings=False))
    got = loss_fn(x, labels, indices_tuple=t)
    d = R.pairwise_distance(x)
    a, p, n = t
    terms = torch.relu(d[a, p] - d[a, n] + 0.2)
    expected = terms.sum() / (terms > 0).sum().clamp_min(1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    if strategy == "batch_all":
        torch.testing.assert_close(got, tc.batch_all_triplet_loss(x, labels, 0.2), rtol=1e-6, atol=1e-6)


def _semi_hard_batch(case, sizes, dtype, seed):
    """A batch of the given class sizes (shuffled): random rows, small-integer rows (exact ties
    everywhere), float32-style duplicates (negatives duplicating positives: Gram-form near ties),
    or random rows with one non-finite entry."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), c * 3 - 7) for c, s in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    n = labels.numel()
    if case == "ties":
        x = torch.randint(-2, 3, (n, 3), generator=g).double()
    else:
        x = torch.randn(n, 9, generator=g, dtype=torch.float64)
    if case == "duplicates":
        src = torch.randint(0, n, (n // 3,), generator=g)
        x[torch.randperm(n, generator=g)[: n // 3]] = x[src]
    if case in ("nan", "inf"):
        x[n // 2, 4] = float(case)
    return x.to(dtype), labels


# Class sizes: the fused path's 4, 8 and 16 lanes (classes of at most 5, 9, 17), singletons.
SEMI_HARD_SIZES = {"lanes4": [4] * 30 + [5, 1, 1], "lanes8": [9, 4, 7] * 9 + [1], "lanes16": [17, 3, 12, 1] * 4}


# Ties only for the Euclidean metrics: a cosine "tie" (parallel rows) is not exact in any
# arithmetic (the norms' rounding), here or in the reference, so it has no single right answer.
SEMI_HARD_CASES = [(c, m) for c in ("random", "ties", "duplicates", "nan", "inf") for m in METRICS
                   if m != "cosine" or c not in ("ties", "duplicates")]


@pytest.mark.parametrize("block_bytes", [None, "3072"], ids=["one_block", "tiny_blocks"])
@pytest.mark.parametrize("case,metric", SEMI_HARD_CASES, ids=[f"{c}-{m}" for c, m in SEMI_HARD_CASES])
@pytest.mark.parametrize("sizes", list(SEMI_HARD_SIZES))
def test_semi_hard_fused_choice_equals_the_row_scan(monkeypatch, block_bytes, case, sizes, metric):
    # The fused few-positives mining (lane scans over upper-triangle blocks: row and column
    # phases, near ties decided on exact distances) against the reference (exact ties: small
    # integer rows; near ties: duplicated float32 rows) and, where no distance is near a tie,
    # the row policy (a plain scan of full rows, reached through a reference set that is the
    # batch itself; the only oracle for NaN and Inf): the same negative for every (anchor,
    # positive), ties to the lowest index, NaN farthest.
    if block_bytes is not None:  # tiny blocks: every column phase and span boundary runs
        monkeypatch.setenv("TRIPLET_CUDA_CPU_BLOCK_BYTES", block_bytes)
    dtype = torch.float32 if case == "duplicates" else torch.float64
    x, labels = _semi_hard_batch(case, SEMI_HARD_SIZES[sizes], dtype, seed=len(case) + len(sizes))
    got = as_rows(tc.mine_triplets(x, labels, strategy="semi_hard", metric=metric))
    if case in ("random", "nan", "inf"):  # the row policy has no near-tie rule: no ties here
        rows = as_rows(tc.mine_triplets(x, labels, strategy="semi_hard", metric=metric, ref_embeddings=x,
                                        ref_labels=labels, ref_self_index=0))
        assert got == rows
    if case not in ("nan", "inf"):
        want = as_rows(R.mine_triplets(x.double(), labels, strategy="semi_hard", metric=metric))
        if case != "duplicates":  # exact arithmetic (float64; small integers for the ties)
            assert got == want
        else:
            # Two duplicated negatives are at the same true distance but their float32 Gram-form
            # distances may differ by rounding, so the lowest-index rule cannot be asked of them:
            # the chosen negatives' distances must agree, which still fails when a negative that
            # ties d_ap (a duplicate of the positive) is taken as farther.
            assert [t[:2] for t in got] == [t[:2] for t in want]
            d = R.pairwise_distance(x.double(), metric=metric)
            a, n_got, n_want = (torch.tensor(v) for v in zip(*[(g[0], g[2], w[2]) for g, w in zip(got, want)]))
            torch.testing.assert_close(d[a, n_got], d[a, n_want], rtol=1e-6, atol=1e-7)
        loss = tc.semi_hard_triplet_loss(x, labels, 0.2, metric=metric, reduction="sum")
        ref = R.semi_hard_triplet_loss(x.double(), labels, 0.2, metric=metric, reduction="sum")
        assert_close(loss, ref, dtype)
    else:
        assert torch.isnan(tc.semi_hard_triplet_loss(x, labels, metric=metric))
