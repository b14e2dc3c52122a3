"""pairwise_distance: values against the reference, strides, empty inputs and gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import triplet_cuda as tc
from triplet_cuda import reference as R
from conftest import (
    FLOAT_DTYPES,
    METRICS,
    assert_close,
    assert_distances_close,
    cpu_and_cuda,
    tolerances,
)

# (N, M, D): N, M not multiples of any block size, D odd.
SHAPES = [(1, 1, 1), (2, 5, 3), (5, 1, 13), (37, 67, 13), (67, 37, 3)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_y", [True, False], ids=["xy", "xx"])
def test_pairwise_distance_matches_reference(device, dtype, metric, shape, with_y):
    n, m, d = shape
    seed = 1000 * n + 10 * m + d
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(m, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if with_y else None
    out = tc.pairwise_distance(x, y, metric=metric)
    assert out.dtype == dtype
    assert out.device == x.device
    assert out.shape == (n, m if with_y else n)
    # the reference runs in float64 on the (upcast) inputs the kernel saw
    assert_distances_close(out, x, y, metric, dtype, msg=f"{metric} {dtype} {shape} with_y={with_y}")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distance_several_seeds(device, dtype, metric):
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(23, 7, generator=g, dtype=torch.float64) * (1 + seed)).to(device=device, dtype=dtype)
        y = (torch.randn(11, 7, generator=g, dtype=torch.float64) - seed).to(device=device, dtype=dtype)
        assert_distances_close(tc.pairwise_distance(x, y, metric=metric), x, y, metric, dtype, msg=f"seed {seed}")


def test_pairwise_distance_hand_computed():
    # 3-4-5 triangle: d((0,0), (3,4)) = 5; cosine of orthogonal vectors is 0 -> distance 1,
    # of opposite vectors -1 -> distance 2.
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0], [-3.0, -4.0], [4.0, -3.0]], dtype=torch.float64)
    e = tc.pairwise_distance(x, y)
    torch.testing.assert_close(e, torch.tensor([[5.0, 5.0, 5.0], [0.0, 10.0, math.sqrt(50.0)]], dtype=torch.float64))
    s = tc.pairwise_distance(x, y, metric="squared_euclidean")
    torch.testing.assert_close(s, torch.tensor([[25.0, 25.0, 25.0], [0.0, 100.0, 50.0]], dtype=torch.float64))
    c = tc.pairwise_distance(x[1:], y, metric="cosine")
    torch.testing.assert_close(c, torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_self_distance_diagonal_is_zero(device, dtype, metric):
    """d(x_i, x_i) = ||x_i - x_i|| is exactly 0, whatever the dtype (y=None means y=x).

    The Gram expansion |a|^2 + |a|^2 - 2<a, a> leaves rounding noise on the diagonal (for the
    euclidean metric amplified by the square root to ~sqrt(eps) |a|) unless the kernel zeroes it.
    """
    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 13, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    diag = tc.pairwise_distance(x, metric=metric).diagonal()
    worst = int(diag.abs().argmax())
    assert torch.all(diag == 0), (
        f"pairwise_distance(x, metric={metric!r}) has a non-zero diagonal: "
        f"d[{worst}, {worst}] = {diag[worst].item()!r} (max over {diag.numel()} rows)"
    )


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cosine_self_distance_diagonal_near_zero(device, dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(37, 13, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    diag = tc.pairwise_distance(x, metric="cosine").diagonal()
    eps = torch.finfo(dtype).eps
    assert diag.abs().max().item() <= 64 * eps


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    "layout",
    ["transposed", "row_slice", "column_slice", "expanded_y"],
)
def test_pairwise_distance_non_contiguous(device, metric, layout):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 26, generator=g, dtype=torch.float64).to(device)
    if layout == "transposed":
        x = base[:13, :].t()            # (26, 13), strides (1, 26)
        y = base[13:26, :].t()          # (26, 13)
    elif layout == "row_slice":
        x = base[::3]                   # (14, 26), row stride 78
        y = base[1::2]                  # (20, 26)
    elif layout == "column_slice":
        x = base[:, ::2]                # (40, 13), column stride 2
        y = base[5:17, 1::2]            # (12, 13)
    else:
        x = base[:9, :7]
        y = base[0, :7].expand(5, 7)    # stride-0 rows: 5 copies of base[0, :7] (a row of x)
    assert not x.is_contiguous() or not y.is_contiguous()
    out = tc.pairwise_distance(x, y, metric=metric)
    assert_distances_close(out, x, y, metric, torch.float64, msg=layout)
    # same values as for contiguous copies
    assert_close(out, tc.pairwise_distance(x.contiguous(), y.contiguous(), metric=metric), torch.float64)
    self_out = tc.pairwise_distance(x, metric=metric)
    assert_close(self_out, tc.pairwise_distance(x.contiguous(), metric=metric), torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,m", [(0, 0), (0, 3), (3, 0)])
def test_pairwise_distance_empty(device, metric, n, m):
    x = torch.randn(n, 5, dtype=torch.float32, device=device, requires_grad=True)
    y = torch.randn(m, 5, dtype=torch.float32, device=device, requires_grad=True)
    out = tc.pairwise_distance(x, y, metric=metric)
    assert out.shape == (n, m)
    out.sum().backward()
    assert x.grad.shape == x.shape and y.grad.shape == y.shape
    assert torch.all(x.grad == 0) and torch.all(y.grad == 0)
    assert tc.pairwise_distance(x, metric=metric).shape == (n, n)


# ----------------------------------------------------------------------------- gradients
def _random_inputs(n, m, d, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(m, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return x, y


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_pairwise_distance_with_y(device, metric, seed):
    x, y = _random_inputs(7, 5, 4, seed, device)
    assert gradcheck(lambda a, b: tc.pairwise_distance(a, b, metric=metric), (x, y))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_pairwise_distance_without_y(device, metric, seed):
    # d(x_i, x_i) = 0 identically, so its numerical derivative is 0: this also needs the
    # diagonal to be exactly 0 rather than Gram-expansion rounding noise.
    x, _ = _random_inputs(7, 1, 4, seed, device)
    assert gradcheck(lambda a: tc.pairwise_distance(a, metric=metric), (x,))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_pairwise_distance_without_y_off_diagonal(device, metric):
    # The off-diagonal part alone: smooth wherever the rows are distinct.
    x, _ = _random_inputs(7, 1, 4, 2, device)
    mask = ~torch.eye(7, dtype=torch.bool, device=device)
    assert gradcheck(lambda a: tc.pairwise_distance(a, metric=metric)[mask], (x,))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_y", [True, False], ids=["xy", "xx"])
def test_pairwise_distance_grad_matches_reference(device, dtype, metric, with_y):
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(29, 5, generator=g, dtype=torch.float64).to(dtype)
    y0 = torch.randn(17, 5, generator=g, dtype=torch.float64).to(dtype)
    m = 17 if with_y else 29
    w = torch.randn(29, m, generator=g, dtype=torch.float64)

    x = x0.clone().to(device).requires_grad_()
    y = y0.clone().to(device).requires_grad_() if with_y else None
    out = tc.pairwise_distance(x, y, metric=metric)
    (out * w.to(device=device, dtype=dtype)).sum().backward()

    xr = x0.double().clone().requires_grad_()
    yr = y0.double().clone().requires_grad_() if with_y else None
    ref = R.pairwise_distance(xr, yr, metric=metric)
    (ref * w.to(dtype).double()).sum().backward()

    assert x.grad.dtype == dtype
    # the gradient sums ~M terms: scale the tolerance by the gradient magnitude
    scale = max(1.0, xr.grad.abs().max().item())
    rtol, atol = tolerances(dtype)
    assert_close(x.grad, xr.grad, dtype, msg="grad x", rtol=rtol, atol=atol * scale)
    if with_y:
        assert_close(y.grad, yr.grad, dtype, msg="grad y", rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_duplicated_rows_give_finite_gradient(device, dtype, metric):
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(9, 6, generator=g, dtype=torch.float64) * 4).to(dtype)
    x0[4] = x0[1]
    x0[7] = x0[1]
    x = x0.clone().to(device).requires_grad_()
    y = x0[[1, 2, 1]].clone().to(device).requires_grad_()
    out = tc.pairwise_distance(x, y, metric=metric)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # the gradient of one zero distance alone: exactly 0 (the subgradient at a == b)
    x.grad = None
    d = tc.pairwise_distance(x, metric=metric)
    d[1, 4].backward()
    if metric != "cosine":
        assert torch.all(x.grad == 0), f"gradient of d(x1, x4) = 0 at x1 == x4 should be 0, got {x.grad}"
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cosine_zero_row_is_finite(device, dtype):
    # 1 - <a, b> / (max(|a|, eps) max(|b|, eps)): a zero row is at distance exactly 1 from everything
    x0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [-1.0, 0.5, 3.0]], dtype=torch.float64)
    x = x0.clone().to(device=device, dtype=dtype).requires_grad_()
    out = tc.pairwise_distance(x, metric="cosine")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0].double().cpu(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out[1:, 0].double().cpu(), torch.ones(2, dtype=torch.float64))
    w = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, -0.5, 1.0]], dtype=torch.float64)
    (out * w.to(device=device, dtype=dtype)).sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    xr = x0.clone().requires_grad_()
    (R.pairwise_distance(xr, metric="cosine") * w).sum().backward()
    assert_close(x.grad, xr.grad, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cosine_zero_row_gradient_matches_reference(device, dtype):
    # The zero row's own gradient is -(1/eps) sum_j w_0j x_j/|x_j|, ~1e8 (eps = 1e-8, the
    # norm floor, as torch.nn.functional.cosine_similarity): finite in float32/64 and bfloat16
    # (float16 cannot hold it, so it is left out here).
    x0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [-1.0, 0.5, 3.0]], dtype=torch.float64)
    x = x0.clone().to(device=device, dtype=dtype).requires_grad_()
    out = tc.pairwise_distance(x, metric="cosine")
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    xr = x0.clone().requires_grad_()
    R.pairwise_distance(xr, metric="cosine").sum().backward()
    assert xr.grad[0].abs().max() > 1e7  # the hand-derived size above
    assert_close(x.grad, xr.grad, dtype, rtol=max(tolerances(dtype)[0], 1e-6))
