// ALiBi (Press et al., ICLR 2022, arXiv 2108.12409), slopes as in the authors' get_slopes and the
// bias convention of FlashAttention-2 (ALGORITHMS.md 5.2).
#pragma once
#include "posattn/common.cuh"

namespace posattn {

// Slope of head h (0-based) of num_heads. For H = 2^k: 2^(-8(h+1)/H). Otherwise P = 2^floor(log2 H):
// the P slopes of P heads, then the first H-P even-indexed slopes of 2P heads,
// i.e. 2^(-8(2k+1)/(2P)) for k = h - P.
POSATTN_HD float alibi_slope(int h, int num_heads) {
  int p = 1;
  while (2 * p <= num_heads) p *= 2;
  if (h < p) return exp2f(-8.0f * static_cast<float>(h + 1) / static_cast<float>(p));
  const int k = h - p;
  return exp2f(-8.0f * static_cast<float>(2 * k + 1) / static_cast<float>(2 * p));
}

// Additive bias for a query at position pq and a key at pk: -slope * |pk - pq|. Under a causal mask
// (pk <= pq) this is the paper's -slope * (pq - pk); without one it is the symmetric form of
// FlashAttention-2 (non-causal) and BERT-style models. Added to the already-scaled logit.
POSATTN_HD float alibi_bias(float slope, int64_t pq, int64_t pk) {
  const int64_t d = pk > pq ? pk - pq : pq - pk;
  return -slope * static_cast<float>(d);
}

}  // namespace posattn
