// Clipped relative-position bias (Shaw et al. 2018 style; posattn.RelativeBias):
// bias = table[h, clamp(pk - pq, -D, D) + D] with a table of shape (num_heads, 2D + 1).
#pragma once
#include "posattn/common.cuh"

namespace posattn {

// Column of the bias table for key position pk seen from query position pq, in [0, 2D].
POSATTN_HD int relative_bias_index(int64_t pq, int64_t pk, int max_distance) {
  int64_t r = pk - pq;
  if (r < -max_distance) r = -max_distance;
  if (r > max_distance) r = max_distance;
  return static_cast<int>(r + max_distance);
}

}  // namespace posattn
