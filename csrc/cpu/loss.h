// Generic CPU driver of the fused loss ops (batch all, semi hard, contrastive).
//
// A loss is described by a row policy Rows<T, M> with
//   Rows(const int64_t* labels, int64_t N, T margin)
//   RowTotals forward(int64_t a, const T* d) const;       // row a's share of the loss
//   void weights(int64_t a, const T* d, T g, T* w) const; // w_j = g * d(row share) / d d_aj
// where d points at the N distances of anchor a. The driver runs the rows over distance
// blocks (O(block * N) memory), sums the row totals in a fixed order, and for the backward
// turns the weights into the embedding gradient.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "distance.h"
#include "inputs.h"

namespace triplet_cuda {
namespace cpu {

struct RowTotals {
  double sum = 0;        // sum of the row's terms
  int64_t valid = 0;     // valid terms
  int64_t positive = 0;  // terms > 0
};

// embeddings: (N, D), labels: (N,) -> (loss_sum 0-d accumulation dtype, num_valid 0-d int64,
// num_positive 0-d int64).
template <template <typename, Metric> class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const at::Tensor& embeddings,
                                                           const at::Tensor& labels,
                                                           double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  std::vector<RowTotals> rows(p.rows());
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "loss_forward", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      const Rows<scalar_t, kM> policy(lab.data_ptr<int64_t>(), p.rows(),
                                      static_cast<scalar_t>(margin));
      for_each_distance_row<scalar_t, kM>(
          p, p, [&](int64_t a, const scalar_t* d) { rows[a] = policy.forward(a, d); });
    });
  });
  RowTotals total;
  for (const RowTotals& r : rows) {
    total.sum += r.sum;
    total.valid += r.valid;
    total.positive += r.positive;
  }
  return {acc_scalar(total.sum, p.e), long_scalar(total.valid, p.e),
          long_scalar(total.positive, p.e)};
}

// grad_loss_sum: 0-d; embeddings: (N, D); labels: (N,) -> grad (N, D) in the embeddings' dtype.
template <template <typename, Metric> class Rows>
at::Tensor loss_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                         const at::Tensor& labels, double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  TORCH_CHECK(grad_loss_sum.numel() == 1, "triplet_cuda: grad_loss_sum must have one element, got ",
              grad_loss_sum.sizes());
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  if (p.rows() == 0) return at::zeros_like(embeddings, at::MemoryFormat::Contiguous);
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "loss_backward", [&] {
    const scalar_t g = grad_loss_sum.item<scalar_t>();
    TC_METRIC_SWITCH(metric, kM, [&] {
      const Rows<scalar_t, kM> policy(lab.data_ptr<int64_t>(), p.rows(),
                                      static_cast<scalar_t>(margin));
      grad = dense_backward<scalar_t, kM>(
          p, [&](int64_t a, const scalar_t* d, scalar_t* w) { policy.weights(a, d, g, w); });
    });
  });
  return grad.to(embeddings.scalar_type());
}

}  // namespace cpu
}  // namespace triplet_cuda
