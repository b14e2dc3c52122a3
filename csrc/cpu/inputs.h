// Argument checks shared by the CPU entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../checks.h"
#include "../tensor_ops.h"

namespace triplet_cuda {
namespace cpu {

// Checks (embeddings (N, D), labels (N,), metric) of a CPU op and returns the labels as
// contiguous int64.
inline at::Tensor check_batch(const at::Tensor& embeddings, const at::Tensor& labels,
                              int64_t metric) {
  return check_batch_args(embeddings, labels, metric, c10::kCPU);
}

// The inputs of a query-vs-reference CPU op, checked: labels (N,), ref_labels (M,) and
// self_index (N,) (values in [-1, M), check_ref_args) as contiguous int64.
struct RefInputs {
  at::Tensor lab, ref_lab, self;
};

inline RefInputs check_ref_batch(const at::Tensor& embeddings, const at::Tensor& labels,
                                 const at::Tensor& ref, const at::Tensor& ref_labels,
                                 const at::Tensor& self_index, int64_t metric) {
  RefInputs r;
  r.lab = check_batch(embeddings, labels, metric);
  std::tie(r.ref_lab, r.self) = check_ref_args(embeddings, ref, ref_labels, self_index);
  return r;
}

// A 0-d tensor of the accumulation dtype of `like` holding v.
inline at::Tensor acc_scalar(double v, const at::Tensor& like) {
  return scalar_tensor(v, like.options().dtype(
                                  like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

inline at::Tensor long_scalar(int64_t v, const at::Tensor& like) {
  return scalar_tensor(v, like.options().dtype(at::kLong));
}

}  // namespace cpu
}  // namespace triplet_cuda
