// Semi-hard triplet loss on CUDA (FaceNet; TensorFlow Addons' TripletSemiHardLoss).
//
// For every (anchor a, positive p) of an anchor with at least one negative the negative is
// the one with the smallest d_an > d_ap (strict), else the one with the largest d_an;
// ties go to the lowest index; term = relu(d_ap - d_an + margin).
//
// Anchors are processed in row chunks (loss_common.cuh): distances of the chunk's rows to
// all C candidate rows (the batch itself, C = N, or a reference set for the *_ref ops) in an
// (R, C) acc_t workspace; per row, the negatives' distances are sorted
// stably (keys +inf for non-negatives; one segmented at::sort per chunk), so the sorted
// indices break ties by the lowest index. For a positive at d_ap the first sorted position
// with d_an > d_ap is found by binary search; it is the first occurrence of its value. The
// fallback (largest d_an) is the first occurrence of the last value. (Should a distance be
// +inf, the +inf keys of the non-negatives tie with it; a pick that is not a negative is
// then redone by a scan of the row, as on the CPU.)
//
// One block per anchor row, columns owned by threads; row totals in a fixed order, rows in
// a fixed order (deterministic). The backward's weights are +1 on (a, p) and -1 per active
// pair on its chosen (a, n); the latter are gathered with int32 atomicAdd (integer, so the
// result does not depend on the order), converted to acc_t and differentiated through the
// distances with pair_grad.cuh. O(R * C) memory per chunk.
//
// NaN rule (csrc/epilogue.h; as SemiHardRows in csrc/cpu/semi_hard.h): in an anchor row
// holding a NaN distance the sorted keys are not used (NaN sorts after the +inf keys, see
// loss_common.cuh); each positive's negative is chosen by the shared scan instead
// (epi::SemiHardChoice / ArgFarthest: NaN ranks farthest, "d_an > d_ap" is false for NaN).
// Such an anchor with a valid pair gets a NaN loss sum (valid count unchanged; the positive
// count still counts the terms > 0) and NaN weights on every j != self.
#include <torch/library.h>

#include "internal.cuh"
#include "loss_common.cuh"

namespace triplet_cuda {
namespace cuda {
namespace {

enum class SemiMode { kForward, kBackward, kMine };

// Bytes of chunk workspace per (row, column) element: distances, keys, sorted values and
// int64 sort indices, int32 and acc_t weights.
template <typename acc_t>
constexpr int64_t semi_hard_bytes_per_elem() {
  return 4 * static_cast<int64_t>(sizeof(acc_t)) + 8 + 4;
}

// The semi-hard choice for a positive at distance d by one thread scanning anchor row d_row
// with the shared epilogue, exactly as the CPU's scan_select: the nearest negative with
// d_an > d, else the farthest one; ties to the lowest index, NaN farthest. Q > 0 required.
template <typename acc_t>
__device__ __noinline__ void semi_hard_scan(const acc_t* __restrict__ d_row,
                                            const int64_t* __restrict__ cand, int64_t C,
                                            int64_t la, acc_t d, acc_t& dn, int64_t& n) {
  epi::SemiHardChoice<acc_t> choice;
  epi::ArgFarthest<acc_t> farthest;
  for (int64_t u = 0; u < C; ++u) {
    if (cand[u] == la) continue;
    const acc_t du = d_row[u];
    farthest.update(du, u);
    choice.update(d, du, u);
  }
  epi::semi_hard_pick(choice, farthest, &dn, &n);
}

// Wi entry of an anchor row under the NaN rule; turned into NaN by semi_hard_weights_kernel.
// (Real entries are counts of magnitude < N, far from it.)
constexpr int32_t kNanWeight = std::numeric_limits<int32_t>::min();

// W[e] = NaN where Wi[e] == kNanWeight, else acc_t(Wi[e]).
template <typename acc_t>
__global__ void semi_hard_weights_kernel(const int32_t* __restrict__ Wi, int64_t n,
                                         acc_t* __restrict__ W) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int32_t v = Wi[e];
    W[e] = v == kNanWeight ? epi::quiet_nan<acc_t>() : static_cast<acc_t>(v);
  }
}

// One block per anchor row of the chunk (a = i0 + blockIdx.x), rows of C = l.cols candidates.
//   sn, in: the row's negatives' distances sorted ascending (first Q entries) and their
//           column indices (stable sort: ascending index among equal distances).
// kForward: loss_rows[a], valid_rows[a], pos_rows[a].
// kBackward: Wi[row, p] = 1 and Wi[row, n] -= 1 for every active (p, n); Wi zeroed before;
//            under the NaN rule Wi[row, j] = kNanWeight for every j != self instead.
// kMine: (a, p, n) at offsets[a] + (rank of p among a's positives).
template <typename acc_t, SemiMode kMode>
__global__ void __launch_bounds__(kRowThreads)
    semi_hard_rows_kernel(const acc_t* __restrict__ Dc, const acc_t* __restrict__ Sn,
                          const int64_t* __restrict__ In, RowLabels l,
                          const int64_t* __restrict__ sorted_labels,
                          const int64_t* __restrict__ label_rank, int64_t i0,
                          acc_t margin, double* __restrict__ loss_rows,
                          int64_t* __restrict__ valid_rows, int64_t* __restrict__ pos_rows,
                          int32_t* __restrict__ Wi, const int64_t* __restrict__ offsets,
                          int64_t* __restrict__ out_a, int64_t* __restrict__ out_p,
                          int64_t* __restrict__ out_n) {
  __shared__ double sd[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t a = i0 + row;
  const int64_t C = l.cols;
  const int64_t* __restrict__ cand = l.cand;
  const AnchorGroup g = anchor_group(l, sorted_labels, a);
  const int64_t la = g.la;
  const int64_t P = g.P;  // positives of a
  const int64_t Q = g.Q;  // negatives of a
  const acc_t* __restrict__ d_row = Dc + row * C;
  const acc_t* __restrict__ sn = Sn + row * C;
  const int64_t* __restrict__ in = In + row * C;
  const bool row_nan = block_row_has_nan(d_row, C);  // every thread: a barrier
  const bool nan_terms = row_nan && P > 0 && Q > 0;

  double loss = 0;
  int64_t active = 0;
  if (kMode == SemiMode::kBackward && nan_terms) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      if (j != g.self) Wi[row * C + j] = kNanWeight;  // owned: no atomics in this row
    }
  } else if (Q > 0) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      if (j == g.self || cand[j] != la) continue;  // positives only
      const acc_t d = d_row[j];
      acc_t dn;
      int64_t n;
      if (row_nan) {
        semi_hard_scan(d_row, cand, C, la, d, dn, n);
      } else {
        // First sorted negative farther than the positive.
        const int64_t t = partition_point(Q, [&](int64_t u) { return !(sn[u] > d); });
        if (t < Q) {
          dn = sn[t];
          n = in[t];
        } else {  // none: the farthest negative, first occurrence of the largest value
          dn = sn[Q - 1];
          const int64_t t2 = partition_point(Q, [&](int64_t u) { return sn[u] < dn; });
          n = in[t2];
        }
        if (cand[n] == la) {
          // Only possible with +inf distances (a Gram value overflowing for huge finite
          // rows): the +inf sort keys of the non-negatives then tie with negatives in the
          // sort, and a non-negative was picked.
          semi_hard_scan(d_row, cand, C, la, d, dn, n);
        }
      }
      if constexpr (kMode == SemiMode::kForward) {
        const acc_t v = d - dn + margin;
        if (v > acc_t(0)) {
          loss += static_cast<double>(v);
          active += 1;
        }
      } else if constexpr (kMode == SemiMode::kBackward) {
        const acc_t v = d - dn + margin;
        if (v > acc_t(0)) {
          Wi[row * C + j] = 1;  // owned: positive columns are written only here
          atomicAdd(&Wi[row * C + n], -1);  // integer: order-independent
        }
      } else {
        // Positives of a in ascending index order are its label group among the candidates
        // (stably sorted) without its self index.
        const int64_t rp =
            label_rank[j] - g.gs - (g.self_in && label_rank[g.self] < label_rank[j] ? 1 : 0);
        const int64_t q = offsets[a] + rp;
        out_a[q] = a;
        out_p[q] = j;
        out_n[q] = n;
      }
    }
  }
  if constexpr (kMode == SemiMode::kForward) {
    loss = block_sum(loss, sd);
    active = block_sum(active, si);
    if (threadIdx.x == 0) {
      loss_rows[a] = nan_terms ? epi::quiet_nan<double>() : loss;
      valid_rows[a] = Q > 0 ? P : 0;
      pos_rows[a] = active;
    }
  }
}

// Sorted negatives of a chunk: values and stable column indices, both (r, C) contiguous.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> sorted_negatives(const at::Tensor& Dc, const RowLabels& l,
                                                    int64_t i0, int64_t r,
                                                    cudaStream_t stream) {
  at::Tensor keys = empty({r, l.cols}, Dc.options());
  launch_sort_keys<acc_t>(Dc, l, i0, r, keys.data_ptr<acc_t>(), nullptr, stream);
  const auto sorted = keys.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

// counts[a] = number of valid (a, p) pairs of the N anchors: #positives if a has a negative,
// else 0.
__global__ void semi_hard_counts_kernel(RowLabels l, const int64_t* __restrict__ sorted_labels,
                                        int64_t N, int64_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < N;
       a += stride) {
    const AnchorGroup g = anchor_group(l, sorted_labels, a);
    counts[a] = g.Q > 0 ? g.P : 0;
  }
}

// The semi-hard loss for loss_forward_cuda / loss_backward_cuda (loss_common.cuh):
// num_valid = #(a, p) pairs of anchors with a negative, num_positive = #pairs with a
// positive term.
struct SemiHardLoss {
  static constexpr bool kLabelGroups = true;
  static constexpr const char* kForwardName = "semi_hard_loss_cuda";
  static constexpr const char* kBackwardName = "semi_hard_loss_backward_cuda";

  template <typename acc_t>
  static constexpr int64_t bytes_per_elem() {
    return semi_hard_bytes_per_elem<acc_t>();
  }

  template <typename acc_t>
  static void forward(const LossChunk& c, const RowResults& rows) {
    const acc_t m = static_cast<acc_t>(c.margin);
    const std::tuple<at::Tensor, at::Tensor> neg =
        sorted_negatives<acc_t>(c.Dc, c.lab, c.i0, c.r, c.stream);
    const at::Tensor& sn = std::get<0>(neg);
    const at::Tensor& in = std::get<1>(neg);
    semi_hard_rows_kernel<acc_t, SemiMode::kForward><<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
        c.Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), in.data_ptr<int64_t>(), c.lab,
        c.groups.sorted.data_ptr<int64_t>(), c.groups.rank.data_ptr<int64_t>(), c.i0, m,
        rows.loss.data_ptr<double>(), rows.valid.data_ptr<int64_t>(),
        rows.positive.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t>
  static at::Tensor weights(const LossChunk& c) {
    const acc_t m = static_cast<acc_t>(c.margin);
    const std::tuple<at::Tensor, at::Tensor> neg =
        sorted_negatives<acc_t>(c.Dc, c.lab, c.i0, c.r, c.stream);
    const at::Tensor& sn = std::get<0>(neg);
    const at::Tensor& in = std::get<1>(neg);
    at::Tensor Wi = zeros({c.r, c.cols}, c.Dc.options().dtype(at::kInt));
    semi_hard_rows_kernel<acc_t, SemiMode::kBackward>
        <<<grid_1d(c.r), kRowThreads, 0, c.stream>>>(
            c.Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), in.data_ptr<int64_t>(), c.lab,
            c.groups.sorted.data_ptr<int64_t>(), c.groups.rank.data_ptr<int64_t>(), c.i0, m,
            nullptr, nullptr, nullptr, Wi.data_ptr<int32_t>(), nullptr, nullptr, nullptr,
            nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor W = empty({c.r, c.cols}, c.Dc.options());
    const int64_t n = c.r * c.cols;
    if (n > 0) {
      semi_hard_weights_kernel<acc_t><<<elementwise_grid(n), kElementwiseThreads, 0, c.stream>>>(
          Wi.data_ptr<int32_t>(), n, W.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return W;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> semi_hard_triplets_impl(const MineArgs& in,
                                                                      int64_t metric) {
  const at::Tensor& x = in.x;
  const at::Tensor& y = in.symmetric() ? in.x : in.y;
  const at::Tensor& cand_labels = in.symmetric() ? in.lab : in.ref_lab;
  const RowLabels l = in.symmetric() ? batch_row_labels(in.lab)
                                     : ref_row_labels(in.lab, in.ref_lab, in.self);
  const int64_t N = x.size(0), C = y.size(0);
  const auto idx_options = x.options().dtype(at::kLong);
  if (N == 0 || C == 0) {
    return {empty({0}, idx_options), empty({0}, idx_options),
            empty({0}, idx_options)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LabelGroups groups = label_groups(cand_labels, stream);
  // Count pass + exclusive scan: anchor a's pairs start at offsets[a].
  at::Tensor counts = empty({N}, idx_options);
  semi_hard_counts_kernel<<<elementwise_grid(N), kElementwiseThreads, 0, stream>>>(
      l, groups.sorted.data_ptr<int64_t>(), N, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor offsets;
  int64_t T = 0;
  std::tie(offsets, T) = exclusive_offsets(counts);  // synchronises: T sizes the outputs
  at::Tensor out_a = empty({T}, idx_options);
  at::Tensor out_p = empty({T}, idx_options);
  at::Tensor out_n = empty({T}, idx_options);
  if (T == 0) return {out_a, out_p, out_n};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "semi_hard_triplets_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor stats_x = compute_row_stats<scalar_t, acc_t>(x, stream);
    const at::Tensor stats_y =
        in.symmetric() ? stats_x : compute_row_stats<scalar_t, acc_t>(y, stream);
    const RowStats<acc_t> sx = row_stats_view<acc_t>(stats_x);
    const RowStats<acc_t> sy = row_stats_view<acc_t>(stats_y);
    const int64_t R = chunk_rows(N, C, semi_hard_bytes_per_elem<acc_t>());
    TC_METRIC_SWITCH(metric, kM, [&] {
      for_each_distance_chunk<scalar_t, acc_t, kM>(
          x, sx, y, sy, R, stream, [&](int64_t i0, int64_t r, const at::Tensor& Dc) {
            const auto [sn, in_idx] = sorted_negatives<acc_t>(Dc, l, i0, r, stream);
            semi_hard_rows_kernel<acc_t, SemiMode::kMine><<<grid_1d(r), kRowThreads, 0, stream>>>(
                Dc.data_ptr<acc_t>(), sn.data_ptr<acc_t>(), in_idx.data_ptr<int64_t>(), l,
                groups.sorted.data_ptr<int64_t>(), groups.rank.data_ptr<int64_t>(), i0, acc_t(0),
                nullptr, nullptr, nullptr, nullptr, offsets.data_ptr<int64_t>(),
                out_a.data_ptr<int64_t>(), out_p.data_ptr<int64_t>(), out_n.data_ptr<int64_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  return {out_a, out_p, out_n};
}

TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m) {
  m.impl("semi_hard_loss", &loss_forward_cuda<SemiHardLoss>);
  m.impl("semi_hard_loss_backward", &loss_backward_cuda<SemiHardLoss>);
  m.impl("semi_hard_loss_ref", &loss_ref_forward_cuda<SemiHardLoss>);
  m.impl("semi_hard_loss_ref_backward", &loss_ref_backward_cuda<SemiHardLoss>);
}

}  // namespace cuda
}  // namespace triplet_cuda
