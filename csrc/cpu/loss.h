// Generic CPU driver of the loss ops (batch all, semi hard, contrastive).
//
// loss_forward<Loss> / loss_backward<Loss> are the op entry points: they check the arguments,
// prepare the embeddings once and dispatch on dtype and metric to a loss
//   Loss<T, M>::forward(const Prepared&, const int64_t* labels, T margin) -> RowTotals
//   Loss<T, M>::backward(const Prepared&, const int64_t* labels, T margin, T g) -> grad (N, D)
// (accumulation dtype, N > 0 for the backward).
//
// rows_forward / rows_backward run a row policy Rows<T, M> with
//   Rows(const int64_t* labels, int64_t N, T margin)
//   RowTotals forward(int64_t a, const T* d) const;       // row a's share of the loss
//   void weights(int64_t a, const T* d, T g, T* w) const; // w_j = g * d(row share) / d d_aj
// where d points at the N distances of anchor a, over full distance rows in blocks
// (O(block * N) memory), summing the row totals in a fixed order; for the backward they turn
// the weights into the embedding gradient.
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

  RowTotals& operator+=(const RowTotals& r) {
    sum += r.sum;
    valid += r.valid;
    positive += r.positive;
    return *this;
  }
};

template <typename T, Metric M, template <typename, Metric> class Rows>
RowTotals rows_forward(const Prepared& p, const int64_t* lab, T margin) {
  std::vector<RowTotals> rows(p.rows());
  const Rows<T, M> policy(lab, p.rows(), margin);
  for_each_distance_row<T, M>(p, p, [&](int64_t a, const T* d) { rows[a] = policy.forward(a, d); });
  RowTotals total;
  for (const RowTotals& r : rows) total += r;
  return total;
}

template <typename T, Metric M, template <typename, Metric> class Rows>
at::Tensor rows_backward(const Prepared& p, const int64_t* lab, T margin, T g) {
  const Rows<T, M> policy(lab, p.rows(), margin);
  return dense_backward<T, M>(p, [&](int64_t a, const T* d, T* w) { policy.weights(a, d, g, w); });
}

// embeddings: (N, D), labels: (N,) -> (loss_sum 0-d accumulation dtype, num_valid 0-d int64,
// num_positive 0-d int64).
template <template <typename, Metric> class Loss>
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const at::Tensor& embeddings,
                                                           const at::Tensor& labels,
                                                           double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  const Prepared p = prepare(embeddings, static_cast<Metric>(metric));
  RowTotals total;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "loss_forward", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      total = Loss<scalar_t, kM>::forward(p, lab.data_ptr<int64_t>(), static_cast<scalar_t>(margin));
    });
  });
  return {acc_scalar(total.sum, p.e), long_scalar(total.valid, p.e),
          long_scalar(total.positive, p.e)};
}

// grad_loss_sum: 0-d; embeddings: (N, D); labels: (N,) -> grad (N, D) in the embeddings' dtype.
template <template <typename, Metric> class Loss>
at::Tensor loss_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                         const at::Tensor& labels, double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  TORCH_CHECK(grad_loss_sum.numel() == 1, "triplet_cuda: grad_loss_sum must have one element, got ",
              grad_loss_sum.sizes());
  const Prepared p = prepare(embeddings, static_cast<Metric>(metric));
  if (p.rows() == 0) return at::zeros_like(embeddings, at::MemoryFormat::Contiguous);
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "loss_backward", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      grad = Loss<scalar_t, kM>::backward(p, lab.data_ptr<int64_t>(), static_cast<scalar_t>(margin),
                                          grad_loss_sum.item<scalar_t>());
    });
  });
  return grad.to(embeddings.scalar_type());
}

}  // namespace cpu
}  // namespace triplet_cuda
