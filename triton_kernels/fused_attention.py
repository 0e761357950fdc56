"""Fused attention with positional encodings computed inside the kernel: forward and backward.

FlashAttention-2 structure (Dao, arXiv 2307.08691): the forward keeps the online-softmax state
``(m_i, l_i, acc)`` per block of query rows and writes ``out`` and the fp32 ``lse``; the backward
recomputes the probabilities from ``lse`` in two kernels, one per key block (dk, dv; reduced over
the GQA group inside the program) and one per query block (dq and the positional parameters'
gradients), so no float atomics are used anywhere and every gradient is deterministic.

Encodings (docs/INTERNALS.md "Kernel-facing PE arguments", math in ``positional.py``): RoPE (both
layouts, partial rotary_dim, position_ids, YaRN factor), xPos, learned (CARoPE) phases, ALiBi,
RelativeBias, T5 buckets, URPE, one rotary + one additive bias + URPE at a time. Also causal with
an offset, a sliding window, softcap, a dense attn_mask (bool or float, broadcast strides), GQA/MQA,
dropout (in-kernel Philox, same mask regenerated in the backward), varlen (cu_seqlens).

Hidden keys (as the torch backend's ``_dead_keys``): k / v rows that no query row of the block can see
through the causal / window band are loaded as zeros (forward, dq kernel: per query block; dk/dv kernel:
keys no query of the sequence sees); keys an attn_mask (bool, or -inf in a float mask) hides from every
row of the block have their v (forward) / k (dq) zeroed and their ds entries set to 0, so NaN / inf
there never reach a result or a gradient (0 * NaN). Keys hidden only by a -inf bias-table entry are not
covered.

Nothing here checks arguments: the op layer (python/posattn/ops/attention.py, ops/varlen.py)
validates; launchers only compute. Not yet run on a GPU: correctness is tested under
``TRITON_INTERPRET=1`` and the configs below only compile-checked for sm_80 / sm_90.

Launchers
---------
``fused_attention_fwd(q, k, v, out, lse, **options)`` and
``fused_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, **options)``, see their docstrings.
``dropout_keep_mask(...)`` returns the keep-mask the kernels draw for a seed (tests, debugging).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .positional import (additive_bias, rotary_cos_sin, rotary_dphase_unrotated, rotary_pair_cols, rotate,
                         toeplitz_accumulate, urpe_coef)

__all__ = ["fused_attention_fwd", "fused_attention_bwd", "dropout_keep_mask", "FWD_CONFIGS", "BWD_CONFIGS",
           "config_for"]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# "unbounded" window side; int32-safe and larger than any sequence the kernels index
_UNBOUNDED = tl.constexpr(1 << 30)

# Launch configs per head_dim bucket (the padded max(head_dim, head_dim_v) rounds up to a key) and
# per kind of encoding (``_config_kind``): an entry ``(bucket, kind)`` overrides ``bucket`` for
# "rotary" (RoPE / xPos / learned phases: cos / sin and the rotated tiles are live next to the
# softmax state), "table" (RelativeBias / T5 / URPE: per-element table gathers, and in the
# backward the Toeplitz table-gradient reduction) and "rotary+table".
# Chosen with ``python -m posattn report`` (AOT compile for sm_80 / sm_90, no GPU): every entry
# compiles without register spills (no LDL/STL), within shared memory, with HMMA / HGMMA. Not yet
# run on a GPU, so not tuned for speed.
_W8 = dict(num_warps=8)
FWD_CONFIGS = {
    # 8 warps everywhere at d <= 128: 4 warps at 128 x 64 left 19 LDL/STL on sm_90 (plain) and
    # 23-36 with RoPE / xPos; the table gathers must not be pipelined (num_stages 1: two stages of
    # RelativeBias + URPE gathers take 98 KB of shared memory and still spill)
    64: dict(BLOCK_M=128, BLOCK_N=64, num_stages=3, **_W8),
    (64, "rotary"): dict(BLOCK_M=128, BLOCK_N=64, num_stages=3, **_W8),
    (64, "table"): dict(BLOCK_M=128, BLOCK_N=64, num_stages=1, **_W8),
    (64, "rotary+table"): dict(BLOCK_M=128, BLOCK_N=64, num_stages=1, **_W8),
    128: dict(BLOCK_M=128, BLOCK_N=32, num_stages=2, **_W8),
    (128, "rotary"): dict(BLOCK_M=128, BLOCK_N=32, num_stages=2, **_W8),
    (128, "phases"): dict(BLOCK_M=128, BLOCK_N=32, num_stages=1, **_W8),
    (128, "table"): dict(BLOCK_M=128, BLOCK_N=32, num_stages=1, **_W8),
    (128, "rotary+table"): dict(BLOCK_M=128, BLOCK_N=32, num_stages=1, **_W8),
    # sm_80 at 4 warps: 1 LDL / STL (d=256 causal)
    256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, sm80=_W8),
    (256, "rotary"): dict(BLOCK_M=64, BLOCK_N=32, num_stages=1, **_W8),
    # learned phases: [BLOCK, 128] fp32 phase / cos / sin tiles per rotation (at BLOCK_N 32: 7 LDL / STL on sm_90)
    (256, "phases"): dict(BLOCK_M=64, BLOCK_N=16, num_stages=1, **_W8),
    (256, "table"): dict(BLOCK_M=64, BLOCK_N=32, num_stages=1, **_W8),
    (256, "rotary+table"): dict(BLOCK_M=64, BLOCK_N=32, num_stages=1, **_W8),
}
# Backward: BLOCK_M / BLOCK_N / num_warps / num_stages are the dk/dv kernel's (BLOCK_N keys per
# program, BLOCK_M queries per step), ``dq_*`` the dq kernel's (BLOCK_M queries per program, BLOCK_N
# keys per step). The dk/dv kernel works on k q^T, so BLOCK_N is the MMA's M: >= 64 for sm_90's
# wgmma (below it Triton falls back to mma.sync); likewise dq_BLOCK_M. Table gradients skew a
# (BLOCK_M + BLOCK_N) x dq_BLOCK_N tile (positional.toeplitz_accumulate): dq_BLOCK_N stays 32.
_DQ = dict(dq_BLOCK_M=64, dq_BLOCK_N=32, dq_num_warps=8, dq_num_stages=2)
# sm_80 (mma.sync: every warp holds its share of the loop-invariant k / v operands in registers)
# with learned phases or rotary + table gradients at d=128: 32 keys a program at 4 warps (at 64 x 8
# warps 1-23 LDL / STL); 32 queries a dq program at 4 warps
_SM80_ROT = dict(BLOCK_N=32, num_warps=4, dq_BLOCK_M=32, dq_num_warps=4)
BWD_CONFIGS = {
    64: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2, **dict(_DQ, dq_num_warps=4)),
    (64, "rotary"): dict(BLOCK_M=32, BLOCK_N=64, num_stages=2, **_W8, **_DQ),
    (64, "phases"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=2, **_W8, **_DQ),
    (64, "table"): dict(BLOCK_M=32, BLOCK_N=64, num_stages=1, **_W8, **_DQ),
    (64, "rotary+table"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=1, **_W8, **dict(_DQ, dq_BLOCK_N=16)),
    128: dict(BLOCK_M=32, BLOCK_N=64, num_stages=2, **_W8, **_DQ),
    (128, "rotary"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=1, **_W8, **dict(_DQ, dq_BLOCK_N=16)),
    (128, "phases"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=1, **_W8, **dict(_DQ, dq_BLOCK_N=16), sm80=_SM80_ROT),
    (128, "table"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=1, **_W8, **dict(_DQ, dq_BLOCK_N=16)),
    (128, "rotary+table"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=1, **_W8, **dict(_DQ, dq_BLOCK_N=16),
                                sm80=_SM80_ROT),
    # two [BLOCK_N, 256] fp32 accumulators do not fit next to k and v: dv and dk by separate launches
    256: dict(BLOCK_M=16, BLOCK_N=64, num_stages=2, split_dkdv=True, **_W8,
              **dict(_DQ, dq_BLOCK_N=16, dq_num_stages=2)),
    # learned phases at 256: dk in two halves (split_dk); sm_80: 16-row programs at 4 warps. sm_90: dk (2nd half)
    # and dq spill 11 / 29 LDL outside their loops; 32-key / 32-row programs spill none but lose wgmma: which
    # is faster is for a GPU to say (bench/bench_config_ab.py, in bench/gpu_check.sh; docs/KERNEL_RESOURCES.md)
    (256, "phases"): dict(BLOCK_M=16, BLOCK_N=64, num_stages=2, split_dkdv=True, split_dk=True, **_W8,
                          **dict(_DQ, dq_BLOCK_N=16, dq_num_stages=2),
                          sm80=dict(BLOCK_N=16, num_warps=4, dq_BLOCK_M=16, dq_num_warps=4)),
}
# "phases" (learned phases) falls back to "rotary" where it has no entry of its own
CONFIG_KINDS = ("plain", "rotary", "phases", "table", "rotary+table")
_KIND_FALLBACK = {"phases": "rotary"}


def config_for(configs: dict, head_dim: int, kind: str = "plain", arch: int = 90) -> dict:
    """The config of the smallest bucket >= head_dim (head_dim <= 256) for ``kind`` (CONFIG_KINDS)
    on ``arch`` (80 or 90, see ``target_arch``): the entry's ``"sm<arch>"`` sub-dict, if any,
    overrides its other keys."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"kind: expected one of {CONFIG_KINDS}, got {kind!r}")
    if arch not in ARCH_FAMILIES:
        raise ValueError(f"arch: expected one of {ARCH_FAMILIES}, got {arch!r}")
    buckets = sorted(b for b in configs if isinstance(b, int))
    for bucket in buckets:
        if head_dim <= bucket:
            entry = configs[bucket]
            for k in (kind, _KIND_FALLBACK.get(kind)):
                if (bucket, k) in configs:
                    entry = configs[(bucket, k)]
                    break
            cfg = {n: v for n, v in entry.items() if not n.startswith("sm")}
            cfg.update(entry.get(f"sm{arch}", {}))
            return cfg
    raise ValueError(f"head_dim: expected <= {buckets[-1]}, got {head_dim}")


# Config families: 80 (Ampere / Ada mma.sync: sm_80, 86, 89) and 90 (Hopper wgmma, and newer)
ARCH_FAMILIES = (80, 90)
_FORCED_ARCH: list = []


@contextlib.contextmanager
def force_target_arch(arch: int):
    """Within the block, launchers pick the configs of ``arch`` whatever the device (used by
    ``python -m posattn report`` to record, on CPU, the launches each GPU would get)."""
    if arch not in ARCH_FAMILIES:
        raise ValueError(f"arch: expected one of {ARCH_FAMILIES}, got {arch!r}")
    _FORCED_ARCH.append(arch)
    try:
        yield
    finally:
        _FORCED_ARCH.pop()


def target_arch(device) -> int:
    """The config family for tensors on ``device``: 90 on compute capability >= 9, 80 on an older
    CUDA GPU; 90 (the tables' defaults) on CPU, i.e. under the Triton interpreter."""
    if _FORCED_ARCH:
        return _FORCED_ARCH[-1]
    device = torch.device(device)
    if device.type == "cuda":
        return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    return 90


# ------------------------------------------------------------------------------------------------
# shared @triton.jit pieces
# ------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. ``DOT_PRECISION``: "ieee" for fp32 inputs (no tf32: the
    fp32 path is meant to be accurate), "tf32" (ignored) for fp16/bf16, or "upcast": only under
    TRITON_INTERPRET=1 with bf16, whose interpreted bf16 dot is wrong in Triton 3.9 (numpy has no
    bf16); the operands are already bf16-rounded, so upcasting them gives the same products."""
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` as one tl.dot with an accumulator (an MMA chain: on sm_90 the wgmma
    accumulates in place instead of a second fp32 tile plus an add). Precision as ``_dot``."""
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _head_cols(rotary_half, HEAD_DIM: tl.constexpr, ROTARY_MODE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Memory columns of the q / k / dq / dk tiles.

    Rotary modes: two half tiles, ``(col_a, col_b)`` int32 [HEAD_DIM / 2] from
    ``positional.rotary_pair_cols``. Otherwise one full tile: ``col_a = arange(HEAD_DIM)`` and
    ``col_b`` the same (unused).
    """
    if ROTARY_MODE != 0:
        col_a, col_b = rotary_pair_cols(tl.arange(0, HEAD_DIM // 2), rotary_half, INTERLEAVED)
    else:
        col_a = tl.arange(0, HEAD_DIM)
        col_b = col_a
    return col_a, col_b


@triton.jit
def _load_tiles(ROWS, row_ok, col_a, col_b, head_dim, ROTARY_MODE: tl.constexpr):
    """``(x_a, x_b)`` = the rows ``ROWS`` (pointers [BLOCK], one per row) at columns col_a / col_b;
    zero outside ``row_ok`` and past head_dim. Without rotary x_b is x_a (one load)."""
    xa = tl.load(ROWS[:, None] + col_a[None, :], mask=row_ok[:, None] & (col_a < head_dim)[None, :], other=0.0)
    if ROTARY_MODE != 0:
        xb = tl.load(ROWS[:, None] + col_b[None, :], mask=row_ok[:, None] & (col_b < head_dim)[None, :],
                     other=0.0)
    else:
        xb = xa
    return xa, xb


@triton.jit
def _store_tiles(ROWS, row_ok, col_a, col_b, head_dim, xa, xb, ROTARY_MODE: tl.constexpr):
    """Inverse of ``_load_tiles`` (casts to the pointer's dtype)."""
    ty = ROWS.dtype.element_ty
    tl.store(ROWS[:, None] + col_a[None, :], xa.to(ty), mask=row_ok[:, None] & (col_a < head_dim)[None, :])
    if ROTARY_MODE != 0:
        tl.store(ROWS[:, None] + col_b[None, :], xb.to(ty), mask=row_ok[:, None] & (col_b < head_dim)[None, :])


@triton.jit
def _qk(qa, qb, ka, kb, DOT_PRECISION: tl.constexpr, ROTARY_MODE: tl.constexpr):
    """``q . k^T`` [BLOCK_M, BLOCK_N] fp32: one dot, or ``q_a k_a^T + q_b k_b^T`` on half tiles."""
    qk = _dot(qa, tl.trans(ka), DOT_PRECISION)
    if ROTARY_MODE != 0:
        qk = _dot_acc(qb, tl.trans(kb), qk, DOT_PRECISION)
    return qk


@triton.jit
def _opaque(x, FAST_TRIG: tl.constexpr):
    """``x`` through a side-effecting no-op (PTX ``mov``) on the GPU path, so that cos / sin
    recomputed from it after a loop are not merged (CSE) with the copy made before the loop, which
    would keep [BLOCK, HEAD_DIM / 2] fp32 tiles live across the whole loop. Identity elsewhere."""
    if FAST_TRIG:
        y = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [x.to(tl.int64)], dtype=tl.int64,
                                      is_pure=False, pack=1)
    else:
        y = x
    return y


@triton.jit
def _program_again(BLOCK: tl.constexpr, heads, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, offset, bottom_right,
                   IS_VARLEN: tl.constexpr, FAST_TRIG: tl.constexpr):
    """(block start, batch * heads + head, batch, head, q_start, k_start, seqlen_q, seqlen_k, off) of this
    program of a (blocks, batch * heads) grid, recomputed after a loop from the program ids through an opaque
    move (``_opaque``): nothing indexed by them (rows, positions, masks, base pointers) then stays live
    across the loop in registers (the backward kernels' epilogues spilled 2-8 such values at head_dim 256)."""
    start = _opaque(tl.program_id(0).to(tl.int64), FAST_TRIG) * BLOCK
    off_bh = _opaque(tl.program_id(1).to(tl.int64), FAST_TRIG)
    off_b = off_bh // heads
    off_h = off_bh % heads
    q_start, k_start, sq, sk, off = _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k,
                                                         offset, bottom_right, IS_VARLEN)
    return start, off_bh, off_b, off_h, q_start, k_start, sq, sk, off


@triton.jit
def _rotated(xa, xb, c, s, dtype: tl.constexpr):
    """Half tiles rotated in fp32 by (c, s) and cast back to the operand dtype for the dots."""
    ya, yb = rotate(xa.to(tl.float32), xb.to(tl.float32), c, s)
    return ya.to(dtype), yb.to(dtype)


@triton.jit
def _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k, offset, bottom_right,
                         IS_VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k, off) of sequence off_b, all int64.

    Dense: starts 0, the call's lengths. Varlen: from cu_seqlens, positions restart at 0.
    ``off``: query row i sits at i + off; bottom-right alignment (FlashAttention) per sequence
    when ``bottom_right`` is set, else the given offset.
    """
    zero = off_b * 0
    if IS_VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + off_b).to(tl.int64)
        sq = tl.load(CU_SEQLENS_Q + off_b + 1).to(tl.int64) - q_start
        k_start = tl.load(CU_SEQLENS_K + off_b).to(tl.int64)
        sk = tl.load(CU_SEQLENS_K + off_b + 1).to(tl.int64) - k_start
    else:
        q_start = zero
        k_start = zero
        sq = zero + seqlen_q
        sk = zero + seqlen_k
    if bottom_right:
        off = sk - sq
    else:
        off = zero + offset
    return q_start, k_start, sq, sk, off


@triton.jit
def _fused_attention_logits(qk, m_ok, n_ok, rel_base, offs_m, offs_n, off_b, off_h,
                            qk_scale2, softcap_scale, softcap2, window_left, window_right,
                            MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                            slope, TABLE_H, stride_ti, T5_LUT, bias_max_distance,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_MODE: tl.constexpr,
                            BIAS_MODE: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Logits of one [BLOCK_M, BLOCK_N] block in log2 units, -inf where not visible.

    TRANSPOSED: ``qk`` is the [BLOCK_N, BLOCK_M] block ``k q^T`` and everything returned is
    transposed the same way (the dk/dv kernel works in that orientation).

    Order (reference.attention): scale, softcap, positional bias, float mask, masks.
    ``qk_scale2 = softmax_scale * log2(e)``: log2(e) is folded into the scale so the softmax runs
    on exp2. With softcap: ``softcap * tanh(scale qk / softcap)``, with ``softcap2 = softcap *
    log2(e)`` and ``softcap_scale = softmax_scale / softcap``. Also returns ``th`` (the tanh, for the
    softcap backward; qk when off) and ``rel = j - (i + off)`` (int32: ``rel_base`` is
    ``start_n - start_m - off`` of the block, so the per-element distance never needs 64-bit
    registers; positions are < 2**30).
    """
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 when exp over/underflows
        th = 1.0 - 2.0 / (tl.exp2(qk * (2.0 * LOG2E * softcap_scale)) + 1.0)
        s = th * softcap2
    else:
        th = qk
        s = qk * qk_scale2
    if TRANSPOSED:
        rel = rel_base + (tl.arange(0, BLOCK_N)[:, None] - tl.arange(0, BLOCK_M)[None, :])
        keep = n_ok[:, None] & m_ok[None, :]
        mask_off = offs_m[None, :] * stride_mm + offs_n[:, None] * stride_mn
    else:
        rel = rel_base + (tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None])
        keep = m_ok[:, None] & n_ok[None, :]
        mask_off = offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
    if BIAS_MODE != 0:
        s += additive_bias(rel, slope, TABLE_H, stride_ti, T5_LUT, bias_max_distance, BIAS_MODE) * LOG2E
    if MASK_MODE != 0:
        mk = tl.load(MASK + off_b * stride_mb + off_h * stride_mh + mask_off, mask=keep, other=0)
        if MASK_MODE == 1:
            keep = keep & (mk != 0)
        else:
            mkf = mk.to(tl.float32)
            # a -inf entry hides the key: through ``keep`` so that a NaN / inf logit there (a poisoned
            # hidden key) becomes -inf too instead of NaN + -inf = NaN
            keep = keep & (mkf != float("-inf"))
            s += mkf * LOG2E
    if HAS_WINDOW:
        keep = keep & (rel >= -window_left) & (rel <= window_right)
    s = tl.where(keep, s, float("-inf"))
    return s, th, rel


@triton.jit
def _band_cols(offs_n, n_ok, first_m, last_m, off, window_left, window_right):
    """[BLOCK_N] bool: keys < seqlen_k that the causal / window band shows to at least one query
    row in ``first_m .. last_m`` (query i sees j iff i + off - left <= j <= i + off + right).

    Hidden-key guarantee (as the torch backend's ``_dead_keys``): k / v rows no query of the block
    can see are loaded as zeros, so NaN / inf there (padding, stale cache) never reach a product
    (p = 0 times v = NaN is NaN in ``p @ v``, likewise ``ds @ k``). 1-D, no reduction."""
    return n_ok & (offs_n >= first_m + off - window_left) & (offs_n <= last_m + off + window_right)


@triton.jit
def _dropout_keep(seed, off_h, rows, offs_n, rng_rows, rng_cols, dropout_p, TRANSPOSED: tl.constexpr = False):
    """Keep-mask [BLOCK_M, BLOCK_N] ([BLOCK_N, BLOCK_M] if TRANSPOSED): Philox uniform at the
    element's global index >= dropout_p.

    Index ``(h * rng_rows + row) * rng_cols + col`` (int64) with row the global query token
    (b * seqlen_q + i dense, the packed token varlen): forward and backward draw the same bits.
    """
    if TRANSPOSED:
        idx = (off_h * rng_rows + rows)[None, :] * rng_cols + offs_n[:, None]
    else:
        idx = (off_h * rng_rows + rows)[:, None] * rng_cols + offs_n[None, :]
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def _rotary_positions(POS_IDS_B, tok, valid, HAS_POS_IDS: tl.constexpr):
    """Rotation positions of a block: ``position_ids[tok]`` or the index ``tok``."""
    if HAS_POS_IDS:
        pos = tl.load(POS_IDS_B + tok, mask=valid, other=0).to(tl.int64)
    else:
        pos = tok
    return pos


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _fused_attention_fwd_kernel(
    Q, K, V, O, LSE,
    CU_SEQLENS_Q, CU_SEQLENS_K, MASK, ALIBI, BIAS_TABLE, T5_LUT, URPE_TABLE, INV_FREQ, POS_IDS, PHASES,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah, stride_th, stride_ti, stride_uh, stride_ui,
    stride_pb, stride_phb, stride_phh, stride_pht,
    num_heads, group, seqlen_q, seqlen_k, head_dim, head_dim_v, offset, bottom_right,
    qk_scale2, softcap_scale, softcap2, window_left, window_right, bias_max_distance, urpe_max_distance,
    rotary_half, rotary_scale, xpos_scale_base, dropout_p, dropout_scale, seed, rng_rows, rng_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_MODE: tl.constexpr,
    BIAS_MODE: tl.constexpr, HAS_URPE: tl.constexpr, ROTARY_MODE: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    # Shapes (dense / varlen):
    #   Q   (batch, seqlen_q, num_heads, head_dim)     / (total_q, num_heads, head_dim)     stride_qb = 0 varlen
    #   K   (batch, seqlen_k, num_heads_k, head_dim)   / (total_k, num_heads_k, head_dim)
    #   V   (batch, seqlen_k, num_heads_k, head_dim_v) / (total_k, num_heads_k, head_dim_v)
    #   O   like Q with head_dim_v;  LSE fp32 (batch, num_heads, seqlen_q) / (num_heads, total_q), natural log
    #   last-dim stride 1 everywhere. Grid: (cdiv(max seqlen_q, BLOCK_M), batch * num_heads).
    # Rotary modes hold q and k as half tiles [BLOCK, HEAD_DIM / 2] (positional.rotary_pair_cols).
    tl.static_assert(HEAD_DIM >= 16, "HEAD_DIM (padded head_dim) must be >= 16")
    tl.static_assert(ROTARY_MODE == 0 or HEAD_DIM >= 32, "rotary half tiles need HEAD_DIM >= 32 (tl.dot K >= 16)")
    tl.static_assert(HEAD_DIM_V >= 16, "HEAD_DIM_V (padded head_dim_v) must be >= 16")
    tl.static_assert(BIAS_MODE >= 0 and BIAS_MODE <= 3, "BIAS_MODE: 0 none, 1 ALiBi, 2 RelativeBias, 3 T5")
    tl.static_assert(ROTARY_MODE >= 0 and ROTARY_MODE <= 3, "ROTARY_MODE: 0 none, 1 RoPE, 2 xPos, 3 phases")
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hk = off_h // group
    q_start, k_start, sq, sk, off = _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k,
                                                         offset, bottom_right, IS_VARLEN)
    if start_m >= sq:
        return
    dtype = Q.dtype.element_ty

    offs_m = start_m + tl.arange(0, BLOCK_M)
    col_a, col_b = _head_cols(rotary_half, HEAD_DIM, ROTARY_MODE, INTERLEAVED)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    dv_ok = offs_dv < head_dim_v
    m_ok = offs_m < sq

    qa, qb = _load_tiles(Q + off_b * stride_qb + off_h * stride_qh + (q_start + offs_m) * stride_qm, m_ok,
                         col_a, col_b, head_dim, ROTARY_MODE)
    K_bh = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    V_bh = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    PHASES_BH = PHASES + off_b * stride_phb + off_h * stride_phh
    POS_IDS_B = POS_IDS + off_b * stride_pb
    xpos_center = 0
    if ROTARY_MODE != 0:
        tok_q = offs_m + off
        pos_q = _rotary_positions(POS_IDS_B, tok_q, m_ok, HAS_POS_IDS)
        if ROTARY_MODE == 2:
            # xPos centre per query block: the largest query position, so causal key factors stay <= 1
            xpos_center = tl.max(tl.where(m_ok, pos_q, -_UNBOUNDED), 0)
        cq, sq_ = rotary_cos_sin(pos_q, tok_q, m_ok, INV_FREQ, PHASES_BH, stride_pht, rotary_half, rotary_scale,
                                 head_dim, xpos_center, xpos_scale_base, False, ROTARY_MODE, HEAD_DIM // 2,
                                 FAST_TRIG)
        qa, qb = _rotated(qa, qb, cq, sq_, dtype)

    slope = 0.0
    if BIAS_MODE == 1:
        slope = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah)
    TABLE_H = BIAS_TABLE + off_h * stride_th
    URPE_H = URPE_TABLE + off_h * stride_uh
    rows = off_b * (seqlen_q * (1 - IS_VARLEN)) + q_start + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)

    # key blocks: causal / window blocks outside the band are skipped by the bounds, not masked
    lo = sk * 0
    hi = sk
    last_m = tl.minimum(start_m + BLOCK_M, sq) - 1
    if HAS_WINDOW:
        lo = tl.maximum(start_m + off - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + (BLOCK_M - 1) + off + window_right + 1, sk)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sk
        # keys no row of the block sees are never read (zeros): NaN / inf there must not leak via 0 * NaN
        n_live = n_ok
        if HAS_WINDOW:
            n_live = _band_cols(offs_n, n_ok, start_m, last_m, off, window_left, window_right)
        ka, kb = _load_tiles(K_bh + offs_n * stride_kn, n_live, col_a, col_b, head_dim, ROTARY_MODE)
        if ROTARY_MODE != 0:
            pos_k = _rotary_positions(POS_IDS_B, offs_n, n_ok, HAS_POS_IDS)
            ck, sk_ = rotary_cos_sin(pos_k, offs_n, n_ok, INV_FREQ, PHASES_BH, stride_pht, rotary_half,
                                     rotary_scale, head_dim, xpos_center, xpos_scale_base, True, ROTARY_MODE,
                                     HEAD_DIM // 2, FAST_TRIG)
            ka, kb = _rotated(ka, kb, ck, sk_, dtype)
        qk = _qk(qa, qb, ka, kb, DOT_PRECISION, ROTARY_MODE)
        s, th, rel = _fused_attention_logits(qk, m_ok, n_ok, (start_n - start_m - off).to(tl.int32), offs_m, offs_n,
                                             off_b, off_h, qk_scale2, softcap_scale, softcap2, window_left,
                                             window_right, MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                                             slope, TABLE_H, stride_ti, T5_LUT, bias_max_distance,
                                             BLOCK_M, BLOCK_N, SOFTCAP, HAS_WINDOW, MASK_MODE, BIAS_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no visible key yet keeps m = -inf: subtract 0 instead (never -inf - (-inf))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_MODE != 0:
            # a key the mask hides from every row of the block: p column all 0, so its v row is not read
            # (zeroing a column whose p underflowed to 0 everywhere changes nothing)
            n_live = n_live & (tl.max(p, 0) > 0.0)
        if HAS_URPE:
            # URPE multiplies the numerator only; l_i stays the softmax normaliser
            p = p * urpe_coef(rel, URPE_H, stride_ui, urpe_max_distance)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, off_h, rows, offs_n, rng_rows, rng_cols, dropout_p), p * dropout_scale, 0.0)
        v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_live[:, None] & dv_ok[None, :],
                    other=0.0)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(O + off_b * stride_ob + off_h * stride_oh + (q_start + offs_m)[:, None] * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + (q_start + offs_m) * stride_lm, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _fused_attention_bwd_preprocess(
    O, DO, DELTA, CU_SEQLENS_Q,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm,
    num_heads, seqlen_q, head_dim_v,
    BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, also with URPE and dropout (o_i already
    # carries C and the dropout mask): the softmax backward's row term. Layout of LSE.
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    q_start, _k_start, sq, _sk, _off = _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_Q, off_b, seqlen_q, seqlen_q,
                                                            0, 0, IS_VARLEN)
    if start_m >= sq:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    msk = (offs_m < sq)[:, None] & (offs_dv < head_dim_v)[None, :]
    rows = (q_start + offs_m)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_dv[None, :], mask=msk, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_dv[None, :], mask=msk,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_b * stride_lb + off_h * stride_lh + (q_start + offs_m) * stride_lm, delta, mask=offs_m < sq)


@triton.jit
def _fused_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DPHASES_K,
    CU_SEQLENS_Q, CU_SEQLENS_K, MASK, ALIBI, BIAS_TABLE, T5_LUT, URPE_TABLE, INV_FREQ, POS_IDS, PHASES,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah, stride_th, stride_ti, stride_uh, stride_ui,
    stride_pb, stride_phb, stride_phh, stride_pht,
    num_heads, num_heads_k, group, seqlen_q, seqlen_k, head_dim, head_dim_v, offset, bottom_right,
    sm_scale, qk_scale2, softcap_scale, softcap2, window_left, window_right, bias_max_distance, urpe_max_distance,
    rotary_half, rotary_scale, xpos_scale_base, dropout_p, dropout_scale, seed, rng_rows, rng_cols,
    DKA_BUF, stride_sb, stride_sn, stride_sh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_MODE: tl.constexpr,
    BIAS_MODE: tl.constexpr, HAS_URPE: tl.constexpr, ROTARY_MODE: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
    DKDV_PART: tl.constexpr = 0,
):
    # One program per (key block, batch, kv head): dk, dv of BLOCK_N keys, summed over the query
    # heads of the GQA group (the loop over g) and over the query blocks that see these keys.
    # Rotary: (dka, dkb) is first the gradient w.r.t. the rotated key (half tiles). RoPE / xPos
    # rotate k the same way for every head of the group, so the rotated k is made once and the
    # summed gradient rotated back once at the end. Learned phases differ per query head: the
    # launcher gives this kernel group == 1 then (k, v repeated per query head, dk, dv reduced over
    # the group on the host), and the angle gradient goes to DPHASES_K[b, h, j] (one writer each).
    # DKDV_PART: 0 both; 1 dv only, 2 dk only (and the phase gradient): the launcher runs the kernel
    # twice where dk and dv accumulators plus the loop-invariant k / v operands do not fit in the
    # registers (head_dim 256: 2 x [BLOCK_N, 256] fp32 accumulators alone are 128 registers a thread
    # at 8 warps); each half recomputes q k^T (one extra matmul of the seven) but does not spill.
    # Rotary at head_dim 256 splits dk once more: 3 accumulates the first half tile of the
    # rotated-space gradient (dka) into the fp32 buffer DKA_BUF, 4 the second (dkb), then reads dka
    # back, rotates both back and stores dk (and the phase gradient); 3 and 4 each recompute q k^T
    # and dO v^T.
    # Grid: (cdiv(max seqlen_k, BLOCK_N), batch * num_heads_k).
    tl.static_assert(ROTARY_MODE == 0 or HEAD_DIM >= 32, "rotary half tiles need HEAD_DIM >= 32 (tl.dot K >= 16)")
    start_n = tl.program_id(0).to(tl.int64) * BLOCK_N
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads_k
    off_hk = off_bh % num_heads_k
    q_start, k_start, sq, sk, off = _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k,
                                                         offset, bottom_right, IS_VARLEN)
    if start_n >= sk:
        return
    dtype = Q.dtype.element_ty
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < sk
    col_a, col_b = _head_cols(rotary_half, HEAD_DIM, ROTARY_MODE, INTERLEAVED)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    dv_ok = offs_dv < head_dim_v

    # keys the causal / window band shows to no query row at all are loaded as zeros (hidden NaN / inf
    # never reach dp, ds or the phase gradient); keys a mask hides: ds zeroed per entry below
    n_live = n_ok
    if HAS_WINDOW:
        n_live = _band_cols(offs_n, n_ok, sq * 0, sq - 1, off, window_left, window_right)
    K_rows = K + off_b * stride_kb + off_hk * stride_kh + (k_start + offs_n) * stride_kn
    ka, kb = _load_tiles(K_rows, n_live, col_a, col_b, head_dim, ROTARY_MODE)
    if DKDV_PART != 1:
        v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + (k_start + offs_n)[:, None] * stride_vn
                    + offs_dv[None, :], mask=n_live[:, None] & dv_ok[None, :], other=0.0)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    dka = tl.zeros(ka.shape, dtype=tl.float32)
    dkb = dka
    if ROTARY_MODE != 0:
        dkb = tl.zeros(kb.shape, dtype=tl.float32)
    POS_IDS_B = POS_IDS + off_b * stride_pb
    xpos_center = 0
    pos_k = offs_n
    if ROTARY_MODE != 0:
        pos_k = _rotary_positions(POS_IDS_B, offs_n, n_ok, HAS_POS_IDS)
        if ROTARY_MODE == 2:
            # xPos centre per key block here (any common centre cancels): the smallest key position
            xpos_center = tl.min(tl.where(n_ok, pos_k, _UNBOUNDED), 0)
    # learned phases: the launcher runs this kernel with group == 1 (k, v repeated per query head),
    # so head off_hk's phases are the only ones that rotate these keys
    PHASES_BK = PHASES + off_b * stride_phb + off_hk * stride_phh
    kta = ka
    ktb = kb
    if ROTARY_MODE != 0:
        ck, sk_ = rotary_cos_sin(pos_k, offs_n, n_ok, INV_FREQ, PHASES_BK, stride_pht, rotary_half, rotary_scale,
                                 head_dim, xpos_center, xpos_scale_base, True, ROTARY_MODE, HEAD_DIM // 2, FAST_TRIG)
        kta, ktb = _rotated(ka, kb, ck, sk_, dtype)

    # query blocks that see these keys: key j visible to i iff j - off - right <= i <= j - off + left
    lo = sq * 0
    hi = sq
    if HAS_WINDOW:
        lo = tl.maximum(start_n - off - window_right, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(start_n + (BLOCK_N - 1) - off + window_left + 1, sq)

    for g in range(0, group):
        off_h = off_hk * group + g
        PHASES_BH = PHASES + off_b * stride_phb + off_h * stride_phh
        ga = dka
        gb = dkb
        slope = 0.0
        if BIAS_MODE == 1:
            slope = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah)
        TABLE_H = BIAS_TABLE + off_h * stride_th
        URPE_H = URPE_TABLE + off_h * stride_uh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < sq
            rows_q = (q_start + offs_m)
            qa, qb = _load_tiles(Q + off_b * stride_qb + off_h * stride_qh + rows_q * stride_qm, m_ok, col_a, col_b,
                                 head_dim, ROTARY_MODE)
            if ROTARY_MODE != 0:
                tok_q = offs_m + off
                pos_q = _rotary_positions(POS_IDS_B, tok_q, m_ok, HAS_POS_IDS)
                cq, sq_ = rotary_cos_sin(pos_q, tok_q, m_ok, INV_FREQ, PHASES_BH, stride_pht, rotary_half,
                                         rotary_scale, head_dim, xpos_center, xpos_scale_base, False, ROTARY_MODE,
                                         HEAD_DIM // 2, FAST_TRIG)
                qa, qb = _rotated(qa, qb, cq, sq_, dtype)
            do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows_q[:, None] * stride_dom + offs_dv[None, :],
                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
            lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + rows_q * stride_lm, mask=m_ok,
                          other=float("inf"))
            # fully masked rows have lse -inf: use +inf so their (all -inf) logits give p = 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + rows_q * stride_lm, mask=m_ok, other=0.0)
            # transposed orientation (k q^T, [BLOCK_N, BLOCK_M]): the loop-invariant k and v are the
            # A operands of the MMAs, split across warps, instead of B operands replicated per warp
            qkt = _qk(kta, ktb, qa, qb, DOT_PRECISION, ROTARY_MODE)
            st, tht, relt = _fused_attention_logits(qkt, m_ok, n_ok, (start_n - start_m - off).to(tl.int32),
                                                    offs_m, offs_n, off_b, off_h, qk_scale2, softcap_scale,
                                                    softcap2, window_left, window_right, MASK, stride_mb, stride_mh,
                                                    stride_mm, stride_mn, slope, TABLE_H, stride_ti, T5_LUT,
                                                    bias_max_distance, BLOCK_M, BLOCK_N, SOFTCAP, HAS_WINDOW,
                                                    MASK_MODE, BIAS_MODE, True)
            pt = tl.exp2(st - lse2[None, :])
            coef = pt
            if HAS_URPE:
                coef = urpe_coef(relt, URPE_H, stride_ui, urpe_max_distance)
            keep = pt == pt
            if DROPOUT:
                keep = _dropout_keep(seed, off_h, off_b * (seqlen_q * (1 - IS_VARLEN)) + rows_q, offs_n,
                                     rng_rows, rng_cols, dropout_p, True)
            if DKDV_PART != 2:
                pvt = pt
                if HAS_URPE:
                    pvt = pvt * coef
                if DROPOUT:
                    pvt = tl.where(keep, pvt * dropout_scale, 0.0)
                dv = _dot_acc(pvt.to(dtype), do, dv, DOT_PRECISION)
            if DKDV_PART != 1:
                dpt = _dot(v, tl.trans(do), DOT_PRECISION)
                if HAS_URPE:
                    dpt = dpt * coef
                if DROPOUT:
                    dpt = tl.where(keep, dpt * dropout_scale, 0.0)
                dst = pt * (dpt - delta[None, :])
                if SOFTCAP:
                    dst = dst * (1.0 - tht * tht)
                if MASK_MODE != 0:
                    # masked entries have pt = 0 exactly; v_j . dO_i (and tanh) may be NaN for a poisoned key
                    dst = tl.where(pt == 0.0, 0.0, dst)
                dst = (dst * sm_scale).to(dtype)
                if DKDV_PART != 4:
                    ga = _dot_acc(dst, qa, ga, DOT_PRECISION)
                if ROTARY_MODE != 0 and DKDV_PART != 3:
                    gb = _dot_acc(dst, qb, gb, DOT_PRECISION)
        dka = ga
        dkb = gb

    start_n, off_bh, off_b, off_hk, q_start, k_start, sq, sk, off = _program_again(
        BLOCK_N, num_heads_k, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, offset, bottom_right, IS_VARLEN,
        FAST_TRIG)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < sk
    POS_IDS_B = POS_IDS + off_b * stride_pb
    PHASES_BK = PHASES + off_b * stride_phb + off_hk * stride_phh
    if DKDV_PART >= 3:
        pair = tl.arange(0, HEAD_DIM // 2)
        BUF = DKA_BUF + off_b * stride_sb + off_hk * stride_sh + (k_start + offs_n)[:, None] * stride_sn + pair[None, :]
        if DKDV_PART == 3:
            tl.store(BUF, dka, mask=n_ok[:, None])
        else:
            dka = tl.load(BUF, mask=n_ok[:, None], other=0.0)
    if ROTARY_MODE != 0 and DKDV_PART != 1 and DKDV_PART != 3:
        # recomputed rather than kept live across the loops (registers)
        pos_k = _rotary_positions(POS_IDS_B, offs_n, n_ok, HAS_POS_IDS)
        if ROTARY_MODE == 2:
            xpos_center = tl.min(tl.where(n_ok, pos_k, _UNBOUNDED), 0)
        ck, sk_ = rotary_cos_sin(pos_k, offs_n, n_ok, INV_FREQ, PHASES_BK, stride_pht, rotary_half, rotary_scale,
                                 head_dim, xpos_center, xpos_scale_base, True, ROTARY_MODE, HEAD_DIM // 2, FAST_TRIG)
        dka, dkb = rotate(dka, dkb, ck, -sk_)
        if ROTARY_MODE == 3:
            # after the rotation back, with cos / sin dead (registers: at head_dim 256 the phase, cos, sin,
            # k and gradient tiles live at once spilled)
            n_live = n_ok
            if HAS_WINDOW:
                n_live = _band_cols(offs_n, n_ok, sq * 0, sq - 1, off, window_left, window_right)
            K_rows = K + off_b * stride_kb + off_hk * stride_kh + (k_start + offs_n) * stride_kn
            xa, xb = _load_tiles(K_rows, n_live, col_a, col_b, head_dim, ROTARY_MODE)
            dph = rotary_dphase_unrotated(xa.to(tl.float32), xb.to(tl.float32), dka, dkb)
            if MASK_MODE != 0:
                # linear in (dka, dkb): exactly 0 where both are 0 (a key no query sees, possibly NaN)
                dph = tl.where((dka == 0.0) & (dkb == 0.0), 0.0, dph)
            pair = tl.arange(0, HEAD_DIM // 2)
            tl.store(DPHASES_K + off_b * stride_phb + off_hk * stride_phh + offs_n[:, None] * stride_pht
                     + pair[None, :], dph, mask=n_ok[:, None] & (pair < rotary_half)[None, :])
    if DKDV_PART != 1 and DKDV_PART != 3:
        _store_tiles(DK + off_b * stride_dkb + off_hk * stride_dkh + (k_start + offs_n) * stride_dkn, n_ok, col_a,
                     col_b, head_dim, dka, dkb, ROTARY_MODE)
    if DKDV_PART == 0 or DKDV_PART == 1:
        tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + (k_start + offs_n)[:, None] * stride_dvn
                 + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _fused_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DPHASES_Q, DBIAS_PART, DURPE_PART,
    CU_SEQLENS_Q, CU_SEQLENS_K, MASK, ALIBI, BIAS_TABLE, T5_LUT, URPE_TABLE, INV_FREQ, POS_IDS, PHASES,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqm, stride_dqh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah, stride_th, stride_ti, stride_uh, stride_ui,
    stride_pb, stride_phb, stride_phh, stride_pht,
    num_heads, group, seqlen_q, seqlen_k, head_dim, head_dim_v, offset, bottom_right,
    sm_scale, qk_scale2, softcap_scale, softcap2, window_left, window_right, bias_max_distance, urpe_max_distance,
    rotary_half, rotary_scale, xpos_scale_base, dropout_p, dropout_scale, seed, rng_rows, rng_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_MODE: tl.constexpr,
    BIAS_MODE: tl.constexpr, HAS_URPE: tl.constexpr, ROTARY_MODE: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
    NEED_DBIAS: tl.constexpr, NEED_DURPE: tl.constexpr, DIAG: tl.constexpr,
    BIAS_TABLE_BLOCK: tl.constexpr, URPE_TABLE_BLOCK: tl.constexpr,
):
    # One program per (query block, batch, head): dq of BLOCK_M rows, the learned-phase gradient of
    # these query rows (DPHASES_Q[b, h, i + off]), and this program's partial Toeplitz-table
    # gradients (d bias per clamped relative distance, d URPE coefficient), written once to its own
    # row of DBIAS_PART / DURPE_PART (num_m_blocks, batch * num_heads, TABLE_BLOCK) and summed by
    # the launcher: deterministic, O(table x programs) memory, never seqlen_q x seqlen_k.
    # Rotary: (dqa, dqb) accumulate the gradient w.r.t. the rotated q (half tiles), rotated back
    # after the loop with cos / sin recomputed there (not kept live across it).
    # Grid: (cdiv(max seqlen_q, BLOCK_M), batch * num_heads).
    tl.static_assert(ROTARY_MODE == 0 or HEAD_DIM >= 32, "rotary half tiles need HEAD_DIM >= 32 (tl.dot K >= 16)")
    pid_m = tl.program_id(0).to(tl.int64)
    start_m = pid_m * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hk = off_h // group
    q_start, k_start, sq, sk, off = _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_K, off_b, seqlen_q, seqlen_k,
                                                         offset, bottom_right, IS_VARLEN)
    if start_m >= sq:
        return
    dtype = Q.dtype.element_ty
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < sq
    col_a, col_b = _head_cols(rotary_half, HEAD_DIM, ROTARY_MODE, INTERLEAVED)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    dv_ok = offs_dv < head_dim_v
    rows_q = q_start + offs_m

    Q_rows = Q + off_b * stride_qb + off_h * stride_qh + rows_q * stride_qm
    qa, qb = _load_tiles(Q_rows, m_ok, col_a, col_b, head_dim, ROTARY_MODE)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows_q[:, None] * stride_dom + offs_dv[None, :],
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + rows_q * stride_lm, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + rows_q * stride_lm, mask=m_ok, other=0.0)
    K_bh = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    V_bh = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    PHASES_BH = PHASES + off_b * stride_phb + off_h * stride_phh
    POS_IDS_B = POS_IDS + off_b * stride_pb
    xpos_center = 0
    tok_q = offs_m + off
    pos_q = tok_q
    if ROTARY_MODE != 0:
        pos_q = _rotary_positions(POS_IDS_B, tok_q, m_ok, HAS_POS_IDS)
        if ROTARY_MODE == 2:
            xpos_center = tl.max(tl.where(m_ok, pos_q, -_UNBOUNDED), 0)
        cq, sq_ = rotary_cos_sin(pos_q, tok_q, m_ok, INV_FREQ, PHASES_BH, stride_pht, rotary_half, rotary_scale,
                                 head_dim, xpos_center, xpos_scale_base, False, ROTARY_MODE, HEAD_DIM // 2,
                                 FAST_TRIG)
        qa, qb = _rotated(qa, qb, cq, sq_, dtype)
    slope = 0.0
    if BIAS_MODE == 1:
        slope = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah)
    TABLE_H = BIAS_TABLE + off_h * stride_th
    URPE_H = URPE_TABLE + off_h * stride_uh
    rows = off_b * (seqlen_q * (1 - IS_VARLEN)) + rows_q

    dqa = tl.zeros(qa.shape, dtype=tl.float32)
    dqb = dqa
    if ROTARY_MODE != 0:
        dqb = tl.zeros(qb.shape, dtype=tl.float32)
    dbias_acc = tl.zeros([BIAS_TABLE_BLOCK], dtype=tl.float32)
    durpe_acc = tl.zeros([URPE_TABLE_BLOCK], dtype=tl.float32)

    lo = sk * 0
    hi = sk
    last_m = tl.minimum(start_m + BLOCK_M, sq) - 1
    if HAS_WINDOW:
        lo = tl.maximum(start_m + off - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + (BLOCK_M - 1) + off + window_right + 1, sk)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sk
        # keys no row of the block sees are loaded as zeros (hidden NaN / inf never reach dp or ds @ k)
        n_live = n_ok
        if HAS_WINDOW:
            n_live = _band_cols(offs_n, n_ok, start_m, last_m, off, window_left, window_right)
        ka, kb = _load_tiles(K_bh + offs_n * stride_kn, n_live, col_a, col_b, head_dim, ROTARY_MODE)
        if ROTARY_MODE != 0:
            pos_k = _rotary_positions(POS_IDS_B, offs_n, n_ok, HAS_POS_IDS)
            ck, sk_ = rotary_cos_sin(pos_k, offs_n, n_ok, INV_FREQ, PHASES_BH, stride_pht, rotary_half,
                                     rotary_scale, head_dim, xpos_center, xpos_scale_base, True, ROTARY_MODE,
                                     HEAD_DIM // 2, FAST_TRIG)
            ka, kb = _rotated(ka, kb, ck, sk_, dtype)
        v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_live[:, None] & dv_ok[None, :],
                    other=0.0)
        qk = _qk(qa, qb, ka, kb, DOT_PRECISION, ROTARY_MODE)
        rel_base = (start_n - start_m - off).to(tl.int32)
        s, th, rel = _fused_attention_logits(qk, m_ok, n_ok, rel_base, offs_m, offs_n, off_b, off_h,
                                             qk_scale2, softcap_scale, softcap2, window_left, window_right,
                                             MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                                             slope, TABLE_H, stride_ti, T5_LUT, bias_max_distance,
                                             BLOCK_M, BLOCK_N, SOFTCAP, HAS_WINDOW, MASK_MODE, BIAS_MODE)
        p = tl.exp2(s - lse2[:, None])
        if MASK_MODE != 0:
            # keys the mask hides from every row of the block (p column all 0): zero their k for ds @ k
            # (their ds is zeroed below); a column whose p underflowed everywhere has ds = 0 anyway
            k_live = tl.max(p, 0) > 0.0
            ka = tl.where(k_live[:, None], ka, 0.0)
            if ROTARY_MODE != 0:
                kb = tl.where(k_live[:, None], kb, 0.0)
        dpv = _dot(do, tl.trans(v), DOT_PRECISION)  # dO_i . v_j
        if MASK_MODE != 0:
            # masked entries: p = 0 exactly, and dO_i . v_j may be NaN for a hidden poisoned v_j
            dpv = tl.where(p == 0.0, 0.0, dpv)
        dp = dpv
        if HAS_URPE:
            coef = urpe_coef(rel, URPE_H, stride_ui, urpe_max_distance)
            dp = dp * coef
        if DROPOUT:
            keep = _dropout_keep(seed, off_h, rows, offs_n, rng_rows, rng_cols, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
            dpv = tl.where(keep, dpv * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])  # d loss / d logit (natural units), = d loss / d bias
        if NEED_DBIAS:
            dbias_acc = toeplitz_accumulate(dbias_acc, ds, rel_base, bias_max_distance,
                                            BLOCK_M, BLOCK_N, DIAG, BIAS_TABLE_BLOCK)
        if NEED_DURPE:
            # d loss / d C_ij = P_ij * keep_ij / (1 - p) * (dO_i . v_j)  (docs/ALGORITHMS.md 5.5)
            durpe_acc = toeplitz_accumulate(durpe_acc, p * dpv, rel_base, urpe_max_distance,
                                            BLOCK_M, BLOCK_N, DIAG, URPE_TABLE_BLOCK)
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
            if MASK_MODE != 0:
                ds = tl.where(p == 0.0, 0.0, ds)   # th is NaN for a masked poisoned key
        dsd = (ds * sm_scale).to(dtype)
        dqa = _dot_acc(dsd, ka, dqa, DOT_PRECISION)
        if ROTARY_MODE != 0:
            dqb = _dot_acc(dsd, kb, dqb, DOT_PRECISION)

    start_m, off_bh, off_b, off_h, q_start, k_start, sq, sk, off = _program_again(
        BLOCK_M, num_heads, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, offset, bottom_right, IS_VARLEN,
        FAST_TRIG)
    pid_m = start_m // BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < sq
    rows_q = q_start + offs_m
    if ROTARY_MODE != 0:
        # the column maps, cos / sin recomputed rather than kept live across the loop (registers)
        col_a, col_b = _head_cols(_opaque(rotary_half, FAST_TRIG).to(tl.int32), HEAD_DIM, ROTARY_MODE, INTERLEAVED)
        tok_q = offs_m + off
        pos_q = _rotary_positions(POS_IDS + off_b * stride_pb, tok_q, m_ok, HAS_POS_IDS)
        if ROTARY_MODE == 2:
            xpos_center = tl.max(tl.where(m_ok, pos_q, -_UNBOUNDED), 0)
        PHASES_BH = PHASES + off_b * stride_phb + off_h * stride_phh
        cq, sq_ = rotary_cos_sin(pos_q, tok_q, m_ok, INV_FREQ, PHASES_BH, stride_pht, rotary_half, rotary_scale,
                                 head_dim, xpos_center, xpos_scale_base, False, ROTARY_MODE, HEAD_DIM // 2,
                                 FAST_TRIG)
        dqa, dqb = rotate(dqa, dqb, cq, -sq_)
        if ROTARY_MODE == 3:
            # after the rotation back, with cos / sin dead (registers)
            Q_rows = Q + off_b * stride_qb + off_h * stride_qh + rows_q * stride_qm
            xa, xb = _load_tiles(Q_rows, m_ok, col_a, col_b, head_dim, ROTARY_MODE)
            dph = rotary_dphase_unrotated(xa.to(tl.float32), xb.to(tl.float32), dqa, dqb)
            pair = tl.arange(0, HEAD_DIM // 2)
            tl.store(DPHASES_Q + off_b * stride_phb + off_h * stride_phh + tok_q[:, None] * stride_pht
                     + pair[None, :], dph, mask=m_ok[:, None] & (pair < rotary_half)[None, :])
    _store_tiles(DQ + off_b * stride_dqb + off_h * stride_dqh + rows_q * stride_dqm, m_ok, col_a, col_b, head_dim,
                 dqa, dqb, ROTARY_MODE)
    part_row = pid_m * tl.num_programs(1) + off_bh
    if NEED_DBIAS:
        bins = tl.arange(0, BIAS_TABLE_BLOCK)
        tl.store(DBIAS_PART + part_row * BIAS_TABLE_BLOCK + bins, dbias_acc, mask=bins <= 2 * bias_max_distance)
    if NEED_DURPE:
        bins_u = tl.arange(0, URPE_TABLE_BLOCK)
        tl.store(DURPE_PART + part_row * URPE_TABLE_BLOCK + bins_u, durpe_acc, mask=bins_u <= 2 * urpe_max_distance)


@triton.jit
def _dropout_mask_kernel(OUT, CU_SEQLENS_Q, num_heads, seqlen_q, seqlen_k, dropout_p, seed, rng_rows, rng_cols,
                         stride_ob, stride_oh, stride_om,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr):
    # OUT uint8 (batch, heads, seqlen_q, seqlen_k) dense or (heads, total_q, max_seqlen_k) varlen
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    q_start, _k_start, sq, _sk, _off = _fused_attention_seq(CU_SEQLENS_Q, CU_SEQLENS_Q, off_b, seqlen_q, seqlen_q,
                                                            0, 0, IS_VARLEN)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = off_b * (seqlen_q * (1 - IS_VARLEN)) + q_start + offs_m
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, off_h, rows, offs_n, rng_rows, rng_cols, dropout_p)
        tl.store(OUT + off_b * stride_ob + off_h * stride_oh + (q_start + offs_m)[:, None] * stride_om
                 + offs_n[None, :], keep.to(tl.uint8), mask=(offs_m < sq)[:, None] & (offs_n < seqlen_k)[None, :])


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU tensors): no inline PTX, no bf16 dot there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=64)
def _t5_lut_cpu(num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """int32 bucket of every rel in [-(D+1), D+1] (D = max_distance), from the reference's own
    bucket function so kernel and reference agree exactly; beyond +-D every bucket is constant."""
    from posattn.reference import t5_bucket
    d = max_distance + 1
    rel = torch.arange(-d, d + 1)
    return t5_bucket(rel, num_buckets, max_distance, bidirectional).to(torch.int32)


def _t5_lut(pe, device) -> torch.Tensor:
    return _t5_lut_cpu(int(pe.num_buckets), int(pe.max_distance), bool(pe.bidirectional)).to(device)


class _Launch:
    """Everything the three kernels share, computed once per call from the launcher options."""

    def __init__(self, q, k, v, *, softmax_scale, causal, offset, window_left, window_right, softcap, pe,
                 attn_mask, dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        from posattn.positional import KernelPE
        pe = KernelPE() if pe is None else pe
        self.pe = pe
        self.device = q.device
        self.varlen = cu_seqlens_q is not None
        dummy = q
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            _, self.num_heads, self.head_dim = q.shape
            self.num_heads_k = k.shape[1]
            self.head_dim_v = v.shape[2]
            self.seqlen_q = int(max_seqlen_q)
            self.seqlen_k = int(max_seqlen_k)
            self.rng_rows = q.shape[0]
            self.qs = (0, q.stride(0), q.stride(1))
            self.ks = (0, k.stride(0), k.stride(1))
            self.vs = (0, v.stride(0), v.stride(1))
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
        else:
            self.batch, self.seqlen_q, self.num_heads, self.head_dim = q.shape
            self.seqlen_k, self.num_heads_k = k.shape[1], k.shape[2]
            self.head_dim_v = v.shape[3]
            self.rng_rows = self.batch * self.seqlen_q
            self.qs = (q.stride(0), q.stride(1), q.stride(2))
            self.ks = (k.stride(0), k.stride(1), k.stride(2))
            self.vs = (v.stride(0), v.stride(1), v.stride(2))
            self.cu_q = self.cu_k = torch.zeros(1, dtype=torch.int32, device=q.device)
        self.group = self.num_heads // self.num_heads_k
        self.rng_cols = self.seqlen_k
        self.bottom_right = 1 if offset is None else 0
        self.offset = 0 if offset is None else int(offset)
        self.sm_scale = float(self.head_dim ** -0.5 if softmax_scale is None else softmax_scale)
        self.softcap = float(softcap or 0.0)
        unb = _UNBOUNDED.value
        left = int(window_left) if window_left is not None and window_left >= 0 else unb
        right = int(window_right) if window_right is not None and window_right >= 0 else unb
        if causal:
            right = min(right, 0)
        self.window = (left, right)
        self.has_window = bool(causal) or left != unb or right != unb
        self.dropout_p = float(dropout_p)
        self.seed = int(seed)

        if attn_mask is None or self.varlen:
            self.mask, self.mask_mode, self.ms = dummy, 0, (0, 0, 0, 0)
        else:
            m = attn_mask
            mode = 1 if m.dtype == torch.bool else 2
            if mode == 1:
                m = m.view(torch.uint8)
            m = torch.broadcast_to(m, (self.batch, self.num_heads, self.seqlen_q, self.seqlen_k))
            self.mask, self.mask_mode, self.ms = m, mode, tuple(m.stride())

        # positional encodings
        self.alibi = pe.alibi_slopes if pe.bias_mode == 1 else dummy
        self.as_ = (pe.alibi_slopes.stride(0), pe.alibi_slopes.stride(1)) if pe.bias_mode == 1 else (0, 0)
        self.t5_lut = dummy
        self.bias_md = 0
        if pe.bias_mode == 2:
            t = pe.bias_table
            self.table, self.ts, self.bias_md = t, (t.stride(0), t.stride(1)), int(pe.max_distance)
        elif pe.bias_mode == 3:
            t = pe.bias_table  # (num_buckets, num_heads): row = bucket
            self.table, self.ts, self.bias_md = t, (t.stride(1), t.stride(0)), int(pe.max_distance) + 1
            self.t5_lut = _t5_lut(pe, q.device)
        else:
            self.table, self.ts = dummy, (0, 0)
        if pe.urpe_table is not None:
            u = pe.urpe_table
            self.urpe, self.us, self.urpe_md = u, (u.stride(0), u.stride(1)), int(pe.urpe_max_distance)
        else:
            self.urpe, self.us, self.urpe_md = dummy, (0, 0), 0
        self.rotary_mode = int(pe.rotary_mode)
        self.inv_freq = pe.inv_freq if pe.inv_freq is not None else dummy
        if pe.position_ids is not None:
            ids = pe.position_ids
            self.pos_ids, self.pos_stride = ids, (ids.stride(0) if ids.shape[0] > 1 else 0)
        else:
            self.pos_ids, self.pos_stride = dummy, 0
        if pe.phases is not None:
            ph = pe.phases
            self.phases = ph
            self.ps = (ph.stride(0) if ph.shape[0] > 1 else 0, ph.stride(1), ph.stride(2))
        else:
            self.phases, self.ps = dummy, (0, 0, 0)
        self.rotary_half = int(pe.rotary_dim) // 2 if self.rotary_mode else 0
        self.interleaved = bool(pe.interleaved) or self.rotary_mode == 2
        # rotary modes split q / k into two half tiles, each a tl.dot operand: K >= 16
        self.HEAD_DIM = max(32 if self.rotary_mode else 16, _next_pow2(self.head_dim))
        self.HEAD_DIM_V = max(16, _next_pow2(self.head_dim_v))
        if q.dtype == torch.float32:
            self.dot_precision = "ieee"
        elif q.dtype == torch.bfloat16 and _interpreting():
            self.dot_precision = "upcast"
        else:
            self.dot_precision = "tf32"

    def common_args(self):
        """Kernel arguments after the tensor pointers and their own strides (shared order)."""
        return (*self.ms, *self.as_, *self.ts, *self.us, self.pos_stride, *self.ps)

    def scalars(self, with_sm_scale: bool):
        s = self.softcap
        qk_scale2 = self.sm_scale * LOG2E.value
        extra = (self.sm_scale,) if with_sm_scale else ()
        return (*extra, qk_scale2, (self.sm_scale / s) if s > 0 else 0.0, s * LOG2E.value,
                self.window[0], self.window[1], self.bias_md, self.urpe_md,
                self.rotary_half, float(self.pe.rotary_scale), float(self.pe.xpos_scale_base),
                self.dropout_p, 1.0 / (1.0 - self.dropout_p), self.seed, self.rng_rows, self.rng_cols)

    def pe_ptrs(self):
        return (self.cu_q, self.cu_k, self.mask, self.alibi, self.table, self.t5_lut, self.urpe, self.inv_freq,
                self.pos_ids, self.phases)

    def constexprs(self):
        return dict(HEAD_DIM=self.HEAD_DIM, HEAD_DIM_V=self.HEAD_DIM_V, IS_VARLEN=self.varlen,
                    HAS_WINDOW=self.has_window, SOFTCAP=self.softcap > 0, MASK_MODE=self.mask_mode,
                    BIAS_MODE=int(self.pe.bias_mode), HAS_URPE=self.pe.urpe_table is not None,
                    ROTARY_MODE=self.rotary_mode, INTERLEAVED=self.interleaved,
                    HAS_POS_IDS=self.pe.position_ids is not None, DROPOUT=self.dropout_p > 0,
                    DOT_PRECISION=self.dot_precision, FAST_TRIG=not _interpreting())


def _lse_strides(lse, varlen):
    return (0, lse.stride(0), lse.stride(1)) if varlen else tuple(lse.stride())


def _row_strides(t, varlen):
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _config_kind(launch) -> str:
    """Which entry of FWD_CONFIGS / BWD_CONFIGS a call uses (see CONFIG_KINDS)."""
    rotary = launch.rotary_mode != 0
    table = launch.pe.bias_mode in (2, 3) or launch.pe.urpe_table is not None
    if rotary and table:
        return "rotary+table"
    if rotary:
        return "phases" if launch.rotary_mode == 3 else "rotary"
    return "table" if table else "plain"


def _blocks(configs, launch, block_m, block_n, num_warps, num_stages):
    """The launch config: ``configs`` entry, then the caller's overrides (which apply to the dq
    kernel's ``dq_*`` keys too). Missing ``dq_*`` keys default to the dk/dv kernel's."""
    cfg = config_for(configs, max(launch.HEAD_DIM, launch.HEAD_DIM_V), _config_kind(launch),
                     target_arch(launch.device))
    for name, val in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("num_warps", num_warps),
                      ("num_stages", num_stages)):
        if val is not None:
            cfg[name] = cfg["dq_" + name] = int(val)
        cfg.setdefault("dq_" + name, cfg[name])
    return cfg


def fused_attention_fwd(q, k, v, out, lse, *, softmax_scale=None, causal=False, offset=0, window_left=-1,
                        window_right=-1, softcap=0.0, pe=None, attn_mask=None, dropout_p=0.0, seed=0,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        block_m=None, block_n=None, num_warps=None, num_stages=None) -> None:
    """Fused attention forward with positional encodings computed in the kernel (no checks here).

    Parameters
    ----------
    q : (batch, seqlen_q, num_heads, head_dim), or (total_q, num_heads, head_dim) with cu_seqlens
    k : (batch, seqlen_k, num_heads_k, head_dim), or (total_k, num_heads_k, head_dim)
    v : (batch, seqlen_k, num_heads_k, head_dim_v), or (total_k, num_heads_k, head_dim_v)
        fp16 / bf16 / fp32, one dtype, any strides with a unit last-dim stride; head_dim,
        head_dim_v in 16..256 (padded to the next power of two inside); num_heads a multiple of
        num_heads_k (GQA: query head h reads kv head h // (num_heads // num_heads_k)).
    out : like q with head_dim_v, written (varlen: rows past cu_seqlens_q[-1] untouched).
    lse : fp32 (batch, num_heads, seqlen_q) dense or (num_heads, total_q) varlen, natural log;
        -inf for a row that sees no key (its out row is 0).
    softmax_scale : float or None (None = head_dim ** -0.5).
    causal : bool
        Key j visible to query i iff ``j <= i + offset``.
    offset : int or None
        Query row i sits at position ``i + offset`` (0: top-left, torch SDPA; ``seqlen_k -
        seqlen_q``: bottom-right, FlashAttention). None = bottom-right per sequence (in varlen
        mode the offset differs per sequence, so the varlen API passes None). Masks, the window
        and every positional encoding use these positions.
    window_left, window_right : int, -1 = unbounded
        Keys ``i + offset - left <= j <= i + offset + right``.
    softcap : float, 0 = off
        Scaled logits become ``softcap * tanh(s / softcap)`` before the positional bias.
    pe : posattn.positional.KernelPE or None (no encoding).
    attn_mask : bool (True = attend) or float (added) tensor broadcastable to
        (batch, num_heads, seqlen_q, seqlen_k), any strides (0 for broadcast dims); dense only
        (ignored in varlen mode). No gradient flows to a float mask.
    dropout_p : float in [0, 1); seed : int
        Kept probabilities are scaled by 1/(1 - dropout_p); the keep-mask is Philox
        ``tl.rand(seed, index)`` of each (head, query token, key) and is regenerated, not stored,
        by the backward (``dropout_keep_mask`` returns it).
    cu_seqlens_q, cu_seqlens_k : int32 (batch + 1,) or None; max_seqlen_q, max_seqlen_k : int
        Varlen mode: positions restart at 0 in every sequence; a zero-length sequence is fine.
    block_m, block_n, num_warps, num_stages : override ``FWD_CONFIGS`` (tests use small blocks).

    Source: FlashAttention-2 (arXiv 2307.08691) structure; encodings per docs/ALGORITHMS.md 5.1-5.5.
    Not yet run on a GPU.

    Examples
    --------
    >>> import os, torch  # CPU needs TRITON_INTERPRET=1 set before triton is imported
    >>> q = torch.randn(1, 5, 2, 16); k = torch.randn(1, 5, 2, 16); v = torch.randn(1, 5, 2, 16)
    >>> out = torch.empty_like(q); lse = torch.empty(1, 2, 5)
    >>> fused_attention_fwd(q, k, v, out, lse, causal=True, block_m=16, block_n=16)  # doctest: +SKIP
    """
    L = _Launch(q, k, v, softmax_scale=softmax_scale, causal=causal, offset=offset, window_left=window_left,
                window_right=window_right, softcap=softcap, pe=pe, attn_mask=attn_mask, dropout_p=dropout_p,
                seed=seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k)
    cfg = _blocks(FWD_CONFIGS, L, block_m, block_n, num_warps, num_stages)
    grid = (triton.cdiv(L.seqlen_q, cfg["BLOCK_M"]), L.batch * L.num_heads)
    if grid[0] == 0 or grid[1] == 0:
        return
    _fused_attention_fwd_kernel[grid](
        q, k, v, out, lse, *L.pe_ptrs(),
        *L.qs, *L.ks, *L.vs, *_row_strides(out, L.varlen), *_lse_strides(lse, L.varlen),
        *L.common_args(),
        L.num_heads, L.group, L.seqlen_q, L.seqlen_k, L.head_dim, L.head_dim_v, L.offset, L.bottom_right,
        *L.scalars(False),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **L.constexprs(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def fused_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, *, softmax_scale=None, causal=False, offset=0,
                        window_left=-1, window_right=-1, softcap=0.0, pe=None, attn_mask=None, dropout_p=0.0,
                        seed=0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        d_bias_table=None, d_urpe_table=None, d_phases=None, deterministic=True,
                        block_m=None, block_n=None, num_warps=None, num_stages=None) -> None:
    """Fused attention backward (FlashAttention-2 style, arXiv 2307.08691); no checks here.

    Parameters
    ----------
    dout, out : like ``out`` of the forward, unit stride in the last dim (not checked); lse : the forward's
        lse (fp32).
    q, k, v and every option : exactly as given to ``fused_attention_fwd`` (same seed for dropout).
    dq, dk, dv : written; shapes of q, k, v (dk, dv summed over the GQA group).
    d_bias_table : fp32 like ``pe.bias_table`` or None
        Written (not accumulated) with d loss / d table for RelativeBias (num_heads, 2D+1) or T5
        (num_buckets, num_heads). ALiBi slopes get no gradient.
    d_urpe_table : fp32 (num_heads, 2D+1) or None; written with d loss / d URPE table.
    d_phases : fp32 like ``pe.phases`` (batch, num_heads, seqlen_k, rotary_dim // 2) or None;
        written with d loss / d (cumulated) learned phases; the op layer chains it to ``freqs``.
    deterministic : bool
        Accepted for the FlashAttention interface; the kernels never use float atomics (dq has its
        own kernel, table gradients go through per-program partials summed here), so the result
        is deterministic either way.
    block_m, block_n, num_warps, num_stages : override ``BWD_CONFIGS``.

    Memory: fp32 delta like lse; with table gradients an fp32 (num_query_blocks, batch*num_heads,
    next_pow2(2D+1)) partial buffer; with learned phases two fp32 buffers like ``pe.phases``.
    Never seqlen_q x seqlen_k. Not yet run on a GPU.
    """
    L = _Launch(q, k, v, softmax_scale=softmax_scale, causal=causal, offset=offset, window_left=window_left,
                window_right=window_right, softcap=softcap, pe=pe, attn_mask=attn_mask, dropout_p=dropout_p,
                seed=seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k)
    cfg = _blocks(BWD_CONFIGS, L, block_m, block_n, num_warps, num_stages)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]  # dk/dv kernel
    BMQ, BNQ = cfg["dq_BLOCK_M"], cfg["dq_BLOCK_N"]  # dq kernel (and the preprocess)
    pe = L.pe
    dev = q.device
    varlen = L.varlen
    nq_blocks = triton.cdiv(L.seqlen_q, BMQ)
    nk_blocks = triton.cdiv(L.seqlen_k, BN)
    delta = torch.empty_like(lse)
    need_dbias = d_bias_table is not None and pe.bias_mode in (2, 3)
    need_durpe = d_urpe_table is not None and pe.urpe_table is not None
    need_dph = d_phases is not None and L.rotary_mode == 3
    if not varlen and L.seqlen_q == 0:  # no query: every gradient is zero
        dk.zero_()
        dv.zero_()
        for t in (d_bias_table, d_urpe_table, d_phases):
            if t is not None:
                t.zero_()
        return
    if nq_blocks > 0 and L.batch * L.num_heads > 0:
        _fused_attention_bwd_preprocess[(nq_blocks, L.batch * L.num_heads)](
            out, dout, delta, L.cu_q,
            *_row_strides(out, varlen), *_row_strides(dout, varlen), *_lse_strides(lse, varlen),
            L.num_heads, L.seqlen_q, L.head_dim_v,
            BLOCK_M=BMQ, HEAD_DIM_V=L.HEAD_DIM_V, IS_VARLEN=varlen,
        )
    if need_dph:
        dph_q = torch.zeros(pe.phases.shape, dtype=torch.float32, device=dev)
        dph_k = torch.zeros(pe.phases.shape, dtype=torch.float32, device=dev)
    else:
        dph_q = dph_k = q
    common = (*L.common_args(),)
    kk, vv, dkk, dvv, heads_k, group = k, v, dk, dv, L.num_heads_k, L.group
    if L.rotary_mode == 3 and group > 1:
        # learned phases rotate the keys differently for every query head: the dk/dv kernel then
        # runs per query head (k, v repeated, group 1) into fp32 buffers reduced over the group here
        # (fixed order: deterministic). Extra memory: k and v repeated, dk and dv in fp32, x group.
        ax = 1 if varlen else 2
        kk, vv = k.repeat_interleave(group, dim=ax), v.repeat_interleave(group, dim=ax)
        dkk = torch.empty(kk.shape, dtype=torch.float32, device=dev)
        dvv = torch.empty(vv.shape, dtype=torch.float32, device=dev)
        heads_k, group = L.num_heads, 1
    # split_dkdv: dv and dk by two launches of the kernel (DKDV_PART 1, 2); with rotary and
    # "split_dk" three (1, 3, 4; dka in an fp32 buffer [.., rows, heads_k, HEAD_DIM / 2]), see the kernel
    parts = (0,)
    dka_buf, dka_strides = q, (0, 0, 0)
    if cfg.get("split_dkdv"):
        parts = (1, 2)
        if cfg.get("split_dk") and L.rotary_mode != 0:
            parts = (1, 3, 4)
            dka_buf = torch.empty((*dkk.shape[:-1], L.HEAD_DIM // 2), dtype=torch.float32, device=dev)
            dka_strides = _row_strides(dka_buf, varlen)
    for part in parts:
        if nk_blocks == 0 or L.batch * heads_k == 0:
            break
        _fused_attention_bwd_dkdv_kernel[(nk_blocks, L.batch * heads_k)](
            q, kk, vv, dout, lse, delta, dkk, dvv, dph_k, *L.pe_ptrs(),
            *L.qs, *_row_strides(kk, varlen), *_row_strides(vv, varlen), *_row_strides(dout, varlen),
            *_lse_strides(lse, varlen), *_row_strides(dkk, varlen), *_row_strides(dvv, varlen),
            *common,
            L.num_heads, heads_k, group, L.seqlen_q, L.seqlen_k, L.head_dim, L.head_dim_v, L.offset,
            L.bottom_right, *L.scalars(True), dka_buf, *dka_strides,
            BLOCK_M=BM, BLOCK_N=BN, **L.constexprs(), DKDV_PART=part,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if dkk is not dk:
        dk.copy_(dkk.unflatten(ax, (L.num_heads_k, L.group)).sum(ax + 1))
        dv.copy_(dvv.unflatten(ax, (L.num_heads_k, L.group)).sum(ax + 1))
    bias_tb = _next_pow2(2 * L.bias_md + 1) if need_dbias else 16
    urpe_tb = _next_pow2(2 * L.urpe_md + 1) if need_durpe else 16
    n_prog = nq_blocks * L.batch * L.num_heads
    dbias_part = torch.zeros((n_prog, bias_tb), dtype=torch.float32, device=dev) if need_dbias else q
    durpe_part = torch.zeros((n_prog, urpe_tb), dtype=torch.float32, device=dev) if need_durpe else q
    if n_prog > 0:
        _fused_attention_bwd_dq_kernel[(nq_blocks, L.batch * L.num_heads)](
            q, k, v, dout, lse, delta, dq, dph_q, dbias_part, durpe_part, *L.pe_ptrs(),
            *L.qs, *L.ks, *L.vs, *_row_strides(dout, varlen), *_lse_strides(lse, varlen),
            *_row_strides(dq, varlen),
            *common,
            L.num_heads, L.group, L.seqlen_q, L.seqlen_k, L.head_dim, L.head_dim_v, L.offset, L.bottom_right,
            *L.scalars(True),
            BLOCK_M=BMQ, BLOCK_N=BNQ, **L.constexprs(),
            NEED_DBIAS=need_dbias, NEED_DURPE=need_durpe, DIAG=_next_pow2(BMQ + BNQ - 1),
            BIAS_TABLE_BLOCK=bias_tb, URPE_TABLE_BLOCK=urpe_tb,
            num_warps=cfg["dq_num_warps"], num_stages=cfg["dq_num_stages"],
        )
    # per-program partials -> per-head tables (fixed-order sums: deterministic)
    if need_dbias:
        rel = dbias_part.view(nq_blocks, L.batch, L.num_heads, bias_tb).sum((0, 1))[:, : 2 * L.bias_md + 1]
        if pe.bias_mode == 2:
            d_bias_table.copy_(rel)
        else:  # T5: bucket each clamped relative distance with the same lookup table (one-hot matmul)
            lut = L.t5_lut.long()
            onehot = torch.zeros(lut.numel(), int(pe.num_buckets), dtype=torch.float32, device=dev)
            onehot[torch.arange(lut.numel(), device=dev), lut] = 1.0
            d_bias_table.copy_((rel @ onehot).t())
    elif d_bias_table is not None:
        d_bias_table.zero_()
    if need_durpe:
        d_urpe_table.copy_(durpe_part.view(nq_blocks, L.batch, L.num_heads, urpe_tb).sum((0, 1))
                           [:, : 2 * L.urpe_md + 1])
    elif d_urpe_table is not None:
        d_urpe_table.zero_()
    if need_dph:
        d_phases.copy_(dph_q + dph_k)
    elif d_phases is not None:
        d_phases.zero_()


def dropout_keep_mask(batch_size, num_heads, seqlen_q, seqlen_k, dropout_p, seed, *, device="cpu",
                      cu_seqlens_q=None, max_seqlen_q=None, total_q=None):
    """The keep-mask the fused kernels draw for (dropout_p, seed): bool, True = kept.

    Dense: (batch_size, num_heads, seqlen_q, seqlen_k). Varlen (cu_seqlens_q given, seqlen_k =
    max_seqlen_k of the call): (num_heads, total_q, seqlen_k), key columns local to each sequence.
    ``total_q``: rows of the packed q the kernels were given (default cu_seqlens_q[-1]); it is part
    of the Philox index. For tests and debugging (the kernels regenerate it, they never read it).
    Not yet run on a GPU.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        total_q = int(cu_seqlens_q[-1]) if total_q is None else int(total_q)
        out = torch.zeros((num_heads, total_q, seqlen_k), dtype=torch.uint8, device=device)
        strides = (0, out.stride(0), out.stride(1))
        rows, sq = total_q, int(max_seqlen_q)
        cu = cu_seqlens_q
    else:
        out = torch.zeros((batch_size, num_heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
        strides = (out.stride(0), out.stride(1), out.stride(2))
        rows, sq = batch_size * seqlen_q, seqlen_q
        cu = torch.zeros(1, dtype=torch.int32, device=device)
    grid = (triton.cdiv(sq, 16), batch_size * num_heads)
    if grid[0] and grid[1] and seqlen_k:
        _dropout_mask_kernel[grid](out, cu, num_heads, seqlen_q if not varlen else sq, seqlen_k, float(dropout_p),
                                   int(seed), rows, seqlen_k, *strides, BLOCK_M=16, BLOCK_N=16, IS_VARLEN=varlen)
    return out.bool()


# ------------------------------------------------------------------------------------------------
# compile report (python -m posattn report): the launches a GPU would get, on small CPU tensors
# ------------------------------------------------------------------------------------------------
# the preprocess kernel (delta = rowsum(dO * O)) is a bandwidth-bound reduction, no matmul
MATMUL_BOUND = {"_fused_attention_fwd_kernel", "_fused_attention_bwd_dkdv_kernel", "_fused_attention_bwd_dq_kernel"}


def report_cases():
    """(label, thunk) pairs: each thunk calls a launcher with the default FWD/BWD_CONFIGS.

    Head dims 64 and 128 (fp16), every config kind (``_config_kind``): plain causal; RoPE + ALiBi,
    xPos, learned phases (rotary); RelativeBias + URPE, T5 (tables, with their gradients: the
    heaviest backward); RoPE + T5 (rotary and table); plus bf16 and head_dim 256 spot checks.
    ``posattn.report`` records the launches and compiles them for sm_80 / sm_90 without running.
    """
    from posattn.positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos, kernel_args

    b, s, h = 1, 256, 2

    def case(head_dim, position, backward, dtype):
        def thunk():
            q = torch.zeros(b, s, h, head_dim, dtype=dtype)
            pe = kernel_args(position, batch_size=b, num_heads=h, seqlen_q=s, seqlen_k=s, head_dim=head_dim,
                             offset=0, device="cpu")
            out, lse = torch.zeros_like(q), torch.zeros(b, h, s)
            opts = dict(causal=True, offset=0, pe=pe)
            if not backward:
                fused_attention_fwd(q, q, q, out, lse, **opts)
                return
            grads = dict(d_bias_table=pe.bias_table, d_urpe_table=pe.urpe_table, d_phases=pe.phases)
            grads = {n: (torch.zeros_like(t) if t is not None else None) for n, t in grads.items()}
            fused_attention_bwd(out, q, q, q, out, lse, torch.zeros_like(q), torch.zeros_like(q),
                                torch.zeros_like(q), **grads, **opts)
        return thunk

    positions = {
        "causal": lambda: None,
        "rope+alibi": lambda: [RoPE(), ALiBi()],
        "xpos": lambda: XPos(),
        "phases": lambda: LearnedPhaseRoPE(torch.full((b, h, s), 0.5)),
        "relbias+urpe": lambda: [RelativeBias(torch.zeros(h, 33), max_distance=16),
                                 URPE(torch.ones(h, 33), max_distance=16)],
        "t5": lambda: T5Bias(torch.zeros(32, h), num_buckets=32, max_distance=128),
        "rope+t5": lambda: [RoPE(), T5Bias(torch.zeros(32, h), num_buckets=32, max_distance=128)],
    }
    grid = [(d, name, "fp16") for d in (64, 128) for name in positions]
    grid += [(64, "rope+alibi", "bf16"), (256, "causal", "fp16"), (256, "rope+alibi", "fp16"), (256, "phases", "fp16")]
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    cases = []
    for d, name, dt in grid:
        for backward in (False, True):
            cases.append((f"d={d} {name} {'bwd' if backward else 'fwd'} {dt}",
                          case(d, positions[name](), backward, dtypes[dt])))
    return cases
