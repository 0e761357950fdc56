// Host test of posattn/relative_bias.cuh: index = clamp(pk - pq, -D, D) + D, in [0, 2D].
#include "check.h"
#include "posattn/relative_bias.cuh"

int main() {
  for (int D : {0, 1, 3, 16}) {
    for (int pq = -5; pq < 40; ++pq) {
      for (int pk = -5; pk < 40; ++pk) {
        int r = pk - pq;
        r = r < -D ? -D : (r > D ? D : r);
        const int got = posattn::relative_bias_index(pq, pk, D);
        CHECK(got == r + D && got >= 0 && got <= 2 * D, "D=%d pq=%d pk=%d: %d", D, pq, pk, got);
      }
    }
  }
  CHECK(posattn::relative_bias_index(0, 1000000000000LL, 8) == 16, "large distance clamps without overflow");
  return REPORT();
}
