// apply_rotary: rotate the first rotary_dim dims of every head of x by its position's angle
// (ALGORITHMS.md 5.1), out-of-place or in place, forward (conj=false) or backward (conj=true).
//
// Shapes and strides (elements; unit last-dim stride):
//   x, out  (batch, seqlen, num_heads, head_dim)    strides x_stride_{b,s,h}, out_stride_{b,s,h}
//   cos,sin (seqlen_ro, rotary_dim/2) fp32           row strides cos_stride_s, sin_stride_s
//   position_ids (batch or 1, seqlen) int32 or null  -> position = s + seqlen_offsets[b]
// Positions outside [0, seqlen_ro) are left unrotated (cos 1, sin 0), as in FlashAttention's kernel.
//
// Two kernels: a vectorised one where every thread moves 16 bytes (one Pack16 of each half of a
// NeoX pair, or of interleaved pairs, or of pass-through dims) when every base pointer and stride
// allows 16-byte accesses, and a scalar one (one thread per pair or pass-through element) otherwise.
#include "posattn/dispatch.h"
#include "posattn/rotary.cuh"
#include "posattn/vec.cuh"

namespace posattn {
namespace {

constexpr int kThreads = 256;

struct RowPtrs {
  const float* cos;
  const float* sin;
  bool rotate;
};

__device__ __forceinline__ RowPtrs row_tables(const RotaryParams& p, int b, int s) {
  int64_t pos;
  if (p.position_ids != nullptr) {
    pos = p.position_ids[b * p.pos_stride_b + s * p.pos_stride_s];
  } else {
    pos = s + (p.seqlen_offsets != nullptr ? p.seqlen_offsets[b] : 0);
  }
  RowPtrs r;
  r.rotate = pos >= 0 && pos < p.seqlen_ro;
  const int64_t row = r.rotate ? pos : 0;
  r.cos = p.cos + row * p.cos_stride_s;
  r.sin = p.sin + row * p.sin_stride_s;
  return r;
}

// One work item = 16 bytes of output. Per row (b, s, h): n_rot items rotate, n_pass copy.
template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_vec_kernel(__grid_constant__ const RotaryParams p) {
  constexpr int kN = Pack16<T>::kN;
  const int half = p.rotary_dim / 2;
  // NeoX: an item covers kN pairs (kN dims of each half); interleaved: kN/2 pairs.
  const int n_rot = p.interleaved ? p.rotary_dim / kN : half / kN;
  const bool in_place = p.out == p.x;
  const int n_pass = in_place ? 0 : (p.head_dim - p.rotary_dim) / kN;
  const int per_row = n_rot + n_pass;
  const int64_t total = static_cast<int64_t>(p.batch_size) * p.seqlen * p.num_heads * per_row;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int c = static_cast<int>(item % per_row);
    int64_t row = item / per_row;
    const int h = static_cast<int>(row % p.num_heads);
    row /= p.num_heads;
    const int s = static_cast<int>(row % p.seqlen);
    const int b = static_cast<int>(row / p.seqlen);
    const T* xr = x + b * p.x_stride_b + s * p.x_stride_s + h * p.x_stride_h;
    T* orow = out + b * p.out_stride_b + s * p.out_stride_s + h * p.out_stride_h;
    if (c >= n_rot) {  // pass-through dims (out of place only)
      const int d0 = p.rotary_dim + (c - n_rot) * kN;
      store16(orow + d0, load16(xr + d0));
      continue;
    }
    const RowPtrs t = row_tables(p, b, s);
    if (p.interleaved) {
      const int d0 = c * kN;  // dims d0 .. d0+kN-1 hold pairs d0/2 ..
      float xv[kN], yv[kN];
      load16_float(xr + d0, xv);
#pragma unroll
      for (int j = 0; j < kN / 2; ++j) {
        const int i = d0 / 2 + j;
        const float cs = t.rotate ? t.cos[i] : 1.f;
        const float sn = t.rotate ? t.sin[i] : 0.f;
        rope_rotate(xv[2 * j], xv[2 * j + 1], cs, sn, p.conj, &yv[2 * j], &yv[2 * j + 1]);
      }
      store16_float(orow + d0, yv);
    } else {
      const int i0 = c * kN;  // pairs i0 .. i0+kN-1: dims i0.. and half+i0..
      float xa[kN], xb[kN], ya[kN], yb[kN];
      load16_float(xr + i0, xa);
      load16_float(xr + half + i0, xb);
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float cs = t.rotate ? t.cos[i0 + j] : 1.f;
        const float sn = t.rotate ? t.sin[i0 + j] : 0.f;
        rope_rotate(xa[j], xb[j], cs, sn, p.conj, &ya[j], &yb[j]);
      }
      store16_float(orow + i0, ya);
      store16_float(orow + half + i0, yb);
    }
  }
}

// Scalar fallback: one item per pair (first rotary_dim/2 items of a row) or pass-through element.
template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_scalar_kernel(__grid_constant__ const RotaryParams p) {
  const int half = p.rotary_dim / 2;
  const bool in_place = p.out == p.x;
  const int n_pass = in_place ? 0 : p.head_dim - p.rotary_dim;
  const int per_row = half + n_pass;
  const int64_t total = static_cast<int64_t>(p.batch_size) * p.seqlen * p.num_heads * per_row;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int c = static_cast<int>(item % per_row);
    int64_t row = item / per_row;
    const int h = static_cast<int>(row % p.num_heads);
    row /= p.num_heads;
    const int s = static_cast<int>(row % p.seqlen);
    const int b = static_cast<int>(row / p.seqlen);
    const T* xr = x + b * p.x_stride_b + s * p.x_stride_s + h * p.x_stride_h;
    T* orow = out + b * p.out_stride_b + s * p.out_stride_s + h * p.out_stride_h;
    if (c >= half) {
      const int d = p.rotary_dim + (c - half);
      orow[d] = xr[d];
      continue;
    }
    const RowPtrs t = row_tables(p, b, s);
    int ia, ib;
    rope_pair(c, p.rotary_dim, p.interleaved, &ia, &ib);
    const float cs = t.rotate ? t.cos[c] : 1.f;
    const float sn = t.rotate ? t.sin[c] : 0.f;
    float ya, yb;
    rope_rotate(to_float(xr[ia]), to_float(xr[ib]), cs, sn, p.conj, &ya, &yb);
    orow[ia] = from_float<T>(ya);
    orow[ib] = from_float<T>(yb);
  }
}

template <typename T>
bool can_vectorise(const RotaryParams& p) {
  constexpr int kN = Pack16<T>::kN;
  const int half = p.rotary_dim / 2;
  if (!aligned16(p.x) || !aligned16(p.out)) return false;
  const int64_t strides[] = {p.x_stride_b, p.x_stride_s, p.x_stride_h, p.out_stride_b, p.out_stride_s, p.out_stride_h};
  for (int64_t st : strides) if (st % kN != 0) return false;
  if (p.interleaved ? (p.rotary_dim % kN != 0) : (half % kN != 0)) return false;
  return (p.head_dim - p.rotary_dim) % kN == 0;
}

template <typename T>
std::string run(const RotaryParams& p, cudaStream_t stream) {
  const bool vec = can_vectorise<T>(p);
  const int kN = vec ? Pack16<T>::kN : 1;
  const int items_per_row = vec ? (p.interleaved ? p.rotary_dim : p.rotary_dim / 2) / kN + (p.head_dim - p.rotary_dim) / kN
                                : p.rotary_dim / 2 + (p.head_dim - p.rotary_dim);
  const int64_t total = static_cast<int64_t>(p.batch_size) * p.seqlen * p.num_heads * items_per_row;
  if (total == 0) return std::string();
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 * 16 ? blocks : 65536 * 16);
  if (vec) {
    rotary_vec_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  } else {
    rotary_scalar_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  }
  return launch_error(vec ? "rotary_vec_kernel" : "rotary_scalar_kernel");
}

}  // namespace

std::string launch_rotary(const RotaryParams& p, int64_t stream) {
  if (p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim || p.rotary_dim <= 0) {
    return "apply_rotary: rotary_dim must be even and in (0, head_dim], got " + std::to_string(p.rotary_dim) +
           " with head_dim " + std::to_string(p.head_dim);
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return POSATTN_DTYPE_SWITCH_ALL(p.dtype, T, [&] { return run<T>(p, s); });
}

}  // namespace posattn
