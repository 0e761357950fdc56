// xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer", arXiv 2212.10554; semantics of
// torchscale's xpos_relative_position.py), ALGORITHMS.md 5.4. Interleaved RoPE plus a per-pair decay:
//   zeta_i = (2i + 0.4 d) / (1.4 d),  i = 0 .. d/2 - 1 (d = rotary dim = head_dim)
//   query at position n scaled by zeta_i^((n - c)/B), key at m by zeta_i^(-(m - c)/B)
// so q.k carries zeta_i^((n - m)/B) whatever the centre c, which must be the same for q and k.
#pragma once
#include "posattn/common.cuh"

namespace posattn {

POSATTN_HD float xpos_zeta(int i, int head_dim) {
  return (2.0f * static_cast<float>(i) + 0.4f * static_cast<float>(head_dim)) / (1.4f * static_cast<float>(head_dim));
}

// Decay factor zeta^(+-(pos - center)/scale_base): + for a query, - for a key.
POSATTN_HD float xpos_scale(float zeta, int64_t pos, int64_t center, float scale_base, bool is_key) {
  float expo = static_cast<float>(pos - center) / scale_base;
  if (is_key) expo = -expo;
  return exp2f(log2f(zeta) * expo);
}

}  // namespace posattn
