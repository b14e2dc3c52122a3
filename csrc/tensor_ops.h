// The few ATen functions (factories, mm_out) that the CPU and CUDA kernels call, declared here
// and defined out of line in tensor_ops.cpp (device-agnostic: they dispatch on the options or
// the tensors like the ATen functions they wrap).
//
// Why: every ATen/ops/<op>.h header pulls ATen/Context.h and ATen/DeviceGuard.h, and
// ATen/TensorOperators.h pulls ATen/Functions.h (every op of ATen): ~5 s of parsing per C++
// translation unit on the 2-core machine, most of the cold JIT build, and more per .cu file
// (nvcc parses the host headers once per target architecture and once for the host). With
// these wrappers a kernel TU includes only ATen/core/Tensor.h (Tensor methods such as mm,
// sort, cumsum, where, gt are available there) and tensor_ops.cpp alone pays for the heavy
// headers. The call costs
// one out-of-line function call per tensor allocation.
#pragma once

#include <ATen/core/Tensor.h>

namespace triplet_cuda {

// sizes, options -> a new tensor filled with zeros / uninitialised / `value`.
at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor full(at::IntArrayRef sizes, const at::Scalar& value, const at::TensorOptions& options);
at::Tensor ones(at::IntArrayRef sizes, const at::TensorOptions& options);

// A contiguous tensor of like's sizes, dtype and device: zeros / uninitialised.
at::Tensor zeros_like(const at::Tensor& like);
at::Tensor empty_like(const at::Tensor& like);

// tensors (each of the same shape) stacked along a new dimension 0.
at::Tensor stack(at::TensorList tensors);

// A 0-d tensor holding value.
at::Tensor scalar_tensor(const at::Scalar& value, const at::TensorOptions& options);

// out (n, m) = a (n, k) @ b (k, m), written in place (no allocation).
void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

}  // namespace triplet_cuda
