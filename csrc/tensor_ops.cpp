// Out-of-line ATen calls of the CPU kernels (see tensor_ops.h for why).
#include "tensor_ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

namespace triplet_cuda {

at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::zeros(sizes, options);
}

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

at::Tensor full(at::IntArrayRef sizes, const at::Scalar& value, const at::TensorOptions& options) {
  return at::full(sizes, value, options);
}

at::Tensor ones(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::ones(sizes, options);
}

at::Tensor zeros_like(const at::Tensor& like) { return at::zeros(like.sizes(), like.options()); }

at::Tensor empty_like(const at::Tensor& like) { return at::empty(like.sizes(), like.options()); }

at::Tensor stack(at::TensorList tensors) { return at::stack(tensors); }

at::Tensor scalar_tensor(const at::Scalar& value, const at::TensorOptions& options) {
  return at::scalar_tensor(value, options);
}

void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

}  // namespace triplet_cuda
