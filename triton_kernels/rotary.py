"""Rotary embedding (RoPE) applied to one tensor, given the angles' cos/sin tables.

Shapes and strides (element units, any strides):
    X, OUT   (batch, seqlen, num_heads, head_dim)     stride_xb, stride_xs, stride_xh, stride_xd
    COS, SIN (seqlen_ro, rotary_dim // 2)             stride_cs, stride_cd (shared by cos and sin)
    POS      (batch or 1, seqlen) int32/int64 rows of cos/sin, or absent (row = token index)

Each pair (a, b) of the first rotary_dim features becomes (a cos - b sin, a sin + b cos) in fp32
(``CONJUGATE`` negates sin: the inverse rotation, used by the backward). Pairs are (i, i + r/2) for the
GPT-NeoX layout and (2i, 2i+1) when ``INTERLEAVED`` (GPT-J). Features past rotary_dim are copied when
OUT is not X (``COPY_REST``). OUT may alias X (in place): every element is read before it is written by
the same program.

Launcher only computes: inputs are validated by ``posattn.ops.rotary``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    X, COS, SIN, POS, OUT,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_cs, stride_cd, stride_pb, stride_ps,
    seqlen, num_heads, rotary_half, head_dim,
    HAS_POS: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_REST: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    mask_s = offs_s < seqlen
    mask_k = offs_k < rotary_half
    mask = mask_s[:, None] & mask_k[None, :]
    if HAS_POS:
        rows = tl.load(POS + b * stride_pb + offs_s * stride_ps, mask=mask_s, other=0).to(tl.int64)
    else:
        rows = offs_s
    c_ptr = rows[:, None] * stride_cs + offs_k[None, :] * stride_cd
    cos = tl.load(COS + c_ptr, mask=mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + c_ptr, mask=mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    if INTERLEAVED:
        d1 = 2 * offs_k
        d2 = 2 * offs_k + 1
    else:
        d1 = offs_k
        d2 = offs_k + rotary_half
    x_row = X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs
    o_row = OUT + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os
    x1 = tl.load(x_row + d1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + d2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x1 * sin + x2 * cos
    tl.store(o_row + d1[None, :] * stride_od, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_row + d2[None, :] * stride_od, o2.to(OUT.dtype.element_ty), mask=mask)
    if COPY_REST:
        for d0 in range(2 * rotary_half, head_dim, BLOCK_K):
            dr = d0 + offs_k
            mr = mask_s[:, None] & (dr < head_dim)[None, :]
            xr = tl.load(x_row + dr[None, :] * stride_xd, mask=mr, other=0.0)
            tl.store(o_row + dr[None, :] * stride_od, xr, mask=mr)


def apply_rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, *,
                     position_ids: torch.Tensor | None = None, interleaved: bool = False,
                     conjugate: bool = False) -> None:
    """Write the rotated ``x`` into ``out`` (may be ``x`` itself).

    x, out (batch, seqlen, num_heads, head_dim) fp16/bf16/fp32, any strides; cos, sin (seqlen_ro, r/2)
    with identical strides; position_ids None or (batch or 1, seqlen) int32/int64 with values in
    [0, seqlen_ro).
    """
    batch, seqlen, num_heads, head_dim = x.shape
    half = cos.shape[1]
    if x.numel() == 0:
        return
    block_k = max(16, triton.next_power_of_2(half))
    block_s = 4 if block_k >= 128 else 8
    if position_ids is not None:
        spb = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        sps = position_ids.stride(1)
        pos = position_ids
    else:
        spb = sps = 0
        pos = cos  # unused (HAS_POS=False)
    grid = (triton.cdiv(seqlen, block_s), batch * num_heads)
    _rotary_kernel[grid](
        x, cos, sin, pos, out,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        cos.stride(0), cos.stride(1), spb, sps,
        seqlen, num_heads, half, head_dim,
        HAS_POS=position_ids is not None, INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        COPY_REST=(out.data_ptr() != x.data_ptr()) and 2 * half < head_dim,
        BLOCK_S=block_s, BLOCK_K=block_k,
    )


def report_cases():
    """Launches for ``python -m posattn report``: the configs apply_rotary_fwd picks for common shapes
    (Llama-3 head_dim 128 GPT-NeoX layout, GPT-J interleaved 64 with position_ids, partial rotary), per dtype."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim, rot, inter, pos in ((128, 128, False, False), (64, 64, True, True), (80, 32, False, False)):
            def thunk(dtype=dtype, head_dim=head_dim, rot=rot, inter=inter, pos=pos):
                x = torch.empty(2, 64, 4, head_dim, dtype=dtype)
                cos = torch.empty(64, rot // 2, dtype=torch.float32)
                ids = torch.zeros(2, 64, dtype=torch.int32) if pos else None
                apply_rotary_fwd(x, cos, cos.clone(), torch.empty_like(x), position_ids=ids, interleaved=inter)
            name = str(dtype).replace("torch.", "")
            cases.append((f"{name} d{head_dim} rot{rot}{' interleaved' if inter else ''}{' pos_ids' if pos else ''}",
                          thunk))
    return cases
