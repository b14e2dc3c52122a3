// knn on CPU: the k nearest reference rows of every query row, in row blocks (one GEMM per
// block plus the fused distance epilogue of distance.h, then a bounded heap per row), never
// the whole (N, M) distance matrix.
//
// Order: ascending distance, ties by the lowest reference index, NaN after every number
// (+inf included). Rows with fewer than k candidates (M < k, or M - 1 < k when the query's
// own row is excluded) are padded with distance +inf and index -1.
#include <torch/library.h>

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

template <typename T>
struct Cand {
  T d;
  int64_t i;
};

template <typename T, Metric M>
void knn_rows(const Prepared& q, const Prepared& r, int64_t k, int64_t self_offset, T* out_d,
              int64_t* out_i) {
  const int64_t Mc = r.rows();
  // heap "less" = comes before; std heap keeps the largest (the worst candidate) on top
  const auto before = [](const Cand<T>& a, const Cand<T>& b) {
    return knn_before(a.d, a.i, b.d, b.i);
  };
  for_each_distance_row<T, M>(q, r, [&](int64_t row, const T* d) {
    const int64_t self = self_offset >= 0 ? self_offset + row : -1;
    std::vector<Cand<T>> heap;
    heap.reserve(static_cast<size_t>(std::min(k, Mc)));
    for (int64_t j = 0; j < Mc; ++j) {
      if (j == self) continue;
      const Cand<T> c{d[j], j};
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.push_back(c);
        std::push_heap(heap.begin(), heap.end(), before);
      } else if (before(c, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), before);
        heap.back() = c;
        std::push_heap(heap.begin(), heap.end(), before);
      }
    }
    std::sort_heap(heap.begin(), heap.end(), before);  // ascending
    T* od = out_d + row * k;
    int64_t* oi = out_i + row * k;
    const int64_t n = static_cast<int64_t>(heap.size());
    for (int64_t t = 0; t < n; ++t) od[t] = heap[t].d, oi[t] = heap[t].i;
    for (int64_t t = n; t < k; ++t) od[t] = std::numeric_limits<T>::infinity(), oi[t] = -1;
  });
}

// query: (N, D), ref: (M, D) -> (dist (N, k) in the dtype of query, idx (N, k) int64).
std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& ref,
                                           int64_t k, int64_t metric, int64_t self_offset) {
  check_knn_args(query, ref, k, metric, self_offset, c10::kCPU);
  const int64_t N = query.size(0);
  const Metric m = static_cast<Metric>(metric);
  const auto acc = acc_type(query.scalar_type());
  at::Tensor dist = at::empty({N, k}, query.options().dtype(acc));
  at::Tensor idx = at::empty({N, k}, query.options().dtype(at::kLong));
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

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m) { m.impl("knn", &knn_cpu); }

}  // namespace cpu
}  // namespace triplet_cuda
