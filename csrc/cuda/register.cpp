// Registers every CUDA kernel for the CUDA dispatch key (csrc/cpu/register.cpp's counterpart).
// One host C++ file, so that only it pays for <torch/library.h> and no .cu parses it; the
// entry points are declared in ops_cuda.h and defined in their .cu files. Built only with CUDA
// (triplet_cuda/_build.py lists csrc/cuda/ for CUDA builds alone).
#include <torch/library.h>

#include "ops_cuda.h"

namespace triplet_cuda {
namespace cuda {

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("pairwise_distance", &pairwise_distance_cuda);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_cuda);
  m.impl("batch_hard_mine", &batch_hard_mine_cuda);
  m.impl("batch_hard_mine_backward", &batch_hard_mine_backward_cuda);
  m.impl("batch_hard_mine_ref", &batch_hard_mine_ref_cuda);
  m.impl("batch_hard_mine_ref_backward", &batch_hard_mine_ref_backward_cuda);
  m.impl("batch_all_loss", &batch_all_loss_cuda);
  m.impl("batch_all_loss_backward", &batch_all_loss_backward_cuda);
  m.impl("batch_all_loss_ref", &batch_all_loss_ref_cuda);
  m.impl("batch_all_loss_ref_backward", &batch_all_loss_ref_backward_cuda);
  m.impl("semi_hard_loss", &semi_hard_loss_cuda);
  m.impl("semi_hard_loss_backward", &semi_hard_loss_backward_cuda);
  m.impl("semi_hard_loss_ref", &semi_hard_loss_ref_cuda);
  m.impl("semi_hard_loss_ref_backward", &semi_hard_loss_ref_backward_cuda);
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
  m.impl("contrastive_loss_ref", &contrastive_loss_ref_cuda);
  m.impl("contrastive_loss_ref_backward", &contrastive_loss_ref_backward_cuda);
  m.impl("contrastive_loss_with_grad", &contrastive_with_grad_cuda);
  m.impl("contrastive_hinge_loss", &contrastive_hinge_cuda);
  m.impl("contrastive_hinge_loss_backward", &contrastive_hinge_backward_cuda);
  m.impl("mine_triplets", &mine_triplets_cuda);
  m.impl("mine_triplets_ref", &mine_triplets_ref_cuda);
  m.impl("knn", &knn_cuda);
}

}  // namespace cuda
}  // namespace triplet_cuda
