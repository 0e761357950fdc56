// Rotary position embedding helpers (ALGORITHMS.md 5.1; Su et al., arXiv 2104.09864).
// Angles are computed in fp32 from an integer position and an fp32 inverse frequency (never in
// fp16/bf16): angle = float(pos) * inv_freq[i], as HF transformers computes its cos/sin cache.
// Layouts of the first rotary_dim dims of a head (the rest pass through unchanged):
//   interleaved (GPT-J):          pair i = (x[2i], x[2i+1])
//   half-rotated (GPT-NeoX/Llama): pair i = (x[i], x[i + rotary_dim/2])
// Rotation of a pair by angle a: (xa cos a - xb sin a, xa sin a + xb cos a); conj=true rotates by
// -a, which is the backward of the forward rotation (a rotation's transpose is its inverse).
#pragma once
#include "posattn/common.cuh"

namespace posattn {

// Default RoPE inverse frequency theta_i = base^(-2i/rotary_dim), i = 0 .. rotary_dim/2 - 1.
POSATTN_HD float rope_inv_freq(int i, int rotary_dim, float base) {
  return powf(base, -2.0f * static_cast<float>(i) / static_cast<float>(rotary_dim));
}

// Angle in fp32 from an integer position.
POSATTN_HD float rope_angle(int64_t pos, float inv_freq) { return static_cast<float>(pos) * inv_freq; }

// Indices (a, b) of pair i inside a head.
POSATTN_HD void rope_pair(int i, int rotary_dim, bool interleaved, int* a, int* b) {
  if (interleaved) {
    *a = 2 * i;
    *b = 2 * i + 1;
  } else {
    *a = i;
    *b = i + rotary_dim / 2;
  }
}

// Rotate one pair by the angle whose cos/sin are given; conj rotates by the opposite angle.
POSATTN_HD void rope_rotate(float xa, float xb, float c, float s, bool conj, float* ya, float* yb) {
  if (conj) s = -s;
  *ya = xa * c - xb * s;
  *yb = xa * s + xb * c;
}

// cos/sin of an fp32 angle. On the device the angle is reduced to [-pi, pi] in double (exact for
// |angle| < 2^31 to ~1e-11) and then evaluated with __sincosf (abs error ~1e-6 on that range): this
// avoids sincosf's Payne-Hanek slow path, which needs a local-memory stack frame. Host: std::cos/sin.
POSATTN_HD void rope_cos_sin(float angle, float* c, float* s) {
#if defined(__CUDA_ARCH__)
  const double a = static_cast<double>(angle);
  const double two_pi = 6.283185307179586476925286766559;
  const double r = a - rint(a / two_pi) * two_pi;
  __sincosf(static_cast<float>(r), s, c);
#else
  *c = std::cos(angle);
  *s = std::sin(angle);
#endif
}

}  // namespace posattn
