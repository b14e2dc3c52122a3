// RowLabels: what a CUDA row kernel knows of the labels -- anchor labels, candidate labels and
// the self index -- so that one kernel serves the batch against itself and anchors against a
// reference set (the *_ref ops) alike. The CUDA counterpart of csrc/cpu/loss.h's RowLabels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace triplet_cuda {
namespace cuda {

// Anchor a (label anchor[a]) against the candidates j = 0 .. cols - 1 (labels cand[j]), of
// which self_of(a) is the anchor itself: never its own positive nor a pair. self == nullptr:
// the batch against itself (cand == anchor, self_of(a) = a); else self[a] in [-1, cols) as
// checked by the caller (-1: none). A self index out of range only excludes nothing: it is
// compared, never dereferenced unchecked.
struct RowLabels {
  const int64_t* anchor;  // (N) int64
  const int64_t* cand;    // (cols) int64
  const int64_t* self;    // (N) int64, or nullptr: the batch itself
  int64_t cols;
  __device__ __forceinline__ int64_t self_of(int64_t a) const {
    return self != nullptr ? self[a] : a;
  }
  __host__ __device__ __forceinline__ bool symmetric() const { return self == nullptr; }
};

// RowLabels of the batch against itself (labels (N,) int64 contiguous) or of anchors
// (labels) against a reference set (ref_labels (M,), self_index (N,) int64 contiguous).
inline RowLabels batch_row_labels(const at::Tensor& labels) {
  const int64_t* l = labels.data_ptr<int64_t>();
  return {l, l, nullptr, labels.numel()};
}
inline RowLabels ref_row_labels(const at::Tensor& labels, const at::Tensor& ref_labels,
                                const at::Tensor& self_index) {
  return {labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(),
          self_index.data_ptr<int64_t>(), ref_labels.numel()};
}

}  // namespace cuda
}  // namespace triplet_cuda
