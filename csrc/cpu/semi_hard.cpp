// Semi-hard triplet loss on CPU. Few positives per anchor (the usual P x K batch): the fused
// upper-triangle pass of csrc/cpu/fused.h keeps, per (anchor, positive), the nearest negative
// farther than d_ap and, per anchor, the farthest negative (the epilogue's comparators: ties
// to the lowest index, NaN farthest), each pair's distance serving both of its anchors; the
// backward re-mines and differentiates only the chosen pairs. Many positives: the row policy
// of semi_hard.h (negatives sorted once, binary search per positive) over full rows.
#include "ops_cpu.h"

#include <optional>

#include "semi_hard.h"

namespace triplet_cuda {
namespace cpu {
namespace {

}  // namespace

// embeddings: (N, D), labels: (N,) -> (loss_sum 0-d accumulation dtype, num_valid 0-d int64,
// num_positive 0-d int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_forward(const at::Tensor& embeddings,
                                                                const at::Tensor& labels,
                                                                double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  std::optional<RowTotals> total;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "semi_hard_forward", [&] {
    using T = scalar_t;
    TC_METRIC_SWITCH(metric, kM, [&] {
      const int64_t* l = lab.data_ptr<int64_t>();
      const Positives<T> pos = collect_positives<T, kM>(p, l);
      if (!pos.fits) return;
      const SemiHardMined<T> mined = mine_fused<T, kM>(p, l, pos);
      constexpr int K = kFusedMaxPositives;
      const T mg = static_cast<T>(margin);
      RowTotals t;
      for (int64_t a = 0; a < p.rows(); ++a) {
        if (pos.negatives[a] == 0) continue;
        for (int k = 0; k < pos.count[a]; ++k) {
          const T term = pos.dist[a * K + k] - mined.neg_dist[a * K + k] + mg;
          ++t.valid;
          if (term > T(0)) {
            t.sum += term;
            ++t.positive;
          }
        }
      }
      if (mined.any_nan && t.valid > 0) t.sum = epi::quiet_nan<double>();  // the NaN rule
      total = t;
    });
  });
  if (!total) return loss_forward<SemiHardRows>(embeddings, labels, margin, metric);
  return {acc_scalar(total->sum, p.e), long_scalar(total->valid, p.e),
          long_scalar(total->positive, p.e)};
}

// grad_loss_sum: 0-d; embeddings: (N, D); labels: (N,) -> grad (N, D) in the embeddings' dtype.
at::Tensor semi_hard_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                              const at::Tensor& labels, double margin, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  TORCH_CHECK(grad_loss_sum.numel() == 1, "triplet_cuda: grad_loss_sum must have one element, got ",
              grad_loss_sum.sizes());
  const Metric m = static_cast<Metric>(metric);
  const Prepared p = prepare(embeddings, m);
  if (p.rows() == 0) return at::zeros_like(embeddings, at::MemoryFormat::Contiguous);
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "semi_hard_backward", [&] {
    using T = scalar_t;
    TC_METRIC_SWITCH(metric, kM, [&] {
      const int64_t* l = lab.data_ptr<int64_t>();
      const Positives<T> pos = collect_positives<T, kM>(p, l);
      if (!pos.fits) return;
      const SemiHardMined<T> mined = mine_fused<T, kM>(p, l, pos);
      constexpr int K = kFusedMaxPositives;
      const T mg = static_cast<T>(margin);
      const T g = grad_loss_sum.item<T>();
      std::vector<WeightedPair<T>> pairs;
      for (int64_t a = 0; a < p.rows(); ++a) {
        if (pos.negatives[a] == 0) continue;
        for (int k = 0; k < pos.count[a]; ++k) {
          const T dap = pos.dist[a * K + k], dan = mined.neg_dist[a * K + k];
          if (!(dap - dan + mg > T(0))) continue;
          pairs.push_back({a, pos.idx[a * K + k], g, dap});
          pairs.push_back({a, mined.neg[a * K + k], -g, dan});
        }
      }
      grad = sparse_pair_backward<T, kM>(p, pairs);
      if (mined.any_nan) grad.fill_(epi::quiet_nan<T>());  // the NaN rule
    });
  });
  if (!grad.defined()) {
    return loss_backward<SemiHardRows>(grad_loss_sum, embeddings, labels, margin, metric);
  }
  return grad.to(embeddings.scalar_type());
}

}  // namespace cpu
}  // namespace triplet_cuda
