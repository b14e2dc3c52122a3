// Argument checks of the knn op, shared by its CPU and CUDA kernels.
#pragma once

#include "checks.h"

namespace triplet_cuda {

// query (N, D), ref (M, D) of one floating dtype and device, k >= 0, metric; self_offset
// -1 or in [0, M - N] (query row i is ref row self_offset + i).
inline void check_knn_args(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                           int64_t metric, int64_t self_offset, c10::DeviceType device_type) {
  TC_CHECK_EMBEDDINGS(query, "query");
  TC_CHECK_EMBEDDINGS(ref, "ref");
  TC_CHECK_DEVICE_TYPE(query, "query", device_type);
  TC_CHECK_SAME_DEVICE(query, ref, "query", "ref");
  TORCH_CHECK(ref.scalar_type() == query.scalar_type(),
              "triplet_cuda: ref must have the dtype of query (", query.scalar_type(), "), got ",
              ref.scalar_type());
  TORCH_CHECK(ref.size(1) == query.size(1),
              "triplet_cuda: ref must have the feature size of query (", query.size(1), "), got ",
              ref.size(1));
  TORCH_CHECK(k >= 0, "triplet_cuda: k must be >= 0, got ", k);
  TC_CHECK_METRIC(metric);
  TORCH_CHECK(self_offset == -1 || (self_offset >= 0 && self_offset + query.size(0) <= ref.size(0)),
              "triplet_cuda: self_offset must be -1 or in [0, ref.size(0) - query.size(0)] = [0, ",
              ref.size(0) - query.size(0), "], got ", self_offset);
}

}  // namespace triplet_cuda
