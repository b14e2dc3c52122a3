// Argument checks shared by the CPU and CUDA entry points. `device_type` is the device the
// calling kernel serves; every message names the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "common.h"

namespace triplet_cuda {

// (embeddings (N, D), labels (N,), metric) of a batch op; returns labels as contiguous int64.
inline at::Tensor check_batch_args(const at::Tensor& embeddings, const at::Tensor& labels,
                                   int64_t metric, c10::DeviceType device_type) {
  TC_CHECK_EMBEDDINGS(embeddings, "embeddings");
  TC_CHECK_DEVICE_TYPE(embeddings, "embeddings", device_type);
  TC_CHECK_LABELS(labels, embeddings);
  TC_CHECK_METRIC(metric);
  return labels.to(at::kLong).contiguous();
}

// The reference set ref (M, D) of a query-vs-reference op (its forward or backward): a 2-D
// floating tensor on the device of embeddings (N, D), of its dtype and feature size.
inline void check_ref_embeddings(const at::Tensor& embeddings, const at::Tensor& ref) {
  TC_CHECK_EMBEDDINGS(ref, "ref");
  TC_CHECK_SAME_DEVICE(embeddings, ref, "embeddings", "ref");
  TORCH_CHECK(ref.scalar_type() == embeddings.scalar_type(),
              "triplet_cuda: ref must have the dtype of embeddings (", embeddings.scalar_type(),
              "), got ", ref.scalar_type());
  TORCH_CHECK(ref.size(1) == embeddings.size(1),
              "triplet_cuda: ref must have the feature size of embeddings (", embeddings.size(1),
              "), got ", ref.size(1));
}

// The values of self_index (N,) int64: -1 (the anchor is no reference row) or a row of the M
// reference rows. On a GPU this costs one reduction and a device sync (the kernels would only
// compare an out-of-range value, never dereference it, but it would silently exclude nothing).
inline void check_self_index_values(const at::Tensor& self_index, int64_t M) {
  const int64_t N = self_index.numel();
  if (N == 0) return;
  if (self_index.device().is_cpu()) {
    const at::Tensor s = self_index.contiguous();
    const int64_t* v = s.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(v[i] >= -1 && v[i] < M, "triplet_cuda: self_index must hold values in [-1, ", M,
                  ") (ref.size(0) = ", M, "), got ", v[i], " at ", i);
    }
    return;
  }
  const at::Tensor bad = self_index.lt(-1).logical_or_(self_index.ge(M));
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero().select(1, 0).select(0, 0).item<int64_t>();
  const int64_t v = self_index.select(0, i).item<int64_t>();
  TORCH_CHECK(false, "triplet_cuda: self_index must hold values in [-1, ", M, ") (ref.size(0) = ",
              M, "), got ", v, " at ", i);
}

// The reference set of a query-vs-reference op: ref (M, D) as check_ref_embeddings;
// ref_labels (M,) integer; self_index (N,) int64 (which reference row each anchor is, -1:
// none; values range-checked, check_self_index_values). Returns (ref_labels, self_index) as
// contiguous int64.
inline std::pair<at::Tensor, at::Tensor> check_ref_args(const at::Tensor& embeddings,
                                                        const at::Tensor& ref,
                                                        const at::Tensor& ref_labels,
                                                        const at::Tensor& self_index) {
  check_ref_embeddings(embeddings, ref);
  TORCH_CHECK(ref_labels.dim() == 1, "triplet_cuda: ref_labels must be a 1-D (M,) tensor, got ",
              ref_labels.dim(), "-D with shape ", ref_labels.sizes());
  TORCH_CHECK(!at::isFloatingType(ref_labels.scalar_type()) &&
                  !at::isComplexType(ref_labels.scalar_type()) &&
                  ref_labels.scalar_type() != at::kBool,
              "triplet_cuda: ref_labels must have an integer dtype, got ", ref_labels.scalar_type());
  TORCH_CHECK(ref_labels.size(0) == ref.size(0), "triplet_cuda: ref_labels must have length ",
              ref.size(0), " (ref.size(0)), got ", ref_labels.size(0));
  TC_CHECK_SAME_DEVICE(embeddings, ref_labels, "embeddings", "ref_labels");
  TORCH_CHECK(self_index.scalar_type() == at::kLong,
              "triplet_cuda: self_index must be int64, got ", self_index.scalar_type());
  TC_CHECK_SHAPE(self_index, "self_index", embeddings.size(0));
  TC_CHECK_SAME_DEVICE(embeddings, self_index, "embeddings", "self_index");
  check_self_index_values(self_index, ref.size(0));
  return {ref_labels.to(at::kLong).contiguous(), self_index.contiguous()};
}

// (x (N, D), y (M, D), metric) of pairwise_distance and its backward.
inline void check_pair_args(const at::Tensor& x, const at::Tensor& y, int64_t metric,
                            c10::DeviceType device_type) {
  TC_CHECK_EMBEDDINGS(x, "x");
  TC_CHECK_EMBEDDINGS(y, "y");
  TC_CHECK_DEVICE_TYPE(x, "x", device_type);
  TC_CHECK_SAME_DEVICE(x, y, "x", "y");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "triplet_cuda: y must have the dtype of x (",
              x.scalar_type(), "), got ", y.scalar_type());
  TORCH_CHECK(y.size(1) == x.size(1), "triplet_cuda: y must have the feature size of x (",
              x.size(1), "), got ", y.size(1));
  TC_CHECK_METRIC(metric);
}

// The inputs of batch_hard_mine_backward: embeddings (N, D) and six (N,) tensors, the index
// ones int64, all on the device of embeddings.
inline void check_hard_backward_args(const at::Tensor& grad_pos_dist,
                                     const at::Tensor& grad_neg_dist,
                                     const at::Tensor& embeddings, const at::Tensor& pos_dist,
                                     const at::Tensor& pos_idx, const at::Tensor& neg_dist,
                                     const at::Tensor& neg_idx, int64_t metric,
                                     c10::DeviceType device_type) {
  TC_CHECK_EMBEDDINGS(embeddings, "embeddings");
  TC_CHECK_DEVICE_TYPE(embeddings, "embeddings", device_type);
  TC_CHECK_METRIC(metric);
  const int64_t N = embeddings.size(0);
  const std::pair<const at::Tensor*, const char*> per_anchor[] = {
      {&grad_pos_dist, "grad_pos_dist"}, {&grad_neg_dist, "grad_neg_dist"},
      {&pos_dist, "pos_dist"},           {&neg_dist, "neg_dist"},
      {&pos_idx, "pos_idx"},             {&neg_idx, "neg_idx"}};
  for (const auto& [t, name] : per_anchor) {
    TC_CHECK_SHAPE(*t, name, N);
    TC_CHECK_SAME_DEVICE(embeddings, *t, "embeddings", name);
  }
  TORCH_CHECK(pos_idx.scalar_type() == at::kLong && neg_idx.scalar_type() == at::kLong,
              "triplet_cuda: pos_idx and neg_idx must be int64, got ", pos_idx.scalar_type(),
              " and ", neg_idx.scalar_type());
}

}  // namespace triplet_cuda
