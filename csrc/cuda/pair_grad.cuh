// Dense gradient of sum_ij W_ij d(x_i, y_j) with respect to x and y, as tiled
// matrix products with the per-pair coefficients computed on the fly (never stored).
//
// The per-pair coefficients are the shared epilogue's (csrc/epilogue.h, as the CPU):
// epi::pair_grad_scaled(W_ij, d_ij, m_i, m_j, inv_i, inv_j) = {ca, cab, cb} with
// d/dx_i (W_ij d_ij) = ca x_i + cab y_j and d/dy_j = cab x_i + cb y_j, so
//   grad_x_i = (sum_j ca_ij) x_i + sum_j cab_ij y_j
//   grad_y_j = (sum_i cb_ij) y_j + sum_i cab_ij x_i
// (euclidean: ca = cb = -cab = W / d, 0 where d == 0, NaN where d is NaN; squared: 2 W;
// cosine: ca = W (1 - d) m_i, cab = -W inv_i inv_j, m = RowStats::m). Below P = -cab and
// Q = ca (grad_x side) or cb (grad_y side).
//
// Kernel layout: one block of 16 x 16 threads per (64 output rows) x (64 feature columns)
// tile and per split of the reduction axis; the reduction axis is staged 16 at a time in
// shared memory (P, Q and the 16 x 64 slab of the other operand). Each split writes its
// own partial (split, row, k) in acc_t; a second kernel adds the splits in a fixed order
// (deterministic, no atomics) and writes / accumulates the output.
// Included by tiles.cu only; the other files call launch_pair_grad through tiles.cuh.
#pragma once

#include "distance.cuh"

namespace triplet_cuda {
namespace cuda {

template <typename acc_t>
struct GradSmem {
  acc_t p[kTileK][kTile + 1];      // P of (c, out row)
  acc_t q[kTileK][kTile + 1];      // Q of (c, out row)
  acc_t o[kTileK][kTile + 1];      // other operand: (c, feature column)
  acc_t coef[kTile];               // sum_c Q per out row
};

// Pairs (i, j), i < nI, j < nJ, with weight W[i * ldw + j] and distance dist[i * ldw + j].
// X: (nI, D), Y: (nJ, D) contiguous with statistics sx, sy.
//   TRANS == false: output rows r = i, reduction over c = j: writes grad_x partials.
//   TRANS == true : output rows r = j, reduction over c = i: writes grad_y partials.
// Block (blockIdx.x = out tile * tilesK + k tile, blockIdx.y = split s) reduces
// c in [s * c_per_split, min((s + 1) * c_per_split, nC)) and writes
// part[(s * nOut + r) * D + k].
template <typename scalar_t, typename acc_t, typename w_t, Metric M, bool TRANS>
__global__ void __launch_bounds__(kTileThreads)
    pair_grad_kernel(const w_t* __restrict__ W, const w_t* __restrict__ dist, int64_t ldw,
                     const scalar_t* __restrict__ X, RowStats<acc_t> sx, int64_t nI,
                     const scalar_t* __restrict__ Y, RowStats<acc_t> sy, int64_t nJ, int64_t D,
                     int64_t tilesK, int64_t c_per_split, acc_t* __restrict__ part) {
  __shared__ GradSmem<acc_t> sm;
  const int64_t nOut = TRANS ? nJ : nI;
  const int64_t nC = TRANS ? nI : nJ;
  const scalar_t* __restrict__ self = TRANS ? Y : X;
  const scalar_t* __restrict__ other = TRANS ? X : Y;

  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) / tilesK) * kTile;
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) % tilesK) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t c_begin = split * c_per_split;
  const int64_t c_end = c_begin + c_per_split < nC ? c_begin + c_per_split : nC;

  const int tid = threadIdx.x;
  const int tx = tid % kTileDim, ty = tid / kTileDim;

  acc_t acc[kPer][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = acc_t(0);
  }
  acc_t coef = 0;  // threads tid < kTile: sum_c Q for out row r0 + tid

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTileK) {
    __syncthreads();  // the previous stage is done reading sm
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int e = tid + l * kTileThreads;  // 0 .. 1023
      // Coalesced along the contiguous axis of W: j (= c when !TRANS, = r when TRANS).
      const int rr = TRANS ? e % kTile : e / kTileK;
      const int cc = TRANS ? e / kTile : e % kTileK;
      const int64_t r = r0 + rr, c = c0 + cc;
      acc_t P = 0, Q = 0;
      if (r < nOut && c < c_end) {
        const int64_t i = TRANS ? c : r;
        const int64_t j = TRANS ? r : c;
        const acc_t w = static_cast<acc_t>(W[i * ldw + j]);
        const acc_t d = static_cast<acc_t>(dist[i * ldw + j]);
        const acc_t m_i = M == Metric::kCosine ? sx.m[i] : acc_t(0);
        const acc_t m_j = M == Metric::kCosine ? sy.m[j] : acc_t(0);
        const epi::PairGrad<acc_t> pg =
            epi::pair_grad_scaled<M>(w, d, m_i, m_j, sx.inv[i], sy.inv[j]);
        P = -pg.cab;
        Q = TRANS ? pg.cb : pg.ca;
      }
      sm.p[cc][rr] = P;
      sm.q[cc][rr] = Q;
      // Other operand: rows c, feature columns k0 .. k0 + 63, coalesced along D.
      const int oc = e / kTile, ok = e % kTile;
      const int64_t orow = c0 + oc, ocol = k0 + ok;
      sm.o[oc][ok] = (orow < c_end && ocol < D) ? to_acc<acc_t>(other[orow * D + ocol]) : acc_t(0);
    }
    __syncthreads();
    if (tid < kTile) {
#pragma unroll
      for (int cc = 0; cc < kTileK; ++cc) coef += sm.q[cc][tid];  // fixed order
    }
#pragma unroll
    for (int cc = 0; cc < kTileK; ++cc) {
      acc_t pv[kPer], ov[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) pv[i] = sm.p[cc][ty + kTileDim * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) ov[j] = sm.o[cc][tx + kTileDim * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += pv[i] * ov[j];
      }
    }
  }
  __syncthreads();
  if (tid < kTile) sm.coef[tid] = coef;
  __syncthreads();

  acc_t* __restrict__ out = part + split * nOut * D;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = r0 + ty + kTileDim * i;
    if (r >= nOut) continue;
    const acc_t cf = sm.coef[ty + kTileDim * i];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t k = k0 + tx + kTileDim * j;
      if (k >= D) continue;
      out[r * D + k] = cf * to_acc<acc_t>(self[r * D + k]) - acc[i][j];
    }
  }
}

// out[e] = (accumulate ? out[e] : 0) + sum_s part[s * n + e], splits added in order.
template <typename acc_t, typename out_t>
__global__ void combine_splits_kernel(const acc_t* __restrict__ part, int64_t splits, int64_t n,
                                      out_t* __restrict__ out, bool accumulate) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    acc_t v = part[e];
    for (int64_t s = 1; s < splits; ++s) v += part[s * n + e];
    if (accumulate) v = static_cast<acc_t>(out[e]) + v;
    out[e] = static_cast<out_t>(v);
  }
}

// Writes (or, with accumulate, adds) one side of the gradient of sum_ij W_ij d(x_i, y_j):
//   TRANS == false: out (nI, D) = grad w.r.t. X;  TRANS == true: out (nJ, D) = grad w.r.t. Y.
// W, dist: (nI, ldw) row-major, w_t; X (nI, D), Y (nJ, D) contiguous; out contiguous.
// `acc_options` are the tensor options for the acc_t split partials.
template <typename scalar_t, typename acc_t, typename w_t, Metric M, bool TRANS, typename out_t>
void launch_pair_grad(const w_t* W, const w_t* dist, int64_t ldw, const scalar_t* X,
                      RowStats<acc_t> sx, int64_t nI, const scalar_t* Y, RowStats<acc_t> sy,
                      int64_t nJ, int64_t D, out_t* out, bool accumulate,
                      const at::TensorOptions& acc_options, cudaStream_t stream) {
  const int64_t nOut = TRANS ? nJ : nI;
  const int64_t nC = TRANS ? nI : nJ;
  if (nOut == 0 || D == 0) return;
  const int64_t tilesK = ceil_div(D, kTile);
  const int64_t tiles = ceil_div(nOut, kTile) * tilesK;
  TORCH_CHECK(tiles <= kMaxGridX, "triplet_cuda: gradient grid too large");
  // Split the reduction axis so that about two blocks per SM exist, in multiples of
  // kTileK, keeping the partials under ~2^24 elements unless one split already exceeds it.
  const int64_t cTiles = ceil_div(nC, kTileK) > 0 ? ceil_div(nC, kTileK) : 1;
  int64_t splits = ceil_div(2 * static_cast<int64_t>(sm_count()), tiles);
  const int64_t cap = (int64_t(1) << 24) / (nOut * D);
  splits = std::max<int64_t>(1, std::min({splits, cTiles, cap, int64_t(65535)}));
  const int64_t c_per_split = ceil_div(cTiles, splits) * kTileK;
  splits = nC > 0 ? ceil_div(nC, c_per_split) : 1;

  at::Tensor part = empty({splits, nOut, D}, acc_options);
  acc_t* part_ptr = part.data_ptr<acc_t>();
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(splits));
  pair_grad_kernel<scalar_t, acc_t, w_t, M, TRANS><<<grid, kTileThreads, 0, stream>>>(
      W, dist, ldw, X, sx, nI, Y, sy, nJ, D, tilesK, c_per_split, part_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n = nOut * D;
  combine_splits_kernel<acc_t, out_t><<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(
      part_ptr, splits, n, out, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace triplet_cuda
