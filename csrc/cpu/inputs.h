// Argument checks shared by the CPU entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>

#include "../checks.h"

namespace triplet_cuda {
namespace cpu {

// Checks (embeddings (N, D), labels (N,), metric) of a CPU op and returns the labels as
// contiguous int64.
inline at::Tensor check_batch(const at::Tensor& embeddings, const at::Tensor& labels,
                              int64_t metric) {
  return check_batch_args(embeddings, labels, metric, c10::kCPU);
}

// A 0-d tensor of the accumulation dtype of `like` holding v.
inline at::Tensor acc_scalar(double v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options().dtype(
                                  like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

inline at::Tensor long_scalar(int64_t v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options().dtype(at::kLong));
}

}  // namespace cpu
}  // namespace triplet_cuda
