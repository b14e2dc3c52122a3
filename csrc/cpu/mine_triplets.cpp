// mine_triplets on CPU: (anchor, positive, negative) index triplets for a mining strategy,
// sorted by (anchor, positive, negative).
#include "ops_cpu.h"

#include <utility>
#include <vector>

#include "batch_hard.h"
#include "semi_hard.h"

namespace triplet_cuda {
namespace cpu {
namespace {

using Triplets = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triplets batch_hard_triplets(const Prepared& p, const at::Tensor& lab, Metric m) {
  const HardMined r = mine_batch_hard(p, lab, m);
  const at::Tensor a = r.pos_idx.ge(0).nonzero().select(1, 0);
  return {a, r.pos_idx.index_select(0, a), r.neg_idx.index_select(0, a)};
}

// Every (a, p, n) with cand[p] == anchor[a], p != self(a), cand[n] != anchor[a]: the batch
// against itself, or anchors against a reference set (p, n then index it).
Triplets batch_all_triplets(const RowLabels& l, int64_t N, const at::TensorOptions& opts) {
  const int64_t C = l.cols;
  // Every anchor's triplets are |positives| * |negatives|, laid out by exclusive scan.
  std::vector<int64_t> positives(N, 0), offset(N + 1, 0);
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      const int64_t self = l.self_of(a);
      int64_t same = 0;
      for (int64_t j = 0; j < C; ++j) same += l.cand[j] == l.anchor[a];
      const bool self_same = self >= 0 && l.cand[self] == l.anchor[a];
      positives[a] = (same - self_same) * (C - same);
    }
  });
  for (int64_t a = 0; a < N; ++a) offset[a + 1] = offset[a] + positives[a];
  at::Tensor A = empty({offset[N]}, opts), P = empty_like(A), Ng = empty_like(A);
  int64_t *pa = A.data_ptr<int64_t>(), *pp = P.data_ptr<int64_t>(), *pn = Ng.data_ptr<int64_t>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      int64_t k = offset[a];
      if (k == offset[a + 1]) continue;
      const int64_t la = l.anchor[a], self = l.self_of(a);
      for (int64_t j = 0; j < C; ++j) {
        if (j == self || l.cand[j] != la) continue;
        for (int64_t n = 0; n < C; ++n) {
          if (l.cand[n] == la) continue;
          pa[k] = a, pp[k] = j, pn[k] = n;
          ++k;
        }
      }
    }
  });
  return {A, P, Ng};
}

// Index triplets from per-anchor (positive, negative) lists.
Triplets flatten(const std::vector<std::vector<std::pair<int64_t, int64_t>>>& rows,
                 const at::TensorOptions& opts) {
  int64_t total = 0;
  for (const auto& r : rows) total += static_cast<int64_t>(r.size());
  at::Tensor A = empty({total}, opts), P = empty_like(A), Ng = empty_like(A);
  int64_t *pa = A.data_ptr<int64_t>(), *pp = P.data_ptr<int64_t>(), *pn = Ng.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t a = 0; a < static_cast<int64_t>(rows.size()); ++a) {
    for (const auto& pn_pair : rows[a]) {
      pa[k] = a, pp[k] = pn_pair.first, pn[k] = pn_pair.second;
      ++k;
    }
  }
  return {A, P, Ng};
}

// The semi-hard row policy over the rows of x against the rows of y: per anchor its
// (positive, chosen negative) pairs.
template <typename T, Metric M>
void semi_hard_rows(const Prepared& x, const Prepared& y, const RowLabels& l,
                    std::vector<std::vector<std::pair<int64_t, int64_t>>>& rows) {
  const SemiHardRows<T, M> policy(l, T(0));
  for_each_distance_row<T, M>(x, y, [&](int64_t a, const T* d) {
    policy.for_each_pair(a, d, [&](int64_t j, const auto& n, T) { rows[a].emplace_back(j, n.second); });
  });
}

Triplets semi_hard_triplets(const Prepared& p, const at::Tensor& lab, Metric m) {
  const int64_t N = p.rows();
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rows(N);
  AT_DISPATCH_FLOATING_TYPES(p.e.scalar_type(), "semi_hard_triplets", [&] {
    TC_METRIC_SWITCH(m, kM, [&] {
      const int64_t* l = lab.data_ptr<int64_t>();
      const Positives<scalar_t> pos = collect_positives<scalar_t, kM>(p, l);
      if (pos.fits) {  // the loss's own fused selection
        const SemiHardMined<scalar_t> mined = mine_fused<scalar_t, kM>(p, l, pos);
        constexpr int K = kFusedMaxPositives;
        for (int64_t a = 0; a < N; ++a) {
          if (pos.negatives[a] == 0) continue;
          for (int k = 0; k < pos.count[a]; ++k) {
            rows[a].emplace_back(pos.idx[a * K + k], mined.neg[a * K + k]);
          }
        }
        return;
      }
      semi_hard_rows<scalar_t, kM>(p, p, RowLabels::batch(l, N), rows);
    });
  });
  return flatten(rows, lab.options());
}

// Query vs reference: x (N, D) anchors against y (M, D); p and n index y.
Triplets semi_hard_triplets_ref(const Prepared& x, const Prepared& y, const RowLabels& l, Metric m,
                                const at::TensorOptions& opts) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rows(x.rows());
  AT_DISPATCH_FLOATING_TYPES(x.e.scalar_type(), "semi_hard_triplets_ref", [&] {
    TC_METRIC_SWITCH(m, kM, [&] { semi_hard_rows<scalar_t, kM>(x, y, l, rows); });
  });
  return flatten(rows, opts);
}

}  // namespace

// embeddings: (N, D), labels: (N,), strategy 0 batch_hard / 1 batch_all / 2 semi_hard
// -> (anchor (T,), positive (T,), negative (T,)) int64.
Triplets mine_triplets_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                           int64_t strategy, int64_t metric) {
  const at::Tensor lab = check_batch(embeddings, labels, metric);
  TORCH_CHECK(strategy >= 0 && strategy <= 2,
              "triplet_cuda: strategy must be 0 (batch_hard), 1 (batch_all) or 2 (semi_hard), got ",
              strategy);
  const Metric m = static_cast<Metric>(metric);
  switch (static_cast<Strategy>(strategy)) {
    case Strategy::kBatchHard:
      return batch_hard_triplets(prepare(embeddings, m), lab, m);
    case Strategy::kBatchAll:
      return batch_all_triplets(RowLabels::batch(lab.data_ptr<int64_t>(), lab.size(0)), lab.size(0),
                                lab.options());
    default:
      return semi_hard_triplets(prepare(embeddings, m), lab, m);
  }
}

// Query vs reference: embeddings (N, D), labels (N,) anchors; ref (M, D), ref_labels (M,),
// self_index (N,) -> (anchor, positive, negative), positive and negative indexing ref.
Triplets mine_triplets_ref_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                               const at::Tensor& ref, const at::Tensor& ref_labels,
                               const at::Tensor& self_index, int64_t strategy, int64_t metric) {
  const RefInputs in = check_ref_batch(embeddings, labels, ref, ref_labels, self_index, metric);
  TORCH_CHECK(strategy >= 0 && strategy <= 2,
              "triplet_cuda: strategy must be 0 (batch_hard), 1 (batch_all) or 2 (semi_hard), got ",
              strategy);
  const Metric m = static_cast<Metric>(metric);
  const int64_t N = embeddings.size(0);
  const RowLabels l{in.lab.data_ptr<int64_t>(), in.ref_lab.data_ptr<int64_t>(), ref.size(0),
                    in.self.data_ptr<int64_t>()};
  switch (static_cast<Strategy>(strategy)) {
    case Strategy::kBatchHard: {
      const HardMined r = mine_batch_hard_ref(prepare(embeddings, m), prepare(ref, m), l, m);
      const at::Tensor a = r.pos_idx.ge(0).nonzero().select(1, 0);
      return {a, r.pos_idx.index_select(0, a), r.neg_idx.index_select(0, a)};
    }
    case Strategy::kBatchAll:
      return batch_all_triplets(l, N, in.lab.options());
    default:
      return semi_hard_triplets_ref(prepare(embeddings, m), prepare(ref, m), l, m, in.lab.options());
  }
}

}  // namespace cpu
}  // namespace triplet_cuda
