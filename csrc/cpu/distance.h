// CPU building blocks shared by every CPU kernel: embeddings prepared once,
// distance blocks (BLAS dot products + a fused epilogue), exact pair distances,
// the gradient of a distance, and the row-block drivers of the fused passes.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../common.h"
#include "../epilogue.h"
#include "../tensor_ops.h"

namespace triplet_cuda {
namespace cpu {

// Embeddings converted once to the accumulation dtype (float64 for float64 input,
// float32 otherwise), contiguous, with per-row statistics.
struct Prepared {
  at::Tensor e;       // (N, D) accumulation dtype, contiguous
  at::Tensor sqnorm;  // (N) ||e_i||^2
  at::Tensor inv;     // (N) 1 / max(||e_i||, eps) (used by the cosine metric)
  at::Tensor scale;   // (N) gradient self-term scale: 1, or for cosine 1/||e_i||^2 (0 below eps)
  int64_t rows() const { return e.size(0); }
};

// x: (N, D) any floating dtype and strides -> Prepared.
Prepared prepare(const at::Tensor& x, Metric metric);

at::ScalarType acc_type(at::ScalarType t);

// Rows per block so that one (rows, cols) block of the accumulation dtype stays near 8 MiB.
int64_t block_rows(int64_t rows, int64_t cols, int64_t elem_size);

// Distances between rows [r0, r0 + B) of x and rows [c0, c0 + C) of y: (B, C), accumulation
// dtype. The mainloop is one GEMM; the epilogue is epi::distance (csrc/epilogue.h).
at::Tensor distance_block(const Prepared& x, int64_t r0, int64_t B, const Prepared& y, int64_t c0,
                          int64_t C, Metric metric);

// Distances between rows [r0, r0 + B) of x and every row of y: (B, M).
inline at::Tensor distance_block(const Prepared& x, int64_t r0, int64_t B, const Prepared& y,
                                 Metric metric) {
  return distance_block(x, r0, B, y, 0, y.rows(), metric);
}

// Adds the gradient of sum_ij W_ij d(x_{r0+i}, y_{c0+j}) to grad_x rows [r0, r0+B) and to
// grad_y rows [c0, c0+C). W, dist: (B, C) accumulation dtype (both are overwritten); grad_x:
// (N, D), grad_y: (M, D), accumulation dtype (they may be the same tensor when x is y; an
// undefined grad_y skips y's gradient).
void accumulate_distance_grad(at::Tensor& W, at::Tensor& dist, const Prepared& x, int64_t r0,
                              const Prepared& y, int64_t c0, Metric metric, at::Tensor& grad_x,
                              at::Tensor& grad_y);

inline void accumulate_distance_grad(at::Tensor& W, at::Tensor& dist, const Prepared& x,
                                     int64_t r0, const Prepared& y, Metric metric,
                                     at::Tensor& grad_x, at::Tensor& grad_y) {
  accumulate_distance_grad(W, dist, x, r0, y, 0, metric, grad_x, grad_y);
}

// Rows per parallel_for task when each row costs `cols` element operations: small batches
// stay on one thread instead of paying a thread wake-up per row.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
}

// Explicit sum over k of (a_k - b_k)^2 (Euclidean metrics) or a_k b_k (cosine).
template <Metric M, typename T>
inline T explicit_sum(const T* a, const T* b, int64_t D) {
  T acc = 0;
  for (int64_t k = 0; k < D; ++k) {
    if constexpr (M == Metric::kCosine) {
      acc += a[k] * b[k];
    } else {
      const T diff = a[k] - b[k];
      acc += diff * diff;
    }
  }
  return acc;
}

// Exact distance of one pair from its rows (explicit differences, no Gram cancellation).
template <Metric M, typename T>
inline T pair_distance(const T* a, const T* b, int64_t D, T inv_a, T inv_b) {
  return epi::exact_distance<M>(explicit_sum<M>(a, b, D), inv_a, inv_b);
}

// Distance of rows a and b (D features) from their dot product (epi::distance: the Gram
// form, near-zero pairs recomputed from the rows, the NaN rule).
template <Metric M, typename T>
inline T distance_from_dot(T dot, const T* a, const T* b, int64_t D, T sq_a, T inv_a, T sq_b,
                           T inv_b) {
  return epi::distance<M>(dot, sq_a, inv_a, sq_b, inv_b, [&] {
    const T s = explicit_sum<M>(a, b, D);
    return epi::is_finite(s) ? s : epi::quiet_nan<T>();
  });
}

using epi::pair_grad;
using epi::PairGrad;

// Calls row_fn(i, dist_row) for every row i of x, dist_row pointing at the M distances
// d(x_i, y_j), j = 0..M-1, computed block by block (never N x M at once). Rows run in
// parallel; row_fn must only write state owned by row i.
template <typename T, Metric M, typename RowFn>
void for_each_distance_row(const Prepared& x, const Prepared& y, RowFn&& row_fn) {
  const int64_t N = x.rows(), Mc = y.rows();
  const int64_t B = block_rows(N, Mc, sizeof(T));
  for (int64_t r0 = 0; r0 < N; r0 += B) {
    const int64_t b = std::min(B, N - r0);
    const at::Tensor dist = distance_block(x, r0, b, y, M);
    const T* dp = dist.data_ptr<T>();
    at::parallel_for(0, b, row_grain(Mc), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) row_fn(r0 + i, dp + i * Mc);
    });
  }
}

// Upper-triangle row blocks of x against itself: calls fn(r0, b, dist) for consecutive row
// blocks, dist the (b, N - r0) distances of rows [r0, r0 + b) against rows [r0, N), so every
// pair is computed once. bytes_per_elem (all per-element workspaces together) sizes the block.
template <typename Fn>
void for_each_upper_block(const Prepared& p, Metric m, int64_t bytes_per_elem, Fn&& fn) {
  const int64_t N = p.rows();
  const int64_t B = block_rows(N, N, bytes_per_elem);
  for (int64_t r0 = 0; r0 < N; r0 += B) {
    const int64_t b = std::min(B, N - r0);
    at::Tensor dist = distance_block(p, r0, b, p, r0, N - r0, m);
    fn(r0, b, dist);
  }
}

// Gradient of a loss that is a function of the distances of the rows of x to the rows of y
// (M of them): weight_fn(i, dist_row, weight_row) writes d loss / d d(x_i, y_j) for all j of
// row i. Adds to grad_x (N, D) and grad_y (M, D) (accumulation dtype; the same tensor when x
// is y; undefined grad_y: y's gradient is skipped). Deterministic: the per-block matrix
// products are accumulated in a fixed order.
template <typename T, Metric M, typename WeightFn>
void dense_backward(const Prepared& x, const Prepared& y, WeightFn&& weight_fn, at::Tensor& grad_x,
                    at::Tensor& grad_y) {
  const int64_t N = x.rows(), Mc = y.rows();
  const int64_t B = block_rows(N, Mc, 2 * sizeof(T));
  for (int64_t r0 = 0; r0 < N; r0 += B) {
    const int64_t b = std::min(B, N - r0);
    at::Tensor dist = distance_block(x, r0, b, y, M);
    at::Tensor W = empty_like(dist);
    const T* dp = dist.data_ptr<T>();
    T* wp = W.data_ptr<T>();
    at::parallel_for(0, b, row_grain(Mc), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) weight_fn(r0 + i, dp + i * Mc, wp + i * Mc);
    });
    accumulate_distance_grad(W, dist, x, r0, y, M, grad_x, grad_y);
  }
}

// The same for the distance matrix of x with itself: returns (N, D) in the accumulation dtype.
template <typename T, Metric M, typename WeightFn>
at::Tensor dense_backward(const Prepared& x, WeightFn&& weight_fn) {
  at::Tensor grad = zeros_like(x.e);
  dense_backward<T, M>(x, x, weight_fn, grad, grad);
  return grad;
}

}  // namespace cpu
}  // namespace triplet_cuda
