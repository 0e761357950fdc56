// Host test of posattn/rotary.cuh against complex multiplication in double: rotation of a pair by
// angle a is (xa + i xb) * e^{ia}; conj undoes it; the two layouts pick the documented pairs;
// inv_freq matches base^(-2i/r) in double; angles are fp32 products of position and inv_freq.
#include <complex>
#include <cstdlib>
#include "check.h"
#include "posattn/rotary.cuh"

int main() {
  std::srand(7);
  for (int trial = 0; trial < 500; ++trial) {
    const float xa = std::rand() / (float)RAND_MAX * 4.f - 2.f, xb = std::rand() / (float)RAND_MAX * 4.f - 2.f;
    const int64_t pos = std::rand() % 4096;
    const int r = 2 * (1 + std::rand() % 64);
    const int i = std::rand() % (r / 2);
    const float inv = posattn::rope_inv_freq(i, r, 10000.f);
    const double inv_ref = std::pow(10000.0, -2.0 * i / r);
    CHECK(std::fabs(inv - inv_ref) <= 1e-6 * inv_ref, "inv_freq(%d, %d) %g vs %g", i, r, inv, inv_ref);
    const float ang = posattn::rope_angle(pos, inv);
    CHECK(ang == (float)pos * inv, "angle is the fp32 product");
    float c, s;
    posattn::rope_cos_sin(ang, &c, &s);
    const std::complex<double> z = std::complex<double>(xa, xb) * std::polar(1.0, (double)ang);
    float ya, yb;
    posattn::rope_rotate(xa, xb, c, s, false, &ya, &yb);
    CHECK(std::fabs(ya - z.real()) < 1e-5 && std::fabs(yb - z.imag()) < 1e-5, "rotate (%g,%g) vs (%g,%g)", ya, yb, z.real(), z.imag());
    float ba, bb;
    posattn::rope_rotate(ya, yb, c, s, true, &ba, &bb);
    CHECK(std::fabs(ba - xa) < 1e-5 && std::fabs(bb - xb) < 1e-5, "conj undoes the rotation");
    CHECK(std::fabs(ya * ya + yb * yb - (xa * xa + xb * xb)) < 1e-4, "norm preserved");
  }
  int a, b;
  posattn::rope_pair(3, 16, true, &a, &b);
  CHECK(a == 6 && b == 7, "interleaved pair 3 -> (6, 7), got (%d, %d)", a, b);
  posattn::rope_pair(3, 16, false, &a, &b);
  CHECK(a == 3 && b == 11, "half-rotated pair 3 of rotary_dim 16 -> (3, 11), got (%d, %d)", a, b);
  return REPORT();
}
