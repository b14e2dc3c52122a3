// mine_triplets on CPU: (anchor, positive, negative) index triplets for a mining strategy,
// sorted by (anchor, positive, negative).
#include <ATen/ops/empty.h>
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
  const at::Tensor a = (r.pos_idx >= 0).nonzero().select(1, 0);
  return {a, r.pos_idx.index_select(0, a), r.neg_idx.index_select(0, a)};
}

Triplets batch_all_triplets(const at::Tensor& lab) {
  const int64_t N = lab.size(0);
  const int64_t* l = lab.data_ptr<int64_t>();
  // Every anchor's triplets are |positives| * |negatives|, laid out by exclusive scan.
  std::vector<int64_t> class_size(N, 0), offset(N + 1, 0);
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      for (int64_t j = 0; j < N; ++j) class_size[a] += l[j] == l[a];
    }
  });
  for (int64_t a = 0; a < N; ++a) offset[a + 1] = offset[a] + (class_size[a] - 1) * (N - class_size[a]);
  const auto opts = lab.options();
  at::Tensor A = at::empty({offset[N]}, opts), P = at::empty_like(A), Ng = at::empty_like(A);
  int64_t *pa = A.data_ptr<int64_t>(), *pp = P.data_ptr<int64_t>(), *pn = Ng.data_ptr<int64_t>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      int64_t k = offset[a];
      if (k == offset[a + 1]) continue;
      for (int64_t j = 0; j < N; ++j) {
        if (j == a || l[j] != l[a]) continue;
        for (int64_t n = 0; n < N; ++n) {
          if (l[n] == l[a]) continue;
          pa[k] = a, pp[k] = j, pn[k] = n;
          ++k;
        }
      }
    }
  });
  return {A, P, Ng};
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
      const SemiHardRows<scalar_t, kM> policy(lab.data_ptr<int64_t>(), N, scalar_t(0));
      for_each_distance_row<scalar_t, kM>(p, p, [&](int64_t a, const scalar_t* d) {
        policy.for_each_pair(a, d, [&](int64_t j, const auto& n, scalar_t) {
          rows[a].emplace_back(j, n.second);
        });
      });
    });
  });
  int64_t total = 0;
  for (const auto& r : rows) total += static_cast<int64_t>(r.size());
  const auto opts = lab.options();
  at::Tensor A = at::empty({total}, opts), P = at::empty_like(A), Ng = at::empty_like(A);
  int64_t *pa = A.data_ptr<int64_t>(), *pp = P.data_ptr<int64_t>(), *pn = Ng.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t a = 0; a < N; ++a) {
    for (const auto& pn_pair : rows[a]) {
      pa[k] = a, pp[k] = pn_pair.first, pn[k] = pn_pair.second;
      ++k;
    }
  }
  return {A, P, Ng};
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
      return batch_all_triplets(lab);
    default:
      return semi_hard_triplets(prepare(embeddings, m), lab, m);
  }
}

}  // namespace cpu
}  // namespace triplet_cuda
