// Shared definitions for every triplet_cuda kernel, CPU and CUDA alike:
// the metric enum, the compile-time metric switch and the argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#ifdef __CUDACC__
#define TC_HOST_DEVICE __host__ __device__
#else
#define TC_HOST_DEVICE
#endif

namespace triplet_cuda {

// Metric codes as passed through the op schemas (an `int metric`).
// Keep in sync with triplet_cuda/_ops.py::METRICS.
enum class Metric : int64_t {
  kEuclidean = 0,         // ||a - b||
  kSquaredEuclidean = 1,  // ||a - b||^2
  kCosine = 2,            // 1 - <a, b> / (max(||a||, eps) * max(||b||, eps))
};

// Norm floor of the cosine metric, as torch.nn.functional.cosine_similarity.
constexpr double kCosineEps = 1e-8;

// Below this fraction of ||a||^2 + ||b||^2, the Gram expansion ||a||^2 + ||b||^2 - 2<a,b> of a
// squared distance is mostly rounding noise (its error is about sqrt(D) * eps * (||a||^2 +
// ||b||^2)): the kernels recompute such pairs from explicit differences, so duplicates and
// the diagonal are exactly 0 and close pairs keep their relative precision. T is the
// accumulation type (float or double).
template <typename T>
TC_HOST_DEVICE constexpr T gram_near_zero() {
  return sizeof(T) == sizeof(double) ? T(1.0 / (1024.0 * 1024.0)) : T(1.0 / 1024.0);
}

// Strategy codes of the mine_triplets op. Keep in sync with _ops.py::STRATEGIES.
enum class Strategy : int64_t { kBatchHard = 0, kBatchAll = 1, kSemiHard = 2 };

}  // namespace triplet_cuda

// Argument checks whose messages name the argument, what was expected and what came.
#define TC_CHECK_METRIC(metric)                                                  \
  TORCH_CHECK((metric) >= 0 && (metric) <= 2,                                    \
              "triplet_cuda: metric must be 0 (euclidean), 1 (squared_euclidean) " \
              "or 2 (cosine), got ",                                             \
              (metric))

#define TC_CHECK_EMBEDDINGS(x, name)                                                   \
  do {                                                                                 \
    TORCH_CHECK((x).dim() == 2, "triplet_cuda: ", name,                                \
                " must be a 2-D (N, D) tensor, got ", (x).dim(), "-D with shape ",     \
                (x).sizes());                                                          \
    TORCH_CHECK(at::isFloatingType((x).scalar_type()), "triplet_cuda: ", name,        \
                " must be float32, float64, float16 or bfloat16, got ",                \
                (x).scalar_type());                                                    \
  } while (0)

#define TC_CHECK_LABELS(labels, x)                                                         \
  do {                                                                                     \
    TORCH_CHECK((labels).dim() == 1, "triplet_cuda: labels must be a 1-D (N,) tensor, got ", \
                (labels).dim(), "-D with shape ", (labels).sizes());                       \
    TORCH_CHECK(!at::isFloatingType((labels).scalar_type()) &&                             \
                    !at::isComplexType((labels).scalar_type()) &&                          \
                    (labels).scalar_type() != at::kBool,                                   \
                "triplet_cuda: labels must have an integer dtype, got ",                   \
                (labels).scalar_type());                                                   \
    TORCH_CHECK((labels).size(0) == (x).size(0), "triplet_cuda: labels must have length ", \
                (x).size(0), " (embeddings.size(0)), got ", (labels).size(0));             \
    TORCH_CHECK((labels).device() == (x).device(),                                         \
                "triplet_cuda: labels must be on the device of embeddings (",              \
                (x).device(), "), got ", (labels).device());                               \
  } while (0)

#define TC_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                      \
  TORCH_CHECK((a).device() == (b).device(), "triplet_cuda: ", name_b,                   \
              " must be on the device of ", name_a, " (", (a).device(), "), got ",     \
              (b).device())

#define TC_CHECK_DEVICE_TYPE(x, name, DEVICE_TYPE)                                     \
  TORCH_CHECK((x).device().type() == (DEVICE_TYPE), "triplet_cuda: ", name,            \
              " must be a ", (DEVICE_TYPE), " tensor here, got ", (x).device())

#define TC_CHECK_SHAPE(x, name, ...)                                                     \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "triplet_cuda: ", name,     \
              " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

// Compile-time metric switch (the idea of flash-attention's static_switch.h):
//   TC_METRIC_SWITCH(metric, kMetric, [&] { kernel<kMetric>(...); });
#define TC_METRIC_SWITCH(METRIC, CONST_NAME, ...)                                     \
  [&] {                                                                                \
    switch (static_cast<::triplet_cuda::Metric>(METRIC)) {                             \
      case ::triplet_cuda::Metric::kEuclidean: {                                       \
        constexpr ::triplet_cuda::Metric CONST_NAME = ::triplet_cuda::Metric::kEuclidean; \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::triplet_cuda::Metric::kSquaredEuclidean: {                                \
        constexpr ::triplet_cuda::Metric CONST_NAME =                                  \
            ::triplet_cuda::Metric::kSquaredEuclidean;                                 \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::triplet_cuda::Metric::kCosine: {                                          \
        constexpr ::triplet_cuda::Metric CONST_NAME = ::triplet_cuda::Metric::kCosine; \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      default:                                                                         \
        TORCH_CHECK(false, "triplet_cuda: unknown metric code ", METRIC);              \
    }                                                                                  \
  }()
