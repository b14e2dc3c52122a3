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


# ----------------------------------------------------------------------------- every loss and module
ALL = {
    "batch_hard_sum": lambda x, labels: tc.batch_hard_triplet_loss(x, labels, 0.3, reduction="sum", metric="squared_euclidean"),
    "batch_all_mean": lambda x, labels: tc.batch_all_triplet_loss(x, labels, 0.3, reduction="mean", metric="cosine"),
    "semi_hard_cosine": lambda x, labels: tc.semi_hard_triplet_loss(x, labels, 0.3, metric="cosine"),
    "contrastive_mean": lambda x, labels: tc.contrastive_loss(x, labels, 1.5),
    "TripletLoss": tc.TripletLoss(margin=0.3),
    "TripletLoss_soft": tc.TripletLoss(soft_margin=True, metric="cosine"),
    "TripletLoss_semi_hard": tc.TripletLoss(mining="semi_hard"),
    "ContrastiveLoss": tc.ContrastiveLoss(margin=2.0, metric="squared_euclidean"),
    "mine_neg_dist": lambda x, labels: tc.batch_hard_mine(x, labels, metric="cosine").neg_dist,
}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(ALL))
def test_compile_every_loss_and_module(device, name):
    check_compiled(ALL[name], "aot_eager", device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ["batch_hard", "semi_hard", "contrastive"])
def test_compile_training_step_loss_inside(device, name):
    # model + loss + backward + optimizer step: the compiled step matches eager over several steps
    fn = {"batch_hard": FNS["batch_hard"], "semi_hard": FNS["semi_hard"], "contrastive": FNS["contrastive"]}[name]
    x, labels = make_batch(24, 6, 5, seed=2, dtype=torch.float32, device=device)

    def train(step_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = step_fn(model, x, labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]

    def step(model, x, labels):
        return fn(model(x), labels)

    torch._dynamo.reset()
    eager_losses, eager_params = train(step)
    comp_losses, comp_params = train(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(comp_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for c, e in zip(comp_params, eager_params):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dynamic_batch_sizes_do_not_recompile_every_step(device):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    loss_fn = tc.TripletLoss(mining="batch_all")
    compiled = torch.compile(lambda x, labels: loss_fn(x, labels), fullgraph=True, backend="aot_eager")
    sizes = (16, 24, 31, 40, 57, 64, 77)
    for seed, n in enumerate(sizes):
        x, labels = make_batch(n, 5, 4, seed=seed, dtype=torch.float32, device=device)
        torch.testing.assert_close(compiled(x, labels), loss_fn(x, labels), rtol=1e-5, atol=1e-6)
    frames = counters["stats"]["unique_graphs"]
    # the first size compiles a static graph, the second a dynamic one; no more after that
    assert frames <= 2, f"{frames} graphs for {len(sizes)} batch sizes"


def test_compile_under_autocast():
    x, labels = make_batch(20, 6, 4, seed=3, dtype=torch.float32)

    def fn(x, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tc.batch_hard_triplet_loss(x, labels), tc.contrastive_loss(x, labels)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, labels)
    want = fn(x, labels)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)
