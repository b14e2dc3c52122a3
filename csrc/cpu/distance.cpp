// CPU distance blocks and their gradient (see distance.h).
#include "distance.h"

#include <cstdlib>

namespace triplet_cuda {
namespace cpu {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Prepared prepare(const at::Tensor& x, Metric metric) {
  Prepared p;
  p.e = x.to(acc_type(x.scalar_type())).contiguous();
  p.sqnorm = p.e.square().sum(1);
  p.inv = p.sqnorm.sqrt().clamp_min(kCosineEps).reciprocal();
  if (metric == Metric::kCosine) {
    const double eps2 = kCosineEps * kCosineEps;
    // 1 / ||e||^2 above eps^2, 0 below; NaN stays NaN (the NaN rule)
    p.scale = p.sqnorm.reciprocal().where(p.sqnorm.gt(eps2),
                                          p.sqnorm.where(p.sqnorm.isnan(), zeros_like(p.sqnorm)));
  } else {
    p.scale = p.sqnorm.new_ones(p.sqnorm.sizes());
  }
  return p;
}

namespace {

// Bytes of one distance block: 8 MiB, or TRIPLET_CUDA_CPU_BLOCK_BYTES (a test knob: tiny blocks
// make small batches span many blocks, so the multi-block paths are tested against the
// reference at sizes it can afford).
int64_t block_bytes() {
  if (const char* env = std::getenv("TRIPLET_CUDA_CPU_BLOCK_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return int64_t(8) << 20;
}

}  // namespace

int64_t block_rows(int64_t rows, int64_t cols, int64_t elem_size) {
  const int64_t b = block_bytes() / std::max<int64_t>(cols * elem_size, 1);
  return std::max<int64_t>(1, std::min(rows, b));
}

namespace {

// G: (B, C) dot products of rows [r0, r0 + B) of x with rows [c0, c0 + C) of y, turned
// into distances in place.
template <typename T, Metric M>
void dot_to_distance(at::Tensor& G, const Prepared& x, int64_t r0, const Prepared& y, int64_t c0) {
  const int64_t B = G.size(0), Mc = G.size(1), D = x.e.size(1);
  T* g = G.data_ptr<T>();
  const T* xe = x.e.data_ptr<T>() + r0 * D;
  const T* ye = y.e.data_ptr<T>() + c0 * D;
  const T* sq_rows = x.sqnorm.data_ptr<T>() + r0;
  const T* inv_rows = x.inv.data_ptr<T>() + r0;
  const T* sq_cols = y.sqnorm.data_ptr<T>() + c0;
  const T* inv_cols = y.inv.data_ptr<T>() + c0;
  at::parallel_for(0, B, row_grain(Mc), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* row = g + i * Mc;
      const T* xi = xe + i * D;
      const T sq_i = sq_rows[i], inv_i = inv_rows[i];
      for (int64_t j = 0; j < Mc; ++j) {
        row[j] = distance_from_dot<M>(row[j], xi, ye + j * D, D, sq_i, inv_i, sq_cols[j],
                                      inv_cols[j]);
      }
    }
  });
}

}  // namespace

at::Tensor distance_block(const Prepared& x, int64_t r0, int64_t B, const Prepared& y, int64_t c0,
                          int64_t C, Metric metric) {
  at::Tensor G = x.e.narrow(0, r0, B).mm(y.e.narrow(0, c0, C).t());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "distance_block", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      dot_to_distance<scalar_t, kM>(G, x, r0, y, c0);
    });
  });
  return G;
}

namespace {

// Overwrites W with the cross coefficients K_ij (d/dx_i gets K_ij y_j, d/dy_j gets K_ij x_i)
// and dist with the self coefficients Q_ij (d/dx_i gets Q_ij s_i x_i, d/dy_j gets Q_ij s_j y_j,
// where s is 1 for the euclidean metrics and 1/||.||^2 (0 below eps) for cosine).
template <typename T, Metric M>
void grad_coefficients(at::Tensor& W, at::Tensor& dist, const T* inv_rows, const T* inv_cols) {
  const int64_t B = W.size(0), Mc = W.size(1);
  T* w = W.data_ptr<T>();
  T* d = dist.data_ptr<T>();
  at::parallel_for(0, B, row_grain(Mc), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* wr = w + i * Mc;
      T* dr = d + i * Mc;
      for (int64_t j = 0; j < Mc; ++j) {
        const T g = wr[j];
        if constexpr (M == Metric::kCosine) {
          wr[j] = -g * inv_rows[i] * inv_cols[j];
          dr[j] = g * (T(1) - dr[j]);
        } else {
          T s;
          if constexpr (M == Metric::kEuclidean) {
            // the gradient of ||a - b|| at a == b is 0; NaN stays NaN
            s = dr[j] > T(0) ? g / dr[j] : (epi::is_nan(dr[j]) ? dr[j] : T(0));
          } else {
            s = T(2) * g;
          }
          wr[j] = -s;
          dr[j] = s;
        }
      }
    }
  });
}

}  // namespace

void accumulate_distance_grad(at::Tensor& W, at::Tensor& dist, const Prepared& x, int64_t r0,
                              const Prepared& y, int64_t c0, Metric metric, at::Tensor& grad_x,
                              at::Tensor& grad_y) {
  const int64_t B = W.size(0), C = W.size(1);
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "accumulate_distance_grad", [&] {
    TC_METRIC_SWITCH(metric, kM, [&] {
      grad_coefficients<scalar_t, kM>(W, dist, x.inv.data_ptr<scalar_t>() + r0,
                                      y.inv.data_ptr<scalar_t>() + c0);
    });
  });
  const at::Tensor xb = x.e.narrow(0, r0, B);
  const at::Tensor yc = y.e.narrow(0, c0, C);
  const at::Tensor row_self = dist.sum(1).mul(x.scale.narrow(0, r0, B));
  at::Tensor gx = grad_x.narrow(0, r0, B);
  gx.addcmul_(row_self.unsqueeze(1), xb);
  gx.addmm_(W, yc);
  if (!grad_y.defined()) return;  // y needs no gradient: no work for it
  const at::Tensor col_self = dist.sum(0).mul(y.scale.narrow(0, c0, C));
  at::Tensor gy = grad_y.narrow(0, c0, C);
  gy.addcmul_(col_self.unsqueeze(1), yc);
  gy.addmm_(W.t(), xb);
}

}  // namespace cpu
}  // namespace triplet_cuda
