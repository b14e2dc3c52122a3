// Host entry points shared between the CUDA translation units (mine_triplets.cu reuses
// the batch-hard and semi-hard selections). Defined in batch_hard.cu / semi_hard.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace triplet_cuda {
namespace cuda {

struct HardMinedCuda {
  at::Tensor pos_dist;  // (N) embedding dtype, 0 for invalid anchors
  at::Tensor pos_idx;   // (N) int64, -1 for invalid anchors
  at::Tensor neg_dist;  // (N)
  at::Tensor neg_idx;   // (N) int64
};

// x: (N, D) contiguous CUDA tensor (current device set), labels: (N,) int64 contiguous.
HardMinedCuda batch_hard_mine_impl(const at::Tensor& x, const at::Tensor& labels, int64_t metric);

// Every valid (anchor, positive) pair with its semi-hard negative, sorted by (a, p):
// x: (N, D) contiguous, labels: (N,) int64 contiguous -> (a, p, n) int64 (T,) each.
std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_triplets_impl(const at::Tensor& x,
                                                                      const at::Tensor& labels,
                                                                      int64_t metric);

}  // namespace cuda
}  // namespace triplet_cuda
