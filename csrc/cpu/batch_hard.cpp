// Batch-hard mining on CPU: one fused pass over row blocks of distances (never N x N),
// then the mined distances recomputed exactly; backward touches only the mined pairs.
#include "batch_hard.h"

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "inputs.h"

namespace triplet_cuda {
namespace cpu {

namespace {

template <typename T, Metric M>
void mine_rows(const Prepared& p, const int64_t* lab, T* pd, int64_t* pi, T* nd, int64_t* ni) {
  const int64_t N = p.rows(), D = p.e.size(1);
  const T* e = p.e.data_ptr<T>();
  const T* aux = p.aux.data_ptr<T>();
  for_each_distance_row<T, M>(p, p, [&](int64_t a, const T* d) {
    const int64_t la = lab[a];
    // Strict comparisons while scanning j upwards: ties keep the lowest index.
    T best_pos = -std::numeric_limits<T>::infinity();
    T best_neg = std::numeric_limits<T>::infinity();
    int64_t ip = -1, in = -1;
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] == la) {
        if (j != a && (ip < 0 || d[j] > best_pos)) best_pos = d[j], ip = j;
      } else if (in < 0 || d[j] < best_neg) {
        best_neg = d[j], in = j;
      }
    }
    if (ip < 0 || in < 0) return;  // invalid anchor: outputs keep -1 / 0
    pi[a] = ip;
    ni[a] = in;
    pd[a] = pair_distance<M>(e + a * D, e + ip * D, D, aux[a], aux[ip]);
    nd[a] = pair_distance<M>(e + a * D, e + in * D, D, aux[a], aux[in]);
  });
}

}  // namespace

HardMined mine_batch_hard(const Prepared& p, const at::Tensor& labels, Metric metric) {
  const int64_t N = p.rows();
  const auto idx_opts = p.e.options().dtype(at::kLong);
  HardMined r{at::zeros({N}, p.e.options()), at::full({N}, -1, idx_opts),
              at::zeros({N}, p.e.options()), at::full({N}, -1, idx_opts)};
  if (N == 0) return r;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "batch_hard_mine", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      mine_rows<scalar_t, kM>(p, labels.data_ptr<int64_t>(), r.pos_dist.data_ptr<scalar_t>(),
                              r.pos_idx.data_ptr<int64_t>(), r.neg_dist.data_ptr<scalar_t>(),
                              r.neg_idx.data_ptr<int64_t>());
    });
  });
  return r;
}

namespace {

// embeddings: (N, D), labels: (N,) -> (pos_dist (N), pos_idx (N) int64, neg_dist (N),
// neg_idx (N) int64); distances in the dtype of embeddings.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  const Metric m = static_cast<Metric>(metric);
  const HardMined r = mine_batch_hard(prepare(embeddings, m), lab, m);
  const auto dt = embeddings.scalar_type();
  return {r.pos_dist.to(dt), r.pos_idx, r.neg_dist.to(dt), r.neg_idx};
}

// Adds, for every mined pair (a, b) with coefficient g, the gradient of g * d(a, b).
template <typename T, Metric M>
void hard_backward(const Prepared& p, const T* g[2], const T* dist[2], const int64_t* idx[2],
                   T* grad) {
  const int64_t N = p.rows(), D = p.e.size(1);
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* aux = p.aux.data_ptr<T>();
  // Pair k = 2 * a + s (s = 0 positive, 1 negative). Coefficients first, in parallel.
  std::vector<PairGrad<T>> coef(2 * N);
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      for (int s = 0; s < 2; ++s) {
        const int64_t b = idx[s][a];
        coef[2 * a + s] = b < 0 ? PairGrad<T>{0, 0, 0}
                                : pair_grad<M>(g[s][a], dist[s][a], sq[a], sq[b], aux[a], aux[b]);
      }
    }
  });
  // Reverse index: the pairs in which row j is the partner, in ascending pair order.
  std::vector<int64_t> start(N + 1, 0), pairs(2 * N);
  for (int64_t k = 0; k < 2 * N; ++k) {
    const int64_t b = idx[k & 1][k >> 1];
    if (b >= 0) ++start[b + 1];
  }
  for (int64_t j = 0; j < N; ++j) start[j + 1] += start[j];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < 2 * N; ++k) {
      const int64_t b = idx[k & 1][k >> 1];
      if (b >= 0) pairs[fill[b]++] = k;
    }
  }
  // Each row owns its gradient: anchor terms, then partner terms in a fixed order.
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      T* gj = grad + j * D;
      const T* ej = e + j * D;
      for (int s = 0; s < 2; ++s) {
        const int64_t b = idx[s][j];
        if (b < 0) continue;
        const PairGrad<T> c = coef[2 * j + s];
        const T* eb = e + b * D;
        for (int64_t k = 0; k < D; ++k) gj[k] += c.ca * ej[k] + c.cab * eb[k];
      }
      for (int64_t q = start[j]; q < start[j + 1]; ++q) {
        const int64_t k2 = pairs[q], a = k2 >> 1;
        const PairGrad<T> c = coef[k2];
        const T* ea = e + a * D;
        for (int64_t k = 0; k < D; ++k) gj[k] += c.cab * ea[k] + c.cb * ej[k];
      }
    }
  });
}

// grad_pos_dist, grad_neg_dist: (N,); the forward's embeddings (N, D) and outputs -> (N, D).
at::Tensor batch_hard_mine_backward_cpu(const at::Tensor& grad_pos_dist,
                                        const at::Tensor& grad_neg_dist,
                                        const at::Tensor& embeddings, const at::Tensor& pos_dist,
                                        const at::Tensor& pos_idx, const at::Tensor& neg_dist,
                                        const at::Tensor& neg_idx, int64_t metric) {
  check_hard_backward_args(grad_pos_dist, grad_neg_dist, embeddings, pos_dist, pos_idx, neg_dist,
                           neg_idx, metric, c10::kCPU);
  const int64_t N = embeddings.size(0);
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  at::Tensor grad = at::zeros_like(p.e);
  if (N == 0) return grad.to(embeddings.scalar_type());
  const auto acc = p.e.scalar_type();
  const at::Tensor gp = grad_pos_dist.to(acc).contiguous(), gn = grad_neg_dist.to(acc).contiguous();
  const at::Tensor dp = pos_dist.to(acc).contiguous(), dn = neg_dist.to(acc).contiguous();
  const at::Tensor ip = pos_idx.contiguous(), in = neg_idx.contiguous();
  const int64_t* idx[2] = {ip.data_ptr<int64_t>(), in.data_ptr<int64_t>()};
  for (int s = 0; s < 2; ++s) {
    for (int64_t a = 0; a < N; ++a) {
      TORCH_CHECK(idx[s][a] >= -1 && idx[s][a] < N, "triplet_cuda: ", s ? "neg_idx" : "pos_idx",
                  " must hold indices in [-1, ", N, "), got ", idx[s][a], " at ", a);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "batch_hard_mine_backward", [&] {
    const scalar_t* g[2] = {gp.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>()};
    const scalar_t* dist[2] = {dp.data_ptr<scalar_t>(), dn.data_ptr<scalar_t>()};
    TC_METRIC_SWITCH(metric, kM, [&] {
      hard_backward<scalar_t, kM>(p, g, dist, idx, grad.data_ptr<scalar_t>());
    });
  });
  return grad.to(embeddings.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m) {
  m.impl("batch_hard_mine", &batch_hard_mine_cpu);
  m.impl("batch_hard_mine_backward", &batch_hard_mine_backward_cpu);
}

}  // namespace cpu
}  // namespace triplet_cuda
