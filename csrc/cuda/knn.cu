// knn on CUDA: chunks of query rows; per chunk the tiled distance kernel of distance.cuh fills
// a bounded (rows, M) workspace (never N x M at once), then each row is reduced to its k
// nearest:
//   * k <= kKnnMaxK: one block per row; every thread keeps the sorted k best of its strided
//     columns (local memory), then k rounds of a block-wide minimum merge the thread lists;
//   * larger k: a stable segmented sort of the chunk, then the first k entries without the
//     query's own column.
// Order (both paths, as on the CPU): ascending distance (squared for Euclidean), ties by the lowest reference index,
// NaN after every number; rows with fewer than k candidates are padded with +inf / -1.

#include "ops_cuda.h"
#include "../knn_args.h"
#include "tiles.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

constexpr int kKnnThreads = 128;  // 4 warps per row
constexpr int kKnnMaxK = 32;      // the per-thread list of the fast path
constexpr int64_t kKnnWorkspaceBytes = int64_t(256) << 20;

// (distance, index) strict order: smaller distance first, NaN last, then the lower index;
// index < 0 marks "no candidate", after everything.
template <typename acc_t>
__device__ __forceinline__ bool knn_before(acc_t da, int64_t ia, acc_t db, int64_t ib) {
  if (ia < 0 || ib < 0) return ib < 0 && ia >= 0;
  const bool na = da != da, nb = db != db;
  if (na || nb) return na != nb ? nb : ia < ib;
  return da < db || (da == db && ia < ib);
}

// dist: (rows, M) with row stride ld; self_base: -1, or the reference column of row 0
// (row r skips column self_base + r). Writes the k (<= kKnnMaxK) nearest of each row.
template <typename acc_t>
__global__ void __launch_bounds__(kKnnThreads)
    knn_select_small_kernel(const acc_t* __restrict__ dist, int64_t ld, int64_t M, int k,
                            int64_t self_base, acc_t* __restrict__ out_d,
                            int64_t* __restrict__ out_i) {
  const int64_t row = blockIdx.x;
  const acc_t* d = dist + row * ld;
  const int64_t self = self_base >= 0 ? self_base + row : -1;
  acc_t best_d[kKnnMaxK];
  int64_t best_i[kKnnMaxK];
  int n = 0;
  // Columns ascend per thread, so ties keep the lowest index by the strict comparison.
  for (int64_t j = threadIdx.x; j < M; j += kKnnThreads) {
    if (j == self) continue;
    const acc_t v = d[j];
    if (n == k && !knn_before(v, j, best_d[k - 1], best_i[k - 1])) continue;
    int p = n < k ? n++ : k - 1;
    while (p > 0 && knn_before(v, j, best_d[p - 1], best_i[p - 1])) {
      best_d[p] = best_d[p - 1];
      best_i[p] = best_i[p - 1];
      --p;
    }
    best_d[p] = v;
    best_i[p] = j;
  }
  // Merge: k rounds of a block-wide minimum over the threads' list heads.
  __shared__ acc_t warp_d[kKnnThreads / kWarp];
  __shared__ long long warp_i[kKnnThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int head = 0;
  for (int t = 0; t < k; ++t) {
    acc_t cd = head < n ? best_d[head] : acc_inf<acc_t>();
    long long ci = head < n ? static_cast<long long>(best_i[head]) : -1LL;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t od = __shfl_xor_sync(0xffffffffu, cd, offset);
      const long long oi = __shfl_xor_sync(0xffffffffu, ci, offset);
      if (knn_before<acc_t>(od, oi, cd, ci)) cd = od, ci = oi;
    }
    __syncthreads();  // the previous round is done reading warp_d / warp_i
    if (lane == 0) warp_d[warp] = cd, warp_i[warp] = ci;
    __syncthreads();
    cd = warp_d[0];
    ci = warp_i[0];
#pragma unroll
    for (int w = 1; w < kKnnThreads / kWarp; ++w) {
      if (knn_before<acc_t>(warp_d[w], warp_i[w], cd, ci)) cd = warp_d[w], ci = warp_i[w];
    }
    if (head < n && static_cast<long long>(best_i[head]) == ci) ++head;  // indices are unique
    if (threadIdx.x == 0) {
      out_d[row * k + t] = ci >= 0 ? cd : acc_inf<acc_t>();
      out_i[row * k + t] = ci;
    }
  }
}

// sd / si: (rows, kc) sorted distances and indices of each row; writes the first k entries
// that are not the row's own column (self_base + r), padding with +inf / -1.
template <typename acc_t>
__global__ void knn_drop_self_kernel(const acc_t* __restrict__ sd, const int64_t* __restrict__ si,
                                     int64_t rows, int64_t kc, int64_t k, int64_t self_base,
                                     acc_t* __restrict__ out_d, int64_t* __restrict__ out_i) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t self = self_base >= 0 ? self_base + r : -1;
    int64_t t = 0;
    for (int64_t c = 0; c < kc && t < k; ++c) {
      const int64_t j = si[r * kc + c];
      if (j == self) continue;
      out_d[r * k + t] = sd[r * kc + c];
      out_i[r * k + t] = j;
      ++t;
    }
    for (; t < k; ++t) {
      out_d[r * k + t] = acc_inf<acc_t>();
      out_i[r * k + t] = -1;
    }
  }
}

}  // namespace

// query: (N, D), ref: (M, D) -> (dist (N, k) in the dtype of query, idx (N, k) int64).
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query_in, const at::Tensor& ref_in,
                                            int64_t k, int64_t metric, int64_t self_offset) {
  check_knn_args(query_in, ref_in, k, metric, self_offset, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor q = query_in.contiguous(), r = ref_in.contiguous();
  const int64_t N = q.size(0), M = r.size(0), D = q.size(1);
  const auto acc = acc_scalar_type(q.scalar_type());
  at::Tensor dist = empty({N, k}, q.options().dtype(acc));
  at::Tensor idx = empty({N, k}, q.options().dtype(at::kLong));
  if (N == 0 || k == 0) return {dist.to(q.scalar_type()), idx};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "knn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sq = compute_row_stats<scalar_t, acc_t>(q, stream);
    const at::Tensor sr = compute_row_stats<scalar_t, acc_t>(r, stream);
    const int64_t rows = std::max<int64_t>(
        1, std::min<int64_t>(N, kKnnWorkspaceBytes / std::max<int64_t>(M * sizeof(acc_t), 1)));
    at::Tensor ws = empty({rows, std::max<int64_t>(M, 1)}, q.options().dtype(acc));
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t b = std::min(rows, N - r0);
      const int64_t self_base = self_offset >= 0 ? self_offset + r0 : -1;
      acc_t* out_d = dist.data_ptr<acc_t>() + r0 * k;
      int64_t* out_i = idx.data_ptr<int64_t>() + r0 * k;
      TC_METRIC_SWITCH(metric, kM, [&] {
        // Euclidean neighbours are selected on squared distances, as on the CPU (the square
        // root of adjacent float squares can merge them into a tie the CPU does not see);
        // the k outputs get their square root at the end.
        constexpr Metric kKey = kM == Metric::kEuclidean ? Metric::kSquaredEuclidean : kM;
        launch_distance<scalar_t, acc_t, acc_t, kKey>(
            q.data_ptr<scalar_t>() + r0 * D, row_stats_view<acc_t>(sq).shifted(r0), b,
            r.data_ptr<scalar_t>(), row_stats_view<acc_t>(sr), M, D, ws.data_ptr<acc_t>(), M,
            stream);
      });
      if (k <= kKnnMaxK) {
        knn_select_small_kernel<acc_t><<<grid_1d(b), kKnnThreads, 0, stream>>>(
            ws.data_ptr<acc_t>(), M, M, static_cast<int>(k), self_base, out_d, out_i);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t kc = std::min<int64_t>(M, k + (self_base >= 0 ? 1 : 0));
        at::Tensor sd, si;
        if (M > 0) {
          const auto sorted = ws.narrow(0, 0, b).sort(/*stable=*/true, /*dim=*/1,
                                       /*descending=*/false);
          sd = std::get<0>(sorted).narrow(1, 0, kc).contiguous();
          si = std::get<1>(sorted).narrow(1, 0, kc).contiguous();
        } else {
          sd = empty({b, 0}, ws.options());
          si = empty({b, 0}, idx.options());
        }
        knn_drop_self_kernel<acc_t><<<elementwise_grid(b), kElementwiseThreads, 0, stream>>>(
            sd.data_ptr<acc_t>(), si.data_ptr<int64_t>(), b, kc, k, self_base, out_d, out_i);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  if (static_cast<Metric>(metric) == Metric::kEuclidean) dist.sqrt_();
  return {dist.to(q.scalar_type()), idx};
}

}  // namespace cuda
}  // namespace triplet_cuda
