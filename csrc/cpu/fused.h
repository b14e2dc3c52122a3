// Fused upper-triangle CPU passes of the losses that need each anchor's few positives
// (batch all, semi hard): the positives' distances are computed first (O(N K D)), then the
// negatives are streamed once over upper-triangle blocks (row block [r0, r0 + b) against
// candidates [r0, N), as batch hard): the block's rows scan their candidates, and the
// candidates beyond the block scan the block's rows, so each pair's distance is computed once
// and serves both of its anchors. Per-anchor state is updated in a fixed order (block, then
// row), independent of the thread count: deterministic.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "distance.h"

namespace triplet_cuda {
namespace cpu {

// The fused paths serve batches whose classes have at most this many positives per anchor.
constexpr int kFusedMaxPositives = 16;


// The anchors' positives: for anchor a, its class members other than a in ascending index,
// their distances (epi::distance of an explicit dot product), and where a sits in each
// positive's own list (for the symmetric positive-pair gradient).
template <typename T>
struct Positives {
  int64_t N = 0;
  std::vector<int> count;          // (N) positives per anchor
  std::vector<int64_t> idx;        // (N, K) positive indices
  std::vector<T> dist;             // (N, K) d(a, idx[a][k])
  std::vector<int> back;           // (N, K) position of a in idx[idx[a][k]]
  std::vector<int64_t> negatives;  // (N) negatives per anchor
  bool fits = true;                // every class has at most K + 1 members
};

template <typename T, Metric M>
Positives<T> collect_positives(const Prepared& p, const int64_t* lab) {
  const int64_t N = p.rows(), D = p.e.size(1);
  constexpr int K = kFusedMaxPositives;
  Positives<T> r;
  r.N = N;
  // Class members in ascending index: stable sort of the indices by label.
  std::vector<int64_t> order(N);
  for (int64_t i = 0; i < N; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t u, int64_t v) { return lab[u] < lab[v]; });
  std::vector<int64_t> start(N), size(N), rank(N);  // per anchor: its class's [start, +size)
  for (int64_t q = 0; q < N;) {
    int64_t e = q;
    while (e < N && lab[order[e]] == lab[order[q]]) ++e;
    if (e - q > K + 1) r.fits = false;
    for (int64_t t = q; t < e; ++t) {
      start[order[t]] = q;
      size[order[t]] = e - q;
      rank[order[t]] = t - q;
    }
    q = e;
  }
  if (!r.fits) return r;
  r.count.assign(N, 0);
  r.idx.assign(N * K, -1);
  r.dist.assign(N * K, T(0));
  r.back.assign(N * K, 0);
  r.negatives.assign(N, 0);
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      int k = 0;
      for (int64_t t = 0; t < size[a]; ++t) {
        const int64_t j = order[start[a] + t];
        if (j == a) continue;
        const T dot = explicit_sum<Metric::kCosine>(e + a * D, e + j * D, D);
        r.idx[a * K + k] = j;
        r.dist[a * K + k] = distance_from_dot<M>(dot, e + a * D, e + j * D, D, sq[a], inv[a],
                                                 sq[j], inv[j]);
        // a is member rank[a] of the class; in j's list (members without j) it sits one
        // place lower when j comes before it
        r.back[a * K + k] = static_cast<int>(rank[a] - (rank[j] < rank[a] ? 1 : 0));
        ++k;
      }
      r.count[a] = k;
      r.negatives[a] = N - size[a];
    }
  });
  return r;
}

// The upper-triangle pass over for_each_upper_block, whole rows at a time (for scans that
// vectorise along a row). For each block [r0, r0 + b) against candidates [r0, N), C = N - r0,
// dist row-major (b, C):
//   before_block(r0, b, dist);
//   row(r0, i, d): block row i, anchor r0 + i, against every candidate r0 + j, j in [0, C),
//     at d[j] (its own entry and its class members included: the caller skips them);
//   cols(r0, b, j0, j1, d): the candidates beyond the block in column chunks: every block row
//     i in [0, b) is a candidate of the anchors r0 + j, j in [j0, j1) (j0 >= b), at d[i * C + j];
//   after_block(r0, b, dist) once both phases are done.
// Every ordered pair (anchor, candidate != anchor) is seen once, from the thread that owns the
// anchor in that phase (rows split across threads, then column chunks), in a fixed order per
// anchor (block, then row) whatever the thread count.
template <typename T, Metric M, typename BeforeBlock, typename Row, typename Cols,
          typename AfterBlock>
void upper_triangle_rows(const Prepared& p, int64_t bytes_per_elem, BeforeBlock&& before_block,
                         Row&& row, Cols&& cols, AfterBlock&& after_block) {
  const int64_t N = p.rows();
  constexpr int64_t kColChunk = 64;
  for_each_upper_block(p, M, bytes_per_elem, [&](int64_t r0, int64_t b, at::Tensor& dist) {
    before_block(r0, b, dist);
    const int64_t C = N - r0;
    const T* dp = dist.data_ptr<T>();
    at::parallel_for(0, b, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) row(r0, i, dp + i * C);
    });
    const int64_t chunks = (C - b + kColChunk - 1) / kColChunk;
    at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(b * kColChunk)),
                     [&](int64_t lo, int64_t hi) {
                       for (int64_t q = lo; q < hi; ++q) {
                         const int64_t j0 = b + q * kColChunk;
                         cols(r0, b, j0, std::min(C, j0 + kColChunk), dp);
                       }
                     });
    after_block(r0, b, dist);
  });
}

// upper_triangle_rows pair by pair: visit(anchor, candidate, distance, e) for every ordered
// (anchor, negative candidate) pair exactly once (labels differ); e is the pair's offset in the
// (b, N - r0) block (the block's rows visit (i, j) as anchor r0 + i, the later candidates as
// anchor r0 + j).
template <typename T, Metric M, typename BeforeBlock, typename Visit, typename AfterBlock>
void upper_triangle_pass(const Prepared& p, const int64_t* lab, int64_t bytes_per_elem,
                         BeforeBlock&& before_block, Visit&& visit, AfterBlock&& after_block) {
  const int64_t N = p.rows();
  upper_triangle_rows<T, M>(
      p, bytes_per_elem, before_block,
      [&](int64_t r0, int64_t i, const T* d) {
        const int64_t a = r0 + i, C = N - r0;
        for (int64_t j = 0; j < C; ++j) {
          if (lab[r0 + j] != lab[a]) visit(a, r0 + j, d[j], i * (N - r0) + j);
        }
      },
      [&](int64_t r0, int64_t b, int64_t j0, int64_t j1, const T* dist) {
        const int64_t C = N - r0;
        for (int64_t i = 0; i < b; ++i) {
          const int64_t a = r0 + i;
          const T* d = dist + i * C;
          for (int64_t j = j0; j < j1; ++j) {
            if (lab[r0 + j] != lab[a]) visit(r0 + j, a, d[j], i * C + j);
          }
        }
      },
      after_block);
}

template <typename T, Metric M, typename Visit>
void upper_triangle_pass(const Prepared& p, const int64_t* lab, int64_t bytes_per_elem,
                         Visit&& visit) {
  const auto none = [](int64_t, int64_t, at::Tensor&) {};
  upper_triangle_pass<T, M>(p, lab, bytes_per_elem, none, visit, none);
}

// One differentiable pair of a sparse backward: g * d(x_a, x_b), d the pair's distance.
template <typename T>
struct WeightedPair {
  int64_t a, b;
  T g, d;
};

// Gradient (N, D) of sum over pairs of g * d(x_a, x_b), accumulation dtype. Each row owns its
// gradient and adds its pairs' terms in pair order (a reverse index by endpoint), so the
// result is deterministic and needs no atomics.
template <typename T, Metric M>
at::Tensor sparse_pair_backward(const Prepared& p, const std::vector<WeightedPair<T>>& pairs) {
  const int64_t N = p.rows(), D = p.e.size(1);
  at::Tensor grad = zeros_like(p.e);
  const T* e = p.e.data_ptr<T>();
  const T* sq = p.sqnorm.data_ptr<T>();
  const T* inv = p.inv.data_ptr<T>();
  const int64_t P = static_cast<int64_t>(pairs.size());
  std::vector<PairGrad<T>> coef(P);
  at::parallel_for(0, P, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const WeightedPair<T>& w = pairs[q];
      coef[q] = pair_grad<M>(w.g, w.d, sq[w.a], sq[w.b], inv[w.a], inv[w.b]);
    }
  });
  // start[r] .. start[r + 1]: entries 2q (r is pair q's a) or 2q + 1 (r is its b), ascending.
  std::vector<int64_t> start(N + 1, 0), entries(2 * P);
  for (const WeightedPair<T>& w : pairs) ++start[w.a + 1], ++start[w.b + 1];
  for (int64_t r = 0; r < N; ++r) start[r + 1] += start[r];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t q = 0; q < P; ++q) {
      entries[fill[pairs[q].a]++] = 2 * q;
      entries[fill[pairs[q].b]++] = 2 * q + 1;
    }
  }
  T* gp = grad.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T* gr = gp + r * D;
      for (int64_t t = start[r]; t < start[r + 1]; ++t) {
        const int64_t q = entries[t] >> 1;
        const bool is_b = entries[t] & 1;
        const PairGrad<T>& c = coef[q];
        const T* ea = e + pairs[q].a * D;
        const T* eb = e + pairs[q].b * D;
        const T cx = is_b ? c.cab : c.ca, cy = is_b ? c.cb : c.cab;  // coefficients of x_a, x_b
        for (int64_t k = 0; k < D; ++k) gr[k] += cx * ea[k] + cy * eb[k];
      }
    }
  });
  return grad;
}

}  // namespace cpu
}  // namespace triplet_cuda
