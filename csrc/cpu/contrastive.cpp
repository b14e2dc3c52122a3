// Contrastive loss on CPU over unordered pairs i < j, fused over row blocks of distances.
#include <torch/library.h>

#include <algorithm>

#include "loss.h"

namespace triplet_cuda {
namespace cpu {
namespace {

template <typename T, Metric M>
struct ContrastiveRows {
  const int64_t* lab;
  int64_t N;
  T margin;
  ContrastiveRows(const int64_t* l, int64_t n, T mg) : lab(l), N(n), margin(mg) {}

  RowTotals forward(int64_t i, const T* d) const {
    RowTotals t;
    t.valid = N - 1 - i;
    for (int64_t j = i + 1; j < N; ++j) {
      T term;
      if (lab[j] == lab[i]) {
        term = d[j] * d[j];
      } else {
        const T r = std::max(margin - d[j], T(0));
        term = r * r;
      }
      t.sum += term;
      t.positive += term > T(0);
    }
    return t;
  }

  void weights(int64_t i, const T* d, T g, T* w) const {
    std::fill(w, w + i + 1, T(0));
    for (int64_t j = i + 1; j < N; ++j) {
      w[j] = lab[j] == lab[i] ? T(2) * g * d[j] : T(-2) * g * std::max(margin - d[j], T(0));
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m) {
  m.impl("contrastive_loss", &loss_forward<ContrastiveRows>);
  m.impl("contrastive_loss_backward", &loss_backward<ContrastiveRows>);
}

}  // namespace cpu
}  // namespace triplet_cuda
