"""pml_contrastive_loss / PMLContrastiveLoss: pytorch-metric-learning's ContrastiveLoss (linear
hinges, positive and negative parts each averaged over their terms > 0) against pml's own
output and gradients, against the reference, through gradcheck, and its edge cases."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import cpu_and_cuda, make_batch
from triplet_cuda import reference as R

ops = torch.ops.triplet_cuda
METRICS = ("euclidean", "squared_euclidean", "cosine")


def _labels(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "classes":
        return torch.randint(0, max(2, n // 4), (n,), generator=g)
    if kind == "singletons":  # every label once: no positive pair
        return torch.randperm(n, generator=g) * 7 - 3
    if kind == "one_class":  # no negative pair
        return torch.full((n,), 5)
    if kind == "some_singletons":  # a few pairs of one class, the rest singletons
        return torch.cat([torch.tensor([0, 0, 1, 1, 1]), torch.arange(10, 10 + n - 5)])
    raise AssertionError(kind)


def _pml(pos_margin, neg_margin, metric, normalize):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    if metric == "cosine":  # a similarity in pml: margins mirror (see pml_contrastive_loss)
        dist = distances.CosineSimilarity()
        return losses.ContrastiveLoss(1 - pos_margin, 1 - neg_margin, distance=dist)
    power = 2 if metric == "squared_euclidean" else 1
    dist = distances.LpDistance(normalize_embeddings=normalize, power=power)
    if normalize and metric == "euclidean":
        return losses.ContrastiveLoss(pos_margin, neg_margin)  # pml's defaults, as users write it
    return losses.ContrastiveLoss(pos_margin, neg_margin, distance=dist)


def _loss_and_grad(fn, x, labels):
    x = x.clone().requires_grad_()
    loss = fn(x, labels)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if grad is None else grad


@pytest.mark.parametrize("kind", ["classes", "some_singletons", "singletons", "one_class"])
@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.2, 0.8), (0.05, 1.6), (0.5, 0.5)], ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "as_given"])
def test_matches_pytorch_metric_learning(kind, margins, normalize):
    n = 23
    g = torch.Generator().manual_seed(len(kind) * 100 + int(margins[0] * 100) + 7 * normalize)
    x = torch.randn(n, 6, dtype=torch.float64, generator=g) * (0.3 if not normalize else 1.0)
    labels = _labels(kind, n, seed=3)
    pos_margin, neg_margin = margins
    want, want_grad = _loss_and_grad(_pml(pos_margin, neg_margin, "euclidean", normalize), x, labels)
    got, got_grad = _loss_and_grad(
        lambda e, lab: tc.pml_contrastive_loss(e, lab, pos_margin, neg_margin, normalize_embeddings=normalize),
        x, labels)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("metric", ["squared_euclidean", "cosine"])
def test_matches_pytorch_metric_learning_other_distances(metric):
    x, labels = make_batch(19, 5, 4, seed=11)  # float64
    margins = (0.1, 0.9) if metric == "cosine" else (0.3, 2.0)
    module = tc.PMLContrastiveLoss(*margins, metric=metric, normalize_embeddings=metric == "cosine")
    want, want_grad = _loss_and_grad(_pml(*margins, metric, False), x, labels)
    got, got_grad = _loss_and_grad(module, x, labels)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


def test_matches_pytorch_metric_learning_float32_batch():
    # a training-sized float32 batch through the module, against pml's defaults
    x, labels = make_batch(128, 32, 4, seed=2, dtype=torch.float32)
    want, want_grad = _loss_and_grad(_pml(0.0, 1.0, "euclidean", True), x, labels)
    got, got_grad = _loss_and_grad(tc.PMLContrastiveLoss(), x, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(device, metric, dtype):
    x, labels = make_batch(37, 5, 3, seed=4, dtype=dtype, device=device)
    x = torch.cat([x, x[:2]])  # duplicates: exact zero distances
    labels = torch.cat([labels, labels[:2]])
    margins = (0.4, 2.5) if metric == "squared_euclidean" else (0.2, 1.2)
    want, want_grad = _loss_and_grad(lambda e, lab: R.pml_contrastive_loss(e, lab, *margins, metric=metric), x, labels)
    got, got_grad = _loss_and_grad(
        lambda e, lab: tc.pml_contrastive_loss(e, lab, *margins, metric=metric, normalize_embeddings=False), x, labels)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)


def test_many_blocks_match_the_reference(monkeypatch):
    monkeypatch.setenv("TRIPLET_CUDA_CPU_BLOCK_BYTES", "2000")  # a few rows per block
    x, labels = make_batch(61, 4, 4, seed=6)
    want, want_grad = _loss_and_grad(lambda e, lab: R.pml_contrastive_loss(e, lab, 0.1, 1.5), x, labels)
    got, got_grad = _loss_and_grad(
        lambda e, lab: tc.pml_contrastive_loss(e, lab, 0.1, 1.5, normalize_embeddings=False), x, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "as_given"])
def test_gradcheck(metric, normalize):
    x, labels = make_batch(9, 4, 3, seed=7)  # float64, no near ties at the hinges
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e: tc.pml_contrastive_loss(e, labels, 0.3, 1.4, metric=metric, normalize_embeddings=normalize), (x,))


def test_parts_are_differentiated_apart():
    # the op's positive and negative sums take their own gradients (the reduction divides them
    # by different counts): gradcheck of a weighted sum of the two parts
    x, labels = make_batch(10, 3, 3, seed=8)
    x.requires_grad_()

    def f(e):
        pos_sum, _, neg_sum, _ = ops.contrastive_hinge_loss(e, labels, 0.2, 1.3, 0)
        return 0.7 * pos_sum - 2.5 * neg_sum

    assert torch.autograd.gradcheck(f, (x,))


def test_hand_computed():
    # positives (0,1), (2,3) at distance 1; negatives (0,2), (1,3) at 3 and (0,3), (1,2) at sqrt(10)
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = tc.pml_contrastive_loss(x, labels, 0.5, 3.5, normalize_embeddings=False)
    pos = (0.5 + 0.5) / 2
    neg = (0.5 + 0.5 + 2 * (3.5 - 10 ** 0.5)) / 4
    assert loss.item() == pytest.approx(pos + neg, rel=1e-14)
    # nothing above the margins: 0, still attached
    x.requires_grad_()
    zero = tc.pml_contrastive_loss(x, labels, 1.0, 0.5, normalize_embeddings=False)
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("n", [0, 1])
def test_no_pairs(n):
    x = torch.randn(n, 3, requires_grad=True)
    loss = tc.pml_contrastive_loss(x, torch.zeros(n, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == x.shape and not x.grad.any()


def test_nan_input_gives_nan():
    x, labels = make_batch(8, 3, 2, seed=1)
    x[3, 1] = float("nan")
    x.requires_grad_()
    loss = tc.pml_contrastive_loss(x, labels, normalize_embeddings=False)
    assert loss.isnan()
    loss.backward()
    assert not torch.isfinite(x.grad).all()


def test_module_and_errors():
    criterion = tc.PMLContrastiveLoss(0.1, 0.9, metric="cosine")
    assert repr(criterion) == "PMLContrastiveLoss(pos_margin=0.1, neg_margin=0.9, metric='cosine', normalize_embeddings=True)"
    assert not list(criterion.parameters()) and not list(criterion.buffers())
    x, labels = make_batch(8, 3, 2, seed=1)
    torch.testing.assert_close(criterion(x, labels), tc.pml_contrastive_loss(x, labels, 0.1, 0.9, metric="cosine"))
    with pytest.raises(ValueError, match=r"pos_margin must be a finite number >= 0"):
        tc.PMLContrastiveLoss(pos_margin=-0.1)
    with pytest.raises(ValueError, match=r"neg_margin must be a finite number >= 0"):
        tc.pml_contrastive_loss(x, labels, 0.0, float("inf"))
    with pytest.raises(ValueError, match=r"metric"):
        tc.PMLContrastiveLoss(metric="manhattan")
    with pytest.raises(RuntimeError, match=r"grad_neg_sum must have one element"):
        ops.contrastive_hinge_loss_backward(torch.zeros(()), torch.zeros(2), x, labels, 0.0, 1.0, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(dtype):
    x, labels = make_batch(16, 8, 4, seed=5)
    got = tc.pml_contrastive_loss(x.to(dtype), labels)
    assert got.dtype == dtype
    want = R.pml_contrastive_loss(torch.nn.functional.normalize(x.to(dtype).double()), labels)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-2)


def test_second_derivative_refused():
    x, labels = make_batch(9, 3, 3, seed=8)
    x.requires_grad_()
    (g,) = torch.autograd.grad(tc.pml_contrastive_loss(x, labels), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"second derivative of pml_contrastive_loss"):
        g.square().sum().backward()


def test_compile_matches_eager():
    x, labels = make_batch(20, 4, 4, seed=9, dtype=torch.float32)
    fn = torch.compile(lambda e, lab: tc.pml_contrastive_loss(e, lab, 0.1, 0.9), fullgraph=True)
    want, want_grad = _loss_and_grad(lambda e, lab: tc.pml_contrastive_loss(e, lab, 0.1, 0.9), x, labels)
    got, got_grad = _loss_and_grad(fn, x, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
