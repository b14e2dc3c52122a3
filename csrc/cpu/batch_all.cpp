// Batch-all triplet loss on CPU without the N x N x N tensor: per anchor, sort the negative
// distances once; each positive's active negatives are a prefix found by binary search.
// O(N^2 log N) time, O(block * N) memory.
#include <torch/library.h>

#include <algorithm>
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

  // A triplet is active iff d_ap - d_an + margin > 0, evaluated exactly so in T. For a fixed
  // d_ap it is true for a prefix of the ascending d_an, for a fixed d_an for a suffix of the
  // ascending d_ap, so binary searches count active triplets exactly.
  bool active(T d_ap, T d_an) const { return d_ap - d_an + margin > T(0); }

  void split(int64_t a, const T* d, std::vector<T>& pos, std::vector<T>& neg) const {
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] != lab[a]) {
        neg.push_back(d[j]);
      } else if (j != a) {
        pos.push_back(d[j]);
      }
    }
  }

  // Active negatives of a positive at distance d_ap, given the ascending negatives.
  int64_t count_neg(const std::vector<T>& neg_sorted, T d_ap) const {
    return std::partition_point(neg_sorted.begin(), neg_sorted.end(),
                                [&](T d_an) { return active(d_ap, d_an); }) -
           neg_sorted.begin();
  }

  // Active positives of a negative at distance d_an, given the ascending positives.
  int64_t count_pos(const std::vector<T>& pos_sorted, T d_an) const {
    return pos_sorted.end() - std::partition_point(pos_sorted.begin(), pos_sorted.end(),
                                                   [&](T d_ap) { return !active(d_ap, d_an); });
  }

  RowTotals forward(int64_t a, const T* d) const {
    std::vector<T> pos, neg;
    split(a, d, pos, neg);
    RowTotals t;
    if (pos.empty() || neg.empty()) return t;
    std::sort(neg.begin(), neg.end());
    std::vector<double> prefix(neg.size() + 1, 0.0);
    for (size_t k = 0; k < neg.size(); ++k) prefix[k + 1] = prefix[k] + neg[k];
    for (const T d_ap : pos) {
      const int64_t c = count_neg(neg, d_ap);
      t.sum += c * (static_cast<double>(d_ap) + static_cast<double>(margin)) - prefix[c];
      t.positive += c;
    }
    t.valid = static_cast<int64_t>(pos.size()) * static_cast<int64_t>(neg.size());
    return t;
  }

  void weights(int64_t a, const T* d, T g, T* w) const {
    std::vector<T> pos, neg;
    split(a, d, pos, neg);
    std::fill(w, w + N, T(0));
    if (pos.empty() || neg.empty()) return;
    std::sort(pos.begin(), pos.end());
    std::sort(neg.begin(), neg.end());
    for (int64_t j = 0; j < N; ++j) {
      if (lab[j] != lab[a]) {
        w[j] = -g * static_cast<T>(count_pos(pos, d[j]));
      } else if (j != a) {
        w[j] = g * static_cast<T>(count_neg(neg, d[j]));
      }
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
