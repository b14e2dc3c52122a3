// The mainloop half of "one epilogue, two mainloops" on CUDA.
//
// A Mainloop type computes, for one thread block, the kBM x kBN tile of dot products
//
//     dot(r, c) = <A[a0 + r], B[b0 + c]>   (0 <= r < kBM, 0 <= c < kBN)
//
// over all D features, accumulated in acc_t, and leaves it in shared memory, where the
// per-loss epilogue (distance from the dot, masks, online row / column reductions; the
// per-element logic of csrc/epilogue.h, shared with the CPU) reads it. Rows with
// a0 + r >= nA and columns with b0 + c >= nB hold 0. Because the hand-over is a tile in
// shared memory, mainloops (SIMT float32 / float64, tensor cores for float16 / bfloat16)
// are interchangeable and no epilogue depends on a register-fragment layout.
//
// The concept:
//
//   struct Mainloop {
//     using scalar_t = ...;  // element type of A and B (row-major (n, D), contiguous)
//     using acc_t = ...;     // accumulation type (float64 for float64, float32 otherwise)
//     static constexpr int kBM, kBN, kThreads;
//     struct Shared {        // one per block (__shared__ or dynamic); staging + the tile
//       __device__ acc_t dot(int r, int c) const;
//     };
//     // Called by all kThreads threads of the block. Begins with __syncthreads() (so the
//     // previous tile's epilogue may still be reading s) and ends with __syncthreads() (the
//     // tile is complete and visible to every thread).
//     __device__ static void run(const scalar_t* A, int64_t nA, int64_t a0,
//                                const scalar_t* B, int64_t nB, int64_t b0, int64_t D,
//                                Shared& s);
//   };
//
// SimtMainloop64 below is the plain reference implementation (64 x 64 tile, 256 threads,
// 4 x 4 outputs per thread, FFMA in acc_t): it is the tile_dots loop of distance.cuh with
// the result stored to shared memory.
#pragma once

#include "utils.cuh"

namespace triplet_cuda {
namespace cuda {

template <typename scalar_t_, typename acc_t_>
struct SimtMainloop64 {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  static constexpr int kBM = 64;
  static constexpr int kBN = 64;
  static constexpr int kThreads = 256;
  static constexpr int kK = 16;       // features staged per step
  static constexpr int kSide = 16;    // threads per tile side
  static constexpr int kPer = 4;      // outputs per thread per side

  struct Shared {
    union {
      struct {
        acc_t a[kK][kBM + 1];  // transposed ([k][row]), padded against bank conflicts
        acc_t b[kK][kBN + 1];
      } stage;
      acc_t tile[kBM][kBN + 1];
    } u;
    __device__ __forceinline__ acc_t dot(int r, int c) const { return u.tile[r][c]; }
  };

  __device__ static void run(const scalar_t* __restrict__ A, int64_t nA, int64_t a0,
                             const scalar_t* __restrict__ B, int64_t nB, int64_t b0, int64_t D,
                             Shared& s) {
    const int tid = threadIdx.x;
    const int tx = tid % kSide, ty = tid / kSide;
    acc_t acc[kPer][kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
#pragma unroll
      for (int j = 0; j < kPer; ++j) acc[i][j] = acc_t(0);
    }
    for (int64_t k0 = 0; k0 < D; k0 += kK) {
      __syncthreads();  // the previous step (or the previous tile's epilogue) is done with s
#pragma unroll
      for (int l = 0; l < kBM * kK / kThreads; ++l) {
        const int e = tid + l * kThreads;
        const int r = e / kK;
        const int kk = e % kK;  // fastest: coalesced along D
        const int64_t k = k0 + kk;
        const int64_t ar = a0 + r, br = b0 + r;
        s.u.stage.a[kk][r] = (ar < nA && k < D) ? to_acc<acc_t>(A[ar * D + k]) : acc_t(0);
        s.u.stage.b[kk][r] = (br < nB && k < D) ? to_acc<acc_t>(B[br * D + k]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        acc_t av[kPer], bv[kPer];
#pragma unroll
        for (int i = 0; i < kPer; ++i) av[i] = s.u.stage.a[kk][ty + kSide * i];
#pragma unroll
        for (int j = 0; j < kPer; ++j) bv[j] = s.u.stage.b[kk][tx + kSide * j];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
#pragma unroll
          for (int j = 0; j < kPer; ++j) acc[i][j] += av[i] * bv[j];
        }
      }
    }
    __syncthreads();  // every thread is done reading the staging area the tile aliases
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
#pragma unroll
      for (int j = 0; j < kPer; ++j) s.u.tile[ty + kSide * i][tx + kSide * j] = acc[i][j];
    }
    __syncthreads();
  }
};

}  // namespace cuda
}  // namespace triplet_cuda
