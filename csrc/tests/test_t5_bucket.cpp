// Host test of posattn/t5_bucket.cuh: the worked values of ALGORITHMS.md 5.3 (32 buckets, max 128)
// and an independent double-precision formula over rp in [-2000, 2000], where the two may differ
// only when the double value sits within 1e-4 of an integer (fp32 vs fp64 log).
#include "check.h"
#include "posattn/t5_bucket.cuh"

static int ref_bucket(long rp, int num_buckets, int max_distance, bool bidir, bool* near_edge) {
  int nb = num_buckets, base = 0;
  long n;
  if (bidir) { nb /= 2; base = rp > 0 ? nb : 0; n = rp < 0 ? -rp : rp; } else { n = rp < 0 ? -rp : 0; }
  const int e = nb / 2;
  *near_edge = false;
  if (n < e) return base + (int)n;
  const double v = std::log((double)n / e) / std::log((double)max_distance / e) * (nb - e);
  *near_edge = std::fabs(v - std::round(v)) < 1e-4;
  const long large = e + (long)v;
  return base + (int)(large < nb - 1 ? large : nb - 1);
}

int main() {
  const int bi_rp[] = {0, 1, -1, -7, 7, -8, -20, -127, 200};
  const int bi_b[] = {0, 17, 1, 7, 23, 8, 10, 15, 31};
  for (int i = 0; i < 9; ++i) {
    const int got = posattn::t5_bucket(bi_rp[i], 32, 128, true);
    CHECK(got == bi_b[i], "bidirectional rp %d: %d, want %d", bi_rp[i], got, bi_b[i]);
  }
  const int ca_rp[] = {5, -5, -15, -16, -31, -127, -1000};
  const int ca_b[] = {0, 5, 15, 16, 21, 31, 31};
  for (int i = 0; i < 7; ++i) {
    const int got = posattn::t5_bucket(ca_rp[i], 32, 128, false);
    CHECK(got == ca_b[i], "causal rp %d: %d, want %d", ca_rp[i], got, ca_b[i]);
  }
  for (int nbk : {8, 32, 64}) {
    for (int md : {16, 128, 512}) {
      for (bool bidir : {true, false}) {
        const int e = (bidir ? nbk / 2 : nbk) / 2;
        if (md <= e) {  // HF divides by log(max_distance / e) <= 0 here; we saturate to the last bucket
          CHECK(posattn::t5_bucket(-5 * (long)md, nbk, md, bidir) == (bidir ? nbk / 2 : nbk) - 1, "degenerate saturates");
          continue;
        }
        for (long rp = -2000; rp <= 2000; ++rp) {
          bool edge;
          const int want = ref_bucket(rp, nbk, md, bidir, &edge);
          const int got = posattn::t5_bucket(rp, nbk, md, bidir);
          CHECK(got == want || edge, "nb=%d md=%d bidir=%d rp=%ld: %d vs %d", nbk, md, bidir, rp, got, want);
          CHECK(got >= 0 && got < nbk, "bucket in range");
        }
      }
    }
  }
  CHECK(posattn::t5_bucket(-(1LL << 40), 32, 128, true) == 15, "huge distance saturates (bidirectional, past)");
  CHECK(posattn::t5_bucket(1LL << 40, 32, 128, true) == 31, "huge distance saturates (bidirectional, future)");
  CHECK(posattn::t5_bucket(-(1LL << 40), 32, 128, false) == 31, "huge distance saturates (causal)");
  return REPORT();
}
