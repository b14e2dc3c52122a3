"""CrossBatchMemory against a plain re-implementation: a Python list of past batches and
tc.reference's query-vs-reference losses, over several steps (warm-up, wrap-around, a batch
larger than the memory), gradients to the current batch only, state_dict, reset, errors."""
from __future__ import annotations

import doctest
import functools

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import memory
from triplet_cuda import reference as R
from conftest import cpu_and_cuda, make_batch

# (name, fused loss module, reference loss function with the same settings)
LOSSES = [
    ("batch_hard", lambda: tc.TripletLoss(margin=0.3, mining="batch_hard"),
     functools.partial(R.batch_hard_triplet_loss, margin=0.3)),
    ("batch_hard_sq_none", lambda: tc.TripletLoss(margin=0.3, metric="squared_euclidean", reduction="none"),
     functools.partial(R.batch_hard_triplet_loss, margin=0.3, metric="squared_euclidean", reduction="none")),
    ("batch_all", lambda: tc.TripletLoss(margin=0.3, mining="batch_all"),
     functools.partial(R.batch_all_triplet_loss, margin=0.3)),
    ("semi_hard_cosine", lambda: tc.TripletLoss(margin=0.2, mining="semi_hard", metric="cosine"),
     functools.partial(R.semi_hard_triplet_loss, margin=0.2, metric="cosine")),
    ("contrastive", lambda: tc.ContrastiveLoss(margin=1.5), functools.partial(R.contrastive_loss, margin=1.5)),
]
# batch sizes of a stream: warm-up, wrap-around at memory_size=11, a batch larger than the memory
STREAM = [4, 5, 7, 3, 12, 6, 9]


class PlainMemory:
    """The specification, written plainly: the last `size` rows of every batch seen so far."""

    def __init__(self, loss_fn, size):
        self.loss_fn, self.size, self.batches = loss_fn, size, []

    def __call__(self, x, labels):
        past_x = torch.cat([b[0] for b in self.batches]) if self.batches else x[:0].detach()
        past_l = torch.cat([b[1] for b in self.batches]) if self.batches else labels[:0]
        past_x, past_l = past_x[-self.size:] if self.size else past_x[:0], past_l[-self.size:]
        out = self.loss_fn(x, labels, ref_embeddings=torch.cat([x, past_x]), ref_labels=torch.cat([labels, past_l]),
                           ref_self_index=0)
        self.batches.append((x.detach().clone(), labels.clone()))
        return out


def stream(n_steps, d, num_classes, seed, device="cpu", dtype=torch.float64, sizes=STREAM):
    for t in range(n_steps):
        x, labels = make_batch(sizes[t % len(sizes)], d, num_classes, seed=seed * 100 + t, device=device, dtype=dtype)
        yield x, labels


def run_both(make_loss, ref_fn, memory_size, device="cpu", steps=len(STREAM), d=5, num_classes=4, seed=0):
    xbm = tc.CrossBatchMemory(make_loss(), embedding_size=d, memory_size=memory_size)
    plain = PlainMemory(ref_fn, memory_size)
    for step, (x, labels) in enumerate(stream(steps, d, num_classes, seed, device)):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        got, expected = xbm(xa, labels), plain(xb, labels)
        yield step, xbm, (got, xa), (expected, xb)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("memory_size", [1, 11, 64])
@pytest.mark.parametrize("name,make_loss,ref_fn", LOSSES, ids=[x[0] for x in LOSSES])
@pytest.mark.parametrize("wrapped", ["fused", "reference"])
def test_matches_plain_reimplementation_over_a_stream(device, memory_size, name, make_loss, ref_fn, wrapped):
    """wrapped="fused": a tc loss module inside; "reference": the reference loss itself (the ring
    logic alone, independent of the kernels)."""
    seen = written = 0
    maker = make_loss if wrapped == "fused" else (lambda: ref_fn)
    for step, xbm, (got, xa), (expected, xb) in run_both(maker, ref_fn, memory_size, device):
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-9, atol=1e-9, msg=f"step {step}")
        g_got, = torch.autograd.grad(got.sum(), xa)
        g_exp, = torch.autograd.grad(expected.sum(), xb)
        torch.testing.assert_close(g_got, g_exp, rtol=1e-8, atol=1e-9, msg=f"grad, step {step}")
        seen += xa.shape[0]
        written += min(xa.shape[0], memory_size)  # a batch larger than the ring writes its last memory_size rows
        assert xbm.filled == min(seen, memory_size)
        assert xbm.position == written % memory_size
        assert not xbm.embedding_memory.requires_grad and xbm.embedding_memory.device.type == device


def test_ring_callable_loss_spec():
    """The ring logic alone (a reference loss as the wrapped callable): the ring holds the last
    memory_size rows, in ring order, detached, labels as int64."""
    xbm = tc.CrossBatchMemory(R.batch_hard_triplet_loss, embedding_size=3, memory_size=5)
    rows = []
    for t, n in enumerate([2, 2, 2, 7, 1]):
        x = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3) + 100 * t
        x.requires_grad_()
        xbm(x, torch.full((n,), t, dtype=torch.int32))
        rows += [(x[i].detach(), t) for i in range(n)]
        newest = rows[-5:]
        stored = sorted((tuple(e.tolist()), int(l)) for e, l in zip(xbm.embedding_memory[: xbm.filled],
                                                                     xbm.label_memory[: xbm.filled]))
        assert stored == sorted((tuple(e.tolist()), l) for e, l in newest), t
        assert xbm.label_memory.dtype == torch.int64 and xbm.embedding_memory.dtype == torch.float64
        assert not xbm.embedding_memory.requires_grad


def test_first_step_is_the_in_batch_loss_and_no_grad_reaches_the_memory():
    x, labels = make_batch(16, 4, 3, seed=1)
    xbm = tc.CrossBatchMemory(tc.TripletLoss(margin=0.5), 4, memory_size=100)
    torch.testing.assert_close(xbm(x, labels), tc.batch_hard_triplet_loss(x, labels, 0.5))
    old = x.clone().requires_grad_()  # the stored rows came from a tensor that no longer matters
    y, ly = make_batch(8, 4, 3, seed=2)
    y.requires_grad_()
    loss = xbm(y, ly)
    loss.backward()
    assert y.grad is not None and old.grad is None and xbm.embedding_memory.grad is None


def test_state_dict_round_trip_resumes_the_stream():
    make_loss, _ = LOSSES[0][1], LOSSES[0][2]
    a = tc.CrossBatchMemory(make_loss(), 5, memory_size=11)
    batches = list(stream(6, 5, 4, seed=3))
    for x, labels in batches[:4]:
        a(x, labels)
    state = a.state_dict()
    assert set(state) == {"embedding_memory", "label_memory", "_extra_state"}
    assert state["_extra_state"] == {"filled": a.filled, "position": a.position} == {"filled": 11, "position": 8}
    b = tc.CrossBatchMemory(make_loss(), 5, memory_size=11)
    b.load_state_dict(state)
    for x, labels in batches[4:]:
        torch.testing.assert_close(b(x, labels), a(x, labels), rtol=0, atol=0)
    assert (b.filled, b.position) == (a.filled, a.position)
    with pytest.raises(RuntimeError, match="size mismatch"):
        tc.CrossBatchMemory(make_loss(), 5, memory_size=12).load_state_dict(state)
    with pytest.raises(ValueError, match="filled"):
        b.set_extra_state({"filled": 12, "position": 0})


def test_reset_empties_the_memory():
    xbm = tc.CrossBatchMemory(tc.TripletLoss(), 5, memory_size=7)
    for x, labels in stream(3, 5, 4, seed=4):
        xbm(x, labels)
    xbm.reset()
    assert (xbm.filled, xbm.position) == (0, 0) and not xbm.embedding_memory.any()
    x, labels = make_batch(9, 5, 3, seed=5)
    torch.testing.assert_close(xbm(x, labels), tc.batch_hard_triplet_loss(x, labels))


def test_memory_follows_the_embeddings_dtype_and_module_to():
    xbm = tc.CrossBatchMemory(tc.TripletLoss(), 4, memory_size=6)
    assert xbm.embedding_memory.dtype == torch.float32
    x, labels = make_batch(5, 4, 2, seed=6, dtype=torch.float64)
    xbm(x, labels)
    assert xbm.embedding_memory.dtype == torch.float64
    torch.testing.assert_close(xbm.embedding_memory[:5], x)
    xbm.to(torch.float32)
    assert xbm.embedding_memory.dtype == torch.float32 and xbm.label_memory.dtype == torch.int64


def test_stats_come_from_the_wrapped_loss():
    xbm = tc.CrossBatchMemory(tc.TripletLoss(return_stats=True), 4, memory_size=6)
    x, labels = make_batch(5, 4, 2, seed=7)
    loss, stats = xbm(x, labels)
    assert isinstance(stats, tc.TripletStats)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="memory_size"):
        tc.CrossBatchMemory(tc.TripletLoss(), 4, memory_size=0)
    with pytest.raises(ValueError, match="embedding_size"):
        tc.CrossBatchMemory(tc.TripletLoss(), 4.0)
    with pytest.raises(ValueError, match="loss"):
        tc.CrossBatchMemory("batch_hard", 4)
    xbm = tc.CrossBatchMemory(tc.TripletLoss(), 4)
    with pytest.raises(ValueError, match="embedding_size=4"):
        xbm(torch.randn(3, 5), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels"):
        xbm(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        xbm(torch.randn(3, 4), torch.zeros(2, dtype=torch.int64))
    assert xbm.filled == 0  # nothing enqueued by a failed call


def test_docs_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(memory, memory.__name__) if t.examples]
    assert tests
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
    assert repr(tc.CrossBatchMemory(tc.TripletLoss(), 4, 8)).startswith("CrossBatchMemory(\n  embedding_size=4")
