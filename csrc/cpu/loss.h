// Generic CPU driver of the loss ops (batch all, semi hard, contrastive).
//
// loss_forward<Loss> / loss_backward<Loss> are the op entry points: they check the arguments,
// prepare the embeddings once and dispatch on dtype and metric to a loss
//   Loss<T, M>::forward(const Prepared&, const int64_t* labels, T margin) -> RowTotals
//   Loss<T, M>::backward(const Prepared&, const int64_t* labels, T margin, T g) -> grad (N, D)
// (accumulation dtype, N > 0 for the backward).
//
// rows_forward / rows_backward run a row policy Rows<T, M> with
//   Rows(const RowLabels& labels, T margin)
//   RowTotals forward(int64_t a, const T* d) const;       // row a's share of the loss
//   void weights(int64_t a, const T* d, T g, T* w) const; // w_j = g * d(row share) / d d_aj
// where d points at the distances of anchor a to its candidates (the batch: N of them; a
// reference set: M), over full distance rows in blocks (O(block * N) memory), summing the row
// totals in a fixed order; for the backward they turn the weights into the embedding
// gradient (and the reference set's).
//
// ref_loss_forward<Rows> / ref_loss_backward<Rows> are the entry points of the
// query-vs-reference ops (embeddings (N, D) anchors against ref (M, D) candidates): the same
// row policies over rectangular rows.
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

// What a row policy knows of the labels: anchor a (label anchor[a]) against the candidates
// j = 0 .. cols - 1 (labels cand[j]), of which self_of(a) is the anchor itself (never its own
// positive nor a pair; -1: none).
struct RowLabels {
  const int64_t* anchor;
  const int64_t* cand;
  int64_t cols;
  const int64_t* self;  // (N) self index per anchor, or nullptr: the batch itself, self_of(a) = a

  static RowLabels batch(const int64_t* lab, int64_t N) { return {lab, lab, N, nullptr}; }
  int64_t self_of(int64_t a) const { return self ? self[a] : a; }
};

// Rows of x (anchors) against the rows of y (candidates).
template <typename T, Metric M, template <typename, Metric> class Rows>
RowTotals rows_forward(const Prepared& x, const Prepared& y, const RowLabels& l, T margin) {
  std::vector<RowTotals> rows(x.rows());
  const Rows<T, M> policy(l, margin);
  for_each_distance_row<T, M>(x, y, [&](int64_t a, const T* d) { rows[a] = policy.forward(a, d); });
  RowTotals total;
  for (const RowTotals& r : rows) total += r;
  return total;
}

template <typename T, Metric M, template <typename, Metric> class Rows>
RowTotals rows_forward(const Prepared& p, const int64_t* lab, T margin) {
  return rows_forward<T, M, Rows>(p, p, RowLabels::batch(lab, p.rows()), margin);
}

// Adds the gradient to grad_x (N, D) and, when defined, grad_y (M, D).
template <typename T, Metric M, template <typename, Metric> class Rows>
void rows_backward(const Prepared& x, const Prepared& y, const RowLabels& l, T margin, T g,
                   at::Tensor& grad_x, at::Tensor& grad_y) {
  const Rows<T, M> policy(l, margin);
  dense_backward<T, M>(x, y, [&](int64_t a, const T* d, T* w) { policy.weights(a, d, g, w); },
                       grad_x, grad_y);
}

template <typename T, Metric M, template <typename, Metric> class Rows>
at::Tensor rows_backward(const Prepared& p, const int64_t* lab, T margin, T g) {
  const Rows<T, M> policy(RowLabels::batch(lab, p.rows()), margin);
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
  if (p.rows() == 0) return zeros_like(embeddings);
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "loss_backward", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      grad = Loss<scalar_t, kM>::backward(p, lab.data_ptr<int64_t>(), static_cast<scalar_t>(margin),
                                          grad_loss_sum.item<scalar_t>());
    });
  });
  return grad.to(embeddings.scalar_type());
}

// Query vs reference: embeddings (N, D), labels (N,) anchors; ref (M, D), ref_labels (M,)
// candidates; self_index (N,) int64 -> (loss_sum, num_valid, num_positive) as loss_forward.
template <template <typename, Metric> class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ref_loss_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, double margin, int64_t metric) {
  const RefInputs in = check_ref_batch(embeddings, labels, ref, ref_labels, self_index, metric);
  const Metric m = static_cast<Metric>(metric);
  const Prepared px = prepare(embeddings, m), py = prepare(ref, m);
  const RowLabels l{in.lab.data_ptr<int64_t>(), in.ref_lab.data_ptr<int64_t>(), py.rows(),
                    in.self.data_ptr<int64_t>()};
  RowTotals total;
  AT_DISPATCH_FLOATING_TYPES(px.e.scalar_type(), "ref_loss_forward", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      total = rows_forward<scalar_t, kM, Rows>(px, py, l, static_cast<scalar_t>(margin));
    });
  });
  return {acc_scalar(total.sum, px.e), long_scalar(total.valid, px.e),
          long_scalar(total.positive, px.e)};
}

// grad_loss_sum: 0-d -> (grad_embeddings (N, D), grad_ref (M, D), or an empty (0,) tensor when
// ref_grad is false: then no work is spent on it).
template <template <typename, Metric> class Rows>
std::tuple<at::Tensor, at::Tensor> ref_loss_backward(
    const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,
    double margin, int64_t metric, bool ref_grad) {
  const RefInputs in = check_ref_batch(embeddings, labels, ref, ref_labels, self_index, metric);
  TORCH_CHECK(grad_loss_sum.numel() == 1, "triplet_cuda: grad_loss_sum must have one element, got ",
              grad_loss_sum.sizes());
  const Metric m = static_cast<Metric>(metric);
  const Prepared px = prepare(embeddings, m), py = prepare(ref, m);
  at::Tensor gx = zeros_like(px.e);
  at::Tensor gy = ref_grad ? zeros_like(py.e) : at::Tensor();
  if (px.rows() > 0 && py.rows() > 0) {
    const RowLabels l{in.lab.data_ptr<int64_t>(), in.ref_lab.data_ptr<int64_t>(), py.rows(),
                      in.self.data_ptr<int64_t>()};
    AT_DISPATCH_FLOATING_TYPES(px.e.scalar_type(), "ref_loss_backward", [&] {
      TC_METRIC_SWITCH(metric, kM, [&] {
        rows_backward<scalar_t, kM, Rows>(px, py, l, static_cast<scalar_t>(margin),
                                          grad_loss_sum.item<scalar_t>(), gx, gy);
      });
    });
  }
  return {gx.to(embeddings.scalar_type()),
          ref_grad ? gy.to(ref.scalar_type()) : empty({0}, ref.options())};
}

}  // namespace cpu
}  // namespace triplet_cuda
