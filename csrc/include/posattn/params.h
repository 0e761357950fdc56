// Params structs and launcher entry points of posattn._C (host-visible, plain C++: bindings.cpp is
// compiled by the host compiler and includes only this header). One struct per op family; every
// field commented with its shape and unit; strides in elements, int64; reset with `p = {}`;
// kernels take them by value as `__grid_constant__ const`.
// Launchers return "" on success, else the error message (bindings.cpp raises RuntimeError).
#pragma once
#include <cstdint>
#include <string>

namespace posattn {

// Element type of the tensors of one call (the Python wrapper maps torch dtypes to these).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- rope.cu: apply_rotary ------------------------------------------------------------------
struct RotaryParams {
  const void* x;        // (batch, seqlen, num_heads, head_dim), dtype, unit last stride
  void* out;            // same shape; may alias x (in place)
  const float* cos;     // (seqlen_ro, rotary_dim/2) fp32
  const float* sin;     // (seqlen_ro, rotary_dim/2) fp32
  const int32_t* position_ids;    // (batch or 1, seqlen) int32, or null: position = s + seqlen_offsets[b]
  const int32_t* seqlen_offsets;  // (batch,) int32, or null (0); ignored when position_ids is given
  int64_t x_stride_b, x_stride_s, x_stride_h;        // elements
  int64_t out_stride_b, out_stride_s, out_stride_h;  // elements
  int64_t cos_stride_s, sin_stride_s;                // elements (unit last stride)
  int64_t pos_stride_b, pos_stride_s;                // elements; pos_stride_b = 0 broadcasts one row
  int batch_size, seqlen, num_heads, head_dim;
  int rotary_dim;       // even, <= head_dim; dims [rotary_dim, head_dim) pass through
  int seqlen_ro;        // rows of cos/sin; positions outside [0, seqlen_ro) are left unrotated
  bool interleaved;     // true: pairs (2i, 2i+1) (GPT-J); false: (i, i + rotary_dim/2) (GPT-NeoX)
  bool conj;            // rotate by -angle (the backward)
  DType dtype;
};
std::string launch_rotary(const RotaryParams& p, int64_t stream);

// ---- varlen.cu: unpad index, gather/scatter rows, short-sequence varlen attention -----------------
struct UnpadIndexParams {
  const uint8_t* mask;  // (batch, seqlen) bool bytes; nonzero = valid token; holes allowed
  int32_t* seqlens;     // out: (batch,) number of valid tokens per sequence
  int32_t* cu_seqlens;  // out: (batch + 1,) exclusive prefix sum of seqlens, cu_seqlens[0] = 0
  int64_t* indices;     // out: (batch * seqlen,) capacity; the first total entries are
                        // b * seqlen + s for each valid (b, s), row-major order
  int64_t mask_stride_b, mask_stride_s;  // elements (bytes)
  int batch_size, seqlen;
};
std::string launch_unpad_index(const UnpadIndexParams& p, int64_t stream);

struct RowCopyParams {
  const void* src;      // rows of row_bytes bytes
  void* dst;
  const int64_t* indices;  // (num_rows,) int64
  int64_t src_row_stride_bytes, dst_row_stride_bytes;
  int64_t row_bytes;    // bytes copied per row
  int64_t num_rows;     // entries of indices
  bool scatter;         // false: dst[t] = src[indices[t]] (gather, pack); true: dst[indices[t]] = src[t]
};
std::string launch_row_copy(const RowCopyParams& p, int64_t stream);

// Bias modes shared by the attention kernels (positional.kernel_args' bias_mode).
enum BiasMode : int { kBiasNone = 0, kBiasAlibi = 1, kBiasRelative = 2, kBiasT5 = 3 };

struct VarlenAttnParams {
  const void* q;        // (total_q, num_heads, head_dim), dtype, unit last stride
  const void* k;        // (total_k, num_heads_k, head_dim)
  const void* v;        // (total_k, num_heads_k, head_dim)
  void* out;            // (total_q, num_heads, head_dim)
  float* lse;           // (num_heads, total_q) fp32, natural log; -inf for fully masked rows
  const int32_t* cu_seqlens_q;  // (batch + 1,)
  const int32_t* cu_seqlens_k;  // (batch + 1,)
  const float* alibi_slopes;    // (batch or 1, num_heads) fp32 when bias_mode == ALiBi
  const float* bias_table;      // RelativeBias (num_heads, 2D + 1) or T5 (num_buckets, num_heads), fp32
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h;
  int64_t out_stride_t, out_stride_h;
  int64_t lse_stride_h;         // elements (lse token stride is 1)
  int64_t alibi_stride_b;       // 0 broadcasts (num_heads,) slopes
  int64_t bias_stride_0, bias_stride_1;  // table strides (dim 0, dim 1)
  int batch_size, num_heads, num_heads_k, head_dim;
  int max_seqlen_q, max_seqlen_k;  // host ints >= every sequence's length (smem is sized by max_seqlen_k)
  float softmax_scale;          // multiplies q.k before the bias is added
  bool causal;                  // bottom-right: key j visible to query i iff j <= i + len_k - len_q
  int bias_mode;                // BiasMode
  int max_distance, num_buckets;
  bool bidirectional;           // T5
  DType dtype;
};
std::string launch_varlen_attention(const VarlenAttnParams& p, int64_t stream);

// ---- lean_decode.cu: LeanAttention stream-K decode ------------------------------------------------
struct DecodeParams {
  const void* q;        // (batch, seqlen_q, num_heads, head_dim)
  const void* k_cache;  // (batch, seqlen_cache, num_heads_k, head_dim) or paged (num_blocks, page_size, num_heads_k, head_dim)
  const void* v_cache;  // like k_cache
  void* out;            // (batch, seqlen_q, num_heads, head_dim)
  float* lse;           // (batch, num_heads, seqlen_q) fp32, natural log
  const int32_t* seqlens_k;     // (batch,) keys attended: cache rows [0, seqlens_k[b]); query row i sits at
                                // position seqlens_k[b] - seqlen_q + i (bottom-right)
  const int32_t* block_table;   // (batch, max_blocks_per_seq) int32 or null (contiguous cache)
  const float* alibi_slopes;    // (batch or 1, num_heads) fp32 or null
  const float* inv_freq;        // (rotary_dim/2,) fp32 or null: RoPE applied to q at its position
  // host-computed stream-K schedule, int32, in the format of posattn.scheduling.Schedule
  // (ALGORITHMS.md 1; output tiles with no key are not in it, the kernel zero-fills them):
  const int32_t* cta_starts;       // (num_ctas + 1,) CTA c walks global tiles [cta_starts[c], cta_starts[c+1])
  const int32_t* tile_offsets;     // (num_out_tiles + 1,) output tile u owns tiles [tile_offsets[u], tile_offsets[u+1])
  const int32_t* tile_batch;       // (num_out_tiles,) batch index of output tile u
  const int32_t* tile_head;        // (num_out_tiles,) kv head of output tile u
  const int32_t* tile_mblock;      // (num_out_tiles,) m-block of output tile u
  const int32_t* host_cta;         // (num_out_tiles,) CTA that owns u's first tile
  const int32_t* num_splits;       // (num_out_tiles,) CTAs touching u: host_cta[u] .. host_cta[u] + num_splits[u] - 1
  float* ws_m;          // (num_ctas, block_m) fp32 workspace: partial max (base-2 units)
  float* ws_l;          // (num_ctas, block_m) partial sums
  float* ws_o;          // (num_ctas, block_m, head_dim) partial unnormalised outputs
  uint32_t* flags;      // (num_ctas,) epoch flags; never reset: a partial is ready when flag == epoch
  uint32_t epoch;       // nonzero, different from the previous call's on these flags
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;   // b = page block when paged
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t out_stride_b, out_stride_s, out_stride_h;
  int64_t lse_stride_b, lse_stride_h;           // lse seqlen stride is 1
  int64_t block_table_stride_b;
  int64_t alibi_stride_b;
  int batch_size, seqlen_q, num_heads, num_heads_k, head_dim;
  int page_block_size;  // rows per page when block_table is given
  int num_ctas, num_out_tiles;
  int rotary_dim;       // 0 = no RoPE
  bool rotary_interleaved;
  float softmax_scale;
  bool causal;          // only matters for seqlen_q > 1
  DType dtype;
};
// Tile sizes the schedule must use: rows of packed (query head, query) per m-block, keys per tile
// (block_n = posattn.scheduling.default_block_n(head_dim): 128 for head_dim <= 128, else 64).
void lean_decode_tile_sizes(int head_dim, int* block_m, int* block_n);
std::string launch_lean_decode(const DecodeParams& p, int64_t stream);
// Largest grid that can be co-resident (needed by the flag-synchronised reduction), or -1 on error.
int lean_decode_max_ctas(int head_dim, DType dtype, std::string* err);

// ---- ecoformer.cu: EcoFormer on packed bits ---------------------------------------------------------
struct EcoParams {
  const uint32_t* q_codes;  // (batch*heads, seqlen_q, words) packed bits, bit set <-> +1 (bit k of word w = code bit 32w+k)
  const uint32_t* k_codes;  // (batch*heads, seqlen_k, words)
  const void* v;            // (batch*heads, seqlen_k, head_dim_v)
  void* out;                // (batch*heads, seqlen_q, head_dim_v)
  const int32_t* kv_lens;   // (batch,) valid keys per batch, or null (all seqlen_k)
  float* ws_m;              // linear form workspace (batch*heads, nbits, head_dim_v + 1) fp32
  float* ws_s;              // (batch*heads, head_dim_v + 1) fp32: sum_j v_j and count in the last column
  int64_t q_stride_bh, q_stride_s;  // in uint32 words
  int64_t k_stride_bh, k_stride_s;
  int64_t v_stride_bh, v_stride_s;  // elements (unit last stride)
  int64_t out_stride_bh, out_stride_s;
  int batch_heads, num_heads, seqlen_q, seqlen_k, head_dim_v;
  int nbits;                // 1..64
  bool repo_form;           // linear form: (b+1) v_i in the numerator (ziplab/EcoFormer) instead of (b+1) sum_j v_j
  DType dtype;
};
std::string launch_ecoformer_pairwise(const EcoParams& p, int64_t stream);
std::string launch_ecoformer_linear(const EcoParams& p, int64_t stream);

}  // namespace posattn
