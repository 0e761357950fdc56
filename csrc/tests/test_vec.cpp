// Host test of posattn/vec.cuh: 16-byte packs hold 8 halves / 4 floats, load16/store16 round-trip
// bit-exactly, and the fp32 conversions round to nearest (exact for representable values).
#include <cstdlib>
#include "check.h"
#include "posattn/vec.cuh"

template <typename T>
static void roundtrip(float tol) {
  constexpr int kN = posattn::Pack16<T>::kN;
  static_assert(sizeof(posattn::Pack16<T>) == 16, "16 bytes");
  alignas(16) T src[kN], dst[kN];
  float vals[kN], back[kN];
  for (int i = 0; i < kN; ++i) { vals[i] = (std::rand() / (float)RAND_MAX - 0.5f) * 8.f; src[i] = posattn::from_float<T>(vals[i]); }
  posattn::store16(dst, posattn::load16(src));
  CHECK(std::memcmp(src, dst, 16) == 0, "load16/store16 bit-exact");
  posattn::load16_float(src, back);
  for (int i = 0; i < kN; ++i) CHECK(std::fabs(back[i] - vals[i]) <= tol * std::fabs(vals[i]) + 1e-30f, "conversion %g -> %g", vals[i], back[i]);
  alignas(16) T again[kN];
  posattn::store16_float(again, back);
  CHECK(std::memcmp(src, again, 16) == 0, "store16_float of exact values is bit-exact");
}

int main() {
  std::srand(11);
  CHECK(posattn::Pack16<__half>::kN == 8 && posattn::Pack16<__nv_bfloat16>::kN == 8 && posattn::Pack16<float>::kN == 4, "lanes");
  for (int t = 0; t < 100; ++t) {
    roundtrip<float>(0.f);
    roundtrip<__half>(1.f / 2048);
    roundtrip<__nv_bfloat16>(1.f / 256);
  }
  CHECK(posattn::to_float(posattn::from_float<__half>(1.f + 1.f / 4096)) == 1.f, "half rounds to nearest even");
  CHECK(posattn::to_float(posattn::from_float<__nv_bfloat16>(3.f)) == 3.f, "bf16 exact");
  alignas(16) float buf[8];
  CHECK(posattn::aligned16(buf) && !posattn::aligned16(buf + 1), "aligned16");
  return REPORT();
}
