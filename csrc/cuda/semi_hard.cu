// Semi-hard triplet loss on CUDA (FaceNet; TensorFlow Addons' TripletSemiHardLoss).
//
// For every (anchor a, positive p) of an anchor with at least one negative the negative is
// the one with the smallest d_an > d_ap (strict), else the one with the largest d_an;
// ties go to the lowest index; term = relu(d_ap - d_an + margin).
//
// Few positives per anchor (every anchor at most kFusedMaxPositives, the usual P x K batch):
// the fused path below (few_positives.cuh) -- positives' distances first, negatives streamed
// once through the Mainloop's tiles, no (rows, C) workspace in the forward, no sort; the loss
// and mine_triplets(strategy="semi_hard") share its choices, as on the CPU.
//
// Otherwise (the sort path): anchors are processed in row chunks (loss_common.cuh): distances of the chunk's rows to
// all C candidate rows (the batch itself, C = N, or a reference set for the *_ref ops) in an
// (R, C) acc_t workspace; per row, the negatives' distances are sorted
// stably (keys +inf for non-negatives; one segmented at::sort per chunk), so the sorted
// indices break ties by the lowest index. For a positive at d_ap the first sorted position
// with d_an > d_ap is found by binary search; it is the first occurrence of its value. The
// fallback (largest d_an) is the first occurrence of the last value. (Should a distance be
// +inf, the +inf keys of the non-negatives tie with it; a pick that is not a negative is
// then redone by a scan of the row, as on the CPU.)
//
// One block per anchor row, columns owned by threads; row totals in a fixed order, rows in
// a fixed order (deterministic). The backward's weights are +1 on (a, p) and -1 per active
// pair on its chosen (a, n); the latter are gathered with int32 atomicAdd (integer, so the
// result does not depend on the order), converted to acc_t and differentiated through the
// distances with pair_grad.cuh. O(R * C) memory per chunk.
//
// NaN rule (csrc/epilogue.h; as SemiHardRows in csrc/cpu/semi_hard.h): in an anchor row
// holding a NaN distance the sorted keys are not used (NaN sorts after the +inf keys, see
// loss_common.cuh); each positive's negative is chosen by the shared scan instead
// (epi::SemiHardChoice / ArgFarthest: NaN ranks farthest, "d_an > d_ap" is false for NaN).
// Such an anchor with a valid pair gets a NaN loss sum (valid count unchanged; the positive
// count still counts the terms > 0) and NaN weights on every j != self.

#include "ops_cuda.h"
#include "internal.cuh"
#include "few_positives.cuh"
#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

enum class SemiMode { kForward, kBackward, kMine };

// Bytes of chunk workspace per (row, column) element: distances, keys, sorted values and
// int64 sort indices, int32 and acc_t weights.
template <typename acc_t>
constexpr int64_t semi_hard_bytes_per_elem() {
  return 4 * static_cast<int64_t>(sizeof(acc_t)) + 8 + 4;
}

// The semi-hard choice for a positive at distance d by one thread scanning anchor row d_row
// with the shared epilogue, exactly as the CPU's scan_select: the nearest negative with
// d_an > d, else the farthest one; ties to the lowest index, NaN farthest. Q > 0 required.
template <typename acc_t>
__device__ __noinline__ void semi_hard_scan(const acc_t* __restrict__ d_row,
                                            const int64_t* __restrict__ cand, int64_t C,
                                            int64_t la, acc_t d, acc_t& dn, int64_t& n) {
  epi::SemiHardChoice<acc_t> choice;
  epi::ArgFarthest<acc_t> farthest;
  for (int64_t u = 0; u < C; ++u) {
    if (cand[u] == la) continue;
    const acc_t du = d_row[u];
    farthest.update(du, u);
    choice.update(d, du, u);
  }
  epi::semi_hard_pick(choice, farthest, &dn, &n);
}

// Wi entry of an anchor row under the NaN rule; turned into NaN by semi_hard_weights_kernel.
// (Real entries are counts of magnitude < N, far from it.)
constexpr int32_t kNanWeight = std::numeric_limits<int32_t>::min();

// W[e] = NaN where Wi[e] == kNanWeight, else acc_t(Wi[e]).
template <typename acc_t>
__global__ void semi_hard_weights_kernel(const int32_t* __restrict__ Wi, int64_t n,
                                         acc_t* __restrict__ W) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int32_t v = Wi[e];
    W[e] = v == kNanWeight ? epi::quiet_nan<acc_t>() : static_cast<acc_t>(v);
  }
}

// One block per anchor row of the chunk (a = i0 + blockIdx.x), rows of C = l.cols candidates.
//   sn, in: the row's negatives' distances sorted ascending (first Q entries) and their
//           column indices (stable sort: ascending index among equal distances).
// kForward: loss_rows[a], valid_rows[a], pos_rows[a].
// kBackward: Wi[row, p] = 1 and Wi[row, n] -= 1 for every active (p, n); Wi zeroed before;
//            under the NaN rule Wi[row, j] = kNanWeight for every j != self instead.
// kMine: (a, p, n) at offsets[a] + (rank of p among a's positives).
template <typename acc_t, SemiMode kMode>
__global__ void __launch_bounds__(kRowThreads)
    semi_hard_rows_kernel(const acc_t* __restrict__ Dc, const acc_t* __restrict__ Sn,
                          const int64_t* __restrict__ In, RowLabels l,
                          const int64_t* __restrict__ sorted_labels,
                          const int64_t* __restrict__ label_rank, int64_t i0,
                          acc_t margin, double* __restrict__ loss_rows,
                          int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows,
                          int32_t* __restrict__ Wi, const int64_t* __restrict__ offsets,
                          int64_t* __restrict__ out_a, int64_t* __restrict__ out_p,
                          int64_t* __restrict__ out_n) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t a = i0 + row;
  const int64_t C = l.cols;
  const int64_t* __restrict__ cand = l.cand;
  const AnchorGroup g = anchor_group(l, sorted_labels, a);
  const int64_t la = g.la;
  const int64_t P = g.P;  // positives of a
  const int64_t Q = g.Q;  // negatives of a
  const acc_t* __restrict__ d_row = Dc + row * C;
  const acc_t* __restrict__ sn = Sn + row * C;
  const int64_t* __restrict__ in = In + row * C;
  const bool row_nan = block_row_has_nan(d_row, C);  // every thread: a barrier
  const bool nan_terms = row_nan && P > 0 && Q > 0;

  double loss = 0;
  int64_t active = 0;
  if (kMode == SemiMode::kBackward && nan_terms) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      if (j != g.self) Wi[row * C + j] = kNanWeight;  // owned: no atomics in this row
    }
  } else if (Q > 0) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      if (j == g.self || cand[j] != la) continue;  // positives only
      const acc_t d = d_row[j];
      acc_t dn;
      int64_t n;
      if (row_nan) {
        semi_hard_scan(d_row, cand, C, la, d, dn, n);
      } else {
        // First sorted negative farther than the positive.
        const int64_t t = partition_point(Q, [&](int64_t u) { return !(sn[u] > d); });
        if (t < Q) {
          dn = sn[t];
          n = in[t];
        } else {  // none: the farthest negative, first occurrence of the largest value
          dn = sn[Q - 1];
          const int64_t t2 = partition_point(Q, [&](int64_t u) { return sn[u] < dn; });
          n = in[t2];
        }
        if (cand[n] == la) {
          // Only possible with +inf distances (a Gram value overflowing for huge finite
          // rows): the +inf sort keys of the non-negatives then tie with negatives in the
          // sort, and a non-negative was picked.
          semi_hard_scan(d_row, cand, C, la, d, dn, n);
        }
      }
      if constexpr (kMode == SemiMode::kForward) {
        const acc_t v = d - dn + margin;
        if (v > acc_t(0)) {
          loss += static_cast<double>(v);
          active += 1;
        }
      } else if constexpr (kMode == SemiMode::kBackward) {
        const acc_t v = d - dn + margin;
        if (v > acc_t(0)) {
          Wi[row * C + j] = 1;  // owned: positive columns are written only here
          atomicAdd(&Wi[row * C + n], -1);  // integer: order-independent
        }
      } else {
        // Positives of a in ascending index order are its label group among the candidates
        // (stably sorted) without its self index.
        const int64_t rp =
            label_rank[j] - g.gs - (g.self_in && label_rank[g.self] < label_rank[j] ? 1 : 0);
        const int64_t q = offsets[a] + rp;
        out_a[q] = a;
        out_p[q] = j;
        out_n[q] = n;
      }
    }
  }
  if constexpr (kMode == SemiMode::kForward) {
    loss = block_sum(loss, sd);
    active = block_sum(active, si);
    if (threadIdx.x == 0) {
      loss_rows[a] = nan_terms ? epi::quiet_nan<double>() : loss;
      valid_rows[a] = Q > 0 ? P : 0;
      pos_rows[a] = active;
    }
  }
}

// Sorted negatives of a chunk: values and stable column indices, both (r, C) contiguous.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> sorted_negatives(const at::Tensor& Dc, const RowLabels& l,
                                                    int64_t i0, int64_t r,
                                                    cudaStream_t stream) {
  at::Tensor keys = empty({r, l.cols}, Dc.options());
  launch_sort_keys<acc_t>(Dc, l, i0, r, keys.data_ptr<acc_t>(), nullptr, stream);
  const auto sorted = keys.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

// counts[a] = number of valid (a, p) pairs of the N anchors: #positives if a has a negative,
// else 0.
__global__ void semi_hard_counts_kernel(RowLabels l, const int64_t* __restrict__ sorted_labels,
                                        int64_t N, int64_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    const AnchorGroup g = anchor_group(l, sorted_labels, a);
    counts[a] = g.Q > 0 ? g.P : 0;
  }
}

// ------------------------------------------------------------------------ fused path

// Few positives per anchor (few_positives.cuh), the CPU's mine_fused: each anchor's positive
// distances d_ap (and their exact distances) first (step 1), then its negatives streamed once
// through the Mainloop's tiles (step 2), each negative (d_an, n) updating, per positive lane k,
// the nearest negative with d_an > d_ap (epi::SemiHardChoice) and, per anchor, the farthest
// negative (epi::ArgFarthest). "d_an > d_ap" is decided on the exact distances when the two are
// a near tie (epi::near_tie; the negative's exact distance computed at most once per pair, by
// the thread that owns it), so a negative duplicating a positive ties as in the reference.
// Unused lanes hold d_ap = NaN: never a near tie, never farther. The comparators are total
// orders on (distance, index), so the per-thread, column-group and split partial choices
// combine in any order to the same pick. The finalize kernel picks per (anchor, positive)
// (epi::semi_hard_pick), sums the terms (a float64 row sum in positive order) and keeps the
// choices for the backward, which builds, per chunk of anchor rows, the weight matrix of the
// gradient GEMM (pair_grad.cuh, as the sort path): +1 on (a, p) and -1 on (a, n) per active
// pair, with step 1's d_ap and the tile's d_an. NaN rule as the sort path.

template <typename acc_t_, int W>
struct SemiHardEpi {
  using acc_t = acc_t_;
  static constexpr int K = kFusedMaxPositives;
  struct Params {
    const int64_t* npos;   // (N)
    const acc_t* dap;      // (N, K)
    const acc_t* exact_ap; // (N, K)
    acc_t* part_nd;        // (splits, N, W): per lane the nearest negative farther than d_ap
    int64_t* part_ni;      // (splits, N, W), -1: none
    acc_t* part_fd;        // (splits, N): the farthest negative
    int64_t* part_fi;      // (splits, N), -1: none
    uint8_t* part_nan;     // (splits, N): a NaN negative distance
  };
  struct Row {
    acc_t dap[W];
    acc_t exact_ap[W];
  };
  struct Acc {
    epi::SemiHardChoice<acc_t> choice[W];
    epi::ArgFarthest<acc_t> farthest;
    bool nan;
  };
  struct Slot {
    acc_t nd[W];
    int64_t ni[W];
    acc_t fd;
    int64_t fi;
    int nan;
  };
  __device__ static void load_row(const Params& p, int64_t a, Row& row) {
    const int64_t P = p.npos[a];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      row.dap[k] = k < P ? p.dap[a * K + k] : epi::quiet_nan<acc_t>();
      row.exact_ap[k] = k < P ? p.exact_ap[a * K + k] : epi::quiet_nan<acc_t>();
    }
  }
  __device__ static void init(Acc& acc) {
#pragma unroll
    for (int k = 0; k < W; ++k) acc.choice[k] = epi::SemiHardChoice<acc_t>{};
    acc.farthest = epi::ArgFarthest<acc_t>{};
    acc.nan = false;
  }
  template <typename Exact>
  __device__ static void visit(Acc& acc, const Row& row, acc_t d, int64_t n, Exact&& exact_an) {
    acc.farthest.update(d, n);
    acc.nan |= epi::is_nan(d);
    acc_t ex = epi::quiet_nan<acc_t>();  // the pair's exact distance, on a near tie only
    bool have_exact = false;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      bool farther = d > row.dap[k];
      if (epi::near_tie(d, row.dap[k])) {
        if (!have_exact) {
          ex = exact_an();
          have_exact = true;
        }
        farther = ex > row.exact_ap[k];
      }
      acc.choice[k].update_if(farther, d, n);
    }
  }
  __device__ static void save(const Acc& acc, Slot& s) {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      s.nd[k] = acc.choice[k].outside.d;
      s.ni[k] = acc.choice[k].outside.i;
    }
    s.fd = acc.farthest.d;
    s.fi = acc.farthest.i;
    s.nan = acc.nan;
  }
  __device__ static void merge(Acc& acc, const Slot& s) {
#pragma unroll
    for (int k = 0; k < W; ++k) acc.choice[k].outside.update(s.nd[k], s.ni[k]);
    acc.farthest.update(s.fd, s.fi);
    acc.nan |= s.nan != 0;
  }
  __device__ static void store(const Params& p, int64_t split, int64_t N, int64_t a,
                               const Acc& acc) {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      p.part_nd[(split * N + a) * W + k] = acc.choice[k].outside.d;
      p.part_ni[(split * N + a) * W + k] = acc.choice[k].outside.i;
    }
    p.part_fd[split * N + a] = acc.farthest.d;
    p.part_fi[split * N + a] = acc.farthest.i;
    p.part_nan[split * N + a] = acc.nan ? 1 : 0;
  }
};

// The fused mining's per (anchor, positive k) result (N, K): the chosen negative (-1 where the
// anchor has none), its distance, whether the term is active; nan_terms (N): the NaN rule
// applies to the anchor.
struct SemiHardChoices {
  at::Tensor neg, neg_d, active, nan_terms;
};

// Per anchor: the splits combined (ascending; the order does not change a pick), the pick per
// positive, and, when loss_rows is not null, the row results (the loss sum in positive order).
template <typename acc_t, int W>
__global__ void semi_hard_fused_finalize_kernel(
    int64_t N, int64_t splits, const int64_t* __restrict__ npos, const int64_t* __restrict__ nneg,
    const acc_t* __restrict__ dap, acc_t margin, const acc_t* __restrict__ part_nd,
    const int64_t* __restrict__ part_ni, const acc_t* __restrict__ part_fd,
    const int64_t* __restrict__ part_fi, const uint8_t* __restrict__ part_nan,
    int64_t* __restrict__ neg, acc_t* __restrict__ neg_d, uint8_t* __restrict__ active,
    uint8_t* __restrict__ nan_terms, double* __restrict__ loss_rows,
    int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows) {
  constexpr int K = kFusedMaxPositives;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    const int64_t P = npos[a], Q = nneg[a];
    const int64_t valid = Q > 0 ? P : 0;
    epi::ArgFarthest<acc_t> farthest;
    bool nan = false;
    for (int64_t s = 0; s < splits; ++s) {
      farthest.update(part_fd[s * N + a], part_fi[s * N + a]);
      nan |= part_nan[s * N + a] != 0;
    }
    double loss = 0;
    int64_t positive = 0;
    for (int64_t k = 0; k < valid; ++k) {  // valid <= W
      epi::SemiHardChoice<acc_t> choice;
      for (int64_t s = 0; s < splits; ++s) {
        choice.outside.update(part_nd[(s * N + a) * W + k], part_ni[(s * N + a) * W + k]);
      }
      acc_t dn;
      int64_t n;
      epi::semi_hard_pick(choice, farthest, &dn, &n);
      const acc_t d = dap[a * K + k];
      nan |= epi::is_nan(d);
      const acc_t term = d - dn + margin;
      const bool on = term > acc_t(0);
      if (on) {
        loss += static_cast<double>(term);
        ++positive;
      }
      neg[a * K + k] = n;
      neg_d[a * K + k] = dn;
      active[a * K + k] = on ? 1 : 0;
    }
    const bool nan_row = nan && valid > 0;
    nan_terms[a] = nan_row ? 1 : 0;
    if (loss_rows != nullptr) {
      loss_rows[a] = nan_row ? epi::quiet_nan<double>() : loss;
      valid_rows[a] = valid;
      pos_rows[a] = positive;
    }
  }
}

// Steps 2 and 3 of the fused semi hard: the choices, and the row results when rows != null.
template <typename scalar_t, typename acc_t, Metric M, int W>
SemiHardChoices semi_hard_fused_mine(const FusedInputs& in, RowStats<acc_t> sx,
                                     RowStats<acc_t> sy, const FewPositives& f, acc_t margin,
                                     const RowResults* rows) {
  using ML = FusedMainloop<scalar_t, acc_t>;
  using Epi = SemiHardEpi<acc_t, W>;
  constexpr int K = kFusedMaxPositives;
  const int64_t N = in.x.size(0), C = in.l.cols, D = in.x.size(1);
  const FusedGrid g = fused_grid<ML>(N, C);
  const auto opts = in.x.options();
  const auto acc_options = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor part_nd = empty({g.splits, N, W}, acc_options);
  const at::Tensor part_ni = empty({g.splits, N, W}, opts.dtype(at::kLong));
  const at::Tensor part_fd = empty({g.splits, N}, acc_options);
  const at::Tensor part_fi = empty({g.splits, N}, opts.dtype(at::kLong));
  const at::Tensor part_nan = empty({g.splits, N}, opts.dtype(at::kByte));
  const typename Epi::Params p{f.npos.data_ptr<int64_t>(), f.dap.data_ptr<acc_t>(),
                               f.exact_ap.data_ptr<acc_t>(), part_nd.data_ptr<acc_t>(),
                               part_ni.data_ptr<int64_t>(), part_fd.data_ptr<acc_t>(),
                               part_fi.data_ptr<int64_t>(), part_nan.data_ptr<uint8_t>()};
  launch_fused_rows<ML, M, Epi>(g, in.x.data_ptr<scalar_t>(), sx, N, in.y.data_ptr<scalar_t>(),
                                sy, in.l, D, p, in.stream);
  SemiHardChoices ch{full({N, K}, -1, opts.dtype(at::kLong)), zeros({N, K}, acc_options),
                     zeros({N, K}, opts.dtype(at::kByte)), empty({N}, opts.dtype(at::kByte))};
  semi_hard_fused_finalize_kernel<acc_t, W>
      <<<elementwise_grid(N), kElementwiseThreads, 0, in.stream>>>(
          N, g.splits, f.npos.data_ptr<int64_t>(), f.nneg.data_ptr<int64_t>(),
          f.dap.data_ptr<acc_t>(), margin, part_nd.data_ptr<acc_t>(), part_ni.data_ptr<int64_t>(),
          part_fd.data_ptr<acc_t>(), part_fi.data_ptr<int64_t>(), part_nan.data_ptr<uint8_t>(),
          ch.neg.data_ptr<int64_t>(), ch.neg_d.data_ptr<acc_t>(), ch.active.data_ptr<uint8_t>(),
          ch.nan_terms.data_ptr<uint8_t>(),
          rows != nullptr ? rows->loss.data_ptr<double>() : nullptr,
          rows != nullptr ? rows->valid.data_ptr<int64_t>() : nullptr,
          rows != nullptr ? rows->positive.data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ch;
}

// Backward, one chunk of anchor rows [i0, i0 + r), one block per row (a = i0 + blockIdx.x):
// Wc / Dc row (stride C) zeroed (NaN rule: W = D = NaN on every j != self), then thread 0 adds, in
// positive order, +1 at (a, p) and -1 at (a, n) per active pair with the pair's distance.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    semi_hard_fused_weights_kernel(int64_t i0, RowLabels l, const int64_t* __restrict__ npos,
                                   const int64_t* __restrict__ pidx, const acc_t* __restrict__ dap,
                                   const int64_t* __restrict__ neg,
                                   const acc_t* __restrict__ neg_d,
                                   const uint8_t* __restrict__ active,
                                   const uint8_t* __restrict__ nan_terms, acc_t* __restrict__ Wc,
                                   acc_t* __restrict__ Dc) {
  constexpr int K = kFusedMaxPositives;
  const int64_t row = blockIdx.x;
  const int64_t a = i0 + row;
  const int64_t C = l.cols;
  const bool nan_row = nan_terms[a] != 0;
  const int64_t self = l.self_of(a);
  acc_t* __restrict__ w = Wc + row * C;
  acc_t* __restrict__ dr = Dc + row * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    // NaN rule: the distance NaN too, so that pair_grad's 0-distance rule does not apply
    const acc_t v = (nan_row && j != self) ? epi::quiet_nan<acc_t>() : acc_t(0);
    w[j] = v;
    dr[j] = v;
  }
  __syncthreads();  // every thread: the zeros are written before thread 0 adds
  if (threadIdx.x != 0 || nan_row) return;
  const int64_t P = npos[a];
  for (int64_t k = 0; k < P && k < K; ++k) {
    if (active[a * K + k] == 0) continue;  // also 0 for an anchor without negatives
    const int64_t p = pidx[a * K + k], n = neg[a * K + k];
    w[p] += acc_t(1);
    dr[p] = dap[a * K + k];
    w[n] -= acc_t(1);
    dr[n] = neg_d[a * K + k];
  }
}

// Adds the gradient of the loss sum (unscaled) to Gx (and gy), chunk by chunk of anchor rows.
template <typename scalar_t, typename acc_t, Metric M>
void semi_hard_fused_backward(const FusedInputs& in, RowStats<acc_t> sx, RowStats<acc_t> sy,
                              const FewPositives& f, const SemiHardChoices& ch, at::Tensor& Gx,
                              at::Tensor* gy) {
  const int64_t N = in.x.size(0), C = in.l.cols;
  const auto acc_options = in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t R = chunk_rows(N, C, 2 * static_cast<int64_t>(sizeof(acc_t)));
  const at::Tensor Wc = empty({R, C}, acc_options);
  const at::Tensor Dc = empty({R, C}, acc_options);
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    const int64_t r = std::min(R, N - i0);
    semi_hard_fused_weights_kernel<acc_t><<<grid_1d(r), kRowThreads, 0, in.stream>>>(
        i0, in.l, f.npos.data_ptr<int64_t>(), f.pidx.data_ptr<int64_t>(), f.dap.data_ptr<acc_t>(),
        ch.neg.data_ptr<int64_t>(), ch.neg_d.data_ptr<acc_t>(), ch.active.data_ptr<uint8_t>(),
        ch.nan_terms.data_ptr<uint8_t>(), Wc.data_ptr<acc_t>(), Dc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    add_chunk_grad<scalar_t, acc_t, M>(Wc, Dc, in.x, sx, in.y, sy, i0, r, Gx, gy, in.stream);
  }
}

// (a, p, n) of every valid (anchor, positive) at offsets[a] + k (k: the positive's rank).
__global__ void semi_hard_fused_triplets_kernel(int64_t N, const int64_t* __restrict__ npos,
                                                const int64_t* __restrict__ nneg,
                                                const int64_t* __restrict__ pidx,
                                                const int64_t* __restrict__ neg,
                                                const int64_t* __restrict__ offsets,
                                                int64_t* __restrict__ out_a,
                                                int64_t* __restrict__ out_p,
                                                int64_t* __restrict__ out_n) {
  constexpr int K = kFusedMaxPositives;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < N * K;
       e += stride) {
    const int64_t a = e / K, k = e % K;
    if (nneg[a] == 0 || k >= npos[a]) continue;
    const int64_t q = offsets[a] + k;
    out_a[q] = a;
    out_p[q] = pidx[e];
    out_n[q] = neg[e];
  }
}

// The semi-hard loss for loss_forward_cuda / loss_backward_cuda (loss_common.cuh):
// num_valid = #(a, p) pairs of anchors with a negative, num_positive = #pairs with a
// positive term.
struct SemiHardLoss {
  static constexpr bool kLabelGroups = true;
  static constexpr const char* kForwardName = "semi_hard_loss_cuda";
  static constexpr const char* kBackwardName = "semi_hard_loss_backward_cuda";

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

  template <typename acc_t>
  static constexpr int64_t bytes_per_elem() {
    return semi_hard_bytes_per_elem<acc_t>();
  }

  template <typename acc_t>
  static void forward(const LossChunk& c, const RowResults& rows) {
    const acc_t m = static_cast<acc_t>(c.margin);
    const std::tuple<at::Tensor, at::Tensor> neg =
        sorted_negatives<acc_t>(c.Dc, c.lab, c.i0, c.r, c.stream);
    const at::Tensor& sn = std::get<0>(neg);
    const at::Tensor& in = std::get<1>(neg);
    semi_hard_rows_kernel<acc_t, SemiMode::kForward><<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), in.data_ptr<int64_t>(), c.lab,
        c.groups.sorted.data_ptr<int64_t>(), c.groups.rank.data_ptr<int64_t>(), c.i0, m,
        rows.loss.data_ptr<double>(), rows.valid.data_ptr<int64_t>(),
        rows.positive.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t>
  static at::Tensor weights(const LossChunk& c) {
    const acc_t m = static_cast<acc_t>(c.margin);
    const std::tuple<at::Tensor, at::Tensor> neg =
        sorted_negatives<acc_t>(c.Dc, c.lab, c.i0, c.r, c.stream);
    const at::Tensor& sn = std::get<0>(neg);
    const at::Tensor& in = std::get<1>(neg);
    at::Tensor Wi = zeros({c.r, c.cols}, c.Dc.options().dtype(at::kInt));
    semi_hard_rows_kernel<acc_t, SemiMode::kBackward>
        <<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
            c.Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), in.data_ptr<int64_t>(), c.lab,
            c.groups.sorted.data_ptr<int64_t>(), c.groups.rank.data_ptr<int64_t>(), c.i0, m,
            nullptr, nullptr, nullptr, Wi.data_ptr<int32_t>(), nullptr, nullptr, nullptr,
            nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor W = empty({c.r, c.cols}, c.Dc.options());
    const int64_t n = c.r * c.cols;
    if (n > 0) {
      semi_hard_weights_kernel<acc_t><<<elementwise_grid(n), kElementwiseThreads, 0, c.stream>>>(
          Wi.data_ptr<int32_t>(), n, W.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return W;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> SemiHardLoss::run_forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& cand_labels, const RowLabels& l,
    double margin, int64_t metric) {
  if (y.size(0) > std::numeric_limits<int32_t>::max()) {
    return run_loss_forward<SemiHardLoss>(x, y, cand_labels, l, margin, metric);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups = label_groups(cand_labels, stream);
  const RowResults rows = make_row_results(x);
  bool fused = false;
  const at::Tensor xf = fused_embeddings(x);  // float16 / bfloat16: a float32 copy
  const at::Tensor yf = l.symmetric() ? xf : fused_embeddings(y);
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "semi_hard_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(xf, stream);
    const at::Tensor stats_y =
        l.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(yf, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const FewPositives f =
          collect_positives<scalar_t, acc_t, kM>(xf, sx, yf, sy, l, groups, true, stream);
      if (!f.fits) return;
      fused = true;
      dispatch_lanes(f.W, [&](auto w) {
        semi_hard_fused_mine<scalar_t, acc_t, kM, decltype(w)::value>(
            FusedInputs{xf, yf, l, stream}, sx, sy, f, static_cast<acc_t>(margin), &rows);
      });
    });
  });
  if (!fused) return run_loss_forward<SemiHardLoss>(x, y, cand_labels, l, margin, metric);
  return finalize_loss(rows, x, stream);
}

std::tuple<at::Tensor, at::Tensor> SemiHardLoss::run_backward(
    const at::Tensor& gls, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& cand_labels, const RowLabels& l, double margin, int64_t metric,
    bool y_grad) {
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  if (C > std::numeric_limits<int32_t>::max()) {
    return run_loss_backward<SemiHardLoss>(gls, x, y, cand_labels, l, margin, metric, y_grad);
  }
  const bool same_set = l.symmetric();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups = label_groups(cand_labels, stream);
  at::Tensor grad_x, grad_y;
  bool fused = false;
  const at::Tensor xf = fused_embeddings(x);  // float16 / bfloat16: a float32 copy
  const at::Tensor yf = same_set ? xf : fused_embeddings(y);
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "semi_hard_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = xf.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(xf, stream);
    const at::Tensor stats_y = same_set ? stats_x : compute_row_stats<scalar_t, acc_t>(yf, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const FewPositives f =
          collect_positives<scalar_t, acc_t, kM>(xf, sx, yf, sy, l, groups, true, stream);
      if (!f.fits && f.any_valid) return;  // the sort path
      fused = true;
      at::Tensor Gx = zeros({N, D}, acc_options);
      at::Tensor Gy = (!same_set && y_grad) ? zeros({C, D}, acc_options) : at::Tensor();
      at::Tensor* gy = same_set ? &Gx : (y_grad ? &Gy : nullptr);
      if (f.any_valid) {  // else the loss is the constant 0: its gradient is exactly 0
        dispatch_lanes(f.W, [&](auto w) {
          const FusedInputs in{xf, yf, l, stream};
          const SemiHardChoices ch = semi_hard_fused_mine<scalar_t, acc_t, kM, decltype(w)::value>(
              in, sx, sy, f, static_cast<acc_t>(margin), nullptr);
          semi_hard_fused_backward<scalar_t, acc_t, kM>(in, sx, sy, f, ch, Gx, gy);
        });
      }
      grad_x = finish_grad<scalar_t, acc_t>(Gx, gls, xf, stream);
      if (Gy.defined()) grad_y = finish_grad<scalar_t, acc_t>(Gy, gls, yf, stream);
    });
  });
  if (!fused) {
    return run_loss_backward<SemiHardLoss>(gls, x, y, cand_labels, l, margin, metric, y_grad);
  }
  return fused_grads_in(x.scalar_type(), grad_x, grad_y);
}

}  // namespace

TC_CUDA_LOSS_ENTRY_POINTS(semi_hard, SemiHardLoss)

std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_triplets_impl(const MineArgs& in,
                                                                      int64_t metric) {
  const at::Tensor& x = in.x;
  const at::Tensor& y = in.symmetric() ? in.x : in.y;
  const at::Tensor& cand_labels = in.symmetric() ? in.lab : in.ref_lab;
  const RowLabels l = in.symmetric() ? batch_row_labels(in.lab)
                                     : ref_row_labels(in.lab, in.ref_lab, in.self);
  const int64_t N = x.size(0), C = y.size(0);
  const auto idx_options = x.options().dtype(at::kLong);
  if (N == 0 || C == 0) {
    return {empty({0}, idx_options), empty({0}, idx_options),
            empty({0}, idx_options)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups = label_groups(cand_labels, stream);
  // Count pass + exclusive scan: anchor a's pairs start at offsets[a].
  at::Tensor counts = empty({N}, idx_options);
  semi_hard_counts_kernel<<<elementwise_grid(N), kElementwiseThreads, 0, stream>>>(
      l, groups.sorted.data_ptr<int64_t>(), N, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor offsets;
  int64_t T = 0;
  std::tie(offsets, T) = exclusive_offsets(counts);  // synchronises: T sizes the outputs
  at::Tensor out_a = empty({T}, idx_options);
  at::Tensor out_p = empty({T}, idx_options);
  at::Tensor out_n = empty({T}, idx_options);
  if (T == 0) return {out_a, out_p, out_n};
  // Few positives: the fused mining, the very choices of the loss (as on the CPU).
  bool fused = false;
  if (C <= std::numeric_limits<int32_t>::max()) {
    const at::Tensor xf = fused_embeddings(x);  // float16 / bfloat16: a float32 copy
    const at::Tensor yf = in.symmetric() ? xf : fused_embeddings(y);
    AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "semi_hard_triplets_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(xf, stream);
      const at::Tensor stats_y =
          in.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(yf, stream);
      const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
      const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
      TC_METRIC_SWITCH(metric, kM, [&] {
        const FewPositives f =
            collect_positives<scalar_t, acc_t, kM>(xf, sx, yf, sy, l, groups, true, stream);
        if (!f.fits) return;
        fused = true;
        dispatch_lanes(f.W, [&](auto w) {
          const SemiHardChoices ch = semi_hard_fused_mine<scalar_t, acc_t, kM, decltype(w)::value>(
              FusedInputs{xf, yf, l, stream}, sx, sy, f, acc_t(0), nullptr);
          semi_hard_fused_triplets_kernel<<<elementwise_grid(N * kFusedMaxPositives),
                                            kElementwiseThreads, 0, stream>>>(
              N, f.npos.data_ptr<int64_t>(), f.nneg.data_ptr<int64_t>(),
              f.pidx.data_ptr<int64_t>(), ch.neg.data_ptr<int64_t>(),
              offsets.data_ptr<int64_t>(), out_a.data_ptr<int64_t>(),
              out_p.data_ptr<int64_t>(), out_n.data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  if (fused) return {out_a, out_p, out_n};
  // Many positives: the loss's sort path over distance chunks.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "semi_hard_triplets_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y =
        in.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const int64_t R = chunk_rows(N, C, semi_hard_bytes_per_elem<acc_t>());
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, sx, y, sy, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            const auto [sn, in_idx] = sorted_negatives<acc_t>(Dc, l, i0, r, stream);
            semi_hard_rows_kernel<acc_t, SemiMode::kMine><<<grid_1d(r), kRowThreads, 0, stream>>>(
                Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), in_idx.data_ptr<int64_t>(), l,
                groups.sorted.data_ptr<int64_t>(), groups.rank.data_ptr<int64_t>(), i0, acc_t(0),
                nullptr, nullptr, nullptr, nullptr, offsets.data_ptr<int64_t>(),
                out_a.data_ptr<int64_t>(), out_p.data_ptr<int64_t>(), out_n.data_ptr<int64_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  return {out_a, out_p, out_n};
}

}  // namespace cuda
}  // namespace triplet_cuda
