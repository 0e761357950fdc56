"""EcoFormer linear attention on bit-packed binary codes (Triton).

EcoFormer (Liu et al., NeurIPS 2022, arXiv 2209.09004); math in docs/ALGORITHMS.md section 4 and the
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

Every sum runs on the tensor cores as a matrix product whose left operand is exact in the input
type: the sign-selected sum is ``sel^T V`` with sel in {0, 1}; ``h_i^T S`` has h in {-1, +1}; the
diagonal block is ``W V`` with integer weights |w| <= 2b+1. With fp16/bf16 v the products run in
v's dtype (exact products, fp32 accumulation); fp32 operands go through ``_dot_exact_a`` (a tf32
head/tail split, ~2^-20 relative; the weights are split too when b >= 1024). Register use is bounded by tiling: the state over (32 bits x 64
d_v) per program, the forward over 64 d_v per program with a loop over 32-bit tiles of the codes.
An earlier version held (bits x d_v) and (block x d_v) fp32 tiles with an fp32 FMA dot (the whole
K dimension of each operand in registers) and spilled heavily; ``python -m posattn report --only
ecoformer`` now shows no spills on sm_80/sm_90 for every ``report_cases()`` entry. Not yet run on a GPU.
"""
from __future__ import annotations

import os

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
def _tf32_head(b):
    """fp32 ``b`` with its low 13 mantissa bits cleared: the top 11 significant bits, exact in tf32;
    ``b - _tf32_head(b)`` is exact in fp32 and smaller than 2^-10 |b|."""
    return (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot_exact_a(a, b, acc):
    """acc + a @ b on tf32 tensor cores, for fp32 ``b`` and an ``a`` exact in tf32 (0/1, +-1, integers
    of magnitude <= 2048). ``b = hi + lo`` (``_tf32_head``): ``a @ hi`` is exact and ``a @ lo`` loses
    at most 2^-10 of ``lo``, so each product is within ~2^-20 relative (plain tf32: 2^-11). Two
    products; Triton's "tf32x3" would spend a third on the zero tail of ``a``."""
    hi = _tf32_head(b)
    acc = tl.dot(a, hi, acc, input_precision="tf32")
    return tl.dot(a, b - hi, acc, input_precision="tf32")


@triton.jit
def _ecoformer_state_kernel(
    K, V, KEEP, S_OUT, Z_OUT, SV_OUT, N_OUT,
    stride_kb, stride_kh, stride_kn, stride_kw,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    num_heads_k, seqlen_k, num_blocks_n,
    NUM_BITS: tl.constexpr, BITS: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KEEP: tl.constexpr,
    SEL_IN_V_DTYPE: tl.constexpr,
):
    # Grid (key blocks, batch*heads_k, (BITS / BLOCK_T) * (HEAD_DIM / BLOCK_D)): one key block, one
    # head, one (bit tile, d_v tile) of the state.
    # K: int32 words (batch, heads_k, seqlen_k, num_words); V: (batch, heads_k, seqlen_k, HEAD_DIM_V);
    # KEEP: fp32 (batch, seqlen_k), 1 = attend, 0 = padding.
    # S_OUT (batch*heads_k, num_blocks_n, BITS, HEAD_DIM), Z_OUT (.., BITS), SV_OUT (.., HEAD_DIM),
    # N_OUT (.., 1): fp32, contiguous; BITS / HEAD_DIM are NUM_BITS / HEAD_DIM_V padded to powers of 2.
    # Z_OUT is written by d tile 0, SV_OUT by bit tile 0, N_OUT by the program with both 0.
    tl.static_assert(BITS >= NUM_BITS, "BITS must be NUM_BITS rounded up")
    tl.static_assert(HEAD_DIM >= HEAD_DIM_V, "HEAD_DIM must be HEAD_DIM_V rounded up")
    tl.static_assert(HEAD_DIM % BLOCK_D == 0, "BLOCK_D must divide HEAD_DIM")
    tl.static_assert(BITS % BLOCK_T == 0, "BLOCK_T must divide BITS")
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_td = tl.program_id(2)
    pid_t = pid_td // (HEAD_DIM // BLOCK_D)
    pid_d = pid_td % (HEAD_DIM // BLOCK_D)
    off_b = pid_bh // num_heads_k
    off_h = pid_bh % num_heads_k

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_n = offs_n < seqlen_k
    keep = valid_n.to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + off_b * stride_mb + offs_n * stride_mn, mask=valid_n, other=0.0)

    # The code bits loaded transposed, (BLOCK_T, BLOCK_N): the 0/1 selection matrix sel^T.
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn \
        + (offs_t // 32)[:, None] * stride_kw
    bit_ok = offs_t < NUM_BITS
    words = tl.load(k_ptrs, mask=bit_ok[:, None] & valid_n[None, :], other=0)
    sel_t = ((words >> (offs_t % 32)[:, None]) & 1).to(tl.float32) * keep[None, :]   # keep_j [bit_t(h_j) = 1]

    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=valid_n[:, None] & (offs_d < HEAD_DIM_V)[None, :], other=0.0)
    # padded keys: select 0, never multiply (0 * NaN/inf in the padding would be read into every sum)
    v = tl.where(keep[:, None] > 0, v, 0.0)

    # The sign-selected accumulation as one matrix product on the tensor cores: row t of P sums the
    # kept v_j whose bit t is set. sel is 0/1, so in v's own fp16/bf16 every product is exact and the
    # accumulation is fp32 (as exact as an fp32 loop of additions); fp32 v: _dot_exact_a.
    if SEL_IN_V_DTYPE:
        p = tl.dot(sel_t.to(v.dtype), v)                                         # (BLOCK_T, BLOCK_D) fp32
    else:
        p = _dot_exact_a(sel_t, v.to(tl.float32), tl.zeros((BLOCK_T, BLOCK_D), tl.float32))
    sv = tl.sum(v.to(tl.float32) * keep[:, None], 0)
    s_blk = tl.where(bit_ok[:, None], 2.0 * p - sv[None, :], 0.0)

    base = pid_bh * num_blocks_n + pid_n
    tl.store(S_OUT + base * (BITS * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :], s_blk)
    n = tl.sum(keep, 0)
    if pid_t == 0:
        tl.store(SV_OUT + base * HEAD_DIM + offs_d, sv)
    if pid_d == 0:
        tl.store(Z_OUT + base * BITS + offs_t, tl.where(bit_ok, 2.0 * tl.sum(sel_t, 1) - n, 0.0))
    if pid_td == 0:
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
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, FORM_REF: tl.constexpr,
    HAS_KEEP: tl.constexpr, W_IN_V_DTYPE: tl.constexpr,
):
    # Grid (query blocks, batch*heads, HEAD_DIM / BLOCK_D): one query block, one head, one d_v tile.
    # Q: int32 words (batch, heads, seqlen_q, NUM_WORDS); K as in the state kernel; OUT (batch, heads,
    # seqlen_q, HEAD_DIM_V). States (batch*heads_k, num_states, ...): causal, the exclusive prefix over
    # key blocks (num_states = blocks + 1, entry m = blocks < m); otherwise the total (num_states = 1).
    # Registers: the d_v tile bounds the (BLOCK_M, BLOCK_D) accumulator, and h_i^T S runs as a loop
    # over bit tiles (the GEMM's K loop), so at most a (BLOCK_T, BLOCK_D) slice of the state is live;
    # the cheap parts (codes, popcounts, denominator) are recomputed per d_v tile.
    tl.static_assert(not IS_CAUSAL or BLOCK_M == BLOCK_N, "causal needs aligned query/key blocks")
    tl.static_assert(HEAD_DIM % BLOCK_D == 0, "BLOCK_D must divide HEAD_DIM")
    tl.static_assert(BITS % BLOCK_T == 0, "BLOCK_T must divide BITS")
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // (num_heads // num_heads_k)   # GQA: query head h reads key/value head h // group
    C = NUM_BITS + 1.0                              # the positive shift of h_i . h_j in the weight

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_m = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM_V

    if IS_CAUSAL:
        idx = tl.minimum(pid_m, num_states - 1)
    else:
        idx = pid_m * 0
    st = (pid_bh // num_heads * num_heads_k + off_hk) * num_states + idx
    q_row = Q + off_b * stride_qb + off_h * stride_qh + offs_m * stride_qm
    num = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    for t0 in range(0, BITS, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        bit_ok = offs_t < NUM_BITS
        qwords = tl.load(q_row[:, None] + (offs_t // 32)[None, :] * stride_qw,
                         mask=valid_m[:, None] & bit_ok[None, :], other=0)
        qbits = (qwords >> (offs_t % 32)[None, :]) & 1
        qf = tl.where(bit_ok[None, :], 2.0 * qbits.to(tl.float32) - 1.0, 0.0)   # (BLOCK_M, BLOCK_T) in {-1, 0, +1}
        s_mat = tl.load(S_ST + st * (BITS * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :])
        z = tl.load(Z_ST + st * BITS + offs_t)
        num = _dot_exact_a(qf, s_mat, num)                          # += h_i^T S (the +-1 codes are exact in tf32)
        den += tl.sum(qf * z[None, :], 1)                           # += h_i^T z
    n_vis = tl.sum(tl.load(N_ST + st + tl.arange(0, 1)), 0) + tl.zeros((BLOCK_M,), tl.float32)
    den += C * n_vis                                                # + (b+1) n
    if not FORM_REF:
        sv = tl.load(SV_ST + st * HEAD_DIM + offs_d)
        num += C * sv[None, :]

    if IS_CAUSAL:
        # Diagonal block: keys j in [pid_m*BLOCK_N, ...) with j <= i, pairwise by XOR + popcount.
        offs_n = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < seqlen_k
        keep = valid_n.to(tl.float32)
        if HAS_KEEP:
            keep = tl.load(KEEP + off_b * stride_mb + offs_n * stride_mn, mask=valid_n, other=0.0)
        ham = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for w in range(NUM_WORDS):
            qw = tl.load(q_row + w * stride_qw, mask=valid_m, other=0)
            kw = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n * stride_kn + w * stride_kw,
                         mask=valid_n, other=0)
            ham += _popcount32(qw[:, None] ^ kw[None, :])
        vis = tl.where(offs_n[None, :] <= offs_m[:, None], keep[None, :], 0.0)
        wgt = (C + NUM_BITS - 2.0 * ham.to(tl.float32)) * vis            # w_ij = h_i . h_j + (b+1), visible
        den += tl.sum(wgt, 1)
        n_vis += tl.sum(vis, 1)
        if FORM_REF:
            wgt -= C * vis                                               # the repository drops (b+1) v_j
        v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=valid_n[:, None] & d_ok[None, :], other=0.0)
        # keys no valid row of this tile sees (padded, or past the last query): select 0, never multiply
        # (0 * NaN/inf would be NaN; found by tests/test_fuzz_ecoformer.py)
        v = tl.where((tl.sum(tl.where(valid_m[:, None], vis, 0.0), 0) > 0)[:, None], v, 0.0)
        if W_IN_V_DTYPE:
            # integer weights |w| <= 2b+1, exact in v's fp16/bf16 (the launcher checks the bound)
            num = tl.dot(wgt.to(v.dtype), v, num)
        elif 2 * NUM_BITS + 1 <= 2048:
            num = _dot_exact_a(wgt, v.to(tl.float32), num)             # |w| <= 2048: exact in tf32
        else:
            # b >= 1024: split the integer weights too (head and tail each exact in tf32, |w| < 2^22)
            w_hi = _tf32_head(wgt)
            num = _dot_exact_a(w_hi, v.to(tl.float32), num)
            num = _dot_exact_a(wgt - w_hi, v.to(tl.float32), num)

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


# Every integer of magnitude <= this is exact in the dtype (2^(significand bits)).
_EXACT_INT = {torch.float16: 2048, torch.bfloat16: 256}


def ecoformer_linear_fwd(q_words: torch.Tensor, k_words: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
                         num_bits: int, causal: bool, key_keep: torch.Tensor | None = None,
                         form_ref: bool = False, block: int = 64) -> None:
    """Launch the EcoFormer linear form; writes ``out``.

    q_words int32 (batch, heads, seqlen_q, num_words); k_words int32 (batch, heads_k, seqlen_k,
    num_words); v (batch, heads_k, seqlen_k, head_dim_v) fp16/bf16/fp32; out (batch, heads, seqlen_q,
    head_dim_v); key_keep fp32 (batch, seqlen_k) with 1 = attend, 0 = padding (only 0 and 1), or None.
    Any strides. ``block`` (a power of two >= 16) is the key/query block length.

    Tiles (chosen so that every ``report_cases()`` configuration compiles for sm_80 and sm_90 without
    register spills, ``python -m posattn report --only ecoformer``): state kernel 4 warps, a
    (block x 32 bits) x (block x 64 d_v) product per program; forward kernel 8 warps, a
    (block x 64 d_v) accumulator with the bits in an unpipelined loop of 32-bit tiles. Not yet run on
    a GPU: the tile sizes are picked for registers, not timed.
    """
    batch, heads, seqlen_q, num_words = q_words.shape
    heads_k, seqlen_k, head_dim_v = k_words.shape[1], k_words.shape[2], v.shape[3]
    bits_p, dim_p = _pow2(num_bits), _pow2(head_dim_v)
    block_t, block_d = min(bits_p, 32), min(dim_p, 64)
    nt, nd = bits_p // block_t, dim_p // block_d
    nb = triton.cdiv(seqlen_k, block)
    dev = v.device
    s_part = torch.empty(batch * heads_k, nb, bits_p, dim_p, device=dev, dtype=torch.float32)
    z_part = torch.empty(batch * heads_k, nb, bits_p, device=dev, dtype=torch.float32)
    sv_part = torch.empty(batch * heads_k, nb, dim_p, device=dev, dtype=torch.float32)
    n_part = torch.empty(batch * heads_k, nb, 1, device=dev, dtype=torch.float32)
    has_keep = key_keep is not None
    keep = key_keep if has_keep else s_part          # dummy pointer, never read
    keep_strides = (key_keep.stride(0), key_keep.stride(1)) if has_keep else (0, 0)
    # fp16/bf16: 0/1 and small integers are exact in v's dtype, so the products run in it. Not bf16 under
    # TRITON_INTERPRET=1: Triton 3.9's interpreter keeps bf16 as uint16 and its tl.dot multiplies the
    # raw bits; there the fp32 path (exact products of the same bf16-rounded values) stands in.
    low = v.dtype == torch.float16 or (v.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") != "1")
    if nb > 0:
        _ecoformer_state_kernel[(nb, batch * heads_k, nt * nd)](
            k_words, v, keep, s_part, z_part, sv_part, n_part,
            *k_words.stride(), *v.stride(), *keep_strides,
            heads_k, seqlen_k, nb,
            NUM_BITS=num_bits, BITS=bits_p, HEAD_DIM_V=head_dim_v, HEAD_DIM=dim_p,
            BLOCK_N=block, BLOCK_T=block_t, BLOCK_D=block_d, HAS_KEEP=has_keep, SEL_IN_V_DTYPE=low,
            num_warps=4,
        )
    parts = (s_part, z_part, sv_part, n_part)
    if causal:
        # Exclusive prefix over key blocks: entry m holds blocks 0..m-1 (entry nb = all of them).
        # (an explicit leading zero state: with seqlen_k == 0 there are no blocks and p[:, :1] is empty, which left
        # no state at all and the kernel read at index -1: a segfault under the interpreter; tests/test_fuzz_ecoformer.py)
        states = [torch.cat([p.new_zeros((p.shape[0], 1) + tuple(p.shape[2:])), p.cumsum(1)], 1).contiguous()
                  for p in parts]
    else:
        states = [p.sum(1, keepdim=True).contiguous() for p in parts]
    grid = (triton.cdiv(seqlen_q, block), batch * heads, nd)
    _ecoformer_fwd_kernel[grid](
        q_words, k_words, v, keep, out, *states,
        *q_words.stride(), *k_words.stride(), *v.stride(), *out.stride(), *keep_strides,
        heads, heads_k, seqlen_q, seqlen_k, states[0].shape[1],
        NUM_BITS=num_bits, NUM_WORDS=num_words, BITS=bits_p, HEAD_DIM_V=head_dim_v, HEAD_DIM=dim_p,
        BLOCK_M=block, BLOCK_N=block, BLOCK_T=block_t, BLOCK_D=block_d, IS_CAUSAL=causal,
        FORM_REF=form_ref, HAS_KEEP=has_keep, W_IN_V_DTYPE=low and 2 * num_bits + 1 <= _EXACT_INT.get(v.dtype, 0),
        num_warps=8, num_stages=1,   # the bit-tile loop is 1-8 steps: pipelining it only costs registers
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
        # several bit tiles (bits padded 100 -> 128) and d_v tiles (256 = 4 x 64), fp32 split products
        ("fp32 b100 d256 causal padded", case(torch.float32, 100, 256, True, padded=True)),
    ]
