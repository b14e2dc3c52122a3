"""torch.compile(fullgraph=True) of the public functions matches eager (forward and backward)."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import cpu_and_cuda, make_batch

FNS = {
    "batch_hard": lambda x, labels: tc.batch_hard_triplet_loss(x, labels, 0.3),
    "batch_hard_soft_none": lambda x, labels: tc.batch_hard_triplet_loss(x, labels, soft_margin=True, reduction="none",
                                                                         metric="cosine"),
    "batch_hard_stats": lambda x, labels: tc.batch_hard_triplet_loss(x, labels, return_stats=True)[0],
    "batch_all": lambda x, labels: tc.batch_all_triplet_loss(x, labels, 0.3, metric="squared_euclidean"),
    "batch_all_stats": lambda x, labels: tc.batch_all_triplet_loss(x, labels, return_stats=True),
    "semi_hard": lambda x, labels: tc.semi_hard_triplet_loss(x, labels, 0.3),
    "contrastive": lambda x, labels: tc.contrastive_loss(x, labels, 1.0, reduction="sum"),
    "pairwise": lambda x, labels: tc.pairwise_distance(x, x[: x.shape[0] // 2], metric="cosine"),
    "mine_dists": lambda x, labels: tc.batch_hard_mine(x, labels).pos_dist,
    "module": lambda x, labels: tc.TripletLoss(mining="batch_all")(x, labels),
}


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


def _run(fn, x, labels):
    xg = x.clone().requires_grad_()
    outs = _flatten(fn(xg, labels))
    loss = sum((o.double().sum() for o in outs if o.is_floating_point() and o.requires_grad), torch.zeros((), dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, xg)
    return [o.detach() for o in outs], grad


def check_compiled(fn, backend, device, dynamic=False, sizes=((17, 5),)):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    for seed, (n, d) in enumerate(sizes):
        x, labels = make_batch(n, d, 4, seed=seed, dtype=torch.float32, device=device)
        eager_out, eager_grad = _run(fn, x, labels)
        comp_out, comp_grad = _run(compiled, x, labels)
        assert len(eager_out) == len(comp_out)
        for e, c in zip(eager_out, comp_out):
            assert e.dtype == c.dtype and e.shape == c.shape
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comp_grad, eager_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(device, name, backend):
    check_compiled(FNS[name], backend, device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ["batch_hard", "batch_all"])
def test_compile_dynamic_shapes(device, name):
    # one graph for several batch sizes (dynamic=True): the fake kernels handle symbolic N
    check_compiled(FNS[name], "aot_eager", device, dynamic=True, sizes=((9, 3), (17, 5), (30, 5)))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ["batch_hard", "batch_all"])
def test_compile_inductor(device, name):
    check_compiled(FNS[name], "inductor", device)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compile_mine_triplets(device):
    # data-dependent output length inside a compiled graph
    def fn(x, labels):
        a, p, n = tc.mine_triplets(x, labels, strategy="batch_all")
        return a, p, n

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, labels = make_batch(13, 3, 3, seed=0, device=device)
    for got, want in zip(compiled(x, labels), fn(x, labels)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compile_training_step(device):
    # the usual pattern: a compiled model + loss step, no graph break
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).to(device)
    loss_fn = tc.TripletLoss(margin=0.3)

    def step(x, labels):
        return loss_fn(model(x), labels)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, labels = make_batch(20, 6, 4, seed=1, dtype=torch.float32, device=device)
    eager = step(x, labels)
    eager.backward()
    g_eager = model.weight.grad.clone()
    model.weight.grad = None
    model.bias.grad = None
    comp = compiled(x, labels)
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.weight.grad, g_eager, rtol=1e-5, atol=1e-6)
