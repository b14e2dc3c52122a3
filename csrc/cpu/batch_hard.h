// Batch-hard mining on CPU, shared by the batch_hard_mine op and mine_triplets.
#pragma once

#include <ATen/core/Tensor.h>

#include "distance.h"

namespace triplet_cuda {
namespace cpu {

struct HardMined {
  at::Tensor pos_dist;  // (N) accumulation dtype, exact pair distance; 0 when invalid
  at::Tensor pos_idx;   // (N) int64, -1 when invalid
  at::Tensor neg_dist;  // (N)
  at::Tensor neg_idx;   // (N)
};

// p: prepared embeddings (N, D); labels: (N) int64 contiguous.
HardMined mine_batch_hard(const Prepared& p, const at::Tensor& labels, Metric metric);

}  // namespace cpu
}  // namespace triplet_cuda
