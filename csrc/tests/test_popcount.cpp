// Host test of posattn/popcount.cuh: popcount against a bit loop, and the +-1 code identity
// h_i . h_j = b - 2 popc(h_i ^ h_j) against the explicit dot product.
#include <cstdlib>
#include "check.h"
#include "posattn/popcount.cuh"

static int bits_loop(uint64_t x) { int n = 0; for (int i = 0; i < 64; ++i) n += (x >> i) & 1; return n; }

int main() {
  std::srand(3);
  const uint64_t edge[] = {0, 1, 0xffffffffull, 0x80000000ull, 0xffffffffffffffffull, 0x8000000000000001ull};
  for (uint64_t x : edge) {
    CHECK(posattn::popcount64(x) == bits_loop(x), "popcount64 edge");
    CHECK(posattn::popcount32((uint32_t)x) == bits_loop((uint32_t)x), "popcount32 edge");
  }
  for (int t = 0; t < 10000; ++t) {
    const uint64_t x = ((uint64_t)std::rand() << 33) ^ ((uint64_t)std::rand() << 11) ^ (uint64_t)std::rand();
    CHECK(posattn::popcount64(x) == bits_loop(x), "popcount64 %llx", (unsigned long long)x);
    const int nbits = 1 + std::rand() % 32;
    const uint32_t mask = nbits == 32 ? 0xffffffffu : ((1u << nbits) - 1u);
    const uint32_t a = (uint32_t)x & mask, b = (uint32_t)(x >> 32) & mask;
    int dot = 0;
    for (int k = 0; k < nbits; ++k) dot += (((a >> k) & 1) ? 1 : -1) * (((b >> k) & 1) ? 1 : -1);
    CHECK(posattn::code_dot32(a, b, nbits) == dot, "code dot nbits=%d", nbits);
  }
  return REPORT();
}
