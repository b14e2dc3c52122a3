// Batch-hard mining on CUDA, the backward of batch_hard_mine and batch_hard_mine_ref (the
// forward and its design: batch_hard.cu).
//
// Backward: one warp per embedding row owns its gradient row. It adds its own anchor-side
// terms, then the partner-side terms of the pairs whose partner it is, found through a
// stable sort of the 2N pairs by partner (a CSR-like reverse index): no atomics. With a
// reference set the anchor rows (grad_embeddings) take the anchor side, the reference rows
// (grad_ref, only when asked for) the partner side. A "hub" row, partner of more than
// kHubChunk pairs (all-equal embeddings send every anchor to negative 0), is split: its pair
// list in chunks of kHubChunk, one warp per chunk writing a partial row to a workspace
// (O(N / kHubChunk * D)), which the row's warp then adds in chunk order: still no atomics.

#include "ops_cuda.h"
#include "distance.cuh"
#include "internal.cuh"
#include "row_labels.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

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

// Hub split of the partner side: a row that is the partner of more than kHubChunk pairs
// (identical embeddings send every anchor to negative 0: one row, N pairs) has its pair list
// cut into chunks of at most kHubChunk consecutive pairs (a chunked CSR over the sorted
// pairs). One warp per chunk writes the chunk's partial gradient row into a workspace slot;
// the row's own warp then adds its anchor-side terms and its chunks' slots in chunk order.
// Rows with at most kHubChunk pairs are done by their own warp alone, as before.
constexpr int64_t kHubChunk = 64;

// Pairs [q_begin, q_end) of the sorted pairs whose partner is r.
__device__ __forceinline__ void partner_range(const int64_t* __restrict__ sorted_keys,
                                              int64_t n_pairs, int64_t r, int64_t& q_begin,
                                              int64_t& q_end) {
  q_begin = partition_point(n_pairs, [&](int64_t t) { return sorted_keys[t] < r; });
  q_end = partition_point(n_pairs, [&](int64_t t) { return sorted_keys[t] < r + 1; });
}

// Chunks of output row r's partner list in the workspace: 0 unless r is a hub.
__host__ __device__ __forceinline__ int64_t hub_chunks(int64_t pairs) {
  return pairs > kHubChunk ? ceil_div(pairs, kHubChunk) : 0;
}

// Workspace slots needed at most for 2N pairs: every hub row has more than kHubChunk pairs,
// so sum over hubs of ceil(len / L) <= sum (len / L + 1) < 2 * (2N) / L.
inline int64_t hub_slot_bound(int64_t n_pairs) { return 2 * ceil_div(n_pairs, kHubChunk) + 1; }

// chunks[r] = hub_chunks(#pairs with partner r), r < n_out.
__global__ void hub_chunk_counts_kernel(const int64_t* __restrict__ sorted_keys, int64_t n_pairs,
                                        int64_t n_out, int64_t* __restrict__ chunks) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_out;
       r += stride) {
    int64_t q_begin, q_end;
    partner_range(sorted_keys, n_pairs, r, q_begin, q_end);
    chunks[r] = hub_chunks(q_end - q_begin);
  }
}

// The partner-side terms of pairs [q0, q1) (partner r) added to acc: the lane's columns
// k0 + lane + 32 v of d/dy_r of g d(x_a, y_r), pair by pair in ascending q.
template <typename scalar_t, typename acc_t, Metric M>
__device__ __forceinline__ void add_partner_terms(
    const scalar_t* __restrict__ x, RowStats<acc_t> sx, const scalar_t* __restrict__ xr,
    acc_t inv_r, acc_t m_r, int64_t D, int64_t k0, int lane, const acc_t* __restrict__ g_pos,
    const acc_t* __restrict__ g_neg, const acc_t* __restrict__ d_pos,
    const acc_t* __restrict__ d_neg, const int64_t* __restrict__ perm, int64_t q0, int64_t q1,
    acc_t (&acc)[kHardGradPer]) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t e = perm[q];
    const int64_t a = e / 2;
    const bool is_pos = (e % 2) == 0;
    const acc_t m_a = M == Metric::kCosine ? sx.m[a] : acc_t(0);
    const epi::PairGrad<acc_t> pg =
        epi::pair_grad_scaled<M>(is_pos ? g_pos[a] : g_neg[a], is_pos ? d_pos[a] : d_neg[a], m_a,
                                 m_r, sx.inv[a], inv_r);
    const scalar_t* xa = x + a * D;
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) {
      const int64_t k = k0 + lane + kWarp * v;
      if (k < D) acc[v] += pg.cb * to_acc<acc_t>(xr[k]) + pg.cab * to_acc<acc_t>(xa[k]);
    }
  }
}

// One warp per workspace slot s < n_slots (a bound; slots past the real total leave at once).
// Slot s belongs to the row r with chunk_end[r - 1] <= s < chunk_end[r] (chunk_end: inclusive
// prefix sums of hub_chunk_counts_kernel's counts), as its chunk c = s - (chunk_end[r] -
// chunks of r): pairs [q_begin(r) + c L, min(q_begin(r) + (c + 1) L, q_end(r))). Writes the
// chunk's partner-side terms to ws[s * D + k] for every k < D.
template <typename scalar_t, typename acc_t, Metric M>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hub_chunk_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx,
                     const scalar_t* __restrict__ y, RowStats<acc_t> sy, int64_t D,
                     const acc_t* __restrict__ g_pos, const acc_t* __restrict__ g_neg,
                     const acc_t* __restrict__ d_pos, const acc_t* __restrict__ d_neg,
                     const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ perm,
                     int64_t n_pairs, const int64_t* __restrict__ chunk_end, int64_t n_out,
                     int64_t n_slots, acc_t* __restrict__ ws) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= n_slots) return;  // the whole warp leaves together
  const int64_t r = partition_point(n_out, [&](int64_t t) { return chunk_end[t] <= s; });
  if (r >= n_out) return;  // past the real total of slots (the whole warp)
  int64_t q_begin, q_end;
  partner_range(sorted_keys, n_pairs, r, q_begin, q_end);
  const int64_t c = s - (chunk_end[r] - hub_chunks(q_end - q_begin));
  const int64_t q0 = q_begin + c * kHubChunk;
  const int64_t q1 = q0 + kHubChunk < q_end ? q0 + kHubChunk : q_end;
  const acc_t inv_r = sy.inv[r];
  const acc_t m_r = M == Metric::kCosine ? sy.m[r] : acc_t(0);
  const scalar_t* xr = y + r * D;
  for (int64_t k0 = 0; k0 < D; k0 += kWarp * kHardGradPer) {
    acc_t acc[kHardGradPer];
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) acc[v] = acc_t(0);
    add_partner_terms<scalar_t, acc_t, M>(x, sx, xr, inv_r, m_r, D, k0, lane, g_pos, g_neg,
                                          d_pos, d_neg, perm, q0, q1, acc);
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) {
      const int64_t k = k0 + lane + kWarp * v;
      if (k < D) ws[s * D + k] = acc[v];
    }
  }
}

// The mined pairs (a, b): anchor a a row of x (N rows), partner b = pos_idx[a] / neg_idx[a]
// a row of y (C rows; y == x for the batch itself). One warp per output row r < n_out:
//   kAnchorSide: r is a row of x; adds the anchor-side terms of r's two pairs;
//   kPartnerSide: r is a row of y; adds the partner-side terms of the pairs (a, s) with
//                 partner r, in ascending pair order (sorted_keys / perm: the reverse index);
//                 for a hub row (more than kHubChunk pairs) instead its chunks' partial rows
//                 ws[chunk_end[r] - chunks + c], c ascending (hub_chunk_kernel wrote them).
// The batch itself runs both sides into one gradient; a reference set runs the anchor side
// into grad_embeddings and (when asked for) the partner side into grad_ref. g_*, d_*: acc_t (N).
// Every output entry is the same fixed sequence of additions whatever the timing: deterministic.
template <typename scalar_t, typename acc_t, Metric M, bool kAnchorSide, bool kPartnerSide>
__global__ void __launch_bounds__(kWarpBlockThreads)
    hard_backward_kernel(const scalar_t* __restrict__ x, RowStats<acc_t> sx, int64_t N,
                         const scalar_t* __restrict__ y, RowStats<acc_t> sy, int64_t C,
                         int64_t D, const acc_t* __restrict__ g_pos,
                         const acc_t* __restrict__ g_neg, const acc_t* __restrict__ d_pos,
                         const acc_t* __restrict__ d_neg, const int64_t* __restrict__ pos_idx,
                         const int64_t* __restrict__ neg_idx,
                         const int64_t* __restrict__ sorted_keys,
                         const int64_t* __restrict__ perm, const int64_t* __restrict__ chunk_end,
                         const acc_t* __restrict__ ws, int64_t n_out,
                         scalar_t* __restrict__ grad) {
  static_assert(kAnchorSide || kPartnerSide, "at least one side");
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= n_out) return;  // the whole warp leaves together
  const scalar_t* own = kAnchorSide ? x : y;  // both sides: x == y
  const RowStats<acc_t> so = kAnchorSide ? sx : sy;
  const int64_t n_pairs = 2 * N;
  int64_t q_begin = 0, q_end = 0, chunks = 0, slot0 = 0;
  if constexpr (kPartnerSide) {
    partner_range(sorted_keys, n_pairs, r, q_begin, q_end);
    chunks = hub_chunks(q_end - q_begin);
    slot0 = chunk_end[r] - chunks;
  }
  const acc_t inv_r = so.inv[r];
  const acc_t m_r = M == Metric::kCosine ? so.m[r] : acc_t(0);
  const scalar_t* xr = own + r * D;

  for (int64_t k0 = 0; k0 < D; k0 += kWarp * kHardGradPer) {
    acc_t acc[kHardGradPer];
#pragma unroll
    for (int v = 0; v < kHardGradPer; ++v) acc[v] = acc_t(0);

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
        const scalar_t* yb = y + b * D;
#pragma unroll
        for (int v = 0; v < kHardGradPer; ++v) {
          const int64_t k = k0 + lane + kWarp * v;
          if (k < D) acc[v] += pg.ca * to_acc<acc_t>(xr[k]) + pg.cab * to_acc<acc_t>(yb[k]);
        }
      }
    }
    if constexpr (kPartnerSide) {
      if (chunks == 0) {
        // Pairs (a, s) whose partner is r (r is the second row), in ascending order.
        add_partner_terms<scalar_t, acc_t, M>(x, sx, xr, inv_r, m_r, D, k0, lane, g_pos, g_neg,
                                              d_pos, d_neg, perm, q_begin, q_end, acc);
      } else {
        for (int64_t c = 0; c < chunks; ++c) {  // a hub: its chunks' partial rows, in order
          const acc_t* __restrict__ part = ws + (slot0 + c) * D;
#pragma unroll
          for (int v = 0; v < kHardGradPer; ++v) {
            const int64_t k = k0 + lane + kWarp * v;
            if (k < D) acc[v] += part[k];
          }
        }
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
    at::Tensor keys = empty({2 * N}, ip.options());
    hard_pair_keys_kernel<<<elementwise_grid(2 * N), kElementwiseThreads, 0, stream>>>(
        ip.data_ptr<int64_t>(), in.data_ptr<int64_t>(), N, C, keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto sorted = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_keys = std::get<0>(sorted).contiguous();
    perm = std::get<1>(sorted).contiguous();
  }
  const int64_t* sk = partner_side ? sorted_keys.data_ptr<int64_t>() : nullptr;
  const int64_t* pm = partner_side ? perm.data_ptr<int64_t>() : nullptr;
  // The partner side's output rows: x's for the batch itself, y's for a reference set.
  const int64_t n_partner = same_set ? N : (grad_y != nullptr ? C : 0);

  // Hub split (kHubChunk): per partner row its number of chunks (0 unless a hub), their
  // inclusive prefix sums chunk_end (slot ranges, no host sync), and the workspace sized by
  // the bound hub_slot_bound(2N) rather than the real total (which would need a sync).
  at::Tensor chunk_end;
  const int64_t n_slots = n_partner > 0 ? hub_slot_bound(2 * N) : 0;
  if (n_partner > 0) {
    at::Tensor chunks = empty({n_partner}, ip.options());
    hub_chunk_counts_kernel<<<elementwise_grid(n_partner), kElementwiseThreads, 0, stream>>>(
        sk, 2 * N, n_partner, chunks.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk_end = chunks.cumsum(/*dim=*/0).contiguous();
  }
  const int64_t* ce = n_partner > 0 ? chunk_end.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_hard_mine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y = same_set ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const at::Tensor ws = empty({n_slots, D}, x.options().dtype(gp.scalar_type()));
    acc_t* wsp = n_slots > 0 ? ws.data_ptr<acc_t>() : nullptr;
    TC_METRIC_SWITCH(metric, kM, [&] {
      if (n_slots > 0) {
        hub_chunk_kernel<scalar_t, acc_t, kM>
            <<<grid_1d(ceil_div(n_slots, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
                xp, sx, yp, sy, D, gp.data_ptr<acc_t>(), gn.data_ptr<acc_t>(),
                dp.data_ptr<acc_t>(), dn.data_ptr<acc_t>(), sk, pm, 2 * N, ce, n_partner,
                n_slots, wsp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      auto launch = [&](auto anchor_side, auto partner, int64_t n_out, at::Tensor& out) {
        constexpr bool kA = decltype(anchor_side)::value;
        constexpr bool kP = decltype(partner)::value;
        hard_backward_kernel<scalar_t, acc_t, kM, kA, kP>
            <<<grid_1d(ceil_div(n_out, kWarpsPerBlock)), kWarpBlockThreads, 0, stream>>>(
                xp, sx, N, yp, sy, C, D, gp.data_ptr<acc_t>(), gn.data_ptr<acc_t>(),
                dp.data_ptr<acc_t>(), dn.data_ptr<acc_t>(), ip.data_ptr<int64_t>(),
                in.data_ptr<int64_t>(), sk, pm, ce, wsp, n_out, out.data_ptr<scalar_t>());
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

}  // namespace

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
  at::Tensor grad = empty({N, D}, x.options());
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
    return {zeros({N, D}, x.options()),
            ref_grad ? zeros({Mr, D}, y.options()) : empty({0}, y.options())};
  }
  // Every row of both is written by the kernels.
  at::Tensor gx = empty({N, D}, x.options());
  at::Tensor gy = ref_grad ? empty({Mr, D}, y.options()) : empty({0}, y.options());
  hard_backward_impl(grad_pos_dist, grad_neg_dist, x, y, pos_dist, pos_idx, neg_dist, neg_idx,
                     metric, /*same_set=*/false, gx, ref_grad ? &gy : nullptr);
  return {gx, gy};
}

}  // namespace cuda
}  // namespace triplet_cuda
