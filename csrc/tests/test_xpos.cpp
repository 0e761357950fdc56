// Host test of posattn/xpos.cuh: zeta_i = (2i + 0.4d)/(1.4d) (d = 64 runs 0.286 .. 0.978), and the
// product of the query and key factors is zeta^((n - m)/B) whatever the centre c.
#include "check.h"
#include "posattn/xpos.cuh"

int main() {
  CHECK(std::fabs(posattn::xpos_zeta(0, 64) - 0.4 / 1.4) < 1e-6, "zeta_0 = 0.286");
  CHECK(std::fabs(posattn::xpos_zeta(31, 64) - (62 + 25.6) / 89.6) < 1e-6, "zeta_31 = 0.978");
  for (int d : {32, 64, 128}) {
    for (int i = 0; i < d / 2; ++i) {
      const double ref = (2.0 * i + 0.4 * d) / (1.4 * d);
      CHECK(std::fabs(posattn::xpos_zeta(i, d) - ref) < 1e-6, "zeta(%d, %d)", i, d);
      for (int64_t n : {0, 5, 300}) {
        for (int64_t m : {0, 3, 299}) {
          const double want = std::pow(ref, (double)(n - m) / 512.0);
          for (int64_t c : {-150, 0, 77}) {
            const double got = (double)posattn::xpos_scale((float)ref, n, c, 512.f, false) *
                               posattn::xpos_scale((float)ref, m, c, 512.f, true);
            CHECK(std::fabs(got - want) < 2e-5 * want, "d=%d i=%d n=%ld m=%ld c=%ld: %g vs %g", d, i, (long)n, (long)m, (long)c, got, want);
          }
        }
      }
    }
  }
  return REPORT();
}
