// Online-softmax state (m, l) and its associative merge (ALGORITHMS.md "Conventions").
// m: running max of the logits (natural units), l: sum of exp(s - m). The unnormalised
// accumulator o~ is merged by the caller with the two returned rescale factors.
#pragma once
#include "posattn/common.cuh"

namespace posattn {

struct SoftmaxState {
  float m;  // running max; -INFINITY for the identity (no key seen)
  float l;  // sum of exp(s - m); 0 for the identity
};

// Merge two states; writes the factors that rescale each side's unnormalised o~.
// Never evaluates exp(-inf - (-inf)): an empty side gets factor 0.
POSATTN_HD SoftmaxState merge_state(SoftmaxState a, SoftmaxState b, float* scale_a, float* scale_b) {
  const float M = a.m > b.m ? a.m : b.m;
  if (M == -INFINITY) {
    *scale_a = 0.f;
    *scale_b = 0.f;
    return SoftmaxState{-INFINITY, 0.f};
  }
  const float fa = a.m == -INFINITY ? 0.f : expf(a.m - M);
  const float fb = b.m == -INFINITY ? 0.f : expf(b.m - M);
  *scale_a = fa;
  *scale_b = fb;
  return SoftmaxState{M, fa * a.l + fb * b.l};
}

// Natural-log logsumexp of a state: m + log(l); -inf for an empty state.
POSATTN_HD float state_lse(SoftmaxState s) { return s.l > 0.f ? s.m + logf(s.l) : -INFINITY; }

}  // namespace posattn
