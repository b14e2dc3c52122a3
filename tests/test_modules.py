"""nn.Module wrappers: TripletLoss and ContrastiveLoss against the functional API and the reference."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import METRICS, assert_close, cpu_and_cuda, make_batch

MINING = {
    "batch_hard": (tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss, "mean"),
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss, "mean_nonzero"),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss, "mean"),
}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mining", list(MINING))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_triplet_loss_module_defaults(device, mining, metric, dtype):
    fn, ref_fn, default_reduction = MINING[mining]
    module = tc.TripletLoss(mining=mining, metric=metric)
    assert isinstance(module, torch.nn.Module)
    assert list(module.parameters()) == []
    assert module.margin == 0.2 and module.reduction == default_reduction  # reduction=None -> mining's default
    x, labels = make_batch(31, 6, 5, seed=1, dtype=dtype, device=device)
    x.requires_grad_()
    out = module(x, labels)
    expected = fn(x, labels, 0.2, metric=metric, reduction=default_reduction)
    assert torch.equal(out, expected)
    ref = ref_fn(x.detach().cpu().double(), labels.cpu(), 0.2, metric=metric, reduction=default_reduction)
    assert_close(out, ref, dtype)
    (g_mod,) = torch.autograd.grad(out, x)
    (g_fn,) = torch.autograd.grad(expected, x)
    assert torch.equal(g_mod, g_fn)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("mining", list(MINING))
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_triplet_loss_module_arguments(device, mining, reduction, margin):
    fn, ref_fn, _ = MINING[mining]
    if reduction == "none" and mining != "batch_hard":
        with pytest.raises(ValueError, match=r"reduction must be one of .*got 'none'"):
            tc.TripletLoss(margin, mining=mining, reduction=reduction)(*make_batch(5, 2, 2, seed=0, device=device))
        return
    module = tc.TripletLoss(margin, mining=mining, metric="squared_euclidean", reduction=reduction)
    x, labels = make_batch(23, 4, 4, seed=2, device=device)
    out = module(x, labels)
    assert torch.equal(out, fn(x, labels, margin, metric="squared_euclidean", reduction=reduction))
    assert_close(out, ref_fn(x.cpu(), labels.cpu(), margin, metric="squared_euclidean", reduction=reduction), torch.float64)
    assert f"mining={mining!r}" in repr(module) and f"reduction={reduction!r}" in repr(module)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_triplet_loss_module_soft_margin(device, metric):
    module = tc.TripletLoss(mining="batch_hard", metric=metric, soft_margin=True)
    x, labels = make_batch(19, 5, 3, seed=3, device=device)
    out = module(x, labels)
    assert torch.equal(out, tc.batch_hard_triplet_loss(x, labels, metric=metric, soft_margin=True))
    assert_close(out, R.batch_hard_triplet_loss(x.cpu(), labels.cpu(), metric=metric, soft_margin=True), torch.float64)
    assert "soft_margin=True" in repr(module)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_contrastive_loss_module(device, metric, reduction):
    module = tc.ContrastiveLoss(margin=1.3, metric=metric, reduction=reduction)
    x, labels = make_batch(21, 4, 3, seed=4, device=device, scale=0.5)
    out = module(x, labels)
    assert torch.equal(out, tc.contrastive_loss(x, labels, 1.3, metric=metric, reduction=reduction))
    assert_close(out, R.contrastive_loss(x.cpu(), labels.cpu(), 1.3, metric=metric, reduction=reduction), torch.float64)


def test_contrastive_loss_module_defaults():
    module = tc.ContrastiveLoss()
    assert module.margin == 1.0 and module.metric == "euclidean" and module.reduction == "mean"
    x, labels = make_batch(13, 3, 3, seed=5)
    assert_close(module(x, labels), R.contrastive_loss(x, labels, 1.0), torch.float64)


def test_modules_in_a_training_step():
    # a tiny model trained a few steps with each loss: finite losses, gradients reach the weights
    torch.manual_seed(0)
    x, labels = make_batch(32, 8, 4, seed=6, dtype=torch.float32)
    for loss_fn in [tc.TripletLoss(), tc.TripletLoss(mining="batch_all"), tc.TripletLoss(mining="semi_hard"),
                    tc.TripletLoss(soft_margin=True, metric="cosine"), tc.ContrastiveLoss()]:
        model = torch.nn.Linear(8, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = loss_fn(model(x), labels)
            loss.backward()
            assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))), (loss_fn, losses)
        assert losses[-1] <= losses[0] + 1e-6, (loss_fn, losses)


def test_module_state_dict_and_pickle():
    import pickle

    module = tc.TripletLoss(0.4, mining="semi_hard", metric="cosine")
    assert module.state_dict() == {}
    clone = pickle.loads(pickle.dumps(module))
    x, labels = make_batch(11, 3, 3, seed=7)
    assert torch.equal(clone(x, labels), module(x, labels))
