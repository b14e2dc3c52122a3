// pairwise_distance on CPU: one GEMM plus a fused distance epilogue; backward as two GEMMs.
#include "ops_cpu.h"

#include "../checks.h"
#include "distance.h"

namespace triplet_cuda {
namespace cpu {
namespace {

void check_pair(const at::Tensor& x, const at::Tensor& y, int64_t metric) {
  check_pair_args(x, y, metric, c10::kCPU);
}

}  // namespace

// x: (N, D), y: (M, D) -> (N, M) distances in x's dtype.
at::Tensor pairwise_distance_cpu(const at::Tensor& x, const at::Tensor& y, int64_t metric) {
  check_pair(x, y, metric);
  if (x.size(0) == 0 || y.size(0) == 0) return zeros({x.size(0), y.size(0)}, x.options());
  const Metric m = static_cast<Metric>(metric);
  const Prepared px = prepare(x, m), py = prepare(y, m);
  return distance_block(px, 0, px.rows(), py, m).to(x.scalar_type());
}

// grad: (N, M), x: (N, D), y: (M, D), dist: (N, M) -> (grad_x (N, D), grad_y (M, D)).
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(const at::Tensor& grad,
                                                                  const at::Tensor& x,
                                                                  const at::Tensor& y,
                                                                  const at::Tensor& dist,
                                                                  int64_t metric) {
  check_pair(x, y, metric);
  TC_CHECK_SHAPE(grad, "grad", x.size(0), y.size(0));
  TC_CHECK_SHAPE(dist, "dist", x.size(0), y.size(0));
  const Metric m = static_cast<Metric>(metric);
  const Prepared px = prepare(x, m), py = prepare(y, m);
  at::Tensor gx = zeros_like(px.e), gy = zeros_like(py.e);
  if (px.rows() > 0 && py.rows() > 0) {
    // both are overwritten by accumulate_distance_grad: take private copies
    at::Tensor W = grad.to(px.e.scalar_type(), /*non_blocking=*/false, /*copy=*/true).contiguous();
    at::Tensor d = dist.to(px.e.scalar_type(), false, true).contiguous();
    accumulate_distance_grad(W, d, px, 0, py, m, gx, gy);
  }
  return {gx.to(x.scalar_type()), gy.to(y.scalar_type())};
}

}  // namespace cpu
}  // namespace triplet_cuda
