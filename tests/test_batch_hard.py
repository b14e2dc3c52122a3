"""batch_hard_mine: mined indices and distances, the tie rule, invalid anchors, gradients."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import FLOAT_DTYPES, METRICS, assert_close, cpu_and_cuda, make_batch, tolerances

SIZES = [(1, 3, 1), (2, 1, 2), (5, 3, 2), (37, 13, 5), (67, 3, 7), (67, 13, 40)]


def check_mining_consistent(m, x, labels, metric, dtype, msg=""):
    """Checks a mining result without relying on how near-ties are broken: every index is a
    valid positive / negative of its anchor, the reported distance is the distance to that
    index, and it is the extreme distance over the anchor's positives / negatives."""
    x64 = x.detach().cpu().double()
    lab = labels.cpu()
    d = R.pairwise_distance(x64, metric=metric)
    pos, neg = R.label_masks(lab)
    valid = pos.any(1) & neg.any(1)
    rtol, atol = tolerances(dtype)
    pos_idx, neg_idx = m.pos_idx.cpu(), m.neg_idx.cpu()
    pos_dist, neg_dist = m.pos_dist.cpu().double(), m.neg_dist.cpu().double()
    n = lab.numel()
    for a in range(n):
        where = f"{msg} anchor {a}"
        if not valid[a]:
            assert pos_idx[a] == -1 and neg_idx[a] == -1, where
            assert pos_dist[a] == 0 and neg_dist[a] == 0, where
            continue
        p, q = int(pos_idx[a]), int(neg_idx[a])
        assert 0 <= p < n and p != a and lab[p] == lab[a], f"{where}: pos_idx {p} is not a positive"
        assert 0 <= q < n and lab[q] != lab[a], f"{where}: neg_idx {q} is not a negative"
        hardest_pos = d[a][pos[a]].max()
        hardest_neg = d[a][neg[a]].min()
        for got, want, what in [(pos_dist[a], hardest_pos, "pos_dist"), (neg_dist[a], hardest_neg, "neg_dist"),
                                (d[a, p], hardest_pos, "d(a, pos_idx)"), (d[a, q], hardest_neg, "d(a, neg_idx)")]:
            assert abs(got - want) <= atol + rtol * abs(want), f"{where}: {what} {got.item()} != {want.item()}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}D{}C{}".format(*s))
def test_mine_float64_matches_reference_exactly(device, metric, size):
    n, d, c = size
    for seed in range(3):
        x, labels = make_batch(n, d, c, seed=seed + 7 * n, device=device)
        m = tc.batch_hard_mine(x, labels, metric=metric)
        r = R.batch_hard_mine(x.cpu(), labels.cpu(), metric=metric)
        assert isinstance(m, tc.HardMining)
        assert m.pos_idx.dtype == torch.int64 and m.neg_idx.dtype == torch.int64
        assert m.pos_dist.dtype == torch.float64 and m.neg_dist.dtype == torch.float64
        for t in m:
            assert t.shape == (n,) and t.device == x.device
        # random float64 inputs: distinct distances, so the indices are unique
        assert torch.equal(m.pos_idx.cpu(), r.pos_idx), f"seed {seed}"
        assert torch.equal(m.neg_idx.cpu(), r.neg_idx), f"seed {seed}"
        # mined distances are recomputed exactly (no Gram cancellation): tight
        torch.testing.assert_close(m.pos_dist.cpu(), r.pos_dist, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.neg_dist.cpu(), r.neg_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}D{}C{}".format(*s))
def test_mine_consistent_all_dtypes(device, dtype, metric, size):
    n, d, c = size
    x, labels = make_batch(n, d, c, seed=3 * n + d, dtype=dtype, device=device)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    assert m.pos_dist.dtype == dtype and m.neg_dist.dtype == dtype
    check_mining_consistent(m, x, labels, metric, dtype, msg=f"{dtype} {metric}")
    # distances equal the reference's (on the upcast input) whatever index a near-tie picked
    r = R.batch_hard_mine(x.cpu().double(), labels.cpu(), metric=metric)
    assert_close(m.pos_dist, r.pos_dist, dtype)
    assert_close(m.neg_dist, r.neg_dist, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("seed", range(4))
def test_mine_integer_embeddings_exact(device, metric, seed):
    # small-integer embeddings: exact arithmetic in float64, many exact ties; indices and
    # distances must equal the reference's (ties -> lowest index) exactly.
    g = torch.Generator().manual_seed(seed)
    n = [37, 67, 5, 23][seed]
    x = torch.randint(-2, 3, (n, 3), generator=g).double().to(device)
    labels = torch.randint(0, 4, (n,), generator=g).to(device)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    r = R.batch_hard_mine(x.cpu(), labels.cpu(), metric=metric)
    for got, want, what in zip(m, r, m._fields):
        assert torch.equal(got.cpu(), want), f"{what}: got {got.tolist()}\nwant {want.tolist()}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_tie_rule_lowest_index_1d(device, dtype):
    # 1-D: anchor 0 at 0; positives at +1 (idx 2) and -1 (idx 1): both d=1 -> hardest positive
    # is idx 1 (lowest); negatives at +2 (idx 3) and -2 (idx 4) and 5 (idx 5): nearest d=2 twice
    # -> idx 3. Anchor 3 (x=2, label 1): positives idx 4 (d=4) and 5 (d=3) -> idx 4;
    # negatives idx 0 (d=2), 1 (d=3), 2 (d=1) -> idx 2.
    x = torch.tensor([[0.0], [-1.0], [1.0], [2.0], [-2.0], [5.0]], dtype=dtype, device=device)
    labels = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    m = tc.batch_hard_mine(x, labels)
    assert m.pos_idx[0].item() == 1 and m.pos_dist[0].item() == 1.0
    assert m.neg_idx[0].item() == 3 and m.neg_dist[0].item() == 2.0
    assert m.pos_idx[3].item() == 4 and m.pos_dist[3].item() == 4.0
    assert m.neg_idx[3].item() == 2 and m.neg_dist[3].item() == 1.0
    # anchor 1 (x=-1): positives 0 (d=1), 2 (d=2) -> 2; negatives 3 (d=3), 4 (d=1), 5 (d=6) -> 4
    assert (m.pos_idx[1].item(), m.neg_idx[1].item()) == (2, 4)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n", [5, 37, 67])
def test_tie_rule_all_identical(device, dtype, metric, n):
    # all embeddings equal: every distance is the same (0), so the hardest positive is the
    # first other row of the class and the hardest negative the first row of another class.
    x = torch.tensor([[1.0, -2.0, 2.0]], dtype=dtype, device=device).expand(n, 3)
    labels = torch.tensor([(7 * i) % 3 for i in range(n)], device=device)
    m = tc.batch_hard_mine(x, labels, metric=metric)
    lab = labels.tolist()
    for a in range(n):
        first_pos = next((j for j in range(n) if j != a and lab[j] == lab[a]), None)
        first_neg = next(j for j in range(n) if lab[j] != lab[a])
        if first_pos is None:  # a singleton class (n=5: label 2 at row 2 only)
            first_pos = first_neg = -1
        assert (m.pos_idx[a].item(), m.neg_idx[a].item()) == (first_pos, first_neg), f"anchor {a}"
    atol = 1e-6 if metric == "cosine" else 0.0
    assert m.pos_dist.abs().max().item() <= atol and m.neg_dist.abs().max().item() <= atol


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_tie_rule_cosine(device):
    # cosine distances of axis-aligned vectors are exact: anchor (1, 0); positives (0, 1) and
    # (0, -1) both at d=1 -> idx 1; negatives (2, 0) and (3, 0) both at d=0 -> idx 3.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [2.0, 0.0], [3.0, 0.0]], dtype=torch.float64, device=device)
    labels = torch.tensor([4, 4, 4, 9, 9], device=device)
    m = tc.batch_hard_mine(x, labels, metric="cosine")
    assert (m.pos_idx[0].item(), m.neg_idx[0].item()) == (1, 3)
    assert m.pos_dist[0].item() == pytest.approx(1.0, abs=1e-15)
    assert m.neg_dist[0].item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_tie_rule_across_blocks(device):
    # exact ties spread over a batch larger than any block: rows j = 0..N-1 on a line at
    # position |j - 90| (so rows 90 - k and 90 + k coincide). Anchor 90 (label 0) has positives
    # at every even j != 90 and negatives at odd j; the farthest positive is j = 0 (d=90, the
    # only one), the nearest negatives are j = 89 and 91 (d=1) -> 89.
    n = 181
    x = torch.tensor([[abs(j - 90.0), 0.0, 0.0] for j in range(n)], dtype=torch.float64, device=device)
    labels = torch.tensor([j % 2 for j in range(n)], device=device)
    m = tc.batch_hard_mine(x, labels)
    assert (m.pos_idx[90].item(), m.pos_dist[90].item()) == (0, 90.0)
    assert (m.neg_idx[90].item(), m.neg_dist[90].item()) == (89, 1.0)
    # anchor 180 (x=90, label 0): farthest positive x=0 at j=90; nearest negatives x=89 at
    # j=1 and j=179 -> 1
    assert (m.pos_idx[180].item(), m.neg_idx[180].item()) == (90, 1)
    r = R.batch_hard_mine(x.cpu(), labels.cpu())
    for got, want in zip(m, r):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_invalid_anchors(device, dtype):
    # labels: 5 and 6 singletons (no positive); class 2 has 3 members; class -1 has 2.
    x, _ = make_batch(8, 3, 1, seed=3, dtype=dtype, device=device)
    labels = torch.tensor([2, 5, 2, -1, 6, 2, -1, 7], device=device)
    m = tc.batch_hard_mine(x, labels)
    invalid = [1, 4, 7]
    for a in range(8):
        if a in invalid:
            assert (m.pos_idx[a].item(), m.neg_idx[a].item()) == (-1, -1)
            assert (m.pos_dist[a].item(), m.neg_dist[a].item()) == (0.0, 0.0)
        else:
            assert m.pos_idx[a].item() >= 0 and m.neg_idx[a].item() >= 0
    # an invalid anchor can still be another anchor's negative
    assert set(m.neg_idx.tolist()) - {-1} <= set(range(8))
    check_mining_consistent(m, x, labels, "euclidean", dtype)
    loss, stats = tc.batch_hard_triplet_loss(x, labels, reduction="none", return_stats=True)
    assert stats.num_valid.item() == 5
    assert all(loss[a].item() == 0.0 for a in invalid)
    # "mean" is over the 5 valid anchors
    mean = tc.batch_hard_triplet_loss(x, labels, reduction="mean")
    assert_close(mean, loss.double().sum() / 5, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_no_negative_anchors(device):
    # one class only: nobody has a negative
    x, _ = make_batch(6, 3, 1, seed=1, device=device)
    labels = torch.full((6,), 3, device=device)
    m = tc.batch_hard_mine(x, labels)
    assert m.pos_idx.tolist() == [-1] * 6 and m.neg_idx.tolist() == [-1] * 6
    assert m.pos_dist.tolist() == [0.0] * 6 and m.neg_dist.tolist() == [0.0] * 6


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_batch_hard_mine(device, metric, seed):
    x, _ = make_batch(9, 4, 1, seed=seed + 40, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 5], device=device)  # anchor 8 invalid
    x.requires_grad_()

    def dists(e):
        m = tc.batch_hard_mine(e, labels, metric=metric)
        return m.pos_dist, m.neg_dist

    assert gradcheck(dists, (x,))
    # each output alone (the other's gradient is None in the backward)
    assert gradcheck(lambda e: tc.batch_hard_mine(e, labels, metric=metric).pos_dist, (x,))
    assert gradcheck(lambda e: tc.batch_hard_mine(e, labels, metric=metric).neg_dist, (x,))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_batch_hard_mine_grad_matches_reference(device, dtype, metric):
    x0, labels = make_batch(37, 5, 6, seed=77, dtype=dtype)
    labels[0] = 99  # a singleton: invalid anchor
    x = x0.clone().to(device).requires_grad_()
    m = tc.batch_hard_mine(x, labels.to(device), metric=metric)
    xr = x0.double().clone().requires_grad_()
    r = R.batch_hard_mine(xr, labels, metric=metric)
    g = torch.Generator().manual_seed(1)
    wp, wn = torch.randn(37, generator=g, dtype=torch.float64), torch.randn(37, generator=g, dtype=torch.float64)
    ((m.pos_dist.double().cpu() * wp).sum() + (m.neg_dist.double().cpu() * wn).sum()).backward()
    ((r.pos_dist * wp).sum() + (r.neg_dist * wn).sum()).backward()
    # the same anchors, positives and negatives as the reference (this seed has no near-ties)
    assert torch.equal(m.pos_idx.cpu(), r.pos_idx) and torch.equal(m.neg_idx.cpu(), r.neg_idx)
    rtol, atol = tolerances(dtype)
    assert_close(x.grad, xr.grad, dtype, rtol=rtol, atol=atol * 4)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_batch_hard_mine_duplicate_embeddings_finite_grad(device, dtype):
    # duplicates: the hardest negative of anchor 0 is an identical row (d=0)
    x0 = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [0.0, 1.0, 3.0], [0.0, 1.0, 3.0]],
                      dtype=dtype)
    labels = torch.tensor([0, 1, 0, 1, 0], device=device)
    x = x0.clone().to(device).requires_grad_()
    m = tc.batch_hard_mine(x, labels)
    assert m.neg_dist[0].item() == 0.0 and m.neg_idx[0].item() == 1
    (m.pos_dist.sum() + m.neg_dist.sum()).backward()
    assert torch.isfinite(x.grad).all()
    x.grad = None
    loss = tc.batch_hard_triplet_loss(x, labels, margin=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    xr = x0.double().clone().requires_grad_()
    R.batch_hard_triplet_loss(xr, labels.cpu(), margin=1.0).backward()
    assert_close(x.grad, xr.grad, dtype)
