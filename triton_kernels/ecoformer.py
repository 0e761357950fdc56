"""EcoFormer linear attention on bit-packed binary codes (Triton).

EcoFormer (Liu et al., NeurIPS 2022, arXiv 2209.09004); math in ALGORITHMS.md section 4 and the
float64 truth in ``posattn.reference.ecoformer_linear``. Launchers take validated tensors and
preallocated outputs; no autograd, checks or policy here (``posattn.ops.ecoformer`` does those).

Codes arrive packed: int32 words, bit t of a code in word t // 32 at bit t % 32, bit set <=> +1,
unused high bits of the last word 0. With h in {-1, +1}^b and keep_j in {0, 1} (key padding):

    S = sum_j keep_j h_j v_j^T = 2 * sum_{j: bit_t(h_j) = 1} keep_j v_j - s    (b, d_v)
    z = sum_j keep_j h_j       = 2 * #{j: bit_t(h_j) = 1, keep_j} - n          (b,)
    s = sum_j keep_j v_j (d_v,),   n = sum_j keep_j

so the key side is a sign-selected accumulation (additions only). The query side evaluates
    out_i = [h_i^T S + (b+1) s] / [h_i^T z + (b+1) n]        ("consistent")
    out_i = [h_i^T S + (b+1) v_i] / [h_i^T z + (b+1) n]      ("reference-code", FORM_REF)

Causal (top-left, key j visible to query i iff j <= i) is a blocked prefix scan:
``_ecoformer_state_kernel`` writes the state of every key block, the launcher turns it into an
exclusive prefix over blocks (torch.cumsum on the small (blocks, b, d_v) buffer), and
``_ecoformer_fwd_kernel`` adds the diagonal block pairwise, with h_i . h_j = b - 2 popc(q ^ k).
Popcount uses bit tricks (``_popcount32``): libdevice's popc does not run under TRITON_INTERPRET.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _popcount32(x):
    """Set bits of each int32 lane (SWAR). Arithmetic right shifts are safe: every mask clears the
    sign-extended high bits, and after the third step each byte holds <= 8, so x >= 0."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def _ecoformer_state_kernel(
    K, V, KEEP, S_OUT, Z_OUT, SV_OUT, N_OUT,
    stride_kb, stride_kh, stride_kn, stride_kw,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    num_heads_k, seqlen_k, num_blocks_n,
    NUM_BITS: tl.constexpr, BITS: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    # K: int32 words (batch, heads_k, seqlen_k, num_words); V: (batch, heads_k, seqlen_k, HEAD_DIM_V);
    # KEEP: fp32 (batch, seqlen_k), 1 = attend, 0 = padding.
    # S_OUT (batch*heads_k, num_blocks_n, BITS, HEAD_DIM), Z_OUT (.., BITS), SV_OUT (.., HEAD_DIM),
    # N_OUT (.., 1): fp32, contiguous; BITS / HEAD_DIM are NUM_BITS / HEAD_DIM_V padded to powers of 2.
    tl.static_assert(BITS >= NUM_BITS, "BITS must be NUM_BITS rounded up")
    tl.static_assert(HEAD_DIM >= HEAD_DIM_V, "HEAD_DIM must be HEAD_DIM_V rounded up")
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads_k
    off_h = pid_bh % num_heads_k

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BITS)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_n = offs_n < seqlen_k
    keep = valid_n.to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + off_b * stride_mb + offs_n * stride_mn, mask=valid_n, other=0.0)

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn \
        + (offs_t // 32)[None, :] * stride_kw
    bit_ok = offs_t < NUM_BITS
    words = tl.load(k_ptrs, mask=valid_n[:, None] & bit_ok[None, :], other=0)
    bits = ((words >> (offs_t % 32)[None, :]) & 1).to(tl.float32)        # (BLOCK_N, BITS) in {0, 1}
    sel = bits * keep[:, None]

    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=valid_n[:, None] & (offs_d < HEAD_DIM_V)[None, :], other=0.0).to(tl.float32)
    v = v * keep[:, None]

    # Sign-selected accumulation: row t of P sums the v_j whose bit t is set. Written as a 0/1
    # matrix product so a GPU runs it on the dot units; IEEE fp32 so it stays exact-to-rounding.
    p = tl.dot(tl.trans(sel), v, input_precision="ieee")                   # (BITS, HEAD_DIM)
    sv = tl.sum(v, 0)
    cnt = tl.sum(sel, 0)
    n = tl.sum(keep, 0)
    s_blk = tl.where(bit_ok[:, None], 2.0 * p - sv[None, :], 0.0)
    z_blk = tl.where(bit_ok, 2.0 * cnt - n, 0.0)

    base = pid_bh * num_blocks_n + pid_n
    tl.store(S_OUT + base * (BITS * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :], s_blk)
    tl.store(Z_OUT + base * BITS + offs_t, z_blk)
    tl.store(SV_OUT + base * HEAD_DIM + offs_d, sv)
    tl.store(N_OUT + base + tl.arange(0, 1), tl.full((1,), 0.0, tl.float32) + n)


@triton.jit
def _ecoformer_fwd_kernel(
    Q, K, V, KEEP, OUT, S_ST, Z_ST, SV_ST, N_ST,
    stride_qb, stride_qh, stride_qm, stride_qw,
    stride_kb, stride_kh, stride_kn, stride_kw,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    num_heads, num_heads_k, seqlen_q, seqlen_k, num_states,
    NUM_BITS: tl.constexpr, NUM_WORDS: tl.constexpr, BITS: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, FORM_REF: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    # Q: int32 words (batch, heads, seqlen_q, NUM_WORDS); K as in the state kernel; OUT (batch, heads,
    # seqlen_q, HEAD_DIM_V). States (batch*heads_k, num_states, ...): causal, the exclusive prefix over
    # key blocks (num_states = blocks + 1, entry m = blocks < m); otherwise the total (num_states = 1).
    tl.static_assert(not IS_CAUSAL or BLOCK_M == BLOCK_N, "causal needs aligned query/key blocks")
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // (num_heads // num_heads_k)   # GQA: query head h reads key/value head h // group
    C = NUM_BITS + 1.0                              # the positive shift of h_i . h_j in the weight

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BITS)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_m = offs_m < seqlen_q
    bit_ok = offs_t < NUM_BITS
    d_ok = offs_d < HEAD_DIM_V

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm \
        + (offs_t // 32)[None, :] * stride_qw
    qwords = tl.load(q_ptrs, mask=valid_m[:, None] & bit_ok[None, :], other=0)
    qbits = (qwords >> (offs_t % 32)[None, :]) & 1
    qf = tl.where(bit_ok[None, :], 2.0 * qbits.to(tl.float32) - 1.0, 0.0)   # (BLOCK_M, BITS) in {-1, 0, +1}

    if IS_CAUSAL:
        idx = tl.minimum(pid_m, num_states - 1)
    else:
        idx = pid_m * 0
    st = pid_bh // num_heads * num_heads_k + off_hk
    st = st * num_states + idx
    s_mat = tl.load(S_ST + st * (BITS * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :])
    z = tl.load(Z_ST + st * BITS + offs_t)
    sv = tl.load(SV_ST + st * HEAD_DIM + offs_d)
    n_vis = tl.sum(tl.load(N_ST + st + tl.arange(0, 1)), 0) + tl.zeros((BLOCK_M,), tl.float32)

    num = tl.dot(qf, s_mat, input_precision="ieee")                 # h_i^T S   (BLOCK_M, HEAD_DIM)
    den = tl.sum(qf * z[None, :], 1) + C * n_vis                    # h_i^T z + (b+1) n
    if not FORM_REF:
        num += C * sv[None, :]

    if IS_CAUSAL:
        # Diagonal block: keys j in [pid_m*BLOCK_N, ...) with j <= i, pairwise by XOR + popcount.
        offs_n = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < seqlen_k
        keep = valid_n.to(tl.float32)
        if HAS_KEEP:
            keep = tl.load(KEEP + off_b * stride_mb + offs_n * stride_mn, mask=valid_n, other=0.0)
        ham = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for w in tl.static_range(NUM_WORDS):
            qw = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m * stride_qm + w * stride_qw,
                         mask=valid_m, other=0)
            kw = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n * stride_kn + w * stride_kw,
                         mask=valid_n, other=0)
            ham += _popcount32(qw[:, None] ^ kw[None, :])
        dots = NUM_BITS - 2.0 * ham.to(tl.float32)                  # h_i . h_j
        vis = tl.where(offs_n[None, :] <= offs_m[:, None], keep[None, :], 0.0)
        v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=valid_n[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if FORM_REF:
            num += tl.dot(dots * vis, v, input_precision="ieee")
        else:
            num += tl.dot((dots + C) * vis, v, input_precision="ieee")
        den += tl.sum((dots + C) * vis, 1)
        n_vis += tl.sum(vis, 1)

    if FORM_REF:
        # The authors' code adds (b+1) v_i, the value at the query's own position (seqlen_q == seqlen_k).
        vi_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_m[:, None] * stride_vn + offs_d[None, :] * stride_vd
        num += C * tl.load(vi_ptrs, mask=valid_m[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    has_key = n_vis > 0
    out = tl.where(has_key[:, None], num / tl.where(has_key, den, 1.0)[:, None], 0.0)
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=valid_m[:, None] & d_ok[None, :])


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(x))


def ecoformer_linear_fwd(q_words: torch.Tensor, k_words: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
                         num_bits: int, causal: bool, key_keep: torch.Tensor | None = None,
                         form_ref: bool = False, block: int = 64) -> None:
    """Launch the EcoFormer linear form; writes ``out``.

    q_words int32 (batch, heads, seqlen_q, num_words); k_words int32 (batch, heads_k, seqlen_k,
    num_words); v (batch, heads_k, seqlen_k, head_dim_v); out (batch, heads, seqlen_q, head_dim_v);
    key_keep fp32 (batch, seqlen_k) with 1 = attend, 0 = padding, or None. Any strides.
    ``block`` (a power of two >= 16) is the key/query block length; 64 keeps the diagonal
    (block x block) pairwise tile and the (bits x head_dim) state small. Not yet tuned on a GPU.
    """
    batch, heads, seqlen_q, num_words = q_words.shape
    heads_k, seqlen_k, head_dim_v = k_words.shape[1], k_words.shape[2], v.shape[3]
    bits_p, dim_p = _pow2(num_bits), _pow2(head_dim_v)
    nb = triton.cdiv(seqlen_k, block)
    dev = v.device
    s_part = torch.empty(batch * heads_k, nb, bits_p, dim_p, device=dev, dtype=torch.float32)
    z_part = torch.empty(batch * heads_k, nb, bits_p, device=dev, dtype=torch.float32)
    sv_part = torch.empty(batch * heads_k, nb, dim_p, device=dev, dtype=torch.float32)
    n_part = torch.empty(batch * heads_k, nb, 1, device=dev, dtype=torch.float32)
    has_keep = key_keep is not None
    keep = key_keep if has_keep else s_part          # dummy pointer, never read
    keep_strides = (key_keep.stride(0), key_keep.stride(1)) if has_keep else (0, 0)
    if nb > 0:
        _ecoformer_state_kernel[(nb, batch * heads_k)](
            k_words, v, keep, s_part, z_part, sv_part, n_part,
            *k_words.stride(), *v.stride(), *keep_strides,
            heads_k, seqlen_k, nb,
            NUM_BITS=num_bits, BITS=bits_p, HEAD_DIM_V=head_dim_v, HEAD_DIM=dim_p,
            BLOCK_N=block, HAS_KEEP=has_keep,
        )
    parts = (s_part, z_part, sv_part, n_part)
    if causal:
        # Exclusive prefix over key blocks: entry m holds blocks 0..m-1 (entry nb = all of them).
        states = [torch.cat([torch.zeros_like(p[:, :1]), p.cumsum(1)], 1).contiguous() for p in parts]
    else:
        states = [p.sum(1, keepdim=True).contiguous() for p in parts]
    grid = (triton.cdiv(seqlen_q, block), batch * heads)
    _ecoformer_fwd_kernel[grid](
        q_words, k_words, v, keep, out, *states,
        *q_words.stride(), *k_words.stride(), *v.stride(), *out.stride(), *keep_strides,
        heads, heads_k, seqlen_q, seqlen_k, states[0].shape[1],
        NUM_BITS=num_bits, NUM_WORDS=num_words, BITS=bits_p, HEAD_DIM_V=head_dim_v, HEAD_DIM=dim_p,
        BLOCK_M=block, BLOCK_N=block, IS_CAUSAL=causal, FORM_REF=form_ref, HAS_KEEP=has_keep,
    )


def report_cases():
    """(label, thunk) pairs for ``python -m posattn report``: the launcher on small CPU tensors with the
    block size and modes a GPU call uses (see posattn.report)."""

    def case(dtype, num_bits, head_dim_v, causal, *, padded=False, form_ref=False, group=1):
        def thunk():
            B, Hk, N = 2, 2, 300
            H = Hk * group
            words = -(-num_bits // 32)
            q = torch.zeros(B, H, N, words, dtype=torch.int32)
            k = torch.zeros(B, Hk, N, words, dtype=torch.int32)
            v = torch.randn(B, Hk, N, head_dim_v).to(dtype)
            keep = torch.ones(B, N) if padded else None
            ecoformer_linear_fwd(q, k, v, torch.empty(B, H, N, head_dim_v, dtype=dtype), num_bits=num_bits,
                                 causal=causal, key_keep=keep, form_ref=form_ref)
        return thunk

    return [
        ("fp16 b16 d64 non-causal", case(torch.float16, 16, 64, False)),
        ("bf16 b16 d64 causal padded", case(torch.bfloat16, 16, 64, True, padded=True)),
        ("fp16 b64 d128 causal gqa4", case(torch.float16, 64, 128, True, group=4)),
        ("fp32 b16 d64 causal reference-code", case(torch.float32, 16, 64, True, form_ref=True)),
    ]
