"""The knn op and tc.metrics (Recall@K, mAP@R): against the brute-force reference
(triplet_cuda.reference.knn / recall_at_k / map_at_r), scikit-learn's NearestNeighbors,
hand-computed values, the tie and NaN rules, chunking, opcheck and argument errors."""
from __future__ import annotations

import math

import pytest
import torch

import triplet_cuda as tc
from conftest import METRICS, assert_close, cpu_and_cuda, make_batch
from triplet_cuda import metrics, reference

ops = torch.ops.triplet_cuda
CODE = {"euclidean": 0, "squared_euclidean": 1, "cosine": 2}


def _check_against_reference(dist, idx, q, r, k, metric, self_offset, dtype):
    """idx must pick neighbours whose exact distances are the reference's k smallest (in order),
    dist must be close to them; for float64 the indices must be the reference's exactly."""
    q64, r64 = q.cpu().double(), r.cpu().double()
    rd, ri = reference.knn(q64, r64, k, metric, self_offset)
    assert dist.shape == (q.shape[0], k) and idx.shape == (q.shape[0], k)
    assert idx.dtype == torch.int64 and dist.dtype == q.dtype
    idx, dist = idx.cpu(), dist.cpu()
    assert torch.equal(idx < 0, ri < 0), "padding differs"
    full = reference.pairwise_distance(q64, r64, metric)
    picked = torch.where(idx >= 0, full.gather(1, idx.clamp_min(0)), torch.full_like(rd, math.inf))
    assert_close(picked, rd, dtype, "distances of the chosen neighbours")
    finite = torch.isfinite(rd)
    assert_close(dist.double()[finite], rd[finite], dtype, "returned distances")
    assert torch.isinf(dist[~finite]).all()
    if self_offset >= 0:
        rows = torch.arange(q.shape[0])[:, None] + self_offset
        assert not (idx == rows).any(), "a query's own row was returned"
    if dtype == torch.float64:
        assert torch.equal(idx, ri)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 5, 40, 60])
def test_knn_matches_reference(device, dtype, metric, k):
    q, _ = make_batch(37, 7, 3, seed=1, dtype=dtype, device=device)
    r, _ = make_batch(53, 7, 3, seed=2, dtype=dtype, device=device)
    dist, idx = ops.knn(q, r, k, CODE[metric], -1)
    _check_against_reference(dist, idx, q, r, k, metric, -1, dtype)
    # the query set against itself, own rows left out (k = 60 > N - 1 pads)
    dist, idx = ops.knn(r, r, k, CODE[metric], 0)
    _check_against_reference(dist, idx, r, r, k, metric, 0, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_self_offset_is_a_slice_of_the_full_query(device):
    x, _ = make_batch(41, 6, 3, seed=3, device=device)
    d_full, i_full = ops.knn(x, x, 6, 0, 0)
    d, i = ops.knn(x[10:25], x, 6, 0, 10)
    assert torch.equal(i, i_full[10:25])
    # the GEMM of a different row count may round differently in the last bits
    torch.testing.assert_close(d, d_full[10:25], rtol=1e-12, atol=1e-12)


def test_knn_spans_several_row_blocks():
    # float64, M = 2500: a CPU row block holds 32 MiB / (2500 * 8 B) = 1677 rows, so 2500
    # queries take two blocks
    q, _ = make_batch(2500, 3, 3, seed=4)
    dist, idx = ops.knn(q, q, 3, 0, 0)
    _check_against_reference(dist, idx, q, q, 3, "euclidean", 0, torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_matches_sklearn(device, metric):
    neighbors = pytest.importorskip("sklearn.neighbors")
    q, _ = make_batch(45, 9, 3, seed=5)
    r, _ = make_batch(70, 9, 3, seed=6)
    nn = neighbors.NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(r.numpy())
    sk_d, sk_i = nn.kneighbors(q.numpy())
    dist, idx = tc.metrics.knn(q.to(device), r.to(device), 7, metric=metric)
    assert torch.equal(idx.cpu(), torch.from_numpy(sk_i))
    torch.testing.assert_close(dist.cpu(), torch.from_numpy(sk_d), rtol=1e-9, atol=1e-9)
    # the query set itself: kneighbors() without X leaves each point out, as knn(ref=None)
    nn = neighbors.NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(r.numpy())
    sk_d, sk_i = nn.kneighbors()
    dist, idx = tc.metrics.knn(r.to(device), k=7, metric=metric)
    assert torch.equal(idx.cpu(), torch.from_numpy(sk_i))
    torch.testing.assert_close(dist.cpu(), torch.from_numpy(sk_d), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [3, 40])  # 40 > 32 takes the sort path on CUDA
def test_knn_ties_go_to_the_lowest_index(device, dtype, k):
    # small integers: every dot product is exact, so equal distances are computed equal
    g = torch.Generator().manual_seed(7)
    r = torch.randint(-2, 3, (60, 3), generator=g).to(dtype)
    r[[5, 17, 33]] = torch.tensor([9.0, 9.0, 9.0], dtype=dtype)  # three copies far from the rest
    q = torch.tensor([[9.0, 9.0, 9.0], [0.0, 0.0, 0.0]], dtype=dtype)
    dist, idx = ops.knn(q.to(device), r.to(device), k, 0, -1)
    assert idx[0, :3].tolist() == [5, 17, 33]
    assert dist[0, :3].tolist() == [0.0, 0.0, 0.0]
    # every group of equal distances is listed in ascending index order
    d, i = dist.cpu(), idx.cpu()
    for row in range(2):
        for t in range(k - 1):
            assert d[row, t] < d[row, t + 1] or (d[row, t] == d[row, t + 1] and i[row, t] < i[row, t + 1])
    rd, ri = reference.knn(q.double(), r.double(), k)
    assert torch.equal(i, ri)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("k", [4, 40])
def test_knn_nan_sorts_last_and_propagates(device, k):
    x, _ = make_batch(45, 5, 3, seed=8, device=device)
    x[3, 1] = float("nan")
    dist, idx = ops.knn(x, x, k, 0, 0)
    assert torch.isnan(dist[3]).all(), "a NaN query must get NaN distances"
    others = torch.arange(45, device=device) != 3
    assert not (idx[others] == 3).any(), "the NaN reference row must come after every number"
    assert torch.isfinite(dist[others]).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_empty_and_padding(device):
    x, _ = make_batch(5, 3, 2, seed=9, device=device)
    empty = x[:0]
    d, i = ops.knn(empty, x, 3, 0, -1)
    assert d.shape == (0, 3) and i.shape == (0, 3)
    d, i = ops.knn(x, empty, 2, 0, -1)
    assert torch.isinf(d).all() and (i == -1).all()
    d, i = ops.knn(x, x, 0, 0, 0)
    assert d.shape == (5, 0)
    d, i = ops.knn(x[:1], x[:1], 2, 0, 0)  # nothing but itself
    assert (i == -1).all() and torch.isinf(d).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("self_offset", [-1, 0])
def test_knn_opcheck(device, self_offset):
    x, _ = make_batch(9, 4, 2, seed=10, dtype=torch.float32, device=device)
    torch.library.opcheck(ops.knn.default, (x, x, 3, 0, self_offset))
    y, _ = make_batch(6, 4, 2, seed=11, dtype=torch.float32, device=device)
    torch.library.opcheck(ops.knn.default, (x, y, 8, 2, -1))


def test_knn_errors():
    x, _ = make_batch(5, 3, 2, seed=12, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        ops.knn(x, x, -1, 0, -1)
    with pytest.raises(RuntimeError, match="self_offset must be -1 or in"):
        ops.knn(x, x[:3], 2, 0, 0)
    with pytest.raises(RuntimeError, match="ref must have the feature size of query"):
        ops.knn(x, x[:, :2], 2, 0, -1)
    with pytest.raises(RuntimeError, match="ref must have the dtype of query"):
        ops.knn(x, x.double(), 2, 0, -1)
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        tc.metrics.knn(x, k=1.5)
    with pytest.raises(ValueError, match="metric must be one of"):
        tc.metrics.knn(x, k=1, metric="l1")


# ----------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    # 1-D points; queries are the points themselves (own row left out)
    x = torch.tensor([[0.0], [1.0], [2.5], [10.0], [11.0], [13.0]])
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    # nearest neighbours: 0 -> 1 (hit); 1 -> 0 (hit); 2 -> 1 (miss), then 0, 3, 4;
    # 3 -> 4 (hit); 4 -> 3 (hit); 5 has no other point of its label: left out
    assert tc.metrics.recall_at_k(x, y, k=1) == pytest.approx(4 / 5)
    # Recall@2: query 2's two nearest are 1 and 0 (both label 0): still a miss
    assert tc.metrics.recall_at_k(x, y, k=(2,)) == {2: pytest.approx(4 / 5)}
    # Recall@3: query 2's third neighbour is 3 (label 1): a hit
    assert tc.metrics.recall_at_k(x, y, k=3) == pytest.approx(1.0)
    # mAP@R: R = 1, 1, 2, 2, 2. AP: 1, 1, query 2 (neighbours 1, 0: no hit) 0,
    # query 3 (neighbours 4 hit, 5 miss: (1/1) / 2) 0.5, query 4 (3 hit, 5 miss) 0.5
    assert tc.metrics.map_at_r(x, y) == pytest.approx((1 + 1 + 0 + 0.5 + 0.5) / 5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_metrics_match_reference(device, metric, with_ref, monkeypatch):
    x, y = make_batch(47, 6, 5, seed=13, device=device)
    kw = {}
    if with_ref:
        rx, ry = make_batch(40, 6, 7, seed=14, device=device)
        kw = {"ref_embeddings": rx, "ref_labels": ry}
    kw_cpu = {key: t.cpu() for key, t in kw.items()}
    expected_recall = reference.recall_at_k(x.cpu(), y.cpu(), (1, 2, 5, 10), metric=metric, **kw_cpu)
    expected_map = reference.map_at_r(x.cpu(), y.cpu(), metric=metric, **kw_cpu)
    for chunk in (1 << 22, 37):  # one knn call, then chunks of 1..3 query rows
        monkeypatch.setattr(metrics, "_CHUNK_ENTRIES", chunk)
        got = tc.metrics.recall_at_k(x, y, k=(1, 2, 5, 10), metric=metric, **kw)
        assert got == pytest.approx(expected_recall, abs=1e-12)
        assert tc.metrics.map_at_r(x, y, metric=metric, **kw) == pytest.approx(expected_map, abs=1e-12)
        both = tc.metrics.retrieval_metrics(x, y, k=(1, 5), metric=metric, **kw)
        assert both == pytest.approx({"recall@1": expected_recall[1], "recall@5": expected_recall[5],
                                      "map@r": expected_map}, abs=1e-12)


def test_metrics_match_pytorch_metric_learning():
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = make_batch(120, 8, 6, seed=15, dtype=torch.float32)
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = accuracy.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        device=torch.device("cpu"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),  # brute force, no faiss
    )
    got = calc.get_accuracy(x, y)  # query = reference: own row left out
    assert tc.metrics.recall_at_k(x, y, k=1) == pytest.approx(got["precision_at_1"], abs=1e-6)
    assert tc.metrics.map_at_r(x, y) == pytest.approx(got["mean_average_precision_at_r"], abs=1e-6)


def test_metrics_without_relevant_references_or_finite_input():
    x, _ = make_batch(6, 3, 2, seed=16, dtype=torch.float32)
    singletons = torch.arange(6)
    assert math.isnan(tc.metrics.recall_at_k(x, singletons, k=1))
    assert math.isnan(tc.metrics.map_at_r(x, singletons))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x[4, 0] = float("nan")
    assert math.isnan(tc.metrics.recall_at_k(x, y, k=1))
    assert math.isnan(tc.metrics.map_at_r(x, y))
    assert all(math.isnan(v) for v in tc.metrics.retrieval_metrics(x, y).values())


def test_metrics_errors():
    x, y = make_batch(6, 3, 2, seed=17, dtype=torch.float32)
    with pytest.raises(ValueError, match="every k must be a positive int, got 0"):
        tc.metrics.recall_at_k(x, y, k=(1, 0))
    with pytest.raises(ValueError, match="k must be a positive int or a non-empty sequence"):
        tc.metrics.recall_at_k(x, y, k=())
    with pytest.raises(ValueError, match="ref_embeddings and ref_labels must be given together"):
        tc.metrics.map_at_r(x, y, ref_embeddings=x)
    with pytest.raises(ValueError, match="ref_labels must have one entry per embedding"):
        tc.metrics.map_at_r(x, y, ref_embeddings=x, ref_labels=y[:3])
    with pytest.raises(ValueError, match="ref_embeddings must have the feature size of embeddings"):
        tc.metrics.map_at_r(x, y, ref_embeddings=x[:, :2], ref_labels=y)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        tc.metrics.recall_at_k(x, y.float())
    with pytest.raises(ValueError, match="metric must be one of"):
        tc.metrics.map_at_r(x, y, metric="manhattan")
