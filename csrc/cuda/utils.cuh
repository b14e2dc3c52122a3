// Small CUDA helpers shared by every triplet_cuda kernel: includes, launch checks,
// deterministic warp / block reductions, binary search, tensor helpers.
//
// Only c10 CUDA headers are used (no ATen/cuda/CUDAContext.h, which pulls cuBLAS).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../tensor_ops.h"

namespace triplet_cuda {
namespace cuda {

// Launch-size limits.
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x
constexpr int kWarp = 32;
// Blocks of the one-warp-per-row kernels (batch hard's finalize and backward): 8 warps.
constexpr int kWarpsPerBlock = 8;
constexpr int kWarpBlockThreads = kWarpsPerBlock * kWarp;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The accumulation dtype of an embedding dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Number of SMs of the current device (used to size split-over-candidates grids), queried
// once per device and cached (the attribute cannot change while the process runs).
inline int sm_count() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  static std::mutex mutex;
  static std::vector<int> cache;  // cache[dev]: SM count, 0 until queried
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(dev) >= cache.size()) cache.resize(static_cast<size_t>(dev) + 1, 0);
  if (cache[dev] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = sms > 0 ? sms : 1;
  }
  return cache[dev];
}

// Checks that a 1-D grid of `blocks` blocks can be launched and returns it as dim3.
inline dim3 grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxGridX, "triplet_cuda: grid of ", blocks,
              " blocks is out of range");
  return dim3(static_cast<unsigned int>(blocks));
}

// Grid of a grid-stride elementwise kernel over n elements (kElementwiseThreads threads).
constexpr int kElementwiseThreads = 256;
inline dim3 elementwise_grid(int64_t n) {
  const int64_t blocks = ceil_div(n, kElementwiseThreads);
  return grid_1d(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// Shared argument checks of the (embeddings, labels, metric) CUDA ops; returns the
// labels as contiguous int64.
inline at::Tensor check_batch_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                   int64_t metric) {
  return check_batch_args(embeddings, labels, metric, c10::kCUDA);
}

// ------------------------------------------------------------------------ device helpers

// Converts any embedding scalar (float, double, c10::Half, c10::BFloat16) to acc_t.
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

// Sum over the 32 lanes of a warp by a fixed butterfly: every lane gets the same,
// order-fixed result (deterministic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024) in a fixed order.
// Every thread of the block must call it; every thread gets the total. `smem` must hold
// 32 values of T; it may be reused by the next call (the function syncs before writing).
template <typename T>
__device__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = lane < nwarps ? smem[lane] : T(0);
  total = warp_sum(total);  // every warp reduces the same values in the same order
  return total;
}

// Number of leading elements of [0, n) for which pred holds, given that pred is true on
// a prefix and false after it (std::partition_point).
template <typename Pred>
__device__ __forceinline__ int64_t partition_point(int64_t n, Pred pred) {
  int64_t lo = 0, hi = n;  // invariant: pred true on [0, lo), false on [hi, n)
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// sqrt / max / reciprocal in the accumulation type (float or double).
__device__ __forceinline__ float acc_sqrt(float v) { return ::sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return ::sqrt(v); }
// std::max semantics (a NaN first argument propagates), as the CPU kernels.
template <typename T>
__device__ __forceinline__ T acc_max(T a, T b) {
  return (a < b) ? b : a;
}

template <typename acc_t>
__device__ __forceinline__ acc_t acc_inf() {
  return std::numeric_limits<acc_t>::infinity();
}

}  // namespace cuda
}  // namespace triplet_cuda
