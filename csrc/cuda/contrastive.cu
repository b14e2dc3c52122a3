// Contrastive loss on CUDA over unordered pairs i < j:
//   same label: d^2;  different labels: relu(margin - d)^2.
//
// Anchor rows are processed in chunks (loss_common.cuh): distances of the chunk's rows to
// all N rows in an (R, N) acc_t workspace, then one block per row owns columns j > i,
// reduces its terms in a fixed order (float64), and rows are reduced in a fixed order
// (finalize_loss): deterministic. The backward writes the dense upper-triangular weights
//   W[i, j] = 2 d (same label) or -2 relu(margin - d) (different), j > i; 0 elsewhere
// and differentiates through the distances with pair_grad.cuh. O(R * N) memory per chunk.
#include <torch/library.h>

#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// Bytes of chunk workspace per (row, column) element: distances and weights.
template <typename acc_t>
constexpr int64_t contrastive_bytes_per_elem() {
  return 2 * static_cast<int64_t>(sizeof(acc_t));
}

// One block per row i = i0 + blockIdx.x of the chunk.
// Forward: loss_rows[i], valid_rows[i] = N - 1 - i, pos_rows[i]. Backward: Wc[row, :].
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kRowThreads)
    contrastive_rows_kernel(const acc_t* __restrict__ Dc, const int64_t* __restrict__ labels,
                            int64_t N, int64_t i0, acc_t margin, double* __restrict__ loss_rows,
                            int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows,
                            acc_t* __restrict__ Wc) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t i = i0 + row;
  const int64_t li = labels[i];
  const acc_t* __restrict__ d_row = Dc + row * N;
  double loss = 0;
  int64_t active = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    acc_t w = 0;
    if (j > i) {
      const acc_t d = d_row[j];
      acc_t term;
      if (labels[j] == li) {
        term = d * d;
        w = acc_t(2) * d;
      } else {
        const acc_t r = acc_max(margin - d, acc_t(0));
        term = r * r;
        w = acc_t(-2) * r;
      }
      loss += static_cast<double>(term);
      active += term > acc_t(0) ? 1 : 0;
    }
    if constexpr (kBackward) Wc[row * N + j] = w;
  }
  if constexpr (!kBackward) {
    loss = block_sum(loss, sd);
    active = block_sum(active, si);
    if (threadIdx.x == 0) {
      loss_rows[i] = loss;
      valid_rows[i] = N - 1 - i;
      pos_rows[i] = active;
    }
  }
}

// embeddings: (N, D), labels: (N,) any integer dtype, margin, metric
//   -> (loss_sum 0-d acc dtype, num_valid = N (N - 1) / 2 0-d int64, num_positive 0-d int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_cuda(const at::Tensor& embeddings,
                                                                     const at::Tensor& labels,
                                                                     double margin,
                                                                     int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  const int64_t N = x.size(0);
  if (N == 0) return empty_loss(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RowResults rows = make_row_results(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "contrastive_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats = compute_row_stats<scalar_t, acc_t>(x, stream);
    const RowStats<acc_t> st = row_stats_view<acc_t>(stats);
    const int64_t R = chunk_rows(N, contrastive_bytes_per_elem<acc_t>());
    const acc_t m = static_cast<acc_t>(margin);
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, st, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            contrastive_rows_kernel<acc_t, false><<<grid_1d(r), kRowThreads, 0, stream>>>(
                Dc.data_ptr<acc_t>(), lab.data_ptr<int64_t>(), N, i0, m,
                rows.loss.data_ptr<double>(), rows.valid.data_ptr<int64_t>(),
                rows.positive.data_ptr<int64_t>(), nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  return finalize_loss(rows, x, stream);
}

// grad_loss_sum: 0-d; embeddings (N, D), labels (N,), margin, metric (the forward's inputs)
//   -> grad (N, D) in the dtype of embeddings = grad_loss_sum * d loss_sum / d embeddings.
at::Tensor contrastive_loss_backward_cuda(const at::Tensor& grad_loss_sum,
                                          const at::Tensor& embeddings, const at::Tensor& labels,
                                          double margin, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor gls = check_grad_loss_sum(grad_loss_sum, x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0 || D == 0) return at::zeros({N, D}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "contrastive_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats = compute_row_stats<scalar_t, acc_t>(x, stream);
    const RowStats<acc_t> st = row_stats_view<acc_t>(stats);
    const int64_t R = chunk_rows(N, contrastive_bytes_per_elem<acc_t>());
    const acc_t m = static_cast<acc_t>(margin);
    at::Tensor G = at::zeros({N, D}, acc_options);
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, st, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            at::Tensor Wc = at::empty({r, N}, acc_options);
            contrastive_rows_kernel<acc_t, true><<<grid_1d(r), kRowThreads, 0, stream>>>(
                Dc.data_ptr<acc_t>(), lab.data_ptr<int64_t>(), N, i0, m, nullptr, nullptr,
                nullptr, Wc.data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            add_chunk_grad<scalar_t, acc_t, kM>(Wc, Dc, x, st, i0, r, G, stream);
          });
    });
    result = finish_grad<scalar_t, acc_t>(G, gls, x, stream);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace triplet_cuda
