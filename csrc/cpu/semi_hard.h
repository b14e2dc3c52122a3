// Semi-hard negative selection on CPU (FaceNet; TensorFlow Addons' TripletSemiHardLoss),
// shared by semi_hard_loss and mine_triplets.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "loss.h"

namespace triplet_cuda {
namespace cpu {

template <typename T, Metric M>
struct SemiHardRows {
  const int64_t* lab;
  int64_t N;
  T margin;
  SemiHardRows(const int64_t* l, int64_t n, T mg) : lab(l), N(n), margin(mg) {}

  using Neg = std::pair<T, int64_t>;  // (distance, index)

  // Anchor a's negatives sorted by (distance, index).
  std::vector<Neg> sorted_negatives(int64_t a, const T* d) const {
    std::vector<Neg> neg;
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] != lab[a]) neg.emplace_back(d[j], j);
    }
    std::sort(neg.begin(), neg.end());
    return neg;
  }

  // The chosen negative for a positive at distance d_ap (neg non-empty): the nearest negative
  // with d_an > d_ap, else the farthest one; ties go to the lowest index.
  const Neg& select(const std::vector<Neg>& neg, T d_ap) const {
    auto it = std::partition_point(neg.begin(), neg.end(),
                                   [&](const Neg& n) { return !(n.first > d_ap); });
    if (it != neg.end()) return *it;
    const T farthest = neg.back().first;
    return *std::partition_point(neg.begin(), neg.end(),
                                 [&](const Neg& n) { return n.first < farthest; });
  }

  // Calls fn(p, chosen negative, term) for every positive p of anchor a, ascending p.
  template <typename Fn>
  void for_each_pair(int64_t a, const T* d, Fn&& fn) const {
    const std::vector<Neg> neg = sorted_negatives(a, d);
    if (neg.empty()) return;
    for (int64_t j = 0; j < N; ++j) {
      if (j == a || lab[j] != lab[a]) continue;
      const Neg& n = select(neg, d[j]);
      fn(j, n, d[j] - n.first + margin);
    }
  }

  RowTotals forward(int64_t a, const T* d) const {
    RowTotals t;
    for_each_pair(a, d, [&](int64_t, const Neg&, T term) {
      ++t.valid;
      if (term > T(0)) {
        t.sum += term;
        ++t.positive;
      }
    });
    return t;
  }

  void weights(int64_t a, const T* d, T g, T* w) const {
    std::fill(w, w + N, T(0));
    for_each_pair(a, d, [&](int64_t p, const Neg& n, T term) {
      if (term > T(0)) {
        w[p] += g;
        w[n.second] -= g;
      }
    });
  }
};

}  // namespace cpu
}  // namespace triplet_cuda
