// Host test of posattn/alibi.cuh: the worked slope tables of ALGORITHMS.md 5.2 (H = 8, 12, 6) and an
// independent double-precision port of the paper's get_slopes recursion for H = 1..64; the bias.
#include <vector>
#include "check.h"
#include "posattn/alibi.cuh"

static std::vector<double> pow2_slopes(int n) {  // start * start^i with start = 2^(-2^-(log2(n) - 3))
  const double start = std::pow(2.0, -std::pow(2.0, -(std::log2((double)n) - 3.0)));
  std::vector<double> s;
  for (int i = 0; i < n; ++i) s.push_back(start * std::pow(start, i));
  return s;
}
static std::vector<double> get_slopes(int n) {
  const double l = std::log2((double)n);
  if (l == std::floor(l)) return pow2_slopes(n);
  const int p = 1 << (int)std::floor(l);
  std::vector<double> s = pow2_slopes(p);
  std::vector<double> extra = get_slopes(2 * p);
  for (int i = 0; (int)s.size() < n; i += 2) s.push_back(extra[i]);
  return s;
}

int main() {
  for (int h = 0; h < 8; ++h) CHECK(posattn::alibi_slope(h, 8) == std::ldexp(1.0f, -(h + 1)), "H=8 slope %d", h);
  const double h12[] = {-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5};
  for (int h = 0; h < 12; ++h) CHECK(std::fabs(posattn::alibi_slope(h, 12) - std::pow(2.0, h12[h])) < 1e-7, "H=12 slope %d", h);
  const double h6[] = {-2, -4, -6, -8, -1, -3};
  for (int h = 0; h < 6; ++h) CHECK(std::fabs(posattn::alibi_slope(h, 6) - std::pow(2.0, h6[h])) < 1e-7, "H=6 slope %d", h);
  for (int n = 1; n <= 64; ++n) {
    const std::vector<double> ref = get_slopes(n);
    for (int h = 0; h < n; ++h) {
      const float got = posattn::alibi_slope(h, n);
      CHECK(std::fabs(got - ref[h]) <= 1e-6 * ref[h], "H=%d h=%d: %g vs %g", n, h, got, ref[h]);
    }
  }
  CHECK(posattn::alibi_bias(0.5f, 10, 4) == -3.f, "causal bias -m (i - j)");
  CHECK(posattn::alibi_bias(0.5f, 4, 10) == -3.f, "symmetric bias -m |i - j|");
  CHECK(posattn::alibi_bias(0.25f, 7, 7) == 0.f, "diagonal");
  return REPORT();
}
