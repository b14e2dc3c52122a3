// Semi-hard negative selection on CPU (FaceNet; TensorFlow Addons' TripletSemiHardLoss),
// shared by semi_hard_loss and mine_triplets: the row policy over full distance rows (reference
// sets, many positives) here; the fused few-positives mining in semi_hard_fused.h.
#pragma once

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "fused.h"
#include "loss.h"
#include "semi_hard_fused.h"

namespace triplet_cuda {
namespace cpu {

template <typename T, Metric M>
struct SemiHardRows {
  RowLabels l;  // anchors against candidates (the batch, or a reference set)
  int64_t N;    // candidates
  T margin;
  SemiHardRows(const RowLabels& lb, T mg) : l(lb), N(lb.cols), margin(mg) {}

  using Neg = std::pair<T, int64_t>;  // (distance, index)

  // Up to this many positives per anchor, one scan over the negatives serves all of them
  // (O(N * K)); above it, the negatives are sorted once and each positive binary-searches
  // (O(N log N + K log N)). Both give the same choice.
  static constexpr size_t kScanMaxPositives = 16;

  // Calls fn(p, chosen negative (distance, index), term) for every positive p of anchor a, in
  // ascending p. The chosen negative is the nearest one with d_an > d_ap, else the farthest
  // one; ties go to the lowest index, a NaN distance ranks farthest (csrc/epilogue.h).
  // Returns whether the row holds a NaN distance.
  template <typename Fn>
  bool for_each_pair(int64_t a, const T* d, Fn&& fn) const {
    std::vector<int64_t> pos;
    int64_t negatives = 0;
    bool nan = false;
    const int64_t la = l.anchor[a], self = l.self_of(a);
    for (int64_t j = 0; j < N; ++j) {
      nan |= epi::is_nan(d[j]);
      if (l.cand[j] != la) {
        ++negatives;
      } else if (j != self) {
        pos.push_back(j);
      }
    }
    if (pos.empty() || negatives == 0) return nan;
    if (nan || pos.size() <= kScanMaxPositives) {  // sorting needs a NaN-free row
      scan_select(a, d, pos, fn);
    } else {
      sort_select(a, d, pos, fn);
    }
    return nan;
  }

  template <typename Fn>
  void scan_select(int64_t a, const T* d, const std::vector<int64_t>& pos, Fn& fn) const {
    const size_t P = pos.size();
    std::vector<T> d_ap(P);
    std::vector<epi::SemiHardChoice<T>> choice(P);
    for (size_t k = 0; k < P; ++k) d_ap[k] = d[pos[k]];
    epi::ArgFarthest<T> farthest;
    // Ascending j; the updates are selects, not branches: d_an against d_ap is a coin flip
    // the predictor cannot learn.
    for (int64_t j = 0; j < N; ++j) {
      if (l.cand[j] == l.anchor[a]) continue;
      const T dj = d[j];
      farthest.update(dj, j);
      for (size_t k = 0; k < P; ++k) choice[k].update(d_ap[k], dj, j);
    }
    for (size_t k = 0; k < P; ++k) {
      Neg n;
      epi::semi_hard_pick(choice[k], farthest, &n.first, &n.second);
      fn(pos[k], n, d_ap[k] - n.first + margin);
    }
  }

  template <typename Fn>
  void sort_select(int64_t a, const T* d, const std::vector<int64_t>& pos, Fn& fn) const {
    std::vector<Neg> neg;  // sorted by (distance, index)
    for (int64_t j = 0; j < N; ++j) {
      if (l.cand[j] != l.anchor[a]) neg.emplace_back(d[j], j);
    }
    std::sort(neg.begin(), neg.end());
    const T farthest_d = neg.back().first;
    const Neg& farthest = *std::partition_point(
        neg.begin(), neg.end(), [&](const Neg& n) { return n.first < farthest_d; });
    for (const int64_t p : pos) {
      const T d_ap = d[p];
      const auto it = std::partition_point(neg.begin(), neg.end(),
                                           [&](const Neg& n) { return !(n.first > d_ap); });
      const Neg& n = it != neg.end() ? *it : farthest;
      fn(p, n, d_ap - n.first + margin);
    }
  }

  RowTotals forward(int64_t a, const T* d) const {
    RowTotals t;
    const bool nan = for_each_pair(a, d, [&](int64_t, const Neg&, T term) {
      ++t.valid;
      if (term > T(0)) {
        t.sum += term;
        ++t.positive;
      }
    });
    if (nan && t.valid > 0) t.sum = epi::quiet_nan<double>();  // the NaN rule
    return t;
  }

  void weights(int64_t a, const T* d, T g, T* w) const {
    std::fill(w, w + N, T(0));
    bool any = false;
    const bool nan = for_each_pair(a, d, [&](int64_t p, const Neg& n, T term) {
      any = true;
      if (term > T(0)) {
        w[p] += g;
        w[n.second] -= g;
      }
    });
    if (nan && any) {  // every candidate of the anchor gets a NaN weight
      for (int64_t j = 0; j < N; ++j) w[j] = j == l.self_of(a) ? T(0) : epi::quiet_nan<T>();
    }
  }
};

}  // namespace cpu
}  // namespace triplet_cuda
