// Contrastive losses on CPU over unordered pairs i < j, in one fused pass over upper-triangle
// blocks: row block [r0, r0 + b) against the candidates [r0, N) only, so every pair's distance
// is computed once (half the GEMM work of full rows). Per block: one GEMM of dot products,
// then per row the epilogue (distances, the form's terms and, when a gradient is wanted, the
// pair-gradient coefficients written over the dot products: csrc/epilogue.h), then two GEMMs
// turn the coefficients into the gradient of the block's rows and of its candidates (each pair
// i < j feeds both; the weights are symmetric, so this one-sided product is the whole gradient).
//
// The loss sum is the only differentiable output and its gradient is g * d(sum)/dx, so a
// forward whose caller needs a gradient (contrastive_loss_with_grad) computes d(sum)/dx in the
// same pass, from the block it has in hand: 1.5 GEMMs of N x N x D in all, where a forward
// followed by a recomputing backward costs 2. The backward ops recompute (create_graph, direct
// calls, and the split positive / negative gradients of the hinge form).
//
// Deterministic: fixed blocks, fixed row groups (their column partial sums are added in group
// order), fixed lanes within a row; nothing depends on the thread count.
#include "ops_cpu.h"


#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "distance.h"
#include "inputs.h"
#include "loss.h"

namespace triplet_cuda {
namespace cpu {
namespace {

// Positive (same label) and negative pairs apart: their term sums and terms > 0.
struct Totals {
  double pos_sum = 0, neg_sum = 0;
  int64_t pos_nonzero = 0, neg_nonzero = 0;
  Totals& operator+=(const Totals& t) {
    pos_sum += t.pos_sum;
    neg_sum += t.neg_sum;
    pos_nonzero += t.pos_nonzero;
    neg_nonzero += t.neg_nonzero;
    return *this;
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

// Rows of a block come in chunks of kChunk; a task takes chunk c and its mirror (the last but
// c), so tasks cost the same although the rows of an upper-triangle block get shorter. The
// chunks of a task keep one column partial-sum row: the task set is fixed, not per thread.
constexpr int64_t kChunk = 16;
// Labels as int32 ids, which the pair loop compares 4 at a time: the labels themselves when
// they fit in int32, else the ranks of their distinct values.
std::vector<int32_t> label_ids(const int64_t* l, int64_t N) {
  std::vector<int32_t> ids(N);
  const bool fits = std::all_of(l, l + N, [](int64_t v) {
    return v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
  });
  if (fits) {
    std::copy(l, l + N, ids.begin());
    return ids;
  }
  std::vector<int64_t> values(l, l + N);
  std::sort(values.begin(), values.end());
  values.erase(std::unique(values.begin(), values.end()), values.end());
  for (int64_t i = 0; i < N; ++i) {
    ids[i] = static_cast<int32_t>(std::lower_bound(values.begin(), values.end(), l[i]) - values.begin());
  }
  return ids;
}

template <typename T, Metric M, bool kGrad, typename Terms>
Totals contrastive_pass(const Prepared& p, const int64_t* l, const Terms& terms, T g_pos,
                        T g_neg, at::Tensor* grad) {
  const int64_t N = p.rows(), D = p.e.size(1);
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  std::vector<Totals> rows(N);
  const std::vector<int32_t> ids = label_ids(l, N);
  const int64_t B = block_rows(N, N, sizeof(T));
  for (int64_t r0 = 0; r0 < N; r0 += B) {
    const int64_t b = std::min(B, N - r0), C = N - r0;
    const at::Tensor xr = p.e.narrow(0, r0, b), xc = p.e.narrow(0, r0, C);
    at::Tensor G = xr.mm(xc.t());  // (b, C) dot products, then coefficients
    T* gp = G.data_ptr<T>();
    const int64_t chunks = (b + kChunk - 1) / kChunk, tasks = (chunks + 1) / 2;
    at::Tensor colpart, rowq;  // per task column sums, per row sums of the self coefficients
    if constexpr (kGrad) {
      colpart = zeros({tasks, C}, p.e.options());
      rowq = empty({b}, p.e.options());
    }
    const T* sqc = sq + r0;
    const T* invc = inv + r0;
    const int32_t* idc = ids.data() + r0;
    const T* ec = e + r0 * D;

    // One row: distances into dist (the dot products stay in row for the near-zero rule),
    // then the terms and, with kGrad, the coefficients over the dot products. Both loops
    // vectorise (omp simd; the reductions' lanes are fixed by the build, not the threads).
    auto row_fn = [&](int64_t i, T* cp, T* dist) {
      const int64_t a = r0 + i, j0 = i + 1;
      const int32_t la = ids[a];
      T* row = gp + i * C;
      const T sq_a = sq[a], inv_a = inv[a], gp_ = g_pos, gn_ = g_neg;
      const Terms tm = terms;  // locals: the stores to row and cp cannot alias them
      int64_t near = 0;
#pragma omp simd reduction(+ : near)
      for (int64_t j = j0; j < C; ++j) {
        const T v = epi::gram_value<M>(row[j], sq_a, inv_a, sqc[j], invc[j]);
        near += epi::needs_exact<M>(v, sq_a, sqc[j]);
        dist[j] = epi::finish<M>(v);
      }
      if (near > 0) {  // near-zero pairs: the exact distance from the rows (epi::distance)
        const T* xa = e + a * D;
        for (int64_t j = j0; j < C; ++j) {
          dist[j] = distance_from_dot<M>(row[j], xa, ec + j * D, D, sq_a, inv_a, sqc[j], invc[j]);
        }
      }
      double ps = 0, ns = 0, q = 0;
      int64_t pc = 0, nc = 0;
#pragma omp simd reduction(+ : ps, ns, q, pc, nc)
      for (int64_t j = j0; j < C; ++j) {
        const bool same = idc[j] == la;
        const T d = dist[j];
        const T term = tm.term(same, d);
        const T tp = same ? term : T(0), tn = same ? T(0) : term;
        ps += tp;
        ns += tn;
        pc += tp > T(0);
        nc += tn > T(0);
        if constexpr (kGrad) {
          const T w = (same ? gp_ : gn_) * tm.weight(same, d);
          const epi::PairGrad<T> c = epi::pair_grad_scaled<M>(w, d, T(1), T(1), inv_a, invc[j]);
          row[j] = c.cab;
          q += c.ca;
          cp[j] += c.cb;
        }
      }
      Totals& t = rows[a];
      t.pos_sum = ps;
      t.neg_sum = ns;
      t.pos_nonzero = pc;
      t.neg_nonzero = nc;
      if constexpr (kGrad) {
        std::fill(row, row + j0, T(0));  // j <= i: not a pair i < j
        rowq.data_ptr<T>()[i] = static_cast<T>(q);
      }
    };
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> dist(C);
      for (int64_t t = t0; t < t1; ++t) {
        T* cp = kGrad ? colpart.data_ptr<T>() + t * C : nullptr;
        const int64_t mirror = chunks - 1 - t;  // == t only for the middle of an odd count
        for (int64_t i = t * kChunk; i < std::min(b, (t + 1) * kChunk); ++i) row_fn(i, cp, dist.data());
        if (mirror != t) {
          for (int64_t i = mirror * kChunk; i < std::min(b, (mirror + 1) * kChunk); ++i) row_fn(i, cp, dist.data());
        }
      }
    });
    if constexpr (kGrad) {
      // column sums of the self coefficients, the task partials added in task order
      at::Tensor colq = empty({C}, p.e.options());
      const T* cpp = colpart.data_ptr<T>();
      T* cq = colq.data_ptr<T>();
      at::parallel_for(0, C, 4096, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          double s = 0;
          for (int64_t t = 0; t < tasks; ++t) s += cpp[t * C + j];
          cq[j] = static_cast<T>(s);
        }
      });
      at::Tensor gx = grad->narrow(0, r0, b);
      gx.addcmul_(rowq.mul(p.scale.narrow(0, r0, b)).unsqueeze(1), xr);
      gx.addmm_(G, xc);
      at::Tensor gy = grad->narrow(0, r0, C);
      gy.addcmul_(colq.mul(p.scale.narrow(0, r0, C)).unsqueeze(1), xc);
      gy.addmm_(G.t(), xr);
    }
  }
  Totals total;
  for (const Totals& r : rows) total += r;
  return total;
}

// Checks the arguments, prepares the embeddings and runs the pass for their dtype and metric.
// make_terms(T{}) -> the form's terms in T. With kGrad, the gradient of
// g_pos * pos_sum + g_neg * neg_sum (accumulation dtype) comes back too.
template <bool kGrad, typename MakeTerms>
std::pair<Totals, at::Tensor> run(const at::Tensor& embeddings, const at::Tensor& labels,
                                  int64_t metric, MakeTerms&& make_terms, double g_pos = 0,
                                  double g_neg = 0) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  const Prepared p = prepare(embeddings, static_cast<Metric>(metric));
  Totals total;
  at::Tensor grad = kGrad ? zeros_like(p.e) : at::Tensor();
  if (p.rows() < 2) return {total, grad};  // no pair: a 0 gradient, not 0 * NaN via the GEMMs
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "contrastive", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      total = contrastive_pass<scalar_t, kM, kGrad>(p, lab.data_ptr<int64_t>(),
                                                    make_terms(scalar_t(0)),
                                                    static_cast<scalar_t>(g_pos),
                                                    static_cast<scalar_t>(g_neg), &grad);
    });
  });
  return {total, grad};
}

auto hadsell(double margin) {
  return [margin](auto zero) {
    using T = decltype(zero);
    return epi::HadsellTerms<T>{static_cast<T>(margin)};
  };
}

// (loss_sum, num_valid = N (N - 1) / 2, num_positive) of the Hadsell form.
std::tuple<at::Tensor, at::Tensor, at::Tensor> hadsell_outputs(const Totals& t,
                                                              const at::Tensor& embeddings) {
  const int64_t N = embeddings.size(0);
  return {acc_scalar(t.pos_sum + t.neg_sum, embeddings), long_scalar(N * (N - 1) / 2, embeddings),
          long_scalar(t.pos_nonzero + t.neg_nonzero, embeddings)};
}

double grad_value(const at::Tensor& g, const char* name) {
  TORCH_CHECK(g.numel() == 1, "triplet_cuda: ", name, " must have one element, got ", g.sizes());
  return g.item<double>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  double margin, int64_t metric) {
  return hadsell_outputs(run<false>(embeddings, labels, metric, hadsell(margin)).first, embeddings);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_with_grad(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric) {
  auto [t, grad] = run<true>(embeddings, labels, metric, hadsell(margin), 1.0, 1.0);
  auto [loss_sum, num_valid, num_positive] = hadsell_outputs(t, embeddings);
  return {loss_sum, num_valid, num_positive, grad};
}

at::Tensor contrastive_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                                const at::Tensor& labels, double margin, int64_t metric) {
  const double g = grad_value(grad_loss_sum, "grad_loss_sum");
  return run<true>(embeddings, labels, metric, hadsell(margin), g, g)
      .second.to(embeddings.scalar_type());
}

namespace {

auto hinge(double pos_margin, double neg_margin) {
  return [pos_margin, neg_margin](auto zero) {
    using T = decltype(zero);
    return epi::HingeTerms<T>{static_cast<T>(pos_margin), static_cast<T>(neg_margin)};
  };
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_hinge_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, double pos_margin, double neg_margin,
    int64_t metric) {
  const Totals t = run<false>(embeddings, labels, metric, hinge(pos_margin, neg_margin)).first;
  return {acc_scalar(t.pos_sum, embeddings), long_scalar(t.pos_nonzero, embeddings),
          acc_scalar(t.neg_sum, embeddings), long_scalar(t.neg_nonzero, embeddings)};
}

at::Tensor contrastive_hinge_backward(const at::Tensor& grad_pos_sum, const at::Tensor& grad_neg_sum,
                                      const at::Tensor& embeddings, const at::Tensor& labels,
                                      double pos_margin, double neg_margin, int64_t metric) {
  const double gp = grad_value(grad_pos_sum, "grad_pos_sum");
  const double gn = grad_value(grad_neg_sum, "grad_neg_sum");
  return run<true>(embeddings, labels, metric, hinge(pos_margin, neg_margin), gp, gn)
      .second.to(embeddings.scalar_type());
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
