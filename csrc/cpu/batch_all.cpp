// Batch-all triplet loss on CPU without the N x N x N tensor. Per anchor, the positives are
// sorted once; for each negative the active positives (d_ap - d_an + margin > 0) are a suffix
// of them, found by binary search, and suffix sums give the sum of its active terms.
// O(N^2 log K) time for K positives per anchor, O(block * N) memory.
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

  // Anchor a's positives sorted by distance, and its number of negatives.
  int64_t sorted_positives(int64_t a, const T* d, std::vector<Pos>& pos) const {
    int64_t negatives = 0;
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] != lab[a]) {
        ++negatives;
      } else if (j != a) {
        pos.emplace_back(d[j], j);
      }
    }
    std::sort(pos.begin(), pos.end());
    return negatives;
  }

  // Number of active positives for a negative at d_an. The predicate is evaluated exactly as
  // d_ap - d_an + margin > 0 in T; it is monotone in d_ap, so the active positives are a suffix
  // of the ascending ones. Few positives (the usual P x K batch) are counted by a branch-free
  // scan, many by binary search; both count the same set.
  static constexpr size_t kScanMaxPositives = 16;

  int64_t active_positives(const std::vector<Pos>& pos, T d_an) const {
    if (pos.size() <= kScanMaxPositives) {
      int64_t c = 0;
      for (const Pos& p : pos) c += static_cast<int64_t>(p.first - d_an + margin > T(0));
      return c;
    }
    const auto first_active = std::partition_point(
        pos.begin(), pos.end(), [&](const Pos& p) { return !(p.first - d_an + margin > T(0)); });
    return pos.end() - first_active;
  }

  RowTotals forward(int64_t a, const T* d) const {
    std::vector<Pos> pos;
    const int64_t negatives = sorted_positives(a, d, pos);
    RowTotals t;
    if (pos.empty() || negatives == 0) return t;
    const int64_t P = static_cast<int64_t>(pos.size());
    std::vector<double> top(P + 1, 0.0);  // top[c]: sum of the c largest positive distances
    for (int64_t c = 1; c <= P; ++c) top[c] = top[c - 1] + static_cast<double>(pos[P - c].first);
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] == lab[a]) continue;
      const int64_t c = active_positives(pos, d[j]);
      t.sum += top[c] + c * (static_cast<double>(margin) - static_cast<double>(d[j]));
      t.positive += c;
    }
    t.valid = P * negatives;
    return t;
  }

  void weights(int64_t a, const T* d, T g, T* w) const {
    std::fill(w, w + N, T(0));
    std::vector<Pos> pos;
    const int64_t negatives = sorted_positives(a, d, pos);
    if (pos.empty() || negatives == 0) return;
    const int64_t P = static_cast<int64_t>(pos.size());
    // starts[k]: negatives whose active suffix starts at sorted positive k.
    std::vector<int64_t> starts(P + 1, 0);
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] == lab[a]) continue;
      const int64_t c = active_positives(pos, d[j]);
      w[j] = -g * static_cast<T>(c);
      ++starts[P - c];
    }
    int64_t active_negatives = 0;  // negatives active with sorted positive k
    for (int64_t k = 0; k < P; ++k) {
      active_negatives += starts[k];
      w[pos[k].second] = g * static_cast<T>(active_negatives);
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
