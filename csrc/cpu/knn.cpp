// knn on CPU: the k nearest reference rows of every query row, in row blocks (one GEMM per
// block; each row's keys computed from its dot products on the fly, distance.h's near-zero
// rule included, into a bounded heap), never the whole (N, M) distance matrix.
//
// Order: ascending distance, ties by the lowest reference index, NaN after every number
// (+inf included). The Euclidean metric is ranked by the squared distance (its square root is
// taken for the k kept), so "equal" means equal squared distances there. Rows with fewer than k candidates (M < k, or M - 1 < k when the query's
// own row is excluded) are padded with distance +inf and index -1.
#include "ops_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../knn_args.h"
#include "distance.h"

namespace triplet_cuda {
namespace cpu {
namespace {

// (distance, index) strict order: smaller distance first, NaN last, then lower index.
template <typename T>
inline bool knn_before(T da, int64_t ia, T db, int64_t ib) {
  const bool na = std::isnan(da), nb = std::isnan(db);
  if (na || nb) return na != nb ? nb : ia < ib;
  return da < db || (da == db && ia < ib);
}

constexpr int64_t kKnnBlockBytes = int64_t(32) << 20;

template <typename T>
struct Cand {
  T d;
  int64_t i;
};

// Selection key of a pair from its dot product: the epilogue's Gram value before finish()
// (csrc/epilogue.h): the squared distance for both Euclidean metrics (monotone in the distance:
// no square root per candidate), cos for cosine turned into 1 - cos. Squared distances within
// rounding noise of 0 are recomputed exactly (the near-zero rule), so duplicates of the query
// come first with key 0; a non-finite row gives NaN (the NaN rule), which sorts last here.
template <Metric M, typename T>
inline T knn_key(T dot, const T* a, const T* b, int64_t D, T sq_a, T inv_a, T sq_b, T inv_b) {
  T v = epi::gram_value<M>(dot, sq_a, inv_a, sq_b, inv_b);
  if constexpr (M == Metric::kCosine) {
    return T(1) - v;
  } else {
    if (epi::needs_exact<M>(v, sq_a, sq_b)) {
      v = explicit_sum<M>(a, b, D);
      if (!epi::is_finite(v)) v = epi::quiet_nan<T>();
    }
    return v;
  }
}

// Rows in blocks of about 32 MiB of dot products (one GEMM each); every row of a block is then
// scanned once, its keys computed on the fly and kept in a bounded max-heap of k candidates
// (the worst on top, cached for a one-compare rejection). Rows run in parallel.
template <typename T, Metric M>
void knn_rows(const Prepared& q, const Prepared& r, int64_t k, int64_t self_offset, T* out_d,
              int64_t* out_i) {
  const int64_t N = q.rows(), Mc = r.rows(), D = q.e.size(1);
  const T* qe = q.e.data_ptr<T>();
  const T* re = r.e.data_ptr<T>();
  const T* qsq = q.sqnorm.data_ptr<T>();
  const T* qinv = q.inv.data_ptr<T>();
  const T* rsq = r.sqnorm.data_ptr<T>();
  const T* rinv = r.inv.data_ptr<T>();
  const auto before = [](const Cand<T>& a, const Cand<T>& b) {
    return knn_before(a.d, a.i, b.d, b.i);
  };
  // Blocks of about 32 MiB: fewer, larger GEMMs and parallel regions than distance.h's 8 MiB
  // (the heap scan is cheap next to the GEMM; on a loaded machine each region costs a wake-up).
  const int64_t B = std::max<int64_t>(
      1, std::min<int64_t>(N, kKnnBlockBytes / std::max<int64_t>(Mc * sizeof(T), 1)));
  at::Tensor block = empty({B, Mc}, q.e.options());  // reused: the peak is one block
  for (int64_t r0 = 0; r0 < N; r0 += B) {
    const int64_t b = std::min(B, N - r0);
    at::Tensor G = block.narrow(0, 0, b);
    mm_out(G, q.e.narrow(0, r0, b), r.e.t());
    const T* gp = G.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
      std::vector<Cand<T>> heap;
      heap.reserve(static_cast<size_t>(std::min(k, Mc)));
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t row = r0 + i;
        const int64_t self = self_offset >= 0 ? self_offset + row : -1;
        const T* g = gp + i * Mc;
        const T* qi = qe + row * D;
        const T sq_q = qsq[row], inv_q = qinv[row];
        heap.clear();
        // The worst kept candidate. Columns ascend, so a candidate equal to it never wins the
        // tie (it has the higher index); a NaN worst loses to any number.
        T worst = 0;
        bool worst_nan = false;
        for (int64_t j = 0; j < Mc; ++j) {
          const T key = knn_key<M>(g[j], qi, re + j * D, D, sq_q, inv_q, rsq[j], rinv[j]);
          if (static_cast<int64_t>(heap.size()) < k) {
            if (j == self) continue;
            heap.push_back({key, j});
            std::push_heap(heap.begin(), heap.end(), before);
          } else if (key < worst || (worst_nan && key == key)) {
            if (j == self) continue;
            std::pop_heap(heap.begin(), heap.end(), before);
            heap.back() = {key, j};
            std::push_heap(heap.begin(), heap.end(), before);
          } else {
            continue;
          }
          if (static_cast<int64_t>(heap.size()) == k) {
            worst = heap.front().d;
            worst_nan = std::isnan(worst);
          }
        }
        std::sort_heap(heap.begin(), heap.end(), before);  // ascending
        T* od = out_d + row * k;
        int64_t* oi = out_i + row * k;
        const int64_t n = static_cast<int64_t>(heap.size());
        for (int64_t t = 0; t < n; ++t) {
          const T key = heap[t].d;
          if constexpr (M == Metric::kEuclidean) {
            od[t] = std::sqrt(key);
          } else {
            od[t] = key;
          }
          oi[t] = heap[t].i;
        }
        for (int64_t t = n; t < k; ++t) od[t] = std::numeric_limits<T>::infinity(), oi[t] = -1;
      }
    });
  }
}

}  // namespace

// query: (N, D), ref: (M, D) -> (dist (N, k) in the dtype of query, idx (N, k) int64).
std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& ref,
                                           int64_t k, int64_t metric, int64_t self_offset) {
  check_knn_args(query, ref, k, metric, self_offset, c10::kCPU);
  const int64_t N = query.size(0);
  const Metric m = static_cast<Metric>(metric);
  const auto acc = acc_type(query.scalar_type());
  at::Tensor dist = empty({N, k}, query.options().dtype(acc));
  at::Tensor idx = empty({N, k}, query.options().dtype(at::kLong));
  if (N == 0 || k == 0) return {dist.to(query.scalar_type()), idx};
  if (ref.size(0) == 0) return {dist.fill_(INFINITY).to(query.scalar_type()), idx.fill_(-1)};
  const Prepared pq = prepare(query, m);
  const Prepared pr = query.is_same(ref) ? pq : prepare(ref, m);
  AT_DISPATCH_FLOATING_TYPES(acc, "knn", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      knn_rows<scalar_t, kM>(pq, pr, k, self_offset, dist.data_ptr<scalar_t>(),
                             idx.data_ptr<int64_t>());
    });
  });
  return {dist.to(query.scalar_type()), idx};
}

}  // namespace cpu
}  // namespace triplet_cuda
