// T5 relative-position buckets (Raffel et al., arXiv 1910.10683; semantics of HF transformers'
// T5Attention._relative_position_bucket and mesh-tensorflow), ALGORITHMS.md 5.3.
// rp = pk - pq (key minus query).
//   bidirectional: nb = num_buckets/2, add nb when rp > 0, n = |rp|
//   causal:        nb = num_buckets,   n = max(-rp, 0)  (future keys -> bucket 0)
//   e = nb/2; bucket = n if n < e, else min(nb - 1, e + trunc(log(n/e) / log(max_distance/e) * (nb - e)))
// The log is evaluated in fp32 like HF (float32 tensor divided by a double constant), and the
// exact branch is taken first, so log(0) is never evaluated and no -inf is cast to an integer.
#pragma once
#include "posattn/common.cuh"

namespace posattn {

POSATTN_HD int t5_bucket(int64_t rp, int num_buckets, int max_distance, bool bidirectional) {
  int nb = num_buckets;
  int base = 0;
  int64_t n;
  if (bidirectional) {
    nb = num_buckets / 2;
    if (rp > 0) base = nb;
    n = rp < 0 ? -rp : rp;
  } else {
    n = rp < 0 ? -rp : 0;
  }
  const int e = nb / 2;
  if (n < e) return base + static_cast<int>(n);
  if (nb <= 1 || e <= 0 || max_distance <= e) return base + (nb > 0 ? nb - 1 : 0);
  const float ratio = logf(static_cast<float>(n) / static_cast<float>(e)) /
                      static_cast<float>(log(static_cast<double>(max_distance) / static_cast<double>(e)));
  const float v = ratio * static_cast<float>(nb - e);
  // v >= 0 here (n >= e); cap before the cast so a huge n cannot overflow the integer.
  const int large = v >= static_cast<float>(nb) ? nb : e + static_cast<int>(v);
  return base + (large < nb - 1 ? large : nb - 1);
}

}  // namespace posattn
