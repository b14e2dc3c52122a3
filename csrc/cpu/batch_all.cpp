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
  const int64_t* lab;
  int64_t N;
  T margin;
  BatchAllRows(const int64_t* l, int64_t n, T mg) : lab(l), N(n), margin(mg) {}

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
    for (int64_t j = 0; j < N; ++j) {
      r.nan |= epi::is_nan(d[j]);
      if (lab[j] != lab[a]) {
        ++r.negatives;
      } else if (j != a) {
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
        if (lab[j] == lab[a]) continue;
        epi::batch_all_negative(dap, static_cast<int>(P), d[j], margin, &t.sum, &t.positive);
      }
      return t;
    }
    std::vector<double> top(P + 1, 0.0);  // top[c]: sum of the c largest positive distances
    for (int64_t c = 1; c <= P; ++c) top[c] = top[c - 1] + static_cast<double>(r.pos[P - c].first);
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] == lab[a]) continue;
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
      for (int64_t j = 0; j < N; ++j) w[j] = j == a ? T(0) : epi::quiet_nan<T>();
      return;
    }
    if (r.pos.size() <= kScanMaxPositives) {
      T dap[kScanMaxPositives];
      int64_t active[kScanMaxPositives] = {};  // negatives active with positive k
      for (int64_t k = 0; k < P; ++k) dap[k] = r.pos[k].first;
      for (int64_t j = 0; j < N; ++j) {
        if (lab[j] == lab[a]) continue;
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
      if (lab[j] == lab[a]) continue;
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
//
// The scan runs in W lanes (epi::batch_all_lanes: 4, 8 or 16, the fewest that hold every
// anchor's positives), one per positive, with per-lane accumulators: the compiler vectorises
// it over the positives without changing a bit. Each anchor's state is (N, W) arrays; a block
// row scans its whole row with the anchor's lanes in registers (the row phase), a column
// chunk updates its anchors' lanes in memory (the column phase).
// ---------------------------------------------------------------------------------------

// Per-anchor lanes of the fused pass.
template <typename T>
struct BatchAllLanes {
  int W = 0;                   // lanes per anchor: 4, 8 or 16
  bool may_nan = false;        // some distance may be NaN (see distances_may_be_nan)
  std::vector<T> dap;          // (N, W) positive distances, batch_all_pad() beyond count
  std::vector<double> sum;     // (N, W) forward: sum of lane k's terms
  std::vector<int32_t> count;  // (N, W) negatives active with lane k's positive
  std::vector<char> nan;       // (N) a NaN distance to a negative (only when may_nan)
};

// Whether a distance of the batch may be NaN or Inf. Every distance is finite when every
// squared norm is and 4 max ||x||^2 is: the Gram value ||a||^2 + ||b||^2 - 2<a,b> (|<a,b>| <=
// (||a||^2 + ||b||^2) / 2) and the explicit sums of the near-zero rule stay within it, and the
// NaN rule marks only a non-finite ||a||^2 + ||b||^2. Only then may the scans skip the
// per-pair NaN test.
template <typename T>
bool distances_may_be_nan(const Prepared& p) {
  const T* sq = p.sqnorm.data_ptr<T>();
  T top = 0;
  bool finite = true;
  for (int64_t i = 0; i < p.rows(); ++i) {
    finite &= epi::is_finite(sq[i]);
    top = sq[i] > top ? sq[i] : top;
  }
  return !(finite && epi::is_finite(T(4) * top));
}

template <typename T>
BatchAllLanes<T> make_lanes(const Prepared& p, const Positives<T>& pos, bool forward) {
  constexpr int K = kFusedMaxPositives;
  const int64_t N = pos.N;
  int most = 0;
  for (int64_t a = 0; a < N; ++a) most = std::max(most, pos.count[a]);
  BatchAllLanes<T> l;
  l.W = most <= 4 ? 4 : most <= 8 ? 8 : 16;
  l.may_nan = distances_may_be_nan<T>(p);
  l.dap.assign(N * l.W, epi::batch_all_pad<T>());
  for (int64_t a = 0; a < N; ++a) {
    for (int k = 0; k < pos.count[a]; ++k) l.dap[a * l.W + k] = pos.dist[a * K + k];
  }
  if (forward) l.sum.assign(N * l.W, 0.0);
  l.count.assign(N * l.W, 0);
  l.nan.assign(N, 0);
  return l;
}

// One block row of a scan (see upper_triangle_rows). Indices are relative to the block's
// first row r0: the labels and the lane arrays are offset by r0.
template <typename T>
struct ScanArgs {
  const int64_t* lab;  // labels of rows r0 + [0, C)
  const T* d;          // d[j]: distance of rows r0 + i and r0 + j
  int64_t i;           // the block row (the anchor in the row phase, the candidate in the column
                       // phase)
  int64_t j0, j1;      // the other rows r0 + [j0, j1)
  T margin;
  T g;                 // backward: d loss / d loss_sum
  T* w;                // backward: w[j], the weight of entry j (like d)
  // The lanes of rows r0 + [0, C) (BatchAllLanes' arrays, offset).
  const T* dap;
  double* sum;
  int32_t* count;
  char* nan;
};

// Forward, row phase: anchor r0 + i against the candidates [j0, j1), its lanes in registers.
template <int W, bool kNan, typename T>
void forward_row(const ScanArgs<T>& s) {
  const int64_t a = s.i;
  T dap[W];
  double sum[W];
  int32_t count[W];
  for (int k = 0; k < W; ++k) {
    dap[k] = s.dap[a * W + k];
    sum[k] = s.sum[a * W + k];
    count[k] = s.count[a * W + k];
  }
  const int64_t la = s.lab[a];
  bool nan = false;
  for (int64_t j = s.j0; j < s.j1; ++j) {
    if (s.lab[j] == la) continue;
    if constexpr (kNan) nan |= epi::is_nan(s.d[j]);
    epi::batch_all_lanes<W>(dap, s.d[j], s.margin, sum, count);
  }
  for (int k = 0; k < W; ++k) {
    s.sum[a * W + k] = sum[k];
    s.count[a * W + k] = count[k];
  }
  if constexpr (kNan) s.nan[a] |= nan;
}

// Forward, column phase: candidate r0 + i against the anchors [j0, j1), their lanes in memory.
template <int W, bool kNan, typename T>
void forward_col(const ScanArgs<T>& s) {
  const int64_t lc = s.lab[s.i];
  for (int64_t a = s.j0; a < s.j1; ++a) {
    if (s.lab[a] == lc) continue;
    if constexpr (kNan) s.nan[a] |= epi::is_nan(s.d[a]);
    epi::batch_all_lanes<W>(s.dap + a * W, s.d[a], s.margin, s.sum + a * W, s.count + a * W);
  }
}

// Backward, row phase: the weights of anchor r0 + i's pairs, -g * (its active positives),
// written to every entry of the row (0 for its own class).
template <int W, bool kNan, typename T>
void backward_row(const ScanArgs<T>& s) {
  const int64_t a = s.i;
  T dap[W];
  int32_t count[W];
  for (int k = 0; k < W; ++k) {
    dap[k] = s.dap[a * W + k];
    count[k] = s.count[a * W + k];
  }
  const int64_t la = s.lab[a];
  bool nan = false;
  for (int64_t j = s.j0; j < s.j1; ++j) {
    if (s.lab[j] == la) {
      s.w[j] = T(0);
      continue;
    }
    if constexpr (kNan) nan |= epi::is_nan(s.d[j]);
    s.w[j] = -s.g * static_cast<T>(epi::batch_all_active_lanes<W>(dap, s.d[j], s.margin, count));
  }
  for (int k = 0; k < W; ++k) s.count[a * W + k] = count[k];
  if constexpr (kNan) s.nan[a] |= nan;
}

// Backward, column phase: adds the anchors' weights to the entries the row phase wrote.
template <int W, bool kNan, typename T>
void backward_col(const ScanArgs<T>& s) {
  const int64_t lc = s.lab[s.i];
  for (int64_t a = s.j0; a < s.j1; ++a) {
    if (s.lab[a] == lc) continue;
    if constexpr (kNan) s.nan[a] |= epi::is_nan(s.d[a]);
    s.w[a] += -s.g * static_cast<T>(
                         epi::batch_all_active_lanes<W>(s.dap + a * W, s.d[a], s.margin,
                                                        s.count + a * W));
  }
}

// The row and column scans for the lanes' width and NaN mode, chosen once per call.
template <typename T>
struct Scans {
  using Fn = void (*)(const ScanArgs<T>&);
  Fn row, col;
};

template <bool kForward, typename T>
Scans<T> pick_scans(const BatchAllLanes<T>& l) {
#define TC_BATCH_ALL_SCANS(W, NAN)                                          \
  if constexpr (kForward) return {&forward_row<W, NAN, T>, &forward_col<W, NAN, T>}; \
  else return {&backward_row<W, NAN, T>, &backward_col<W, NAN, T>}
  if (l.may_nan) {
    if (l.W == 4) { TC_BATCH_ALL_SCANS(4, true); }
    if (l.W == 8) { TC_BATCH_ALL_SCANS(8, true); }
    TC_BATCH_ALL_SCANS(16, true);
  }
  if (l.W == 4) { TC_BATCH_ALL_SCANS(4, false); }
  if (l.W == 8) { TC_BATCH_ALL_SCANS(8, false); }
  TC_BATCH_ALL_SCANS(16, false);
#undef TC_BATCH_ALL_SCANS
}

template <typename T>
ScanArgs<T> scan_args(BatchAllLanes<T>& l, const int64_t* lab, int64_t r0, T margin, T g) {
  const int64_t W = l.W;
  ScanArgs<T> s;
  s.lab = lab + r0;
  s.d = nullptr;
  s.i = s.j0 = s.j1 = 0;
  s.margin = margin;
  s.g = g;
  s.w = nullptr;
  s.dap = l.dap.data() + r0 * W;
  s.sum = l.sum.empty() ? nullptr : l.sum.data() + r0 * W;
  s.count = l.count.data() + r0 * W;
  s.nan = l.nan.data() + r0;
  return s;
}

// Whether a valid anchor's row holds a NaN distance (the NaN rule).
template <typename T>
bool row_is_nan(const Positives<T>& pos, const BatchAllLanes<T>& l, int64_t a) {
  bool nan = l.nan[a] != 0;
  for (int k = 0; k < pos.count[a]; ++k) nan |= epi::is_nan(l.dap[a * l.W + k]);
  return nan;
}

template <typename T, Metric M>
RowTotals fused_forward(const Prepared& p, const int64_t* lab, const Positives<T>& pos, T margin) {
  const int64_t N = p.rows();
  BatchAllLanes<T> l = make_lanes(p, pos, /*forward=*/true);
  const Scans<T> scan = pick_scans</*kForward=*/true>(l);
  const auto none = [](int64_t, int64_t, at::Tensor&) {};
  upper_triangle_rows<T, M>(
      p, sizeof(T), none,
      [&](int64_t r0, int64_t i, const T* d) {
        ScanArgs<T> s = scan_args(l, lab, r0, margin, T(0));
        s.d = d;
        s.i = i;
        s.j1 = N - r0;
        scan.row(s);
      },
      [&](int64_t r0, int64_t i, int64_t j0, int64_t j1, const T* d) {
        ScanArgs<T> s = scan_args(l, lab, r0, margin, T(0));
        s.d = d;
        s.i = i;
        s.j0 = j0;
        s.j1 = j1;
        scan.col(s);
      },
      none);
  const int64_t W = l.W;
  RowTotals total;
  bool nan = false;
  for (int64_t a = 0; a < N; ++a) {
    const int64_t valid = pos.count[a] * pos.negatives[a];
    if (valid == 0) continue;
    const bool row_nan = row_is_nan(pos, l, a);
    nan |= row_nan;
    double sum = 0;
    int64_t active = 0;
    for (int64_t k = 0; k < W; ++k) {
      sum += l.sum[a * W + k];
      active += l.count[a * W + k];
    }
    total.sum += sum;
    total.valid += valid;
    total.positive += row_nan ? 0 : active;  // a NaN row counts no active term (as CUDA)
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
  // count[a][k]: negatives active with anchor a's positive k (integers: exact in any order).
  BatchAllLanes<T> l = make_lanes(p, pos, /*forward=*/false);
  const Scans<T> scan = pick_scans</*kForward=*/false>(l);
  const int64_t W = l.W;
  at::Tensor Wt;  // the current block's weights, (b, N - r0)
  T* wp = nullptr;
  // Each (anchor, negative) pair puts its anchor's weight on the block entry of its distance:
  // inside the block's square (i, j) and (j, i) are both entries, each carrying one direction
  // (the row phase writes every entry of its row); beyond it the column phase adds the other
  // direction. The gradient GEMMs then run per block.
  upper_triangle_rows<T, M>(
      p, 2 * sizeof(T),
      [&](int64_t, int64_t, at::Tensor& dist) {
        Wt = at::empty_like(dist);
        wp = Wt.data_ptr<T>();
      },
      [&](int64_t r0, int64_t i, const T* d) {
        ScanArgs<T> s = scan_args(l, lab, r0, margin, g);
        s.d = d;
        s.w = wp + i * (N - r0);
        s.i = i;
        s.j1 = N - r0;
        scan.row(s);
      },
      [&](int64_t r0, int64_t i, int64_t j0, int64_t j1, const T* d) {
        ScanArgs<T> s = scan_args(l, lab, r0, margin, g);
        s.d = d;
        s.w = wp + i * (N - r0);
        s.i = i;
        s.j0 = j0;
        s.j1 = j1;
        scan.col(s);
      },
      [&](int64_t r0, int64_t, at::Tensor& dist) {
        accumulate_distance_grad(Wt, dist, p, r0, p, r0, M, grad, grad);
      });
  bool any_nan = false;
  for (int64_t a = 0; a < N; ++a) {
    if (pos.count[a] * pos.negatives[a] != 0) any_nan |= row_is_nan(pos, l, a);
  }
  if (any_nan) return grad.fill_(epi::quiet_nan<T>());  // the NaN rule
  // Positive pairs: row j owns its gradient; pair (j, q) carries the counts of both
  // directions (j's positive q, and q's positive j).
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  T* gp = grad.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      T* gj = gp + j * D;
      const T* ej = e + j * D;
      for (int k = 0; k < pos.count[j]; ++k) {
        const int64_t q = pos.idx[j * K + k];
        const int64_t both =
            int64_t(l.count[j * W + k]) + int64_t(l.count[q * W + pos.back[j * K + k]]);
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

}  // namespace cpu
}  // namespace triplet_cuda
