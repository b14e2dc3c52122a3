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

// The inputs of a mining entry point, checked and contiguous on the current device: anchors
// x (N, D) with labels lab (N) int64 against the batch itself (y, ref_lab, self undefined) or
// against a reference set y (M, D) with ref_lab (M) int64 and self (N) int64 (the reference
// row that is each anchor, -1: none).
struct MineArgs {
  at::Tensor x, lab;
  at::Tensor y, ref_lab, self;
  bool symmetric() const { return !self.defined(); }
};

// Per anchor the farthest positive and the nearest negative among the candidates (indices
// into them), -1 / 0 where none.
HardMinedCuda batch_hard_mine_impl(const MineArgs& in, int64_t metric);

// Every valid (anchor, positive) pair with its semi-hard negative, sorted by (a, p)
// -> (a, p, n) int64 (T,) each, p and n indexing the candidates.
std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_triplets_impl(const MineArgs& in,
                                                                      int64_t metric);

}  // namespace cuda
}  // namespace triplet_cuda
