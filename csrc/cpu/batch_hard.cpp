// Batch-hard mining on CPU: one fused pass over row blocks of distances (never N x N),
// then the mined distances recomputed exactly; backward touches only the mined pairs.
#include "batch_hard.h"

#include "ops_cpu.h"

#include <limits>
#include <vector>

#include "inputs.h"

namespace triplet_cuda {
namespace cpu {

namespace {

// Upper-triangle pass: row block [r0, r0 + b) against the candidates [r0, N) only. The rows
// of the block take every candidate of that range (the block's own square included); the
// candidates beyond the block, c >= r0 + b, take the block's rows as their candidates. So
// each pair (i, j) is computed once, and every anchor still sees every candidate. The
// arg-best comparators are a total order on (distance, index) (csrc/epilogue.h), so the
// visiting order does not change the result: deterministic, same as a row-by-row scan.
template <typename T, Metric M>
void mine_rows(const Prepared& p, const int64_t* lab, T* pd, int64_t* pi, T* nd, int64_t* ni) {
  const int64_t N = p.rows(), D = p.e.size(1);
  const T* e = p.e.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  std::vector<epi::ArgFarthest<T>> pos(N);
  std::vector<epi::ArgNearest<T>> neg(N);
  constexpr int64_t kColChunk = 64;
  for_each_upper_block(p, M, sizeof(T), [&](int64_t r0, int64_t b, const at::Tensor& dist) {
    const int64_t C = N - r0;
    const T* dp = dist.data_ptr<T>();
    // Rows of the block: candidates [r0, N).
    at::parallel_for(0, b, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t a = r0 + i;
        const int64_t la = lab[a];
        const T* d = dp + i * C;
        epi::ArgFarthest<T> bp = pos[a];
        epi::ArgNearest<T> bn = neg[a];
        for (int64_t j = 0; j < C; ++j) {
          const int64_t c = r0 + j;
          const bool same = lab[c] == la;
          bp.update(d[j], same && c != a ? c : -1);
          bn.update(d[j], same ? -1 : c);
        }
        pos[a] = bp;
        neg[a] = bn;
      }
    });
    // Candidates beyond the block: the block's rows, column chunk by column chunk.
    const int64_t first = b;  // column offset of r0 + b
    const int64_t chunks = (C - first + kColChunk - 1) / kColChunk;
    at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(b * kColChunk)), [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t j0 = first + q * kColChunk, j1 = std::min(C, j0 + kColChunk);
        for (int64_t i = 0; i < b; ++i) {
          const int64_t a = r0 + i;
          const int64_t la = lab[a];
          const T* d = dp + i * C;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t c = r0 + j;
            const bool same = lab[c] == la;
            pos[c].update(d[j], same ? a : -1);
            neg[c].update(d[j], same ? -1 : a);
          }
        }
      }
    });
  });
  // The mined distances are recomputed exactly from the rows (no Gram cancellation).
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      const int64_t ip = pos[a].i, in = neg[a].i;
      if (ip < 0 || in < 0) continue;  // invalid anchor: outputs keep -1 / 0
      pi[a] = ip;
      ni[a] = in;
      pd[a] = pair_distance<M>(e + a * D, e + ip * D, D, inv[a], inv[ip]);
      nd[a] = pair_distance<M>(e + a * D, e + in * D, D, inv[a], inv[in]);
    }
  });
}

}  // namespace

HardMined mine_batch_hard(const Prepared& p, const at::Tensor& labels, Metric metric) {
  const int64_t N = p.rows();
  const auto idx_opts = p.e.options().dtype(at::kLong);
  HardMined r{zeros({N}, p.e.options()), full({N}, -1, idx_opts),
              zeros({N}, p.e.options()), full({N}, -1, idx_opts)};
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

// Query vs reference: each anchor row streams the reference rows block by block (for_each_
// distance_row: a (rows, M) block of about 8 MiB at a time, never N x M), keeping a running
// farthest positive and nearest negative; then the mined distances are recomputed exactly.
template <typename T, Metric M>
void mine_rows_ref(const Prepared& x, const Prepared& y, const RowLabels& l, T* pd, int64_t* pi,
                   T* nd, int64_t* ni) {
  const int64_t D = x.e.size(1), Mc = y.rows();
  const T* xe = x.e.data_ptr<T>();
  const T* ye = y.e.data_ptr<T>();
  const T* xinv = x.inv.data_ptr<T>();
  const T* yinv = y.inv.data_ptr<T>();
  for_each_distance_row<T, M>(x, y, [&](int64_t a, const T* d) {
    const int64_t la = l.anchor[a], self = l.self_of(a);
    epi::ArgFarthest<T> bp;
    epi::ArgNearest<T> bn;
    for (int64_t j = 0; j < Mc; ++j) {
      const bool same = l.cand[j] == la;
      bp.update(d[j], same && j != self ? j : -1);
      bn.update(d[j], same ? -1 : j);
    }
    if (bp.i < 0 || bn.i < 0) return;  // invalid anchor: outputs keep -1 / 0
    pi[a] = bp.i;
    ni[a] = bn.i;
    pd[a] = pair_distance<M>(xe + a * D, ye + bp.i * D, D, xinv[a], yinv[bp.i]);
    nd[a] = pair_distance<M>(xe + a * D, ye + bn.i * D, D, xinv[a], yinv[bn.i]);
  });
}

}  // namespace

HardMined mine_batch_hard_ref(const Prepared& x, const Prepared& y, const RowLabels& l,
                              Metric metric) {
  const int64_t N = x.rows();
  const auto idx_opts = x.e.options().dtype(at::kLong);
  HardMined r{zeros({N}, x.e.options()), full({N}, -1, idx_opts),
              zeros({N}, x.e.options()), full({N}, -1, idx_opts)};
  if (N == 0 || y.rows() == 0) return r;
  AT_DISPATCH_FLOATING_TYPES(x.e.scalar_type(), "batch_hard_mine_ref", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      mine_rows_ref<scalar_t, kM>(x, y, l, r.pos_dist.data_ptr<scalar_t>(),
                                  r.pos_idx.data_ptr<int64_t>(), r.neg_dist.data_ptr<scalar_t>(),
                                  r.neg_idx.data_ptr<int64_t>());
    });
  });
  return r;
}

// embeddings (N, D), labels (N,), ref (M, D), ref_labels (M,), self_index (N,) -> as
// batch_hard_mine_cpu, indices into ref.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_ref_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t metric) {
  const RefInputs in = check_ref_batch(embeddings, labels, ref, ref_labels, self_index, metric);
  const Metric m = static_cast<Metric>(metric);
  const Prepared px = prepare(embeddings, m), py = prepare(ref, m);
  const RowLabels l{in.lab.data_ptr<int64_t>(), in.ref_lab.data_ptr<int64_t>(), py.rows(),
                    in.self.data_ptr<int64_t>()};
  const HardMined r = mine_batch_hard_ref(px, py, l, m);
  const auto dt = embeddings.scalar_type();
  return {r.pos_dist.to(dt), r.pos_idx, r.neg_dist.to(dt), r.neg_idx};
}

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

// Reverse index of the mined pairs k = 2 a + s (s = 0 positive, 1 negative; partner idx[s][a],
// -1: none) by partner row: pairs[start[j] .. start[j + 1]) are the pairs whose partner is row j
// of the C candidate rows, in ascending k (a fixed order: the gradient sums are deterministic).
namespace {

struct PartnerIndex {
  std::vector<int64_t> start;  // (C + 1)
  std::vector<int64_t> pairs;  // (2 N), the first start[C] used
};

PartnerIndex partner_index(const int64_t* idx[2], int64_t N, int64_t C) {
  PartnerIndex r{std::vector<int64_t>(C + 1, 0), std::vector<int64_t>(2 * N)};
  for (int64_t k = 0; k < 2 * N; ++k) {
    const int64_t b = idx[k & 1][k >> 1];
    if (b >= 0) ++r.start[b + 1];
  }
  for (int64_t j = 0; j < C; ++j) r.start[j + 1] += r.start[j];
  std::vector<int64_t> fill(r.start.begin(), r.start.end() - 1);
  for (int64_t k = 0; k < 2 * N; ++k) {
    const int64_t b = idx[k & 1][k >> 1];
    if (b >= 0) r.pairs[fill[b]++] = k;
  }
  return r;
}

}  // namespace

// Adds, for every mined pair (a, b) with coefficient g, the gradient of g * d(a, b).
template <typename T, Metric M>
void hard_backward(const Prepared& p, const T* g[2], const T* dist[2], const int64_t* idx[2],
                   T* grad) {
  const int64_t N = p.rows(), D = p.e.size(1);
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  // Pair k = 2 * a + s (s = 0 positive, 1 negative). Coefficients first, in parallel.
  std::vector<PairGrad<T>> coef(2 * N);
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      for (int s = 0; s < 2; ++s) {
        const int64_t b = idx[s][a];
        coef[2 * a + s] = b < 0 ? PairGrad<T>{0, 0, 0}
                                : pair_grad<M>(g[s][a], dist[s][a], sq[a], sq[b], inv[a], inv[b]);
      }
    }
  });
  const PartnerIndex rev = partner_index(idx, N, N);
  const std::vector<int64_t>& start = rev.start;
  const std::vector<int64_t>& pairs = rev.pairs;
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
  at::Tensor grad = zeros_like(p.e);
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

// Query vs reference: for every mined pair (anchor a of x, reference row b of y) with
// coefficient g, the gradient of g * d(x_a, y_b), to grad_x and (when not null) grad_y. Each
// row owns its gradient (anchors: their two pairs; reference rows: the pairs naming them, in
// ascending pair order): deterministic, no atomics.
template <typename T, Metric M>
void hard_backward_ref(const Prepared& x, const Prepared& y, const T* g[2], const T* dist[2],
                       const int64_t* idx[2], T* grad_x, T* grad_y) {
  const int64_t N = x.rows(), Mc = y.rows(), D = x.e.size(1);
  const T* xe = x.e.data_ptr<T>();
  const T* ye = y.e.data_ptr<T>();
  const T *xsq = x.sqnorm.data_ptr<T>(), *ysq = y.sqnorm.data_ptr<T>();
  const T *xinv = x.inv.data_ptr<T>(), *yinv = y.inv.data_ptr<T>();
  std::vector<PairGrad<T>> coef(2 * N);  // pair k = 2 * a + s (s = 0 positive, 1 negative)
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      for (int s = 0; s < 2; ++s) {
        const int64_t b = idx[s][a];
        coef[2 * a + s] = b < 0 ? PairGrad<T>{0, 0, 0}
                                : pair_grad<M>(g[s][a], dist[s][a], xsq[a], ysq[b], xinv[a], yinv[b]);
      }
    }
  });
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      T* ga = grad_x + a * D;
      const T* ea = xe + a * D;
      for (int s = 0; s < 2; ++s) {
        const int64_t b = idx[s][a];
        if (b < 0) continue;
        const PairGrad<T> c = coef[2 * a + s];
        const T* eb = ye + b * D;
        for (int64_t k = 0; k < D; ++k) ga[k] += c.ca * ea[k] + c.cab * eb[k];
      }
    }
  });
  if (grad_y == nullptr) return;
  const PartnerIndex rev = partner_index(idx, N, Mc);
  const std::vector<int64_t>& start = rev.start;
  const std::vector<int64_t>& pairs = rev.pairs;
  at::parallel_for(0, Mc, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      T* gj = grad_y + j * D;
      const T* ej = ye + j * D;
      for (int64_t q = start[j]; q < start[j + 1]; ++q) {
        const int64_t k2 = pairs[q], a = k2 >> 1;
        const PairGrad<T> c = coef[k2];
        const T* ea = xe + a * D;
        for (int64_t k = 0; k < D; ++k) gj[k] += c.cab * ea[k] + c.cb * ej[k];
      }
    }
  });
}

// grad_pos_dist, grad_neg_dist: (N,); the forward's embeddings (N, D), ref (M, D) and outputs
// -> (grad_embeddings (N, D), grad_ref (M, D), or an empty (0,) tensor when ref_grad is false).
std::tuple<at::Tensor, at::Tensor> batch_hard_mine_ref_backward_cpu(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist, const at::Tensor& embeddings,
    const at::Tensor& ref, const at::Tensor& pos_dist, const at::Tensor& pos_idx,
    const at::Tensor& neg_dist, const at::Tensor& neg_idx, int64_t metric, bool ref_grad) {
  check_hard_backward_args(grad_pos_dist, grad_neg_dist, embeddings, pos_dist, pos_idx, neg_dist,
                           neg_idx, metric, c10::kCPU);
  check_ref_embeddings(embeddings, ref);
  const int64_t N = embeddings.size(0), Mc = ref.size(0);
  const Metric m = static_cast<Metric>(metric);
  const Prepared px = prepare(embeddings, m), py = prepare(ref, m);
  at::Tensor gx = zeros_like(px.e);
  at::Tensor gy = ref_grad ? zeros_like(py.e) : at::Tensor();
  auto result = [&] {
    return std::make_tuple(gx.to(embeddings.scalar_type()),
                           ref_grad ? gy.to(ref.scalar_type()) : zeros({0}, ref.options()));
  };
  if (N == 0) return result();
  const auto acc = px.e.scalar_type();
  const at::Tensor gp = grad_pos_dist.to(acc).contiguous(), gn = grad_neg_dist.to(acc).contiguous();
  const at::Tensor dp = pos_dist.to(acc).contiguous(), dn = neg_dist.to(acc).contiguous();
  const at::Tensor ip = pos_idx.contiguous(), in = neg_idx.contiguous();
  const int64_t* idx[2] = {ip.data_ptr<int64_t>(), in.data_ptr<int64_t>()};
  for (int s = 0; s < 2; ++s) {
    for (int64_t a = 0; a < N; ++a) {
      TORCH_CHECK(idx[s][a] >= -1 && idx[s][a] < Mc, "triplet_cuda: ", s ? "neg_idx" : "pos_idx",
                  " must hold indices in [-1, ", Mc, ") (ref.size(0)), got ", idx[s][a], " at ", a);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "batch_hard_mine_ref_backward", [&] {
    const scalar_t* g[2] = {gp.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>()};
    const scalar_t* dist[2] = {dp.data_ptr<scalar_t>(), dn.data_ptr<scalar_t>()};
    TC_METRIC_SWITCH(metric, kM, [&] {
      hard_backward_ref<scalar_t, kM>(px, py, g, dist, idx, gx.data_ptr<scalar_t>(),
                                      ref_grad ? gy.data_ptr<scalar_t>() : nullptr);
    });
  });
  return result();
}

}  // namespace cpu
}  // namespace triplet_cuda
