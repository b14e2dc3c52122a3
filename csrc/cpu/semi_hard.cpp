// Semi-hard triplet loss on CPU: per anchor, sort the negatives once and pick each positive's
// negative by binary search. O(N^2 log N) time, O(block * N) memory.
#include <torch/library.h>

#include "semi_hard.h"

namespace triplet_cuda {
namespace cpu {

TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m) {
  m.impl("semi_hard_loss", &loss_forward<SemiHardRows>);
  m.impl("semi_hard_loss_backward", &loss_backward<SemiHardRows>);
}

}  // namespace cpu
}  // namespace triplet_cuda
