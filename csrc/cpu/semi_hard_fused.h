// Semi hard's fused CPU mining (every class at most kFusedMaxPositives + 1 members): the
// upper-triangle pass of fused.h keeps, per (anchor, positive), the nearest negative farther
// than d_ap and, per anchor, the farthest negative (the fallback). Shared by semi_hard_loss and
// mine_triplets, so the loss and the mined triplets always agree.
//
// The scans are branch-free and vectorise, as batch all's (csrc/cpu/batch_all.cpp): each
// anchor's positives sit in W lanes (4, 8 or 16, the fewest that hold every anchor's), stored
// lane-major (W, N) so that a column chunk's anchors are contiguous; unused lanes hold a NaN
// positive distance (never "farther", never a near tie: inert). Own-class candidates are left
// out by a dense int32 class-id test rather than a masked distance (a +inf entry would count as
// farther than every positive). The row phase (one anchor against a block row) runs one
// positive at a time over the candidates in 8 partial lanes (omp simd: GCC 12 leaves these
// select loops scalar otherwise), merged with the total order of
// csrc/epilogue.h; the column phase (the block's rows as candidates of 64 anchors) updates
// the anchors' lanes in place. Each anchor sees its candidates in ascending index (earlier
// blocks' rows, then its own row), so the lane updates are epi::semi_hard_takes /
// farthest_takes (a tie keeps the earlier index) and the result is the one SemiHardChoice and
// ArgFarthest give: bit-identical to a scalar scan, whatever the thread count.
//
// Near ties: where the Gram-form d_an and d_ap are within rounding (epi::near_tie), the strict
// "d_an > d_ap" is decided on exact distances recomputed from the rows. The vector loops leave
// such pairs out and flag them (a bit per positive and candidate); a scalar pass then visits
// the flagged candidates only, recomputing each pair's exact distance once. With float32's
// window (2^-10 relative) about 6% of random pairs of a K = 4 batch are near ties of some
// positive; their exact distances, not the scans, are most of the mining's time.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fused.h"

namespace triplet_cuda {
namespace cpu {

// Per (anchor a, its k-th positive): the chosen negative and its distance; any_nan when a
// valid anchor's row holds a NaN distance (the NaN rule).
template <typename T>
struct SemiHardMined {
  std::vector<int64_t> neg;  // (N, K), -1 where the anchor has no negative
  std::vector<T> neg_dist;   // (N, K)
  bool any_nan = false;
};

namespace semi_hard_fused {

// A lane's index as wide as T, so that a (distance, index) select vectorises.
template <typename T>
using Idx = typename std::conditional<sizeof(T) == 8, int64_t, int32_t>::type;

template <typename T>
struct Lanes {
  int64_t N = 0;
  int W = 0;                  // lanes per anchor: 4, 8 or 16
  std::vector<int32_t> cls;   // (N) class id: the smallest index of the anchor's class
  std::vector<int32_t> npos;  // (N) positives per anchor
  std::vector<T> dap;         // (W, N) positive distances (Gram form), NaN beyond the count
  std::vector<T> exact_ap;    // (W, N) the same recomputed from the rows (near ties)
  std::vector<T> od;          // (W, N) nearest negative farther than d_ap: distance, NaN: none
  std::vector<Idx<T>> oi;     // (W, N) its index, -1: none
  std::vector<T> fd;          // (N) farthest negative: distance
  std::vector<Idx<T>> fi;     // (N) its index, -1: none
};

template <typename T, Metric M>
Lanes<T> make_lanes(const Prepared& p, const Positives<T>& pos) {
  constexpr int K = kFusedMaxPositives;
  const int64_t N = pos.N, D = p.e.size(1);
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(),
              "triplet_cuda: semi_hard_loss supports at most 2^31 - 1 embeddings, got ", N);
  int most = 0;
  for (int64_t a = 0; a < N; ++a) most = std::max(most, pos.count[a]);
  Lanes<T> l;
  l.N = N;
  l.W = most <= 4 ? 4 : most <= 8 ? 8 : 16;
  l.cls.resize(N);
  l.npos.assign(pos.count.begin(), pos.count.end());
  l.dap.assign(l.W * N, epi::quiet_nan<T>());
  l.exact_ap.assign(l.W * N, epi::quiet_nan<T>());
  l.od.assign(l.W * N, epi::semi_hard_none<T>());
  l.oi.assign(l.W * N, -1);
  l.fd.assign(N, T(0));
  l.fi.assign(N, -1);
  const T* e = p.e.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      // positives in ascending index: the first is the class's smallest index unless a is
      l.cls[a] = static_cast<int32_t>(pos.count[a] > 0 ? std::min(a, pos.idx[a * K]) : a);
      for (int k = 0; k < pos.count[a]; ++k) {
        const int64_t j = pos.idx[a * K + k];
        l.dap[k * N + a] = pos.dist[a * K + k];
        l.exact_ap[k * N + a] = pair_distance<M>(e + a * D, e + j * D, D, inv[a], inv[j]);
      }
    }
  });
  return l;
}

// Row phase: anchor a = r0 + i against the candidates r0 + [0, C) at d[0, C).
template <typename T, Metric M>
void scan_row(const Prepared& p, Lanes<T>& l, int64_t r0, int64_t i, const T* d) {
  using I = Idx<T>;
  constexpr int L = 8;
  const int64_t N = l.N, C = N - r0, a = r0 + i, D = p.e.size(1);
  const int32_t* cls = l.cls.data() + r0;
  const int32_t own = cls[i];
  {  // the farthest negative
    T bd[L];
    I bi[L];
    I empty[L];  // apart from bi: a select that reads its own index lane does not vectorise
    for (int q = 0; q < L; ++q) bd[q] = T(0), bi[q] = -1, empty[q] = 1;
    int64_t j = 0;
    for (; j + L <= C; j += L) {
#pragma omp simd
      for (int q = 0; q < L; ++q) {
        const T x = d[j + q];
        const bool take = (cls[j + q] != own) & epi::farthest_takes(empty[q] != 0, x, bd[q]);
        bd[q] = take ? x : bd[q];
        bi[q] = take ? static_cast<I>(j + q) : bi[q];
        empty[q] = take ? 0 : empty[q];
      }
    }
    for (; j < C; ++j) {  // lane 0 has seen only lower indices
      const bool take = (cls[j] != own) & epi::farthest_takes(empty[0] != 0, d[j], bd[0]);
      bd[0] = take ? d[j] : bd[0];
      bi[0] = take ? static_cast<I>(j) : bi[0];
      empty[0] = take ? 0 : empty[0];
    }
    epi::ArgFarthest<T> f;
    f.d = l.fd[a];
    f.i = l.fi[a];
    for (int q = 0; q < L; ++q) f.update(bd[q], bi[q] < 0 ? -1 : r0 + bi[q]);
    l.fd[a] = f.d;
    l.fi[a] = static_cast<I>(f.i);
  }
  // tie[j] bit k: candidate j is a near tie of positive k (decided after the scans)
  thread_local std::vector<uint32_t> tie_buf;
  tie_buf.assign(C, 0);
  uint32_t* tie = tie_buf.data();
  bool any_tie = false;
  for (int k = 0; k < l.npos[a]; ++k) {  // the nearest negative farther than each positive
    const T dap = l.dap[k * N + a];
    T bd[L];
    I bi[L];
    for (int q = 0; q < L; ++q) bd[q] = epi::semi_hard_none<T>(), bi[q] = -1;
    uint32_t ties = 0;
    int64_t j = 0;
    for (; j + L <= C; j += L) {
#pragma omp simd reduction(| : ties)
      for (int q = 0; q < L; ++q) {
        const T x = d[j + q];
        const bool neg = cls[j + q] != own;
        const bool near = neg & epi::near_tie(x, dap);
        const bool take = neg & epi::semi_hard_takes((x > dap) & !near, x, bd[q]);
        bd[q] = take ? x : bd[q];
        bi[q] = take ? static_cast<I>(j + q) : bi[q];
        tie[j + q] |= static_cast<uint32_t>(near) << k;
        ties |= static_cast<uint32_t>(near);
      }
    }
    for (; j < C; ++j) {
      const bool neg = cls[j] != own;
      const bool near = neg & epi::near_tie(d[j], dap);
      const bool take = neg & epi::semi_hard_takes((d[j] > dap) & !near, d[j], bd[0]);
      bd[0] = take ? d[j] : bd[0];
      bi[0] = take ? static_cast<I>(j) : bi[0];
      tie[j] |= static_cast<uint32_t>(near) << k;
      ties |= static_cast<uint32_t>(near);
    }
    any_tie |= ties != 0;
    epi::ArgNearest<T> o;
    o.d = l.od[k * N + a];
    o.i = l.oi[k * N + a];
    for (int q = 0; q < L; ++q) o.update(bd[q], bi[q] < 0 ? -1 : r0 + bi[q]);
    l.od[k * N + a] = o.d;
    l.oi[k * N + a] = static_cast<I>(o.i);
  }
  if (!any_tie) return;
  // The near ties, decided on exact distances (each computed at most once per pair).
  const T* e = p.e.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  for (int64_t j = 0; j < C; ++j) {
    if (tie[j] == 0) continue;
    const int64_t c = r0 + j;
    const T exact_an = pair_distance<M>(e + a * D, e + c * D, D, inv[a], inv[c]);
    for (int k = 0; k < l.npos[a]; ++k) {
      if (!((tie[j] >> k) & 1u) || !(exact_an > l.exact_ap[k * N + a])) continue;
      epi::ArgNearest<T> o;
      o.d = l.od[k * N + a];
      o.i = l.oi[k * N + a];
      o.update(d[j], c);
      l.od[k * N + a] = o.d;
      l.oi[k * N + a] = static_cast<I>(o.i);
    }
  }
}

// Column phase: the block rows r0 + [0, b) as candidates of the anchors r0 + [j0, j1)
// (j0 >= b), at dist[i * C + j]; 64 anchors at a time, in place, vectorised over the anchors.
template <typename T, Metric M>
void scan_cols(const Prepared& p, Lanes<T>& l, int64_t r0, int64_t b, int64_t j0, int64_t j1,
               const T* dist) {
  using I = Idx<T>;
  constexpr int64_t kSpan = 64;
  const int64_t N = l.N, C = N - r0, D = p.e.size(1);
  const int32_t* cls = l.cls.data() + r0;
  const T* e = p.e.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  for (int64_t s0 = j0; s0 < j1; s0 += kSpan) {
    const int64_t n = std::min(kSpan, j1 - s0), a0 = r0 + s0;  // anchors a0 + [0, n)
    int P = 0;
    for (int64_t j = 0; j < n; ++j) P = std::max(P, l.npos[a0 + j]);
    const int32_t* ac = cls + s0;
    T* fd = l.fd.data() + a0;
    I* fi = l.fi.data() + a0;
    for (int64_t i = 0; i < b; ++i) {
      const T* d = dist + i * C + s0;
      const int32_t other = cls[i];
      const I cand = static_cast<I>(r0 + i);
      for (int64_t j = 0; j < n; ++j) {
        const bool take = (ac[j] != other) & epi::farthest_takes(fi[j] < 0, d[j], fd[j]);
        fd[j] = take ? d[j] : fd[j];
        fi[j] = take ? cand : fi[j];
      }
      uint32_t tie[kSpan] = {};  // bit k: anchor j's positive k is a near tie
      uint32_t ties = 0;
      for (int k = 0; k < P; ++k) {
        const T* dap = l.dap.data() + k * N + a0;
        T* od = l.od.data() + k * N + a0;
        I* oi = l.oi.data() + k * N + a0;
        for (int64_t j = 0; j < n; ++j) {
          const bool neg = ac[j] != other;
          const bool near = neg & epi::near_tie(d[j], dap[j]);
          const bool take = neg & epi::semi_hard_takes((d[j] > dap[j]) & !near, d[j], od[j]);
          od[j] = take ? d[j] : od[j];
          oi[j] = take ? cand : oi[j];
          tie[j] |= static_cast<uint32_t>(near) << k;
          ties |= static_cast<uint32_t>(near);
        }
      }
      if (ties == 0) continue;
      for (int64_t j = 0; j < n; ++j) {  // the near ties, as in scan_row
        if (tie[j] == 0) continue;
        const int64_t a = a0 + j;
        const T exact_an = pair_distance<M>(e + a * D, e + (r0 + i) * D, D, inv[a], inv[r0 + i]);
        for (int k = 0; k < P; ++k) {
          const bool take = ((tie[j] >> k) & 1u) &
                            epi::semi_hard_takes(exact_an > l.exact_ap[k * N + a], d[j],
                                                 l.od[k * N + a]);
          l.od[k * N + a] = take ? d[j] : l.od[k * N + a];
          l.oi[k * N + a] = take ? cand : l.oi[k * N + a];
        }
      }
    }
  }
}

}  // namespace semi_hard_fused

template <typename T, Metric M>
inline SemiHardMined<T> mine_fused(const Prepared& p, const int64_t*, const Positives<T>& pos) {
  namespace f = semi_hard_fused;
  const int64_t N = p.rows();
  constexpr int K = kFusedMaxPositives;
  f::Lanes<T> l = f::make_lanes<T, M>(p, pos);
  const auto none = [](int64_t, int64_t, at::Tensor&) {};
  upper_triangle_rows<T, M>(
      p, sizeof(T), none,
      [&](int64_t r0, int64_t i, const T* d) { f::scan_row<T, M>(p, l, r0, i, d); },
      [&](int64_t r0, int64_t b, int64_t j0, int64_t j1, const T* d) {
        f::scan_cols<T, M>(p, l, r0, b, j0, j1, d);
      },
      none);
  SemiHardMined<T> r;
  r.neg.assign(N * K, -1);
  r.neg_dist.assign(N * K, T(0));
  for (int64_t a = 0; a < N; ++a) {
    if (pos.count[a] == 0 || pos.negatives[a] == 0) continue;
    epi::ArgFarthest<T> farthest;
    farthest.d = l.fd[a];
    farthest.i = l.fi[a];
    r.any_nan |= epi::is_nan(l.fd[a]);  // the farthest negative is NaN iff one is
    for (int k = 0; k < pos.count[a]; ++k) {
      r.any_nan |= epi::is_nan(pos.dist[a * K + k]);
      epi::SemiHardChoice<T> choice;
      choice.outside.d = l.od[k * N + a];
      choice.outside.i = l.oi[k * N + a];
      epi::semi_hard_pick(choice, farthest, &r.neg_dist[a * K + k], &r.neg[a * K + k]);
    }
  }
  return r;
}

}  // namespace cpu
}  // namespace triplet_cuda
