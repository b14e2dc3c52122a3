// Batch-hard mining on CUDA, of the batch against itself (batch_hard_mine) or of anchors
// against a reference set (batch_hard_mine_ref): the same kernels over RowLabels
// (row_labels.cuh), the candidates being the batch or the reference set.
//
// Forward, fused (never N x N, never N x M), on the TileMainloop (distance.cuh: a Mainloop
// of mainloop.cuh's concept leaves a kB x kB tile of dot products in shared memory):
//   1. The tile epilogue (fold_line) turns the dots of one anchor's tile line into distances
//      (warp_tile_distance: the shared epilogue, near-zero pairs recomputed one warp per pair)
//      and folds them into the anchor's running bests (epi::ArgFarthest / ArgNearest). Each
//      line is scanned by kParts threads (one part of the candidates each, a warp = 32
//      consecutive lines, so the shared reads are conflict-free), and the parts are combined
//      in the fixed order 0, 1, ... (combine_parts).
//   2a. Reference set (hard_mine_partial_kernel): block (anchor tile, candidate split); the
//       split's candidate tiles stream through the block, the anchors' bests stay in
//       registers; one result per (split, anchor) in a small workspace.
//   2b. The batch itself (hard_mine_sym_kernel): d(i, j) = d(j, i), so only the tiles
//       (ta, tb) with tb >= ta are computed; such a tile folds its rows (anchors of ta, the
//       candidates of tb) and, off the diagonal, its columns (anchors of tb, candidates of ta).
//       Every (tile, line) partial goes to a bounded workspace, processed in groups of tile
//       columns, and hard_sym_merge_kernel folds them per anchor in a fixed order.
//   3. hard_mine_finalize_kernel: one warp per anchor combines the splits, decides
//      validity and recomputes the two selected distances exactly (explicit differences).
// The "best" relations are the shared epilogue's total orders on (distance, index)
// (epi::farther / epi::nearer in csrc/epilogue.h, the CPU's): a NaN distance ranks hardest,
// then the better distance, then the lowest index. So the result does not depend on the
// order of the reductions (tiles, splits, parts, upper-triangle halves): deterministic, the
// same for both forward schemes and the same as the CPU. (A tile's distance of a pair is the
// same bits from either side: the dot's FFMAs commute, gram_value takes the anchor first in
// both passes as the full square would, and the exact recompute squares differences.)
//
// The backward (batch_hard_mine_backward / _ref_backward) is in batch_hard_backward.cu, its
// own translation unit so that the two compile in parallel.

#include "ops_cuda.h"
#include "distance.cuh"
#include "internal.cuh"
#include "row_labels.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// Per-line statistics of a tile's rows or columns staged in shared memory: label, squared
// norm, cosine inverse norm of rows base + [0, kN) (0 beyond the matrix: never used, since
// those lines are inactive, but never uninitialised either).
template <typename acc_t, int kN>
struct LineInfo {
  int64_t lab[kN];
  acc_t sq[kN];
  acc_t inv[kN];
  // Threads tid < kN fill line tid.
  __device__ __forceinline__ void fill(const int64_t* __restrict__ labels, RowStats<acc_t> st,
                                       int64_t base, int64_t n) {
    const int t = threadIdx.x;
    if (t < kN) {
      const int64_t g = base + t;
      const bool in = g < n;
      lab[t] = in ? labels[g] : 0;
      sq[t] = in ? st.sq[g] : acc_t(0);
      inv[t] = in ? st.inv[g] : acc_t(0);
    }
  }
};

// The epilogue's thread layout over a square kB x kB tile of ML (kThreads threads): thread tid
// takes tile line tid % kB (an anchor) and part tid / kB of that line's candidates, lines
// [part * kLen, part * kLen + kLen). A warp is 32 consecutive lines of one part.
template <class ML>
struct HardLayout {
  static constexpr int kB = ML::kBM;
  static constexpr int kParts = ML::kThreads / kB;
  static constexpr int kLen = kB / kParts;
  static_assert(ML::kBM == ML::kBN, "square tiles (the symmetric kernel swaps rows and columns)");
  static_assert(kParts * kB == ML::kThreads && kParts >= 2, "whole parts per line");
  static_assert(kB % kWarp == 0, "a warp's 32 lines share one part");
  static_assert(kLen * kParts == kB, "the parts cover the line");
};

// Partial bests of parts 1 .. kParts - 1 of every line, for combine_parts.
template <typename acc_t, int kB, int kParts>
struct PartBests {
  acc_t pd[kParts - 1][kB];
  int64_t pi[kParts - 1][kB];
  acc_t nd[kParts - 1][kB];
  int64_t ni[kParts - 1][kB];
};

// Dynamic shared memory of the batch-hard forward kernels.
template <class ML>
struct HardSmem {
  using acc_t = typename ML::acc_t;
  using L = HardLayout<ML>;
  typename ML::Shared ml;                     // the mainloop's staging and dot tile
  LineInfo<acc_t, L::kB> rows;                // the tile's anchor rows (symmetric kernel)
  LineInfo<acc_t, L::kB> cols[2];             // candidate columns, by tile parity
  PartBests<acc_t, L::kB, L::kParts> parts;   // combine_parts
};

// Folds the candidates of one tile line into the running bests of its anchor. kRowLine: the
// anchor is tile row `own` (dot(own, o)), the candidates tile columns; else the anchor is
// tile column `own` (dot(o, own)), the candidates tile rows. The candidates are tile lines
// o = begin + [0, kLen) with global index cand0 + o in Y (n_cand rows, statistics in `cand`);
// the anchor is row anchor_g of X (anchor_ok false: a line past the matrix, nothing folded).
// All 32 lanes of a warp call it together with the same begin (warp_tile_distance's ballot).
template <Metric M, bool kRowLine, int kLen, class ML, int kN>
__device__ __forceinline__ void fold_line(
    const typename ML::Shared& s, int own, int begin, bool anchor_ok, int64_t anchor_g,
    int64_t lab_a, int64_t self_a, typename ML::acc_t sq_a, typename ML::acc_t inv_a,
    const typename ML::scalar_t* __restrict__ X, const LineInfo<typename ML::acc_t, kN>& cand,
    int64_t cand0, int64_t n_cand, const typename ML::scalar_t* __restrict__ Y, int64_t D,
    epi::ArgFarthest<typename ML::acc_t>& pos, epi::ArgNearest<typename ML::acc_t>& neg) {
  using acc_t = typename ML::acc_t;
#pragma unroll 4
  for (int k = 0; k < kLen; ++k) {
    const int o = begin + k;
    const int64_t g = cand0 + o;
    const bool same = cand.lab[o] == lab_a;
    // the anchor itself is no candidate (RowLabels' self rule)
    const bool active = anchor_ok && g < n_cand && !(same && g == self_a);
    const acc_t dot = kRowLine ? s.dot(own, o) : s.dot(o, own);
    const acc_t d = warp_tile_distance<M>(active, dot, X, anchor_g, sq_a, inv_a, Y, g,
                                          cand.sq[o], cand.inv[o], D);
    if (active) {
      pos.update(d, same ? g : -1);
      neg.update(d, same ? -1 : g);
    }
  }
}

// Combines the kParts partial bests of every line into part 0's threads, in the part order
// 1, 2, ... (the relations are total orders, so any order gives the same; this one is fixed).
// Every thread of the block must call it (a barrier). The caller separates consecutive calls
// by a barrier (part 0 reads `bests` after this one's barrier; the next call writes them).
template <class ML>
__device__ __forceinline__ void combine_parts(
    PartBests<typename ML::acc_t, HardLayout<ML>::kB, HardLayout<ML>::kParts>& bests, int line,
    int part, epi::ArgFarthest<typename ML::acc_t>& pos,
    epi::ArgNearest<typename ML::acc_t>& neg) {
  using L = HardLayout<ML>;
  if (part > 0) {
    bests.pd[part - 1][line] = pos.d;
    bests.pi[part - 1][line] = pos.i;
    bests.nd[part - 1][line] = neg.d;
    bests.ni[part - 1][line] = neg.i;
  }
  __syncthreads();
  if (part == 0) {
#pragma unroll
    for (int q = 0; q < L::kParts - 1; ++q) {
      pos.update(bests.pd[q][line], bests.pi[q][line]);
      neg.update(bests.nd[q][line], bests.ni[q][line]);
    }
  }
}

// Reference set (or any non-symmetric use). grid = (anchor tiles, splits); split s scans
// candidate tiles [s * tiles_per_split, min((s + 1) * tiles_per_split, tilesC)). Anchors: the
// N rows of x; candidates: the l.cols rows of y. A candidate of the anchor's label is a
// positive unless it is the anchor's self index; any other label, a negative.
// Writes part_*[s * N + a] for every anchor a of the tile (idx -1 when none found).
template <class ML, Metric M>
__global__ void __launch_bounds__(ML::kThreads, ML::kMinBlocks)
    hard_mine_partial_kernel(const typename ML::scalar_t* __restrict__ x,
                             RowStats<typename ML::acc_t> sx, int64_t N,
                             const typename ML::scalar_t* __restrict__ y,
                             RowStats<typename ML::acc_t> sy, RowLabels l, int64_t D,
                             int64_t tiles_per_split, typename ML::acc_t* __restrict__ part_pd,
                             int64_t* __restrict__ part_pi,
                             typename ML::acc_t* __restrict__ part_nd,
                             int64_t* __restrict__ part_ni) {
  using acc_t = typename ML::acc_t;
  using L = HardLayout<ML>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s = *reinterpret_cast<HardSmem<ML>*>(smem_raw);
  const int line = threadIdx.x % L::kB, part = threadIdx.x / L::kB;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * L::kB;
  const int64_t split = blockIdx.y;
  const int64_t C = l.cols;
  const int64_t tilesC = ceil_div(C, L::kB);
  const int64_t t_begin = split * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < tilesC ? t_begin + tiles_per_split : tilesC;

  const int64_t a = a0 + line;
  const bool a_ok = a < N;
  const int64_t lab_a = a_ok ? l.anchor[a] : 0;
  const int64_t self_a = a_ok ? l.self_of(a) : -1;
  const acc_t sq_a = a_ok ? sx.sq[a] : acc_t(0), inv_a = a_ok ? sx.inv[a] : acc_t(0);
  epi::ArgFarthest<acc_t> pos;  // index -1: none yet
  epi::ArgNearest<acc_t> neg;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b0 = t * L::kB;
    // cols[t & 1] was last read by tile t - 2's epilogue, which every thread finished before
    // the first barrier of tile t - 1's run(); run() below orders these writes before the reads.
    LineInfo<acc_t, L::kB>& cols = s.cols[t & 1];
    cols.fill(l.cand, sy, b0, C);
    ML::run(x, N, a0, y, C, b0, D, s.ml);
    fold_line<M, true, L::kLen, ML>(s.ml, line, part * L::kLen, a_ok, a, lab_a, self_a, sq_a,
                                    inv_a, x, cols, b0, C, y, D, pos, neg);
  }
  combine_parts<ML>(s.parts, line, part, pos, neg);
  if (part == 0 && a_ok) {
    part_pd[split * N + a] = pos.d;
    part_pi[split * N + a] = pos.i;
    part_nd[split * N + a] = neg.d;
    part_ni[split * N + a] = neg.i;
  }
}

// Per-(tile, line) partial bests of the symmetric kernel for one group of tile columns
// [g0, g1): tile (ta, tb) (ta <= tb, g0 <= tb < g1) has slot (tb - g0) * T + ta; entry
// slot * kB + q. rows: line q = anchor ta * kB + q against the candidates of tile tb;
// cols (ta < tb only): line q = anchor tb * kB + q against the candidates of tile ta.
// Indices int32 (N <= INT32_MAX is checked), -1: none.
template <typename acc_t>
struct SymPartials {
  acc_t* pd;
  int32_t* pi;
  acc_t* nd;
  int32_t* ni;
};

// The batch against itself, upper-triangle tiles. grid = (g1, g1 - g0): block (ta, tb - g0),
// blocks with ta > tb leave at once. x: (N, D), l: batch_row_labels (cand == anchor,
// self_of(a) == a).
template <class ML, Metric M>
__global__ void __launch_bounds__(ML::kThreads, ML::kMinBlocks)
    hard_mine_sym_kernel(const typename ML::scalar_t* __restrict__ x,
                         RowStats<typename ML::acc_t> sx, int64_t N, RowLabels l, int64_t D,
                         int64_t T, int64_t g0, SymPartials<typename ML::acc_t> rows_out,
                         SymPartials<typename ML::acc_t> cols_out) {
  using acc_t = typename ML::acc_t;
  using L = HardLayout<ML>;
  const int64_t ta = blockIdx.x;
  const int64_t tb = g0 + blockIdx.y;
  if (ta > tb || tb >= T) return;  // the whole block, before any barrier
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s = *reinterpret_cast<HardSmem<ML>*>(smem_raw);
  const int line = threadIdx.x % L::kB, part = threadIdx.x / L::kB;
  const int64_t a0 = ta * L::kB, b0 = tb * L::kB;
  const int64_t slot = (tb - g0) * T + ta;
  // First use of rows / cols in this block; run()'s barriers order them before the reads.
  s.rows.fill(l.anchor, sx, a0, N);
  s.cols[0].fill(l.cand, sx, b0, N);
  ML::run(x, N, a0, x, N, b0, D, s.ml);

  {  // rows: anchor a0 + line against the columns (all of them on the diagonal tile)
    const int64_t a = a0 + line;
    const bool a_ok = a < N;
    epi::ArgFarthest<acc_t> pos;
    epi::ArgNearest<acc_t> neg;
    fold_line<M, true, L::kLen, ML>(s.ml, line, part * L::kLen, a_ok, a, s.rows.lab[line],
                                    a_ok ? l.self_of(a) : -1, s.rows.sq[line],
                                    s.rows.inv[line], x, s.cols[0], b0, N, x, D, pos, neg);
    combine_parts<ML>(s.parts, line, part, pos, neg);
    if (part == 0) {
      const int64_t e = slot * L::kB + line;
      rows_out.pd[e] = pos.d;
      rows_out.pi[e] = static_cast<int32_t>(pos.i);
      rows_out.nd[e] = neg.d;
      rows_out.ni[e] = static_cast<int32_t>(neg.i);
    }
  }
  if (ta < tb) {  // uniform over the block. Columns: anchor b0 + line against the rows.
    __syncthreads();  // part 0 is done reading s.parts (the rows' combine)
    const int64_t a = b0 + line;
    const bool a_ok = a < N;
    epi::ArgFarthest<acc_t> pos;
    epi::ArgNearest<acc_t> neg;
    fold_line<M, false, L::kLen, ML>(s.ml, line, part * L::kLen, a_ok, a, s.cols[0].lab[line],
                                     a_ok ? l.self_of(a) : -1, s.cols[0].sq[line],
                                     s.cols[0].inv[line], x, s.rows, a0, N, x, D, pos, neg);
    combine_parts<ML>(s.parts, line, part, pos, neg);
    if (part == 0) {
      const int64_t e = slot * L::kB + line;
      cols_out.pd[e] = pos.d;
      cols_out.pi[e] = static_cast<int32_t>(pos.i);
      cols_out.nd[e] = neg.d;
      cols_out.ni[e] = static_cast<int32_t>(neg.i);
    }
  }
}

// Folds the group [g0, g1)'s partials into the running bests best_*[a] (one thread per
// anchor a < N), in a fixed order: the row partials of tiles (A, tb), tb ascending, then the
// column partials of tiles (ta, A), ta ascending (A = a / kB). Over all groups in ascending
// order every anchor sees each of the T tiles of its candidates exactly once.
template <typename acc_t, int kB>
__global__ void hard_sym_merge_kernel(int64_t N, int64_t T, int64_t g0, int64_t g1,
                                      SymPartials<acc_t> rows_in, SymPartials<acc_t> cols_in,
                                      acc_t* __restrict__ best_pd, int64_t* __restrict__ best_pi,
                                      acc_t* __restrict__ best_nd,
                                      int64_t* __restrict__ best_ni) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= N) return;
  const int64_t A = a / kB, q = a % kB;
  epi::ArgFarthest<acc_t> pos;
  epi::ArgNearest<acc_t> neg;
  pos.d = best_pd[a];
  pos.i = best_pi[a];
  neg.d = best_nd[a];
  neg.i = best_ni[a];
  for (int64_t tb = A > g0 ? A : g0; tb < g1; ++tb) {  // tiles (A, tb), tb >= A
    const int64_t e = ((tb - g0) * T + A) * kB + q;
    pos.update(rows_in.pd[e], rows_in.pi[e]);
    neg.update(rows_in.nd[e], rows_in.ni[e]);
  }
  if (A >= g0 && A < g1) {
    for (int64_t ta = 0; ta < A; ++ta) {  // tiles (ta, A), ta < A
      const int64_t e = ((A - g0) * T + ta) * kB + q;
      pos.update(cols_in.pd[e], cols_in.pi[e]);
      neg.update(cols_in.nd[e], cols_in.ni[e]);
    }
  }
  best_pd[a] = pos.d;
  best_pi[a] = pos.i;
  best_nd[a] = neg.d;
  best_ni[a] = neg.i;
}

// Bound of the symmetric kernel's partial workspace (rows + columns of one group of tile
// columns). An entry is 2 acc_t + 2 int32 (16 B float32, 24 B float64); a group of G tile
// columns takes 2 G T kB entries (T = ceil(N / kB)), so G = budget / (2 T kB entry), at least
// 1: N = 8192 float32 is one group (2 MiB), N = 65536 float32 groups of 8 columns (16 MiB).
// Beyond it only the running bests (N x 24 B) and the finalize's outputs.
constexpr int64_t kSymWorkspaceBytes = int64_t(16) << 20;

// One warp per anchor: combine the splits, then the exact distances of the selection
// (anchor row of x, candidate row of y).
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hard_mine_finalize_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx, int64_t N,
                              const scalar_t* __restrict__ y, RowStats<acc_t> sy,
                              int64_t D, int64_t splits, const acc_t* __restrict__ part_pd,
                              const int64_t* __restrict__ part_pi,
                              const acc_t* __restrict__ part_nd,
                              const int64_t* __restrict__ part_ni, scalar_t* __restrict__ pos_dist,
                              int64_t* __restrict__ pos_idx, scalar_t* __restrict__ neg_dist,
                              int64_t* __restrict__ neg_idx) {
  const int64_t a =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (a >= N) return;  // the whole warp leaves together
  epi::ArgFarthest<acc_t> pos;
  epi::ArgNearest<acc_t> neg;
  for (int64_t s = 0; s < splits; ++s) {  // every lane does the same (tiny) loop
    pos.update(part_pd[s * N + a], part_pi[s * N + a]);
    neg.update(part_nd[s * N + a], part_ni[s * N + a]);
  }
  const int64_t pi = pos.i, ni = neg.i;
  if (pi < 0 || ni < 0) {  // no positive or no negative: invalid anchor
    if (lane == 0) {
      pos_dist[a] = static_cast<scalar_t>(acc_t(0));
      neg_dist[a] = static_cast<scalar_t>(acc_t(0));
      pos_idx[a] = -1;
      neg_idx[a] = -1;
    }
    return;
  }
  const scalar_t* xa = x + a * D;
  const acc_t dp = warp_pair_distance<M>(xa, y + pi * D, D, sx.inv[a], sy.inv[pi]);
  const acc_t dn = warp_pair_distance<M>(xa, y + ni * D, D, sx.inv[a], sy.inv[ni]);
  if (lane == 0) {
    pos_dist[a] = static_cast<scalar_t>(dp);
    neg_dist[a] = static_cast<scalar_t>(dn);
    pos_idx[a] = pi;
    neg_idx[a] = ni;
  }
}

}  // namespace

HardMinedCuda batch_hard_mine_impl(const MineArgs& in, int64_t metric) {
  const at::Tensor& x = in.x;
  const at::Tensor& y = in.symmetric() ? in.x : in.y;
  const RowLabels l = in.symmetric() ? batch_row_labels(in.lab)
                                     : ref_row_labels(in.lab, in.ref_lab, in.self);
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  const auto idx_options = x.options().dtype(at::kLong);
  if (N == 0 || C == 0) {  // no candidates: every anchor invalid
    return {zeros({N}, x.options()), full({N}, -1, idx_options),
            zeros({N}, x.options()), full({N}, -1, idx_options)};
  }
  HardMinedCuda r{empty({N}, x.options()), empty({N}, idx_options),
                  empty({N}, x.options()), empty({N}, idx_options)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_hard_mine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using ML = TileMainloop<scalar_t>;
    using Lay = HardLayout<ML>;
    constexpr int kB = Lay::kB;
    static_assert(std::is_same<typename ML::acc_t, acc_t>::value, "the mainloop's acc_t");
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y =
        in.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const size_t smem = sizeof(HardSmem<ML>);
    const int64_t tilesA = ceil_div(N, kB), tilesC = ceil_div(C, kB);
    TORCH_CHECK(tilesA <= kMaxGridX, "triplet_cuda: too many embeddings (", N, ")");
    // The per-anchor results of the tile kernels: (splits, N) for the reference set, the
    // running bests (1, N) for the batch itself; the finalize kernel reads either.
    at::Tensor part_pd, part_nd, part_pi, part_ni;
    int64_t splits = 1;
    const bool sym = in.symmetric() && N <= std::numeric_limits<int32_t>::max();
    TC_METRIC_SWITCH(metric, kM, [&] {
      if (sym) {
        const int64_t T = tilesA;
        constexpr int64_t kEntry = 2 * sizeof(acc_t) + 2 * sizeof(int32_t);
        const int64_t per_group = 2 * T * kB * kEntry;  // bytes per tile column in a group
        const int64_t G = std::max<int64_t>(
            1, std::min<int64_t>({kSymWorkspaceBytes / per_group, T, int64_t(65535)}));
        const auto i32 = x.options().dtype(at::kInt);
        at::Tensor rpd = empty({G * T * kB}, acc_options), rnd = empty_like(rpd);
        at::Tensor cpd = empty_like(rpd), cnd = empty_like(rpd);
        at::Tensor rpi = empty({G * T * kB}, i32), rni = empty_like(rpi);
        at::Tensor cpi = empty_like(rpi), cni = empty_like(rpi);
        const SymPartials<acc_t> rows_p{rpd.data_ptr<acc_t>(), rpi.data_ptr<int32_t>(),
                                        rnd.data_ptr<acc_t>(), rni.data_ptr<int32_t>()};
        const SymPartials<acc_t> cols_p{cpd.data_ptr<acc_t>(), cpi.data_ptr<int32_t>(),
                                        cnd.data_ptr<acc_t>(), cni.data_ptr<int32_t>()};
        part_pd = zeros({1, N}, acc_options);
        part_nd = zeros({1, N}, acc_options);
        part_pi = full({1, N}, -1, idx_options);
        part_ni = full({1, N}, -1, idx_options);
        auto kernel = hard_mine_sym_kernel<ML, kM>;
        set_dynamic_smem(kernel, smem);
        for (int64_t g0 = 0; g0 < T; g0 += G) {  // groups in order (the merge order)
          const int64_t g1 = std::min(T, g0 + G);
          const dim3 grid(static_cast<unsigned int>(g1), static_cast<unsigned int>(g1 - g0));
          kernel<<<grid, ML::kThreads, smem, stream>>>(x.data_ptr<scalar_t>(), sx, N, l, D, T,
                                                       g0, rows_p, cols_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          hard_sym_merge_kernel<acc_t, kB>
              <<<grid_1d(ceil_div(N, kElementwiseThreads)), kElementwiseThreads, 0, stream>>>(
                  N, T, g0, g1, rows_p, cols_p, part_pd.data_ptr<acc_t>(),
                  part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
                  part_ni.data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else {
        // Split the candidates so that about kMinBlocks blocks per SM exist when N is small.
        splits = ceil_div(int64_t(ML::kMinBlocks) * sm_count(), tilesA);
        splits = std::max<int64_t>(1, std::min({splits, tilesC, int64_t(65535)}));
        const int64_t tiles_per_split = ceil_div(tilesC, splits);
        splits = ceil_div(tilesC, tiles_per_split);
        part_pd = empty({splits, N}, acc_options);
        part_nd = empty({splits, N}, acc_options);
        part_pi = empty({splits, N}, idx_options);
        part_ni = empty({splits, N}, idx_options);
        const dim3 grid(static_cast<unsigned int>(tilesA), static_cast<unsigned int>(splits));
        auto kernel = hard_mine_partial_kernel<ML, kM>;
        set_dynamic_smem(kernel, smem);
        kernel<<<grid, ML::kThreads, smem, stream>>>(
            x.data_ptr<scalar_t>(), sx, N, y.data_ptr<scalar_t>(), sy, l, D, tiles_per_split,
            part_pd.data_ptr<acc_t>(), part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
            part_ni.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      hard_mine_finalize_kernel<scalar_t, acc_t, kM>
          <<<grid_1d(ceil_div(N, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), sx, N, y.data_ptr<scalar_t>(), sy, D, splits,
              part_pd.data_ptr<acc_t>(), part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
              part_ni.data_ptr<int64_t>(), r.pos_dist.data_ptr<scalar_t>(),
              r.pos_idx.data_ptr<int64_t>(), r.neg_dist.data_ptr<scalar_t>(),
              r.neg_idx.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return r;
}

// embeddings: (N, D), labels: (N,) any integer dtype
//   -> (pos_dist (N), pos_idx (N) int64, neg_dist (N), neg_idx (N) int64); distances in
//      the dtype of embeddings, -1 / 0 for anchors without a positive or a negative.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  MineArgs in;
  in.x = embeddings.contiguous();
  in.lab = lab;
  const HardMinedCuda r = batch_hard_mine_impl(in, metric);
  return {r.pos_dist, r.pos_idx, r.neg_dist, r.neg_idx};
}

// Query vs reference: embeddings (N, D), labels (N,) anchors; ref (M, D), ref_labels (M,)
// candidates; self_index (N,) int64 -> as batch_hard_mine_cuda, indices into ref. The values
// of self_index are range-checked by check_ref_args (one reduction and a sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_ref_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const auto [ref_lab, self] = check_ref_args(embeddings, ref, ref_labels, self_index);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  MineArgs in{embeddings.contiguous(), lab, ref.contiguous(), ref_lab, self};
  const HardMinedCuda r = batch_hard_mine_impl(in, metric);
  return {r.pos_dist, r.pos_idx, r.neg_dist, r.neg_idx};
}

}  // namespace cuda
}  // namespace triplet_cuda
