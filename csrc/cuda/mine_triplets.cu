// mine_triplets on CUDA: (anchor, positive, negative) index triplets for a strategy,
// sorted lexicographically by (anchor, positive, negative).
//   batch_hard: the valid anchors ascending with their mined positive / negative
//               (batch_hard.cu, then a stream compaction by at::nonzero);
//   batch_all:  every valid triplet; count pass (P * Q per anchor) + exclusive scan + fill
//               pass, one block per anchor, the k-th positive / negative of an anchor found
//               from the stably sorted labels (no distances needed);
//   semi_hard:  every valid (a, p) with its semi-hard negative (semi_hard.cu).
#include <torch/library.h>

#include "internal.cuh"
#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// counts[a] = P(a) * Q(a): positives times negatives of anchor a.
__global__ void batch_all_counts_kernel(const int64_t* __restrict__ labels,
                                        const int64_t* __restrict__ sorted_labels, int64_t N,
                                        int64_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    int64_t gs, ge;
    group_bounds(sorted_labels, N, labels[a], gs, ge);
    counts[a] = (ge - gs - 1) * (N - (ge - gs));
  }
}

// One block per anchor a: its P * Q triplets at offsets[a] + pk * Q + nk, pk-th positive
// and nk-th negative in ascending index order.
//   Positives: a's label group (order[gs .. ge), ascending indices) without a.
//   Negatives: the complement of the group. With the group's members s_0 < s_1 < ...,
//   s_i - i is the number of non-members below s_i (non-decreasing in i), and s_i lies
//   below the nk-th non-member iff s_i - i <= nk; so the nk-th non-member (0-based) is
//   nk + #{i : s_i - i <= nk}.
__global__ void __launch_bounds__(kRowThreads)
    batch_all_fill_kernel(const int64_t* __restrict__ labels,
                          const int64_t* __restrict__ sorted_labels,
                          const int64_t* __restrict__ order, const int64_t* __restrict__ rank,
                          int64_t N, const int64_t* __restrict__ offsets,
                          int64_t* __restrict__ out_a, int64_t* __restrict__ out_p,
                          int64_t* __restrict__ out_n) {
  const int64_t a = blockIdx.x;
  int64_t gs, ge;
  group_bounds(sorted_labels, N, labels[a], gs, ge);
  const int64_t G = ge - gs;
  const int64_t P = G - 1, Q = N - G;
  if (P <= 0 || Q <= 0) return;
  const int64_t ra = rank[a] - gs;  // position of a inside its group
  const int64_t* __restrict__ members = order + gs;
  const int64_t base = offsets[a];
  const int64_t total = P * Q;
  for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
    const int64_t pk = t / Q, nk = t % Q;
    const int64_t p = members[pk < ra ? pk : pk + 1];
    const int64_t below = partition_point(G, [&](int64_t i) { return members[i] - i <= nk; });
    out_a[base + t] = a;
    out_p[base + t] = p;
    out_n[base + t] = nk + below;
  }
}

// embeddings: (N, D), labels: (N,) any integer dtype, strategy (0 batch_hard, 1 batch_all,
// 2 semi_hard), metric -> (anchor, positive, negative), each (T,) int64, sorted by
// (anchor, positive, negative). Synchronises with the device (T depends on the data).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cuda(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  int64_t strategy,
                                                                  int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  TORCH_CHECK(strategy >= 0 && strategy <= 2,
              "triplet_cuda: strategy must be 0 (batch_hard), 1 (batch_all) or 2 (semi_hard), "
              "got ",
              strategy);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  const int64_t N = x.size(0);
  const auto idx_options = x.options().dtype(at::kLong);
  if (N == 0) {
    return {at::empty({0}, idx_options), at::empty({0}, idx_options),
            at::empty({0}, idx_options)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strategy kind = static_cast<Strategy>(strategy);
  if (kind == Strategy::kBatchHard) {
    const HardMinedCuda r = batch_hard_mine_impl(x, lab, metric);
    // nonzero returns the valid anchors in ascending order.
    const at::Tensor anchors = at::nonzero(at::ge(r.pos_idx, 0)).view({-1}).contiguous();
    return {anchors, at::index_select(r.pos_idx, 0, anchors),
            at::index_select(r.neg_idx, 0, anchors)};
  }
  if (kind == Strategy::kBatchAll) {
    const LabelGroups groups = label_groups(lab, stream);
    at::Tensor counts = at::empty({N}, idx_options);
    batch_all_counts_kernel<<<elementwise_grid(N), kElementwiseThreads, 0, stream>>>(
        lab.data_ptr<int64_t>(), groups.sorted.data_ptr<int64_t>(), N,
        counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor offsets;
    int64_t T = 0;
    std::tie(offsets, T) = exclusive_offsets(counts);  // synchronises
    at::Tensor out_a = at::empty({T}, idx_options);
    at::Tensor out_p = at::empty({T}, idx_options);
    at::Tensor out_n = at::empty({T}, idx_options);
    if (T > 0) {
      batch_all_fill_kernel<<<grid_1d(N), kRowThreads, 0, stream>>>(
          lab.data_ptr<int64_t>(), groups.sorted.data_ptr<int64_t>(),
          groups.order.data_ptr<int64_t>(), groups.rank.data_ptr<int64_t>(), N,
          offsets.data_ptr<int64_t>(), out_a.data_ptr<int64_t>(), out_p.data_ptr<int64_t>(),
          out_n.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {out_a, out_p, out_n};
  }
  return semi_hard_triplets_impl(x, lab, metric);  // Strategy::kSemiHard
}

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("mine_triplets", &mine_triplets_cuda);
}

}  // namespace cuda
}  // namespace triplet_cuda
