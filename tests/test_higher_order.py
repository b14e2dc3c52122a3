"""Higher-order gradients, torch.func transforms and margin scalars."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import triplet_cuda as tc
from conftest import METRICS, cpu_and_cuda, make_batch
from triplet_cuda import reference as R

ops = torch.ops.triplet_cuda


def _gradient_penalty(fn, x):
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    return gg


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_gradgradcheck_batch_hard(device, metric):
    x, labels = make_batch(11, 4, 3, seed=5, device=device)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda e: tc.batch_hard_triplet_loss(e, labels, 0.5, metric=metric), (x,))
    assert torch.autograd.gradgradcheck(
        lambda e: tc.batch_hard_triplet_loss(e, labels, metric=metric, soft_margin=True, reduction="none"), (x,))
    assert torch.autograd.gradgradcheck(lambda e: tc.batch_hard_mine(e, labels, metric=metric).neg_dist, (x,))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_gradgradcheck_pairwise_distance(device, metric):
    x, _ = make_batch(7, 3, 1, seed=6, device=device)
    y, _ = make_batch(5, 3, 1, seed=7, device=device)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: tc.pairwise_distance(a, b, metric=metric), (x, y))


@pytest.mark.parametrize("metric", ["squared_euclidean", "cosine", "euclidean"])
def test_double_backward_matches_reference(metric):
    # the reproducer: d/dx ||dL/dx||^2 (it was 0.0 against the reference's 3.815)
    x, labels = make_batch(8, 4, 4, seed=0)
    labels = torch.arange(8) // 2
    x.requires_grad_()
    got = _gradient_penalty(lambda e: tc.batch_hard_triplet_loss(e, labels, 0.5, metric=metric), x)
    if metric == "euclidean":
        # the reference's norm has a NaN second derivative on its zero diagonal: a safe-norm reference
        def ref(e):
            m = tc.batch_hard_mine(e.detach(), labels)
            dp = (e - e[m.pos_idx]).norm(dim=1)
            dn = (e - e[m.neg_idx]).norm(dim=1)
            return torch.relu(dp - dn + 0.5).mean()
    else:
        def ref(e):
            return R.batch_hard_triplet_loss(e, labels, 0.5, metric=metric)
    want = _gradient_penalty(ref, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("loss", ["batch_all_triplet_loss", "semi_hard_triplet_loss", "contrastive_loss"])
def test_dense_losses_refuse_second_derivative(loss):
    x, labels = make_batch(9, 3, 3, seed=8)
    x.requires_grad_()
    fn = getattr(tc, loss)
    (g,) = torch.autograd.grad(fn(x, labels), x, create_graph=True)  # the first derivative is fine
    torch.testing.assert_close(g, torch.autograd.grad(getattr(R, loss)(x, labels), x)[0])
    with pytest.raises(NotImplementedError, match=rf"the second derivative of {loss} is not implemented"):
        g.square().sum().backward()
    with pytest.raises(NotImplementedError, match=rf"second derivative of {loss}"):
        torch.autograd.gradgradcheck(lambda e: fn(e, labels), (x,))


def test_backward_ops_called_directly_are_not_differentiable():
    x, labels = make_batch(6, 3, 2, seed=9)
    x.requires_grad_()
    d = ops.pairwise_distance(x, x, 0)
    gx, _ = ops.pairwise_distance_backward(torch.ones_like(d), x, x, d, 0)
    with pytest.raises(NotImplementedError, match=r"pairwise_distance_backward is not differentiable when called directly"):
        gx.sum().backward()
    m = ops.batch_hard_mine(x, labels, 0)
    g = ops.batch_hard_mine_backward(torch.ones_like(m[0]), torch.ones_like(m[2]), x, *m, 0)
    with pytest.raises(NotImplementedError, match=r"differentiate batch_hard_mine with create_graph=True"):
        g.sum().backward()


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "jacfwd"])
def test_torch_func_differentiation_fails_clearly(transform):
    x, labels = make_batch(8, 4, 4, seed=0, dtype=torch.float32)

    def f(e):
        return tc.batch_hard_triplet_loss(e, labels)

    with pytest.raises(NotImplementedError, match=r"does not support torch\.func's differentiation transforms"):
        if transform == "vjp":
            torch.func.vjp(f, x)
        else:
            getattr(torch.func, transform)(f)(x)


def test_vmap_matches_a_loop():
    x, labels = make_batch(3 * 10, 4, 3, seed=1, dtype=torch.float32)
    xs = x.reshape(3, 10, 4)
    fns = [lambda e: tc.batch_hard_triplet_loss(e, labels[:10]), lambda e: tc.batch_all_triplet_loss(e, labels[:10]),
           lambda e: tc.semi_hard_triplet_loss(e, labels[:10]), lambda e: tc.contrastive_loss(e, labels[:10]),
           lambda e: tc.pairwise_distance(e, metric="cosine")]
    for fn in fns:
        got = torch.func.vmap(fn)(xs)
        want = torch.stack([fn(xs[i]) for i in range(3)])
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("margin", [0.3, 3, np.float32(0.3), np.float64(0.3), np.int64(3), torch.tensor(0.3),
                                    torch.tensor(0.3, dtype=torch.float64), torch.tensor(3)],
                         ids=["float", "int", "np.float32", "np.float64", "np.int64", "tensor32", "tensor64", "tensor-int"])
@pytest.mark.parametrize("loss", ["batch_hard_triplet_loss", "batch_all_triplet_loss", "semi_hard_triplet_loss",
                                  "contrastive_loss"])
def test_margin_scalars(margin, loss):
    x, labels = make_batch(12, 3, 3, seed=2)
    want = getattr(R, loss)(x, labels, float(margin))
    torch.testing.assert_close(getattr(tc, loss)(x, labels, margin), want)
    module = tc.ContrastiveLoss(margin) if loss == "contrastive_loss" else tc.TripletLoss(margin)
    assert isinstance(module.margin, float) and module.margin == pytest.approx(float(margin))


def test_zero_margin_is_allowed():
    x, labels = make_batch(12, 3, 3, seed=2)
    torch.testing.assert_close(tc.batch_all_triplet_loss(x, labels, 0.0), R.batch_all_triplet_loss(x, labels, 0.0))
