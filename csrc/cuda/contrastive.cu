// Contrastive loss on CUDA over unordered pairs i < j:
//   same label: d^2;  different labels: relu(margin - d)^2.
//
// Anchor rows are processed in chunks (loss_common.cuh): distances of the chunk's rows to
// all N rows in an (R, N) acc_t workspace, then one block per row owns columns j > i,
// reduces its terms in a fixed order (float64), and rows are reduced in a fixed order
// (finalize_loss): deterministic. The backward writes the dense upper-triangular weights
//   W[i, j] = 2 d (same label) or -2 relu(margin - d) (different), j > i; 0 elsewhere
// and differentiates through the distances with pair_grad.cuh. O(R * N) memory per chunk.
// The terms and weights are the shared epilogue's (epi::contrastive_term / weight in
// csrc/epilogue.h, as the CPU): a NaN distance gives a NaN term and weight (not counted as
// positive).
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

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
      const bool same = labels[j] == li;
      const acc_t term = epi::contrastive_term(same, d, margin);
      if constexpr (kBackward) w = epi::contrastive_weight(same, d, margin);
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

// The contrastive loss for loss_forward_cuda / loss_backward_cuda (loss_common.cuh):
// num_valid = N (N - 1) / 2 unordered pairs.
struct ContrastiveLoss {
  static constexpr bool kLabelGroups = false;
  static constexpr const char* kForwardName = "contrastive_loss_cuda";
  static constexpr const char* kBackwardName = "contrastive_loss_backward_cuda";

  // Bytes of chunk workspace per (row, column) element: distances and weights.
  template <typename acc_t>
  static constexpr int64_t bytes_per_elem() {
    return 2 * static_cast<int64_t>(sizeof(acc_t));
  }

  template <typename acc_t>
  static void forward(const LossChunk& c, const RowResults& rows) {
    const acc_t m = static_cast<acc_t>(c.margin);
    contrastive_rows_kernel<acc_t, false><<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), c.labels.data_ptr<int64_t>(), c.N, c.i0, m,
        rows.loss.data_ptr<double>(), rows.valid.data_ptr<int64_t>(),
        rows.positive.data_ptr<int64_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t>
  static at::Tensor weights(const LossChunk& c) {
    const acc_t m = static_cast<acc_t>(c.margin);
    at::Tensor Wc = at::empty({c.r, c.N}, c.Dc.options());
    contrastive_rows_kernel<acc_t, true><<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), c.labels.data_ptr<int64_t>(), c.N, c.i0, m, nullptr,
        nullptr, nullptr, Wc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return Wc;
  }
};

// The forward plus the gradient of loss_sum (grad_sum, accumulation dtype). On CUDA this is
// still the forward followed by the recomputing backward with g = 1; the CPU computes both in
// one upper-triangle pass (csrc/cpu/contrastive.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_with_grad_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric) {
  auto [loss_sum, num_valid, num_positive] =
      loss_forward_cuda<ContrastiveLoss>(embeddings, labels, margin, metric);
  const at::Tensor one = at::ones(at::IntArrayRef{}, loss_sum.options());
  const at::Tensor grad =
      loss_backward_cuda<ContrastiveLoss>(one, embeddings, labels, margin, metric);
  return {loss_sum, num_valid, num_positive, grad.to(loss_sum.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("contrastive_loss", &loss_forward_cuda<ContrastiveLoss>);
  m.impl("contrastive_loss_backward", &loss_backward_cuda<ContrastiveLoss>);
  m.impl("contrastive_loss_with_grad", &contrastive_with_grad_cuda);
}

}  // namespace cuda
}  // namespace triplet_cuda
