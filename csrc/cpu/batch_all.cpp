// Batch-all triplet loss on CPU without the N x N x N tensor. Per anchor, few positives are
// scanned against every negative (the shared epilogue, csrc/epilogue.h); many are sorted once
// and each negative's active positives (d_ap - d_an + margin > 0), a suffix of them, are found
// by binary search, suffix sums giving the sum of its active terms. O(N^2 min(K, log K)) time
// for K positives per anchor, O(block * N) memory.
#include "ops_cpu.h"

#include <algorithm>
#include <limits>
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
//
// Each anchor's positives sit in W lanes (4, 8 or 16, the fewest that hold every anchor's;
// unused lanes hold epi::batch_all_pad(), never active), so every scan is a fixed-trip,
// branch-free loop (epi::batch_all_term) that the compiler vectorises: the forward's row phase
// over the lanes (epi::batch_all_lanes, the anchor's lanes in registers), the column phases
// and the backward over the candidates. The lane state is stored lane-major, (W, N), so that
// a column chunk's anchors are contiguous. Every accumulator is per (anchor, lane) and
// receives its terms in the pass's fixed order: deterministic, whatever the thread count.
// ---------------------------------------------------------------------------------------

// Per-anchor lanes of the fused pass.
template <typename T>
struct BatchAllLanes {
  int64_t N = 0;
  int W = 0;                   // lanes per anchor: 4, 8 or 16
  bool may_nan = false;        // some distance may be NaN (see distances_may_be_nan)
  std::vector<int32_t> cls;    // (N) class id: the smallest index of the anchor's class
  std::vector<int32_t> npos;   // (N) positives per anchor
  std::vector<T> dap;          // (W, N) positive distances, batch_all_pad() beyond the count
  std::vector<double> sum;     // (W, N) forward: sum of the lane's terms
  std::vector<int32_t> count;  // (W, N) negatives active with the lane's positive
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
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(),
              "triplet_cuda: batch_all_loss supports at most 2^31 - 1 embeddings, got ", N);
  int most = 0;
  for (int64_t a = 0; a < N; ++a) most = std::max(most, pos.count[a]);
  BatchAllLanes<T> l;
  l.N = N;
  l.W = most <= 4 ? 4 : most <= 8 ? 8 : 16;
  l.may_nan = distances_may_be_nan<T>(p);
  l.cls.resize(N);
  l.npos.assign(pos.count.begin(), pos.count.end());
  l.dap.assign(l.W * N, epi::batch_all_pad<T>());
  for (int64_t a = 0; a < N; ++a) {
    // positives in ascending index: the first is the class's smallest index unless a is
    l.cls[a] = static_cast<int32_t>(pos.count[a] > 0 ? std::min(a, pos.idx[a * K]) : a);
    for (int k = 0; k < pos.count[a]; ++k) l.dap[k * N + a] = pos.dist[a * K + k];
  }
  if (forward) l.sum.assign(l.W * N, 0.0);
  l.count.assign(l.W * N, 0);
  l.nan.assign(N, 0);
  return l;
}

// A scan's view of one block (see upper_triangle_rows). Indices are relative to the block's
// first row r0: the class ids and the lane arrays are offset by r0.
template <typename T>
struct ScanArgs {
  const int32_t* cls;  // class ids of rows r0 + [0, C)
  const int32_t* npos; // positives of rows r0 + [0, C)
  const T* d;          // row phase: d[j], the distance of rows r0 + i and r0 + j; column
                       // phase: the block, d[i * C + j]
  T* w;                // backward: the weights, like d
  int64_t C;           // the block's row stride
  int64_t i;           // row phase: the anchor's block row
  int64_t b;           // column phase: the candidates are the block rows [0, b)
  int64_t j0, j1;      // the other rows r0 + [j0, j1)
  T margin;
  T g;                 // backward: d loss / d loss_sum
  int64_t N;           // the lane arrays' row stride: lane k of row j at [k * N + j]
  const T* dap;
  double* sum;
  int32_t* count;
  char* nan;
};

// Terms of one lane are summed in T over at most this many candidates (vector partial sums),
// then added to the lane's float64 sum: the rounding stays at the terms' own.
constexpr int64_t kFlushTerms = 64;

// Forward, row phase: anchor i against the candidates [j0, j1), one positive at a time (only
// its own lanes), vectorised over the candidates with 8 partial sums. The entries of the
// anchor's own class hold +inf (mask_own_class): never active, no label test.
template <bool kNan, typename T>
void forward_row(const ScanArgs<T>& s) {
  constexpr int L = 8;
  const int64_t a = s.i, N = s.N, j0 = s.j0, j1 = s.j1;
  const T* d = s.d;
  const T margin = s.margin;
  for (int k = 0; k < s.npos[a]; ++k) {
    const T dap = s.dap[k * N + a];
    double sum = s.sum[k * N + a];
    int32_t count = s.count[k * N + a];
    for (int64_t c0 = j0; c0 < j1; c0 += L * kFlushTerms) {
      const int64_t c1 = std::min(j1, c0 + L * kFlushTerms);
      T part[L] = {};
      int32_t on[L] = {};
      int64_t j = c0;
      for (; j + L <= c1; j += L) {
        for (int l = 0; l < L; ++l) {
          bool active;
          part[l] += epi::batch_all_term(dap, d[j + l], margin, &active);
          on[l] += active;
        }
      }
      for (; j < c1; ++j) {
        bool active;
        part[0] += epi::batch_all_term(dap, d[j], margin, &active);
        on[0] += active;
      }
      for (int l = 0; l < L; ++l) {
        sum += static_cast<double>(part[l]);
        count += on[l];
      }
    }
    s.sum[k * N + a] = sum;
    s.count[k * N + a] = count;
  }
  if constexpr (kNan) {
    bool nan = false;
    for (int64_t j = j0; j < j1; ++j) nan |= epi::is_nan(d[j]);
    s.nan[a] |= nan;
  }
}

// Anchors per span of a column scan (the column chunks of upper_triangle_rows are this wide).
constexpr int64_t kSpan = 64;

// Forward, column phase: the block rows [0, b) as candidates of the anchors [j0, j1), span by
// span, positive by positive (up to the span's most), vectorised over the anchors, two rows at
// a time into partial sums per (positive, anchor), flushed every kFlushTerms rows. Own-class
// entries hold +inf, as in the row phase.
template <bool kNan, typename T>
void forward_cols(const ScanArgs<T>& s) {
  constexpr int K = kFusedMaxPositives;
  const int64_t N = s.N, C = s.C, b = s.b;
  const T margin = s.margin;
  for (int64_t j0 = s.j0; j0 < s.j1; j0 += kSpan) {
    const int64_t n = std::min(kSpan, s.j1 - j0);
    int P = 0;
    for (int64_t j = 0; j < n; ++j) P = std::max(P, s.npos[j0 + j]);
    T part[K][kSpan] = {};
    int32_t on[K][kSpan] = {};
    for (int64_t i0 = 0; i0 < b; i0 += kFlushTerms) {
      const int64_t i1 = std::min(b, i0 + kFlushTerms);
      for (int k = 0; k < P; ++k) {
        const T* dap = s.dap + k * N + j0;
        T* pk = part[k];
        int32_t* ok = on[k];
        int64_t i = i0;
        for (; i + 2 <= i1; i += 2) {
          const T* d0 = s.d + i * C + j0;
          const T* d1 = d0 + C;
          for (int64_t j = 0; j < n; ++j) {
            bool a0, a1;
            const T t0 = epi::batch_all_term(dap[j], d0[j], margin, &a0);
            const T t1 = epi::batch_all_term(dap[j], d1[j], margin, &a1);
            pk[j] += t0 + t1;
            ok[j] += int32_t(a0) + int32_t(a1);
          }
        }
        if (i < i1) {
          const T* d0 = s.d + i * C + j0;
          for (int64_t j = 0; j < n; ++j) {
            bool a0;
            pk[j] += epi::batch_all_term(dap[j], d0[j], margin, &a0);
            ok[j] += a0;
          }
        }
        double* sum = s.sum + k * N + j0;
        for (int64_t j = 0; j < n; ++j) {
          sum[j] += static_cast<double>(pk[j]);
          pk[j] = T(0);
        }
      }
      if constexpr (kNan) {
        for (int64_t i = i0; i < i1; ++i) {
          const T* d = s.d + i * C + j0;
          for (int64_t j = 0; j < n; ++j) s.nan[j0 + j] |= epi::is_nan(d[j]);
        }
      }
    }
    for (int k = 0; k < P; ++k) {
      int32_t* count = s.count + k * N + j0;
      for (int64_t j = 0; j < n; ++j) count[j] += on[k][j];
    }
  }
}

// Backward, row phase: the weights of anchor i's pairs, -g * (its active positives), written
// to every entry of the row (0 for its own class), vectorised over the candidates.
template <int W, bool kNan, typename T>
void backward_row(const ScanArgs<T>& s) {
  const int64_t a = s.i, N = s.N, j1 = s.j1;
  const int32_t* cls = s.cls;
  const T* d = s.d;
  T* w = s.w;
  const T margin = s.margin, neg_g = -s.g;
  T dap[W];
  int32_t count[W];
  for (int k = 0; k < W; ++k) {
    dap[k] = s.dap[k * N + a];
    count[k] = s.count[k * N + a];
  }
  const int32_t own = cls[a];
  for (int64_t j = s.j0; j < j1; ++j) {
    const bool neg = cls[j] != own;
    int32_t c = 0;
    for (int k = 0; k < W; ++k) {
      bool active;
      epi::batch_all_term(dap[k], d[j], margin, &active);
      const int32_t on = active & neg;
      count[k] += on;
      c += on;
    }
    w[j] = epi::keep_if(neg, neg_g * static_cast<T>(c));
  }
  for (int k = 0; k < W; ++k) s.count[k * N + a] = count[k];
  if constexpr (kNan) {
    bool nan = false;
    for (int64_t j = s.j0; j < j1; ++j) nan |= cls[j] != own && epi::is_nan(d[j]);
    s.nan[a] |= nan;
  }
}

// Backward, column phase: adds the anchors' weights to the entries the row phase wrote, span by
// span, positive by positive (up to the span's most), vectorised over the anchors.
template <bool kNan, typename T>
void backward_cols(const ScanArgs<T>& s) {
  const int64_t N = s.N, C = s.C;
  const int32_t* cls = s.cls;
  const T margin = s.margin, neg_g = -s.g;
  for (int64_t j0 = s.j0; j0 < s.j1; j0 += kSpan) {
    const int64_t n = std::min(kSpan, s.j1 - j0);
    int P = 0;
    for (int64_t j = 0; j < n; ++j) P = std::max(P, s.npos[j0 + j]);
    for (int64_t i = 0; i < s.b; ++i) {
      const T* d = s.d + i * C + j0;
      T* w = s.w + i * C + j0;
      const int32_t other = cls[i];
      int32_t c[kSpan] = {};  // active positives per anchor
      for (int k = 0; k < P; ++k) {
        const T* dap = s.dap + k * N + j0;
        int32_t* count = s.count + k * N + j0;
        for (int64_t j = 0; j < n; ++j) {
          bool active;
          epi::batch_all_term(dap[j], d[j], margin, &active);
          const int32_t on = active & (cls[j0 + j] != other);
          count[j] += on;
          c[j] += on;
        }
      }
      for (int64_t j = 0; j < n; ++j) w[j] += neg_g * static_cast<T>(c[j]);
      if constexpr (kNan) {
        for (int64_t j = 0; j < n; ++j) s.nan[j0 + j] |= cls[j0 + j] != other && epi::is_nan(d[j]);
      }
    }
  }
}

// The row and column scans for the lanes' width and NaN mode, chosen once per call.
template <typename T>
struct Scans {
  using Fn = void (*)(const ScanArgs<T>&);
  Fn row, cols;
};

template <bool kForward, int W, bool kNan, typename T>
Scans<T> scans_for() {
  if constexpr (kForward) {
    return {&forward_row<kNan, T>, &forward_cols<kNan, T>};
  } else {
    return {&backward_row<W, kNan, T>, &backward_cols<kNan, T>};
  }
}

template <bool kForward, typename T>
Scans<T> pick_scans(const BatchAllLanes<T>& l) {
  if (l.may_nan) {
    return l.W == 4   ? scans_for<kForward, 4, true, T>()
           : l.W == 8 ? scans_for<kForward, 8, true, T>()
                      : scans_for<kForward, 16, true, T>();
  }
  return l.W == 4   ? scans_for<kForward, 4, false, T>()
         : l.W == 8 ? scans_for<kForward, 8, false, T>()
                    : scans_for<kForward, 16, false, T>();
}

template <typename T>
ScanArgs<T> scan_args(BatchAllLanes<T>& l, int64_t r0, T margin, T g) {
  ScanArgs<T> s{};
  s.cls = l.cls.data() + r0;
  s.npos = l.npos.data() + r0;
  s.C = l.N - r0;
  s.margin = margin;
  s.g = g;
  s.N = l.N;
  s.dap = l.dap.data() + r0;
  s.sum = l.sum.empty() ? nullptr : l.sum.data() + r0;
  s.count = l.count.data() + r0;
  s.nan = l.nan.data() + r0;
  return s;
}

// Runs the row and column scans over the upper-triangle blocks; weights(r0) is the block's
// weight matrix (backward) or nullptr.
template <typename T, Metric M, typename BeforeBlock, typename Weights, typename AfterBlock>
void scan_pass(const Prepared& p, BatchAllLanes<T>& l, const Scans<T>& scan, T margin, T g,
               int64_t bytes_per_elem, BeforeBlock&& before_block, Weights&& weights,
               AfterBlock&& after_block) {
  upper_triangle_rows<T, M>(
      p, bytes_per_elem, before_block,
      [&](int64_t r0, int64_t i, const T* d) {
        ScanArgs<T> s = scan_args(l, r0, margin, g);
        s.d = d;
        s.w = weights(r0) == nullptr ? nullptr : weights(r0) + i * s.C;
        s.i = i;
        s.j1 = s.C;
        scan.row(s);
      },
      [&](int64_t r0, int64_t b, int64_t j0, int64_t j1, const T* d) {
        ScanArgs<T> s = scan_args(l, r0, margin, g);
        s.d = d;
        s.w = weights(r0);
        s.b = b;
        s.j0 = j0;
        s.j1 = j1;
        scan.cols(s);
      },
      after_block);
}

// Whether a valid anchor's row holds a NaN distance (the NaN rule).
template <typename T>
bool row_is_nan(const Positives<T>& pos, const BatchAllLanes<T>& l, int64_t a) {
  bool nan = l.nan[a] != 0;
  for (int k = 0; k < pos.count[a]; ++k) nan |= epi::is_nan(l.dap[k * l.N + a]);
  return nan;
}

// The forward's block, (b, N - r0) from row r0: each row's own entry and its positives' set to
// +inf, so that the forward scans need no label test (a +inf negative is never active; the
// positives' distances, and whether they are NaN, come from Positives).
template <typename T>
void mask_own_class(const Positives<T>& pos, int64_t r0, int64_t b, at::Tensor& dist) {
  constexpr int K = kFusedMaxPositives;
  const int64_t C = pos.N - r0;
  T* dp = dist.data_ptr<T>();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t a = r0 + i;
    T* row = dp + i * C;
    row[i] = epi::infinity<T>();
    for (int k = 0; k < pos.count[a]; ++k) {
      const int64_t q = pos.idx[a * K + k];
      if (q >= r0) row[q - r0] = epi::infinity<T>();
    }
  }
}

template <typename T, Metric M>
RowTotals fused_forward(const Prepared& p, const Positives<T>& pos, T margin) {
  const int64_t N = p.rows();
  BatchAllLanes<T> l = make_lanes(p, pos, /*forward=*/true);
  const auto none = [](int64_t, int64_t, at::Tensor&) {};
  scan_pass<T, M>(
      p, l, pick_scans</*kForward=*/true>(l), margin, T(0), sizeof(T),
      [&](int64_t r0, int64_t b, at::Tensor& dist) { mask_own_class(pos, r0, b, dist); },
      [](int64_t) -> T* { return nullptr; }, none);
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
      sum += l.sum[k * N + a];
      active += l.count[k * N + a];
    }
    total.sum += sum;
    total.valid += valid;
    total.positive += row_nan ? 0 : active;  // a NaN row counts no active term (as CUDA)
  }
  if (nan) total.sum = epi::quiet_nan<double>();  // the NaN rule
  return total;
}

template <typename T, Metric M>
at::Tensor fused_backward(const Prepared& p, const Positives<T>& pos, T margin, T g) {
  const int64_t N = p.rows(), D = p.e.size(1);
  constexpr int K = kFusedMaxPositives;
  at::Tensor grad = zeros_like(p.e);
  BatchAllLanes<T> l = make_lanes(p, pos, /*forward=*/false);
  at::Tensor Wt;  // the current block's weights, (b, N - r0)
  T* wp = nullptr;
  // Each (anchor, negative) pair puts its anchor's weight on the block entry of its distance:
  // inside the block's square (i, j) and (j, i) are both entries, each carrying one direction
  // (the row phase writes every entry of its row); beyond it the column phase adds the other
  // direction. The gradient GEMMs then run per block.
  scan_pass<T, M>(
      p, l, pick_scans</*kForward=*/false>(l), margin, g, 2 * sizeof(T),
      [&](int64_t, int64_t, at::Tensor& dist) {
        Wt = empty_like(dist);
        wp = Wt.data_ptr<T>();
      },
      [&](int64_t) { return wp; },
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
        const int64_t both = int64_t(l.count[k * N + j]) +
                             int64_t(l.count[int64_t(pos.back[j * K + k]) * N + q]);
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
    return fused_forward<T, M>(p, pos, margin);
  }
  static at::Tensor backward(const Prepared& p, const int64_t* lab, T margin, T g) {
    const Positives<T> pos = collect_positives<T, M>(p, lab);
    if (!pos.fits) return rows_backward<T, M, BatchAllRows>(p, lab, margin, g);
    return fused_backward<T, M>(p, pos, margin, g);
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
