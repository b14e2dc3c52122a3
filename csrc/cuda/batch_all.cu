// Batch-all triplet loss on CUDA without the N x N x N tensor.
//
// Anchors are processed in row chunks (loss_common.cuh): distances of the chunk's rows to
// all C candidate rows (the batch itself, C = N, or a reference set for batch_all_loss_ref)
// go to an (R, C) acc_t workspace; per anchor row, the negatives' distances are
// sorted ascending (keys +inf for non-negatives, one segmented at::sort per chunk), and in
// the backward also the positives'. For a positive p the active negatives
// (d_ap - d_an + margin > 0, evaluated exactly like that in acc_t) are a prefix of the
// sorted negatives: a binary search gives their count c, and a float64 prefix sum of the
// sorted distances their summed terms c (d_ap + margin) - sum_{t < c} d_an(t). For a
// negative n the active positives are a suffix of the sorted positives.
//
// One block per anchor row; each thread owns columns j = tid, tid + 256, ...; row totals
// are reduced in a fixed order (block_sum), rows in a fixed order (finalize_loss):
// deterministic. The backward writes the dense per-row weights
//   W[a, p] = #{n active with p},  W[a, n] = -#{p active with n}
// (exact small integers in acc_t; each entry owned by one thread) and differentiates
// through the distances with pair_grad.cuh. O(R * C) memory per chunk.
//
// NaN rule (csrc/epilogue.h; as BatchAllRows in csrc/cpu/batch_all.cpp): an anchor with at
// least one positive and one negative whose distance row holds a NaN gets a NaN loss sum
// (valid count P * Q unchanged, positive count 0) and NaN weights on every j != self; its
// sorted keys are not searched (NaN sorts after the +inf keys, see loss_common.cuh).
#include <torch/library.h>

#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// C[row, t] = sum_{u <= t} S[row, u] in float64 (inclusive prefix sums of each row of the
// (rows, N) matrix S), one block of kRowThreads per row. The row is scanned kRowThreads
// elements at a time: a shuffle scan inside each warp, then the warp totals and the carry of
// the earlier elements are added in a fixed order, so the result does not depend on timing
// (at::cumsum is not like that for a single row: it then uses cub's look-back scan).
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    row_prefix_sums_kernel(const acc_t* __restrict__ S, int64_t N, double* __restrict__ C) {
  constexpr int kWarps = kRowThreads / kWarp;
  __shared__ double warp_total[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const acc_t* __restrict__ s = S + static_cast<int64_t>(blockIdx.x) * N;
  double* __restrict__ c = C + static_cast<int64_t>(blockIdx.x) * N;
  double carry = 0;  // sum of the elements before `base`, the same in every thread
  for (int64_t base = 0; base < N; base += kRowThreads) {
    const int64_t k = base + threadIdx.x;
    double v = k < N ? static_cast<double>(s[k]) : 0.0;
#pragma unroll
    for (int off = 1; off < kWarp; off *= 2) {  // inclusive scan inside the warp
      const double u = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += u;
    }
    if (lane == kWarp - 1) warp_total[warp] = v;
    __syncthreads();
    double prefix = carry;
    for (int w = 0; w < warp; ++w) prefix += warp_total[w];
    if (k < N) c[k] = prefix + v;
    for (int w = 0; w < kWarps; ++w) carry += warp_total[w];
    __syncthreads();  // warp_total is rewritten by the next round
  }
}

// One block per anchor row of the chunk (a = i0 + blockIdx.x).
//   sn: the row's sorted keys of negatives (first Q entries are its negatives' distances);
//   cn: float64 inclusive prefix sums of sn (forward only);
//   sp: sorted keys of positives (first P entries; backward only).
// Rows of C = l.cols candidates (row stride C).
// Forward: writes loss_rows[a], valid_rows[a], pos_rows[a]. Backward: writes Wc[row, :].
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kRowThreads)
    batch_all_rows_kernel(const acc_t* __restrict__ Dc, const acc_t* __restrict__ Sn,
                          const double* __restrict__ Cn, const acc_t* __restrict__ Sp,
                          RowLabels l, const int64_t* __restrict__ sorted_labels, int64_t i0,
                          acc_t margin, double* __restrict__ loss_rows,
                          int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows,
                          acc_t* __restrict__ Wc) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t a = i0 + row;
  const int64_t C = l.cols;
  const AnchorGroup g = anchor_group(l, sorted_labels, a);
  const int64_t P = g.P;  // positives of a
  const int64_t Q = g.Q;  // negatives of a
  const acc_t* __restrict__ d_row = Dc + row * C;
  const acc_t* __restrict__ sn = Sn + row * C;
  const bool row_nan = block_row_has_nan(d_row, C);  // every thread: a barrier
  const bool nan_terms = row_nan && P > 0 && Q > 0;

  double loss = 0;
  int64_t active = 0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    acc_t w = 0;
    if (nan_terms) {
      if constexpr (kBackward) w = j != g.self ? epi::quiet_nan<acc_t>() : acc_t(0);
    } else if (j != g.self || l.cand[j] != g.la) {
      const acc_t d = d_row[j];
      if (l.cand[j] == g.la) {  // positive: active negatives are a prefix of sn
        if (Q > 0) {
          const int64_t c =
              partition_point(Q, [&](int64_t t) { return d - sn[t] + margin > acc_t(0); });
          if constexpr (kBackward) {
            w = static_cast<acc_t>(c);
          } else {
            if (c > 0) {
              const double* __restrict__ cn = Cn + row * C;
              loss += static_cast<double>(c) *
                          (static_cast<double>(d) + static_cast<double>(margin)) -
                      cn[c - 1];
            }
            active += c;
          }
        }
      } else if constexpr (kBackward) {  // negative: active positives are a suffix of sp
        if (P > 0) {
          const acc_t* __restrict__ sp = Sp + row * C;
          const int64_t first_active =
              partition_point(P, [&](int64_t t) { return !(sp[t] - d + margin > acc_t(0)); });
          w = -static_cast<acc_t>(P - first_active);
        }
      }
    }
    if constexpr (kBackward) Wc[row * C + j] = w;
  }
  if constexpr (!kBackward) {
    loss = block_sum(loss, sd);
    active = block_sum(active, si);
    if (threadIdx.x == 0) {
      loss_rows[a] = nan_terms ? epi::quiet_nan<double>() : loss;
      valid_rows[a] = P * Q;
      pos_rows[a] = active;
    }
  }
}

// The batch-all loss for loss_forward_cuda / loss_backward_cuda (loss_common.cuh): every
// (anchor, positive, negative) triplet with term relu(d_ap - d_an + margin).
struct BatchAllLoss {
  static constexpr bool kLabelGroups = true;
  static constexpr const char* kForwardName = "batch_all_loss_cuda";
  static constexpr const char* kBackwardName = "batch_all_loss_backward_cuda";

  // Bytes of chunk workspace per (row, column) element: distances, keys, sorted values
  // and their int64 sort indices for one or two key sets, float64 prefix sums.
  template <typename acc_t>
  static constexpr int64_t bytes_per_elem() {
    return 5 * static_cast<int64_t>(sizeof(acc_t)) + 2 * 8 + 2 * 8 + 8;
  }

  template <typename acc_t>
  static void forward(const LossChunk& c, const RowResults& rows) {
    const acc_t m = static_cast<acc_t>(c.margin);
    const int64_t r = c.r, C = c.cols;
    const at::Tensor keys = empty({r, C}, c.Dc.options());
    launch_sort_keys<acc_t>(c.Dc, c.lab, c.i0, r, keys.data_ptr<acc_t>(), nullptr, c.stream);
    const at::Tensor sn =
        std::get<0>(keys.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false))
            .contiguous();
    const at::Tensor cn = empty({r, C}, sn.options().dtype(at::kDouble));
    row_prefix_sums_kernel<acc_t><<<grid_1d(r), kRowThreads, 0, c.stream>>>(
        sn.data_ptr<acc_t>(), C, cn.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch_all_rows_kernel<acc_t, false><<<grid_1d(r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), cn.data_ptr<double>(), nullptr, c.lab,
        c.groups.sorted.data_ptr<int64_t>(), c.i0, m, rows.loss.data_ptr<double>(),
        rows.valid.data_ptr<int64_t>(), rows.positive.data_ptr<int64_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t>
  static at::Tensor weights(const LossChunk& c) {
    const acc_t m = static_cast<acc_t>(c.margin);
    const int64_t r = c.r, C = c.cols;
    // keys[0]: negatives, keys[1]: positives; one segmented sort of 2r rows.
    const at::Tensor keys = empty({2, r, C}, c.Dc.options());
    acc_t* kp = keys.data_ptr<acc_t>();
    launch_sort_keys<acc_t>(c.Dc, c.lab, c.i0, r, kp, kp + r * C, c.stream);
    const at::Tensor sorted =
        std::get<0>(keys.view({2 * r, C}).sort(/*stable=*/true, /*dim=*/1,
                             /*descending=*/false))
            .contiguous();
    const acc_t* sp_all = sorted.data_ptr<acc_t>();
    at::Tensor Wc = empty({r, C}, c.Dc.options());
    batch_all_rows_kernel<acc_t, true><<<grid_1d(r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), sp_all, nullptr, sp_all + r * C, c.lab,
        c.groups.sorted.data_ptr<int64_t>(), c.i0, m, nullptr, nullptr, nullptr,
        Wc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return Wc;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("batch_all_loss", &loss_forward_cuda<BatchAllLoss>);
  m.impl("batch_all_loss_backward", &loss_backward_cuda<BatchAllLoss>);
  m.impl("batch_all_loss_ref", &loss_ref_forward_cuda<BatchAllLoss>);
  m.impl("batch_all_loss_ref_backward", &loss_ref_backward_cuda<BatchAllLoss>);
}

}  // namespace cuda
}  // namespace triplet_cuda
