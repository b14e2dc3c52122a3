// Tensor-core mainloop for float16 / bfloat16 embeddings: MmaMainloop<scalar_t>, a model of
// the Mainloop concept of mainloop.cuh (a kBM x kBN tile of dot products <A[a0 + r], B[b0 + c]>
// over all D features, accumulated in float and left in shared memory as Shared::dot(r, c);
// run() begins and ends with __syncthreads()).
//
// STATUS: compile-checked only (nvcc 13.0 for sm_80 / sm_90, and a one-off sm_75 build of the
// SIMT fallback); it has never run. Nothing may dispatch to it before a GPU session has done the
// checks listed at the end of this comment.
//
// Design (defaults: MmaMainloop<T> = 128 x 128 tile, 8 warps as 2 (M) x 4 (N), 4 stages)
//   * Each warp owns a kWarpM x kWarpN = 64 x 32 sub-tile: kFragM x kFragN = 4 x 4 tiles of
//     mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (sm_80+), accumulators in
//     registers (64 floats per thread).
//   * Operands are staged in shared memory, K step kBK = 32 features (two k16 steps), in a
//     kStages = 4 deep cp.async pipeline: 16-byte cp.async.cg with the zero-fill form
//     (src-size 0) for rows past nA / nB and features past D.
//   * Staged rows are 64 bytes (4 chunks of 16 bytes); chunk c of staged row r lives at
//     chunk slot c ^ ((r >> 1) & 3) (XOR swizzle), which makes every ldmatrix phase and every
//     16-byte staging store conflict-free (proof at swizzle()).
//   * Fragments come from ldmatrix.x4 (A: one 16 x 16 fragment per x4; B: two 8-column n-tiles
//     by 16 k per x4).
//   * After the K loop the accumulators are written to the float tile, which aliases the
//     staging buffers (a __syncthreads separates the last ldmatrix from the first store).
//     Tile row stride kBN + 9 floats (= 9 mod 32): a warp reading 32 consecutive rows of one
//     column, or 32 consecutive columns of one row, is conflict-free, so the epilogue may put
//     its lanes along either axis; the fragment stores themselves are 2-way (the best an odd
//     stride allows, see store_tile()).
//   * Shared memory: sizeof(Shared) = max(stages 4 x 256 rows x 64 B = 65,536 B,
//     tile 128 x 137 x 4 B = 70,144 B) = 70,144 B (kSharedBytes): above the 48 KB static limit,
//     so a kernel takes it as dynamic shared memory and its launcher calls
//     set_max_dynamic_shared(kernel) first (see there).
//   * Occupancy / launch bounds: kernels built on it declare
//     __launch_bounds__(ML::kThreads, ML::kMinBlocksPerSM) = (256, 2), which caps registers at
//     128 per thread (2 x 256 x 128 = the 64 K registers of an SM). Blocks per SM: 2 (registers)
//     on every sm_80+ part; shared memory allows 2 (A100, 164 KB) or 3 (H100, 227 KB).
//     16 resident warps hide latency through 16 independent mma per k16 step per warp and the
//     4-stage cp.async pipeline (the usual operating point of mma.sync GEMM mainloops).
//     Measured with ptxas -v (CUDA 13.0, a test kernel = run() + a loop storing s.dot to
//     global, both the cp.async and the register-staged path inlined): 127 registers, no
//     spills, for sm_80 and sm_90 (128 x 64 variant: 96 / 95). That leaves no headroom: an
//     epilogue whose live state overlaps the accumulators (it should not: they are dead once
//     the tile is stored) would spill, so read ptxas -v of every kernel built on it.
//   * Alignment: the cp.async path needs every staged 16-byte chunk 16-byte aligned in global
//     memory: D % 8 == 0 and A, B 16-byte aligned. run() checks that from its arguments (the
//     same value in every thread, so the branch never splits a __syncthreads) and otherwise
//     takes the register-staged path: plain 2-byte loads, zero fill, 16-byte st.shared into
//     the same swizzled stages, the same pipeline order and the same mma compute.
//   * Architectures: the PTX (cp.async, mma .bf16 / m16n8k16) needs sm_80; the build targets
//     sm_80 and sm_90. A build that adds an older arch still compiles: there run() computes
//     the same tile with FFMA on the converted values (SimtMainloop64's semantics: 16 x 16
//     threads, 8 x 8 outputs each, same Shared). Host code should still dispatch such devices
//     to a SIMT mainloop (uses_tensor_cores()): sm_75 cannot grant the 128 x 128 tile's
//     kSharedBytes (64 KB opt-in; set_max_dynamic_shared() says so in a clear error), only
//     the 128 x 64 variant's.
//
// Exactness. A product of two float16 values (11-bit significands, exponents -24..15) or of
// two bfloat16 values (8-bit significands, float32's exponent range) is exact in float32
// (22 resp. 16 significant bits; for bfloat16 barring float32 overflow / underflow, which the
// FFMA path on the converted values hits identically). The PTX ISA (mma, "Precision and
// rounding") specifies that the element-wise products are formed with at least single
// precision and the accumulation of .f32 D is performed with at least single precision, and
// leaves "the accumulation order, rounding and handling of subnormal inputs" unspecified.
// So the result equals FFMA on the converted values up to summation order and the rounding
// of the additions: not bitwise, but within the error bound of a float32 sum of D terms
// (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ
// Comput. Sci. 2021, report that the hardware adds a k-group's exact products aligned to the
// largest one with truncation rather than round-to-nearest: about twice the unit roundoff).
// The near-zero rule of csrc/epilogue.h applies downstream unchanged: the epilogue
// recomputes near-zero Euclidean pairs exactly from the embeddings, so cancellation in
// ||a||^2 + ||b||^2 - 2<a, b> never reaches a result.
// Rows a0 + r >= nA and columns b0 + c >= nB of the tile are stored as exactly 0 (not
// computed: a zero-filled row times an Inf would be NaN). NaN / Inf inputs propagate through
// mma as through FFMA (to be confirmed on a GPU, item 4 below).
//
// PTX ISA facts relied on (PTX ISA 9.x, "Warp Level Matrix Multiply-Accumulate Instructions",
// section "Matrix Fragments for mma.m16n8k16 with floating point type", figures
// mma-16816-A-f16, mma-16816-B-f16, mma-16816-C; and "ldmatrix"); g = %laneid >> 2,
// t = %laneid % 4 (groupID, threadID_in_group):
//   [A] A (16 x 16, .row, .f16 / .bf16): four .b32 registers {a0a1, a2a3, a4a5, a6a7}, the
//       lower-numbered element in the low half; a_i at row g for i in {0,1,4,5}, g + 8
//       otherwise; col 2t + (i & 1) for i < 4, 2t + (i & 1) + 8 for i >= 4. That is:
//       reg0 = rows 0-7 x k 0-7, reg1 = rows 8-15 x k 0-7, reg2 = rows 0-7 x k 8-15,
//       reg3 = rows 8-15 x k 8-15, each in the "row g, cols 2t, 2t+1" pattern.
//   [B] B (16 x 8, K x N, .col): two .b32 registers {b0b1, b2b3}; b_i at row (k)
//       2t + (i & 1) for i < 2, 2t + (i & 1) + 8 for i >= 2; col (n) g. B "col" = B^T row-major
//       (n, k), exactly the (candidate, feature) layout of the embeddings: reg0 = n 0-7 x
//       k 0-7, reg1 = n 0-7 x k 8-15, each "row (n) g, cols (k) 2t, 2t+1".
//   [C] C / D (16 x 8, .f32): four .f32 registers c0..c3; c_i at row g for i < 2, g + 8 for
//       i >= 2; col 2t + (i & 1).
//   [L] ldmatrix.sync.aligned.m8n8.x4.shared.b16 d0..d3: lanes 8q..8q+7 give the addresses of
//       rows 0..7 of matrix q (16 contiguous bytes each, 16-byte aligned); d_q of lane l holds
//       row l >> 2, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix q (lower one in the low
//       half): the "row g, cols 2t, 2t+1" pattern of [A] / [B], so a matrix of 8 rows x 8
//       consecutive k loads straight into one A or B register.
//   [P] cp.async.cg.shared.global [dst], [src], 16, src_size: copies src_size bytes and fills
//       the rest of the 16 with zeros (src_size = 0: reads nothing); completion is observed by
//       the issuing thread after cp.async.wait_group N (at most N most recent groups pending);
//       a __syncthreads() after the wait publishes the data to the block.
//
// What a GPU session must verify first, before any kernel dispatches to MmaMainloop:
//   1. A unit kernel (one block per tile, the grid over tiles) that stores s.dot(r, c) for
//      every r, c against SimtMainloop64<T, float> on the same inputs (and a float64 reference):
//      nA, nB in {1, 7, 127, 128, 129, 300}, a0 / b0 > 0, A == B, D in {8, 16, 24, 32, 40, 128,
//      136, 256, 264} (cp.async path) and D in {1, 3, 7, 9, 33, 130} plus a base offset by one
//      element with D % 8 == 0 (register-staged path), both dtypes. Integer-valued inputs in
//      [-4, 4] with D <= 256 make every dot product exact, so the tile must equal SimtMainloop64's
//      bitwise (any fragment / swizzle / ldmatrix mapping error shows as a wrong integer);
//      random normal inputs must agree within 2 * D * 2^-23 * sum_k |a_k b_k|. Entries past
//      nA / nB must be exactly 0.
//   2. Two tiles in a row in one block with an epilogue reading the tile in between (the
//      begin / end __syncthreads contract), under compute-sanitizer --tool racecheck and
//      --tool synccheck; compute-sanitizer memcheck with tails in rows and D (the zero-fill
//      form must not read past the tensors) and initcheck.
//   3. ptxas / ncu: no local-memory spills under __launch_bounds__(256, 2); shared-memory bank
//      conflicts of ldmatrix and of the staging stores ~0 (ncu
//      l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld / _st); achieved occupancy 2
//      blocks / SM; tensor pipe utilisation on a 16384 x 16384 x 256 sweep against cuBLAS.
//   4. Special values: NaN / Inf in one row of A give NaN / Inf only in that tile row;
//      subnormal float16 inputs (|x| < 2^-14) agree with FFMA on the converted values (the
//      PTX ISA leaves their handling unspecified; if the hardware flushes them, say so in the
//      README and bound the effect).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mainloop.cuh"
#include "utils.cuh"

namespace triplet_cuda {
namespace cuda {

namespace mma_detail {

// Shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// [P] 16-byte cp.async; valid == false copies nothing and writes 16 zero bytes (src is not
// read, but the caller still passes an address inside the tensor).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(__cvta_generic_to_global(src)), "r"(src_size)
               : "memory");
#else
  __trap();  // unreachable: only the sm_80+ path calls it
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most N of this thread's most recent cp.async groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// [L] Four 8 x 8 b16 matrices; lanes 8q..8q+7 address the rows of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&d)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(addr)
               : "memory");
#else
  d[0] = d[1] = d[2] = d[3] = 0u;
  __trap();
#endif
}

// c += A (16 x 16, fragment [A]) * B (16 x 8, fragment [B]) in float32 ([C]).
template <typename scalar_t>
struct Mma16816;

template <>
struct Mma16816<c10::Half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

template <>
struct Mma16816<c10::BFloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

}  // namespace mma_detail

template <typename scalar_t_, int kBM_ = 128, int kBN_ = 128, int kWarpsM_ = 2,
          int kWarpsN_ = 4, int kStages_ = 4>
struct MmaMainloop {
  using scalar_t = scalar_t_;
  using acc_t = float;
  static_assert(std::is_same<scalar_t, c10::Half>::value ||
                    std::is_same<scalar_t, c10::BFloat16>::value,
                "MmaMainloop: scalar_t must be c10::Half or c10::BFloat16");
  static_assert(sizeof(scalar_t) == 2, "MmaMainloop: 16-bit elements expected");

  static constexpr int kBM = kBM_;
  static constexpr int kBN = kBN_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  // For __launch_bounds__(kThreads, kMinBlocksPerSM): caps registers at 65536 / (2 x 256) =
  // 128 per thread (occupancy estimate in the header comment).
  static constexpr int kMinBlocksPerSM = 2;
  static constexpr int kMinBlocks = kMinBlocksPerSM;  // the name the fused kernels use
  static constexpr int kStages = kStages_;
  static constexpr int kBK = 32;                // features per stage (two k16 mma steps)
  static constexpr int kChunks = kBK / 8;       // 16-byte chunks (8 elements) per staged row
  static constexpr int kRows = kBM + kBN;       // staged rows per stage: A rows, then B rows
  static constexpr int kWarpM = kBM / kWarpsM;  // warp sub-tile
  static constexpr int kWarpN = kBN / kWarpsN;
  static constexpr int kFragM = kWarpM / 16;    // m16 tiles per warp
  static constexpr int kFragN = kWarpN / 8;     // n8 tiles per warp
  static constexpr int kLoadsPerThread = kRows * kChunks / kThreads;  // chunks per stage
  static constexpr int kTileStride = kBN + 9;   // floats per tile row (= 9 mod 32)

  static_assert(kStages >= 2, "MmaMainloop: the pipeline needs at least 2 stages");
  static_assert(kChunks == 4, "swizzle() is written for 64-byte staged rows (kBK == 32)");
  static_assert(kBK % 16 == 0, "kBK must be a whole number of k16 mma steps");
  static_assert(kBM % kWarpsM == 0 && kBN % kWarpsN == 0, "warps must tile the block tile");
  static_assert(kWarpM % 16 == 0, "warp rows must be whole m16 tiles (ldmatrix.x4 of A)");
  static_assert(kWarpN % 16 == 0, "warp columns must be pairs of n8 tiles (ldmatrix.x4 of B)");
  static_assert(kBM % 8 == 0 && kBN % 8 == 0,
                "ldmatrix phases read 8 staged rows starting at a multiple of 8");
  static_assert((kRows * kChunks) % kThreads == 0,
                "every thread stages the same number of 16-byte chunks");
  static_assert((kBM * kChunks) % kThreads == 0,
                "each unrolled staging step is all-A or all-B (no per-thread select)");
  static_assert(kTileStride % 32 == 9, "tile stride must be 9 mod 32 (store_tile / header)");
  static_assert(kThreads == 256 && kBM % 16 == 0 && kBN % 16 == 0,
                "the pre-sm_80 SIMT fallback uses 16 x 16 threads");

  struct alignas(16) Shared {
    union {
      // stage[s][row][slot]: row < kBM is A[a0 + row], else B[b0 + row - kBM]; features
      // k0 + 8 * chunk .. + 7 of chunk `chunk` live in slot swizzle(row, chunk).
      uint4 stage[kStages][kRows][kChunks];
      float tile[kBM][kTileStride];
    } u;
    __device__ __forceinline__ acc_t dot(int r, int c) const { return u.tile[r][c]; }
  };
  static constexpr size_t kSharedBytes = sizeof(Shared);

  // ---------------------------------------------------------------------------- host helpers

  // Whether the current device runs the tensor-core path (compute capability >= 8.0). Older
  // devices should be dispatched to a SIMT mainloop (see the header comment).
  static bool uses_tensor_cores() {
    int dev = 0, major = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    return major >= 8;
  }

  // Lets `kernel` be launched with `dynamic_bytes` (default kSharedBytes) of dynamic shared
  // memory on the current device: checks that its static shared memory plus dynamic_bytes fit
  // the device's opt-in limit (clear error otherwise, e.g. on sm_75's 64 KB) and sets
  // cudaFuncAttributeMaxDynamicSharedMemorySize. The attribute is per function and device;
  // call it from the launcher before each launch (one driver call) or once per device.
  // Kernel side:  extern __shared__ __align__(16) unsigned char smem_raw[];
  //               auto& s = *reinterpret_cast<typename ML::Shared*>(smem_raw);
  // launched as   kernel<<<grid, ML::kThreads, ML::kSharedBytes, stream>>>(...).
  template <typename Kernel>
  static void set_max_dynamic_shared(Kernel* kernel, size_t dynamic_bytes = kSharedBytes) {
    int dev = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const size_t need = attr.sharedSizeBytes + dynamic_bytes;
    TORCH_CHECK(need <= static_cast<size_t>(optin),
                "triplet_cuda: the tensor-core kernel needs ", need,
                " bytes of shared memory per block, but device ", dev, " allows at most ", optin,
                " (use the SIMT kernels on this device)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_bytes)));
  }

  // --------------------------------------------------------------------------- device code

  // The block's operands: A / B advanced to rows a0 / b0 (left at the tensor start when the
  // block is past its end), and how many of the block's kBM / kBN rows exist (0..kBM /
  // 0..kBN). 32-bit row counts and one pointer per operand keep the pipeline's registers low.
  struct Blocked {
    const scalar_t* A;
    const scalar_t* B;
    int64_t D;
    int a_rows, b_rows;
    __device__ __forceinline__ static int rows_in(int64_t n, int64_t r0, int rows) {
      return n <= r0 ? 0 : (n - r0 < rows ? static_cast<int>(n - r0) : rows);
    }
    __device__ __forceinline__ static Blocked make(const scalar_t* A, int64_t nA, int64_t a0,
                                                   const scalar_t* B, int64_t nB, int64_t b0,
                                                   int64_t D) {
      Blocked blk;
      blk.a_rows = rows_in(nA, a0, kBM);
      blk.b_rows = rows_in(nB, b0, kBN);
      blk.A = blk.a_rows > 0 ? A + a0 * D : A;
      blk.B = blk.b_rows > 0 ? B + b0 * D : B;
      blk.D = D;
      return blk;
    }
  };

  // Slot of 16-byte chunk `chunk` (0..3) of staged row `row`. A staged row is 64 bytes, so a
  // 128-byte bank line holds rows 2j (bytes 0-63) and 2j + 1 (bytes 64-127); the chunk's
  // 16-byte position in its line is 4 (row & 1) + (chunk ^ ((row >> 1) & 3)).
  //  * ldmatrix phase = 8 rows r0..r0+7 (r0 % 8 == 0; stage and A / B bases are multiples of
  //    128 bytes, so rows 2j, 2j + 1 share a line whatever the 16-byte aligned base of s) at
  //    one logical chunk: (row & 1, (row >> 1) & 3) takes all 8 values, so the 8 positions
  //    are distinct mod 128 bytes = all 32 banks once: conflict-free.
  //  * staging store phase = 8 consecutive lanes = chunks 0..3 of rows r, r + 1 (r even): same
  //    (row >> 1) & 3, chunk ^ it is a permutation of 0..3, row & 1 separates the two rows:
  //    8 distinct positions, conflict-free.
  __device__ __forceinline__ static int swizzle(int row, int chunk) {
    return chunk ^ ((row >> 1) & 3);
  }

  // Stages features [k0, k0 + kBK) of the block's kBM A rows and kBN B rows into stage
  // `slot`; rows past blk.a_rows / blk.b_rows and features past D are zeros (blk.A / blk.B
  // point at the block's first rows). kAsync: cp.async (requires D % 8 == 0 and 16-byte aligned
  // A, B: a chunk is then wholly inside or wholly past D); otherwise plain loads and 16-byte
  // shared stores.
  template <bool kAsync>
  __device__ __forceinline__ static void load_stage(Shared& s, int slot, int64_t k0,
                                                    const Blocked& blk) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int e = tid + l * kThreads;  // consecutive lanes: consecutive chunks of a row
      const int row = e / kChunks;
      const int chunk = e % kChunks;
      const bool is_a = row < kBM;  // compile-time per l (static_assert above)
      const scalar_t* __restrict__ base = is_a ? blk.A : blk.B;
      const int brow = is_a ? row : row - kBM;  // row within the block's A or B rows
      const bool row_ok = brow < (is_a ? blk.a_rows : blk.b_rows);
      const int64_t D = blk.D;
      const int64_t k = k0 + 8 * chunk;
      uint4* dst = &s.u.stage[slot][row][swizzle(row, chunk)];
      if constexpr (kAsync) {
        const bool valid = row_ok && k < D;
        mma_detail::cp_async_16(mma_detail::smem_addr(dst), valid ? base + brow * D + k : base,
                                valid);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t k_lo = k + 2 * j, k_hi = k_lo + 1;
          const uint32_t lo = (row_ok && k_lo < D) ? base[brow * D + k_lo].x : 0u;
          const uint32_t hi = (row_ok && k_hi < D) ? base[brow * D + k_hi].x : 0u;
          w[j] = lo | (hi << 16);  // lower feature in the low half ([L])
        }
        *dst = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }

  // One stage's kBK / 16 mma steps of this warp's kWarpM x kWarpN sub-tile.
  __device__ __forceinline__ static void compute_stage(const Shared& s, int slot, int wm,
                                                       int wn, int lane,
                                                       float (&acc)[kFragM][kFragN][4]) {
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      // A, one x4 per m16 tile: lane l addresses row l % 16 of the tile, chunk 2 ks + l / 16,
      // so matrix q = l / 8 is rows 8 (q & 1) .. + 7 x k 8 (q >> 1) .. + 7: d0..d3 are the
      // registers a0a1, a2a3, a4a5, a6a7 of [A].
      uint32_t a[kFragM][4];
#pragma unroll
      for (int mi = 0; mi < kFragM; ++mi) {
        const int row = wm * kWarpM + mi * 16 + (lane % 16);
        const int chunk = 2 * ks + lane / 16;
        mma_detail::ldmatrix_x4(
            a[mi], mma_detail::smem_addr(&s.u.stage[slot][row][swizzle(row, chunk)]));
      }
      // B, one x4 per pair of n8 tiles: lane l addresses candidate row (l % 8) + 8 (l / 16) of
      // the pair, chunk 2 ks + (l / 8) % 2, so matrix q is n 8 (q >> 1) .. + 7 x
      // k 8 (q & 1) .. + 7: d0, d1 = b0b1, b2b3 of the first n8 tile, d2, d3 of the second ([B]).
      uint32_t b[kFragN][2];
#pragma unroll
      for (int nj = 0; nj < kFragN; nj += 2) {
        const int row = kBM + wn * kWarpN + nj * 8 + (lane % 8) + 8 * (lane / 16);
        const int chunk = 2 * ks + (lane / 8) % 2;
        uint32_t d[4];
        mma_detail::ldmatrix_x4(
            d, mma_detail::smem_addr(&s.u.stage[slot][row][swizzle(row, chunk)]));
        b[nj][0] = d[0];
        b[nj][1] = d[1];
        b[nj + 1][0] = d[2];
        b[nj + 1][1] = d[3];
      }
#pragma unroll
      for (int mi = 0; mi < kFragM; ++mi) {
#pragma unroll
        for (int nj = 0; nj < kFragN; ++nj) {
          mma_detail::Mma16816<scalar_t>::run(acc[mi][nj], a[mi], b[nj][0], b[nj][1]);
        }
      }
    }
  }

  // The K loop: a kStages-deep pipeline over kt = 0 .. ceil(D / kBK) - 1. Iteration kt waits
  // for stage kt (cp.async groups 0..kt complete: (kStages - 1) + kt groups were committed, at
  // most kStages - 2 may be pending), syncs (stage kt visible to all; every thread is done
  // with iteration kt - 1, which read the slot about to be refilled), refills that slot with
  // stage kt + kStages - 1, then computes stage kt. One group is committed per prologue step
  // and per iteration, empty past the last stage, so the counting holds at the tail. The
  // register-staged path follows the same order with stores instead of cp.async (the data of
  // stage kt was stored at least one __syncthreads before it is read). Returns after a final
  // __syncthreads: no thread reads or writes the staging area any more.
  template <bool kAsync>
  __device__ __forceinline__ static void k_loop(const Blocked& blk, Shared& s, int wm, int wn,
                                                int lane, float (&acc)[kFragM][kFragN][4]) {
    const int64_t num_k = ceil_div(blk.D, kBK);
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < num_k) load_stage<kAsync>(s, st, int64_t(st) * kBK, blk);
      if constexpr (kAsync) mma_detail::cp_async_commit();
    }
    int read_slot = 0, write_slot = kStages - 1;
    for (int64_t kt = 0; kt < num_k; ++kt) {
      if constexpr (kAsync) mma_detail::cp_async_wait<kStages - 2>();
      __syncthreads();
      const int64_t next = kt + kStages - 1;
      if (next < num_k) load_stage<kAsync>(s, write_slot, next * kBK, blk);
      if constexpr (kAsync) mma_detail::cp_async_commit();
      compute_stage(s, read_slot, wm, wn, lane, acc);
      read_slot = read_slot + 1 == kStages ? 0 : read_slot + 1;
      write_slot = write_slot + 1 == kStages ? 0 : write_slot + 1;
    }
    if constexpr (kAsync) mma_detail::cp_async_wait<0>();
    __syncthreads();
  }

  // Writes the accumulators to the tile per [C]: acc[mi][nj][i] is tile row
  // wm kWarpM + 16 mi + g + 8 (i >= 2), column wn kWarpN + 8 nj + 2 t + (i & 1). Entries
  // outside a_rows x b_rows (global rows past nA / nB) are stored as 0. Banks: a store
  // instruction (fixed mi, h, nj, i) has lane (g, t) at word 9 g + 2 t + const (mod 32)
  // (stride = 9 mod 32): even g and odd g use disjoint bank parities, and within a parity
  // each bank is hit at most twice (2-way; no odd stride does better, and the odd stride is
  // what makes the epilogue's reads conflict-free along rows and along columns).
  __device__ __forceinline__ static void store_tile(Shared& s, int a_rows, int b_rows, int wm,
                                                    int wn, int lane,
                                                    const float (&acc)[kFragM][kFragN][4]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < kFragM; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * kWarpM + mi * 16 + g + 8 * h;
        const bool row_ok = r < a_rows;
#pragma unroll
        for (int nj = 0; nj < kFragN; ++nj) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int c = wn * kWarpN + nj * 8 + 2 * t + i;
            s.u.tile[r][c] = (row_ok && c < b_rows) ? acc[mi][nj][2 * h + i] : 0.f;
          }
        }
      }
    }
  }

  // Pre-sm_80 fallback (run() calls it only when compiled for such an arch; defined for every
  // arch so that no declaration depends on __CUDA_ARCH__): the same tile by FFMA on the
  // converted values, SimtMainloop64's scheme with (kBM / 16) x (kBN / 16) outputs per thread,
  // staged with plain loads into stage 0 of the same layout.
  __device__ static void run_simt(const Blocked& blk, Shared& s) {
    constexpr int kPerM = kBM / 16, kPerN = kBN / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[kPerM][kPerN];
#pragma unroll
    for (int i = 0; i < kPerM; ++i) {
#pragma unroll
      for (int j = 0; j < kPerN; ++j) acc[i][j] = 0.f;
    }
    auto elem = [&s](int row, int kk) -> float {
      const uint16_t* chunk =
          reinterpret_cast<const uint16_t*>(&s.u.stage[0][row][swizzle(row, kk / 8)]);
      return static_cast<float>(scalar_t(chunk[kk % 8], scalar_t::from_bits()));
    };
    for (int64_t k0 = 0; k0 < blk.D; k0 += kBK) {
      __syncthreads();  // the previous step is done with stage 0
      load_stage<false>(s, 0, k0, blk);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        float av[kPerM], bv[kPerN];
#pragma unroll
        for (int i = 0; i < kPerM; ++i) av[i] = elem(ty + 16 * i, kk);
#pragma unroll
        for (int j = 0; j < kPerN; ++j) bv[j] = elem(kBM + tx + 16 * j, kk);
#pragma unroll
        for (int i = 0; i < kPerM; ++i) {
#pragma unroll
          for (int j = 0; j < kPerN; ++j) acc[i][j] += av[i] * bv[j];
        }
      }
    }
    __syncthreads();  // every thread is done reading the staging area the tile aliases
#pragma unroll
    for (int i = 0; i < kPerM; ++i) {
      const int r = ty + 16 * i;
#pragma unroll
      for (int j = 0; j < kPerN; ++j) {
        const int c = tx + 16 * j;
        s.u.tile[r][c] = (r < blk.a_rows && c < blk.b_rows) ? acc[i][j] : 0.f;
      }
    }
  }

  // The concept's entry point: all kThreads threads; begins and ends with __syncthreads().
  __device__ static void run(const scalar_t* __restrict__ A, int64_t nA, int64_t a0,
                             const scalar_t* __restrict__ B, int64_t nB, int64_t b0, int64_t D,
                             Shared& s) {
    __syncthreads();  // the previous tile's epilogue may still read s
    const Blocked blk = Blocked::make(A, nA, a0, B, nB, b0, D);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    run_simt(blk, s);
#else
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
    float acc[kFragM][kFragN][4];
#pragma unroll
    for (int mi = 0; mi < kFragM; ++mi) {
#pragma unroll
      for (int nj = 0; nj < kFragN; ++nj) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][nj][i] = 0.f;
      }
    }
    // Block-uniform (kernel arguments only): both branches contain the same __syncthreads.
    const bool aligned =
        D % 8 == 0 &&
        ((reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(B)) % 16) == 0;
    if (aligned) {
      k_loop<true>(blk, s, wm, wn, lane, acc);
    } else {
      k_loop<false>(blk, s, wm, wn, lane, acc);
    }
    store_tile(s, blk.a_rows, blk.b_rows, wm, wn, lane, acc);
#endif
    __syncthreads();  // the tile is complete and visible to every thread
  }
};

// The 128 x 64 variant (8 warps as 4 x 2, 32 x 32 each, 3 stages): sizeof(Shared) =
// max(3 x 192 x 64 B = 36,864 B, 128 x 73 x 4 B = 37,376 B) = 37,376 B, under the 48 KB
// static limit; for grids too small to fill the GPU with 128 x 128 tiles.
template <typename scalar_t>
using MmaMainloop128x64 = MmaMainloop<scalar_t, 128, 64, 4, 2, 3>;

}  // namespace cuda
}  // namespace triplet_cuda
