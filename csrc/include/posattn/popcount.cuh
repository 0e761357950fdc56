// Portable population count: __popc/__popcll on the device, SWAR bit tricks on the host (no
// compiler builtins, so every host compiler agrees).
#pragma once
#include "posattn/common.cuh"

namespace posattn {

POSATTN_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  x = (x + (x >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int>((x * 0x01010101u) >> 24);
#endif
}

POSATTN_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return popcount32(static_cast<uint32_t>(x)) + popcount32(static_cast<uint32_t>(x >> 32));
#endif
}

// +-1 code dot product from packed bits (bit set <-> +1): h_i . h_j = nbits - 2 popc(h_i ^ h_j),
// valid when the bits above nbits are zero in both words.
POSATTN_HD int code_dot32(uint32_t a, uint32_t b, int nbits) { return nbits - 2 * popcount32(a ^ b); }

}  // namespace posattn
