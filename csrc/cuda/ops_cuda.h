// The CUDA entry points of every op, registered in one place (register.cpp) as csrc/cpu/ops_cpu.h
// does for the CPU: the .cu files then need only ATen, not <torch/library.h>, whose parse costs
// each .cu about 15 s of nvcc for sm_80 + sm_90 (cudafe++, cicc once per architecture, the host
// compiler). Shapes and semantics of each op: csrc/ops.cpp (the schemas); the argument checks
// are the kernels' own (csrc/checks.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace triplet_cuda {
namespace cuda {

// pairwise_distance.cu. x: (N, D), y: (M, D) -> (N, M) distances in the dtype of x.
at::Tensor pairwise_distance_cuda(const at::Tensor& x, const at::Tensor& y, int64_t metric);
// grad, dist: (N, M); x: (N, D); y: (M, D) -> (grad_x (N, D), grad_y (M, D)).
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad,
                                                                   const at::Tensor& x,
                                                                   const at::Tensor& y,
                                                                   const at::Tensor& dist,
                                                                   int64_t metric);

// batch_hard.cu (forward), batch_hard_backward.cu. embeddings: (N, D), labels: (N,) ->
// (pos_dist (N), pos_idx (N) int64, neg_dist (N), neg_idx (N) int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, int64_t metric);
// grad_pos_dist, grad_neg_dist: (N,); the forward's embeddings (N, D) and outputs -> (N, D).
at::Tensor batch_hard_mine_backward_cuda(const at::Tensor& grad_pos_dist,
                                         const at::Tensor& grad_neg_dist,
                                         const at::Tensor& embeddings, const at::Tensor& pos_dist,
                                         const at::Tensor& pos_idx, const at::Tensor& neg_dist,
                                         const at::Tensor& neg_idx, int64_t metric);
// Query vs reference: embeddings (N, D), labels (N,); ref (M, D), ref_labels (M,); self_index
// (N,) int64 (-1: none) -> as batch_hard_mine_cuda, indices into ref.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_ref_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t metric);
// -> (grad_embeddings (N, D), grad_ref (M, D), or an empty (0,) tensor when ref_grad is false).
std::tuple<at::Tensor, at::Tensor> batch_hard_mine_ref_backward_cuda(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist, const at::Tensor& embeddings,
    const at::Tensor& ref, const at::Tensor& pos_dist, const at::Tensor& pos_idx,
    const at::Tensor& neg_dist, const at::Tensor& neg_idx, int64_t metric, bool ref_grad);

// The loss ops (batch_all.cu, semi_hard.cu, contrastive.cu; loss_common.cuh's drivers):
//   NAME_loss_cuda: embeddings (N, D), labels (N,) -> (loss_sum 0-d, num_valid 0-d int64,
//     num_positive 0-d int64);
//   NAME_loss_backward_cuda: grad_loss_sum 0-d -> grad (N, D);
//   NAME_loss_ref_cuda / NAME_loss_ref_backward_cuda: query vs reference (ref (M, D),
//     ref_labels (M,), self_index (N,) int64) -> as above, and (grad_embeddings (N, D),
//     grad_ref (M, D) or an empty (0,) tensor when ref_grad is false).
#define TC_DECLARE_CUDA_LOSS(NAME)                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME##_loss_cuda(                             \
      const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric);  \
  at::Tensor NAME##_loss_backward_cuda(const at::Tensor& grad_loss_sum,                        \
                                       const at::Tensor& embeddings, const at::Tensor& labels, \
                                       double margin, int64_t metric);                         \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME##_loss_ref_cuda(                         \
      const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,           \
      const at::Tensor& ref_labels, const at::Tensor& self_index, double margin,               \
      int64_t metric);                                                                         \
  std::tuple<at::Tensor, at::Tensor> NAME##_loss_ref_backward_cuda(                            \
      const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels, \
      const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,       \
      double margin, int64_t metric, bool ref_grad);
TC_DECLARE_CUDA_LOSS(batch_all)
TC_DECLARE_CUDA_LOSS(semi_hard)
TC_DECLARE_CUDA_LOSS(contrastive)
#undef TC_DECLARE_CUDA_LOSS

// contrastive.cu. The forward plus grad_sum (N, D), accumulation dtype: d loss_sum / d x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_with_grad_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric);
// The hinge form: -> (pos_sum, pos_nonzero, neg_sum, neg_nonzero); backward: grad (N, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_hinge_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, double pos_margin, double neg_margin,
    int64_t metric);
at::Tensor contrastive_hinge_backward_cuda(const at::Tensor& grad_pos_sum,
                                           const at::Tensor& grad_neg_sum,
                                           const at::Tensor& embeddings, const at::Tensor& labels,
                                           double pos_margin, double neg_margin, int64_t metric);

// mine_triplets.cu. embeddings: (N, D), labels: (N,), strategy -> (anchor (T,), positive (T,),
// negative (T,)); the _ref form against a reference set (indices into ref).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cuda(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  int64_t strategy,
                                                                  int64_t metric);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_ref_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t strategy, int64_t metric);

// knn.cu. query: (N, D), ref: (M, D) -> (dist (N, k), idx (N, k) int64).
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query, const at::Tensor& ref,
                                            int64_t k, int64_t metric, int64_t self_offset);

}  // namespace cuda
}  // namespace triplet_cuda
