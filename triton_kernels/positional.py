"""``@triton.jit`` helpers for the positional encodings fused into attention kernels.

The math of every encoding lives here once for Triton (the float64 truth is
``posattn.reference``; the CUDA twin is ``csrc/include/posattn/*.cuh``). Shared by
``fused_attention.py`` and, later, the decode kernel. Nothing here launches anything.

Conventions (docs/INTERNALS.md):

* ``rel = pk - pq`` (key index minus query index position, both as the mask sees them).
* Rotary encodings (``ROTARY_MODE`` 1 RoPE, 2 xPos, 3 learned phases) work on *register columns*
  in which every rotated pair sits side by side (interleaved order). For the half-rotated
  GPT-NeoX / Llama layout the kernel loads the columns of q and k in that order
  (``rotary_cols``), which leaves ``q . k`` unchanged because both use the same permutation, and
  stores dq / dk through the same column map. So one ``rotate_pairs`` (reshape + split + join)
  serves both layouts and the rotated q / k never go to memory.
* Angles are fp32 products of integer positions and fp32 inverse frequencies (ARCHITECTURE.md:
  never in fp16/bf16); positions are exact in fp32 up to 2**24.
* Biases are returned in natural-log units; the caller multiplies by log2(e).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotary_cols(offs_c, rotary_half, INTERLEAVED: tl.constexpr):
    """Memory column held by register column ``offs_c``.

    Interleaved (GPT-J, pairs (2i, 2i+1)): the identity. Half layout (pairs (i, i + r/2)):
    register columns (2i, 2i+1) hold memory columns (i, i + r/2) for i < r/2; columns from r on
    pass through at their own place.
    """
    if INTERLEAVED:
        cols = offs_c
    else:
        pair = offs_c // 2
        cols = tl.where(pair < rotary_half, pair + (offs_c % 2) * rotary_half, offs_c)
    return cols


@triton.jit
def rotary_cos_sin(pos, tok, row_mask, INV_FREQ, PHASES_BH, stride_pht, rotary_half, rotary_scale, head_dim,
                   xpos_center, xpos_scale_base,
                   IS_KEY: tl.constexpr, ROTARY_MODE: tl.constexpr, HALF: tl.constexpr):
    """cos and sin ``[BLOCK, HALF]`` (fp32) of one block of rows, with every per-pair factor folded in.

    pos : int [BLOCK]     rotation positions (RoPE ``position_ids`` or index positions)
    tok : int [BLOCK]     token index into the learned phases (ROTARY_MODE 3)
    ROTARY_MODE 1 (RoPE): angle ``pos * inv_freq[i]``; cos and sin times ``rotary_scale`` (YaRN).
    ROTARY_MODE 2 (xPos, arXiv 2212.10554): also times ``zeta_i ** (+-(pos - c) / scale_base)`` with
        ``zeta_i = (2i + 0.4 d) / (1.4 d)``: + for queries, - for keys (``IS_KEY``); any common
        centre ``c`` cancels in q . k, the kernels pick one per block to keep factors near 1.
    ROTARY_MODE 3 (CARoPE phases, arXiv 2507.23083): angle ``phases[tok, i]`` (already cumulated).
    Pairs ``i >= rotary_half`` (pass-through features and head_dim padding) get cos 1, sin 0.
    """
    pair = tl.arange(0, HALF)
    pmask = pair < rotary_half
    if ROTARY_MODE == 3:
        ang = tl.load(PHASES_BH + tok[:, None] * stride_pht + pair[None, :],
                      mask=row_mask[:, None] & pmask[None, :], other=0.0)
    else:
        freq = tl.load(INV_FREQ + pair, mask=pmask, other=0.0)
        ang = pos.to(tl.float32)[:, None] * freq[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
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
def rotate_pairs(x, c, s, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Each register pair (a, b) -> (a c - b s, a s + b c); x fp32 [BLOCK, HEAD_DIM], c/s [BLOCK, HEAD_DIM/2].

    The transpose (gradient of the rotation, and the inverse rotation when no factor is folded
    into c, s) is ``rotate_pairs(g, c, -s)``.
    """
    a, b = tl.split(tl.reshape(x, (BLOCK, HEAD_DIM // 2, 2)))
    return tl.reshape(tl.join(a * c - b * s, a * s + b * c), (BLOCK, HEAD_DIM))


@triton.jit
def rotary_dphase(x, g, c, s, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """d loss / d angle ``[BLOCK, HEAD_DIM/2]`` of y = rotate_pairs(x, c, s) given g = d loss / d y.

    dy_a/dtheta = -y_b and dy_b/dtheta = y_a, so dtheta = -g_a y_b + g_b y_a (valid when c, s are
    cos, sin of theta: learned phases carry no extra factor).
    """
    a, b = tl.split(tl.reshape(x, (BLOCK, HEAD_DIM // 2, 2)))
    ga, gb = tl.split(tl.reshape(g, (BLOCK, HEAD_DIM // 2, 2)))
    return gb * (a * c - b * s) - ga * (a * s + b * c)


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
    skewed with ``tl.gather`` so that each of its BLOCK_M + BLOCK_N - 1 diagonals becomes a column
    (``diag[t] = sum_i x[i, i + t - (BLOCK_M - 1)]``, rel = base + t - (BLOCK_M - 1)), then the
    diagonals inside (-D, D) are gathered into their bins and the rest summed into the two edge
    bins. This is the gradient of a Toeplitz table (RelativeBias, T5 before bucketing, URPE).
    """
    ii = tl.arange(0, BLOCK_M)
    t = tl.arange(0, DIAG)
    col = ii[:, None] + t[None, :] - (BLOCK_M - 1)
    ok = (col >= 0) & (col < BLOCK_N)
    y = tl.gather(x, tl.where(ok, col, 0), 1)
    diag = tl.sum(tl.where(ok, y, 0.0), 0)
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
