// pairwise_distance on CUDA: a tiled dot-product kernel with a fused distance epilogue;
// backward as two tiled "coefficient matrix x operand" products (pair_grad.cuh); both
// compiled in tiles.cu.

#include "ops_cuda.h"
#include "tiles.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

void check_pair(const at::Tensor& x, const at::Tensor& y, int64_t metric) {
  check_pair_args(x, y, metric, c10::kCUDA);
}

}  // namespace

// x: (N, D), y: (M, D) -> (N, M) distances in x's dtype (Gram form, acc_t arithmetic).
at::Tensor pairwise_distance_cuda(const at::Tensor& x_in, const at::Tensor& y_in,
                                  int64_t metric) {
  check_pair(x_in, y_in, metric);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t N = x.size(0), M = y.size(0), D = x.size(1);
  at::Tensor out = empty({N, M}, x.options());
  if (N == 0 || M == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pairwise_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sx = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor sy = compute_row_stats<scalar_t, acc_t>(y, stream);
    TC_METRIC_SWITCH(metric, kM, [&] {
      launch_distance<scalar_t, acc_t, scalar_t, kM>(
          x.data_ptr<scalar_t>(), row_stats_view<acc_t>(sx), N, y.data_ptr<scalar_t>(),
          row_stats_view<acc_t>(sy), M, D, out.data_ptr<scalar_t>(), M, stream);
    });
  });
  return out;
}

// grad: (N, M), x: (N, D), y: (M, D), dist: (N, M) (the forward's output)
//   -> (grad_x (N, D), grad_y (M, D)) in the dtype of x, contiguous.
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad_in,
                                                                   const at::Tensor& x_in,
                                                                   const at::Tensor& y_in,
                                                                   const at::Tensor& dist_in,
                                                                   int64_t metric) {
  check_pair(x_in, y_in, metric);
  TC_CHECK_SHAPE(grad_in, "grad", x_in.size(0), y_in.size(0));
  TC_CHECK_SHAPE(dist_in, "dist", x_in.size(0), y_in.size(0));
  TC_CHECK_SAME_DEVICE(x_in, grad_in, "x", "grad");
  TC_CHECK_SAME_DEVICE(x_in, dist_in, "x", "dist");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t N = x.size(0), M = y.size(0), D = x.size(1);
  if (N == 0 || M == 0 || D == 0) {
    return {zeros({N, D}, x.options()), zeros({M, D}, y.options())};
  }
  // grad / dist are read in x's dtype (autograd passes them in it already).
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const at::Tensor dist = dist_in.to(x.scalar_type()).contiguous();
  at::Tensor gx = empty({N, D}, x.options());
  at::Tensor gy = empty({M, D}, y.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pairwise_distance_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor sx = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor sy = compute_row_stats<scalar_t, acc_t>(y, stream);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const scalar_t* W = grad.data_ptr<scalar_t>();
      const scalar_t* Dm = dist.data_ptr<scalar_t>();
      launch_pair_grad<scalar_t, acc_t, scalar_t, kM, false>(
          W, Dm, M, x.data_ptr<scalar_t>(), row_stats_view<acc_t>(sx), N,
          y.data_ptr<scalar_t>(), row_stats_view<acc_t>(sy), M, D, gx.data_ptr<scalar_t>(),
          /*accumulate=*/false, acc_options, stream);
      launch_pair_grad<scalar_t, acc_t, scalar_t, kM, true>(
          W, Dm, M, x.data_ptr<scalar_t>(), row_stats_view<acc_t>(sx), N,
          y.data_ptr<scalar_t>(), row_stats_view<acc_t>(sy), M, D, gy.data_ptr<scalar_t>(),
          /*accumulate=*/false, acc_options, stream);
    });
  });
  return {gx, gy};
}

}  // namespace cuda
}  // namespace triplet_cuda
