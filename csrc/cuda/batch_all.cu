// Batch-all triplet loss on CUDA without the N x N x N tensor.
//
// Few positives per anchor (every anchor at most kFusedMaxPositives, the usual P x K batch):
// the fused path below (few_positives.cuh) -- positives' distances first, negatives streamed
// once through the Mainloop's tiles, no (rows, C) workspace in the forward, no sort.
//
// Otherwise (the sort path): anchors are processed in row chunks (loss_common.cuh): distances
// of the chunk's rows to all C candidate rows (the batch itself, C = N, or a reference set for
// batch_all_loss_ref) go to an (R, C) acc_t workspace; per anchor row, the negatives' distances are
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

#include "ops_cuda.h"
#include "few_positives.cuh"
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

// ------------------------------------------------------------------------ fused path

// Few positives per anchor (few_positives.cuh): each anchor's positive distances first (step
// 1), then its negatives streamed once through the Mainloop's tiles (step 2), each negative
// scored against all of the anchor's positives at once (epi::batch_all_term per lane, the
// CPU's fused scan). The anchor's positives sit in W lanes (4, 8 or 16: the fewest that hold
// every anchor's); unused lanes hold epi::batch_all_pad() (-inf: never active, add +0).
//   Forward: per (split, anchor) the float64 sum of the terms (each negative's W terms summed
//   in acc_t, then added in float64), the active count, a NaN flag; splits combined in order.
//   Backward: per (split, anchor, lane) the count of negatives active with the lane's
//   positive, combined over splits; then per chunk of anchor rows the weight matrix of the
//   gradient GEMM (pair_grad.cuh, as the sort path), built from recomputed tiles:
//     W[a, n] = -#{positives p of a: d_ap - d_an + margin > 0}   (negatives n),
//     W[a, p] = #{negatives active with p}                         (positives p),
//   and the distances of those entries (the tile's for negatives, step 1's for positives).
// NaN rule (as the CPU's fused_forward / fused_backward and the sort path): an anchor with a
// positive and a negative whose positive or negative distances hold a NaN gets a NaN loss sum
// (valid count P Q unchanged, positive count 0) and NaN weights on every j != self.

template <typename acc_t_, int W>
struct BatchAllForwardEpi {
  using acc_t = acc_t_;
  static constexpr int K = kFusedMaxPositives;
  struct Params {
    const int64_t* npos;  // (N)
    const acc_t* dap;     // (N, K)
    acc_t margin;
    double* part_sum;     // (splits, N)
    int64_t* part_count;  // (splits, N)
    uint8_t* part_nan;    // (splits, N)
  };
  struct Row {
    acc_t dap[W];
    acc_t margin;
  };
  struct Acc {
    double sum;
    int64_t count;
    bool nan;
  };
  struct Slot {
    double sum;
    int64_t count;
    int nan;
  };
  __device__ static void load_row(const Params& p, int64_t a, Row& row) {
    const int64_t P = p.npos[a];
#pragma unroll
    for (int k = 0; k < W; ++k) row.dap[k] = k < P ? p.dap[a * K + k] : epi::batch_all_pad<acc_t>();
    row.margin = p.margin;
  }
  __device__ static void init(Acc& acc) {
    acc.sum = 0;
    acc.count = 0;
    acc.nan = false;
  }
  template <typename Exact>
  __device__ static void visit(Acc& acc, const Row& row, acc_t d, int64_t, Exact&&) {
    acc_t s = 0;
    int c = 0;
#pragma unroll
    for (int k = 0; k < W; ++k) {  // epi::batch_all_negative over the W lanes
      bool on;
      s += epi::batch_all_term(row.dap[k], d, row.margin, &on);
      c += on;
    }
    acc.sum += static_cast<double>(s);
    acc.count += c;
    acc.nan |= epi::is_nan(d);
  }
  __device__ static void save(const Acc& acc, Slot& s) {
    s.sum = acc.sum;
    s.count = acc.count;
    s.nan = acc.nan;
  }
  __device__ static void merge(Acc& acc, const Slot& s) {
    acc.sum += s.sum;
    acc.count += s.count;
    acc.nan |= s.nan != 0;
  }
  __device__ static void store(const Params& p, int64_t split, int64_t N, int64_t a,
                               const Acc& acc) {
    p.part_sum[split * N + a] = acc.sum;
    p.part_count[split * N + a] = acc.count;
    p.part_nan[split * N + a] = acc.nan ? 1 : 0;
  }
};

// Backward step 2: per (anchor, lane k) the negatives active with positive k.
template <typename acc_t_, int W>
struct BatchAllCountEpi {
  using acc_t = acc_t_;
  static constexpr int K = kFusedMaxPositives;
  struct Params {
    const int64_t* npos;  // (N)
    const acc_t* dap;     // (N, K)
    acc_t margin;
    int32_t* part_count;  // (splits, N, W): a split sees fewer than 2^31 candidates
    uint8_t* part_nan;    // (splits, N)
  };
  struct Row {
    acc_t dap[W];
    acc_t margin;
  };
  struct Acc {
    int32_t count[W];
    bool nan;
  };
  struct Slot {
    int32_t count[W];
    int nan;
  };
  __device__ static void load_row(const Params& p, int64_t a, Row& row) {
    const int64_t P = p.npos[a];
#pragma unroll
    for (int k = 0; k < W; ++k) row.dap[k] = k < P ? p.dap[a * K + k] : epi::batch_all_pad<acc_t>();
    row.margin = p.margin;
  }
  __device__ static void init(Acc& acc) {
#pragma unroll
    for (int k = 0; k < W; ++k) acc.count[k] = 0;
    acc.nan = false;
  }
  template <typename Exact>
  __device__ static void visit(Acc& acc, const Row& row, acc_t d, int64_t, Exact&&) {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      bool on;
      epi::batch_all_term(row.dap[k], d, row.margin, &on);
      acc.count[k] += on;
    }
    acc.nan |= epi::is_nan(d);
  }
  __device__ static void save(const Acc& acc, Slot& s) {
#pragma unroll
    for (int k = 0; k < W; ++k) s.count[k] = acc.count[k];
    s.nan = acc.nan;
  }
  __device__ static void merge(Acc& acc, const Slot& s) {
#pragma unroll
    for (int k = 0; k < W; ++k) acc.count[k] += s.count[k];
    acc.nan |= s.nan != 0;
  }
  __device__ static void store(const Params& p, int64_t split, int64_t N, int64_t a,
                               const Acc& acc) {
#pragma unroll
    for (int k = 0; k < W; ++k) p.part_count[(split * N + a) * W + k] = acc.count[k];
    p.part_nan[split * N + a] = acc.nan ? 1 : 0;
  }
};

// Whether anchor a's positive distances hold a NaN (step 1's; the negatives' are step 2's).
template <typename acc_t>
__device__ __forceinline__ bool positives_nan(const acc_t* __restrict__ dap, int64_t a,
                                              int64_t P) {
  bool nan = false;
  for (int64_t k = 0; k < P; ++k) nan |= epi::is_nan(dap[a * kFusedMaxPositives + k]);
  return nan;
}

// Forward: per anchor, the splits in ascending order -> loss_rows / valid_rows / pos_rows.
template <typename acc_t>
__global__ void batch_all_fused_finalize_kernel(
    int64_t N, int64_t splits, const int64_t* __restrict__ npos, const int64_t* __restrict__ nneg,
    const acc_t* __restrict__ dap, const double* __restrict__ part_sum, const int64_t* __restrict__ part_count,
    const uint8_t* __restrict__ part_nan, double* __restrict__ loss_rows,
    int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    const int64_t P = npos[a], valid = P * nneg[a];
    double sum = 0;
    int64_t count = 0;
    bool nan = positives_nan(dap, a, P);
    for (int64_t s = 0; s < splits; ++s) {
      sum += part_sum[s * N + a];
      count += part_count[s * N + a];
      nan |= part_nan[s * N + a] != 0;
    }
    const bool nan_terms = nan && valid > 0;
    loss_rows[a] = valid == 0 ? 0.0 : (nan_terms ? epi::quiet_nan<double>() : sum);
    valid_rows[a] = valid;
    pos_rows[a] = (valid == 0 || nan_terms) ? 0 : count;
  }
}

// Backward: counts[a K + k] = negatives active with positive k (k < W), nan_terms[a] = the NaN
// rule applies to anchor a.
template <typename acc_t, int W>
__global__ void batch_all_count_finalize_kernel(int64_t N, int64_t splits,
                                                const int64_t* __restrict__ npos,
                                                const int64_t* __restrict__ nneg,
                                                const acc_t* __restrict__ dap,
                                                const int32_t* __restrict__ part_count,
                                                const uint8_t* __restrict__ part_nan,
                                                int64_t* __restrict__ counts,
                                                uint8_t* __restrict__ nan_terms) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    const int64_t P = npos[a];
    bool nan = positives_nan(dap, a, P);
    for (int64_t s = 0; s < splits; ++s) nan |= part_nan[s * N + a] != 0;
    for (int k = 0; k < W; ++k) {
      int64_t c = 0;
      for (int64_t s = 0; s < splits; ++s) c += part_count[(s * N + a) * W + k];
      counts[a * kFusedMaxPositives + k] = c;
    }
    nan_terms[a] = (nan && P > 0 && nneg[a] > 0) ? 1 : 0;
  }
}

// Backward, one chunk of anchor rows [i0, i0 + r) (i0 a multiple of kBM): Wc[row, n] and
// Dc[row, n] (row stride C) for every candidate n, from the recomputed tile
// (blockIdx.x: candidate tile, blockIdx.y: anchor tile of the chunk):
//   NaN rule: W = D = NaN for n != self, 0 for self;
//   negative n: W = -(active lanes), D = d_an where W != 0, else 0;
//   the anchor's own class: W = D = 0 (batch_all_positive_weights_kernel fills the positives).
// Thread (column c = tid % kBN, row group) covers rows of the tile: coalesced along n.
template <typename Mainloop, Metric M, int W>
__global__ void __launch_bounds__(Mainloop::kThreads)
    batch_all_weights_kernel(const typename Mainloop::scalar_t* __restrict__ x,
                             RowStats<typename Mainloop::acc_t> sx,
                             const typename Mainloop::scalar_t* __restrict__ y,
                             RowStats<typename Mainloop::acc_t> sy, RowLabels l, int64_t D,
                             int64_t i0, int64_t r, const int64_t* __restrict__ npos,
                             const typename Mainloop::acc_t* __restrict__ dap,
                             const uint8_t* __restrict__ nan_terms,
                             typename Mainloop::acc_t margin,
                             typename Mainloop::acc_t* __restrict__ Wc,
                             typename Mainloop::acc_t* __restrict__ Dc) {
  using scalar_t = typename Mainloop::scalar_t;
  using acc_t = typename Mainloop::acc_t;
  constexpr int K = kFusedMaxPositives;
  constexpr int kBM = Mainloop::kBM, kBN = Mainloop::kBN, kThreads = Mainloop::kThreads;
  static_assert(kThreads % kBN == 0, "whole row groups per column");
  constexpr int kGroups = kThreads / kBN;
  static_assert(kBM % kGroups == 0, "equal row groups");
  constexpr int kRows = kBM / kGroups;
  __shared__ typename Mainloop::Shared ms;
  const int64_t C = l.cols;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t a0 = i0 + static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t a_end = i0 + r;
  Mainloop::run(x, a_end, a0, y, C, b0, D, ms);  // every thread, once
  const int c = threadIdx.x % kBN;
  const int rg = threadIdx.x / kBN;
  const int64_t n = b0 + c;
  if (n >= C) return;  // no barrier follows
  const int64_t ln = l.cand[n];
  const acc_t sq_n = sy.sq[n], inv_n = sy.inv[n];
  const scalar_t* __restrict__ yn = y + n * D;
  for (int m = 0; m < kRows; ++m) {
    const int rr = rg * kRows + m;
    const int64_t a = a0 + rr;
    if (a >= a_end) break;
    const int64_t e = (a - i0) * C + n;
    acc_t w = 0, dv = 0;
    if (nan_terms[a] != 0) {  // NaN distance too: pair_grad's 0-distance rule must not apply
      const bool self = n == l.self_of(a);
      w = self ? acc_t(0) : epi::quiet_nan<acc_t>();
      dv = w;
    } else if (ln != l.anchor[a]) {
      const acc_t d = dist_from_dot<M>(ms.dot(rr, c), sx.sq[a], sx.inv[a], sq_n, inv_n,
                                       x + a * D, yn, D);
      const int64_t P = npos[a];
      int active = 0;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        bool on;
        const acc_t dk = k < P ? dap[a * K + k] : epi::batch_all_pad<acc_t>();
        epi::batch_all_term(dk, d, margin, &on);
        active += on;
      }
      w = -static_cast<acc_t>(active);
      dv = active > 0 ? d : acc_t(0);
    }
    Wc[e] = w;
    Dc[e] = dv;
  }
}

// Backward, the chunk's positive entries: Wc[row, p_k] = counts[a, k] and Dc = d_ap (step 1's)
// where that count is not 0 and the NaN rule does not apply. One thread per (row, k); the
// entries are distinct.
template <typename acc_t>
__global__ void batch_all_positive_weights_kernel(int64_t i0, int64_t r, int64_t C,
                                                  const int64_t* __restrict__ npos,
                                                  const int64_t* __restrict__ pidx,
                                                  const acc_t* __restrict__ dap,
                                                  const int64_t* __restrict__ counts,
                                                  const uint8_t* __restrict__ nan_terms,
                                                  acc_t* __restrict__ Wc, acc_t* __restrict__ Dc) {
  constexpr int K = kFusedMaxPositives;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < r * K;
       e += stride) {
    const int64_t row = e / K, k = e % K, a = i0 + row;
    if (k >= npos[a] || nan_terms[a] != 0 || counts[a * K + k] == 0) continue;
    const int64_t q = row * C + pidx[a * K + k];
    Wc[q] = static_cast<acc_t>(counts[a * K + k]);
    Dc[q] = dap[a * K + k];
  }
}

template <typename scalar_t, typename acc_t, Metric M, int W>
void batch_all_fused_forward(const FusedInputs& in, RowStats<acc_t> sx, RowStats<acc_t> sy,
                             const FewPositives& f, acc_t margin, const RowResults& rows) {
  using ML = FusedMainloop<scalar_t, acc_t>;
  using Epi = BatchAllForwardEpi<acc_t, W>;
  const int64_t N = in.x.size(0), C = in.l.cols, D = in.x.size(1);
  const FusedGrid g = fused_grid<ML>(N, C);
  const auto opts = in.x.options();
  const at::Tensor part_sum = empty({g.splits, N}, opts.dtype(at::kDouble));
  const at::Tensor part_count = empty({g.splits, N}, opts.dtype(at::kLong));
  const at::Tensor part_nan = empty({g.splits, N}, opts.dtype(at::kByte));
  const typename Epi::Params p{f.npos.data_ptr<int64_t>(), f.dap.data_ptr<acc_t>(), margin,
                               part_sum.data_ptr<double>(), part_count.data_ptr<int64_t>(),
                               part_nan.data_ptr<uint8_t>()};
  launch_fused_rows<ML, M, Epi>(g, in.x.data_ptr<scalar_t>(), sx, N, in.y.data_ptr<scalar_t>(),
                                sy, in.l, D, p, in.stream);
  batch_all_fused_finalize_kernel<acc_t>
      <<<elementwise_grid(N), kElementwiseThreads, 0, in.stream>>>(
      N, g.splits, f.npos.data_ptr<int64_t>(), f.nneg.data_ptr<int64_t>(),
      f.dap.data_ptr<acc_t>(), part_sum.data_ptr<double>(), part_count.data_ptr<int64_t>(), part_nan.data_ptr<uint8_t>(),
      rows.loss.data_ptr<double>(), rows.valid.data_ptr<int64_t>(),
      rows.positive.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Adds the gradient of the loss sum (unscaled) to Gx (and gy: Gy, Gx itself for the batch, or
// null), chunk by chunk of anchor rows.
template <typename scalar_t, typename acc_t, Metric M, int W>
void batch_all_fused_backward(const FusedInputs& in, RowStats<acc_t> sx, RowStats<acc_t> sy,
                              const FewPositives& f, acc_t margin, at::Tensor& Gx,
                              at::Tensor* gy) {
  using ML = FusedMainloop<scalar_t, acc_t>;
  using Epi = BatchAllCountEpi<acc_t, W>;
  constexpr int K = kFusedMaxPositives;
  const int64_t N = in.x.size(0), C = in.l.cols, D = in.x.size(1);
  const scalar_t* xp = in.x.data_ptr<scalar_t>();
  const scalar_t* yp = in.y.data_ptr<scalar_t>();
  const auto opts = in.x.options();
  // Step 2: active negatives per (anchor, positive).
  const FusedGrid g = fused_grid<ML>(N, C);
  const at::Tensor part_count = empty({g.splits, N, W}, opts.dtype(at::kInt));
  const at::Tensor part_nan = empty({g.splits, N}, opts.dtype(at::kByte));
  const typename Epi::Params p{f.npos.data_ptr<int64_t>(), f.dap.data_ptr<acc_t>(), margin,
                               part_count.data_ptr<int32_t>(), part_nan.data_ptr<uint8_t>()};
  launch_fused_rows<ML, M, Epi>(g, xp, sx, N, yp, sy, in.l, D, p, in.stream);
  const at::Tensor counts = zeros({N, K}, opts.dtype(at::kLong));
  const at::Tensor nan_terms = empty({N}, opts.dtype(at::kByte));
  batch_all_count_finalize_kernel<acc_t, W>
      <<<elementwise_grid(N), kElementwiseThreads, 0, in.stream>>>(
          N, g.splits, f.npos.data_ptr<int64_t>(), f.nneg.data_ptr<int64_t>(),
          f.dap.data_ptr<acc_t>(), part_count.data_ptr<int32_t>(), part_nan.data_ptr<uint8_t>(),
          counts.data_ptr<int64_t>(), nan_terms.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The weight matrix chunk by chunk, then the gradient GEMM (pair_grad.cuh).
  const int64_t R = fused_chunk_rows<ML>(N, C, 2 * static_cast<int64_t>(sizeof(acc_t)));
  const auto acc_options = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor Wc = empty({R, C}, acc_options);
  const at::Tensor Dc = empty({R, C}, acc_options);
  const int64_t tilesC = ceil_div(C, ML::kBN);
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    const int64_t r = std::min(R, N - i0);
    const int64_t tilesR = ceil_div(r, ML::kBM);
    TORCH_CHECK(tilesC <= kMaxGridX && tilesR <= 65535, "triplet_cuda: weight grid too large");
    const dim3 grid(static_cast<unsigned int>(tilesC), static_cast<unsigned int>(tilesR));
    batch_all_weights_kernel<ML, M, W><<<grid, ML::kThreads, 0, in.stream>>>(
        xp, sx, yp, sy, in.l, D, i0, r, f.npos.data_ptr<int64_t>(), f.dap.data_ptr<acc_t>(),
        nan_terms.data_ptr<uint8_t>(), margin, Wc.data_ptr<acc_t>(), Dc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch_all_positive_weights_kernel<acc_t>
        <<<elementwise_grid(r * K), kElementwiseThreads, 0, in.stream>>>(
            i0, r, C, f.npos.data_ptr<int64_t>(), f.pidx.data_ptr<int64_t>(),
            f.dap.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), nan_terms.data_ptr<uint8_t>(),
            Wc.data_ptr<acc_t>(), Dc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    add_chunk_grad<scalar_t, acc_t, M>(Wc, Dc, in.x, sx, in.y, sy, i0, r, Gx, gy, in.stream);
  }
}

// The batch-all loss for loss_forward_cuda / loss_backward_cuda (loss_common.cuh): every
// (anchor, positive, negative) triplet with term relu(d_ap - d_an + margin).
struct BatchAllLoss {
  static constexpr bool kLabelGroups = true;
  static constexpr const char* kForwardName = "batch_all_loss_cuda";
  static constexpr const char* kBackwardName = "batch_all_loss_backward_cuda";

  // Its own driver (loss_common.cuh's HasOwnDriver): the fused path when every anchor has at
  // most kFusedMaxPositives positives (and the candidates are fewer than 2^31), else the
  // chunk + sort path below (run_loss_forward / run_loss_backward with this policy).
  static constexpr bool kOwnDriver = true;
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(
      const at::Tensor& x, const at::Tensor& y, const at::Tensor& cand_labels, const RowLabels& l,
      double margin, int64_t metric);
  static std::tuple<at::Tensor, at::Tensor> run_backward(
      const at::Tensor& gls, const at::Tensor& x, const at::Tensor& y,
      const at::Tensor& cand_labels, const RowLabels& l, double margin, int64_t metric,
      bool y_grad);

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

// The fused path when every anchor has at most kFusedMaxPositives positives (and fewer than
// 2^31 candidates), else the sort path (run_loss_forward / run_loss_backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> BatchAllLoss::run_forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& cand_labels, const RowLabels& l,
    double margin, int64_t metric) {
  const int64_t C = y.size(0);
  if (C > std::numeric_limits<int32_t>::max()) {
    return run_loss_forward<BatchAllLoss>(x, y, cand_labels, l, margin, metric);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups = label_groups(cand_labels, stream);
  const RowResults rows = make_row_results(x);
  bool fused = false;
  const at::Tensor xf = fused_embeddings(x);  // float16 / bfloat16: a float32 copy
  const at::Tensor yf = l.symmetric() ? xf : fused_embeddings(y);
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "batch_all_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(xf, stream);
    const at::Tensor stats_y =
        l.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(yf, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const FewPositives f =
          collect_positives<scalar_t, acc_t, kM>(xf, sx, yf, sy, l, groups, false, stream);
      if (!f.fits) return;
      fused = true;
      dispatch_lanes(f.W, [&](auto w) {
        batch_all_fused_forward<scalar_t, acc_t, kM, decltype(w)::value>(
            FusedInputs{xf, yf, l, stream}, sx, sy, f, static_cast<acc_t>(margin), rows);
      });
    });
  });
  if (!fused) return run_loss_forward<BatchAllLoss>(x, y, cand_labels, l, margin, metric);
  return finalize_loss(rows, x, stream);
}

std::tuple<at::Tensor, at::Tensor> BatchAllLoss::run_backward(
    const at::Tensor& gls, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& cand_labels, const RowLabels& l, double margin, int64_t metric,
    bool y_grad) {
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  if (C > std::numeric_limits<int32_t>::max()) {
    return run_loss_backward<BatchAllLoss>(gls, x, y, cand_labels, l, margin, metric, y_grad);
  }
  const bool same_set = l.symmetric();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups = label_groups(cand_labels, stream);
  at::Tensor grad_x, grad_y;
  bool fused = false;
  const at::Tensor xf = fused_embeddings(x);  // float16 / bfloat16: a float32 copy
  const at::Tensor yf = same_set ? xf : fused_embeddings(y);
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "batch_all_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = xf.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(xf, stream);
    const at::Tensor stats_y = same_set ? stats_x : compute_row_stats<scalar_t, acc_t>(yf, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const FewPositives f =
          collect_positives<scalar_t, acc_t, kM>(xf, sx, yf, sy, l, groups, false, stream);
      if (!f.fits && f.any_valid) return;  // the sort path
      fused = true;
      at::Tensor Gx = zeros({N, D}, acc_options);
      at::Tensor Gy = (!same_set && y_grad) ? zeros({C, D}, acc_options) : at::Tensor();
      at::Tensor* gy = same_set ? &Gx : (y_grad ? &Gy : nullptr);
      if (f.any_valid) {  // else the loss is the constant 0: its gradient is exactly 0
        dispatch_lanes(f.W, [&](auto w) {
          batch_all_fused_backward<scalar_t, acc_t, kM, decltype(w)::value>(
              FusedInputs{xf, yf, l, stream}, sx, sy, f, static_cast<acc_t>(margin), Gx, gy);
        });
      }
      grad_x = finish_grad<scalar_t, acc_t>(Gx, gls, xf, stream);
      if (Gy.defined()) grad_y = finish_grad<scalar_t, acc_t>(Gy, gls, yf, stream);
    });
  });
  if (!fused) {
    return run_loss_backward<BatchAllLoss>(gls, x, y, cand_labels, l, margin, metric, y_grad);
  }
  return fused_grads_in(x.scalar_type(), grad_x, grad_y);
}

}  // namespace

TC_CUDA_LOSS_ENTRY_POINTS(batch_all, BatchAllLoss)

}  // namespace cuda
}  // namespace triplet_cuda
