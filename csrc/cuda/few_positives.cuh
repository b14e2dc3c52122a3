// The fused CUDA path of the losses that need each anchor's few positives (batch all, semi
// hard), the counterpart of csrc/cpu/fused.h. Used when every anchor has at most
// kFusedMaxPositives positives among the candidates (the usual P x K batch); otherwise the
// losses keep their chunk + sort path (loss_common.cuh).
//
//   1. Positives (positives_kernel): one warp per anchor lists its positives -- its label
//      group among the candidates (LabelGroups, ascending index) without its self index -- and
//      their distances: a warp dot product (coalesced over D, fixed butterfly sum) through the
//      shared distance epilogue (gram_value / needs_exact with an exact warp recompute /
//      finish: dist_from_dot's rules); optionally (semi hard) also the exact distances from
//      explicit differences by one thread (thread_exact_distance, the very loop the tile
//      epilogue uses for a near tie, so that equal rows give equal values). O(N K D).
//   2. Negatives (fused_rows_kernel): block (anchor tile of Mainloop::kBM rows, candidate
//      split). For each kBN-candidate tile of its split the Mainloop leaves the dot tile in
//      shared memory; thread (row r = tid % kBM, column group cg = tid / kBM) turns its
//      kBN / groups columns of the tile into distances (dist_from_dot), skips the anchor's own
//      class (its positives come from step 1) and hands every negative to the loss's epilogue
//      policy (Epi::visit: the shared per-element logic of csrc/epilogue.h). The column groups
//      of a row then merge in the fixed order cg = 0, 1, ... through shared memory and write
//      one partial result per (split, anchor) to a small workspace; the loss's finalize kernel
//      combines the splits in ascending order. No (rows, N) workspace, no sort, no float
//      atomics: deterministic.
// The split count is a function of the sizes only (fused_tiles_per_split), not of the device,
// so results are bitwise reproducible across devices of the same Mainloop.
#pragma once


#include "loss_common.cuh"
#include "mainloop.cuh"

namespace triplet_cuda {
namespace cuda {

// The fused path serves anchors with at most this many positives (csrc/cpu/fused.h's
// cpu::kFusedMaxPositives; the two backends switch paths at the same size).
constexpr int kFusedMaxPositives = 16;

// The plain mainloop for now (mainloop.cuh); faster ones implement the same concept.
template <typename scalar_t, typename acc_t>
using FusedMainloop = SimtMainloop64<scalar_t, acc_t>;

// Exact distance of rows a and b from explicit differences (Euclidean metrics) or products
// (cosine), by one thread, k ascending: epi::exact_distance's rules. The near-tie comparisons
// of semi hard use it for both distances, so two equal rows give bitwise equal values.
template <Metric M, typename scalar_t, typename acc_t>
__device__ __noinline__ acc_t thread_exact_distance(const scalar_t* __restrict__ a,
                                                    const scalar_t* __restrict__ b, int64_t D,
                                                    acc_t inv_a, acc_t inv_b) {
  acc_t s = 0;
  for (int64_t k = 0; k < D; ++k) {
    const acc_t va = to_acc<acc_t>(a[k]), vb = to_acc<acc_t>(b[k]);
    if constexpr (M == Metric::kCosine) {
      s += va * vb;
    } else {
      const acc_t diff = va - vb;
      s += diff * diff;
    }
  }
  return epi::exact_distance<M>(s, inv_a, inv_b);
}

// The fused path's embeddings: float16 / bfloat16 as a float32 copy, float32 / float64 as
// they are. FusedMainloop stages every element as acc_t (float for the half types) and the
// positives and exact-distance loops convert on load too, so the float32 kernels on the copy
// give a half type's results bit for bit: the fused kernels are instantiated for float and
// double only (half the device code of batch_all.cu and semi_hard.cu, half their compile
// time), at the cost of one (N, D) float32 copy. Gradients are converted back by the caller.
inline at::Tensor fused_embeddings(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) ? x.to(at::kFloat).contiguous() : x;
}

// The fused backward's gradients (in the dtype of fused_embeddings) in the embeddings' dtype:
// the float32 values rounded once, as finish_grad rounds G * grad_loss_sum itself.
inline std::tuple<at::Tensor, at::Tensor> fused_grads_in(at::ScalarType dtype,
                                                         const at::Tensor& gx,
                                                         const at::Tensor& gy) {
  if (gx.scalar_type() == dtype) return {gx, gy};
  return {gx.to(dtype), gy.defined() ? gy.to(dtype) : gy};
}

// Anchors x (N, D) against candidates y (C, D) (y may be x), N, C > 0, C < 2^31.
struct FusedInputs {
  const at::Tensor& x;
  const at::Tensor& y;
  const RowLabels& l;
  cudaStream_t stream;
};

// ------------------------------------------------------------------------ 1. positives

constexpr int kPosWarps = 8;  // anchors per block of positives_kernel
constexpr int kPosThreads = kPosWarps * kWarp;

// One warp per anchor a < N (anchors x against candidates y, labels l; groups: of the
// candidate labels):
//   npos[a] = its positives P, nneg[a] = its negatives Q (candidates of another label);
//   for P <= K = kFusedMaxPositives, k < P in ascending candidate index:
//     pidx[a K + k] = the positive, dap[a K + k] = its distance (dist_from_dot's rules from a
//     warp dot product), and when exact_ap is not null the exact distance
//     (thread_exact_distance); entries k >= P are left alone.
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kPosThreads)
    positives_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx, int64_t N,
                     const scalar_t* __restrict__ y, RowStats<acc_t> sy, RowLabels l, int64_t D,
                     const int64_t* __restrict__ sorted_labels, const int64_t* __restrict__ order,
                     int64_t* __restrict__ npos, int64_t* __restrict__ nneg,
                     int64_t* __restrict__ pidx, acc_t* __restrict__ dap,
                     acc_t* __restrict__ exact_ap) {
  constexpr int K = kFusedMaxPositives;
  const int64_t a = static_cast<int64_t>(blockIdx.x) * kPosWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (a >= N) return;  // the whole warp leaves together
  const AnchorGroup g = anchor_group(l, sorted_labels, a);
  if (lane == 0) {
    npos[a] = g.P;
    nneg[a] = g.Q;
  }
  if (g.P > K) return;  // the host falls back to the sort path; nothing else is read
  const scalar_t* __restrict__ xa = x + a * D;
  const acc_t sq_a = sx.sq[a], inv_a = sx.inv[a];
  int64_t mine = -1;  // lane k < P: the k-th positive (for the exact distances)
  int k = 0;
  for (int64_t t = g.gs; t < g.ge; ++t) {  // warp-uniform
    const int64_t j = order[t];
    if (j == g.self) continue;
    const scalar_t* __restrict__ yj = y + j * D;
    acc_t dot = 0;
    for (int64_t c = lane; c < D; c += kWarp) dot += to_acc<acc_t>(xa[c]) * to_acc<acc_t>(yj[c]);
    dot = warp_sum(dot);
    const acc_t sq_j = sy.sq[j], inv_j = sy.inv[j];
    acc_t v = epi::gram_value<M>(dot, sq_a, inv_a, sq_j, inv_j);
    if (epi::needs_exact<M>(v, sq_a, sq_j)) {  // as dist_from_dot, summed by the warp
      acc_t s = 0;
      for (int64_t c = lane; c < D; c += kWarp) {
        const acc_t diff = to_acc<acc_t>(xa[c]) - to_acc<acc_t>(yj[c]);
        s += diff * diff;
      }
      s = warp_sum(s);
      v = epi::is_finite(s) ? s : epi::quiet_nan<acc_t>();
    }
    if (lane == 0) {
      pidx[a * K + k] = j;
      dap[a * K + k] = epi::finish<M>(v);
    }
    if (lane == k) mine = j;
    ++k;
  }
  if (exact_ap != nullptr && lane < k) {
    exact_ap[a * K + lane] = thread_exact_distance<M>(xa, y + mine * D, D, inv_a, sy.inv[mine]);
  }
}

// Step 1's results (device tensors) and the path decision.
struct FewPositives {
  at::Tensor npos, nneg;  // (N) int64
  at::Tensor pidx;        // (N, K) int64
  at::Tensor dap;         // (N, K) acc_t
  at::Tensor exact_ap;    // (N, K) acc_t, or undefined
  bool fits = false;      // every anchor has at most K positives: the fused path applies
  bool any_valid = false; // some anchor has a positive and a negative (else the loss is the
                          // constant 0 and its gradient exactly 0, whatever the inputs hold)
  int W = 0;              // lanes per anchor, 4, 8 or 16: the fewest that hold every anchor's
};

// Runs step 1 and decides the path: one device-to-host copy of the largest positive count
// (it picks the path and the lane width) and of whether any anchor is valid. N > 0.
template <typename scalar_t, typename acc_t, Metric M>
FewPositives collect_positives(const at::Tensor& x, RowStats<acc_t> sx, const at::Tensor& y,
                               RowStats<acc_t> sy, const RowLabels& l, const LabelGroups& groups,
                               bool exact, cudaStream_t stream) {
  constexpr int K = kFusedMaxPositives;
  const int64_t N = x.size(0), D = x.size(1);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto idx_options = x.options().dtype(at::kLong);
  FewPositives f;
  f.npos = empty({N}, idx_options);
  f.nneg = empty({N}, idx_options);
  f.pidx = full({N, K}, -1, idx_options);
  f.dap = zeros({N, K}, acc_options);
  if (exact) f.exact_ap = zeros({N, K}, acc_options);
  positives_kernel<scalar_t, acc_t, M>
      <<<grid_1d(ceil_div(N, kPosWarps)), kPosThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), sx, N, y.data_ptr<scalar_t>(), sy, l, D,
          groups.sorted.data_ptr<int64_t>(), groups.order.data_ptr<int64_t>(),
          f.npos.data_ptr<int64_t>(), f.nneg.data_ptr<int64_t>(), f.pidx.data_ptr<int64_t>(),
          f.dap.data_ptr<acc_t>(), exact ? f.exact_ap.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor summary =
      stack({f.npos.max(), f.npos.mul(f.nneg).max()}).cpu();  // synchronises
  const int64_t most = summary[0].item<int64_t>();
  f.any_valid = summary[1].item<int64_t>() > 0;
  f.fits = most <= K;
  f.W = most <= 4 ? 4 : most <= 8 ? 8 : 16;
  return f;
}

// Calls fn(std::integral_constant<int, W>) for the lane width W of f (4, 8 or 16).
template <typename Fn>
void dispatch_lanes(int W, Fn&& fn) {
  if (W == 4) {
    fn(std::integral_constant<int, 4>{});
  } else if (W == 8) {
    fn(std::integral_constant<int, 8>{});
  } else {
    fn(std::integral_constant<int, 16>{});
  }
}

// ------------------------------------------------------------------------ 2. negatives

// Candidate tiles per split: about kFusedTargetBlocks blocks in all, whatever the device (the
// split count is part of the summation order), at most 65535 splits (gridDim.y).
constexpr int64_t kFusedTargetBlocks = 512;

inline int64_t fused_tiles_per_split(int64_t tilesA, int64_t tilesC) {
  int64_t t = ceil_div(tilesA * tilesC, kFusedTargetBlocks);
  t = std::max<int64_t>(t, ceil_div(tilesC, 65535));
  return std::max<int64_t>(1, std::min<int64_t>(t, tilesC));
}

// An epilogue policy Epi of fused_rows_kernel provides
//   using acc_t; struct Params;          // its inputs and workspace pointers
//   struct Row;                          // per-anchor constants (positive distances, ...)
//   struct Acc;                          // per-thread running state (in registers)
//   struct Slot;                         // Acc as a trivial type, for the shared-memory merge
//   static void load_row(const Params&, int64_t a, Row&);
//   static void init(Acc&);
//   static void visit(Acc&, const Row&, acc_t d_an, int64_t n, Exact&& exact_an);
//       // one negative n of the anchor at distance d_an; exact_an() its exact distance
//   static void save(const Acc&, Slot&);  static void merge(Acc&, const Slot&);
//   static void store(const Params&, int64_t split, int64_t N, int64_t a, const Acc&);
//
// grid = (anchor tiles, splits); split s scans candidate tiles
// [s * tiles_per_split, min((s + 1) * tiles_per_split, tilesC)). Every thread calls
// Mainloop::run the same number of times (the loop bounds are the block's) and the merge's
// barriers are outside any divergent branch.
template <typename Mainloop, Metric M, typename Epi>
__global__ void __launch_bounds__(Mainloop::kThreads)
    fused_rows_kernel(const typename Mainloop::scalar_t* __restrict__ x,
                      RowStats<typename Mainloop::acc_t> sx, int64_t N,
                      const typename Mainloop::scalar_t* __restrict__ y,
                      RowStats<typename Mainloop::acc_t> sy, RowLabels l, int64_t D,
                      int64_t tiles_per_split, typename Epi::Params p) {
  using scalar_t = typename Mainloop::scalar_t;
  using acc_t = typename Mainloop::acc_t;
  static_assert(std::is_same<acc_t, typename Epi::acc_t>::value, "Epi::acc_t");
  constexpr int kBM = Mainloop::kBM, kBN = Mainloop::kBN, kThreads = Mainloop::kThreads;
  static_assert(kThreads % kBM == 0, "whole column groups per row");
  constexpr int kGroups = kThreads / kBM;
  static_assert(kBN % kGroups == 0, "equal column groups");
  constexpr int kCols = kBN / kGroups;
  using Shared = typename Mainloop::Shared;
  using Slot = typename Epi::Slot;
  constexpr size_t kSmem =
      sizeof(Shared) > sizeof(Slot) * kBM ? sizeof(Shared) : sizeof(Slot) * kBM;
  __shared__ __align__(16) unsigned char smem[kSmem];
  Shared& ms = *reinterpret_cast<Shared*>(smem);
  Slot* slots = reinterpret_cast<Slot*>(smem);  // after the last tile: the merge buffer

  const int r = threadIdx.x % kBM;   // conflict-free tile reads: a warp spans 32 rows
  const int cg = threadIdx.x / kBM;  // of one column
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t a = a0 + r;
  const bool live = a < N;
  const int64_t C = l.cols;
  const int64_t tilesC = ceil_div(C, kBN);
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < tilesC ? t_begin + tiles_per_split : tilesC;

  typename Epi::Row row;
  int64_t la = 0;
  acc_t sq_a = 0, inv_a = 0;
  if (live) {
    Epi::load_row(p, a, row);
    la = l.anchor[a];
    sq_a = sx.sq[a];
    inv_a = sx.inv[a];
  }
  const scalar_t* __restrict__ xa = x + (live ? a : 0) * D;
  typename Epi::Acc acc;
  Epi::init(acc);

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b0 = t * kBN;
    Mainloop::run(x, N, a0, y, C, b0, D, ms);  // all threads; syncs on entry and exit
    if (live) {
      for (int m = 0; m < kCols; ++m) {
        const int c = cg * kCols + m;
        const int64_t n = b0 + c;
        if (n >= C) break;
        if (l.cand[n] == la) continue;  // the anchor's own class: not a negative
        const scalar_t* __restrict__ yn = y + n * D;
        const acc_t inv_n = sy.inv[n];
        const acc_t d = dist_from_dot<M>(ms.dot(r, c), sq_a, inv_a, sy.sq[n], inv_n, xa, yn, D);
        Epi::visit(acc, row, d, n,
                   [&]() { return thread_exact_distance<M>(xa, yn, D, inv_a, inv_n); });
      }
    }
  }
  // Column groups of a row merge in the order 0, 1, ..., kGroups - 1 (deterministic).
#pragma unroll 1
  for (int g = 1; g < kGroups; ++g) {
    __syncthreads();  // the tile (aliased by the slots) or the previous round is read
    if (cg == g) Epi::save(acc, slots[r]);
    __syncthreads();
    if (cg == 0) Epi::merge(acc, slots[r]);
  }
  if (cg == 0 && live) Epi::store(p, blockIdx.y, N, a, acc);
}

// The launch of step 2 over anchors x (N rows) and candidates y (l.cols rows); returns the
// split count (the workspace's first dimension). Launch with splits() first to size it.
struct FusedGrid {
  int64_t tilesA, tilesC, tiles_per_split, splits;
};

template <typename Mainloop>
FusedGrid fused_grid(int64_t N, int64_t C) {
  FusedGrid g;
  g.tilesA = ceil_div(N, Mainloop::kBM);
  g.tilesC = ceil_div(C, Mainloop::kBN);
  g.tiles_per_split = fused_tiles_per_split(g.tilesA, g.tilesC);
  g.splits = ceil_div(g.tilesC, g.tiles_per_split);
  return g;
}

template <typename Mainloop, Metric M, typename Epi>
void launch_fused_rows(const FusedGrid& g, const typename Mainloop::scalar_t* x,
                       RowStats<typename Mainloop::acc_t> sx, int64_t N,
                       const typename Mainloop::scalar_t* y,
                       RowStats<typename Mainloop::acc_t> sy, const RowLabels& l, int64_t D,
                       const typename Epi::Params& p, cudaStream_t stream) {
  if (N == 0 || l.cols == 0) return;
  TORCH_CHECK(g.tilesA <= kMaxGridX && g.splits <= 65535,
              "triplet_cuda: fused grid out of range (", g.tilesA, " x ", g.splits, ")");
  const dim3 grid(static_cast<unsigned int>(g.tilesA), static_cast<unsigned int>(g.splits));
  fused_rows_kernel<Mainloop, M, Epi><<<grid, Mainloop::kThreads, 0, stream>>>(
      x, sx, N, y, sy, l, D, g.tiles_per_split, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows per chunk of the backward's weight matrix (bytes_per_elem per (row, candidate)): as
// chunk_rows, rounded down to a multiple of kBM (at least kBM, at most 65535 anchor tiles), so
// that the chunk's anchor tiles are the forward's (equal tile coordinates: equal dot products).
template <typename Mainloop>
int64_t fused_chunk_rows(int64_t N, int64_t C, int64_t bytes_per_elem) {
  const int64_t R = chunk_rows(N, C, bytes_per_elem);
  const int64_t all = ceil_div(N, Mainloop::kBM) * Mainloop::kBM;
  const int64_t most = 65535 * static_cast<int64_t>(Mainloop::kBM);  // gridDim.y of the weights
  return std::min({all, most,
                   std::max<int64_t>(Mainloop::kBM, R / Mainloop::kBM * Mainloop::kBM)});
}

}  // namespace cuda
}  // namespace triplet_cuda
