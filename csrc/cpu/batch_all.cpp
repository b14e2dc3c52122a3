// Batch-all triplet loss on CPU without the N x N x N tensor. Per anchor, few positives are
// scanned against every negative (the shared epilogue, csrc/epilogue.h); many are sorted once
// and each negative's active positives (d_ap - d_an + margin > 0), a suffix of them, are found
// by binary search, suffix sums giving the sum of its active terms. O(N^2 min(K, log K)) time
// for K positives per anchor, O(block * N) memory.
#include "ops_cpu.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "fused.h"
#include "loss.h"

namespace triplet_cuda {
namespace cpu {
namespace {

template <typename T, Metric M>
struct BatchAllRows {
  RowLabels l;  // anchors against candidates (the batch, or a reference set)
  int64_t N;    // candidates
  T margin;
  BatchAllRows(const RowLabels& lb, T mg) : l(lb), N(lb.cols), margin(mg) {}

  using Pos = std::pair<T, int64_t>;  // (distance, index)

  // Up to this many positives per anchor (the usual P x K batch), every negative is scanned
  // against all of them branch-free (epi::batch_all_negative, the epilogue the CUDA kernels
  // run too); above it, the positives are sorted once and each negative finds its active
  // suffix by binary search. Both count the same set: d_ap - d_an + margin > 0 in T.
  static constexpr size_t kScanMaxPositives = 16;

  struct Row {
    std::vector<Pos> pos;  // the anchor's positives (distance, index)
    int64_t negatives = 0;
    bool nan = false;      // a NaN distance in the row (the NaN rule)
  };

  Row collect(int64_t a, const T* d) const {
    Row r;
    const int64_t la = l.anchor[a], self = l.self_of(a);
    for (int64_t j = 0; j < N; ++j) {
      r.nan |= epi::is_nan(d[j]);
      if (l.cand[j] != la) {
        ++r.negatives;
      } else if (j != self) {
        r.pos.emplace_back(d[j], j);
      }
    }
    if (!r.nan && r.pos.size() > kScanMaxPositives) std::sort(r.pos.begin(), r.pos.end());
    return r;
  }

  // Number of active positives for a negative at d_an (sorted positives, many of them).
  int64_t active_sorted(const std::vector<Pos>& pos, T d_an) const {
    const auto first_active = std::partition_point(
        pos.begin(), pos.end(), [&](const Pos& p) { return !(p.first - d_an + margin > T(0)); });
    return pos.end() - first_active;
  }

  RowTotals forward(int64_t a, const T* d) const {
    const Row r = collect(a, d);
    RowTotals t;
    const int64_t P = static_cast<int64_t>(r.pos.size());
    if (P == 0 || r.negatives == 0) return t;
    t.valid = P * r.negatives;
    if (r.nan) {
      t.sum = epi::quiet_nan<double>();
      return t;
    }
    if (r.pos.size() <= kScanMaxPositives) {
      T dap[kScanMaxPositives];
      for (int64_t k = 0; k < P; ++k) dap[k] = r.pos[k].first;
      for (int64_t j = 0; j < N; ++j) {
        if (l.cand[j] == l.anchor[a]) continue;
        epi::batch_all_negative(dap, static_cast<int>(P), d[j], margin, &t.sum, &t.positive);
      }
      return t;
    }
    std::vector<double> top(P + 1, 0.0);  // top[c]: sum of the c largest positive distances
    for (int64_t c = 1; c <= P; ++c) top[c] = top[c - 1] + static_cast<double>(r.pos[P - c].first);
    for (int64_t j = 0; j < N; ++j) {
      if (l.cand[j] == l.anchor[a]) continue;
      const int64_t c = active_sorted(r.pos, d[j]);
      t.sum += top[c] + c * (static_cast<double>(margin) - static_cast<double>(d[j]));
      t.positive += c;
    }
    return t;
  }

  void weights(int64_t a, const T* d, T g, T* w) const {
    std::fill(w, w + N, T(0));
    const Row r = collect(a, d);
    const int64_t P = static_cast<int64_t>(r.pos.size());
    if (P == 0 || r.negatives == 0) return;
    if (r.nan) {  // every valid pair of the anchor gets a NaN weight
      for (int64_t j = 0; j < N; ++j) w[j] = j == l.self_of(a) ? T(0) : epi::quiet_nan<T>();
      return;
    }
    if (r.pos.size() <= kScanMaxPositives) {
      T dap[kScanMaxPositives];
      int64_t active[kScanMaxPositives] = {};  // negatives active with positive k
      for (int64_t k = 0; k < P; ++k) dap[k] = r.pos[k].first;
      for (int64_t j = 0; j < N; ++j) {
        if (l.cand[j] == l.anchor[a]) continue;
        int64_t c = 0;
        for (int64_t k = 0; k < P; ++k) {
          const bool on = dap[k] - d[j] + margin > T(0);
          active[k] += on;
          c += on;
        }
        w[j] = -g * static_cast<T>(c);
      }
      for (int64_t k = 0; k < P; ++k) w[r.pos[k].second] = g * static_cast<T>(active[k]);
      return;
    }
    // starts[k]: negatives whose active suffix starts at sorted positive k.
    std::vector<int64_t> starts(P + 1, 0);
    for (int64_t j = 0; j < N; ++j) {
      if (l.cand[j] == l.anchor[a]) continue;
      const int64_t c = active_sorted(r.pos, d[j]);
      w[j] = -g * static_cast<T>(c);
      ++starts[P - c];
    }
    int64_t active_negatives = 0;  // negatives active with sorted positive k
    for (int64_t k = 0; k < P; ++k) {
      active_negatives += starts[k];
      w[r.pos[k].second] = g * static_cast<T>(active_negatives);
    }
  }
};


// ---------------------------------------------------------------------------------------
// Fused upper-triangle path for the usual few positives per anchor (csrc/cpu/fused.h): each
// anchor's positive distances first, then the negatives streamed once, each pair's distance
// serving both of its anchors. No sort, no scan workspace beyond the distance block.
// ---------------------------------------------------------------------------------------

// Per-anchor state of the batch-all streaming pass.
template <typename T>
struct AnchorAcc {
  double sum = 0;
  int64_t active = 0;
  bool nan = false;
};

template <typename T, Metric M>
RowTotals fused_forward(const Prepared& p, const int64_t* lab, const Positives<T>& pos, T margin) {
  const int64_t N = p.rows();
  constexpr int K = kFusedMaxPositives;
  std::vector<AnchorAcc<T>> acc(N);
  auto visit = [&](int64_t a, int64_t, T d, int64_t) {
    AnchorAcc<T>& s = acc[a];
    s.nan |= epi::is_nan(d);
    epi::batch_all_negative(pos.dist.data() + a * K, pos.count[a], d, margin, &s.sum, &s.active);
  };
  upper_triangle_pass<T, M>(p, lab, sizeof(T), visit);
  RowTotals total;
  bool nan = false;
  for (int64_t a = 0; a < N; ++a) {
    const int64_t valid = pos.count[a] * pos.negatives[a];
    if (valid == 0) continue;
    bool row_nan = acc[a].nan;
    for (int k = 0; k < pos.count[a]; ++k) row_nan |= epi::is_nan(pos.dist[a * K + k]);
    nan |= row_nan;
    total.sum += acc[a].sum;
    total.valid += valid;
    total.positive += row_nan ? 0 : acc[a].active;  // a NaN row counts no active term (as CUDA)
  }
  if (nan) total.sum = epi::quiet_nan<double>();  // the NaN rule
  return total;
}

template <typename T, Metric M>
at::Tensor fused_backward(const Prepared& p, const int64_t* lab, const Positives<T>& pos, T margin,
                          T g) {
  const int64_t N = p.rows(), D = p.e.size(1);
  constexpr int K = kFusedMaxPositives;
  at::Tensor grad = at::zeros_like(p.e);
  // active[a][k]: negatives active with anchor a's positive k (integer: exact in any order).
  std::vector<int64_t> active(N * K, 0);
  std::vector<char> nan(N, 0);
  at::Tensor W;  // the current block's weights, (b, N - r0)
  T* wp = nullptr;
  // Weight of d(a, n) for anchor a: -g * (number of a's positives active with n).
  auto count = [&](int64_t a, T d) {
    const T* dap = pos.dist.data() + a * K;
    int64_t* act = active.data() + a * K;
    int64_t c = 0;
    for (int k = 0; k < pos.count[a]; ++k) {
      const bool on = dap[k] - d + margin > T(0);
      act[k] += on;
      c += on;
    }
    nan[a] |= epi::is_nan(d);
    return -g * static_cast<T>(c);
  };
  // Each (anchor, negative) pair adds its anchor's weight to the block entry of its distance:
  // inside the block's square (i, j) and (j, i) are both entries, each carrying one direction;
  // beyond it both directions land on the same entry. The gradient GEMMs then run per block.
  upper_triangle_pass<T, M>(
      p, lab, 2 * sizeof(T),
      [&](int64_t, int64_t, at::Tensor& dist) {
        W = at::zeros_like(dist);
        wp = W.data_ptr<T>();
      },
      [&](int64_t a, int64_t, T d, int64_t e) { wp[e] += count(a, d); },
      [&](int64_t r0, int64_t, at::Tensor& dist) {
        accumulate_distance_grad(W, dist, p, r0, p, r0, M, grad, grad);
      });
  // Positive pairs: row j owns its gradient; pair (j, p) carries the counts of both
  // directions (j's positive p, and p's positive j).
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  T* gp = grad.data_ptr<T>();
  bool any_nan = false;
  for (int64_t a = 0; a < N; ++a) {
    if (pos.count[a] * pos.negatives[a] == 0) continue;
    any_nan |= nan[a] != 0;
    for (int k = 0; k < pos.count[a]; ++k) any_nan |= epi::is_nan(pos.dist[a * K + k]);
  }
  if (any_nan) return grad.fill_(epi::quiet_nan<T>());  // the NaN rule
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      T* gj = gp + j * D;
      const T* ej = e + j * D;
      for (int k = 0; k < pos.count[j]; ++k) {
        const int64_t q = pos.idx[j * K + k];
        const int64_t both = active[j * K + k] + active[q * K + pos.back[j * K + k]];
        if (both == 0) continue;
        const PairGrad<T> c = pair_grad<M>(g * static_cast<T>(both), pos.dist[j * K + k], sq[j],
                                           sq[q], inv[j], inv[q]);
        const T* eq = e + q * D;
        for (int64_t t = 0; t < D; ++t) gj[t] += c.ca * ej[t] + c.cab * eq[t];
      }
    }
  });
  return grad;
}

// Few positives per anchor: the fused pass; many: the row policy over full rows.
template <typename T, Metric M>
struct BatchAll {
  static RowTotals forward(const Prepared& p, const int64_t* lab, T margin) {
    const Positives<T> pos = collect_positives<T, M>(p, lab);
    if (!pos.fits) return rows_forward<T, M, BatchAllRows>(p, lab, margin);
    return fused_forward<T, M>(p, lab, pos, margin);
  }
  static at::Tensor backward(const Prepared& p, const int64_t* lab, T margin, T g) {
    const Positives<T> pos = collect_positives<T, M>(p, lab);
    if (!pos.fits) return rows_backward<T, M, BatchAllRows>(p, lab, margin, g);
    return fused_backward<T, M>(p, lab, pos, margin, g);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_forward(const at::Tensor& embeddings,
                                                                const at::Tensor& labels,
                                                                double margin, int64_t metric) {
  return loss_forward<BatchAll>(embeddings, labels, margin, metric);
}

at::Tensor batch_all_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                              const at::Tensor& labels, double margin, int64_t metric) {
  return loss_backward<BatchAll>(grad_loss_sum, embeddings, labels, margin, metric);
}

// Query vs reference: the row policy over anchor rows x reference columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_ref_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, double margin, int64_t metric) {
  return ref_loss_forward<BatchAllRows>(embeddings, labels, ref, ref_labels, self_index, margin,
                                        metric);
}

std::tuple<at::Tensor, at::Tensor> batch_all_ref_backward(
    const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,
    double margin, int64_t metric, bool ref_grad) {
  return ref_loss_backward<BatchAllRows>(grad_loss_sum, embeddings, labels, ref, ref_labels,
                                         self_index, margin, metric, ref_grad);
}

}  // namespace cpu
}  // namespace triplet_cuda
