"""Triton kernel for kernelized attention with RPE (Luo et al., NeurIPS 2021, arXiv 2106.12566).

One kernel, ``_kernelized_rpe_fft_input_kernel``: it evaluates the feature map phi on a tile of rows
and writes, for one chunk of features [f0, f0 + num_chunk), the zero-padded FFT input of Algorithm 1

    A[b, h, f * head_dim_v + e, j] = phi(x_j)[f0 + f] * v[j, e]          (the phi(k) v^T outer products)
    A[b, h, num_chunk * head_dim_v + f, j] = phi(x_j)[f0 + f] * row_scale[j]   (phi(k) itself; row_scale = 1)
    A[b, h, :, j] = 0  for seq <= j < fft_len                          (padding of the circulant embedding)

in one pass, so neither phi(x) nor the (seq, m * d_v) outer-product buffer is built separately.
The sequence axis is last, so ``torch.fft.rfft(A, dim=-1)`` (cuFFT on a GPU) reads contiguous rows.
The same kernel builds the backward's input phi(q) (x) dnum / phi(q) * dden (FEATURE_MODE 0 with
``row_scale = dden``).

No validation and no policy here (STYLE.md): the launcher takes checked tensors and a preallocated
``out``. Not yet run on a GPU; tested under TRITON_INTERPRET=1 on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

# FEATURE_MODE values (also used by posattn.ops.kernelized_rpe)
FEATURE_PRECOMPUTED = 0  # x already holds phi(x), shape (..., seq, m); column f0 + f is read
FEATURE_PRF = 1          # Performer positive random features with projection W (m, head_dim)
FEATURE_RELU = 2         # relu(x) + RELU_EPS, elementwise (m = head_dim)
FEATURE_ELU1 = 3         # elu(x) + 1, elementwise (m = head_dim)
RELU_EPS = 1e-3          # Performer's kernel_epsilon for its ReLU kernel


@triton.jit
def _kernelized_rpe_fft_input_kernel(
    X, V, W, SHIFT, ROW_SCALE, A,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_wf, stride_wd,
    stride_shb, stride_shh, stride_shs,
    stride_rb, stride_rh, stride_rs,
    num_heads_x, seqlen, fft_len, f0, num_chunk, head_dim, head_dim_v,
    x_scale, feat_scale, relu_eps,
    FEATURE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Shapes (per program: BLOCK_S rows x BLOCK_F features x all head_dim_v columns):
    #   X (batch, num_heads_x, seqlen, head_dim) -- or (..., seqlen, m) holding phi when FEATURE_MODE == 0
    #   V (batch, num_heads_x, seqlen, head_dim_v); W (m, head_dim) (FEATURE_MODE == 1 only)
    #   SHIFT (batch, num_heads_x, seqlen) subtracted from the PRF exponent (stride 0 where it is per (b, h))
    #   ROW_SCALE (batch, num_heads_x, seqlen) multiplies the phi-only channels (HAS_ROW_SCALE)
    #   A (batch * num_heads_x, num_chunk * (head_dim_v + 1), fft_len), contiguous
    tl.static_assert(BLOCK_D >= 1, "BLOCK_D must cover head_dim")
    tl.static_assert((FEATURE_MODE >= 0) and (FEATURE_MODE <= 3), "FEATURE_MODE must be 0..3")
    pid_s = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1).to(tl.int64)
    pid_bh = tl.program_id(2).to(tl.int64)
    off_b = pid_bh // num_heads_x
    off_h = pid_bh % num_heads_x
    dtype = A.dtype.element_ty

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_DV).to(tl.int64)
    row_ok = offs_s < seqlen          # real rows; seqlen <= j < fft_len are padding zeros
    f_ok = offs_f < num_chunk
    e_ok = offs_e < head_dim_v

    x_base = X + off_b * stride_xb + off_h * stride_xh
    if FEATURE_MODE == 1:
        # phi_f(x) = feat_scale * exp(w_f . x' - |x'|^2 / 2 - shift), x' = x_scale * x
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = offs_d < head_dim
        x = tl.load(x_base + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(dtype) * x_scale
        w = tl.load(W + (f0 + offs_f)[:, None] * stride_wf + offs_d[None, :] * stride_wd,
                    mask=f_ok[:, None] & d_ok[None, :], other=0.0).to(dtype)
        # broadcast-and-sum rather than tl.dot: exact in fp32/fp64 (no tf32) and no minimum tile size
        logits = tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        sq = 0.5 * tl.sum(x * x, axis=1)
        shift = tl.load(SHIFT + off_b * stride_shb + off_h * stride_shh + offs_s * stride_shs,
                        mask=row_ok, other=0.0).to(dtype)
        phi = tl.exp(logits - (sq + shift)[:, None]) * feat_scale
    else:
        xf = tl.load(x_base + offs_s[:, None] * stride_xs + (f0 + offs_f)[None, :] * stride_xd,
                     mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(dtype)
        if FEATURE_MODE == 0:
            phi = xf
        elif FEATURE_MODE == 2:
            phi = tl.maximum(xf, 0.0) + relu_eps
        else:
            phi = tl.where(xf > 0.0, xf + 1.0, tl.exp(tl.minimum(xf, 0.0)))
    phi = tl.where(row_ok[:, None] & f_ok[None, :], phi, 0.0)

    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_s[:, None] * stride_vs + offs_e[None, :] * stride_vd,
                mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(dtype)
    outer = phi[:, :, None] * v[:, None, :]                   # (BLOCK_S, BLOCK_F, BLOCK_DV)

    num_channels = num_chunk * (head_dim_v + 1)
    a_base = A + pid_bh * num_channels * fft_len
    store_s = offs_s < fft_len
    ch1 = offs_f[None, :, None] * head_dim_v + offs_e[None, None, :]
    tl.store(a_base + ch1 * fft_len + offs_s[:, None, None], outer,
             mask=store_s[:, None, None] & f_ok[None, :, None] & e_ok[None, None, :])
    if HAS_ROW_SCALE:
        rs = tl.load(ROW_SCALE + off_b * stride_rb + off_h * stride_rh + offs_s * stride_rs,
                     mask=row_ok, other=0.0).to(dtype)
        phi = phi * rs[:, None]
    ch2 = num_chunk * head_dim_v + offs_f[None, :]
    tl.store(a_base + ch2 * fft_len + offs_s[:, None], phi, mask=store_s[:, None] & f_ok[None, :])


def kernelized_rpe_fft_input(x, v, out, *, feature_mode: int, f0: int, num_chunk: int, projection=None,
                             shift=None, row_scale=None, x_scale: float = 1.0, feat_scale: float = 1.0,
                             relu_eps: float = RELU_EPS, block_s: int = 32, block_f: int = 2) -> None:
    """Write the FFT input of one feature chunk into ``out``.

    x: (batch, num_heads_x, seqlen, head_dim) or phi (..., seqlen, m) for FEATURE_PRECOMPUTED, unit last stride;
    v: (batch, num_heads_x, seqlen, head_dim_v); projection: (m, head_dim) for FEATURE_PRF;
    shift, row_scale: (batch, num_heads_x, seqlen), any strides (stride 0 to broadcast);
    out: (batch, num_heads_x, num_chunk * (head_dim_v + 1), fft_len) contiguous, float32 or float64 (the
    compute dtype; inputs are converted on load). Every element of ``out`` is written.
    """
    batch, num_heads_x, seqlen = x.shape[0], x.shape[1], x.shape[2]
    head_dim_v = v.shape[-1]
    fft_len = out.shape[-1]
    head_dim = x.shape[-1]
    w = projection if projection is not None else x
    sh = shift if shift is not None else x
    rs = row_scale if row_scale is not None else x
    sh_strides = (shift.stride(0), shift.stride(1), shift.stride(2)) if shift is not None else (0, 0, 0)
    rs_strides = (row_scale.stride(0), row_scale.stride(1), row_scale.stride(2)) if row_scale is not None else (0, 0, 0)
    w_strides = (projection.stride(0), projection.stride(1)) if projection is not None else (0, 0)
    grid = (triton.cdiv(fft_len, block_s), triton.cdiv(num_chunk, block_f), batch * num_heads_x)
    _kernelized_rpe_fft_input_kernel[grid](
        x, v, w, sh, rs, out,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        *w_strides,
        *sh_strides,
        *rs_strides,
        num_heads_x, seqlen, fft_len, f0, num_chunk, head_dim, head_dim_v,
        float(x_scale), float(feat_scale), float(relu_eps),
        FEATURE_MODE=feature_mode, HAS_ROW_SCALE=row_scale is not None,
        BLOCK_S=block_s, BLOCK_F=block_f, BLOCK_D=triton.next_power_of_2(max(head_dim, 1)),
        BLOCK_DV=triton.next_power_of_2(max(head_dim_v, 1)),
    )


def report_cases():
    """Launches for ``python -m posattn report``: the FFT-input builder for each feature map at the
    shapes the op uses (head_dim 64, m 64 PRF features in chunks, fp32 compute; fp16/bf16 inputs)."""
    import torch
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for mode, name in ((FEATURE_PRF, "prf"), (FEATURE_ELU1, "elu+1"), (FEATURE_RELU, "relu"),
                           (FEATURE_PRECOMPUTED, "precomputed")):
            def thunk(dtype=dtype, mode=mode):
                b, h, s, d, dv, m, chunk = 1, 2, 256, 64, 64, 64, 8
                x = torch.empty(b, h, s, m if mode == FEATURE_PRECOMPUTED else d, dtype=dtype)
                v = torch.empty(b, h, s, dv, dtype=dtype)
                out = torch.empty(b, h, chunk * (dv + 1), 512, dtype=torch.float32)
                proj = torch.empty(m, d, dtype=torch.float32) if mode == FEATURE_PRF else None
                shift = torch.empty(b, h, s, dtype=torch.float32) if mode == FEATURE_PRF else None
                kernelized_rpe_fft_input(x, v, out, feature_mode=mode, f0=0, num_chunk=chunk, projection=proj,
                                         shift=shift)
            cases.append((f"{str(dtype).replace('torch.', '')} d64 m64 chunk8 {name}", thunk))
    return cases


__all__ = ["kernelized_rpe_fft_input", "FEATURE_PRECOMPUTED", "FEATURE_PRF", "FEATURE_RELU", "FEATURE_ELU1",
           "RELU_EPS"]
