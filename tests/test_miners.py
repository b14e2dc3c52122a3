"""tc.miners against pytorch-metric-learning's own miners and losses (where pml is installed),
against tc.reference, and the format, errors and docs of the miner modules.

pml's rules differ from ours in documented ways (triplet_cuda/miners.py): the tests check what
is the same exactly and the stated relation where they differ. Random float64 data has
distinct distances, so ties (where pml leaves the index unspecified) do not occur; mined
distances are compared as well as indices."""
from __future__ import annotations

import doctest
import inspect
import typing

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import miners
from triplet_cuda import reference as R
from conftest import METRICS, cpu_and_cuda, make_batch

MINERS = [tc.miners.BatchHardMiner, tc.miners.SemiHardMiner, tc.miners.AllTripletsMiner]
SIZES = [(2, 3, 1), (5, 3, 2), (37, 13, 5), (64, 8, 16), (67, 5, 7)]


def pml_distance(metric):
    """pml's distance object equal to our metric on embeddings as given."""
    d = pytest.importorskip("pytorch_metric_learning.distances")
    if metric == "euclidean":
        return d.LpDistance(normalize_embeddings=False)
    if metric == "squared_euclidean":
        return d.LpDistance(normalize_embeddings=False, power=2)
    return d.CosineSimilarity()  # inverted: similarity = 1 - our cosine distance


def rows(t):
    return list(zip(*(x.cpu().tolist() for x in t)))


def check_format(t, device):
    assert isinstance(t, tuple) and len(t) == 3
    for x in t:
        assert x.dtype == torch.int64 and x.dim() == 1 and x.shape == t[0].shape
        assert x.device.type == torch.device(device).type and not x.requires_grad


# ----------------------------------------------------------------------------- against tc.reference
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}D{}C{}".format(*s))
def test_miners_match_the_reference_rules(device, metric, size):
    n, d, c = size
    x, labels = make_batch(n, d, c, seed=n + d, device=device)
    x = x.requires_grad_()  # as in training; mining does not differentiate
    dist = R.pairwise_distance(x.detach(), metric=metric)
    for cls, strategy in [(tc.miners.BatchHardMiner, "batch_hard"), (tc.miners.SemiHardMiner, "semi_hard"),
                          (tc.miners.AllTripletsMiner, "batch_all")]:
        got = cls(metric=metric)(x, labels)
        check_format(got, device)
        assert rows(got) == rows(R.mine_triplets(x.detach(), labels, strategy, metric)), cls.__name__
    for cls, strategy in [(tc.miners.SemiHardMiner, "semi_hard"), (tc.miners.AllTripletsMiner, "batch_all")]:
        for margin in (0.0, 0.3, 1.5):
            a, p, nn_ = R.mine_triplets(x.detach(), labels, strategy, metric)
            keep = dist[a, nn_] - dist[a, p] <= margin
            expected = (a[keep], p[keep], nn_[keep])
            got = cls(margin=margin, metric=metric)(x, labels)
            check_format(got, device)
            assert rows(got) == rows(expected), (cls.__name__, margin)


def test_miner_labels_move_to_the_embeddings_device_and_any_integer_dtype():
    x, labels = make_batch(20, 4, 3, seed=1)
    expected = rows(tc.miners.BatchHardMiner()(x, labels))
    assert rows(tc.miners.BatchHardMiner()(x, labels.to(torch.int16) + 1000)) == expected


def test_margin_filter_keeps_nan_triplets():
    """A NaN embedding must not silently drop out of the mined set (the loss on it is NaN)."""
    x, labels = make_batch(12, 3, 2, seed=2)
    x[3, 0] = float("nan")
    for cls in (tc.miners.SemiHardMiner, tc.miners.AllTripletsMiner):
        a, p, n = cls(margin=0.1)(x, labels)
        involved = (a == 3) | (p == 3) | (n == 3)
        a0, p0, n0 = cls()(x, labels)
        assert int(involved.sum()) == int(((a0 == 3) | (p0 == 3) | (n0 == 3)).sum()) > 0, cls.__name__


def test_empty_and_single_class_batches():
    for cls in MINERS:
        t = cls()(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
        check_format(t, "cpu")
        assert t[0].numel() == 0
        t = cls(metric="cosine")(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64))
        assert t[0].numel() == 0


# ----------------------------------------------------------------------------- against pml
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}D{}C{}".format(*s))
def test_batch_hard_miner_equals_pml(metric, size):
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    n, d, c = size
    for seed in range(3):
        x, labels = make_batch(n, d, c, seed=seed * 7 + n)
        ours = tc.miners.BatchHardMiner(metric=metric)(x, labels)
        theirs = pml_miners.BatchHardMiner(distance=pml_distance(metric))(x, labels)
        assert rows(ours) == rows(theirs)
        dist = R.pairwise_distance(x, metric=metric)
        a, p, nn_ = ours
        a2, p2, n2 = theirs
        torch.testing.assert_close(dist[a, p], dist[a2, p2])
        torch.testing.assert_close(dist[a, nn_], dist[a2, n2])


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_pml_loss_with_our_batch_hard_miner_equals_with_pml_miner(metric):
    """The one-line switch: pml's TripletMarginLoss on our miner's triplets gives the loss of
    pml's miner, and the fused tc loss (pml's default reducer averages the nonzero terms)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, labels = make_batch(67, 8, 9, seed=3)
    x.requires_grad_()
    loss_fn = pml_losses.TripletMarginLoss(margin=0.3, distance=pml_distance(metric))
    ours = loss_fn(x, labels, tc.miners.BatchHardMiner(metric=metric)(x, labels))
    theirs = loss_fn(x, labels, pml_miners.BatchHardMiner(distance=pml_distance(metric))(x, labels))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    fused = tc.batch_hard_triplet_loss(x, labels, 0.3, metric=metric, reduction="mean_nonzero")
    torch.testing.assert_close(ours, fused, rtol=1e-9, atol=1e-9)
    g_ours, = torch.autograd.grad(ours, x)
    g_fused, = torch.autograd.grad(fused, x)
    torch.testing.assert_close(g_ours, g_fused, rtol=1e-8, atol=1e-9)
    assert ours.item() > 0


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("margin", [0.05, 0.5])
def test_semi_hard_miner_relation_to_pml_triplet_margin_miner(metric, margin):
    """pml's TripletMarginMiner(type_of_triplets="semihard") returns every negative with
    d_ap < d_an <= d_ap + margin. For each (a, p) that set is non-empty exactly when our
    triplet is semi-hard (d_an > d_ap) within the margin, and then our negative is its nearest."""
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    for seed in range(3):
        x, labels = make_batch(45, 6, 6, seed=seed + 11)
        dist = R.pairwise_distance(x, metric=metric)
        pml = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=pml_distance(metric))
        pa, pp, pn = pml(x, labels)
        groups = {}
        for a, p, n in zip(pa.tolist(), pp.tolist(), pn.tolist()):
            groups.setdefault((a, p), []).append(n)
        a, p, n = tc.miners.SemiHardMiner(margin=margin, metric=metric)(x, labels)
        semi = dist[a, n] > dist[a, p]
        ours = {(ai, pi): ni for ai, pi, ni, s in zip(a.tolist(), p.tolist(), n.tolist(), semi.tolist()) if s}
        assert set(ours) == set(groups)
        assert groups, "the data should give semi-hard triplets"
        for (ai, pi), ni in ours.items():
            nearest = min(groups[(ai, pi)], key=lambda k: dist[ai, k].item())
            assert ni == nearest
        # what is left of ours (no negative farther than d_ap): the farthest negative, outside pml's set
        for ai, pi, ni in zip(a[~semi].tolist(), p[~semi].tolist(), n[~semi].tolist()):
            negs = torch.nonzero(labels != labels[ai])[:, 0]
            assert dist[ai, ni] == dist[ai, negs].max() and (ai, pi) not in groups


@pytest.mark.parametrize("metric", METRICS)
def test_semi_hard_miner_relation_to_pml_batch_easy_hard_miner(metric):
    """pml's BatchEasyHardMiner(pos "hard", neg "semihard"): per anchor its hardest positive and
    the nearest negative farther than it, the anchor dropped when there is none. That triplet is
    ours for the same (a, p); the anchors pml drops are those whose (a, p_hard) falls back."""
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, labels = make_batch(53, 5, 7, seed=5)
    dist = R.pairwise_distance(x, metric=metric)
    pml = pml_miners.BatchEasyHardMiner(pos_strategy="hard", neg_strategy="semihard", distance=pml_distance(metric))
    pa, pp, pa2, pn = pml(x, labels)  # pml's pair format (a1, p, a2, n), here a1 == a2
    assert torch.equal(pa, pa2)
    a, p, n = tc.miners.SemiHardMiner(metric=metric)(x, labels)
    ours = {(ai, pi): ni for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist())}
    hard_a, hard_p, _ = tc.miners.BatchHardMiner(metric=metric)(x, labels)
    expected = [(ai, pi, ours[(ai, pi)]) for ai, pi in zip(hard_a.tolist(), hard_p.tolist())
                if dist[ai, ours[(ai, pi)]] > dist[ai, pi]]
    assert rows((pa, pp, pn)) == expected
    assert 0 < len(expected) < hard_a.numel(), "the data should have both cases"


def test_pml_loss_with_our_semi_hard_miner_equals_the_fused_semi_hard_loss():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    x, labels = make_batch(61, 7, 8, seed=9)
    t = tc.miners.SemiHardMiner()(x, labels)
    for reducer, reduction in [(reducers.MeanReducer(), "mean"), (reducers.AvgNonZeroReducer(), "mean_nonzero")]:
        loss_fn = pml_losses.TripletMarginLoss(margin=0.4, distance=pml_distance("euclidean"), reducer=reducer)
        torch.testing.assert_close(loss_fn(x, labels, t), tc.semi_hard_triplet_loss(x, labels, 0.4, reduction=reduction),
                                   rtol=1e-9, atol=1e-9)
    # with the margin filter only zero terms go: pml's default (nonzero) mean is unchanged
    loss_fn = pml_losses.TripletMarginLoss(margin=0.4, distance=pml_distance("euclidean"))
    torch.testing.assert_close(loss_fn(x, labels, tc.miners.SemiHardMiner(margin=0.4)(x, labels)),
                               tc.semi_hard_triplet_loss(x, labels, 0.4, reduction="mean_nonzero"), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("margin", [None, 0.0, 0.2, 1.0])
def test_all_triplets_miner_equals_pml(metric, margin):
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")
    x, labels = make_batch(37, 5, 5, seed=13)
    ours = tc.miners.AllTripletsMiner(margin=margin, metric=metric)(x, labels)
    if margin is None:
        theirs = lmu.get_all_triplets_indices(labels)
    else:
        theirs = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="all",
                                               distance=pml_distance(metric))(x, labels)
    assert rows(ours) == rows(theirs)  # both sorted by (a, p, n)
    assert 0 < len(rows(ours)) < 37 ** 3


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("margin", [None, 0.3])
def test_reference_set_miners_equal_pml_ref_emb(metric, margin):
    """pml's miner(embeddings, labels, ref_emb, ref_labels): anchors from the batch, positives and
    negatives from the reference set, nothing excluded; our indices point into the reference set."""
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, labels = make_batch(9, 5, 3, seed=21)
    ref, ref_labels = make_batch(40, 5, 4, seed=22)  # label 3 is absent from the batch
    ours = tc.miners.BatchHardMiner(metric=metric)(x, labels, ref, ref_labels)
    theirs = pml_miners.BatchHardMiner(distance=pml_distance(metric))(x, labels, ref, ref_labels)
    assert len(rows(ours)) > 0 and rows(ours) == rows(theirs)
    ours = tc.miners.AllTripletsMiner(margin=margin, metric=metric)(x, labels, ref, ref_labels)
    if margin is None:
        lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")
        theirs = lmu.get_all_triplets_indices(labels, ref_labels)
    else:
        theirs = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="all",
                                               distance=pml_distance(metric))(x, labels, ref, ref_labels)
    assert len(rows(ours)) > 0 and rows(ours) == rows(theirs)


@pytest.mark.parametrize("strategy, cls", [("batch_hard", tc.miners.BatchHardMiner),
                                           ("semi_hard", tc.miners.SemiHardMiner),
                                           ("batch_all", tc.miners.AllTripletsMiner)])
def test_reference_set_miners_with_self_index_match_the_reference(strategy, cls):
    x, labels = make_batch(9, 5, 3, seed=23)
    mem, mem_labels = make_batch(20, 5, 4, seed=24)
    ref, ref_labels = torch.cat([x, mem]), torch.cat([labels, mem_labels])  # the batch first: self index 0
    got = cls()(x, labels, ref, ref_labels, ref_self_index=0)
    want = R.mine_triplets(x, labels, strategy, ref_embeddings=ref, ref_labels=ref_labels, ref_self_index=0)
    assert len(rows(got)) > 0 and rows(got) == rows(want)
    a, p, _ = got
    assert not (p == a).any()  # never its own positive


# ----------------------------------------------------------------------------- API
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="metric"):
        tc.miners.BatchHardMiner(metric="l1")
    with pytest.raises(ValueError, match="margin"):
        tc.miners.SemiHardMiner(margin=-1.0)
    with pytest.raises(ValueError, match="margin"):
        tc.miners.AllTripletsMiner(margin=float("nan"))
    x, labels = make_batch(6, 3, 2, seed=0)
    with pytest.raises(ValueError, match="ref_labels"):
        tc.miners.BatchHardMiner()(x, labels, x)
    with pytest.raises(ValueError, match="ref_emb"):
        tc.miners.BatchHardMiner()(x, labels, None, labels)
    with pytest.raises(ValueError, match="ref_self_index"):
        tc.miners.BatchHardMiner()(x, labels, ref_self_index=0)
    with pytest.raises(TypeError, match="labels"):
        tc.miners.BatchHardMiner()(x, labels.float())
    with pytest.raises(ValueError, match="labels"):
        tc.miners.SemiHardMiner()(x, labels[:-1])


def test_repr_and_module_behaviour():
    assert repr(tc.miners.BatchHardMiner()) == "BatchHardMiner(metric='euclidean')"
    assert repr(tc.miners.SemiHardMiner(margin=0.2, metric="cosine")) == "SemiHardMiner(metric='cosine', margin=0.2)"
    assert repr(tc.miners.AllTripletsMiner()) == "AllTripletsMiner(metric='euclidean')"
    for cls in MINERS:
        m = cls()
        assert isinstance(m, torch.nn.Module) and not list(m.parameters()) and not list(m.buffers())


def test_docs_examples_and_hints():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(miners, miners.__name__) if t.examples]
    assert len(tests) >= 3
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
    for cls in MINERS:
        doc = inspect.getdoc(cls)
        for section in ("Args:", "Shapes:", "Returns:", "Raises:", "Example:"):
            assert f"\n{section}\n" in doc, (cls.__name__, section)
        for fn in (cls.__init__, cls.forward):
            hints = typing.get_type_hints(fn)
            for p in inspect.signature(fn).parameters:
                assert p == "self" or p in hints, (cls.__name__, fn.__name__, p)
