// Semi-hard triplet loss on CPU. Few positives per anchor (the usual P x K batch): the fused
// upper-triangle pass of csrc/cpu/fused.h keeps, per (anchor, positive), the nearest negative
// farther than d_ap and, per anchor, the farthest negative (the epilogue's comparators: ties
// to the lowest index, NaN farthest), each pair's distance serving both of its anchors; the
// backward re-mines and differentiates only the chosen pairs. Many positives: the row policy
// of semi_hard.h (negatives sorted once, binary search per positive) over full rows.
#include "ops_cpu.h"

#include "semi_hard.h"

namespace triplet_cuda {
namespace cpu {
namespace {

template <typename T, Metric M>
struct SemiHard {
  // Calls fn(a, k, term) for every valid (anchor a, its k-th positive) of the fused mining,
  // in ascending (a, k); returns whether a valid anchor's row holds a NaN (the NaN rule).
  template <typename Fn>
  static bool for_each_pair(const Positives<T>& pos, const SemiHardMined<T>& mined, T margin,
                            Fn&& fn) {
    constexpr int K = kFusedMaxPositives;
    for (int64_t a = 0; a < pos.N; ++a) {
      if (pos.negatives[a] == 0) continue;
      for (int k = 0; k < pos.count[a]; ++k) {
        fn(a, k, pos.dist[a * K + k] - mined.neg_dist[a * K + k] + margin);
      }
    }
    return mined.any_nan;
  }

  static RowTotals forward(const Prepared& p, const int64_t* lab, T margin) {
    const Positives<T> pos = collect_positives<T, M>(p, lab);
    if (!pos.fits) return rows_forward<T, M, SemiHardRows>(p, lab, margin);
    RowTotals t;
    const bool nan = for_each_pair(pos, mine_fused<T, M>(p, lab, pos), margin,
                                   [&](int64_t, int, T term) {
                                     ++t.valid;
                                     if (term > T(0)) {
                                       t.sum += term;
                                       ++t.positive;
                                     }
                                   });
    if (nan && t.valid > 0) t.sum = epi::quiet_nan<double>();  // the NaN rule
    return t;
  }

  static at::Tensor backward(const Prepared& p, const int64_t* lab, T margin, T g) {
    const Positives<T> pos = collect_positives<T, M>(p, lab);
    if (!pos.fits) return rows_backward<T, M, SemiHardRows>(p, lab, margin, g);
    constexpr int K = kFusedMaxPositives;
    const SemiHardMined<T> mined = mine_fused<T, M>(p, lab, pos);
    std::vector<WeightedPair<T>> pairs;
    const bool nan = for_each_pair(pos, mined, margin, [&](int64_t a, int k, T term) {
      if (!(term > T(0))) return;
      pairs.push_back({a, pos.idx[a * K + k], g, pos.dist[a * K + k]});
      pairs.push_back({a, mined.neg[a * K + k], -g, mined.neg_dist[a * K + k]});
    });
    at::Tensor grad = sparse_pair_backward<T, M>(p, pairs);
    if (nan) grad.fill_(epi::quiet_nan<T>());  // the NaN rule
    return grad;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_forward(const at::Tensor& embeddings,
                                                                const at::Tensor& labels,
                                                                double margin, int64_t metric) {
  return loss_forward<SemiHard>(embeddings, labels, margin, metric);
}

at::Tensor semi_hard_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                              const at::Tensor& labels, double margin, int64_t metric) {
  return loss_backward<SemiHard>(grad_loss_sum, embeddings, labels, margin, metric);
}

// Query vs reference: the row policy over anchor rows x reference columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_ref_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, double margin, int64_t metric) {
  return ref_loss_forward<SemiHardRows>(embeddings, labels, ref, ref_labels, self_index, margin,
                                        metric);
}

std::tuple<at::Tensor, at::Tensor> semi_hard_ref_backward(
    const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,
    double margin, int64_t metric, bool ref_grad) {
  return ref_loss_backward<SemiHardRows>(grad_loss_sum, embeddings, labels, ref, ref_labels,
                                         self_index, margin, metric, ref_grad);
}

}  // namespace cpu
}  // namespace triplet_cuda
