// Contrastive losses on CUDA over unordered pairs i < j. The Hadsell form:
//   same label: d^2;  different labels: relu(margin - d)^2;
// the hinge form (pytorch-metric-learning's ContrastiveLoss, at the end of this file):
//   same label: relu(d - pos_margin);  different labels: relu(neg_margin - d), parts apart.
//
// Anchor rows are processed in chunks (loss_common.cuh): distances of the chunk's rows to
// all N rows in an (R, N) acc_t workspace, then one block per row owns columns j > i,
// reduces its terms in a fixed order (float64), and rows are reduced in a fixed order
// (finalize_loss): deterministic. The backward writes the dense upper-triangular weights
//   W[i, j] = 2 d (same label) or -2 relu(margin - d) (different), j > i; 0 elsewhere
// and differentiates through the distances with pair_grad.cuh. O(R * N) memory per chunk.
// The terms and weights are the shared epilogue's (epi::contrastive_term / weight in
// csrc/epilogue.h, as the CPU): a NaN distance gives a NaN term and weight (not counted as
// positive). With a reference set (contrastive_loss_ref) the same kernel sums the ordered
// pairs (a, j), j != self_index[a], of the anchor rows against the reference rows.

#include "ops_cuda.h"
#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// One block per row i = i0 + blockIdx.x of the chunk, against N = l.cols candidates: pairs
// j > i (the batch itself, valid_rows[i] = N - 1 - i) or j != self (a reference set).
// Forward: loss_rows[i], valid_rows[i], pos_rows[i]. Backward: Wc[row, :].
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kRowThreads)
    contrastive_rows_kernel(const acc_t* __restrict__ Dc, RowLabels l, int64_t i0, acc_t margin,
                            double* __restrict__ loss_rows,
                            int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows,
                            acc_t* __restrict__ Wc) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t i = i0 + row;
  const int64_t N = l.cols, self = l.self_of(i);
  const int64_t* __restrict__ labels = l.cand;
  const int64_t li = l.anchor[i];
  const acc_t* __restrict__ d_row = Dc + row * N;
  double loss = 0;
  int64_t active = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    acc_t w = 0;
    if (l.symmetric() ? j > i : j != self) {
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
      valid_rows[i] = l.symmetric() ? N - 1 - i : N - (self >= 0 && self < N ? 1 : 0);
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
        c.Dc.data_ptr<acc_t>(), c.lab, c.i0, m, rows.loss.data_ptr<double>(),
        rows.valid.data_ptr<int64_t>(), rows.positive.data_ptr<int64_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t>
  static at::Tensor weights(const LossChunk& c) {
    const acc_t m = static_cast<acc_t>(c.margin);
    at::Tensor Wc = empty({c.r, c.cols}, c.Dc.options());
    contrastive_rows_kernel<acc_t, true><<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), c.lab, c.i0, m, nullptr, nullptr, nullptr,
        Wc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return Wc;
  }
};

}  // namespace

TC_CUDA_LOSS_ENTRY_POINTS(contrastive, ContrastiveLoss)

// The forward plus the gradient of loss_sum (grad_sum, accumulation dtype). On CUDA this is
// still the forward followed by the recomputing backward with g = 1; the CPU computes both in
// one upper-triangle pass (csrc/cpu/contrastive.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_with_grad_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric) {
  auto [loss_sum, num_valid, num_positive] =
      loss_forward_cuda<ContrastiveLoss>(embeddings, labels, margin, metric);
  const at::Tensor one = ones(at::IntArrayRef{}, loss_sum.options());
  const at::Tensor grad =
      loss_backward_cuda<ContrastiveLoss>(one, embeddings, labels, margin, metric);
  return {loss_sum, num_valid, num_positive, grad.to(loss_sum.scalar_type())};
}

namespace {

// ------------------------------------------------------------------------ hinge form
// pytorch-metric-learning's ContrastiveLoss: relu(d - pos_margin) for the same label,
// relu(neg_margin - d) otherwise, the positive and negative parts apart (epi::HingeTerms).
// Forward: per row its pos / neg sums and terms > 0 (rows reduced in a fixed order by two
// finalize_loss calls). Backward: W[i, j] = g_pos * weight (same label) or g_neg * weight,
// j > i; g_pos / g_neg are read on the device (no host sync).
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kRowThreads)
    hinge_rows_kernel(const acc_t* __restrict__ Dc, const int64_t* __restrict__ labels,
                      int64_t N, int64_t i0, epi::HingeTerms<acc_t> terms,
                      double* __restrict__ pos_rows, int64_t* __restrict__ pos_nz_rows,
                      double* __restrict__ neg_rows, int64_t* __restrict__ neg_nz_rows,
                      int64_t* __restrict__ valid_rows, const acc_t* __restrict__ g_pos,
                      const acc_t* __restrict__ g_neg, acc_t* __restrict__ Wc) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t i = i0 + row;
  const int64_t li = labels[i];
  const acc_t* __restrict__ d_row = Dc + row * N;
  acc_t gp = 0, gn = 0;
  if constexpr (kBackward) {
    gp = *g_pos;
    gn = *g_neg;
  }
  double ps = 0, ns = 0;
  int64_t pc = 0, nc = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    acc_t w = 0;
    if (j > i) {
      const acc_t d = d_row[j];
      const bool same = labels[j] == li;
      const acc_t term = terms.term(same, d);
      if constexpr (kBackward) w = (same ? gp : gn) * terms.weight(same, d);
      const bool on = term > acc_t(0);
      ps += same ? static_cast<double>(term) : 0.0;
      ns += same ? 0.0 : static_cast<double>(term);
      pc += same && on ? 1 : 0;
      nc += !same && on ? 1 : 0;
    }
    if constexpr (kBackward) Wc[row * N + j] = w;
  }
  if constexpr (!kBackward) {
    ps = block_sum(ps, sd);
    ns = block_sum(ns, sd);
    pc = block_sum(pc, si);
    nc = block_sum(nc, si);
    if (threadIdx.x == 0) {
      pos_rows[i] = ps;
      neg_rows[i] = ns;
      pos_nz_rows[i] = pc;
      neg_nz_rows[i] = nc;
      valid_rows[i] = N - 1 - i;
    }
  }
}

}  // namespace

// embeddings (N, D), labels (N,) -> (pos_sum, pos_nonzero, neg_sum, neg_nonzero).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_hinge_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, double pos_margin, double neg_margin,
    int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  const int64_t N = x.size(0);
  if (N == 0) {
    auto [s, nv, np] = empty_loss(x);
    return {s, np, s.clone(), np.clone()};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RowResults pos = make_row_results(x), neg = make_row_results(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "contrastive_hinge_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats = compute_row_stats<scalar_t, acc_t>(x, stream);
    const RowStats<acc_t> st = row_stats_view<acc_t>(stats);
    const int64_t R = chunk_rows(N, N, static_cast<int64_t>(sizeof(acc_t)));
    const epi::HingeTerms<acc_t> terms{static_cast<acc_t>(pos_margin),
                                       static_cast<acc_t>(neg_margin)};
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, st, x, st, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            hinge_rows_kernel<acc_t, false><<<grid_1d(r), kRowThreads, 0, stream>>>(
                Dc.data_ptr<acc_t>(), lab.data_ptr<int64_t>(), N, i0, terms,
                pos.loss.data_ptr<double>(), pos.positive.data_ptr<int64_t>(),
                neg.loss.data_ptr<double>(), neg.positive.data_ptr<int64_t>(),
                pos.valid.data_ptr<int64_t>(), nullptr, nullptr, nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  neg.valid.copy_(pos.valid);
  auto [pos_sum, pv, pos_nz] = finalize_loss(pos, x, stream);
  auto [neg_sum, nv, neg_nz] = finalize_loss(neg, x, stream);
  return {pos_sum, pos_nz, neg_sum, neg_nz};
}

// grad_pos_sum, grad_neg_sum: 0-d -> grad (N, D) in the dtype of embeddings.
at::Tensor contrastive_hinge_backward_cuda(const at::Tensor& grad_pos_sum,
                                           const at::Tensor& grad_neg_sum,
                                           const at::Tensor& embeddings, const at::Tensor& labels,
                                           double pos_margin, double neg_margin, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  TORCH_CHECK(grad_pos_sum.numel() == 1, "triplet_cuda: grad_pos_sum must have one element, got ",
              grad_pos_sum.sizes());
  TORCH_CHECK(grad_neg_sum.numel() == 1, "triplet_cuda: grad_neg_sum must have one element, got ",
              grad_neg_sum.sizes());
  const at::Tensor gp = check_grad_loss_sum(grad_pos_sum, x);
  const at::Tensor gn = check_grad_loss_sum(grad_neg_sum, x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0 || D == 0) return zeros({N, D}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "contrastive_hinge_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats = compute_row_stats<scalar_t, acc_t>(x, stream);
    const RowStats<acc_t> st = row_stats_view<acc_t>(stats);
    const int64_t R = chunk_rows(N, N, 2 * static_cast<int64_t>(sizeof(acc_t)));
    const epi::HingeTerms<acc_t> terms{static_cast<acc_t>(pos_margin),
                                       static_cast<acc_t>(neg_margin)};
    at::Tensor G = zeros({N, D}, acc_options);
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, st, x, st, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            at::Tensor Wc = empty({r, N}, acc_options);
            hinge_rows_kernel<acc_t, true><<<grid_1d(r), kRowThreads, 0, stream>>>(
                Dc.data_ptr<acc_t>(), lab.data_ptr<int64_t>(), N, i0, terms, nullptr, nullptr,
                nullptr, nullptr, nullptr, gp.data_ptr<acc_t>(), gn.data_ptr<acc_t>(),
                Wc.data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            add_chunk_grad<scalar_t, acc_t, kM>(Wc, Dc, x, st, x, st, i0, r, G, &G, stream);
          });
    });
    result = finish_grad<scalar_t, acc_t>(G, ones(at::IntArrayRef{}, acc_options), x, stream);
  });
  return result;
}

}  // namespace cuda
}  // namespace triplet_cuda
