// The CPU entry points of every op, registered in one place (register.cpp): the kernel files
// then need only ATen, not the heavy <torch/library.h> (about 8 s of compile time each).
// Shapes and semantics of each op: csrc/ops.cpp (the schemas).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace triplet_cuda {
namespace cpu {

// x: (N, D), y: (M, D) -> (N, M) distances in the dtype of x.
at::Tensor pairwise_distance_cpu(const at::Tensor& x, const at::Tensor& y, int64_t metric);
// grad, dist: (N, M); x: (N, D); y: (M, D) -> (grad_x (N, D), grad_y (M, D)).
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(const at::Tensor& grad,
                                                                  const at::Tensor& x,
                                                                  const at::Tensor& y,
                                                                  const at::Tensor& dist,
                                                                  int64_t metric);

// embeddings: (N, D), labels: (N,) -> (pos_dist (N), pos_idx (N) int64, neg_dist (N),
// neg_idx (N) int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, int64_t metric);
// grad_pos_dist, grad_neg_dist: (N,); the forward's embeddings (N, D) and outputs -> (N, D).
at::Tensor batch_hard_mine_backward_cpu(const at::Tensor& grad_pos_dist,
                                        const at::Tensor& grad_neg_dist,
                                        const at::Tensor& embeddings, const at::Tensor& pos_dist,
                                        const at::Tensor& pos_idx, const at::Tensor& neg_dist,
                                        const at::Tensor& neg_idx, int64_t metric);

// Loss ops: embeddings (N, D), labels (N,) -> (loss_sum 0-d, num_valid 0-d int64,
// num_positive 0-d int64); backward: grad_loss_sum 0-d -> grad (N, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_forward(const at::Tensor& embeddings,
                                                                const at::Tensor& labels,
                                                                double margin, int64_t metric);
at::Tensor batch_all_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                              const at::Tensor& labels, double margin, int64_t metric);
std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_forward(const at::Tensor& embeddings,
                                                                const at::Tensor& labels,
                                                                double margin, int64_t metric);
at::Tensor semi_hard_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                              const at::Tensor& labels, double margin, int64_t metric);
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  double margin, int64_t metric);
at::Tensor contrastive_backward(const at::Tensor& grad_loss_sum, const at::Tensor& embeddings,
                                const at::Tensor& labels, double margin, int64_t metric);
// The forward plus grad_sum (N, D), accumulation dtype: the gradient of loss_sum (g = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_with_grad(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, int64_t metric);
// The hinge form: -> (pos_sum, pos_nonzero, neg_sum, neg_nonzero); backward: grad (N, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_hinge_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, double pos_margin, double neg_margin,
    int64_t metric);
at::Tensor contrastive_hinge_backward(const at::Tensor& grad_pos_sum, const at::Tensor& grad_neg_sum,
                                      const at::Tensor& embeddings, const at::Tensor& labels,
                                      double pos_margin, double neg_margin, int64_t metric);

// embeddings: (N, D), labels: (N,), strategy -> (anchor (T,), positive (T,), negative (T,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cpu(const at::Tensor& embeddings,
                                                                const at::Tensor& labels,
                                                                int64_t strategy, int64_t metric);

// Query vs reference (the *_ref ops, csrc/ops.cpp): embeddings (N, D), labels (N,) anchors;
// ref (M, D), ref_labels (M,) candidates; self_index (N,) int64 (-1: the anchor is not in ref).
// Indices point into ref; backward ops return (grad_embeddings (N, D), grad_ref (M, D), or an
// empty (0,) tensor when ref_grad is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_ref_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t metric);
std::tuple<at::Tensor, at::Tensor> batch_hard_mine_ref_backward_cpu(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist, const at::Tensor& embeddings,
    const at::Tensor& ref, const at::Tensor& pos_dist, const at::Tensor& pos_idx,
    const at::Tensor& neg_dist, const at::Tensor& neg_idx, int64_t metric, bool ref_grad);
#define TC_DECLARE_REF_LOSS(NAME)                                                              \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME##_ref_forward(                           \
      const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,           \
      const at::Tensor& ref_labels, const at::Tensor& self_index, double margin,               \
      int64_t metric);                                                                         \
  std::tuple<at::Tensor, at::Tensor> NAME##_ref_backward(                                      \
      const at::Tensor& grad_loss_sum, const at::Tensor& embeddings, const at::Tensor& labels, \
      const at::Tensor& ref, const at::Tensor& ref_labels, const at::Tensor& self_index,       \
      double margin, int64_t metric, bool ref_grad);
TC_DECLARE_REF_LOSS(batch_all)
TC_DECLARE_REF_LOSS(semi_hard)
TC_DECLARE_REF_LOSS(contrastive)
#undef TC_DECLARE_REF_LOSS
std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_ref_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t strategy, int64_t metric);

// query: (N, D), ref: (M, D) -> (dist (N, k), idx (N, k) int64).
std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& ref,
                                           int64_t k, int64_t metric, int64_t self_offset);

}  // namespace cpu
}  // namespace triplet_cuda
