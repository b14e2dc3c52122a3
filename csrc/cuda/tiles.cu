// The shared tiled kernels of tiles.cuh, compiled once for every combination the ops use:
// launch_distance<scalar_t, acc_t, out_t, M> and launch_pair_grad<scalar_t, acc_t, w_t, M,
// TRANS, out_t> for scalar_t in {float, double, half, bfloat16} (acc_t = at::opmath_type),
// every metric, out_t / w_t = acc_t (loss chunks, knn), and out_t / w_t = scalar_t
// (pairwise_distance; the same instance for float and double).

#include "tiles.cuh"
#include "pair_grad.cuh"

namespace triplet_cuda {
namespace cuda {

// out[r * ldo + c] = d(A_r, B_c), r < nA, c < nB. One block per kBM x kBN output tile; the
// 1-D grid enumerates tiles row-major (tile = ta * tilesB + tb). Epilogue: element
// e = tid + k * kThreads of the tile is (e / kBN, e % kBN), so a warp takes 32 consecutive
// columns of one row: conflict-free shared reads, coalesced column statistics and stores.
template <class ML, typename out_t, Metric M>
__global__ void __launch_bounds__(ML::kThreads, ML::kMinBlocks)
    distance_kernel(const typename ML::scalar_t* __restrict__ A,
                    RowStats<typename ML::acc_t> sa, int64_t nA,
                    const typename ML::scalar_t* __restrict__ B,
                    RowStats<typename ML::acc_t> sb, int64_t nB, int64_t D,
                    out_t* __restrict__ out, int64_t ldo, int64_t tilesB) {
  using acc_t = typename ML::acc_t;
  static_assert(ML::kBN % kWarp == 0, "a warp's 32 elements share one tile row");
  static_assert((ML::kBM * ML::kBN) % ML::kThreads == 0, "whole steps");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s = *reinterpret_cast<typename ML::Shared*>(smem_raw);
  const int64_t tile = blockIdx.x;
  const int64_t a0 = (tile / tilesB) * ML::kBM;
  const int64_t b0 = (tile % tilesB) * ML::kBN;
  ML::run(A, nA, a0, B, nB, b0, D, s);
  constexpr int kSteps = ML::kBM * ML::kBN / ML::kThreads;
#pragma unroll 4
  for (int k = 0; k < kSteps; ++k) {  // uniform trip count (warp_tile_distance's ballot)
    const int e = static_cast<int>(threadIdx.x) + k * ML::kThreads;
    const int r = e / ML::kBN, c = e % ML::kBN;
    const int64_t gr = a0 + r, gc = b0 + c;
    const bool active = gr < nA && gc < nB;
    const acc_t sq_a = active ? sa.sq[gr] : acc_t(0), inv_a = active ? sa.inv[gr] : acc_t(0);
    const acc_t sq_b = active ? sb.sq[gc] : acc_t(0), inv_b = active ? sb.inv[gc] : acc_t(0);
    const acc_t d = warp_tile_distance<M>(active, s.dot(r, c), A, gr, sq_a, inv_a, B, gc, sq_b,
                                          inv_b, D);
    if (active) out[gr * ldo + gc] = static_cast<out_t>(d);
  }
}

// Distances between the nA rows of A and the nB rows of B (both (n, D) contiguous on the
// current device, with their statistics) into out (row stride ldo).
template <typename scalar_t, typename acc_t, typename out_t, Metric M>
void launch_distance(const scalar_t* A, RowStats<acc_t> sa, int64_t nA, const scalar_t* B,
                     RowStats<acc_t> sb, int64_t nB, int64_t D, out_t* out, int64_t ldo,
                     cudaStream_t stream) {
  using ML = TileMainloop<scalar_t>;
  static_assert(std::is_same<typename ML::acc_t, acc_t>::value, "the mainloop's acc_t");
  if (nA == 0 || nB == 0) return;
  const int64_t tilesA = ceil_div(nA, ML::kBM), tilesB = ceil_div(nB, ML::kBN);
  TORCH_CHECK(tilesA <= kMaxGridX / tilesB, "triplet_cuda: distance grid too large (", nA,
              " x ", nB, ")");
  auto kernel = distance_kernel<ML, out_t, M>;
  const size_t smem = sizeof(typename ML::Shared);
  set_dynamic_smem(kernel, smem);
  kernel<<<grid_1d(tilesA * tilesB), ML::kThreads, smem, stream>>>(A, sa, nA, B, sb, nB, D, out,
                                                                   ldo, tilesB);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------ instantiations

#define TC_DISTANCE(S, OUT, M)                                                               \
  template void launch_distance<S, at::opmath_type<S>, OUT, M>(                              \
      const S*, RowStats<at::opmath_type<S>>, int64_t, const S*, RowStats<at::opmath_type<S>>, \
      int64_t, int64_t, OUT*, int64_t, cudaStream_t);
#define TC_PAIR_GRAD(S, W, M, TRANS, OUT)                                                     \
  template void launch_pair_grad<S, at::opmath_type<S>, W, M, TRANS, OUT>(                    \
      const W*, const W*, int64_t, const S*, RowStats<at::opmath_type<S>>, int64_t, const S*,  \
      RowStats<at::opmath_type<S>>, int64_t, int64_t, OUT*, bool, const at::TensorOptions&,    \
      cudaStream_t);
// Outputs in the accumulation type (every dtype), and in the embedding dtype (half types).
#define TC_TILES_ACC(S, M)                                \
  TC_DISTANCE(S, at::opmath_type<S>, M)                   \
  TC_PAIR_GRAD(S, at::opmath_type<S>, M, false, at::opmath_type<S>) \
  TC_PAIR_GRAD(S, at::opmath_type<S>, M, true, at::opmath_type<S>)
#define TC_TILES_SELF(S, M)          \
  TC_DISTANCE(S, S, M)               \
  TC_PAIR_GRAD(S, S, M, false, S)    \
  TC_PAIR_GRAD(S, S, M, true, S)
#define TC_TILES_METRIC(M)               \
  TC_TILES_ACC(float, M)                 \
  TC_TILES_ACC(double, M)                \
  TC_TILES_ACC(c10::Half, M)             \
  TC_TILES_ACC(c10::BFloat16, M)         \
  TC_TILES_SELF(c10::Half, M)            \
  TC_TILES_SELF(c10::BFloat16, M)

TC_TILES_METRIC(Metric::kEuclidean)
TC_TILES_METRIC(Metric::kSquaredEuclidean)
TC_TILES_METRIC(Metric::kCosine)

}  // namespace cuda
}  // namespace triplet_cuda
