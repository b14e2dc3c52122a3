// Registers every CPU kernel for the CPU dispatch key. One file, so that only it pays for
// <torch/library.h>; the kernels are declared in ops_cpu.h and defined in their own files.
#include <torch/library.h>

#include "ops_cpu.h"

namespace triplet_cuda {
namespace cpu {

TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance_cpu);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_cpu);
  m.impl("batch_hard_mine", &batch_hard_mine_cpu);
  m.impl("batch_hard_mine_backward", &batch_hard_mine_backward_cpu);
  m.impl("batch_all_loss", &batch_all_forward);
  m.impl("batch_all_loss_backward", &batch_all_backward);
  m.impl("semi_hard_loss", &semi_hard_forward);
  m.impl("semi_hard_loss_backward", &semi_hard_backward);
  m.impl("contrastive_loss", &contrastive_forward);
  m.impl("contrastive_loss_backward", &contrastive_backward);
  m.impl("contrastive_loss_with_grad", &contrastive_with_grad);
  m.impl("contrastive_hinge_loss", &contrastive_hinge_forward);
  m.impl("contrastive_hinge_loss_backward", &contrastive_hinge_backward);
  m.impl("mine_triplets", &mine_triplets_cpu);
  m.impl("knn", &knn_cpu);
  m.impl("batch_hard_mine_ref", &batch_hard_mine_ref_cpu);
  m.impl("batch_hard_mine_ref_backward", &batch_hard_mine_ref_backward_cpu);
  m.impl("batch_all_loss_ref", &batch_all_ref_forward);
  m.impl("batch_all_loss_ref_backward", &batch_all_ref_backward);
  m.impl("semi_hard_loss_ref", &semi_hard_ref_forward);
  m.impl("semi_hard_loss_ref_backward", &semi_hard_ref_backward);
  m.impl("contrastive_loss_ref", &contrastive_ref_forward);
  m.impl("contrastive_loss_ref_backward", &contrastive_ref_backward);
  m.impl("mine_triplets_ref", &mine_triplets_ref_cpu);
}

}  // namespace cpu
}  // namespace triplet_cuda
