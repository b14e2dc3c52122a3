// Pieces shared by the loss ops (batch all, semi hard, contrastive) and mine_triplets:
//   * RowLabels: anchor labels, candidate labels and self index, so that every row kernel
//     serves the batch against itself and anchors against a reference set (the *_ref ops)
//     alike (the CUDA counterpart of csrc/cpu/loss.h's RowLabels),
//   * label groups (candidate labels sorted stably) for positive / negative counts and
//     enumeration,
//   * the row-chunk driver: distances of `R` anchor rows against all C candidate rows in a
//     (R, C) acc_t workspace (O(R * C) memory, R chosen to bound it), one chunk at a time,
//     never the N x C matrix,
//   * the deterministic reduction of per-row loss results into the three 0-d outputs,
//   * the dense backward of a chunk through pair_grad.cuh and the final scaling,
//   * the generic loss entry points loss_forward_cuda / loss_backward_cuda and their
//     query-vs-reference forms loss_ref_forward_cuda / loss_ref_backward_cuda (the CUDA
//     counterpart of csrc/cpu/loss.h): each loss .cu file only supplies its row kernels.
// The per-element rules (distances, NaN, ties, loss terms) are the shared epilogue's
// (csrc/epilogue.h), as on the CPU.
#pragma once

#include "distance.cuh"
#include "tiles.cuh"
#include "row_labels.cuh"

namespace triplet_cuda {
namespace cuda {

constexpr int kRowThreads = 256;  // block size of the per-anchor-row kernels

// ------------------------------------------------------------------------ label groups

// Candidate labels sorted stably: equal labels are contiguous, ascending index inside a group.
struct LabelGroups {
  at::Tensor sorted;  // (N) int64 labels, ascending
  at::Tensor order;   // (N) int64: order[q] = index of the q-th label in sorted order
  at::Tensor rank;    // (N) int64: rank[order[q]] = q
};

// rank[order[q]] = q. (A template only so that the header may define it in every unit.)
template <typename index_t>
__global__ void inverse_permutation_kernel(const index_t* __restrict__ order, int64_t n,
                                           index_t* __restrict__ rank) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += stride) {
    rank[order[q]] = q;
  }
}

// labels: (N,) int64 contiguous on the current device.
inline LabelGroups label_groups(const at::Tensor& labels, cudaStream_t stream) {
  const auto sorted = labels.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  LabelGroups g{std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous(),
                empty_like(labels)};
  const int64_t n = labels.numel();
  if (n > 0) {
    inverse_permutation_kernel<int64_t><<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(
        g.order.data_ptr<int64_t>(), n, g.rank.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return g;
}

// [gs, ge): the positions of `label` in the sorted labels.
__device__ __forceinline__ void group_bounds(const int64_t* __restrict__ sorted, int64_t N,
                                             int64_t label, int64_t& gs, int64_t& ge) {
  gs = partition_point(N, [&](int64_t t) { return sorted[t] < label; });
  ge = partition_point(N, [&](int64_t t) { return sorted[t] <= label; });
}

// Anchor a's label group among the candidates: positions [gs, ge) of its label in the
// sorted candidate labels; whether its self index is a candidate of its label (then not a
// positive), and P positives, Q negatives.
struct AnchorGroup {
  int64_t la, self, gs, ge, P, Q;
  bool self_in;
};

__device__ __forceinline__ AnchorGroup anchor_group(const RowLabels& l,
                                                    const int64_t* __restrict__ sorted,
                                                    int64_t a) {
  AnchorGroup g;
  g.la = l.anchor[a];
  g.self = l.self_of(a);
  group_bounds(sorted, l.cols, g.la, g.gs, g.ge);
  g.self_in = g.self >= 0 && g.self < l.cols && l.cand[g.self] == g.la;
  g.P = g.ge - g.gs - (g.self_in ? 1 : 0);
  g.Q = l.cols - (g.ge - g.gs);
  return g;
}

// counts: (N,) int64 (N > 0) -> (exclusive offsets (N,) int64, total). Synchronises with
// the device to read the total (it sizes the caller's outputs).
inline std::tuple<at::Tensor, int64_t> exclusive_offsets(const at::Tensor& counts) {
  const at::Tensor inclusive = counts.cumsum(/*dim=*/0);
  const at::Tensor offsets = inclusive.sub(counts).contiguous();
  const int64_t total = inclusive[counts.size(0) - 1].item<int64_t>();
  return {offsets, total};
}

// ------------------------------------------------------------------------ chunk driver

// Rows per chunk of N anchor rows against `cols` candidates so that one (R, cols) slab of
// `bytes_per_elem` bytes per element (all the per-chunk workspaces together) stays near
// 256 MiB.
inline int64_t chunk_rows(int64_t N, int64_t cols, int64_t bytes_per_elem) {
  const int64_t budget = int64_t(256) << 20;
  const int64_t r = budget / std::max<int64_t>(1, bytes_per_elem * std::max<int64_t>(1, cols));
  return std::max<int64_t>(1, std::min<int64_t>(N, r));
}

// Calls fn(i0, r, Dc) for consecutive chunks of anchor rows [i0, i0 + r) of x (N, D), Dc a
// (R, C) acc_t tensor whose first r rows hold d(x_{i0 + row}, y_j) (Gram form) for the C
// candidate rows of y (C, D) (y may be x). Chunks run in order on the current stream.
template <typename scalar_t, typename acc_t, Metric M, typename Fn>
void for_each_distance_chunk(const at::Tensor& x, RowStats<acc_t> sx, const at::Tensor& y,
                             RowStats<acc_t> sy, int64_t R, cudaStream_t stream, Fn&& fn) {
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  at::Tensor Dc = empty({R, C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    const int64_t r = std::min(R, N - i0);
    launch_distance<scalar_t, acc_t, acc_t, M>(xp + i0 * D, sx.shifted(i0), r, yp, sy, C, D,
                                               Dc.data_ptr<acc_t>(), C, stream);
    fn(i0, r, Dc);
  }
}

// Whether any of the n values of an anchor's distance row is NaN (the NaN rule: then every
// loss term and gradient weight of the anchor is NaN, as csrc/cpu/batch_all.cpp and
// semi_hard.h). Every thread of the block must call it (a barrier); all get the answer.
template <typename acc_t>
__device__ __forceinline__ bool block_row_has_nan(const acc_t* __restrict__ row, int64_t n) {
  int local = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) local |= epi::is_nan(row[j]) ? 1 : 0;
  return __syncthreads_or(local) != 0;
}

// Sort keys of a chunk (e = row * C + j, anchor a = i0 + row, Dc row stride C = l.cols):
//   neg_keys[e] = d(a, j) if labels differ, else +inf (negatives first once sorted);
//   pos_keys[e] = d(a, j) if labels match and j != self_of(a), else +inf (skipped when null).
// at::sort places NaN keys last, which is defined; but a NaN negative then sorts after the
// +inf keys of the non-negatives, so the searches over the first Q sorted keys are only
// meaningful for NaN-free rows: the row kernels check block_row_has_nan first and never
// use the sorted keys of a row holding NaN.
template <typename acc_t>
__global__ void sort_keys_kernel(const acc_t* __restrict__ Dc, RowLabels l, int64_t i0,
                                 int64_t r, acc_t* __restrict__ neg_keys,
                                 acc_t* __restrict__ pos_keys) {
  const int64_t C = l.cols;
  const int64_t n = r * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t a = i0 + e / C, j = e % C;
    const bool same = l.cand[j] == l.anchor[a];
    const acc_t d = Dc[e];
    neg_keys[e] = same ? acc_inf<acc_t>() : d;
    if (pos_keys != nullptr) pos_keys[e] = (same && j != l.self_of(a)) ? d : acc_inf<acc_t>();
  }
}

template <typename acc_t>
void launch_sort_keys(const at::Tensor& Dc, const RowLabels& l, int64_t i0, int64_t r,
                      acc_t* neg_keys, acc_t* pos_keys, cudaStream_t stream) {
  if (r * l.cols == 0) return;
  sort_keys_kernel<acc_t><<<elementwise_grid(r * l.cols), kElementwiseThreads, 0, stream>>>(
      Dc.data_ptr<acc_t>(), l, i0, r, neg_keys, pos_keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Adds to Gx (N, D) acc_t the anchor-row side and, when Gy is not null, to Gy (C, D) acc_t
// the candidate side of the gradient of sum_{row < r, j} Wc[row, j] d(x_{i0 + row}, y_j)
// (Wc, Dc: (R, C)). The batch against itself passes y = x and Gy = Gx.
template <typename scalar_t, typename acc_t, Metric M>
void add_chunk_grad(const at::Tensor& Wc, const at::Tensor& Dc, const at::Tensor& x,
                    RowStats<acc_t> sx, const at::Tensor& y, RowStats<acc_t> sy, int64_t i0,
                    int64_t r, at::Tensor& Gx, at::Tensor* Gy, cudaStream_t stream) {
  const int64_t C = y.size(0), D = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const acc_t* W = Wc.data_ptr<acc_t>();
  const acc_t* Dm = Dc.data_ptr<acc_t>();
  const auto acc_options = Gx.options();
  launch_pair_grad<scalar_t, acc_t, acc_t, M, false, acc_t>(
      W, Dm, C, xp + i0 * D, sx.shifted(i0), r, yp, sy, C, D, Gx.data_ptr<acc_t>() + i0 * D,
      /*accumulate=*/true, acc_options, stream);
  if (Gy != nullptr) {
    launch_pair_grad<scalar_t, acc_t, acc_t, M, true, acc_t>(
        W, Dm, C, xp + i0 * D, sx.shifted(i0), r, yp, sy, C, D, Gy->data_ptr<acc_t>(),
        /*accumulate=*/true, acc_options, stream);
  }
}

// ------------------------------------------------------------------------ loss outputs

// Per-row results of a loss forward, reduced in a fixed order by finalize_loss.
struct RowResults {
  at::Tensor loss;      // (N) float64
  at::Tensor valid;     // (N) int64
  at::Tensor positive;  // (N) int64
};

inline RowResults make_row_results(const at::Tensor& x) {
  const int64_t N = x.size(0);
  return {empty({N}, x.options().dtype(at::kDouble)),
          empty({N}, x.options().dtype(at::kLong)),
          empty({N}, x.options().dtype(at::kLong))};
}

constexpr int kFinalizeThreads = 1024;

// One block: each thread sums rows tid, tid + 1024, ... in order, then a fixed tree.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_loss_kernel(const double* __restrict__ loss_rows,
                         const int64_t* __restrict__ valid_rows,
                         const int64_t* __restrict__ pos_rows, int64_t N,
                         acc_t* __restrict__ loss, int64_t* __restrict__ num_valid,
                         int64_t* __restrict__ num_positive) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  double l = 0;
  int64_t v = 0, p = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    l += loss_rows[i];
    v += valid_rows[i];
    p += pos_rows[i];
  }
  l = block_sum(l, sd);
  v = block_sum(v, si);
  p = block_sum(p, si);
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(l);
    *num_valid = v;
    *num_positive = p;
  }
}

// -> (loss_sum 0-d acc dtype of x, num_valid 0-d int64, num_positive 0-d int64).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_loss(const RowResults& rows,
                                                                    const at::Tensor& x,
                                                                    cudaStream_t stream) {
  const int64_t N = x.size(0);
  const at::ScalarType acc_type = acc_scalar_type(x.scalar_type());
  at::Tensor loss = empty(at::IntArrayRef{}, x.options().dtype(acc_type));
  at::Tensor nv = empty(at::IntArrayRef{}, x.options().dtype(at::kLong));
  at::Tensor np = empty(at::IntArrayRef{}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "finalize_loss_cuda", [&] {
    finalize_loss_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(
        rows.loss.data_ptr<double>(), rows.valid.data_ptr<int64_t>(),
        rows.positive.data_ptr<int64_t>(), N, loss.data_ptr<scalar_t>(),
        nv.data_ptr<int64_t>(), np.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, nv, np};
}

// Zero outputs of a loss forward on an empty batch.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_loss(const at::Tensor& x) {
  const at::ScalarType acc_type = acc_scalar_type(x.scalar_type());
  return {zeros(at::IntArrayRef{}, x.options().dtype(acc_type)),
          zeros(at::IntArrayRef{}, x.options().dtype(at::kLong)),
          zeros(at::IntArrayRef{}, x.options().dtype(at::kLong))};
}

// out[e] = scalar_t(G[e] * scale[0]) (scale: the 0-d grad_loss_sum, acc_t, on the device).
template <typename scalar_t, typename acc_t>
__global__ void scale_grad_kernel(const acc_t* __restrict__ G, const acc_t* __restrict__ scale,
                                  int64_t n, scalar_t* __restrict__ out) {
  const acc_t s = *scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    out[e] = static_cast<scalar_t>(G[e] * s);
  }
}

// Checks the shared arguments of a loss backward and returns grad_loss_sum as a 0-d
// acc-dtype tensor on the device of x.
inline at::Tensor check_grad_loss_sum(const at::Tensor& grad_loss_sum, const at::Tensor& x) {
  TORCH_CHECK(grad_loss_sum.numel() == 1, "triplet_cuda: grad_loss_sum must have one element, got ",
              grad_loss_sum.sizes());
  TORCH_CHECK(grad_loss_sum.is_floating_point(),
              "triplet_cuda: grad_loss_sum must be floating point, got ",
              grad_loss_sum.scalar_type());
  return grad_loss_sum.reshape(at::IntArrayRef{})
      .to(x.device(), acc_scalar_type(x.scalar_type()))
      .contiguous();
}

// grad (N, D) scalar_t = G * grad_loss_sum.
template <typename scalar_t, typename acc_t>
at::Tensor finish_grad(const at::Tensor& G, const at::Tensor& gls, const at::Tensor& x,
                       cudaStream_t stream) {
  at::Tensor grad = empty(x.sizes(), x.options());
  const int64_t n = G.numel();
  if (n == 0) return grad;
  scale_grad_kernel<scalar_t, acc_t><<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(
      G.data_ptr<acc_t>(), gls.data_ptr<acc_t>(), n, grad.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

// ------------------------------------------------------------------------ loss driver

// One chunk of anchor rows as a loss policy sees it (see loss_forward_cuda).
struct LossChunk {
  const at::Tensor& Dc;       // (R, cols) acc_t: rows [0, r) hold d(anchor i0 + row, cand j)
  int64_t i0, r, cols;        // anchors i0 .. i0 + r - 1, against lab.cols candidates
  RowLabels lab;              // anchor labels, candidate labels, self index
  const LabelGroups& groups;  // of the candidate labels; only when the policy's kLabelGroups
  double margin;              // the op's margin; kernels take static_cast<acc_t>(margin)
  cudaStream_t stream;
};

// Generic CUDA driver of the fused loss ops. A loss is a policy class with
//   static constexpr bool kLabelGroups;                  // its kernels read LossChunk::groups
//   static constexpr const char* kForwardName, *kBackwardName;  // dispatch names
//   template <typename acc_t> static constexpr int64_t bytes_per_elem();  // chunk workspace
//   template <typename acc_t> static void forward(const LossChunk&, const RowResults&);
//       // writes rows.loss / valid / positive [i0, i0 + r)
//   template <typename acc_t> static at::Tensor weights(const LossChunk&);
//       // (r, cols) acc_t: d(row i0 + row's loss share) / d d(anchor i0 + row, cand j)
// The driver checks the arguments, sets the device, runs the rows over distance chunks on
// the current stream, reduces the rows in a fixed order, and for the backward turns the
// weights into the embedding gradient (pair_grad.cuh), scaled by grad_loss_sum. The batch
// ops run it with the batch as the candidates (y = x, RowLabels self == nullptr), the *_ref
// ops with the reference set: the same row kernels serve both.

// x (N, D) anchors with labels lab (N) against the candidates y (C, D) (y may be x) with
// row labels l; all contiguous on the current device, N > 0.
template <typename Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_loss_forward(const at::Tensor& x,
                                                                const at::Tensor& y,
                                                                const at::Tensor& cand_labels,
                                                                const RowLabels& l, double margin,
                                                                int64_t metric) {
  const int64_t N = x.size(0), C = y.size(0);
  const bool same_set = l.symmetric();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups =
      Policy::kLabelGroups ? label_groups(cand_labels, stream) : LabelGroups{};
  const RowResults rows = make_row_results(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  Policy::kForwardName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y = same_set ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const int64_t R = chunk_rows(N, C, Policy::template bytes_per_elem<acc_t>());
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, sx, y, sy, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            Policy::template forward<acc_t>(LossChunk{Dc, i0, r, C, l, groups, margin, stream},
                                            rows);
          });
    });
  });
  return finalize_loss(rows, x, stream);
}

// As run_loss_forward; gls the 0-d acc-dtype grad_loss_sum on the device; N, C, D > 0.
// -> (grad_x (N, D) in the dtype of x, grad_y (C, D) or an undefined tensor when !y_grad).
// The batch itself (same_set) gets both sides in grad_x.
template <typename Policy>
std::tuple<at::Tensor, at::Tensor> run_loss_backward(const at::Tensor& gls, const at::Tensor& x,
                                                     const at::Tensor& y,
                                                     const at::Tensor& cand_labels,
                                                     const RowLabels& l, double margin,
                                                     int64_t metric, bool y_grad) {
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  const bool same_set = l.symmetric();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups =
      Policy::kLabelGroups ? label_groups(cand_labels, stream) : LabelGroups{};
  at::Tensor grad_x, grad_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  Policy::kBackwardName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y = same_set ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const int64_t R = chunk_rows(N, C, Policy::template bytes_per_elem<acc_t>());
    at::Tensor Gx = zeros({N, D}, acc_options);
    at::Tensor Gy = (!same_set && y_grad) ? zeros({C, D}, acc_options) : at::Tensor();
    at::Tensor* gy = same_set ? &Gx : (y_grad ? &Gy : nullptr);
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, sx, y, sy, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            const at::Tensor Wc = Policy::template weights<acc_t>(
                LossChunk{Dc, i0, r, C, l, groups, margin, stream});
            add_chunk_grad<scalar_t, acc_t, kM>(Wc, Dc, x, sx, y, sy, i0, r, Gx, gy, stream);
          });
    });
    grad_x = finish_grad<scalar_t, acc_t>(Gx, gls, x, stream);
    if (Gy.defined()) grad_y = finish_grad<scalar_t, acc_t>(Gy, gls, y, stream);
  });
  return {grad_x, grad_y};
}

// A policy may replace the chunk driver by its own (batch all / semi hard: the fused
// few-positives path of few_positives.cuh, falling back to run_loss_forward / backward): it
// then defines kOwnDriver and static run_forward / run_backward with the signatures of
// run_loss_forward / run_loss_backward (without the Policy parameter).
template <typename Policy, typename = void>
struct HasOwnDriver : std::false_type {};
template <typename Policy>
struct HasOwnDriver<Policy, std::void_t<decltype(Policy::kOwnDriver)>> : std::true_type {};

template <typename Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward_of(const at::Tensor& x,
                                                              const at::Tensor& y,
                                                              const at::Tensor& cand_labels,
                                                              const RowLabels& l, double margin,
                                                              int64_t metric) {
  if constexpr (HasOwnDriver<Policy>::value) {
    static_assert(Policy::kOwnDriver, "kOwnDriver: true when defined");
    return Policy::run_forward(x, y, cand_labels, l, margin, metric);
  } else {
    return run_loss_forward<Policy>(x, y, cand_labels, l, margin, metric);
  }
}

template <typename Policy>
std::tuple<at::Tensor, at::Tensor> run_backward_of(const at::Tensor& gls, const at::Tensor& x,
                                                   const at::Tensor& y,
                                                   const at::Tensor& cand_labels,
                                                   const RowLabels& l, double margin,
                                                   int64_t metric, bool y_grad) {
  if constexpr (HasOwnDriver<Policy>::value) {
    static_assert(Policy::kOwnDriver, "kOwnDriver: true when defined");
    return Policy::run_backward(gls, x, y, cand_labels, l, margin, metric, y_grad);
  } else {
    return run_loss_backward<Policy>(gls, x, y, cand_labels, l, margin, metric, y_grad);
  }
}

// embeddings: (N, D), labels: (N,) any integer dtype, margin, metric
//   -> (loss_sum 0-d acc dtype, num_valid 0-d int64, num_positive 0-d int64).
template <typename Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_cuda(const at::Tensor& embeddings,
                                                                 const at::Tensor& labels,
                                                                 double margin, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  if (x.size(0) == 0) return empty_loss(x);
  return run_forward_of<Policy>(x, x, lab, batch_row_labels(lab), margin, metric);
}

// grad_loss_sum: 0-d; embeddings (N, D), labels (N,), margin, metric (the forward's inputs)
//   -> grad (N, D) in the dtype of embeddings = grad_loss_sum * d loss_sum / d embeddings.
template <typename Policy>
at::Tensor loss_backward_cuda(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                              const at::Tensor& labels, double margin, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor gls = check_grad_loss_sum(grad_loss_sum, x);
  const int64_t N = x.size(0), D = x.size(1);
  if (N == 0 || D == 0) return zeros({N, D}, x.options());
  return std::get<0>(run_backward_of<Policy>(gls, x, x, lab, batch_row_labels(lab), margin,
                                             metric, /*y_grad=*/false));
}

// The checked inputs of a query-vs-reference op: labels, ref_labels, self_index as contiguous
// int64 (call under a CUDAGuard of the embeddings' device; contiguous() may copy), x and y the
// contiguous embeddings and reference set.
struct RefInputsCuda {
  at::Tensor x, lab, y, ref_lab, self;
};

inline RefInputsCuda ref_inputs_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                     const at::Tensor& ref, const at::Tensor& ref_labels,
                                     const at::Tensor& self_index, int64_t metric) {
  RefInputsCuda in;
  in.lab = check_batch_cuda(embeddings, labels, metric);
  std::tie(in.ref_lab, in.self) = check_ref_args(embeddings, ref, ref_labels, self_index);
  in.x = embeddings.contiguous();
  in.y = ref.contiguous();
  return in;
}

// Checks the device of a query-vs-reference op's embeddings before its CUDAGuard is set.
inline const at::Tensor& ref_op_device(const at::Tensor& embeddings) {
  TC_CHECK_EMBEDDINGS(embeddings, "embeddings");
  TC_CHECK_DEVICE_TYPE(embeddings, "embeddings", c10::kCUDA);
  return embeddings;
}

// Query vs reference: embeddings (N, D), labels (N,) anchors; ref (M, D), ref_labels (M,)
// candidates; self_index (N,) int64 (-1: none; range-checked by check_ref_args, which syncs)
// -> (loss_sum, num_valid, num_positive) as loss_forward_cuda.
template <typename Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_ref_forward_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, double margin, int64_t metric) {
  const c10::cuda::CUDAGuard guard(ref_op_device(embeddings).device());
  const RefInputsCuda in = ref_inputs_cuda(embeddings, labels, ref, ref_labels, self_index, metric);
  if (in.x.size(0) == 0 || in.y.size(0) == 0) return empty_loss(in.x);
  return run_forward_of<Policy>(in.x, in.y, in.ref_lab,
                                ref_row_labels(in.lab, in.ref_lab, in.self), margin, metric);
}

// grad_loss_sum: 0-d -> (grad_embeddings (N, D), grad_ref (M, D), or an empty (0,) tensor when
// ref_grad is false: then no work is spent on it).
template <typename Policy>
std::tuple<at::Tensor, at::Tensor> loss_ref_backward_cuda(
    const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,
    double margin, int64_t metric, bool ref_grad) {
  const c10::cuda::CUDAGuard guard(ref_op_device(embeddings).device());
  const RefInputsCuda in = ref_inputs_cuda(embeddings, labels, ref, ref_labels, self_index, metric);
  const at::Tensor gls = check_grad_loss_sum(grad_loss_sum, in.x);
  const int64_t N = in.x.size(0), Mr = in.y.size(0), D = in.x.size(1);
  const at::Tensor empty_ref = empty({0}, in.y.options());
  if (N == 0 || Mr == 0 || D == 0) {
    return {zeros({N, D}, in.x.options()),
            ref_grad ? zeros({Mr, D}, in.y.options()) : empty_ref};
  }
  auto [gx, gy] = run_backward_of<Policy>(gls, in.x, in.y, in.ref_lab,
                                          ref_row_labels(in.lab, in.ref_lab, in.self), margin,
                                          metric, ref_grad);
  return {gx, ref_grad ? gy : empty_ref};
}

// Defines ops_cuda.h's four entry points NAME_loss_cuda, NAME_loss_backward_cuda,
// NAME_loss_ref_cuda and NAME_loss_ref_backward_cuda of a loss policy (in namespace
// triplet_cuda::cuda, after the policy); register.cpp registers them.
#define TC_CUDA_LOSS_ENTRY_POINTS(NAME, POLICY)                                                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME##_loss_cuda(                             \
      const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric) { \
    return loss_forward_cuda<POLICY>(embeddings, labels, margin, metric);                      \
  }                                                                                            \
  at::Tensor NAME##_loss_backward_cuda(const at::Tensor& grad_loss_sum,                        \
                                       const at::Tensor& embeddings, const at::Tensor& labels, \
                                       double margin, int64_t metric) {                        \
    return loss_backward_cuda<POLICY>(grad_loss_sum, embeddings, labels, margin, metric);      \
  }                                                                                            \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME##_loss_ref_cuda(                         \
      const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,           \
      const at::Tensor& ref_labels, const at::Tensor& self_index, double margin,               \
      int64_t metric) {                                                                        \
    return loss_ref_forward_cuda<POLICY>(embeddings, labels, ref, ref_labels, self_index,      \
                                         margin, metric);                                      \
  }                                                                                            \
  std::tuple<at::Tensor, at::Tensor> NAME##_loss_ref_backward_cuda(                            \
      const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels, \
      const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,       \
      double margin, int64_t metric, bool ref_grad) {                                          \
    return loss_ref_backward_cuda<POLICY>(grad_loss_sum, embeddings, labels, ref, ref_labels,  \
                                          self_index, margin, metric, ref_grad);               \
  }

}  // namespace cuda
}  // namespace triplet_cuda
