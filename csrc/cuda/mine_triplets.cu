// mine_triplets (and mine_triplets_ref: anchors against a reference set, the same kernels
// over RowLabels) on CUDA: (anchor, positive, negative) index triplets for a strategy,
// sorted lexicographically by (anchor, positive, negative).
//   batch_hard: the valid anchors ascending with their mined positive / negative
//               (batch_hard.cu, then a stream compaction by at::nonzero);
//   batch_all:  every valid triplet; count pass (P * Q per anchor) + exclusive scan + fill
//               pass, one block per anchor, the k-th positive / negative of an anchor found
//               from the stably sorted labels (no distances needed);
//   semi_hard:  every valid (a, p) with its semi-hard negative (semi_hard.cu).

#include "ops_cuda.h"
#include "internal.cuh"
#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// counts[a] = P(a) * Q(a): positives times negatives of anchor a among the candidates.
__global__ void batch_all_counts_kernel(RowLabels l, const int64_t* __restrict__ sorted_labels,
                                        int64_t N, int64_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    const AnchorGroup g = anchor_group(l, sorted_labels, a);
    counts[a] = g.P * g.Q;
  }
}

// One block per anchor a: its P * Q triplets at offsets[a] + pk * Q + nk, pk-th positive
// and nk-th negative in ascending candidate index order.
//   Positives: a's label group among the candidates (order[gs .. ge), ascending indices)
//   without a's self index (when that is in the group).
//   Negatives: the complement of the group in [0, C). With the group's members
//   s_0 < s_1 < ..., s_i - i is the number of non-members below s_i (non-decreasing in i),
//   and s_i lies below the nk-th non-member iff s_i - i <= nk; so the nk-th non-member
//   (0-based) is nk + #{i : s_i - i <= nk}.
__global__ void __launch_bounds__(kRowThreads)
    batch_all_fill_kernel(RowLabels l, const int64_t* __restrict__ sorted_labels,
                          const int64_t* __restrict__ order, const int64_t* __restrict__ rank,
                          const int64_t* __restrict__ offsets, int64_t* __restrict__ out_a,
                          int64_t* __restrict__ out_p, int64_t* __restrict__ out_n) {
  const int64_t a = blockIdx.x;
  const AnchorGroup g = anchor_group(l, sorted_labels, a);
  const int64_t G = g.ge - g.gs;
  const int64_t P = g.P, Q = g.Q;
  if (P <= 0 || Q <= 0) return;
  // position of the self index inside the group; G (skip nothing) when it is not a member
  const int64_t ra = g.self_in ? rank[g.self] - g.gs : G;
  const int64_t* __restrict__ members = order + g.gs;
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

// The mining of every strategy over checked, contiguous inputs on the current device (the
// batch itself or a reference set, MineArgs) -> (anchor, positive, negative), each (T,) int64,
// sorted by (anchor, positive, negative); positives and negatives index the candidates.
// Synchronises with the device (T depends on the data).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_impl(const MineArgs& in,
                                                                  int64_t strategy,
                                                                  int64_t metric) {
  TORCH_CHECK(strategy >= 0 && strategy <= 2,
              "triplet_cuda: strategy must be 0 (batch_hard), 1 (batch_all) or 2 (semi_hard), "
              "got ",
              strategy);
  const int64_t N = in.x.size(0);
  const int64_t C = in.symmetric() ? N : in.y.size(0);
  const auto idx_options = in.x.options().dtype(at::kLong);
  if (N == 0 || C == 0) {
    return {empty({0}, idx_options), empty({0}, idx_options),
            empty({0}, idx_options)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strategy kind = static_cast<Strategy>(strategy);
  if (kind == Strategy::kBatchHard) {
    const HardMinedCuda r = batch_hard_mine_impl(in, metric);
    // nonzero returns the valid anchors in ascending order.
    const at::Tensor anchors = r.pos_idx.ge(0).nonzero().view({-1}).contiguous();
    return {anchors, r.pos_idx.index_select(0, anchors),
            r.neg_idx.index_select(0, anchors)};
  }
  if (kind == Strategy::kBatchAll) {
    const at::Tensor& cand_labels = in.symmetric() ? in.lab : in.ref_lab;
    const RowLabels l = in.symmetric() ? batch_row_labels(in.lab)
                                       : ref_row_labels(in.lab, in.ref_lab, in.self);
    const LabelGroups groups = label_groups(cand_labels, stream);
    at::Tensor counts = empty({N}, idx_options);
    batch_all_counts_kernel<<<elementwise_grid(N), kElementwiseThreads, 0, stream>>>(
        l, groups.sorted.data_ptr<int64_t>(), N, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor offsets;
    int64_t T = 0;
    std::tie(offsets, T) = exclusive_offsets(counts);  // synchronises
    at::Tensor out_a = empty({T}, idx_options);
    at::Tensor out_p = empty({T}, idx_options);
    at::Tensor out_n = empty({T}, idx_options);
    if (T > 0) {
      batch_all_fill_kernel<<<grid_1d(N), kRowThreads, 0, stream>>>(
          l, groups.sorted.data_ptr<int64_t>(), groups.order.data_ptr<int64_t>(),
          groups.rank.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
          out_a.data_ptr<int64_t>(), out_p.data_ptr<int64_t>(), out_n.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {out_a, out_p, out_n};
  }
  return semi_hard_triplets_impl(in, metric);  // Strategy::kSemiHard
}

}  // namespace

// embeddings: (N, D), labels: (N,) any integer dtype, strategy (0 batch_hard, 1 batch_all,
// 2 semi_hard), metric -> (anchor, positive, negative), each (T,) int64, sorted by
// (anchor, positive, negative). Synchronises with the device (T depends on the data).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cuda(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  int64_t strategy,
                                                                  int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  MineArgs in;
  in.x = embeddings.contiguous();
  in.lab = lab;
  return mine_triplets_impl(in, strategy, metric);
}

// Query vs reference: embeddings (N, D), labels (N,) anchors; ref (M, D), ref_labels (M,);
// self_index (N,) int64 -> (anchor, positive, negative), positive and negative indexing ref.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_ref_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t strategy,
    int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const auto [ref_lab, self] = check_ref_args(embeddings, ref, ref_labels, self_index);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const MineArgs in{embeddings.contiguous(), lab, ref.contiguous(), ref_lab, self};
  return mine_triplets_impl(in, strategy, metric);
}

}  // namespace cuda
}  // namespace triplet_cuda
