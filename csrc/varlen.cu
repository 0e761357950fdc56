// Padding-free (varlen) support after ByteTransformer (Zhai et al., arXiv 2210.03052; ALGORITHMS.md 2):
//   unpad_index_kernel   one CTA: per-sequence lengths of a (batch, seqlen) mask with ballot+popc,
//                        exclusive prefix sum -> cu_seqlens, and the packed row indices b*seqlen + s
//                        of every valid token (holes allowed: the indices are where the mask is true)
//   row_copy_kernel      gather (pack: dst[t] = src[idx[t]]) or scatter (pad / unpad backward:
//                        dst[idx[t]] = src[t]) of whole rows, 16 bytes per thread when aligned
//   varlen_attn_kernel   short-sequence varlen attention forward: one CTA per (query chunk, head,
//                        sequence) holds the sequence's whole K and V in shared memory; one warp per
//                        query row computes all logits, an exact two-pass softmax and P.V.
// Varlen layouts: q/out (total_q, num_heads, head_dim), k/v (total_k, num_heads_k, head_dim); lse
// (num_heads, total_q) fp32. Positions restart at 0 in every sequence; query i sits at
// i + len_k - len_q (bottom-right, FlashAttention), key j at j.
#include "posattn/dispatch.h"
#include "posattn/alibi.cuh"
#include "posattn/popcount.cuh"
#include "posattn/relative_bias.cuh"
#include "posattn/softmax_state.cuh"
#include "posattn/t5_bucket.cuh"
#include "posattn/vec.cuh"

namespace posattn {
namespace {

// ---------------------------------------------------------------------------------------------
// unpad index
constexpr int kIndexThreads = 1024;
constexpr int kIndexWarps = kIndexThreads / kWarpSize;

__global__ void __launch_bounds__(kIndexThreads) unpad_index_kernel(__grid_constant__ const UnpadIndexParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  // 1. lengths: one warp per sequence, 32 mask bytes per step.
  for (int b = warp; b < p.batch_size; b += kIndexWarps) {
    const uint8_t* row = p.mask + b * p.mask_stride_b;
    int count = 0;
    for (int s0 = 0; s0 < p.seqlen; s0 += kWarpSize) {
      const int s = s0 + lane;
      const bool valid = s < p.seqlen && row[s * p.mask_stride_s] != 0;
      count += popcount32(__ballot_sync(0xffffffffu, valid));
    }
    if (lane == 0) p.seqlens[b] = count;
  }
  __syncthreads();  // global writes of this block are visible to the block after the barrier
  // 2. exclusive prefix sum over batch, kIndexThreads entries at a time, carried across chunks.
  __shared__ int warp_sums[kIndexWarps];
  __shared__ int carry;
  if (threadIdx.x == 0) { carry = 0; p.cu_seqlens[0] = 0; }
  __syncthreads();
  for (int b0 = 0; b0 < p.batch_size; b0 += kIndexThreads) {
    const int b = b0 + threadIdx.x;
    const int len = b < p.batch_size ? p.seqlens[b] : 0;
    int incl = len;  // inclusive warp scan
#pragma unroll
    for (int o = 1; o < kWarpSize; o *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == kWarpSize - 1) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int w = warp_sums[lane];  // kIndexWarps == 32
#pragma unroll
      for (int o = 1; o < kWarpSize; o *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sums[lane] = w - warp_sums[lane];  // exclusive prefix of warp totals
    }
    __syncthreads();
    const int start = carry;
    if (b < p.batch_size) p.cu_seqlens[b + 1] = start + warp_sums[warp] + incl;
    __syncthreads();
    if (threadIdx.x == kIndexThreads - 1) carry = start + warp_sums[warp] + incl;
    __syncthreads();
  }
  // 3. indices: one warp per sequence; the k-th valid token of sequence b goes to cu_seqlens[b] + k.
  for (int b = warp; b < p.batch_size; b += kIndexWarps) {
    const uint8_t* row = p.mask + b * p.mask_stride_b;
    int64_t off = p.cu_seqlens[b];
    for (int s0 = 0; s0 < p.seqlen; s0 += kWarpSize) {
      const int s = s0 + lane;
      const bool valid = s < p.seqlen && row[s * p.mask_stride_s] != 0;
      const uint32_t ballot = __ballot_sync(0xffffffffu, valid);
      if (valid) {
        const int rank = popcount32(ballot & ((1u << lane) - 1u));
        p.indices[off + rank] = static_cast<int64_t>(b) * p.seqlen + s;
      }
      off += popcount32(ballot);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gather / scatter rows
constexpr int kCopyThreads = 256;

template <int kBytes>
__global__ void __launch_bounds__(kCopyThreads) row_copy_kernel(__grid_constant__ const RowCopyParams p) {
  using Word = typename std::conditional<kBytes == 16, uint4, uint8_t>::type;
  const int64_t words = p.row_bytes / kBytes;
  const int64_t total = p.num_rows * words;
  const char* src = static_cast<const char*>(p.src);
  char* dst = static_cast<char*>(p.dst);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kCopyThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kCopyThreads) {
    const int64_t t = i / words;
    const int64_t w = i % words;
    const int64_t idx = p.indices[t];
    const int64_t src_row = p.scatter ? t : idx;
    const int64_t dst_row = p.scatter ? idx : t;
    const Word* s = reinterpret_cast<const Word*>(src + src_row * p.src_row_stride_bytes) + w;
    Word* d = reinterpret_cast<Word*>(dst + dst_row * p.dst_row_stride_bytes) + w;
    *d = *s;
  }
}

// ---------------------------------------------------------------------------------------------
// short-sequence varlen attention
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarpSize;
constexpr int kQueryChunk = 16;  // query rows per CTA (4 per warp)

// Shared memory: K with a one-word pad per row (kv row stride head_dim/2 + 1 words: lanes reading
// different keys at the same dim hit different banks), V unpadded, q in fp32 per warp, and one
// row of logits/probabilities per warp.
struct VarlenSmem {
  static __host__ __device__ int k_row_words(int head_dim) { return head_dim / 2 + 1; }
  static __host__ __device__ size_t bytes(int head_dim, int max_seqlen_k) {
    return sizeof(uint32_t) * (static_cast<size_t>(max_seqlen_k) * (k_row_words(head_dim) + head_dim / 2)) +
           sizeof(float) * (kAttnWarps * static_cast<size_t>(head_dim) + kAttnWarps * static_cast<size_t>(max_seqlen_k));
  }
};

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t w) {
  T a, b;
  memcpy(&a, &w, sizeof(T));
  memcpy(&b, reinterpret_cast<const char*>(&w) + sizeof(T), sizeof(T));
  return make_float2(to_float(a), to_float(b));
}

__device__ __forceinline__ float attn_bias(const VarlenAttnParams& p, int b, int h, int64_t pq, int64_t pk) {
  switch (p.bias_mode) {
    case kBiasAlibi: return alibi_bias(p.alibi_slopes[b * p.alibi_stride_b + h], pq, pk);
    case kBiasRelative:
      return p.bias_table[h * p.bias_stride_0 + relative_bias_index(pq, pk, p.max_distance) * p.bias_stride_1];
    case kBiasT5:
      return p.bias_table[t5_bucket(pk - pq, p.num_buckets, p.max_distance, p.bidirectional) * p.bias_stride_0 +
                          h * p.bias_stride_1];
    default: return 0.f;
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kAttnThreads) varlen_attn_kernel(__grid_constant__ const VarlenAttnParams p) {
  static_assert(kHeadDim % 64 == 0, "one half2 word per lane per 64 dims");
  constexpr int kWordsPerLane = kHeadDim / 64;
  constexpr int kKRow = kHeadDim / 2 + 1;  // padded K row, in 32-bit words
  constexpr int kVRow = kHeadDim / 2;
  const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int q_start = p.cu_seqlens_q[b], len_q = p.cu_seqlens_q[b + 1] - q_start;
  const int k_start = p.cu_seqlens_k[b], len_k = p.cu_seqlens_k[b + 1] - k_start;
  const int row0 = chunk * kQueryChunk;
  if (row0 >= len_q) return;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int hk = h / (p.num_heads / p.num_heads_k);
  const int rows = min(kQueryChunk, len_q - row0);
  T* out = static_cast<T*>(p.out);
  if (len_k > p.max_seqlen_k) {  // the host's max_seqlen_k was too small: fail loudly, never read past smem
    for (int i = threadIdx.x; i < rows * kHeadDim; i += kAttnThreads) {
      const int64_t t = q_start + row0 + i / kHeadDim;
      out[t * p.out_stride_t + h * p.out_stride_h + i % kHeadDim] = from_float<T>(NAN);
      if (i % kHeadDim == 0) p.lse[h * p.lse_stride_h + t] = NAN;
    }
    return;
  }
  extern __shared__ uint32_t smem[];
  uint32_t* ks = smem;                                                   // [max_seqlen_k][kKRow]
  uint32_t* vs = ks + static_cast<size_t>(p.max_seqlen_k) * kKRow;     // [max_seqlen_k][kVRow]
  float* qs = reinterpret_cast<float*>(vs + static_cast<size_t>(p.max_seqlen_k) * kVRow);  // [warps][head_dim]
  float* ps = qs + kAttnWarps * kHeadDim;                                // [warps][max_seqlen_k]

  // Load K and V of the sequence (32-bit words; K rows are padded so not 16-byte aligned).
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(k_start) * p.k_stride_t + hk * p.k_stride_h;
  const T* vg = static_cast<const T*>(p.v) + static_cast<int64_t>(k_start) * p.v_stride_t + hk * p.v_stride_h;
  for (int i = threadIdx.x; i < len_k * kVRow; i += kAttnThreads) {
    const int j = i / kVRow, w = i % kVRow;
    ks[j * kKRow + w] = *reinterpret_cast<const uint32_t*>(kg + j * p.k_stride_t + 2 * w);
    vs[j * kVRow + w] = *reinterpret_cast<const uint32_t*>(vg + j * p.v_stride_t + 2 * w);
  }
  __syncthreads();

  const float scale_log2 = p.softmax_scale * kLog2e;
  float* q_w = qs + warp * kHeadDim;
  float* p_w = ps + warp * p.max_seqlen_k;
  for (int r = warp; r < rows; r += kAttnWarps) {
    const int i = row0 + r;
    const int64_t t = q_start + i;
    const int64_t pq = static_cast<int64_t>(i) + len_k - len_q;
    const T* qg = static_cast<const T*>(p.q) + t * p.q_stride_t + h * p.q_stride_h;
    for (int d = lane; d < kHeadDim; d += kWarpSize) q_w[d] = to_float(qg[d]) * scale_log2;
    __syncwarp();
    // Logits (base 2) for keys j = lane, lane + 32, ...; masked keys get -inf.
    const int64_t last = pq + 1 > 0 ? pq + 1 : 0;  // causal: keys [0, pq] are visible
    const int visible = p.causal ? static_cast<int>(last < len_k ? last : len_k) : len_k;
    float mx = -INFINITY;
    for (int j = lane; j < len_k; j += kWarpSize) {
      float s = -INFINITY;
      if (j < visible) {
        float acc = 0.f;
        const uint32_t* kr = ks + j * kKRow;
#pragma unroll 8
        for (int w = 0; w < kHeadDim / 2; ++w) {
          const float2 kk = to_float2<T>(kr[w]);
          acc = fmaf(q_w[2 * w], kk.x, acc);
          acc = fmaf(q_w[2 * w + 1], kk.y, acc);
        }
        s = acc + attn_bias(p, b, h, pq, j) * kLog2e;
      }
      p_w[j] = s;
      mx = fmaxf(mx, s);
    }
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int j = lane; j < len_k; j += kWarpSize) {
      const float e = prob_base2(p_w[j], mx);
      p_w[j] = e;
      sum += e;
    }
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    __syncwarp();
    // P.V: lane owns words lane, lane + 32, ... of the row (dims 2w, 2w+1).
    float2 acc[kWordsPerLane];
#pragma unroll
    for (int c = 0; c < kWordsPerLane; ++c) acc[c] = make_float2(0.f, 0.f);
    for (int j = 0; j < visible; ++j) {
      const float pj = p_w[j];
#pragma unroll
      for (int c = 0; c < kWordsPerLane; ++c) {
        const float2 vv = to_float2<T>(vs[j * kVRow + lane + c * kWarpSize]);
        acc[c].x = fmaf(pj, vv.x, acc[c].x);
        acc[c].y = fmaf(pj, vv.y, acc[c].y);
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // fully masked row: out 0, lse -inf
    T* og = out + t * p.out_stride_t + h * p.out_stride_h;
#pragma unroll
    for (int c = 0; c < kWordsPerLane; ++c) {
      const int d = 2 * (lane + c * kWarpSize);
      og[d] = from_float<T>(acc[c].x * inv);
      og[d + 1] = from_float<T>(acc[c].y * inv);
    }
    if (lane == 0) p.lse[h * p.lse_stride_h + t] = state_lse_base2(SoftmaxState{mx, sum});
    __syncwarp();  // q_w / p_w are rewritten by the next row
  }
}

template <typename T, int kHeadDim>
std::string run_varlen(const VarlenAttnParams& p, cudaStream_t stream) {
  const size_t smem = VarlenSmem::bytes(kHeadDim, p.max_seqlen_k);
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (smem > static_cast<size_t>(optin)) {
    return "varlen_attention: max_seqlen_k=" + std::to_string(p.max_seqlen_k) + " with head_dim " +
           std::to_string(kHeadDim) + " needs " + std::to_string(smem) + " bytes of shared memory; this device allows " +
           std::to_string(optin) + " (use the Triton varlen path for long sequences)";
  }
  auto kernel = varlen_attn_kernel<T, kHeadDim>;
  std::string err = cuda_error("varlen_attention: cudaFuncSetAttribute",
                               cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (!err.empty()) return err;
  const dim3 grid((p.max_seqlen_q + kQueryChunk - 1) / kQueryChunk, p.num_heads, p.batch_size);
  if (grid.x == 0 || grid.z == 0) return std::string();
  kernel<<<grid, kAttnThreads, smem, stream>>>(p);
  return launch_error("varlen_attn_kernel");
}

}  // namespace

std::string launch_unpad_index(const UnpadIndexParams& p, int64_t stream) {
  if (p.batch_size == 0) return std::string();
  unpad_index_kernel<<<1, kIndexThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  return launch_error("unpad_index_kernel");
}

std::string launch_row_copy(const RowCopyParams& p, int64_t stream) {
  if (p.num_rows == 0 || p.row_bytes == 0) return std::string();
  const bool vec = aligned16(p.src) && aligned16(p.dst) && p.row_bytes % 16 == 0 && p.src_row_stride_bytes % 16 == 0 &&
                   p.dst_row_stride_bytes % 16 == 0;
  const int64_t total = p.num_rows * (vec ? p.row_bytes / 16 : p.row_bytes);
  const int64_t blocks = (total + kCopyThreads - 1) / kCopyThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 * 16 ? blocks : 65536 * 16);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (vec) row_copy_kernel<16><<<grid, kCopyThreads, 0, s>>>(p);
  else row_copy_kernel<1><<<grid, kCopyThreads, 0, s>>>(p);
  return launch_error("row_copy_kernel");
}

std::string launch_varlen_attention(const VarlenAttnParams& p, int64_t stream) {
  if (p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0) {
    return "varlen_attention: num_heads " + std::to_string(p.num_heads) + " is not a multiple of num_heads_k " +
           std::to_string(p.num_heads_k);
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return POSATTN_DTYPE_SWITCH_HALF(p.dtype, T, [&] {
    switch (p.head_dim) {
      case 64: return run_varlen<T, 64>(p, s);
      case 128: return run_varlen<T, 128>(p, s);
      default: return unsupported_head_dim(p.head_dim, "64, 128");
    }
  });
}

}  // namespace posattn
