// 16-byte vector load/store helpers for half / bfloat16 / float, and fp32 conversions.
// Pack16<T> holds 16 bytes (8 halves or 4 floats) and is moved with one 128-bit access on the
// device (ld.global.v4 / st.global.v4); the pointer must be 16-byte aligned (callers check).
#pragma once
#include <cstring>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "posattn/common.cuh"

namespace posattn {

POSATTN_HD float to_float(float x) { return x; }
POSATTN_HD float to_float(__half x) { return __half2float(x); }
POSATTN_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> POSATTN_HD T from_float(float x);
template <> POSATTN_HD float from_float<float>(float x) { return x; }
template <> POSATTN_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> POSATTN_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};

template <typename T>
POSATTN_HD Pack16<T> load16(const T* p) {
  Pack16<T> r;
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
#else
  std::memcpy(&r, p, 16);
#endif
  return r;
}

template <typename T>
POSATTN_HD void store16(T* p, const Pack16<T>& r) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
#else
  std::memcpy(p, &r, 16);
#endif
}

// Load 16 bytes and widen to fp32 (kN values).
template <typename T>
POSATTN_HD void load16_float(const T* p, float* out) {
  const Pack16<T> r = load16(p);
#pragma unroll
  for (int i = 0; i < Pack16<T>::kN; ++i) out[i] = to_float(r.v[i]);
}

// Round kN fp32 values to T (round-to-nearest-even) and store 16 bytes.
template <typename T>
POSATTN_HD void store16_float(T* p, const float* in) {
  Pack16<T> r;
#pragma unroll
  for (int i = 0; i < Pack16<T>::kN; ++i) r.v[i] = from_float<T>(in[i]);
  store16(p, r);
}

// True when a pointer value is 16-byte aligned.
POSATTN_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace posattn
