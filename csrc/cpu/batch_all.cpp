// Batch-all triplet loss on CPU without the N x N x N tensor. Per anchor, few positives are
// scanned against every negative (the shared epilogue, csrc/epilogue.h); many are sorted once
// and each negative's active positives (d_ap - d_an + margin > 0), a suffix of them, are found
// by binary search, suffix sums giving the sum of its active terms. O(N^2 min(K, log K)) time
// for K positives per anchor, O(block * N) memory.
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

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

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m) {
  m.impl("batch_all_loss", &loss_forward<BatchAllRows>);
  m.impl("batch_all_loss_backward", &loss_backward<BatchAllRows>);
}

}  // namespace cpu
}  // namespace triplet_cuda
