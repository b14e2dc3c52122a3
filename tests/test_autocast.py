"""Mixed precision: under torch.autocast every op runs in float32 and returns float32."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc
from conftest import cpu_and_cuda, make_batch
from triplet_cuda import reference as R

LOSSES = {
    "batch_hard": (tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss),
    "batch_all": (tc.batch_all_triplet_loss, R.batch_all_triplet_loss),
    "semi_hard": (tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss),
    "contrastive": (tc.contrastive_loss, R.contrastive_loss),
}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["in32", "in16", "inbf16"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_losses_under_autocast(device, amp_dtype, in_dtype, loss):
    fn, ref = LOSSES[loss]
    x, labels = make_batch(23, 9, 5, seed=1, dtype=in_dtype, device=device)
    xg = x.clone().requires_grad_()
    with torch.autocast(device, dtype=amp_dtype):
        out = fn(xg, labels, 0.3)
        assert out.dtype == torch.float32
        out.backward()  # inside the region too: the backward ops have the same rule
    assert xg.grad.dtype == in_dtype and torch.isfinite(xg.grad).all()
    # float32 math: the float32 result on the same (rounded) input, not a half-precision one
    expected = fn(x.float(), labels, 0.3)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.detach().double(), ref(x.double(), labels, 0.3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mining_and_distance_under_autocast(device, amp_dtype):
    x, labels = make_batch(19, 6, 4, seed=2, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=amp_dtype):
        d = tc.pairwise_distance(x, x[:7], metric="cosine")
        m = tc.batch_hard_mine(x.half(), labels)
        trip = tc.mine_triplets(x, labels, strategy="semi_hard")
    assert d.dtype == torch.float32 and m.pos_dist.dtype == torch.float32
    torch.testing.assert_close(d, tc.pairwise_distance(x, x[:7], metric="cosine"))
    assert all(torch.equal(a, b) for a, b in zip(trip, tc.mine_triplets(x, labels, strategy="semi_hard")))
    # float64 is left alone, as autocast does
    with torch.autocast(device, dtype=amp_dtype):
        assert tc.batch_all_triplet_loss(x.double(), labels).dtype == torch.float64


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fp16_large_norms_do_not_overflow(device):
    # |x|^2 = 64 * 300^2 = 5.8e6 > 65504, the float16 maximum: float32 accumulation keeps it finite
    x, labels = make_batch(16, 64, 4, seed=3, dtype=torch.float64, scale=300.0)
    x16 = x.half().to(device)
    for name, (fn, ref) in LOSSES.items():
        if name == "contrastive":
            continue  # d^2 ~ 1e7 is itself beyond float16: checked under autocast (float32 result) below
        got = fn(x16, labels.to(device), 50.0)
        want = ref(x16.double().cpu(), labels, 50.0)
        assert torch.isfinite(got), fn.__name__
        torch.testing.assert_close(got.double().cpu(), want, rtol=4e-3, atol=4e-3 * float(want.abs()) + 1e-3)
    with torch.autocast(device, dtype=torch.float16):
        for fn, ref in LOSSES.values():
            got = fn(x16, labels.to(device), 50.0)
            want = ref(x16.double().cpu(), labels, 50.0)
            assert got.dtype == torch.float32 and torch.isfinite(got)
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs()) + 1e-3)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_amp_training_step(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 6).to(device)
    x, labels = make_batch(24, 8, 6, seed=4, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        emb = model(x)
        assert emb.dtype == torch.bfloat16
        loss = tc.TripletLoss(margin=0.3)(emb, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(model.weight.grad).all()
