// SimtMainloop: the fast SIMT (FFMA) implementation of the mainloop concept of mainloop.cuh
// for float32 and float64 (and, through its register-staged path, float16 / bfloat16 converted
// to float32 until the tensor-core mainloop takes them). SimtMainloop64 stays the simple
// reference; this type computes the very same numbers: every dot product is accumulated in
// acc_t with one FFMA per feature in ascending feature order, zero-padded to a multiple of kK,
// exactly as SimtMainloop64 and distance.cuh's tile_dots, so swapping mainloops changes no bit
// of any distance.
//
// Layout (kSide x kSide = 16 x 16 = 256 threads, thread (ty, tx) = (tid / 16, tid % 16)):
//
//   tile    kBM x kBN = (16 kPerM) x (16 kPerN) dot products; thread (ty, tx) owns the
//           kPerM x kPerN outputs (ty + 16 i, tx + 16 j) in registers (acc[i][j]).
//   stage   the D axis is staged kK = 16 features at a time, row-major and NOT transposed:
//           a[buf][row][k] (kBM rows), b[buf][row][k] (kBN rows), each row padded to
//           kKP = kK + kVec elements (kVec = 16 bytes / sizeof(acc_t): 4 floats, 2 doubles) so
//           that (1) every row starts 16-byte aligned (cp.async and 128-bit loads need it) and
//           (2) the eight 128-bit loads of a quarter warp (tx = 0..7 or 8..15, rows tx + 16 j,
//           stride 80 B (float) / 144 B (double)) hit eight distinct 16-byte bank groups.
//   compute per kVec features and block of kJB = 4 owned columns: 4 128-bit loads of b, then
//           per owned row one 128-bit load of a and kVec x 4 FFMAs: for float32 8 x 8,
//           (8 + 2 x 8) = 24 loads per 256 FFMAs (1 per 10.7) instead of the 1 per 2 of scalar
//           loads. The a loads of a warp have two distinct addresses (ty = 2w, 2w + 1):
//           broadcasts.
//   buffers two stage buffers (double buffering): step s computes from buffer s & 1 while the
//           copies of step s + 1 fill buffer (s + 1) & 1.
//             cp.async path: scalar_t == acc_t == float, D % 4 == 0, A and B 16-byte aligned
//               (checked on the device, uniform per block): 16-byte cp.async.cg copies with the
//               src-size operand: 16 inside the matrix, 0 (zero fill, nothing read) for rows
//               >= n and features >= D (D % 4 == 0: a 4-feature chunk is all in or all out).
//             register path (anything else, and any architecture below sm_80): each thread
//               loads its chunks element by element with bounds checks (0 outside),
//               converts to acc_t and stores them with one 128-bit store per chunk.
//   output  after the loop the kBM x kBN tile is stored to shared memory, aliasing the stage
//           buffers (union), row stride kBN + 1 (odd: a warp reading 32 consecutive rows of a
//           column, as the row reductions do, hits 32 distinct banks).
//
// Shared memory and occupancy (sm_90: 64 K registers, 228 KB shared memory, at most 227 KB per
// block; sm_80: 164 KB):
//   float   8 x 8 / thread, 128 x 128 tile: stage 2 x 256 rows x 20 x 4 B = 40 KB, tile
//           128 x 129 x 4 B = 64.5 KB -> Shared = 64.5 KB (dynamic shared memory, opted in with
//           cudaFuncSetAttribute). Registers: 64 accumulators + 16 b values + 4 a values +
//           addressing ~ 110-128; __launch_bounds__(256, 2) caps them at 128. 2 blocks / SM:
//           2 x 256 x 128 = 64 K registers (the whole register file) and
//           2 x (64.5 + epilogue ~8) KB = ~145 KB of shared memory (fits sm_90 and sm_80),
//           16 warps / SM (25 % occupancy; each thread has 64 independent FFMA chains, which is
//           the ILP that SGEMM-style kernels run at full FFMA rate with).
//   double  4 x 4 / thread, 64 x 64 tile (square, as the symmetric batch-hard kernel needs):
//           stage 2 x 128 x 18 x 8 B = 36 KB, tile 64 x 65 x 8 B = 32.5 KB -> 36 KB.
//           Registers: 32 (16 double accumulators) + 16 + 4 + addressing;
//           __launch_bounds__(256, 2). FP64 throughput, not occupancy, bounds it.
// The figures `-Xptxas -v` printed for the kernels that use it are in the GPU notes at the end
// of this header.
#pragma once

#include <cstdint>
#include <type_traits>

#include "utils.cuh"

namespace triplet_cuda {
namespace cuda {

namespace simt_detail {

// 128-bit shared-memory load / store of kVec = 16 / sizeof(T) consecutive values (16-byte
// aligned address).
__device__ __forceinline__ void lds128(const float* p, float (&o)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  o[0] = t.x;
  o[1] = t.y;
  o[2] = t.z;
  o[3] = t.w;
}
__device__ __forceinline__ void lds128(const double* p, double (&o)[2]) {
  const double2 t = *reinterpret_cast<const double2*>(p);
  o[0] = t.x;
  o[1] = t.y;
}
__device__ __forceinline__ void sts128(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void sts128(double* p, const double (&v)[2]) {
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}

// 16-byte asynchronous copy global -> shared (sm_80+): src_bytes of the 16 are read from src,
// the rest of the 16 destination bytes are zero-filled (src_bytes == 0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(src_bytes));
#else
  (void)dst;
  (void)src;
  (void)src_bytes;
  __trap();  // unreachable: has_cp_async() is false below sm_80
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ constexpr bool has_cp_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return true;
#else
  return false;
#endif
}

}  // namespace simt_detail

template <typename scalar_t_, typename acc_t_, int kPerM_, int kPerN_, int kMinBlocks_>
struct SimtMainloop {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  static constexpr int kSide = 16;                // threads per tile side
  static constexpr int kThreads = kSide * kSide;  // 256
  static constexpr int kPerM = kPerM_;            // rows per thread
  static constexpr int kPerN = kPerN_;            // columns per thread
  static constexpr int kBM = kSide * kPerM;
  static constexpr int kBN = kSide * kPerN;
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__ min blocks per SM
  static constexpr int kVec = 16 / static_cast<int>(sizeof(acc_t));  // acc_t per 128 bits
  static constexpr int kK = 16;                   // features per stage
  static constexpr int kKP = kK + kVec;           // padded staged row (elements)
  static constexpr int kChunksPerRow = kK / kVec; // 16-byte chunks per staged row
  static constexpr int kChunksA = kBM * kChunksPerRow / kThreads;  // per thread per stage
  static constexpr int kChunksB = kBN * kChunksPerRow / kThreads;
  static constexpr int kTileLd = kBN + 1;         // odd row stride of the output tile
  static constexpr int kJB = 4;                   // columns per b fragment (see run())

  static_assert(std::is_same<acc_t, float>::value || std::is_same<acc_t, double>::value,
                "SimtMainloop: acc_t is float or double");
  static_assert(kK % kVec == 0, "a staged row is whole 16-byte chunks");
  static_assert((kKP * sizeof(acc_t)) % 16 == 0, "staged rows start 16-byte aligned");
  static_assert(kChunksA * kThreads == kBM * kChunksPerRow, "A stage: whole chunks per thread");
  static_assert(kChunksB * kThreads == kBN * kChunksPerRow, "B stage: whole chunks per thread");
  static_assert(kBN % kWarp == 0 && kBM % kWarp == 0, "tile sides are whole warps");
  static_assert(kPerN % kJB == 0, "whole column blocks");

  struct Shared {
    union alignas(16) U {
      struct {
        acc_t a[2][kBM][kKP];  // [buffer][tile row][feature in stage]
        acc_t b[2][kBN][kKP];
      } stage;
      acc_t tile[kBM][kTileLd];
    } u;
    __device__ __forceinline__ acc_t dot(int r, int c) const { return u.tile[r][c]; }
  };

  // Fills stage buffer `buf` with features [k0, k0 + kK) of rows [r0, r0 + kRows) of X (n, D),
  // zero outside the matrix. Chunk e (16 bytes of smem, kVec features) of the stage: row
  // e / kChunksPerRow, features k0 + (e % kChunksPerRow) * kVec + [0, kVec); thread tid takes
  // chunks tid + l * kThreads: consecutive threads read consecutive chunks of a row
  // (coalesced along D).
  template <int kRows, int kChunks>
  __device__ __forceinline__ static void stage_async(const acc_t* __restrict__ X, int64_t n,
                                                     int64_t r0, int64_t D, int64_t k0,
                                                     acc_t (*dst)[kKP]) {
    static_assert(std::is_same<scalar_t, acc_t>::value, "cp.async copies without conversion");
#pragma unroll
    for (int l = 0; l < kChunks; ++l) {
      const int e = threadIdx.x + l * kThreads;
      const int row = e / kChunksPerRow;
      const int kk = (e % kChunksPerRow) * kVec;
      const int64_t gr = r0 + row, k = k0 + kk;
      // D % kVec == 0 here, so a chunk is entirely inside (k < D) or entirely outside.
      const bool in = gr < n && k < D;
      const acc_t* src = in ? X + gr * D + k : X;  // X: a valid address, never read (0 bytes)
      simt_detail::cp_async16(&dst[row][kk], src, in ? 16 : 0);
    }
  }

  template <int kRows, int kChunks>
  __device__ __forceinline__ static void stage_regs(const scalar_t* __restrict__ X, int64_t n,
                                                    int64_t r0, int64_t D, int64_t k0,
                                                    acc_t (*dst)[kKP]) {
    // With the cp.async path in the same kernel (float32), one chunk at a time: fully unrolled,
    // the loads of all chunks in flight at once push the kernel past the 128-register cap
    // (ptxas reported 8-48 bytes of spills); float16 / bfloat16 keep them all in flight.
    constexpr int kUnroll = std::is_same<scalar_t, float>::value ? 1 : kChunks;
#pragma unroll(kUnroll)
    for (int l = 0; l < kChunks; ++l) {
      const int e = threadIdx.x + l * kThreads;
      const int row = e / kChunksPerRow;
      const int kk = (e % kChunksPerRow) * kVec;
      const int64_t gr = r0 + row;
      acc_t v[kVec];
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        const int64_t k = k0 + kk + q;
        v[q] = (gr < n && k < D) ? to_acc<acc_t>(X[gr * D + k]) : acc_t(0);
      }
      simt_detail::sts128(&dst[row][kk], v);
    }
  }

  // Stage step `step` (features [step * kK, step * kK + kK)) into buffer step & 1.
  __device__ __forceinline__ static void stage(bool async, const scalar_t* __restrict__ A,
                                               int64_t nA, int64_t a0,
                                               const scalar_t* __restrict__ B, int64_t nB,
                                               int64_t b0, int64_t D, int64_t step, Shared& s) {
    const int buf = static_cast<int>(step & 1);
    const int64_t k0 = step * kK;
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
      if (async) {
        stage_async<kBM, kChunksA>(A, nA, a0, D, k0, s.u.stage.a[buf]);
        stage_async<kBN, kChunksB>(B, nB, b0, D, k0, s.u.stage.b[buf]);
        simt_detail::cp_async_commit();
        return;
      }
    }
    stage_regs<kBM, kChunksA>(A, nA, a0, D, k0, s.u.stage.a[buf]);
    stage_regs<kBN, kChunksB>(B, nB, b0, D, k0, s.u.stage.b[buf]);
  }

  // dot(r, c) = <A[a0 + r], B[b0 + c]> for the kBM x kBN tile into s (see mainloop.cuh).
  __device__ static void run(const scalar_t* __restrict__ A, int64_t nA, int64_t a0,
                             const scalar_t* __restrict__ B, int64_t nB, int64_t b0, int64_t D,
                             Shared& s) {
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
    // Uniform over the block (same A, B, D for every thread), so the branches on it below do
    // not diverge.
    bool async = false;
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
      async = simt_detail::has_cp_async() && D % kVec == 0 &&
              ((reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(B)) % 16) == 0;
    }
    acc_t acc[kPerM][kPerN];
#pragma unroll
    for (int i = 0; i < kPerM; ++i) {
#pragma unroll
      for (int j = 0; j < kPerN; ++j) acc[i][j] = acc_t(0);
    }
    const int64_t steps = ceil_div(D, kK);  // >= 1 when D >= 1; 0 steps leave the tile 0

    __syncthreads();  // the previous tile's epilogue is done reading s (the stage aliases it)
    if (steps > 0) stage(async, A, nA, a0, B, nB, b0, D, 0, s);
    if (async) simt_detail::cp_async_wait_all();
    __syncthreads();  // buffer 0 is complete and visible
    for (int64_t step = 0; step < steps; ++step) {
      // Buffer (step + 1) & 1 was last read by the compute of step - 1, which every thread
      // finished before the barrier that ended step - 1: it may be refilled now.
      if (step + 1 < steps) stage(async, A, nA, a0, B, nB, b0, D, step + 1, s);
      const int buf = static_cast<int>(step & 1);
      const acc_t(*sa)[kKP] = s.u.stage.a[buf];
      const acc_t(*sb)[kKP] = s.u.stage.b[buf];
#pragma unroll
      for (int kq = 0; kq < kK; kq += kVec) {
        // Columns in blocks of kJB: the b fragment of a block (kJB x kVec values) and one
        // a vector are live at a time, not all kPerN columns' (register pressure: 8 x 8
        // float32 would need 64 + 32 + 4 fragment registers and spill at the 128 cap).
#pragma unroll
        for (int jb = 0; jb < kPerN; jb += kJB) {
          acc_t bv[kJB][kVec];
#pragma unroll
          for (int j = 0; j < kJB; ++j) {
            simt_detail::lds128(&sb[tx + kSide * (jb + j)][kq], bv[j]);
          }
#pragma unroll
          for (int i = 0; i < kPerM; ++i) {
            acc_t av[kVec];
            simt_detail::lds128(&sa[ty + kSide * i][kq], av);
            // Features kq, kq + 1, ... in ascending order for every output: the summation
            // order of SimtMainloop64 / tile_dots (one FFMA per feature), hence the same bits.
#pragma unroll
            for (int q = 0; q < kVec; ++q) {
#pragma unroll
              for (int j = 0; j < kJB; ++j) acc[i][jb + j] += av[q] * bv[j][q];
            }
          }
        }
      }
      if (async) simt_detail::cp_async_wait_all();  // this thread's copies of step + 1 landed
      __syncthreads();  // step + 1's buffer complete for all; every read of buffer buf done
    }
    // The last barrier of the loop (or the one before it when steps == 0) ordered every read
    // of the stage buffers before these writes to the tile that aliases them.
#pragma unroll
    for (int i = 0; i < kPerM; ++i) {
#pragma unroll
      for (int j = 0; j < kPerN; ++j) s.u.tile[ty + kSide * i][tx + kSide * j] = acc[i][j];
    }
    __syncthreads();  // the tile is complete and visible
  }
};

// The mainloop of each embedding type on the SIMT path: float32 128 x 128 (cp.async when
// aligned), float64 64 x 64, float16 / bfloat16 128 x 128 through the converting register path
// (the tensor-core mainloop, csrc/cuda/mainloop_mma.cuh, is meant to take these two over).
template <typename scalar_t>
struct SimtMainloopFor {
  using type = SimtMainloop<scalar_t, float, 8, 8, 2>;
};
template <>
struct SimtMainloopFor<double> {
  using type = SimtMainloop<double, double, 4, 4, 2>;
};

// What a GPU session must verify first (nothing of this mainloop, the tile epilogue
// (distance.cuh: distance_kernel, warp_tile_distance) or the batch-hard forward kernels
// (batch_hard.cu) has run yet; they are compile-checked only):
//   1. Correctness: the CUDA tests (tests/ with a GPU: pairwise_distance, batch_hard_mine with
//      and without a reference set, the losses through the distance chunks, knn) on float32
//      with D % 4 == 0 (cp.async path), D % 4 != 0 and a misaligned view such as x[:, 1:]
//      made contiguous at an odd offset (register path), float64, float16 and bfloat16; N not a
//      multiple of the tile (128 / 64) and N < one tile.
//   2. Bits: float32 distances bitwise equal to those of SimtMainloop64 / the previous kernels
//      (same FFMA order by construction), and batch_hard_mine of the batch itself (upper-triangle
//      hard_mine_sym_kernel) equal to the reference-set path with ref = the batch and
//      ref_self_index = 0 (full square, hard_mine_partial_kernel), indices and distances.
//   3. Near zero: all embeddings equal or within 1e-4 of one point (every pair recomputed one
//      warp per pair by warp_tile_distance): results as the reference, and the time against
//      random data of the same size (the issue's bar: at most 2x).
//   4. compute-sanitizer --tool memcheck, racecheck and synccheck on the CUDA tests (cp.async
//      zero fill of tails, the stage / tile aliasing barriers, the column-info parity buffers of
//      hard_mine_partial_kernel, the two combine_parts calls of hard_mine_sym_kernel).
//   5. ncu: achieved occupancy (2 blocks / SM expected for float32 at 128 registers and ~75 KB of
//      shared memory), local-memory traffic of the small spills ptxas reports for the fused
//      batch-hard kernels (16-96 bytes), FFMA throughput against cuBLAS x @ x.T.
}  // namespace cuda
}  // namespace triplet_cuda
