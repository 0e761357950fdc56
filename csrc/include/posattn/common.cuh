// Shared definitions for posattn device code. Compiles as CUDA (nvcc) and as plain C++ (host
// tests): every helper here is __host__ __device__ and uses no CUDA-only intrinsics unguarded.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define POSATTN_HD __host__ __device__ __forceinline__
#else
#define POSATTN_HD inline
#endif

namespace posattn {

// log2(e): kernels work in base 2 (exp2f) with log2(e) folded into the softmax scale.
constexpr float kLog2e = 1.4426950408889634f;
// ln(2): turns a base-2 log-sum-exp back into the natural-log lse that the API returns.
constexpr float kLn2 = 0.6931471805599453f;

// Integer ceil-division for sizes (grids, tile counts).
template <typename I>
POSATTN_HD constexpr I ceil_div(I a, I b) { return (a + b - 1) / b; }

// Compile-time sanity: kernels assume 32-lane warps.
constexpr int kWarpSize = 32;

}  // namespace posattn
