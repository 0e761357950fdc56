"""``@triton.jit`` helpers for the positional encodings fused into attention kernels.

The math of every encoding lives here once for Triton (the float64 truth is
``posattn.reference``; the CUDA twin is ``csrc/include/posattn/*.cuh``). Shared by
``fused_attention.py`` and, later, the decode kernel. Nothing here launches anything.

Conventions (docs/INTERNALS.md):

* ``rel = pk - pq`` (key index minus query index position, both as the mask sees them).
* Rotary encodings (``ROTARY_MODE`` 1 RoPE, 2 xPos, 3 learned phases) work on *half tiles*: the
  kernels load the first and second element of every rotated pair as two [BLOCK, HEAD_DIM/2]
  tiles (``rotary_pair_cols`` gives their memory columns for the interleaved and the half
  layout), rotate them elementwise (``rotate``) and compute ``q . k`` as two half-width dots.
  dq / dk are stored through the same column map; the rotated q / k never go to memory.
* Angles are fp32 products of integer positions and fp32 inverse frequencies (ARCHITECTURE.md:
  never in fp16/bf16); positions are exact in fp32 up to 2**24. They are range-reduced here
  (``reduce_angle``) and fed to the hardware's approximate cos / sin on a GPU (``cos_sin``).
* Biases are returned in natural-log units; the caller multiplies by log2(e).
"""
from __future__ import annotations

import triton
import triton.language as tl


# 2*pi as a sum of two fp32 numbers (Cody-Waite): TWO_PI_HI = fp32(2 pi), TWO_PI_LO = fp32(2 pi - TWO_PI_HI).
TWO_PI_HI = tl.constexpr(6.2831854820251465)
TWO_PI_LO = tl.constexpr(-1.7484555314695172e-07)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def reduce_angle(a):
    """``a - 2 pi k``, ``k = round(a / 2 pi)``; a fp32. In [-pi, pi] up to the fp32 rounding of
    ``a / 2 pi`` that picks k (|result| <= pi + 2**-23 |a|, e.g. pi + 0.12 at a = 1e6).

    Cody-Waite with a two-constant split of 2 pi and fused multiply-adds. Why it is accurate:
    for |a| >= 4, ``a`` and ``k * TWO_PI_HI`` are both multiples of 2**-21 (TWO_PI_HI has 24 bits
    with exponent 2), so ``a - k * TWO_PI_HI`` (|.| < 4) is exact in fp32 and the first fma does not
    round; the second rounds once (<= 1.2e-7 absolute) and the split's own error is ~7e-15 * |k|
    (1e-9 at a = 1e6). fp32 angles stay exact for positions up to 2**24. ``tl.fma`` rounds once
    on the GPU and in the interpreter alike, so both paths reduce to the same bits.
    libdevice ``sinf``/``cosf`` would do this reduction themselves, but past |a| ~ 1e5 they take the
    Payne-Hanek path whose local-memory table shows up as LDL/STL in every kernel that uses them.
    """
    k = tl.floor(a * INV_TWO_PI + 0.5)
    r = tl.fma(-k, TWO_PI_HI, a)
    return tl.fma(-k, TWO_PI_LO, r)


@triton.jit
def cos_sin(a, FAST_TRIG: tl.constexpr):
    """(cos a, sin a) of an fp32 angle tensor, after ``reduce_angle``.

    FAST_TRIG (GPU): PTX ``cos.approx.f32`` / ``sin.approx.f32`` (one MUFU op each; PTX ISA: max
    absolute error 2**-20.9 ~ 5e-7 on [-pi, pi]), so with the reduction the result is within ~7e-7
    of cos / sin of the exact fp32 angle for any |a| < 2**24 (tests/test_fused_attention_triton.py
    checks the reduction + tl.cos path to 1e-6 up to a = 1e6; the approx path is not yet run on a
    GPU). Not FAST_TRIG (``TRITON_INTERPRET=1``, where inline asm cannot run): ``tl.cos`` /
    ``tl.sin`` of the same reduced angle.
    """
    r = reduce_angle(a)
    if FAST_TRIG:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True,
                                      pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        c = tl.cos(r)
        s = tl.sin(r)
    return c, s


@triton.jit
def rotary_pair_cols(pair, rotary_half, INTERLEAVED: tl.constexpr):
    """Memory columns ``(col_a, col_b)`` of rotation pair ``pair`` (int32 [HALF]).

    The kernels hold q and k as two half tiles ``x_a = x[:, col_a]``, ``x_b = x[:, col_b]``, so the
    rotation is elementwise on [BLOCK, HALF] tiles and ``q . k = q_a . k_a + q_b . k_b`` (two
    half-width dots, no permuted reload, no reshape/join through shared memory).
    Interleaved (GPT-J, pairs (2i, 2i+1)): ``(2i, 2i+1)``. Half layout (GPT-NeoX / Llama, pairs
    (i, i + r/2)): ``(i, i + r/2)`` for i < r/2. Pairs i >= r/2 hold the pass-through columns
    ``(2i, 2i+1)`` (>= r; cos 1, sin 0 for them), so the pairs cover every column < 2 * HALF once.
    """
    if INTERLEAVED:
        col_a = 2 * pair
        col_b = 2 * pair + 1
    else:
        rot = pair < rotary_half
        col_a = tl.where(rot, pair, 2 * pair)
        col_b = tl.where(rot, pair + rotary_half, 2 * pair + 1)
    return col_a, col_b


@triton.jit
def rotary_cos_sin(pos, tok, row_mask, INV_FREQ, PHASES_BH, stride_pht, rotary_half, rotary_scale, head_dim,
                   xpos_center, xpos_scale_base,
                   IS_KEY: tl.constexpr, ROTARY_MODE: tl.constexpr, HALF: tl.constexpr, FAST_TRIG: tl.constexpr):
    """cos and sin ``[BLOCK, HALF]`` (fp32) of one block of rows, with every per-pair factor folded in.

    pos : int [BLOCK]     rotation positions (RoPE ``position_ids`` or index positions)
    tok : int [BLOCK]     token index into the learned phases (ROTARY_MODE 3)
    ROTARY_MODE 1 (RoPE): angle ``pos * inv_freq[i]`` (fp32); cos and sin times ``rotary_scale`` (YaRN).
    ROTARY_MODE 2 (xPos, arXiv 2212.10554): also times ``zeta_i ** (+-(pos - c) / scale_base)`` with
        ``zeta_i = (2i + 0.4 d) / (1.4 d)``: + for queries, - for keys (``IS_KEY``); any common
        centre ``c`` cancels in q . k, the kernels pick one per block to keep factors near 1.
    ROTARY_MODE 3 (CARoPE phases, arXiv 2507.23083): angle ``phases[tok, i]`` (already cumulated).
    Pairs ``i >= rotary_half`` (pass-through features and head_dim padding) get cos 1, sin 0.
    Trigonometry: ``cos_sin`` (range reduction, then fast or libm cos/sin per FAST_TRIG).
    """
    pair = tl.arange(0, HALF)
    pmask = pair < rotary_half
    if ROTARY_MODE == 3:
        ang = tl.load(PHASES_BH + tok[:, None] * stride_pht + pair[None, :],
                      mask=row_mask[:, None] & pmask[None, :], other=0.0)
    else:
        freq = tl.load(INV_FREQ + pair, mask=pmask, other=0.0)
        ang = pos.to(tl.float32)[:, None] * freq[None, :]
    c, s = cos_sin(ang, FAST_TRIG)
    if ROTARY_MODE == 1:
        c = c * rotary_scale
        s = s * rotary_scale
    if ROTARY_MODE == 2:
        zeta = (2.0 * pair.to(tl.float32) + 0.4 * head_dim) / (1.4 * head_dim)
        expo = (pos - xpos_center).to(tl.float32) / xpos_scale_base
        if IS_KEY:
            expo = -expo
        fac = tl.exp2(tl.log2(zeta)[None, :] * expo[:, None])
        c = c * fac
        s = s * fac
    c = tl.where(pmask[None, :], c, 1.0)
    s = tl.where(pmask[None, :], s, 0.0)
    return c, s


@triton.jit
def rotate(xa, xb, c, s):
    """Each pair (a, b) -> (a c - b s, a s + b c); half tiles fp32 [BLOCK, HALF], c/s like them.

    The transpose (gradient of the rotation, and the inverse rotation when no factor is folded
    into c, s) is ``rotate(ga, gb, c, -s)``.
    """
    return xa * c - xb * s, xa * s + xb * c


@triton.jit
def rotary_dphase_unrotated(xa, xb, da, db):
    """d loss / d angle ``[BLOCK, HALF]`` of (ya, yb) = rotate(xa, xb, c, s) (c, s = cos, sin of the angle,
    no extra factor: learned phases), from the gradient w.r.t. the unrotated x, ``(da, db) = rotate(ga, gb, c,
    -s)`` with (ga, gb) = d loss / d y: dy_a/dtheta = -y_b, dy_b/dtheta = y_a, so dtheta = g_b y_a - g_a y_b
    = x_a d_b - x_b d_a (cos / sin not needed)."""
    return xa * db - xb * da


@triton.jit
def relative_index(rel, max_distance):
    """Column of a Toeplitz table (RelativeBias / URPE / the T5 lookup): ``clamp(rel, -D, D) + D``."""
    return tl.minimum(tl.maximum(rel, -max_distance), max_distance) + max_distance


@triton.jit
def additive_bias(rel, slope, TABLE_H, stride_ti, T5_LUT, max_distance, BIAS_MODE: tl.constexpr):
    """Additive logit bias ``[BLOCK_M, BLOCK_N]`` fp32, natural-log units.

    BIAS_MODE 1 ALiBi (arXiv 2108.12409, FlashAttention-2's symmetric form): ``-slope * |rel|``.
    BIAS_MODE 2 RelativeBias: ``table[h, clamp(rel, -D, D) + D]`` (TABLE_H points at row h).
    BIAS_MODE 3 T5 (arXiv 1910.10683): ``table[bucket(rel), h]``. The bucket comes from a small
        int32 lookup table ``T5_LUT[clamp(rel, -D, D) + D]`` (D = max_distance + 1, every bucket
        is constant beyond it) built on the host by ``posattn.reference.t5_bucket`` itself, so
        the kernel matches the reference bit for bit and never evaluates log(0).
    """
    if BIAS_MODE == 1:
        bias = -slope * tl.abs(rel).to(tl.float32)
    else:
        idx = relative_index(rel, max_distance)
        if BIAS_MODE == 3:
            idx = tl.load(T5_LUT + idx)
        bias = tl.load(TABLE_H + idx * stride_ti).to(tl.float32)
    return bias


@triton.jit
def urpe_coef(rel, URPE_H, stride_ui, max_distance):
    """URPE multiplier ``table[h, clamp(rel, -D, D) + D]`` (arXiv 2205.13401), fp32."""
    return tl.load(URPE_H + relative_index(rel, max_distance) * stride_ui).to(tl.float32)


@triton.jit
def toeplitz_accumulate(acc, x, base, max_distance,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr,
                        TABLE_BLOCK: tl.constexpr):
    """acc[bin] += sum of x[i, j] over the entries whose ``clamp(rel, -D, D) + D == bin``.

    x: fp32 [BLOCK_M, BLOCK_N], zero wherever it must not count; ``rel = base + j - i``.
    acc: fp32 [TABLE_BLOCK], TABLE_BLOCK >= 2D + 1. Deterministic and atomic-free: the block is
    skewed with ``tl.gather`` along its rows so that each of its BLOCK_M + BLOCK_N - 1 diagonals
    becomes a row of a [DIAG, BLOCK_N] tile (``diag[t] = sum_j x[j + (BLOCK_M - 1) - t, j]``,
    rel = base + t - (BLOCK_M - 1)), then the diagonals inside (-D, D) are gathered into their bins
    and the rest summed into the two edge bins. This is the gradient of a Toeplitz table
    (RelativeBias, T5 before bucketing, URPE). The skewed tile is DIAG x BLOCK_N (not
    BLOCK_M x DIAG): the dq kernel's BLOCK_N is the small side, which keeps it in registers.
    """
    jj = tl.arange(0, BLOCK_N)
    t = tl.arange(0, DIAG)
    row = jj[None, :] + (BLOCK_M - 1) - t[:, None]
    ok = (row >= 0) & (row < BLOCK_M)
    y = tl.gather(x, tl.where(ok, row, 0), 0)
    diag = tl.sum(tl.where(ok, y, 0.0), 1)
    rel_t = base + t - (BLOCK_M - 1)
    t_ok = t < BLOCK_M + BLOCK_N - 1
    lo = tl.sum(tl.where(t_ok & (rel_t <= -max_distance), diag, 0.0), 0)
    # rel > -D keeps D = 0 (a single bin) from counting rel == 0 twice
    hi = tl.sum(tl.where(t_ok & (rel_t >= max_distance) & (rel_t > -max_distance), diag, 0.0), 0)
    bins = tl.arange(0, TABLE_BLOCK)
    tb = bins - max_distance - base + (BLOCK_M - 1)
    inner = (bins > 0) & (bins < 2 * max_distance) & (tb >= 0) & (tb < BLOCK_M + BLOCK_N - 1)
    g = tl.gather(diag, tl.where(inner, tb, 0).to(tl.int32), 0)
    acc += tl.where(inner, g, 0.0) + tl.where(bins == 0, lo, 0.0) + tl.where(bins == 2 * max_distance, hi, 0.0)
    return acc
