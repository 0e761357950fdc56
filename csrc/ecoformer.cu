// EcoFormer attention on packed binary codes (Liu et al., NeurIPS 2022, arXiv 2209.09004;
// semantics of ziplab/EcoFormer), ALGORITHMS.md 4. Codes h in {-1,+1}^b are packed LSB-first into
// 32-bit words: bit k of word w set <-> h[32w + k] = +1 (bits above nbits are 0 in every code).
// Weights w_ij = h_i.h_j + (b + 1) = (b - 2 popc(h_i ^ h_j)) + b + 1 > 0.
//
//   pairwise (quadratic) form: out_i = sum_j w_ij v_j / sum_j w_ij          (XOR + popcount)
//   linear form: M = sum_j h_j v_j^T (b x dv) and z = sum_j h_j, accumulated by sign selection
//                M_k = 2 sum_{j: bit k = 1} v_j - sum_j v_j (additions only), then
//                out_i = [h_i^T M + (b+1) S] / [h_i^T z + N (b+1)],
//                S = sum_j v_j (consistent form, default) or v_i (repo_form, as ziplab/EcoFormer).
// Both forms give the same result for the consistent form. Keys j >= kv_lens[b] are padding.
// Layouts (elements, unit last stride): codes (batch*heads, seq, words) uint32; v (batch*heads,
// seqlen_k, dv); out (batch*heads, seqlen_q, dv). Accumulation in fp32.
#include "posattn/dispatch.h"
#include "posattn/popcount.cuh"
#include "posattn/vec.cuh"

namespace posattn {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxDv = 256;
constexpr int kLinearRows = 32;  // query rows per CTA of the linear apply kernel

__device__ __forceinline__ int kv_len(const EcoParams& p, int bh) {
  return p.kv_lens != nullptr ? min(p.kv_lens[bh / p.num_heads], p.seqlen_k) : p.seqlen_k;
}

template <typename T, int kWordsPerCode>
__global__ void __launch_bounds__(kThreads) eco_pairwise_kernel(__grid_constant__ const EcoParams p) {
  constexpr int kCols = kMaxDv / kWarpSize;
  const int bh = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int i = blockIdx.x * kWarps + warp;
  if (i >= p.seqlen_q) return;
  const int len = kv_len(p, bh);
  uint32_t qw[kWordsPerCode];
#pragma unroll
  for (int w = 0; w < kWordsPerCode; ++w) qw[w] = p.q_codes[bh * p.q_stride_bh + i * p.q_stride_s + w];
  const T* v = static_cast<const T*>(p.v) + bh * p.v_stride_bh;
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  float den = 0.f;  // sum of weights (exact integers, < 2^24 for seqlen_k * (2b+1) < 2^24)
  for (int j0 = 0; j0 < len; j0 += kWarpSize) {
    const int j = j0 + lane;
    int wgt = 0;
    if (j < len) {
      int ham = 0;
#pragma unroll
      for (int w = 0; w < kWordsPerCode; ++w) ham += popcount32(qw[w] ^ p.k_codes[bh * p.k_stride_bh + j * p.k_stride_s + w]);
      wgt = (p.nbits - 2 * ham) + p.nbits + 1;
    }
    den += static_cast<float>(wgt);
    const int n = min(kWarpSize, len - j0);
    for (int jj = 0; jj < n; ++jj) {
      const float wj = static_cast<float>(__shfl_sync(0xffffffffu, wgt, jj));
      const T* vr = v + (j0 + jj) * p.v_stride_s;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + c * kWarpSize;
        if (d < p.head_dim_v) acc[c] = fmaf(wj, to_float(vr[d]), acc[c]);
      }
    }
  }
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) den += __shfl_xor_sync(0xffffffffu, den, o);
  const float inv = den > 0.f ? 1.f / den : 0.f;  // no key (len 0): out 0
  T* out = static_cast<T*>(p.out) + bh * p.out_stride_bh + i * p.out_stride_s;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int d = lane + c * kWarpSize;
    if (d < p.head_dim_v) out[d] = from_float<T>(acc[c] * inv);
  }
}

// Linear form, step 1: thread = column d of [v | 1] (d == head_dim_v is the all-ones column, whose
// sums are z_k and N). pos_k = sum over keys with bit k set; M_k = 2 pos_k - sum_j.
template <typename T, int kWordsPerCode>
__global__ void __launch_bounds__(kThreads) eco_linear_reduce_kernel(__grid_constant__ const EcoParams p) {
  constexpr int kBits = 32 * kWordsPerCode;
  const int bh = blockIdx.y;
  const int d = blockIdx.x * kThreads + threadIdx.x;
  if (d > p.head_dim_v) return;
  const int len = kv_len(p, bh);
  const T* v = static_cast<const T*>(p.v) + bh * p.v_stride_bh;
  float pos[kBits];
#pragma unroll
  for (int k = 0; k < kBits; ++k) pos[k] = 0.f;
  float total = 0.f;
  for (int j = 0; j < len; ++j) {
    const float val = d < p.head_dim_v ? to_float(v[j * p.v_stride_s + d]) : 1.f;
    total += val;
#pragma unroll
    for (int w = 0; w < kWordsPerCode; ++w) {
      const uint32_t word = p.k_codes[bh * p.k_stride_bh + j * p.k_stride_s + w];
#pragma unroll
      for (int k = 0; k < 32; ++k) pos[32 * w + k] += ((word >> k) & 1u) ? val : 0.f;
    }
  }
  const int cols = p.head_dim_v + 1;
#pragma unroll
  for (int k = 0; k < kBits; ++k) {
    if (k < p.nbits) p.ws_m[(static_cast<int64_t>(bh) * p.nbits + k) * cols + d] = 2.f * pos[k] - total;
  }
  p.ws_s[static_cast<int64_t>(bh) * cols + d] = total;
}

// Linear form, step 2: out_i = [sum_k +-M_k + (b+1) S] / [sum_k +-z_k + N (b+1)], sign = bit of h_i.
template <typename T, int kWordsPerCode>
__global__ void __launch_bounds__(kThreads) eco_linear_apply_kernel(__grid_constant__ const EcoParams p) {
  constexpr int kBits = 32 * kWordsPerCode;
  __shared__ float z[kBits];
  __shared__ float den[kLinearRows];
  const int bh = blockIdx.y;
  const int row0 = blockIdx.x * kLinearRows;
  const int rows = min(kLinearRows, p.seqlen_q - row0);
  const int cols = p.head_dim_v + 1;
  const float* wm = p.ws_m + static_cast<int64_t>(bh) * p.nbits * cols;
  const float* wsum = p.ws_s + static_cast<int64_t>(bh) * cols;
  const float shift = static_cast<float>(p.nbits + 1);
  if (threadIdx.x < kBits) z[threadIdx.x] = threadIdx.x < p.nbits ? wm[threadIdx.x * cols + p.head_dim_v] : 0.f;
  __syncthreads();
  if (threadIdx.x < rows) {
    const uint32_t* qc = p.q_codes + bh * p.q_stride_bh + (row0 + threadIdx.x) * p.q_stride_s;
    float acc = shift * wsum[p.head_dim_v];  // N (b+1)
    for (int k = 0; k < p.nbits; ++k) acc += ((qc[k / 32] >> (k % 32)) & 1u) ? z[k] : -z[k];
    den[threadIdx.x] = acc;
  }
  __syncthreads();
  const T* v = static_cast<const T*>(p.v) + bh * p.v_stride_bh;
  T* out = static_cast<T*>(p.out) + bh * p.out_stride_bh;
  for (int d = threadIdx.x; d < p.head_dim_v; d += kThreads) {
    float mk[kBits];
#pragma unroll
    for (int k = 0; k < kBits; ++k) mk[k] = k < p.nbits ? wm[k * cols + d] : 0.f;
    const float s_all = wsum[d];
    for (int r = 0; r < rows; ++r) {
      const int i = row0 + r;
      const uint32_t* qc = p.q_codes + bh * p.q_stride_bh + i * p.q_stride_s;
      float num = shift * (p.repo_form ? to_float(v[i * p.v_stride_s + d]) : s_all);
#pragma unroll
      for (int w = 0; w < kWordsPerCode; ++w) {
        const uint32_t word = qc[w];
#pragma unroll
        for (int k = 0; k < 32; ++k) num += ((word >> k) & 1u) ? mk[32 * w + k] : -mk[32 * w + k];
      }
      out[i * p.out_stride_s + d] = from_float<T>(num / den[r]);
    }
  }
}

std::string check(const EcoParams& p, const char* op) {
  if (p.nbits < 1 || p.nbits > 64) return std::string(op) + ": nbits must be in [1, 64], got " + std::to_string(p.nbits);
  if (p.head_dim_v < 1 || p.head_dim_v > kMaxDv) {
    return std::string(op) + ": head_dim_v must be in [1, " + std::to_string(kMaxDv) + "], got " + std::to_string(p.head_dim_v);
  }
  return std::string();
}

}  // namespace

std::string launch_ecoformer_pairwise(const EcoParams& p, int64_t stream) {
  std::string err = check(p, "ecoformer_pairwise");
  if (!err.empty()) return err;
  if (p.batch_heads == 0 || p.seqlen_q == 0) return std::string();
  const dim3 grid((p.seqlen_q + kWarps - 1) / kWarps, p.batch_heads);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return POSATTN_DTYPE_SWITCH_ALL(p.dtype, T, [&] {
    return POSATTN_BOOL_SWITCH(p.nbits > 32, kTwoWords, [&] {
      eco_pairwise_kernel<T, kTwoWords ? 2 : 1><<<grid, kThreads, 0, s>>>(p);
      return launch_error("eco_pairwise_kernel");
    });
  });
}

std::string launch_ecoformer_linear(const EcoParams& p, int64_t stream) {
  std::string err = check(p, "ecoformer_linear");
  if (!err.empty()) return err;
  if (p.repo_form && p.seqlen_q != p.seqlen_k) return "ecoformer_linear: repo_form needs seqlen_q == seqlen_k (it adds v_i)";
  if (p.batch_heads == 0) return std::string();
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid_reduce((p.head_dim_v + 1 + kThreads - 1) / kThreads, p.batch_heads);
  const dim3 grid_apply((p.seqlen_q + kLinearRows - 1) / kLinearRows, p.batch_heads);
  return POSATTN_DTYPE_SWITCH_ALL(p.dtype, T, [&] {
    return POSATTN_BOOL_SWITCH(p.nbits > 32, kTwoWords, [&] {
      eco_linear_reduce_kernel<T, kTwoWords ? 2 : 1><<<grid_reduce, kThreads, 0, s>>>(p);
      std::string e = launch_error("eco_linear_reduce_kernel");
      if (!e.empty() || p.seqlen_q == 0) return e;
      eco_linear_apply_kernel<T, kTwoWords ? 2 : 1><<<grid_apply, kThreads, 0, s>>>(p);
      return launch_error("eco_linear_apply_kernel");
    });
  });
}

}  // namespace posattn
