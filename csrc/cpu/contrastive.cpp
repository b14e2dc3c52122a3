// Contrastive loss on CPU over unordered pairs i < j, fused over upper-triangle blocks: row
// block [r0, r0 + b) against the candidates [r0, N) only, so every pair's distance is
// computed once (about half the GEMM work of full rows). The backward recomputes the same
// blocks and turns the per-pair weights into the gradient with two GEMMs per block
// (one-sided: each pair i < j feeds both rows). Deterministic: fixed block and sum orders.
#include "ops_cpu.h"

#include <algorithm>
#include <vector>

#include "loss.h"

namespace triplet_cuda {
namespace cpu {
namespace {

template <typename T, Metric M>
struct Contrastive {
  static RowTotals forward(const Prepared& p, const int64_t* l, T margin) {
    const int64_t N = p.rows();
    std::vector<RowTotals> rows(N);
    for_each_upper_block(p, M, sizeof(T), [&](int64_t r0, int64_t b, const at::Tensor& dist) {
      const int64_t C = N - r0;
      const T* dp = dist.data_ptr<T>();
      at::parallel_for(0, b, row_grain(C), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t a = r0 + i;
          const T* d = dp + i * C;
          RowTotals t;
          t.valid = N - 1 - a;
          for (int64_t j = i + 1; j < C; ++j) {  // candidates a + 1 .. N - 1
            const T term = epi::contrastive_term(l[r0 + j] == l[a], d[j], margin);
            t.sum += term;
            t.positive += term > T(0);
          }
          rows[a] = t;
        }
      });
    });
    RowTotals total;
    for (const RowTotals& r : rows) total += r;
    return total;
  }

  static at::Tensor backward(const Prepared& p, const int64_t* l, T margin, T g) {
    const int64_t N = p.rows();
    at::Tensor grad = at::zeros_like(p.e);
    for_each_upper_block(p, M, 2 * sizeof(T), [&](int64_t r0, int64_t b, at::Tensor& dist) {
      const int64_t C = N - r0;
      at::Tensor W = at::empty_like(dist);
      const T* dp = dist.data_ptr<T>();
      T* wp = W.data_ptr<T>();
      at::parallel_for(0, b, row_grain(C), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t a = r0 + i;
          const T* d = dp + i * C;
          T* w = wp + i * C;
          std::fill(w, w + i + 1, T(0));  // j <= i: not a pair i < j
          for (int64_t j = i + 1; j < C; ++j) {
            w[j] = g * epi::contrastive_weight(l[r0 + j] == l[a], d[j], margin);
          }
        }
      });
      accumulate_distance_grad(W, dist, p, r0, p, r0, M, grad, grad);
    });
    return grad;
  }
};

// Row policy of the query-vs-reference op (loss.h): ordered pairs (a, j), j any candidate but
// the anchor itself (the epilogue's contrastive term and weight).
template <typename T, Metric M>
struct ContrastiveRows {
  RowLabels l;
  T margin;
  ContrastiveRows(const RowLabels& lb, T mg) : l(lb), margin(mg) {}

  RowTotals forward(int64_t a, const T* d) const {
    RowTotals t;
    const int64_t la = l.anchor[a], self = l.self_of(a);
    for (int64_t j = 0; j < l.cols; ++j) {
      if (j == self) continue;
      const T term = epi::contrastive_term(l.cand[j] == la, d[j], margin);
      t.sum += term;
      t.positive += term > T(0);
      ++t.valid;
    }
    return t;
  }

  void weights(int64_t a, const T* d, T g, T* w) const {
    const int64_t la = l.anchor[a], self = l.self_of(a);
    for (int64_t j = 0; j < l.cols; ++j) {
      w[j] = j == self ? T(0) : g * epi::contrastive_weight(l.cand[j] == la, d[j], margin);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  double margin, int64_t metric) {
  return loss_forward<Contrastive>(embeddings, labels, margin, metric);
}

at::Tensor contrastive_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                                const at::Tensor& labels, double margin, int64_t metric) {
  return loss_backward<Contrastive>(grad_loss_sum, embeddings, labels, margin, metric);
}

// Query vs reference: ordered pairs over anchor rows x reference columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_ref_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, double margin, int64_t metric) {
  return ref_loss_forward<ContrastiveRows>(embeddings, labels, ref, ref_labels, self_index,
                                           margin, metric);
}

std::tuple<at::Tensor, at::Tensor> contrastive_ref_backward(
    const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,
    double margin, int64_t metric, bool ref_grad) {
  return ref_loss_backward<ContrastiveRows>(grad_loss_sum, embeddings, labels, ref, ref_labels,
                                            self_index, margin, metric, ref_grad);
}

}  // namespace cpu
}  // namespace triplet_cuda
