// The two tiled kernels every dense path shares, declared here and compiled once (tiles.cu),
// not in every .cu that uses them:
//   * launch_distance: a (rows x cols) block of distances on the TileMainloop (the loss ops'
//     distance chunks, pairwise_distance, knn),
//   * launch_pair_grad: one side of the gradient of sum_ij W_ij d(x_i, y_j) (pair_grad.cuh;
//     the loss ops' dense backward, pairwise_distance's backward).
// tiles.cu instantiates them for every embedding dtype and metric, with outputs / weights in
// the accumulation type, and (float16 / bfloat16) in the embedding dtype as well. A
// combination used elsewhere but not instantiated there is an undefined symbol: the CUDA
// compile check (.ci/check_cuda_compile.sh) fails on it.
#pragma once

#include "distance.cuh"

namespace triplet_cuda {
namespace cuda {

// Distances between the nA rows of A and the nB rows of B (both (n, D) contiguous on the
// current device, with their statistics) into out (row stride ldo).
template <typename scalar_t, typename acc_t, typename out_t, Metric M>
void launch_distance(const scalar_t* A, RowStats<acc_t> sa, int64_t nA, const scalar_t* B,
                     RowStats<acc_t> sb, int64_t nB, int64_t D, out_t* out, int64_t ldo,
                     cudaStream_t stream);

// Writes (or, with accumulate, adds) one side of the gradient of sum_ij W_ij d(x_i, y_j):
//   TRANS == false: out (nI, D) = grad w.r.t. X;  TRANS == true: out (nJ, D) = grad w.r.t. Y.
// W, dist: (nI, ldw) row-major, w_t; X (nI, D), Y (nJ, D) contiguous; out contiguous.
// `acc_options` are the tensor options for the acc_t split partials.
template <typename scalar_t, typename acc_t, typename w_t, Metric M, bool TRANS, typename out_t>
void launch_pair_grad(const w_t* W, const w_t* dist, int64_t ldw, const scalar_t* X,
                      RowStats<acc_t> sx, int64_t nI, const scalar_t* Y, RowStats<acc_t> sy,
                      int64_t nJ, int64_t D, out_t* out, bool accumulate,
                      const at::TensorOptions& acc_options, cudaStream_t stream);

}  // namespace cuda
}  // namespace triplet_cuda
