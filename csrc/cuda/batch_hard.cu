// Batch-hard mining on CUDA, of the batch against itself (batch_hard_mine) or of anchors
// against a reference set (batch_hard_mine_ref): the same kernels over RowLabels
// (row_labels.cuh), the candidates being the batch or the reference set.
//
// Forward, fused (never N x N, never N x M):
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
// stable sort of the 2N pairs by partner (a CSR-like reverse index): no atomics. With a
// reference set the anchor rows (grad_embeddings) take the anchor side, the reference rows
// (grad_ref, only when asked for) the partner side.
#include <ATen/ops/full.h>
#include <torch/library.h>

#include "distance.cuh"
#include "internal.cuh"
#include "row_labels.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

// grid = (anchor tiles, splits); split s scans candidate tiles
// [s * tiles_per_split, min((s + 1) * tiles_per_split, tilesC)). Anchors: the N rows of x;
// candidates: the l.cols rows of y (y == x for the batch itself). A candidate of the anchor's
// label is a positive unless it is the anchor's self index; any other label, a negative.
// Writes part_*[s * N + a] for every anchor a of the tile (idx -1 when none found).
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kTileThreads)
    hard_mine_partial_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx, int64_t N,
                             const scalar_t* __restrict__ y, RowStats<acc_t> sy, RowLabels l,
                             int64_t D, int64_t tiles_per_split, acc_t* __restrict__ part_pd,
                             int64_t* __restrict__ part_pi, acc_t* __restrict__ part_nd,
                             int64_t* __restrict__ part_ni) {
  __shared__ DotSmem<acc_t> sm;
  const int tx = threadIdx.x % kTileDim, ty = threadIdx.x / kTileDim;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t C = l.cols;
  const int64_t tilesC = ceil_div(C, kTile);
  const int64_t t_begin = split * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < tilesC ? t_begin + tiles_per_split : tilesC;

  int64_t lab_r[kPer], self_r[kPer];
  acc_t sq_r[kPer], inv_r[kPer];
  epi::ArgFarthest<acc_t> pos[kPer];  // index -1: none yet
  epi::ArgNearest<acc_t> neg[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = a0 + ty + kTileDim * i;
    lab_r[i] = r < N ? l.anchor[r] : 0;
    self_r[i] = r < N ? l.self_of(r) : -1;
    sq_r[i] = r < N ? sx.sq[r] : acc_t(0);
    inv_r[i] = r < N ? sx.inv[r] : acc_t(0);
  }

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b0 = t * kTile;
    acc_t acc[kPer][kPer];
    tile_dots<scalar_t, acc_t>(x, N, a0, y, C, b0, D, sm, acc);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t c = b0 + tx + kTileDim * j;
      if (c >= C) continue;
      const int64_t lab_c = l.cand[c];
      const acc_t sq_c = sy.sq[c], inv_c = sy.inv[c];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t r = a0 + ty + kTileDim * i;
        const bool same = lab_c == lab_r[i];
        if (r >= N || (same && c == self_r[i])) continue;  // the anchor itself: no candidate
        const acc_t d =
            dist_from_dot<M>(acc[i][j], sq_r[i], inv_r[i], sq_c, inv_c, x + r * D, y + c * D, D);
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

// One warp per anchor: combine the splits, then the exact distances of the selection
// (anchor row of x, candidate row of y).
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hard_mine_finalize_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx, int64_t N,
                              const scalar_t* __restrict__ y, RowStats<acc_t> sy,
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
  const acc_t dp = warp_pair_distance<M>(xa, y + pi * D, D, sx.inv[a], sy.inv[pi]);
  const acc_t dn = warp_pair_distance<M>(xa, y + ni * D, D, sx.inv[a], sy.inv[ni]);
  if (lane == 0) {
    pos_dist[a] = static_cast<scalar_t>(dp);
    neg_dist[a] = static_cast<scalar_t>(dn);
    pos_idx[a] = pi;
    neg_idx[a] = ni;
  }
}

}  // namespace

HardMinedCuda batch_hard_mine_impl(const MineArgs& in, int64_t metric) {
  const at::Tensor& x = in.x;
  const at::Tensor& y = in.symmetric() ? in.x : in.y;
  const RowLabels l = in.symmetric() ? batch_row_labels(in.lab)
                                     : ref_row_labels(in.lab, in.ref_lab, in.self);
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  const auto idx_options = x.options().dtype(at::kLong);
  if (N == 0 || C == 0) {  // no candidates: every anchor invalid
    return {at::zeros({N}, x.options()), at::full({N}, -1, idx_options),
            at::zeros({N}, x.options()), at::full({N}, -1, idx_options)};
  }
  HardMinedCuda r{at::empty({N}, x.options()), at::empty({N}, idx_options),
                  at::empty({N}, x.options()), at::empty({N}, idx_options)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_hard_mine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y =
        in.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    // Split the candidates so that about two blocks per SM exist when N is small.
    const int64_t tilesA = ceil_div(N, kTile), tilesC = ceil_div(C, kTile);
    TORCH_CHECK(tilesA <= kMaxGridX, "triplet_cuda: too many embeddings (", N, ")");
    int64_t splits = ceil_div(2 * static_cast<int64_t>(sm_count()), tilesA);
    splits = std::max<int64_t>(1, std::min({splits, tilesC, int64_t(65535)}));
    const int64_t tiles_per_split = ceil_div(tilesC, splits);
    splits = ceil_div(tilesC, tiles_per_split);
    at::Tensor part_pd = at::empty({splits, N}, acc_options);
    at::Tensor part_nd = at::empty({splits, N}, acc_options);
    at::Tensor part_pi = at::empty({splits, N}, idx_options);
    at::Tensor part_ni = at::empty({splits, N}, idx_options);
    TC_METRIC_SWITCH(metric, kM, [&] {
      const dim3 grid(static_cast<unsigned int>(tilesA), static_cast<unsigned int>(splits));
      hard_mine_partial_kernel<scalar_t, acc_t, kM><<<grid, kTileThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), sx, N, y.data_ptr<scalar_t>(), sy, l, D, tiles_per_split,
          part_pd.data_ptr<acc_t>(), part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
          part_ni.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hard_mine_finalize_kernel<scalar_t, acc_t, kM>
          <<<grid_1d(ceil_div(N, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), sx, N, y.data_ptr<scalar_t>(), sy, D, splits,
              part_pd.data_ptr<acc_t>(), part_pi.data_ptr<int64_t>(), part_nd.data_ptr<acc_t>(),
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
  MineArgs in;
  in.x = embeddings.contiguous();
  in.lab = lab;
  const HardMinedCuda r = batch_hard_mine_impl(in, metric);
  return {r.pos_dist, r.pos_idx, r.neg_dist, r.neg_idx};
}

// Query vs reference: embeddings (N, D), labels (N,) anchors; ref (M, D), ref_labels (M,)
// candidates; self_index (N,) int64 -> as batch_hard_mine_cuda, indices into ref. The values
// of self_index are range-checked by check_ref_args (one reduction and a sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_ref_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, const at::Tensor& self_index, int64_t metric) {
  const at::Tensor lab = check_batch_cuda(embeddings, labels, metric);
  const auto [ref_lab, self] = check_ref_args(embeddings, ref, ref_labels, self_index);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  MineArgs in{embeddings.contiguous(), lab, ref.contiguous(), ref_lab, self};
  const HardMinedCuda r = batch_hard_mine_impl(in, metric);
  return {r.pos_dist, r.pos_idx, r.neg_dist, r.neg_idx};
}

// key[2 a + s] = partner of pair (a, s) (s = 0 positive, 1 negative), or C when invalid
// (outside [0, C), C the number of candidate rows).
__global__ void hard_pair_keys_kernel(const int64_t* __restrict__ pos_idx,
                                      const int64_t* __restrict__ neg_idx, int64_t N, int64_t C,
                                      int64_t* __restrict__ keys) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < 2 * N;
       e += stride) {
    const int64_t b = (e % 2 == 0) ? pos_idx[e / 2] : neg_idx[e / 2];
    keys[e] = (b >= 0 && b < C) ? b : C;
  }
}

constexpr int kHardGradPer = 4;  // feature columns per lane per pass: 128 per warp

// The mined pairs (a, b): anchor a a row of x (N rows), partner b = pos_idx[a] / neg_idx[a]
// a row of y (C rows; y == x for the batch itself). One warp per output row r < n_out:
//   kAnchorSide: r is a row of x; adds the anchor-side terms of r's two pairs;
//   kPartnerSide: r is a row of y; adds the partner-side terms of the pairs (a, s) with
//                 partner r, in ascending pair order (sorted_keys / perm: the reverse index).
// The batch itself runs both sides into one gradient; a reference set runs the anchor side
// into grad_embeddings and (when asked for) the partner side into grad_ref. g_*, d_*: acc_t (N).
template <typename scalar_t, typename acc_t, Metric M, bool kAnchorSide, bool kPartnerSide>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hard_backward_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx, int64_t N,
                         const scalar_t* __restrict__ y, RowStats<acc_t> sy, int64_t C,
                         int64_t D, const acc_t* __restrict__ g_pos,
                         const acc_t* __restrict__ g_neg, const acc_t* __restrict__ d_pos,
                         const acc_t* __restrict__ d_neg, const int64_t* __restrict__ pos_idx,
                         const int64_t* __restrict__ neg_idx,
                         const int64_t* __restrict__ sorted_keys,
                         const int64_t* __restrict__ perm, int64_t n_out,
                         scalar_t* __restrict__ grad) {
  static_assert(kAnchorSide || kPartnerSide, "at least one side");
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= n_out) return;  // the whole warp leaves together
  const scalar_t* own = kAnchorSide ? x : y;  // both sides: x == y
  const RowStats<acc_t> so = kAnchorSide ? sx : sy;
  const int64_t n_pairs = 2 * N;
  int64_t q_begin = 0, q_end = 0;
  if constexpr (kPartnerSide) {
    q_begin = partition_point(n_pairs, [&](int64_t t) { return sorted_keys[t] < r; });
    q_end = partition_point(n_pairs, [&](int64_t t) { return sorted_keys[t] < r + 1; });
  }
  const acc_t inv_r = so.inv[r];
  const acc_t m_r = M == Metric::kCosine ? so.m[r] : acc_t(0);
  const scalar_t* xr = own + r * D;

  for (int64_t k0 = 0; k0 < D; k0 += kWarp * kHardGradPer) {
    acc_t acc[kHardGradPer];
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) acc[v] = acc_t(0);

    // Adds alpha * own_r + beta * xo to this lane's columns (epi::PairGrad coefficients).
    auto add_pair = [&](acc_t alpha, acc_t beta, const scalar_t* xo) {
#pragma unroll
      for (int v = 0; v < kHardGradPer; ++v) {
        const int64_t k = k0 + lane + kWarp * v;
        if (k < D) acc[v] += alpha * to_acc<acc_t>(xr[k]) + beta * to_acc<acc_t>(xo[k]);
      }
    };

    if constexpr (kAnchorSide) {
      // r's own positive, then its negative (pair (r, b): r is the first row).
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int64_t b = s == 0 ? pos_idx[r] : neg_idx[r];
        if (b < 0 || b >= C) continue;
        const acc_t m_b = M == Metric::kCosine ? sy.m[b] : acc_t(0);
        const epi::PairGrad<acc_t> pg =
            epi::pair_grad_scaled<M>(s == 0 ? g_pos[r] : g_neg[r], s == 0 ? d_pos[r] : d_neg[r],
                                     m_r, m_b, inv_r, sy.inv[b]);
        add_pair(pg.ca, pg.cab, y + b * D);
      }
    }
    if constexpr (kPartnerSide) {
      // Pairs (a, s) whose partner is r (r is the second row).
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t e = perm[q];
        const int64_t a = e / 2;
        const bool is_pos = (e % 2) == 0;
        const acc_t m_a = M == Metric::kCosine ? sx.m[a] : acc_t(0);
        const epi::PairGrad<acc_t> pg =
            epi::pair_grad_scaled<M>(is_pos ? g_pos[a] : g_neg[a], is_pos ? d_pos[a] : d_neg[a],
                                     m_a, m_r, sx.inv[a], inv_r);
        add_pair(pg.cb, pg.cab, x + a * D);
      }
    }
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) {
      const int64_t k = k0 + lane + kWarp * v;
      if (k < D) grad[r * D + k] = static_cast<scalar_t>(acc[v]);
    }
  }
}

// The gradients of sum_a g_pos[a] d(x_a, y_pos[a]) + g_neg[a] d(x_a, y_neg[a]) (x (N, D),
// y (C, D) contiguous, D > 0, N > 0): into grad_x (N, D), and into grad_y (C, D) when defined.
// same_set: y is x and grad_y is undefined; both sides go to grad_x. Indices outside [0, C)
// are "no pair" (not checked: that would sync).
void hard_backward_impl(const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist,
                        const at::Tensor& x, const at::Tensor& y, const at::Tensor& pos_dist,
                        const at::Tensor& pos_idx, const at::Tensor& neg_dist,
                        const at::Tensor& neg_idx, int64_t metric, bool same_set,
                        at::Tensor& grad_x, at::Tensor* grad_y) {
  const int64_t N = x.size(0), C = y.size(0), D = x.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = acc_scalar_type(x.scalar_type());
  const at::Tensor gp = grad_pos_dist.to(acc_type).contiguous();
  const at::Tensor gn = grad_neg_dist.to(acc_type).contiguous();
  const at::Tensor dp = pos_dist.to(acc_type).contiguous();
  const at::Tensor dn = neg_dist.to(acc_type).contiguous();
  const at::Tensor ip = pos_idx.contiguous(), in = neg_idx.contiguous();
  const bool partner_side = same_set || grad_y != nullptr;

  // Reverse index: the 2N pairs stably sorted by partner (invalid pairs last).
  at::Tensor sorted_keys, perm;
  if (partner_side) {
    at::Tensor keys = at::empty({2 * N}, ip.options());
    hard_pair_keys_kernel<<<elementwise_grid(2 * N), kElementwiseThreads, 0, stream>>>(
        ip.data_ptr<int64_t>(), in.data_ptr<int64_t>(), N, C, keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_keys = std::get<0>(sorted).contiguous();
    perm = std::get<1>(sorted).contiguous();
  }
  const int64_t* sk = partner_side ? sorted_keys.data_ptr<int64_t>() : nullptr;
  const int64_t* pm = partner_side ? perm.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_hard_mine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y = same_set ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    TC_METRIC_SWITCH(metric, kM, [&] {
      auto launch = [&](auto anchor_side, auto partner, int64_t n_out, at::Tensor& out) {
        constexpr bool kA = decltype(anchor_side)::value;
        constexpr bool kP = decltype(partner)::value;
        hard_backward_kernel<scalar_t, acc_t, kM, kA, kP>
            <<<grid_1d(ceil_div(n_out, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
                xp, sx, N, yp, sy, C, D, gp.data_ptr<acc_t>(), gn.data_ptr<acc_t>(),
                dp.data_ptr<acc_t>(), dn.data_ptr<acc_t>(), ip.data_ptr<int64_t>(),
                in.data_ptr<int64_t>(), sk, pm, n_out, out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (same_set) {
        launch(std::true_type{}, std::true_type{}, N, grad_x);
      } else {
        launch(std::true_type{}, std::false_type{}, N, grad_x);
        if (grad_y != nullptr && C > 0) launch(std::false_type{}, std::true_type{}, C, *grad_y);
      }
    });
  });
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
  hard_backward_impl(grad_pos_dist, grad_neg_dist, x, x, pos_dist, pos_idx, neg_dist, neg_idx,
                     metric, /*same_set=*/true, grad, nullptr);
  return grad;
}

// Query vs reference: grad_pos_dist, grad_neg_dist (N,); the forward's embeddings (N, D),
// ref (M, D) and outputs (indices into ref) -> (grad_embeddings (N, D), grad_ref (M, D), or an
// empty (0,) tensor when ref_grad is false: then no work is spent on it). Indices outside
// [0, M) are treated as "no pair" (not checked: that would sync).
std::tuple<at::Tensor, at::Tensor> batch_hard_mine_ref_backward_cuda(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist, const at::Tensor& embeddings,
    const at::Tensor& ref, const at::Tensor& pos_dist, const at::Tensor& pos_idx,
    const at::Tensor& neg_dist, const at::Tensor& neg_idx, int64_t metric, bool ref_grad) {
  check_hard_backward_args(grad_pos_dist, grad_neg_dist, embeddings, pos_dist, pos_idx, neg_dist,
                           neg_idx, metric, c10::kCUDA);
  check_ref_embeddings(embeddings, ref);
  const int64_t N = embeddings.size(0), Mr = ref.size(0), D = embeddings.size(1);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor y = ref.contiguous();
  if (N == 0 || D == 0) {
    return {at::zeros({N, D}, x.options()),
            ref_grad ? at::zeros({Mr, D}, y.options()) : at::empty({0}, y.options())};
  }
  // Every row of both is written by the kernels.
  at::Tensor gx = at::empty({N, D}, x.options());
  at::Tensor gy = ref_grad ? at::empty({Mr, D}, y.options()) : at::empty({0}, y.options());
  hard_backward_impl(grad_pos_dist, grad_neg_dist, x, y, pos_dist, pos_idx, neg_dist, neg_idx,
                     metric, /*same_set=*/false, gx, ref_grad ? &gy : nullptr);
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("batch_hard_mine", &batch_hard_mine_cuda);
  m.impl("batch_hard_mine_backward", &batch_hard_mine_backward_cuda);
  m.impl("batch_hard_mine_ref", &batch_hard_mine_ref_cuda);
  m.impl("batch_hard_mine_ref_backward", &batch_hard_mine_ref_backward_cuda);
}

}  // namespace cuda
}  // namespace triplet_cuda
