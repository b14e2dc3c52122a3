// The per-element epilogue of every fused op, written once for both backends.
//
// A fused op is a mainloop that produces dot products <a, b> of an anchor row and a candidate
// row (CPU: a GEMM per row block; CUDA: a tile kernel) and this epilogue, which turns them
// into distances, applies the label masks and the tie / NaN rules, and reduces per anchor.
// Everything here is `__host__ __device__` and free of ATen, so the CPU tests prove the very
// logic the GPU runs; a GPU run has only the mainloop left to prove.
//
// Rules (the README states them for users):
//   * Distance from the Gram form: ||a||^2 + ||b||^2 - 2 <a, b> (Euclidean metrics),
//     1 - <a, b> inv_a inv_b (cosine, inv = 1 / max(||x||, 1e-8)).
//   * Near-zero rule: a squared distance below gram_near_zero() * (||a||^2 + ||b||^2) is
//     mostly rounding noise; the backend recomputes it from explicit differences
//     (needs_exact() says when), so duplicates and the diagonal are exactly 0.
//   * NaN rule: a distance involving a row whose squared norm is not finite (a NaN or an
//     Inf entry, or a float32 overflow) is NaN. A NaN distance ranks as the hardest
//     candidate (the farthest positive and the nearest negative alike), ties between NaNs
//     going to the lowest index, and any NaN distance in an anchor's row makes that
//     anchor's loss terms and gradient weights NaN. Never a finite loss from NaN input.
//   * Tie rule: among equal distances the lowest candidate index wins. The comparators
//     below define a total order on (distance, index), so a reduction may visit the
//     candidates in any order (tiles, splits, upper-triangle blocks) and still pick the
//     same one: the result is deterministic by construction.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"

namespace triplet_cuda {
namespace epi {

// ------------------------------------------------------------------------ scalar helpers

template <typename T>
TC_HOST_DEVICE inline bool is_nan(T x) {
  return x != x;
}

template <typename T>
TC_HOST_DEVICE inline T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename T>
TC_HOST_DEVICE inline T infinity() {
  return std::numeric_limits<T>::infinity();
}

// True for finite x (false for NaN and +-Inf).
template <typename T>
TC_HOST_DEVICE inline bool is_finite(T x) {
  return x - x == T(0);
}

TC_HOST_DEVICE inline float sqrt_(float x) {
#ifdef __CUDA_ARCH__
  return ::sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

TC_HOST_DEVICE inline double sqrt_(double x) {
#ifdef __CUDA_ARCH__
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// max(x, 0) that keeps NaN (std::max and fmax would turn NaN into a finite value).
template <typename T>
TC_HOST_DEVICE inline T relu(T x) {
  return x > T(0) ? x : (is_nan(x) ? x : T(0));
}

// Derivative of relu at x as a multiplier: 1 above 0, 0 at or below 0, NaN for NaN.
template <typename T>
TC_HOST_DEVICE inline T relu_grad(T x) {
  return x > T(0) ? T(1) : (is_nan(x) ? x : T(0));
}

// ------------------------------------------------------------------------ distances

// Squared distance (Euclidean metrics) or cosine similarity (cosine) from the dot product.
// sq_* are squared norms, inv_* the cosine inverse norms (unused by the Euclidean metrics).
// Returns NaN when a squared norm is not finite (the NaN rule).
template <Metric M, typename T>
TC_HOST_DEVICE inline T gram_value(T dot, T sq_a, T inv_a, T sq_b, T inv_b) {
  const T scale = sq_a + sq_b;
  if (!is_finite(scale)) return quiet_nan<T>();
  if constexpr (M == Metric::kCosine) {
    return dot * inv_a * inv_b;
  } else {
    return scale - T(2) * dot;
  }
}

// True when the Gram value of a Euclidean metric is within rounding noise of 0 and the
// backend must recompute the pair's squared distance from explicit differences.
template <Metric M, typename T>
TC_HOST_DEVICE inline bool needs_exact(T gram, T sq_a, T sq_b) {
  if constexpr (M == Metric::kCosine) {
    return false;
  } else {
    return gram <= gram_near_zero<T>() * (sq_a + sq_b);
  }
}

// The distance from a Gram value (or an exact squared distance / cosine similarity).
template <Metric M, typename T>
TC_HOST_DEVICE inline T finish(T v) {
  if constexpr (M == Metric::kCosine) {
    return T(1) - v;
  } else if constexpr (M == Metric::kEuclidean) {
    return sqrt_(v);
  } else {
    return v;
  }
}

// Distance from the explicit sum over k of (a_k - b_k)^2 (Euclidean metrics) or a_k b_k
// (cosine), with the NaN rule: NaN when the sum overflows or is not finite, and when a row's
// squared norm is not finite, which its inverse norm inv = 1 / max(||x||, eps) shows as 0
// (an Inf or overflowing norm) or NaN. So two huge rows close to each other are NaN here as
// in the Gram form, never a finite distance that the mining ranked as NaN.
template <Metric M, typename T>
TC_HOST_DEVICE inline T exact_distance(T sum, T inv_a, T inv_b) {
  if (!is_finite(sum) || !(inv_a > T(0)) || !(inv_b > T(0))) return quiet_nan<T>();
  if constexpr (M == Metric::kCosine) {
    return finish<M>(sum * inv_a * inv_b);
  } else {
    return finish<M>(sum);
  }
}

// Distance from the dot product; recompute() is called (and must return the exact squared
// distance) only for near-zero Euclidean pairs.
template <Metric M, typename T, typename Recompute>
TC_HOST_DEVICE inline T distance(T dot, T sq_a, T inv_a, T sq_b, T inv_b, Recompute&& recompute) {
  T v = gram_value<M>(dot, sq_a, inv_a, sq_b, inv_b);
  if (needs_exact<M>(v, sq_a, sq_b)) v = recompute();
  return finish<M>(v);
}

// ------------------------------------------------------------------------ selection

// Total orders on (distance, index) for the hardest positive (largest distance) and the
// hardest negative (smallest distance): NaN beats every number, then the better distance,
// then the lower index. An index < 0 is "none": it loses to anything, and "none" never wins.
template <typename T>
TC_HOST_DEVICE inline bool farther(T d, int64_t i, T bd, int64_t bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  const bool dn = is_nan(d), bn = is_nan(bd);
  if (dn || bn) return dn && (!bn || i < bi);
  return d > bd || (d == bd && i < bi);
}

template <typename T>
TC_HOST_DEVICE inline bool nearer(T d, int64_t i, T bd, int64_t bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  const bool dn = is_nan(d), bn = is_nan(bd);
  if (dn || bn) return dn && (!bn || i < bi);
  return d < bd || (d == bd && i < bi);
}

// A running arg-best: update() with candidates in any order, merge() partial results of
// disjoint candidate sets in any order; the result is the same.
template <typename T>
struct ArgFarthest {
  T d = T(0);
  int64_t i = -1;
  TC_HOST_DEVICE inline void update(T dc, int64_t ic) {
    const bool take = farther(dc, ic, d, i);
    d = take ? dc : d;
    i = take ? ic : i;
  }
};

template <typename T>
struct ArgNearest {
  T d = T(0);
  int64_t i = -1;
  TC_HOST_DEVICE inline void update(T dc, int64_t ic) {
    const bool take = nearer(dc, ic, d, i);
    d = take ? dc : d;
    i = take ? ic : i;
  }
};

// ------------------------------------------------------------------------ loss terms

// x where keep, else +0, as a bit mask rather than a select: compilers turn a select on a
// float comparison into a branch (x86 without AVX), and the comparison here is a coin flip no
// predictor learns; the mask keeps the lane loops below branch-free and vectorisable.
template <typename T>
TC_HOST_DEVICE inline T keep_if(bool keep, T x) {
  using Bits = typename std::conditional<sizeof(T) == 8, uint64_t, uint32_t>::type;
  static_assert(sizeof(Bits) == sizeof(T), "keep_if: float32 or float64");
  Bits b;
  memcpy(&b, &x, sizeof b);
  b &= Bits(0) - static_cast<Bits>(keep);
  memcpy(&x, &b, sizeof b);
  return x;
}

// Batch all, one triplet: the term relu(d_ap - d_an + margin) (+0 when inactive) and, in
// *active, whether it is active: d_ap - d_an + margin > 0, evaluated in T. A NaN term is
// inactive and adds 0: the NaN rule is the caller's (a NaN anywhere in the anchor's row makes
// its loss NaN). Branch-free (keep_if), so loops over it vectorise.
template <typename T>
TC_HOST_DEVICE inline T batch_all_term(T d_ap, T d_an, T margin, bool* active) {
  const T t = d_ap - d_an + margin;
  *active = t > T(0);
  return keep_if(*active, t);
}

// One (anchor, negative) pair against the anchor's P positive distances d_ap: adds the sum of
// its terms to *sum and the number of active ones to *active.
template <typename T, typename Acc>
TC_HOST_DEVICE inline void batch_all_negative(const T* d_ap, int P, T d_an, T margin, Acc* sum,
                                              int64_t* active) {
  Acc s = 0;
  int64_t c = 0;
  for (int k = 0; k < P; ++k) {
    bool on;
    s += static_cast<Acc>(batch_all_term(d_ap[k], d_an, margin, &on));
    c += on;
  }
  *sum += s;
  *active += c;
}

// The same scan in W fixed lanes, vectorisable over the positives: the anchor's positive
// distances fill lanes [0, P) of d_ap and the others hold batch_all_pad() (-inf: the term is
// -inf or NaN, never active, and adds 0), so the loop has a fixed trip count and no mask.
// Lane k's term goes to sum[k] and its activity to count[k] (per-lane accumulators: no
// reassociation, so the compiler may vectorise without changing a bit); returns the number
// of active lanes (the pair's weight in the backward is -g times it).
template <typename T>
TC_HOST_DEVICE inline T batch_all_pad() {
  return -infinity<T>();
}

template <int W, typename T, typename Acc>
TC_HOST_DEVICE inline int batch_all_lanes(const T* d_ap, T d_an, T margin, Acc* sum,
                                          int32_t* count) {
  int c = 0;
  for (int k = 0; k < W; ++k) {
    bool on;
    sum[k] += static_cast<Acc>(batch_all_term(d_ap[k], d_an, margin, &on));
    count[k] += on;
    c += on;
  }
  return c;
}

// Semi hard, one negative candidate (d_an, j) against positive k's running choices: the
// nearest negative farther than d_ap (semi-hard) and, for the fallback, the farthest one.
template <typename T>
struct SemiHardChoice {
  ArgNearest<T> outside;  // nearest negative with d_an > d_ap
  TC_HOST_DEVICE inline void update(T d_ap, T d_an, int64_t j) {
    if (d_an > d_ap) outside.update(d_an, j);
  }
  // The same with "d_an > d_ap" decided by the caller (see near_tie).
  TC_HOST_DEVICE inline void update_if(bool farther, T d_an, int64_t j) {
    if (farther) outside.update(d_an, j);
  }
};

// Two Gram-form distances this close may be an exact tie that rounding broke (a negative
// duplicating the positive: d_an == d_ap exactly, but the Gram form can put one an ulp
// higher). Semi hard's strict "d_an > d_ap" is then decided on exact distances recomputed
// from the rows, so duplicates are ties on every backend, as in the reference.
template <typename T>
TC_HOST_DEVICE inline bool near_tie(T x, T y) {
  const T diff = x > y ? x - y : y - x;
  const T mag = (x > T(0) ? x : -x) + (y > T(0) ? y : -y);
  return diff <= gram_near_zero<T>() * mag;
}

// Lane-wise forms of the semi-hard updates, for scans that visit each anchor's candidates in
// ascending index (then a tie keeps the earlier, lower index: the tie rule with no index
// comparison), branch-free so that loops over lanes vectorise. A lane's state is (distance,
// index), index < 0 while it holds nothing; the result equals SemiHardChoice / ArgFarthest's.
//
// The nearest negative farther than d_ap: the state's distance is semi_hard_none() (NaN)
// while it holds nothing, so "nearer" is !(d_an >= best). d_an is never NaN when `farther`
// holds (d_an > d_ap, or the exact form of it on a near_tie).
template <typename T>
TC_HOST_DEVICE inline T semi_hard_none() {
  return quiet_nan<T>();
}

template <typename T>
TC_HOST_DEVICE inline bool semi_hard_takes(bool farther, T d_an, T best) {
  return farther & !(d_an >= best);
}

// The farthest negative (the fallback): NaN beats every number and the first NaN stays.
template <typename T>
TC_HOST_DEVICE inline bool farthest_takes(bool empty, T d, T best) {
  return empty | ((best == best) & !(d <= best));  // best not NaN, d NaN or above it
}

// Semi-hard term: the chosen negative is `outside` if one exists, else the farthest negative.
template <typename T>
TC_HOST_DEVICE inline void semi_hard_pick(const SemiHardChoice<T>& c, const ArgFarthest<T>& far,
                                          T* d_an, int64_t* n) {
  const bool has = c.outside.i >= 0;
  *d_an = has ? c.outside.d : far.d;
  *n = has ? c.outside.i : far.i;
}

// Contrastive term of a pair at distance d (Hadsell et al.): d^2 for the same label,
// relu(margin - d)^2 otherwise; and d term / d d.
template <typename T>
TC_HOST_DEVICE inline T contrastive_term(bool same, T d, T margin) {
  const T r = same ? d : relu(margin - d);
  return r * r;
}

template <typename T>
TC_HOST_DEVICE inline T contrastive_weight(bool same, T d, T margin) {
  return same ? T(2) * d : T(-2) * relu(margin - d);
}

// A contrastive form: the term of a pair at distance d and d term / d d, for a pair of the same
// label (positive) or not (negative). Backends take the form as a template argument (a
// compile-time switch, no runtime branch in the pair loop).
template <typename T>
struct HadsellTerms {  // d^2 and relu(margin - d)^2
  T margin;
  TC_HOST_DEVICE inline T term(bool same, T d) const { return contrastive_term(same, d, margin); }
  TC_HOST_DEVICE inline T weight(bool same, T d) const {
    return contrastive_weight(same, d, margin);
  }
};

template <typename T>
struct HingeTerms {  // relu(d - pos_margin) and relu(neg_margin - d): pytorch-metric-learning's
  T pos_margin, neg_margin;
  TC_HOST_DEVICE inline T term(bool same, T d) const {
    return same ? relu(d - pos_margin) : relu(neg_margin - d);
  }
  TC_HOST_DEVICE inline T weight(bool same, T d) const {
    return same ? relu_grad(d - pos_margin) : -relu_grad(neg_margin - d);
  }
};

// ------------------------------------------------------------------------ distance gradient

// Gradient of g * d(a, b) in linear form: d/da = ca * a + cab * b, d/db = cab * a + cb * b.
// d is the pair's distance; sq_* the squared norms; inv_* the cosine inverse norms.
template <typename T>
struct PairGrad {
  T ca, cab, cb;
};

// Gradient self-term scale of the cosine metric: 1 / ||x||^2 above kCosineEps^2, 0 at or
// below (the norm floor is constant there), NaN for NaN. Backends may precompute it per row.
template <typename T>
TC_HOST_DEVICE inline T cosine_self_scale(T sq) {
  const T eps2 = static_cast<T>(kCosineEps * kCosineEps);
  return sq > eps2 ? T(1) / sq : (is_nan(sq) ? sq : T(0));
}

// pair_grad with the cosine self-term scales m_* = cosine_self_scale(sq_*) given (unused by
// the Euclidean metrics).
template <Metric M, typename T>
TC_HOST_DEVICE inline PairGrad<T> pair_grad_scaled(T g, T d, T m_a, T m_b, T inv_a, T inv_b) {
  if constexpr (M == Metric::kCosine) {
    // d = 1 - c, c = <a,b> inv_a inv_b;  dd/da = -inv_a inv_b b + c a / ||a||^2 (||a|| > eps)
    const T c = T(1) - d;
    return {g * c * m_a, -g * inv_a * inv_b, g * c * m_b};
  } else {
    T s;
    if constexpr (M == Metric::kEuclidean) {
      // the gradient of ||a - b|| at a == b is 0; NaN stays NaN
      s = d > T(0) ? g / d : (is_nan(d) ? d : T(0));
    } else {
      s = T(2) * g;
    }
    return {s, -s, s};
  }
}

template <Metric M, typename T>
TC_HOST_DEVICE inline PairGrad<T> pair_grad(T g, T d, T sq_a, T sq_b, T inv_a, T inv_b) {
  if constexpr (M == Metric::kCosine) {
    return pair_grad_scaled<M>(g, d, cosine_self_scale(sq_a), cosine_self_scale(sq_b), inv_a,
                               inv_b);
  } else {
    return pair_grad_scaled<M>(g, d, T(0), T(0), inv_a, inv_b);
  }
}

}  // namespace epi
}  // namespace triplet_cuda
