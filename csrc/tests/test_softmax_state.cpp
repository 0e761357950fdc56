// Host test of posattn/softmax_state.cuh: the merge is associative, has (-inf, 0) as identity and
// reproduces a direct logsumexp.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "posattn/softmax_state.cuh"

using posattn::SoftmaxState;

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { std::printf("FAIL %s:%d: ", __FILE__, __LINE__); std::printf(__VA_ARGS__); std::printf("\n"); ++failures; } } while (0)

static SoftmaxState state_of(const std::vector<float>& s, size_t lo, size_t hi) {
  SoftmaxState st{-INFINITY, 0.f};
  for (size_t i = lo; i < hi; ++i) {
    float fa, fb;
    st = posattn::merge_state(st, SoftmaxState{s[i], 1.f}, &fa, &fb);
  }
  return st;
}

int main() {
  std::srand(1234);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + std::rand() % 64;
    std::vector<float> s(n);
    double mx = -INFINITY;
    for (auto& x : s) { x = (std::rand() / (float)RAND_MAX - 0.5f) * 40.f; mx = std::max(mx, (double)x); }
    double sum = 0;
    for (auto x : s) sum += std::exp((double)x - mx);
    const double lse = mx + std::log(sum);
    const size_t cut = std::rand() % (n + 1);
    float fa, fb;
    SoftmaxState merged = posattn::merge_state(state_of(s, 0, cut), state_of(s, cut, n), &fa, &fb);
    CHECK(std::fabs(posattn::state_lse(merged) - lse) < 1e-4 * std::max(1.0, std::fabs(lse)),
          "lse %f vs %f", posattn::state_lse(merged), lse);
  }
  // base-2 flavour: logits in log2 units, lse returned in natural log.
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + std::rand() % 64;
    std::vector<float> s(n);
    for (auto& x : s) x = (std::rand() / (float)RAND_MAX - 0.5f) * 40.f;
    double mx = -INFINITY, sum = 0;
    for (auto x : s) mx = std::max(mx, (double)x);
    for (auto x : s) sum += std::exp((double)x - mx);
    const double lse = mx + std::log(sum);
    SoftmaxState st{-INFINITY, 0.f};
    for (auto x : s) {
      float a, b;
      st = posattn::merge_state_base2(st, SoftmaxState{x * posattn::kLog2e, 1.f}, &a, &b);
    }
    CHECK(std::fabs(posattn::state_lse_base2(st) - lse) < 1e-4 * std::max(1.0, std::fabs(lse)), "base2 lse");
  }
  CHECK(posattn::rescale_base2(-INFINITY, -INFINITY) == 0.f && posattn::prob_base2(-INFINITY, -INFINITY) == 0.f,
        "all-masked rows give 0, never NaN");
  float fa, fb;
  SoftmaxState empty{-INFINITY, 0.f};
  SoftmaxState e2 = posattn::merge_state(empty, empty, &fa, &fb);
  CHECK(e2.m == -INFINITY && e2.l == 0.f && fa == 0.f && fb == 0.f, "empty merge");
  CHECK(std::isinf(posattn::state_lse(e2)) && posattn::state_lse(e2) < 0, "empty lse is -inf");
  SoftmaxState one{2.f, 3.f};
  SoftmaxState r = posattn::merge_state(one, empty, &fa, &fb);
  CHECK(r.m == 2.f && r.l == 3.f && fa == 1.f && fb == 0.f, "identity");
  std::printf("%s: %d failures\n", __FILE__, failures);
  return failures ? 1 : 0;
}
