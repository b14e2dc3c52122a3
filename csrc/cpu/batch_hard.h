// Batch-hard mining on CPU, shared by the batch_hard_mine op and mine_triplets.
#pragma once

#include <ATen/core/Tensor.h>

#include "distance.h"
#include "loss.h"

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

// Query vs reference: anchors x (N, D) against the reference rows y (M, D); l.cand the M
// reference labels, l.self the anchors' own reference rows (-1: none). Indices into y.
HardMined mine_batch_hard_ref(const Prepared& x, const Prepared& y, const RowLabels& l,
                              Metric metric);

}  // namespace cpu
}  // namespace triplet_cuda
