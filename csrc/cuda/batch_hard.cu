// Batch-hard mining on CUDA.
//
// Forward, fused (never N x N):
//   1. hard_mine_partial_kernel: block (anchor tile of 64 rows, candidate split). For each
//      64-candidate tile of its split it computes the 64 x 64 dot tile (distance.cuh), applies
//      the distance epilogue and the label masks, and folds every candidate into per-thread
//      running bests (flash-attention style online reduction). The 16 threads sharing a row
//      then reduce by warp shuffles. Results per (split, anchor) go to a small workspace.
//   2. hard_mine_finalize_kernel: one warp per anchor combines the splits, decides
//      validity and recomputes the two selected distances exactly (explicit differences).
// The "best" relations are the shared epilogue's total orders on (distance, index)
// (epi::farther / epi::nearer in csrc/epilogue.h, the CPU's): a NaN distance ranks hardest,
// then the better distance, then the lowest index. So the result does not depend on the
// order of the reductions (tiles, splits, shuffles): deterministic, and the same as the CPU.
//
// Backward: one warp per embedding row owns its gradient row. It adds its own anchor-side
// terms, then the partner-side terms of the pairs whose partner it is, found through a
// stable sort of the 2N pairs by partner (a CSR-like reverse index): no atomics.
#include <torch/library.h>

#include "distance.cuh"
#include "internal.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// grid = (anchor tiles, splits); split s scans candidate tiles
// [s * tiles_per_split, min((s + 1) * tiles_per_split, tilesN)).
// Writes part_*[s * N + a] for every anchor a of the tile (idx -1 when none found).
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kTileThreads)
    hard_mine_partial_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> st,
                             const int64_t* __restrict__ labels, int64_t N, int64_t D,
                             int64_t tiles_per_split, acc_t* __restrict__ part_pd,
                             int64_t* __restrict__ part_pi, acc_t* __restrict__ part_nd,
                             int64_t* __restrict__ part_ni) {
  __shared__ DotSmem<acc_t> sm;
  const int tx = threadIdx.x % kTileDim, ty = threadIdx.x / kTileDim;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t tilesN = ceil_div(N, kTile);
  const int64_t t_begin = split * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < tilesN ? t_begin + tiles_per_split : tilesN;

  int64_t lab_r[kPer];
  acc_t sq_r[kPer], inv_r[kPer];
  epi::ArgFarthest<acc_t> pos[kPer];  // index -1: none yet
  epi::ArgNearest<acc_t> neg[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = a0 + ty + kTileDim * i;
    lab_r[i] = r < N ? labels[r] : 0;
    sq_r[i] = r < N ? st.sq[r] : acc_t(0);
    inv_r[i] = r < N ? st.inv[r] : acc_t(0);
  }

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b0 = t * kTile;
    acc_t acc[kPer][kPer];
    tile_dots<scalar_t, acc_t>(x, N, a0, x, N, b0, D, sm, acc);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t c = b0 + tx + kTileDim * j;
      if (c >= N) continue;
      const int64_t lab_c = labels[c];
      const acc_t sq_c = st.sq[c], inv_c = st.inv[c];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t r = a0 + ty + kTileDim * i;
        if (r >= N || c == r) continue;
        const acc_t d =
            dist_from_dot<M>(acc[i][j], sq_r[i], inv_r[i], sq_c, inv_c, x + r * D, x + c * D, D);
        const bool same = lab_c == lab_r[i];
        pos[i].update(d, same ? c : -1);
        neg[i].update(d, same ? -1 : c);
      }
    }
  }

  // Reduce over the 16 threads (tx) sharing the rows: lanes 0-15 and 16-31 of a warp are
  // two rows groups (ty even / odd); xor offsets < 16 stay inside each half.
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int off = kTileDim / 2; off > 0; off /= 2) {
      const acc_t opd = __shfl_xor_sync(0xffffffffu, pos[i].d, off);
      const int64_t opi = __shfl_xor_sync(0xffffffffu, pos[i].i, off);
      const acc_t ond = __shfl_xor_sync(0xffffffffu, neg[i].d, off);
      const int64_t oni = __shfl_xor_sync(0xffffffffu, neg[i].i, off);
      pos[i].update(opd, opi);
      neg[i].update(ond, oni);
    }
    const int64_t r = a0 + ty + kTileDim * i;
    if (tx == 0 && r < N) {
      part_pd[split * N + r] = pos[i].d;
      part_pi[split * N + r] = pos[i].i;
      part_nd[split * N + r] = neg[i].d;
      part_ni[split * N + r] = neg[i].i;
    }
  }
}

constexpr int kWarpsPerBlock = 8;
constexpr int kWarpBlockThreads = kWarpsPerBlock * kWarp;

// One warp per anchor: combine the splits, then the exact distances of the selection.
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hard_mine_finalize_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> st, int64_t N,
                              int64_t D, int64_t splits, const acc_t* __restrict__ part_pd,
                              const int64_t* __restrict__ part_pi,
                              const acc_t* __restrict__ part_nd,
                              const int64_t* __restrict__ part_ni, scalar_t* __restrict__ pos_dist,
                              int64_t* __restrict__ pos_idx, scalar_t* __restrict__ neg_dist,
                              int64_t* __restrict__ neg_idx) {
  const int64_t a =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (a >= N) return;  // the whole warp leaves together
  epi::ArgFarthest<acc_t> pos;
  epi::ArgNearest<acc_t> neg;
  for (int64_t s = 0; s < splits; ++s) {  // every lane does the same (tiny) loop
    pos.update(part_pd[s * N + a], part_pi[s * N + a]);
    neg.update(part_nd[s * N + a], part_ni[s * N + a]);
  }
  const int64_t pi = pos.i, ni = neg.i;
  if (pi < 0 || ni < 0) {  // no positive or no negative: invalid anchor
    if (lane == 0) {
      pos_dist[a] = static_cast<scalar_t>(acc_t(0));
      neg_dist[a] = static_cast<scalar_t>(acc_t(0));
      pos_idx[a] = -1;
      neg_idx[a] = -1;
    }
    return;
  }
  const scalar_t* xa = x + a * D;
  const acc_t dp = warp_pair_distance<M>(xa, x + pi * D, D, st.inv[a], st.inv[pi]);
  const acc_t dn = warp_pair_distance<M>(xa, x + ni * D, D, st.inv[a], st.inv[ni]);
  if (lane == 0) {
    pos_dist[a] = static_cast<scalar_t>(dp);
    neg_dist[a] = static_cast<scalar_t>(dn);
    pos_idx[a] = pi;
    neg_idx[a] = ni;
  }
}

}  // namespace

HardMinedCuda batch_hard_mine_impl(const at::Tensor& x, const at::Tensor& labels,
                                   int64_t metric) {
  const int64_t N = x.size(0), D = x.size(1);
  const auto idx_options = x.options().dtype(at::kLong);
  HardMinedCuda r{at::empty({N}, x.options()), at::empty({N}, idx_options),
                  at::empty({N}, x.options()), at::empty({N}, idx_options)};
  if (N == 0) return r;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_hard_mine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats = compute_row_stats<scalar_t, acc_t>(x, stream);
    const RowStats<acc_t> st = row_stats_view<acc_t>(stats);
    // Split the candidates so that about two blocks per SM exist when N is small.
    const int64_t tilesN = ceil_div(N, kTile);
    int64_t splits = ceil_div(2 * static_cast<int64_t>(sm_count()), tilesN);
    splits = std::max<int64_t>(1, std::min(splits, tilesN));
    const int64_t tiles_per_split = ceil_div(tilesN, splits);
    splits = ceil_div(tilesN, tiles_per_split);
    TORCH_CHECK(tilesN <= kMaxGridX, "triplet_cuda: too many embeddings (", N, ")");
    at::Tensor part_pd = at::empty({splits, N}, acc_options);
    at::Tensor part_nd = at::empty({splits, N}, acc_options);
    at::Tensor part_pi = at::empty({splits, N}, idx_options);
    at::Tensor part_ni = at::empty({splits, N}, idx_options);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const dim3 grid(static_cast<unsigned int>(tilesN), static_cast<unsigned int>(splits));
      hard_mine_partial_kernel<scalar_t, acc_t, kM><<<grid, kTileThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), st, labels.data_ptr<int64_t>(), N, D, tiles_per_split,
          part_pd.data_ptr<acc_t>(), part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
          part_ni.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hard_mine_finalize_kernel<scalar_t, acc_t, kM>
          <<<grid_1d(ceil_div(N, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), st, N, D, splits, part_pd.data_ptr<acc_t>(),
              part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
              part_ni.data_ptr<int64_t>(), r.pos_dist.data_ptr<scalar_t>(),
              r.pos_idx.data_ptr<int64_t>(), r.neg_dist.data_ptr<scalar_t>(),
              r.neg_idx.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return r;
}

namespace {

// embeddings: (N, D), labels: (N,) any integer dtype
//   -> (pos_dist (N), pos_idx (N) int64, neg_dist (N), neg_idx (N) int64); distances in
//      the dtype of embeddings, -1 / 0 for anchors without a positive or a negative.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const HardMinedCuda r = batch_hard_mine_impl(embeddings.contiguous(), lab, metric);
  return {r.pos_dist, r.pos_idx, r.neg_dist, r.neg_idx};
}

// key[2 a + s] = partner of pair (a, s) (s = 0 positive, 1 negative), or N when invalid.
__global__ void hard_pair_keys_kernel(const int64_t* __restrict__ pos_idx,
                                      const int64_t* __restrict__ neg_idx, int64_t N,
                                      int64_t* __restrict__ keys) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < 2 * N;
       e += stride) {
    const int64_t b = (e % 2 == 0) ? pos_idx[e / 2] : neg_idx[e / 2];
    keys[e] = (b >= 0 && b < N) ? b : N;
  }
}

constexpr int kHardGradPer = 4;  // feature columns per lane per pass: 128 per warp

// One warp per row r: grad[r] = anchor-side terms of r's two pairs, then the partner-side
// terms of the pairs (a, s) with partner r in ascending pair order. g_*, d_*: acc_t (N).
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hard_backward_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> st, int64_t N,
                         int64_t D, const acc_t* __restrict__ g_pos,
                         const acc_t* __restrict__ g_neg, const acc_t* __restrict__ d_pos,
                         const acc_t* __restrict__ d_neg, const int64_t* __restrict__ pos_idx,
                         const int64_t* __restrict__ neg_idx,
                         const int64_t* __restrict__ sorted_keys,
                         const int64_t* __restrict__ perm, scalar_t* __restrict__ grad) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= N) return;  // the whole warp leaves together
  const int64_t n_pairs = 2 * N;
  const int64_t q_begin = partition_point(n_pairs, [&](int64_t t) { return sorted_keys[t] < r; });
  const int64_t q_end =
      partition_point(n_pairs, [&](int64_t t) { return sorted_keys[t] < r + 1; });
  const acc_t inv_r = st.inv[r];
  const acc_t m_r = M == Metric::kCosine ? st.m[r] : acc_t(0);
  const scalar_t* xr = x + r * D;

  for (int64_t k0 = 0; k0 < D; k0 += kWarp * kHardGradPer) {
    acc_t acc[kHardGradPer];
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) acc[v] = acc_t(0);

    // Adds alpha * x_r + beta * x_o to this lane's columns (epi::PairGrad coefficients).
    auto add_pair = [&](acc_t alpha, acc_t beta, int64_t o) {
      const scalar_t* xo = x + o * D;
#pragma unroll
      for (int v = 0; v < kHardGradPer; ++v) {
        const int64_t k = k0 + lane + kWarp * v;
        if (k < D) acc[v] += alpha * to_acc<acc_t>(xr[k]) + beta * to_acc<acc_t>(xo[k]);
      }
    };

    // Anchor side: r's own positive, then its negative (pair (r, b): r is the first row).
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int64_t b = s == 0 ? pos_idx[r] : neg_idx[r];
      if (b < 0 || b >= N) continue;
      const acc_t m_b = M == Metric::kCosine ? st.m[b] : acc_t(0);
      const epi::PairGrad<acc_t> pg =
          epi::pair_grad_scaled<M>(s == 0 ? g_pos[r] : g_neg[r], s == 0 ? d_pos[r] : d_neg[r],
                                   m_r, m_b, inv_r, st.inv[b]);
      add_pair(pg.ca, pg.cab, b);
    }
    // Partner side: pairs (a, s) whose partner is r (r is the second row).
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t e = perm[q];
      const int64_t a = e / 2;
      const bool is_pos = (e % 2) == 0;
      const acc_t m_a = M == Metric::kCosine ? st.m[a] : acc_t(0);
      const epi::PairGrad<acc_t> pg =
          epi::pair_grad_scaled<M>(is_pos ? g_pos[a] : g_neg[a], is_pos ? d_pos[a] : d_neg[a],
                                   m_a, m_r, st.inv[a], inv_r);
      add_pair(pg.cb, pg.cab, a);
    }
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) {
      const int64_t k = k0 + lane + kWarp * v;
      if (k < D) grad[r * D + k] = static_cast<scalar_t>(acc[v]);
    }
  }
}

// grad_pos_dist, grad_neg_dist: (N,); embeddings (N, D); the forward's outputs pos_dist,
// pos_idx, neg_dist, neg_idx (N,) -> grad (N, D) in the dtype of embeddings, contiguous.
// Indices outside [0, N) are treated as "no pair" (not checked: that would sync).
at::Tensor batch_hard_mine_backward_cuda(const at::Tensor& grad_pos_dist,
                                         const at::Tensor& grad_neg_dist,
                                         const at::Tensor& embeddings,
                                         const at::Tensor& pos_dist, const at::Tensor& pos_idx,
                                         const at::Tensor& neg_dist, const at::Tensor& neg_idx,
                                         int64_t metric) {
  check_hard_backward_args(grad_pos_dist, grad_neg_dist, embeddings, pos_dist, pos_idx, neg_dist,
                           neg_idx, metric, c10::kCUDA);
  const int64_t N = embeddings.size(0), D = embeddings.size(1);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  at::Tensor grad = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = acc_scalar_type(x.scalar_type());
  const at::Tensor gp = grad_pos_dist.to(acc_type).contiguous();
  const at::Tensor gn = grad_neg_dist.to(acc_type).contiguous();
  const at::Tensor dp = pos_dist.to(acc_type).contiguous();
  const at::Tensor dn = neg_dist.to(acc_type).contiguous();
  const at::Tensor ip = pos_idx.contiguous(), in = neg_idx.contiguous();

  // Reverse index: the 2N pairs stably sorted by partner (invalid pairs last).
  at::Tensor keys = at::empty({2 * N}, ip.options());
  hard_pair_keys_kernel<<<elementwise_grid(2 * N), kElementwiseThreads, 0, stream>>>(
      ip.data_ptr<int64_t>(), in.data_ptr<int64_t>(), N, keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted).contiguous();
  const at::Tensor perm = std::get<1>(sorted).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_hard_mine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats = compute_row_stats<scalar_t, acc_t>(x, stream);
    TC_METRIC_SWITCH(metric, kM, [&] {
      hard_backward_kernel<scalar_t, acc_t, kM>
          <<<grid_1d(ceil_div(N, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), row_stats_view<acc_t>(stats), N, D, gp.data_ptr<acc_t>(),
              gn.data_ptr<acc_t>(), dp.data_ptr<acc_t>(), dn.data_ptr<acc_t>(),
              ip.data_ptr<int64_t>(), in.data_ptr<int64_t>(), sorted_keys.data_ptr<int64_t>(),
              perm.data_ptr<int64_t>(), grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("batch_hard_mine", &batch_hard_mine_cuda);
  m.impl("batch_hard_mine_backward", &batch_hard_mine_backward_cuda);
}

}  // namespace cuda
}  // namespace triplet_cuda
