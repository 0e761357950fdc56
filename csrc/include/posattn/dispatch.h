// Host-side dispatch helpers for the .cu launchers (FlashAttention-style switch lambdas).
// Each launcher returns std::string: empty on success, else the error that bindings.cpp raises as
// RuntimeError. The default branch of a switch names what is compiled.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <string>
#include "posattn/params.h"

// DTYPE_SWITCH(dtype, T, "float16, bfloat16", [&] { ... return std::string(); }) for half types;
// the *_ALL variant adds float32.
#define POSATTN_DTYPE_SWITCH_HALF(DT, T, ...)                                               \
  [&]() -> std::string {                                                                    \
    switch (DT) {                                                                           \
      case ::posattn::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }          \
      case ::posattn::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }  \
      default: return ::posattn::unsupported_dtype(DT, "float16, bfloat16");                \
    }                                                                                       \
  }()

#define POSATTN_DTYPE_SWITCH_ALL(DT, T, ...)                                                \
  [&]() -> std::string {                                                                    \
    switch (DT) {                                                                           \
      case ::posattn::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }          \
      case ::posattn::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }  \
      case ::posattn::DType::kFloat32: { using T = float; return __VA_ARGS__(); }           \
      default: return ::posattn::unsupported_dtype(DT, "float16, bfloat16, float32");       \
    }                                                                                       \
  }()

#define POSATTN_BOOL_SWITCH(COND, NAME, ...)                   \
  [&]() -> std::string {                                       \
    if (COND) { constexpr static bool NAME = true; return __VA_ARGS__(); }  \
    else { constexpr static bool NAME = false; return __VA_ARGS__(); }      \
  }()

namespace posattn {

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline std::string unsupported_dtype(DType dt, const char* compiled) {
  return std::string("unsupported dtype ") + dtype_name(dt) + "; compiled: " + compiled;
}

inline std::string unsupported_head_dim(int head_dim, const char* compiled) {
  return "unsupported head_dim " + std::to_string(head_dim) + "; compiled: " + compiled;
}

// Error of the last launch (or "" when it went well), prefixed with the kernel's name.
inline std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return std::string();
  return std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err);
}

inline std::string cuda_error(const char* what, cudaError_t err) {
  if (err == cudaSuccess) return std::string();
  cudaGetLastError();
  return std::string(what) + ": " + cudaGetErrorString(err);
}

}  // namespace posattn
