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

// Calls fn(r0, b, dist) for consecutive row blocks, dist the (b, N - r0) distances of rows
// [r0, r0 + b) against rows [r0, N). block_bytes_per_elem sizes the block (workspaces).
template <typename Fn>
void for_each_upper_block(const Prepared& p, Metric m, int64_t bytes_per_elem, Fn&& fn) {
  const int64_t N = p.rows();
  const int64_t B = block_rows(N, N, bytes_per_elem);
  for (int64_t r0 = 0; r0 < N; r0 += B) {
    const int64_t b = std::min(B, N - r0);
    at::Tensor dist = distance_block(p, r0, b, p, r0, N - r0, m);
    fn(r0, b, dist);
  }
}

}  // namespace

// embeddings: (N, D), labels: (N,) -> (loss_sum 0-d accumulation dtype, num_valid 0-d int64,
// num_positive 0-d int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  const int64_t N = p.rows();
  std::vector<RowTotals> rows(N);
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "contrastive_forward", [&] {
    using T = scalar_t;
    const int64_t* l = lab.data_ptr<int64_t>();
    const T mg = static_cast<T>(margin);
    for_each_upper_block(p, m, sizeof(T), [&](int64_t r0, int64_t b, const at::Tensor& dist) {
      const int64_t C = N - r0;
      const T* dp = dist.data_ptr<T>();
      at::parallel_for(0, b, row_grain(C), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t a = r0 + i;
          const T* d = dp + i * C;
          RowTotals t;
          t.valid = N - 1 - a;
          for (int64_t j = i + 1; j < C; ++j) {  // candidates a + 1 .. N - 1
            const T term = epi::contrastive_term(l[r0 + j] == l[a], d[j], mg);
            t.sum += term;
            t.positive += term > T(0);
          }
          rows[a] = t;
        }
      });
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
at::Tensor contrastive_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                                const at::Tensor& labels, double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  TORCH_CHECK(grad_loss_sum.numel() == 1, "triplet_cuda: grad_loss_sum must have one element, got ",
              grad_loss_sum.sizes());
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  const int64_t N = p.rows();
  at::Tensor grad = at::zeros_like(p.e);
  if (N == 0) return grad.to(embeddings.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "contrastive_backward", [&] {
    using T = scalar_t;
    const int64_t* l = lab.data_ptr<int64_t>();
    const T mg = static_cast<T>(margin);
    const T g = grad_loss_sum.item<T>();
    for_each_upper_block(p, m, 2 * sizeof(T), [&](int64_t r0, int64_t b, at::Tensor& dist) {
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
            w[j] = g * epi::contrastive_weight(l[r0 + j] == l[a], d[j], mg);
          }
        }
      });
      accumulate_distance_grad(W, dist, p, r0, p, r0, m, grad, grad);
    });
  });
  return grad.to(embeddings.scalar_type());
}

}  // namespace cpu
}  // namespace triplet_cuda
