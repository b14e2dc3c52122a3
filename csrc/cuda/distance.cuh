// Distance building blocks of the CUDA kernels:
//   * per-row statistics (squared norm, cosine inverse norm, cosine gradient scale),
//   * a 64 x 64 dot-product tile accumulated over D through shared memory (FFMA, acc_t),
//     tile_dots (the original register-tile loop; the fused kernels now use a Mainloop),
//   * the metric epilogue d = f(<a,b>, |a|^2, |b|^2) and exact pair distances, by one warp
//     per pair (warp_pair_distance) and for a whole warp of tile elements at once with the
//     near-zero pairs recomputed one warp per pair (warp_tile_distance),
//   (the tiled distance kernel writing (rows x cols) distances on the TileMainloop, and its
//   launcher, are in tiles.cu, declared in tiles.cuh).
//
// Precision: float32 / float16 / bfloat16 inputs are converted to float32 when staged in
// shared memory and every product is accumulated in float32 with plain FFMA (no tensor
// cores, no TF32); float64 inputs use float64 throughout.
#pragma once

#include "../epilogue.h"
#include "mainloop_mma.cuh"
#include "mainloop_simt.cuh"
#include "utils.cuh"

namespace triplet_cuda {
namespace cuda {

// ------------------------------------------------------------------------ row statistics

// Per-row statistics in the accumulation type, stored as a (3, N) tensor:
//   sq[i]  = ||x_i||^2
//   inv[i] = 1 / max(||x_i||, kCosineEps)                (cosine; NaN stays NaN)
//   m[i]   = epi::cosine_self_scale(||x_i||^2)            (cosine gradient self-term)
template <typename acc_t>
struct RowStats {
  const acc_t* sq;
  const acc_t* inv;
  const acc_t* m;
  // Statistics of rows [i0, ...).
  RowStats shifted(int64_t i0) const { return {sq + i0, inv + i0, m + i0}; }
};

template <typename acc_t>
inline RowStats<acc_t> row_stats_view(const at::Tensor& stats) {
  const int64_t n = stats.size(1);
  const acc_t* p = stats.data_ptr<acc_t>();
  return {p, p + n, p + 2 * n};
}

constexpr int kStatsThreads = 256;  // 8 warps, one row per warp

// x: (N, D) contiguous -> stats (3, N). One warp per row; lanes stride over D and the
// warp sum is a fixed butterfly, so the result is deterministic.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kStatsThreads)
    row_stats_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t D, acc_t* __restrict__ sq,
                     acc_t* __restrict__ inv, acc_t* __restrict__ m) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kStatsThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;  // the whole warp leaves together
  const scalar_t* p = x + row * D;
  acc_t s = 0;
  for (int64_t k = lane; k < D; k += kWarp) {
    const acc_t v = to_acc<acc_t>(p[k]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) {
    const acc_t eps = static_cast<acc_t>(kCosineEps);
    sq[row] = s;
    inv[row] = acc_t(1) / acc_max(acc_sqrt(s), eps);
    m[row] = epi::cosine_self_scale(s);
  }
}

// x: (N, D) contiguous, on the current device -> (3, N) statistics of acc type.
template <typename scalar_t, typename acc_t>
at::Tensor compute_row_stats(const at::Tensor& x, cudaStream_t stream) {
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor stats =
      empty({3, N}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (N == 0) return stats;
  acc_t* p = stats.data_ptr<acc_t>();
  const int64_t blocks = ceil_div(N, kStatsThreads / kWarp);
  row_stats_kernel<scalar_t, acc_t><<<grid_1d(blocks), kStatsThreads, 0, stream>>>(
      x.data_ptr<scalar_t>(), N, D, p, p + N, p + 2 * N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

// ------------------------------------------------------------------------ dot tiles

// A block of kTileThreads = 16 x 16 threads computes a kTile x kTile (64 x 64) tile of
// dot products <A_r, B_c>; thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 i and
// columns tx + 16 j, i, j < kPer. The D axis is staged through shared memory kTileK = 16
// columns at a time, transposed ([k][row]) and padded by one against bank conflicts.
constexpr int kTile = 64;
constexpr int kTileK = 16;
constexpr int kTileThreads = 256;
constexpr int kTileDim = 16;  // threads per tile side
constexpr int kPer = kTile / kTileDim;  // 4 outputs per thread per side
static_assert(kTileDim * kTileDim == kTileThreads, "16 x 16 threads");
static_assert(kTile * kTileK == 4 * kTileThreads, "each thread stages 4 values per operand");

template <typename acc_t>
struct DotSmem {
  acc_t a[kTileK][kTile + 1];
  acc_t b[kTileK][kTile + 1];
};

// acc[i][j] = <A[a0 + ty + 16 i], B[b0 + tx + 16 j]> over the D columns, 0 for rows out of
// range. A: (nA, D), B: (nB, D), contiguous. Every thread of the block must call it (it
// synchronises); it syncs before writing shared memory, so consecutive calls may reuse sm.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_dots(const scalar_t* __restrict__ A, int64_t nA, int64_t a0,
                                          const scalar_t* __restrict__ B, int64_t nB, int64_t b0,
                                          int64_t D, DotSmem<acc_t>& sm,
                                          acc_t (&acc)[kPer][kPer]) {
  const int tid = threadIdx.x;
  const int tx = tid % kTileDim, ty = tid / kTileDim;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = acc_t(0);
  }
  for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
    __syncthreads();  // the previous stage (or call) is done reading sm
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int e = tid + l * kTileThreads;  // 0 .. 1023
      const int r = e / kTileK;              // 0 .. 63
      const int kk = e % kTileK;             // 0 .. 15, fastest: coalesced along D
      const int64_t k = k0 + kk;
      const int64_t ar = a0 + r, br = b0 + r;
      sm.a[kk][r] = (ar < nA && k < D) ? to_acc<acc_t>(A[ar * D + k]) : acc_t(0);
      sm.b[kk][r] = (br < nB && k < D) ? to_acc<acc_t>(B[br * D + k]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = sm.a[kk][ty + kTileDim * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = sm.b[kk][tx + kTileDim * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
  }
}

// ------------------------------------------------------------------------ exact pair distance

// Exact distance of the pair (a, b) by explicit differences (no Gram cancellation),
// computed by one full warp: lanes stride over D, fixed butterfly sum; epi::exact_distance
// (a non-finite sum gives NaN). Every lane of the warp must call it; every lane gets the
// result. inv_* are RowStats::inv (cosine only).
template <Metric M, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_pair_distance(const scalar_t* __restrict__ a,
                                                    const scalar_t* __restrict__ b, int64_t D,
                                                    acc_t inv_a, acc_t inv_b) {
  const int lane = threadIdx.x % kWarp;
  acc_t s = 0;
  for (int64_t k = lane; k < D; k += kWarp) {
    const acc_t va = to_acc<acc_t>(a[k]), vb = to_acc<acc_t>(b[k]);
    if constexpr (M == Metric::kCosine) {
      s += va * vb;
    } else {
      const acc_t diff = va - vb;
      s += diff * diff;
    }
  }
  s = warp_sum(s);
  return epi::exact_distance<M>(s, inv_a, inv_b);
}

// Distance of the pair (A row ra, B row cb) from its dot product, for the 32 lanes of a warp
// at once: every lane of the warp must call it together (convergent); a lane with
// active == false takes part, its rows are never read and its result is meaningless.
// The shared epilogue's rules (epi::gram_value, epi::finish, the NaN rule); the near-zero rule
// (epi::needs_exact, Euclidean metrics) without a serial slow path: a ballot collects the
// lanes whose Gram value is within rounding noise of 0 and the whole warp recomputes them one
// pair after another (lowest lane first), each by warp_pair_distance (coalesced loads, fixed
// butterfly sum, epi::exact_distance), so the value of a pair does not depend on which lane or
// tile asked for it: it is the one hard_mine_finalize_kernel recomputes for a selection.
// A warp holds at most 32 flagged pairs per call and clears them before it returns (bounded,
// no shared memory, no block barrier). inv_* are RowStats::inv, sq_* RowStats::sq.
template <Metric M, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_tile_distance(bool active, acc_t dot,
                                                    const scalar_t* __restrict__ A, int64_t ra,
                                                    acc_t sq_a, acc_t inv_a,
                                                    const scalar_t* __restrict__ B, int64_t cb,
                                                    acc_t sq_b, acc_t inv_b, int64_t D) {
  const acc_t v = epi::gram_value<M>(dot, sq_a, inv_a, sq_b, inv_b);
  acc_t d = epi::finish<M>(v);
  if constexpr (M != Metric::kCosine) {
    const bool need = active && epi::needs_exact<M>(v, sq_a, sq_b);
    unsigned pending = __ballot_sync(0xffffffffu, need);  // the same mask in every lane
    const int lane = threadIdx.x % kWarp;
    while (pending != 0u) {  // uniform trip count: the warp stays convergent
      const int src = __ffs(pending) - 1;
      pending &= pending - 1u;
      const int64_t r = __shfl_sync(0xffffffffu, ra, src);
      const int64_t c = __shfl_sync(0xffffffffu, cb, src);
      const acc_t ia = __shfl_sync(0xffffffffu, inv_a, src);
      const acc_t ib = __shfl_sync(0xffffffffu, inv_b, src);
      const acc_t e = warp_pair_distance<M>(A + r * D, B + c * D, D, ia, ib);
      if (lane == src) d = e;
    }
  }
  return d;
}

// Distance of rows a and b from their dot product, by ONE thread: the Gram form, the NaN rule,
// and a near-zero pair (epi::needs_exact) recomputed exactly by this thread, serially over D
// (epi::exact_distance's rule on the sum). Used where a thread cannot count on its warp being
// converged on the same tile step (the fused few-positives kernels, few_positives.cuh /
// batch_all.cu); the tile kernels use warp_tile_distance, whose recompute is one warp per pair.
// Equal to warp_tile_distance except for the summation order of a recomputed pair.
template <typename scalar_t, typename acc_t>
__device__ __noinline__ acc_t thread_squared_distance(const scalar_t* __restrict__ a,
                                                      const scalar_t* __restrict__ b, int64_t D) {
  acc_t s = 0;
  for (int64_t k = 0; k < D; ++k) {
    const acc_t diff = to_acc<acc_t>(a[k]) - to_acc<acc_t>(b[k]);
    s += diff * diff;
  }
  return s;
}

template <Metric M, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dist_from_dot(acc_t dot, acc_t sq_a, acc_t inv_a, acc_t sq_b,
                                               acc_t inv_b, const scalar_t* __restrict__ a,
                                               const scalar_t* __restrict__ b, int64_t D) {
  acc_t v = epi::gram_value<M>(dot, sq_a, inv_a, sq_b, inv_b);
  if (epi::needs_exact<M>(v, sq_a, sq_b)) {
    const acc_t s = thread_squared_distance<scalar_t, acc_t>(a, b, D);
    v = epi::is_finite(s) ? s : epi::quiet_nan<acc_t>();
  }
  return epi::finish<M>(v);
}

// Opts a kernel in to `bytes` of dynamic shared memory when that exceeds the default 48 KB
// (per device: called before every launch, a cheap host-side call).
template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// ------------------------------------------------------------------------ distance tiles

// The mainloop of the fused kernels for an embedding type (mainloop.cuh's concept): float32 and
// float64 on the SIMT mainloop, float16 / bfloat16 on the tensor-core mainloop (mma.sync on
// sm_80+, its own SIMT fallback below; float32 accumulation of exact products).
template <typename scalar_t>
struct TileMainloopFor {
  using type = typename SimtMainloopFor<scalar_t>::type;
};
template <>
struct TileMainloopFor<c10::Half> {
  using type = MmaMainloop<c10::Half>;
};
template <>
struct TileMainloopFor<c10::BFloat16> {
  using type = MmaMainloop<c10::BFloat16>;
};
template <typename scalar_t>
using TileMainloop = typename TileMainloopFor<scalar_t>::type;

}  // namespace cuda
}  // namespace triplet_cuda
