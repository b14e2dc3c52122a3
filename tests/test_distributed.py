"""Mining across ranks: real multi-process gloo runs on CPU (torch.multiprocessing, a file://
rendezvous in tmp_path, no network), each bounded in time. Every rank's loss must equal the
single-process loss on the concatenated batch, and every rank's embedding gradient must be
world_size times that loss's gradient on its rows (DistributedDataParallel divides by
world_size), with uneven shards; a DDP model's parameter gradients must equal single-process
training's; and the README's DDP snippet runs with two processes."""
from __future__ import annotations

import datetime
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import triplet_cuda as tc
from triplet_cuda import reference as R

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # per multi-process run (each process imports torch and the built ops)

D = 6
SHARDS = (5, 8)  # uneven on purpose


def global_batch(seed=0, n=sum(SHARDS), num_classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, num_classes, (n,), generator=g)


# name -> factory of (distributed loss of (x, labels) -> (loss, stats), single-process loss of the same)
P = functools.partial
CASES = {
    # the helper on the reference losses (the query-vs-reference oracle)
    "ref_batch_hard": lambda: (P(tc.distributed.loss_across_ranks, R.batch_hard_triplet_loss, margin=0.5,
                                 return_stats=True),
                               P(R.batch_hard_triplet_loss, margin=0.5, return_stats=True)),
    "ref_contrastive_sum": lambda: (P(tc.distributed.loss_across_ranks, R.contrastive_loss, margin=1.5,
                                      reduction="sum", return_stats=True),
                                    P(R.contrastive_loss, margin=1.5, reduction="sum", return_stats=True)),
    # gather_across_ranks=True on the fused functions and modules
    "batch_hard": lambda: (P(tc.batch_hard_triplet_loss, margin=0.5, return_stats=True, gather_across_ranks=True),
                           P(tc.batch_hard_triplet_loss, margin=0.5, return_stats=True)),
    "batch_hard_soft_cosine_nonzero": lambda: (
        P(tc.batch_hard_triplet_loss, soft_margin=True, metric="cosine", reduction="mean_nonzero", return_stats=True,
          gather_across_ranks=True),
        P(tc.batch_hard_triplet_loss, soft_margin=True, metric="cosine", reduction="mean_nonzero", return_stats=True)),
    "semi_hard": lambda: (P(tc.semi_hard_triplet_loss, margin=0.4, return_stats=True, gather_across_ranks=True),
                          P(tc.semi_hard_triplet_loss, margin=0.4, return_stats=True)),
    "batch_all_sum": lambda: (P(tc.batch_all_triplet_loss, margin=0.4, reduction="sum", return_stats=True,
                                gather_across_ranks=True),
                              P(tc.batch_all_triplet_loss, margin=0.4, reduction="sum", return_stats=True)),
    "contrastive_module": lambda: (tc.ContrastiveLoss(margin=1.5, return_stats=True, gather_across_ranks=True),
                                   tc.ContrastiveLoss(margin=1.5, return_stats=True)),
    "triplet_module_mean": lambda: (tc.TripletLoss(margin=0.5, return_stats=True, gather_across_ranks=True),
                                    tc.TripletLoss(margin=0.5, return_stats=True)),
}
REF = ["ref_batch_hard", "ref_contrastive_sum"]
FUSED = [name for name in CASES if name not in REF]


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _loss_worker(rank, world, init_file, out_dir, shards, names):
    _init(rank, world, init_file)
    try:
        x_all, l_all = global_batch(n=sum(shards))
        start = sum(shards[:rank])
        labels = l_all[start: start + shards[rank]]
        results = {}
        for name in names:
            x = x_all[start: start + shards[rank]].clone().requires_grad_()
            loss, stats = CASES[name]()[0](x, labels)
            grad, = torch.autograd.grad(loss, x)
            results[name] = (loss.detach(), grad, stats)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while a peer still uses it
    finally:
        dist.destroy_process_group()


def _semi_hard_criterion(which):
    if which == "fused":
        return tc.TripletLoss(margin=0.5, mining="semi_hard", gather_across_ranks=True)
    return functools.partial(tc.distributed.loss_across_ranks, R.semi_hard_triplet_loss, margin=0.5)


def _ddp_worker(rank, world, init_file, out_dir, shards, which):
    _init(rank, world, init_file)
    try:
        x_all, l_all = global_batch(n=sum(shards))
        start = sum(shards[:rank])
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(D, 4).double())
        criterion = _semi_hard_criterion(which)
        loss = criterion(model(x_all[start: start + shards[rank]]), l_all[start: start + shards[rank]])
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, tmp_path, *args):
    """Run fn(rank, world, init_file, out_dir, *args) in `world` spawned processes, bounded in time;
    return each rank's saved results."""
    init_file, out_dir = tmp_path / "rendezvous", tmp_path / "out"
    out_dir.mkdir()
    ctx = mp.start_processes(fn, args=(world, str(init_file), str(out_dir), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise AssertionError(f"{world}-process run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("shards", [SHARDS, (7, 0, 3)], ids=["5+8", "7+0+3"])
def test_two_and_three_rank_losses_equal_the_concatenated_batch(tmp_path, shards, names=REF + FUSED):
    results = run_ranks(_loss_worker, len(shards), tmp_path, shards, names)
    x_all, l_all = global_batch(n=sum(shards))
    world = len(shards)
    for name in names:
        x = x_all.clone().requires_grad_()
        loss, stats = CASES[name]()[1](x, l_all)
        grad, = torch.autograd.grad(loss, x)
        assert loss.item() != 0, f"{name}: the data should give a nonzero loss"
        start = 0
        for rank, n in enumerate(shards):
            r_loss, r_grad, r_stats = results[rank][name]
            torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-10, atol=1e-12, msg=f"{name}: rank {rank} loss")
            torch.testing.assert_close(r_grad / world, grad[start: start + n], rtol=1e-9, atol=1e-12,
                                       msg=f"{name}: rank {rank} gradient / world_size")
            for got, exp in zip(r_stats, stats):
                assert torch.equal(got.cpu(), exp.cpu()), (name, rank, r_stats, stats)
            start += n


@pytest.mark.parametrize("which", ["fused", "reference"])
def test_ddp_training_equals_single_process_training(tmp_path, which):
    """which="reference": loss_across_ranks on the reference loss (the scaling alone)."""
    results = run_ranks(_ddp_worker, len(SHARDS), tmp_path, SHARDS, which)
    x_all, l_all = global_batch()
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    loss = tc.TripletLoss(margin=0.5, mining="semi_hard")(model(x_all), l_all)
    loss.backward()
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        for got, p in zip(r["grads"], model.parameters()):
            # DDP has already averaged the ranks' gradients
            torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12, msg=f"rank {rank}")


def _readme_ddp_snippet():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)
    found = [b for b in blocks if "DistributedDataParallel" in b and "gather_across_ranks=True" in b]
    assert len(found) == 1, "README.md should hold one DistributedDataParallel snippet"
    return found[0]


def test_readme_ddp_snippet_runs_with_two_processes(tmp_path):
    script = tmp_path / "ddp_snippet.py"
    script.write_text(_readme_ddp_snippet())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"rank 0: step 2 loss [0-9.]+", proc.stdout), proc.stdout
    assert re.search(r"rank 1: step 2 loss [0-9.]+", proc.stdout), proc.stdout
    # the loss value is the global batch's, the same on both ranks
    values = dict(re.findall(r"rank (\d): step 2 loss ([0-9.]+)", proc.stdout))
    assert values["0"] == values["1"], proc.stdout


# ----------------------------------------------------------------------------- in one process
def test_errors_without_a_process_group():
    x, labels = global_batch()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        tc.distributed.gather_batch(x, labels)
    with pytest.raises(RuntimeError, match="gather_across_ranks=True"):
        tc.distributed.loss_across_ranks(R.batch_hard_triplet_loss, x, labels)


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one_is_the_plain_loss_and_errors(world_of_one):
    x, labels = global_batch()
    x.requires_grad_()
    got = tc.distributed.loss_across_ranks(R.semi_hard_triplet_loss, x, labels, 0.3, reduction="mean_nonzero")
    expected = R.semi_hard_triplet_loss(x, labels, 0.3, reduction="mean_nonzero")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(expected, x)[0])
    g = tc.distributed.gather_batch(x, labels.to(torch.int32))
    assert g.offset == 0 and g.sizes == (13,) and g.labels.dtype == torch.int64 and torch.equal(g.embeddings, x)
    with pytest.raises(ValueError, match="ref_embeddings"):
        tc.distributed.loss_across_ranks(R.batch_hard_triplet_loss, x, labels, ref_embeddings=x, ref_labels=labels)
    with pytest.raises(ValueError, match="reduction"):
        tc.distributed.loss_across_ranks(R.batch_hard_triplet_loss, x, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        tc.distributed.gather_batch(x, labels[:-1])


def test_nan_input_gives_nan_loss(world_of_one):
    x, labels = global_batch()
    x[2, 1] = float("nan")
    assert torch.isnan(tc.distributed.loss_across_ranks(R.batch_hard_triplet_loss, x, labels))


def test_docs_examples():
    import doctest

    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(tc.distributed, tc.distributed.__name__) if t.examples]
    assert len(tests) >= 3
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
