// LeanAttention stream-K decode (Sanovar et al., arXiv 2405.10480; ALGORITHMS.md 1).
//
// Iteration space and schedule: posattn.scheduling.Schedule (its module docstring is the contract).
// Output tiles u = (tile_batch[u], tile_head[u], tile_mblock[u]), each made of
// ceil(seqlens_k[b] / kBlockN) key tiles; global tile ids are contiguous per output tile
// (tile_offsets, so ragged lengths cost nothing; batches with no key have no tile and are
// zero-filled by the kernel). A persistent grid of num_ctas CTAs (cooperative launch: all
// co-resident) each walks its contiguous range [cta_starts[c], cta_starts[c+1]) of global tiles,
// which may cross output tiles:
//   - segment starting at an output tile's first tile: this CTA is the tile's host. It folds in the
//     partials of the next num_splits[u] - 1 CTAs (c+1, c+2, ...; their first segments) in CTA
//     order (deterministic), waiting on each one's flag, then normalises and writes out and lse;
//   - any other segment (always the CTA's first one): write the fp32 partial (m, l, o~) to slot c
//     of the workspace, fence, and set flags[c] = epoch.
// No deadlock: a CTA waits only in a segment where it is host, and the peers it waits on are in
// their first segment, which never waits (ALGORITHMS.md 1a). Epoch counters: the caller passes a
// new nonzero epoch per call, so the flags never need a memset.
// GQA packing (ONNX Runtime): the num_heads/num_heads_k query heads of a kv head (times seqlen_q)
// are the M rows of one tile, so each K/V tile is read once for the whole group. Packed row
// r = g * seqlen_q + i -> query head hk * G + g, query i at position seqlens_k[b] - seqlen_q + i.
// RoPE is applied to q at that position (angle = float(pos) * inv_freq in fp32); the cache holds
// rotated keys. ALiBi bias -slope * |pk - pq|. Logits in base 2 (log2 e folded into the scale).
//
// Shapes (elements, unit last stride): q/out (batch, seqlen_q, num_heads, head_dim); k/v cache
// (batch, seqlen_cache, num_heads_k, head_dim) or paged (num_blocks, page_block_size, num_heads_k,
// head_dim) with block_table (batch, max_blocks); lse (batch, num_heads, seqlen_q) fp32.
// CUDA-core inner products (no tensor cores): decode is bandwidth-bound; simple and checkable.
#include "posattn/dispatch.h"
#include "posattn/alibi.cuh"
#include "posattn/rotary.cuh"
#include "posattn/softmax_state.cuh"
#include "posattn/vec.cuh"

namespace posattn {
namespace {

constexpr int kThreads = 128;
constexpr int kBlockM = 16;

template <int kHeadDim>
struct LeanCfg {
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;      // keys per tile (scheduling.default_block_n)
  static constexpr int kWords = kHeadDim / 2;                      // 32-bit words (2 halves) per row
  static constexpr int kKRow = kWords + 1;                         // padded K row: conflict-free per-key reads
  static constexpr int kRowGroups = kThreads / kWords;             // P.V: thread -> (word column, row group)
  static constexpr int kRowsPerThread = kBlockM / kRowGroups;
  static constexpr int kLogitGroups = kThreads / kBlockN;          // logits: thread -> (key, row group)
  static_assert(kThreads % kWords == 0 && kBlockM % kRowGroups == 0, "P.V thread layout");
  static_assert(kThreads % kBlockN == 0 && kBlockM % kLogitGroups == 0, "logit thread layout");
  static_assert(kHeadDim % 8 == 0, "16-byte K/V loads");
  // shared memory, in 4-byte units
  static constexpr int kSmemWords = kBlockN * kKRow + kBlockN * kWords + kBlockM * kHeadDim + kBlockM * kBlockN + 4 * kBlockM;
  static constexpr size_t kSmemBytes = sizeof(uint32_t) * kSmemWords;
};

template <typename T>
__device__ __forceinline__ float2 word_to_float2(uint32_t w) {
  T a, b;
  memcpy(&a, &w, sizeof(T));
  memcpy(&b, reinterpret_cast<const char*>(&w) + sizeof(T), sizeof(T));
  return make_float2(to_float(a), to_float(b));
}

// Pointer to key row pk of sequence b, kv head hk (contiguous or paged cache).
template <typename T>
__device__ __forceinline__ const T* kv_row(const DecodeParams& p, const void* base, int64_t sb, int64_t ss, int64_t sh,
                                           int b, int pk, int hk) {
  const T* ptr = static_cast<const T*>(base);
  if (p.block_table != nullptr) {
    const int blk = p.block_table[b * p.block_table_stride_b + pk / p.page_block_size];
    return ptr + static_cast<int64_t>(blk) * sb + static_cast<int64_t>(pk % p.page_block_size) * ss + hk * sh;
  }
  return ptr + static_cast<int64_t>(b) * sb + static_cast<int64_t>(pk) * ss + hk * sh;
}

struct TileCoord {
  int b, hk, mblk, m_rows, seqlen_k;
};

__device__ __forceinline__ TileCoord tile_coord(const DecodeParams& p, int u) {
  const int rows_total = (p.num_heads / p.num_heads_k) * p.seqlen_q;
  TileCoord tc;
  tc.b = p.tile_batch[u];
  tc.hk = p.tile_head[u];
  tc.mblk = p.tile_mblock[u];
  tc.m_rows = min(kBlockM, rows_total - tc.mblk * kBlockM);
  tc.seqlen_k = p.seqlens_k[tc.b];
  return tc;
}

// Output row r of a tile: query head and query index.
__device__ __forceinline__ void row_head(const DecodeParams& p, const TileCoord& tc, int r, int* h, int* i) {
  const int packed = tc.mblk * kBlockM + r;
  *h = tc.hk * (p.num_heads / p.num_heads_k) + packed / p.seqlen_q;
  *i = packed % p.seqlen_q;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2) lean_decode_kernel(__grid_constant__ const DecodeParams p) {
  using Cfg = LeanCfg<kHeadDim>;
  constexpr int kBlockN = Cfg::kBlockN, kWords = Cfg::kWords, kKRow = Cfg::kKRow;
  constexpr int kRowGroups = Cfg::kRowGroups, kRowsPerThread = Cfg::kRowsPerThread;
  extern __shared__ uint32_t smem[];
  uint32_t* ks = smem;                                            // [kBlockN][kKRow]
  uint32_t* vs = ks + kBlockN * kKRow;                            // [kBlockN][kWords] (16-byte rows)
  float* qs = reinterpret_cast<float*>(vs + kBlockN * kWords);   // [kBlockM][kHeadDim] q * scale * log2 e
  float* ss = qs + kBlockM * kHeadDim;                            // [kBlockM][kBlockN] logits, then probabilities
  float* m_s = ss + kBlockM * kBlockN;                            // [kBlockM] running max (base 2)
  float* l_s = m_s + kBlockM;                                     // [kBlockM] running sum
  float* fa_s = l_s + kBlockM;                                    // [kBlockM] rescale of own accumulator
  float* fb_s = fa_s + kBlockM;                                   // [kBlockM] rescale of a peer's partial

  const int c = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int col = tid % kWords;   // P.V: word column (dims 2col, 2col+1)
  const int rgrp = tid / kWords;  // P.V: rows rgrp, rgrp + kRowGroups, ...
  const float scale_log2 = p.softmax_scale * kLog2e;
  T* out = static_cast<T*>(p.out);

  // Batches with no key are in no output tile: write their out 0 and lse -inf (grid-strided).
  {
    const int64_t per_batch = static_cast<int64_t>(p.seqlen_q) * p.num_heads * kHeadDim;
    const int64_t total = per_batch * p.batch_size;
    for (int64_t e = static_cast<int64_t>(c) * kThreads + tid; e < total; e += static_cast<int64_t>(p.num_ctas) * kThreads) {
      const int b = static_cast<int>(e / per_batch);
      if (p.seqlens_k[b] > 0) continue;
      const int64_t rem = e % per_batch;
      const int i = static_cast<int>(rem / (static_cast<int64_t>(p.num_heads) * kHeadDim));
      const int h = static_cast<int>((rem / kHeadDim) % p.num_heads);
      const int d = static_cast<int>(rem % kHeadDim);
      out[b * p.out_stride_b + i * p.out_stride_s + h * p.out_stride_h + d] = from_float<T>(0.f);
      if (d == 0) p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i] = -INFINITY;
    }
  }

  int t = p.cta_starts[c];
  const int t_end = p.cta_starts[c + 1];
  while (t < t_end) {
    // Output tile holding global tile t: the last u with tile_offsets[u] <= t (offsets strictly increase).
    int lo = 0, hi = p.num_out_tiles - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.tile_offsets[mid] <= t) lo = mid; else hi = mid - 1;
    }
    const int u = lo;
    const int u_begin = p.tile_offsets[u], u_end = p.tile_offsets[u + 1];
    const int seg_end = min(t_end, u_end);
    const bool is_host = t == u_begin;
    const TileCoord tc = tile_coord(p, u);

    // q rows of this tile -> qs (rotated at the query position, times softmax_scale * log2 e).
    for (int e = tid; e < kBlockM * kHeadDim; e += kThreads) {
      const int r = e / kHeadDim, d = e % kHeadDim;
      float val = 0.f;
      if (r < tc.m_rows) {
        int h, i;
        row_head(p, tc, r, &h, &i);
        const T* qr = static_cast<const T*>(p.q) + tc.b * p.q_stride_b + i * p.q_stride_s + h * p.q_stride_h;
        val = to_float(qr[d]);
        if (d < p.rotary_dim) {
          int pair, da, db;
          if (p.rotary_interleaved) pair = d / 2; else pair = d < p.rotary_dim / 2 ? d : d - p.rotary_dim / 2;
          rope_pair(pair, p.rotary_dim, p.rotary_interleaved, &da, &db);
          const int64_t pos = static_cast<int64_t>(tc.seqlen_k) - p.seqlen_q + i;
          float cs, sn, ya, yb;
          rope_cos_sin(rope_angle(pos, p.inv_freq[pair]), &cs, &sn);
          rope_rotate(to_float(qr[da]), to_float(qr[db]), cs, sn, false, &ya, &yb);
          val = d == da ? ya : yb;
        }
      }
      qs[e] = val * scale_log2;
    }
    if (tid < kBlockM) { m_s[tid] = -INFINITY; l_s[tid] = 0.f; }
    float2 acc[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) acc[k] = make_float2(0.f, 0.f);
    __syncthreads();

    for (int tile = t; tile < seg_end; ++tile) {
      const int kv0 = (tile - u_begin) * kBlockN;
      const int nkeys = min(kBlockN, tc.seqlen_k - kv0);
      // K, V tile -> smem, 16 bytes per load.
      constexpr int kChunks = kHeadDim / 8;
      for (int e = tid; e < nkeys * kChunks; e += kThreads) {
        const int j = e / kChunks, ch = e % kChunks;
        const T* kr = kv_row<T>(p, p.k_cache, p.k_stride_b, p.k_stride_s, p.k_stride_h, tc.b, kv0 + j, tc.hk);
        const T* vr = kv_row<T>(p, p.v_cache, p.v_stride_b, p.v_stride_s, p.v_stride_h, tc.b, kv0 + j, tc.hk);
        const uint4 kw = *reinterpret_cast<const uint4*>(kr + 8 * ch);
        uint32_t* kd = ks + j * kKRow + 4 * ch;
        kd[0] = kw.x; kd[1] = kw.y; kd[2] = kw.z; kd[3] = kw.w;
        *reinterpret_cast<uint4*>(vs + j * kWords + 4 * ch) = *reinterpret_cast<const uint4*>(vr + 8 * ch);
      }
      __syncthreads();
      // Logits: thread -> key j = tid % kBlockN, rows tid / kBlockN + k * kLogitGroups.
      {
        const int j = tid % kBlockN;
        for (int r = tid / kBlockN; r < tc.m_rows; r += Cfg::kLogitGroups) {
          float s = -INFINITY;
          int h, i;
          row_head(p, tc, r, &h, &i);
          const int64_t pq = static_cast<int64_t>(tc.seqlen_k) - p.seqlen_q + i;
          const int pk = kv0 + j;
          if (j < nkeys && (!p.causal || pk <= pq)) {
            const float* qr = qs + r * kHeadDim;
            const uint32_t* kr = ks + j * kKRow;
            float a = 0.f;
#pragma unroll 8
            for (int w = 0; w < kWords; ++w) {
              const float2 kk = word_to_float2<T>(kr[w]);
              a = fmaf(qr[2 * w], kk.x, a);
              a = fmaf(qr[2 * w + 1], kk.y, a);
            }
            if (p.alibi_slopes != nullptr) a += alibi_bias(p.alibi_slopes[tc.b * p.alibi_stride_b + h], pq, pk) * kLog2e;
            s = a;
          }
          ss[r * kBlockN + j] = s;
        }
      }
      __syncthreads();
      // Online softmax, one warp per row.
      for (int r = warp; r < tc.m_rows; r += kThreads / kWarpSize) {
        float mx = -INFINITY;
        for (int j = lane; j < kBlockN; j += kWarpSize) mx = fmaxf(mx, ss[r * kBlockN + j]);
#pragma unroll
        for (int o = kWarpSize / 2; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_old = m_s[r];
        const float m_new = fmaxf(m_old, mx);
        float sum = 0.f;
        for (int j = lane; j < kBlockN; j += kWarpSize) {
          const float e = prob_base2(ss[r * kBlockN + j], m_new);
          ss[r * kBlockN + j] = e;
          sum += e;
        }
#pragma unroll
        for (int o = kWarpSize / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
          const float alpha = rescale_base2(m_old, m_new);
          fa_s[r] = alpha;
          l_s[r] = l_s[r] * alpha + sum;
          m_s[r] = m_new;
        }
      }
      __syncthreads();
      // P.V into the register accumulators.
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int r = rgrp + k * kRowGroups;
        if (r < tc.m_rows) {
          const float alpha = fa_s[r];
          acc[k].x *= alpha;
          acc[k].y *= alpha;
        }
      }
      for (int j = 0; j < nkeys; ++j) {
        const float2 vv = word_to_float2<T>(vs[j * kWords + col]);
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k) {
          const int r = rgrp + k * kRowGroups;
          if (r < tc.m_rows) {
            const float pj = ss[r * kBlockN + j];
            acc[k].x = fmaf(pj, vv.x, acc[k].x);
            acc[k].y = fmaf(pj, vv.y, acc[k].y);
          }
        }
      }
      __syncthreads();
    }

    if (!is_host) {
      // Partial for the host: fp32 (m, l, o~) in slot c, then release the flag.
      float* wo = p.ws_o + static_cast<int64_t>(c) * kBlockM * kHeadDim;
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int r = rgrp + k * kRowGroups;
        if (r < tc.m_rows) {
          __stcg(wo + r * kHeadDim + 2 * col, acc[k].x);
          __stcg(wo + r * kHeadDim + 2 * col + 1, acc[k].y);
        }
      }
      if (tid < tc.m_rows) {
        __stcg(p.ws_m + c * kBlockM + tid, m_s[tid]);
        __stcg(p.ws_l + c * kBlockM + tid, l_s[tid]);
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicExch(p.flags + c, p.epoch);
    } else {
      const bool schedule_ok = p.host_cta[u] == c;
      const int np = schedule_ok ? p.num_splits[u] - 1 : 0;
      for (int s = 1; s <= np; ++s) {
        const int peer = c + s;
        if (tid == 0) {
          const volatile uint32_t* flag = p.flags + peer;
          while (*flag != p.epoch) __nanosleep(64);
          __threadfence();
        }
        __syncthreads();
        if (tid < tc.m_rows) {
          float fa, fb;
          const SoftmaxState merged = merge_state_base2(SoftmaxState{m_s[tid], l_s[tid]},
                                                        SoftmaxState{__ldcg(p.ws_m + peer * kBlockM + tid),
                                                                     __ldcg(p.ws_l + peer * kBlockM + tid)},
                                                        &fa, &fb);
          m_s[tid] = merged.m;
          l_s[tid] = merged.l;
          fa_s[tid] = fa;
          fb_s[tid] = fb;
        }
        __syncthreads();
        const float* wo = p.ws_o + static_cast<int64_t>(peer) * kBlockM * kHeadDim;
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k) {
          const int r = rgrp + k * kRowGroups;
          if (r < tc.m_rows) {
            acc[k].x = acc[k].x * fa_s[r] + __ldcg(wo + r * kHeadDim + 2 * col) * fb_s[r];
            acc[k].y = acc[k].y * fa_s[r] + __ldcg(wo + r * kHeadDim + 2 * col + 1) * fb_s[r];
          }
        }
        __syncthreads();
      }
      // Normalise and write; a schedule whose host does not match writes NaN (never a silent result).
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int r = rgrp + k * kRowGroups;
        if (r < tc.m_rows) {
          int h, i;
          row_head(p, tc, r, &h, &i);
          const float l = l_s[r];
          const float inv = !schedule_ok ? NAN : (l > 0.f ? 1.f / l : 0.f);
          T* orow = out + tc.b * p.out_stride_b + i * p.out_stride_s + h * p.out_stride_h;
          orow[2 * col] = from_float<T>(acc[k].x * inv);
          orow[2 * col + 1] = from_float<T>(acc[k].y * inv);
        }
      }
      if (tid < tc.m_rows) {
        int h, i;
        row_head(p, tc, tid, &h, &i);
        p.lse[tc.b * p.lse_stride_b + h * p.lse_stride_h + i] =
            schedule_ok ? state_lse_base2(SoftmaxState{m_s[tid], l_s[tid]}) : NAN;
      }
      __syncthreads();
    }
    t = seg_end;
  }
}

template <typename T, int kHeadDim>
std::string prepare(size_t* smem, void** fn) {
  auto kernel = lean_decode_kernel<T, kHeadDim>;
  *smem = LeanCfg<kHeadDim>::kSmemBytes;
  *fn = reinterpret_cast<void*>(kernel);
  return cuda_error("lean_decode: cudaFuncSetAttribute",
                    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(*smem)));
}

std::string prepare_any(int head_dim, DType dtype, size_t* smem, void** fn) {
  return POSATTN_DTYPE_SWITCH_HALF(dtype, T, [&] {
    switch (head_dim) {
      case 64: return prepare<T, 64>(smem, fn);
      case 128: return prepare<T, 128>(smem, fn);
      case 256: return prepare<T, 256>(smem, fn);
      default: return unsupported_head_dim(head_dim, "64, 128, 256");
    }
  });
}

}  // namespace

void lean_decode_tile_sizes(int head_dim, int* block_m, int* block_n) {
  *block_m = kBlockM;
  *block_n = head_dim <= 128 ? LeanCfg<128>::kBlockN : LeanCfg<256>::kBlockN;
}

int lean_decode_max_ctas(int head_dim, DType dtype, std::string* err) {
  size_t smem = 0;
  void* fn = nullptr;
  *err = prepare_any(head_dim, dtype, &smem, &fn);
  if (!err->empty()) return -1;
  int dev = 0, sms = 0, per_sm = 0;
  *err = cuda_error("lean_decode: cudaGetDevice", cudaGetDevice(&dev));
  if (err->empty()) *err = cuda_error("lean_decode: cudaDeviceGetAttribute", cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (err->empty()) *err = cuda_error("lean_decode: occupancy query", cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem));
  return err->empty() ? sms * per_sm : -1;
}

std::string launch_lean_decode(const DecodeParams& p, int64_t stream) {
  if (p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0) {
    return "lean_decode: num_heads " + std::to_string(p.num_heads) + " is not a multiple of num_heads_k " +
           std::to_string(p.num_heads_k);
  }
  if (p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim || p.rotary_dim < 0) {
    return "lean_decode: rotary_dim must be even and in [0, head_dim], got " + std::to_string(p.rotary_dim);
  }
  if (p.epoch == 0) return "lean_decode: epoch must be nonzero (flags start at 0)";
  const int64_t kv_strides[] = {p.k_stride_b, p.k_stride_s, p.k_stride_h, p.v_stride_b, p.v_stride_s, p.v_stride_h};
  bool aligned = aligned16(p.k_cache) && aligned16(p.v_cache);
  for (int64_t st : kv_strides) aligned = aligned && st % 8 == 0;
  if (!aligned) return "lean_decode: k_cache and v_cache need 16-byte aligned data and strides that are multiples of 8 elements";
  if (p.num_ctas <= 0) return "lean_decode: the schedule has no CTA";
  size_t smem = 0;
  void* fn = nullptr;
  std::string err = prepare_any(p.head_dim, p.dtype, &smem, &fn);
  if (!err.empty()) return err;
  void* args[] = {const_cast<DecodeParams*>(&p)};
  // Cooperative launch: guarantees that all CTAs are co-resident (the host CTAs spin on peers' flags),
  // and fails with cudaErrorCooperativeLaunchTooLarge instead of hanging when num_ctas is too large.
  const cudaError_t e = cudaLaunchCooperativeKernel(fn, dim3(p.num_ctas), dim3(kThreads), args, smem,
                                                    reinterpret_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("lean_decode_kernel: cooperative launch of ") + std::to_string(p.num_ctas) +
           " CTAs failed: " + cudaGetErrorString(e) + " (see _C.lean_decode_max_ctas)";
  }
  return launch_error("lean_decode_kernel");
}

}  // namespace posattn
