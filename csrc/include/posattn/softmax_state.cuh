// Online-softmax state (m, l) and its associative merge (ALGORITHMS.md "Conventions").
// m: running max of the logits, l: sum of exp(s - m). The unnormalised accumulator o~ is merged by
// the caller with the two returned rescale factors. Two flavours of the same merge:
//   merge_state       natural units (exp),  lse = m + log(l)
//   merge_state_base2 base-2 units (exp2),  lse = (m + log2(l)) * ln(2); kernels keep logits
//                     pre-multiplied by log2(e) so that exp2f replaces expf.
#pragma once
#include "posattn/common.cuh"

namespace posattn {

struct SoftmaxState {
  float m;  // running max; -INFINITY for the identity (no key seen)
  float l;  // sum of exp(s - m) (or exp2 in base 2); 0 for the identity
};

namespace detail {
template <bool kBase2>
POSATTN_HD float exp_of(float x) {
  if constexpr (kBase2) return exp2f(x); else return expf(x);
}
}  // namespace detail

// Merge two states; writes the factors that rescale each side's unnormalised o~.
// Never evaluates exp(-inf - (-inf)): an empty side gets factor 0.
template <bool kBase2>
POSATTN_HD SoftmaxState merge_state_impl(SoftmaxState a, SoftmaxState b, float* scale_a, float* scale_b) {
  const float M = a.m > b.m ? a.m : b.m;
  if (M == -INFINITY) {
    *scale_a = 0.f;
    *scale_b = 0.f;
    return SoftmaxState{-INFINITY, 0.f};
  }
  const float fa = a.m == -INFINITY ? 0.f : detail::exp_of<kBase2>(a.m - M);
  const float fb = b.m == -INFINITY ? 0.f : detail::exp_of<kBase2>(b.m - M);
  *scale_a = fa;
  *scale_b = fb;
  return SoftmaxState{M, fa * a.l + fb * b.l};
}

POSATTN_HD SoftmaxState merge_state(SoftmaxState a, SoftmaxState b, float* scale_a, float* scale_b) {
  return merge_state_impl<false>(a, b, scale_a, scale_b);
}
POSATTN_HD SoftmaxState merge_state_base2(SoftmaxState a, SoftmaxState b, float* scale_a, float* scale_b) {
  return merge_state_impl<true>(a, b, scale_a, scale_b);
}

// Natural-log logsumexp of a state: m + log(l); -inf for an empty state.
POSATTN_HD float state_lse(SoftmaxState s) { return s.l > 0.f ? s.m + logf(s.l) : -INFINITY; }
// Natural-log logsumexp of a base-2 state: (m + log2(l)) * ln 2; -inf for an empty state.
POSATTN_HD float state_lse_base2(SoftmaxState s) { return s.l > 0.f ? (s.m + log2f(s.l)) * kLn2 : -INFINITY; }

// Rescale factor of the running accumulator when the running max moves from m_old to m_new
// (base 2); 0 when nothing was accumulated yet (m_old = -inf), never NaN.
POSATTN_HD float rescale_base2(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
}
// exp2(s - m) for one logit against the running max; 0 for a masked logit or an all-masked row.
POSATTN_HD float prob_base2(float s, float m) {
  return (s == -INFINITY || m == -INFINITY) ? 0.f : exp2f(s - m);
}

}  // namespace posattn
