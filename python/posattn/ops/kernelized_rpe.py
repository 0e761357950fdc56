"""Kernelized attention with relative positional encoding in O(n log n) via FFT.

Luo, Li, Cai, He et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding", NeurIPS 2021, arXiv 2106.12566 (docs/ALGORITHMS.md section 3). With a positive feature map phi and
c_r = exp(b_r),

    out_i = phi(q_i)^T [sum_j c_{j-i} phi(k_j) v_j^T] / phi(q_i)^T [sum_j c_{j-i} phi(k_j)],

and both bracketed sums are products with the Toeplitz matrix C_ij = c_{j-i}, computed for all i at
once by a circulant embedding and real FFTs (Algorithm 1 of the paper), chunked over features so memory
stays bounded.

Backward: an explicit ``torch.autograd.Function``. The FFT part is linear, so its adjoint is again a
Toeplitz product (the transposed one: a correlation, ``conj`` of the spectrum) and the gradient of the
bias is the channel-summed correlation of the incoming gradient with the FFT input; both are FFTs, chunked
like the forward. Only phi(q), phi(k) (seq x m) and the small per-row numbers are recomputed or saved; the
(seq, m * d_v) buffers exist one chunk at a time. The feature map's own gradient comes from autograd on a
recomputation of phi (seq x m), which also covers a callable feature map with parameters.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from .. import _backends
from ..reference import rpe_masked_rows
from .._checks import Dims, check_int, check_tensor, check_float, dtype_name
from ..ops_registry import register

__all__ = ["kernelized_rpe_attention", "draw_projection", "default_num_features"]

FEATURE_MAPS = ("prf", "relu", "elu+1")
_MODES = {"precomputed": 0, "prf": 1, "relu": 2, "elu+1": 3}  # = triton_kernels.kernelized_rpe.FEATURE_*
_RELU_EPS = 1e-3  # = triton_kernels.kernelized_rpe.RELU_EPS (Performer's kernel_epsilon)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Working-set target of one feature chunk (the real FFT input, its spectrum, the product, the output).
_CHUNK_BUDGET_BYTES = 256 * 2**20

register("kernelized_rpe", "posattn.ops.kernelized_rpe", ("triton", "torch"))


def default_num_features(head_dim: int) -> int:
    """Default number of random features for ``feature_map="prf"``: ``ceil(head_dim * ln(head_dim))``, at least 1.

    This is Performer's rule (Choromanski et al., arXiv 2009.14794: m = Theta(d log d) random features
    suffice; its reference code defaults to ``int(d * log(d))``). Luo et al. (arXiv 2106.12566) build on
    Performer's PRF; their exact m per experiment is not confirmed here (docs/ALGORITHMS.md open item 2).

    >>> from posattn import default_num_features
    >>> default_num_features(64)
    267
    """
    head_dim = check_int("head_dim", head_dim, minimum=1)
    return max(1, math.ceil(head_dim * math.log(head_dim)))


def draw_projection(num_features: int, head_dim: int, *, orthogonal: bool = True,
                    generator: torch.Generator | None = None, device=None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw the random projection W of Performer positive random features.

    Parameters
    ----------
    num_features : int >= 1
        m, the number of random features (rows of W).
    head_dim : int >= 1
        d, the size of each row.
    orthogonal : bool, default True
        True: rows come in blocks of d mutually orthogonal directions (QR of a Gaussian matrix), each row
        rescaled by the norm of an independent N(0, I_d) vector, so every row is still marginally
        N(0, I_d) (Performer's "orthogonal random features", arXiv 2009.14794 section 2.4). False: i.i.d.
        N(0, I_d) rows.
    generator : torch.Generator, optional
        Source of randomness (default: torch's global generator). Drawn on the generator's device.
    device, dtype
        Where the result lives (default CPU, float32).

    Returns
    -------
    torch.Tensor
        (num_features, head_dim), ``dtype`` on ``device``.

    Raises
    ------
    TypeError, ValueError
        Non-int or < 1 sizes; ``generator`` not a torch.Generator.

    Examples
    --------
    >>> import torch
    >>> from posattn import draw_projection
    >>> w = draw_projection(16, 8, generator=torch.Generator().manual_seed(0))
    >>> tuple(w.shape)
    (16, 8)
    >>> blk = w[:8] / w[:8].norm(dim=1, keepdim=True)
    >>> bool(torch.allclose(blk @ blk.T, torch.eye(8), atol=1e-5))
    True
    """
    m = check_int("num_features", num_features, minimum=1)
    d = check_int("head_dim", head_dim, minimum=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    kw = dict(generator=generator, device=gdev, dtype=torch.float64)
    if not orthogonal:
        w = torch.randn(m, d, **kw)
    else:
        blocks = []
        for _ in range(math.ceil(m / d)):
            qmat, rmat = torch.linalg.qr(torch.randn(d, d, **kw))
            # sign fix makes the QR factor Haar-distributed
            qmat = qmat * torch.sign(torch.diagonal(rmat)).where(torch.diagonal(rmat) != 0, torch.ones(1, **{
                k: kw[k] for k in ("device", "dtype")}))[None, :]
            blocks.append(qmat.T)
        w = torch.cat(blocks, dim=0)[:m]
        w = w * torch.randn(m, d, **kw).norm(dim=1, keepdim=True)
    return w.to(device=device if device is not None else "cpu", dtype=dtype)


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT sizes that pocketfft and cuFFT handle at full speed."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


# ---------------------------------------------------------------------------------------------------------------
# feature maps (torch): dtype-generic versions of reference.prf_features & co., plus the stabilising shifts


def _prf_logits(x, projection, x_scale):
    xs = x * x_scale
    return xs @ projection.transpose(-1, -2) - 0.5 * (xs * xs).sum(-1, keepdim=True)


def _features(x, mode, projection, x_scale, per_row):
    """phi(x) in x's dtype. PRF is shifted by max exponent: per row (query side; cancels between numerator and
    denominator) or per (batch, head) (key side: c_{j-i} weighs keys differently, so only a global shift cancels).
    The shift is a constant for autograd (the output does not depend on it). Returns (phi, shift or None)."""
    if mode == "prf":
        logits = _prf_logits(x, projection, x_scale)
        with torch.no_grad():
            shift = logits.amax(dim=-1) if per_row else logits.amax(dim=(-2, -1))[..., None].expand(logits.shape[:-1])
        return torch.exp(logits - shift[..., None]) / math.sqrt(projection.shape[0]), shift
    if mode == "relu":
        return torch.relu(x) + _RELU_EPS, None
    if mode == "elu+1":
        return torch.nn.functional.elu(x) + 1.0, None
    return x, None  # precomputed


def _toeplitz_kernel(rpe_bias, seqlen_q, seqlen_k, causal, fft_len, cdt):
    """c = exp(b - max b) per head (the shift cancels) with causal zeros, and u, its circulant embedding.

    u_t = c_{-t} at lag t = i - j: t = 0..seqlen_q-1 at 0..seqlen_q-1; t = -1..-(seqlen_k-1) at fft_len-1 down to
    fft_len-seqlen_k+1 (fft_len >= seqlen_q + seqlen_k - 1, so nothing wraps)."""
    b = rpe_bias.detach().to(cdt)
    used = b[:, :seqlen_q] if causal else b
    top = used.amax(dim=1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)   # a head with every entry -inf: c = 0
    c = torch.exp(b - top)
    if causal:
        c[:, seqlen_q:] = 0.0
    u = torch.zeros(b.shape[0], fft_len, dtype=cdt, device=b.device)
    u[:, :seqlen_q] = c[:, :seqlen_q].flip(-1)
    if seqlen_k > 1:
        u[:, fft_len - seqlen_k + 1:] = c[:, seqlen_q:].flip(-1)
    return c, u


def _build_input(backend, x, v, fft_len, *, mode, f0, num_chunk, projection=None, shift=None, row_scale=None,
                 x_scale=1.0, feat_scale=1.0, cdt):
    """FFT input (batch, heads_x, num_chunk * (d_v + 1), fft_len) for features [f0, f0 + num_chunk)."""
    batch, heads, seqlen = x.shape[:3]
    dv = v.shape[-1]
    if backend == "triton":
        from posattn.triton_kernels.kernelized_rpe import kernelized_rpe_fft_input
        out = torch.empty(batch, heads, num_chunk * (dv + 1), fft_len, dtype=cdt, device=x.device)
        kernelized_rpe_fft_input(x, v, out, feature_mode=_MODES[mode], f0=f0, num_chunk=num_chunk,
                                 projection=projection, shift=shift, row_scale=row_scale, x_scale=x_scale,
                                 feat_scale=feat_scale, relu_eps=_RELU_EPS)
        return out
    if mode == "prf":
        xs = x.to(cdt) * x_scale
        w = projection[f0:f0 + num_chunk].to(cdt)
        phi = torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True) - shift[..., None]) * feat_scale
    else:
        phi, _ = _features(x[..., f0:f0 + num_chunk].to(cdt), mode, None, 1.0, False)
    out = torch.empty((batch, heads, num_chunk * (dv + 1), fft_len), dtype=cdt, device=x.device)
    out[..., seqlen:].zero_()
    phi_t = phi.transpose(-1, -2)                                        # (B, H, nc, S)
    # outer products written in place, sequence axis last: A1[f, e, j] = phi[j, f] v[j, e]
    torch.mul(phi_t[:, :, :, None, :], v.to(cdt).transpose(-1, -2)[:, :, None, :, :],
              out=out[..., : num_chunk * dv, :seqlen].unflatten(2, (num_chunk, dv)))
    if row_scale is None:
        out[..., num_chunk * dv:, :seqlen] = phi_t
    else:
        torch.mul(phi_t, row_scale[..., None, :].to(cdt), out=out[..., num_chunk * dv:, :seqlen])
    return out


def _chunk_features(chunk_size, m, batch, heads, heads_k, dv, fft_len, cdt):
    if chunk_size is not None:
        return min(chunk_size, m)
    itemsize = torch.empty((), dtype=cdt).element_size()
    per_feature = batch * (dv + 1) * fft_len * itemsize * (2 * heads_k + 3 * heads)
    return max(1, min(m, _CHUNK_BUDGET_BYTES // max(per_feature, 1)))


class _KernelizedRPE(torch.autograd.Function):
    """Inputs: xq (B, H, N, d) and xk (B, H_kv, S, d) -- q and k after normalisation, or phi(q), phi(k) when
    mode == "precomputed" -- v (B, H_kv, S, d_v), rpe_bias (H, N + S - 1), projection (m, d) or None."""

    @staticmethod
    def forward(ctx, xq, xk, v, rpe_bias, projection, cfg):
        mode, cdt, backend = cfg["mode"], cfg["cdt"], cfg["backend"]
        batch, heads, n, _ = xq.shape
        heads_k, s, dv = xk.shape[1], xk.shape[2], v.shape[-1]
        group = heads // heads_k
        fft_len = cfg["fft_len"]
        with torch.no_grad():
            proj = projection.to(cdt) if projection is not None else None
            phiq, _ = _features(xq.to(cdt), mode, proj, cfg["x_scale"], per_row=True)
            m = phiq.shape[-1]
            shift_k = None
            if mode == "prf":
                shift_k = _prf_logits(xk.to(cdt), proj, cfg["x_scale"]).amax(dim=(-2, -1))
                shift_k = shift_k[..., None].expand(batch, heads_k, s)
            c, u = _toeplitz_kernel(rpe_bias, n, s, cfg["causal"], fft_len, cdt)
            spec_u = torch.fft.rfft(u, dim=-1).view(1, heads_k, group, 1, -1)
            num = xq.new_zeros((batch, heads, n, dv), dtype=cdt)
            den = xq.new_zeros((batch, heads, n), dtype=cdt)
            mc = _chunk_features(cfg["chunk_size"], m, batch, heads, heads_k, dv, fft_len, cdt)
            for f0 in range(0, m, mc):
                nc = min(mc, m - f0)
                a = _build_input(backend, xk, v, fft_len, mode=mode, f0=f0, num_chunk=nc, projection=proj,
                                 shift=shift_k, x_scale=cfg["x_scale"], feat_scale=cfg["feat_scale"], cdt=cdt)
                spec = torch.fft.rfft(a, dim=-1)
                del a
                spec = spec.mul_(spec_u[:, :, 0]) if group == 1 else (spec[:, :, None] * spec_u).flatten(1, 2)
                d = torch.fft.irfft(spec, n=fft_len, dim=-1)[..., :n]
                del spec
                pq = phiq[..., f0:f0 + nc]
                num += torch.einsum("bhnf,bhfen->bhne", pq, d[:, :, : nc * dv].unflatten(2, (nc, dv)))
                den += torch.einsum("bhnf,bhfn->bhn", pq, d[:, :, nc * dv:])
                del d
            den, clamped = _clamp_denominator(den)
            # fully masked rows (every bias entry they read is -inf): out = 0 exactly, as the fused attention ops
            # return for rows with no visible key (the FFT gives them round-off / 0 = garbage or NaN)
            dead = rpe_masked_rows(rpe_bias, n, s, cfg["causal"])[None]                   # (1, H, N)
            den = torch.where(dead, torch.ones_like(den), den)
            clamped = clamped & ~dead
            out = torch.where(dead[..., None], torch.zeros_like(num), num / den[..., None])
            cfg["roundoff"] = _roundoff_estimate(phiq, xk, v, u, den, out, mode, proj, cfg["x_scale"], shift_k,
                                                 group, cdt, dead)
        ctx.cfg = cfg
        ctx.save_for_backward(xq, xk, v, rpe_bias, projection, out, den, clamped, dead)
        ctx.mark_non_differentiable(clamped)
        return out.to(cfg["out_dtype"]), clamped

    @staticmethod
    def backward(ctx, dout, _dclamped):
        xq, xk, v, rpe_bias, projection, out, den, clamped, dead = ctx.saved_tensors
        cfg = ctx.cfg
        mode, cdt, backend, fft_len = cfg["mode"], cfg["cdt"], cfg["backend"], cfg["fft_len"]
        batch, heads, n, _ = xq.shape
        heads_k, s, dv = xk.shape[1], xk.shape[2], v.shape[-1]
        group = heads // heads_k
        need_q, need_k, need_v, need_b, need_w = ctx.needs_input_grad[:5]

        # phi with autograd (seq x m each); the FFT part below is explicit
        with torch.enable_grad():
            xq_ = xq.detach().to(cdt).requires_grad_(need_q)
            xk_ = xk.detach().to(cdt).requires_grad_(need_k)
            proj_ = projection.detach().to(cdt).requires_grad_(need_w) if projection is not None else None
            phiq_g, _ = _features(xq_, mode, proj_, cfg["x_scale"], per_row=True)
            phik_g, _ = _features(xk_, mode, proj_, cfg["x_scale"], per_row=False)
        phiq, phik = phiq_g.detach(), phik_g.detach()
        m = phiq.shape[-1]
        vc = v.detach().to(cdt)

        g = torch.where(dead[..., None], torch.zeros((), dtype=cdt, device=dout.device), dout.to(cdt))  # out = 0 there
        dnum = g / den[..., None]
        dden = torch.where(clamped, torch.zeros_like(den), -(g * out).sum(-1) / den)

        c, u = _toeplitz_kernel(rpe_bias, n, s, cfg["causal"], fft_len, cdt)
        spec_u = torch.fft.rfft(u, dim=-1).view(1, heads_k, group, 1, -1)
        dphiq = torch.zeros_like(phiq)
        dphik = torch.zeros_like(phik)
        dv_ = torch.zeros_like(vc)
        spec_du = torch.zeros(heads_k, group, spec_u.shape[-1], dtype=spec_u.dtype, device=spec_u.device)
        mc = _chunk_features(cfg["chunk_size"], m, batch, heads, heads_k, dv, fft_len, cdt)
        for f0 in range(0, m, mc):
            nc = min(mc, m - f0)
            pk = phik[..., f0:f0 + nc]
            pq = phiq[..., f0:f0 + nc]
            spec_a = torch.fft.rfft(_build_input(backend, pk, vc, fft_len, mode="precomputed", f0=0, num_chunk=nc,
                                                 cdt=cdt), dim=-1)[:, :, None]   # (B, H_kv, 1, C, F)
            if need_q or need_w:
                d = torch.fft.irfft((spec_a * spec_u).flatten(1, 2), n=fft_len, dim=-1)[..., :n]
                dphiq[..., f0:f0 + nc] = (torch.einsum("bhfen,bhne->bhnf", d[:, :, : nc * dv].unflatten(2, (nc, dv)), dnum)
                                          + d[:, :, nc * dv:].transpose(-1, -2) * dden[..., None])
                del d
            # dD = phi(q) (x) dnum (and phi(q) * dden): the same builder, row_scale = dden
            spec_dd = torch.fft.rfft(_build_input(backend, pq, dnum, fft_len, mode="precomputed", f0=0, num_chunk=nc,
                                                  row_scale=dden, cdt=cdt), dim=-1)
            spec_dd = spec_dd.unflatten(1, (heads_k, group))               # (B, H_kv, G, C, F)
            if need_b:
                spec_du += (spec_dd * spec_a.conj()).sum(dim=(0, 3))
            if need_k or need_v or need_w:
                da = torch.fft.irfft((spec_dd * spec_u.conj()).sum(2), n=fft_len, dim=-1)[..., :s]  # (B, H_kv, C, S)
                da1 = da[:, :, : nc * dv].unflatten(2, (nc, dv))
                dphik[..., f0:f0 + nc] = torch.einsum("bhfes,bhse->bhsf", da1, vc) + da[:, :, nc * dv:].transpose(-1, -2)
                dv_ += torch.einsum("bhfes,bhsf->bhse", da1, pk)
                del da, da1
            del spec_a, spec_dd

        dq = dk = dw = dbias = None
        if need_b:
            du = torch.fft.irfft(spec_du.flatten(0, 1), n=fft_len, dim=-1)  # (H, L): d loss / d u_t
            dc = torch.cat([du[:, :n].flip(-1), du[:, fft_len - s + 1:].flip(-1) if s > 1 else du[:, :0]], dim=1)
            dbias = (dc * c).to(rpe_bias.dtype)      # c = exp(b - max b); causal zeros give zero gradient
        if need_q or need_k or need_w:
            outs, grads = [], []
            for t, gt in ((phiq_g, dphiq), (phik_g, dphik)):
                if t.requires_grad:
                    outs.append(t)
                    grads.append(gt)
            inputs = [t for t, need in ((xq_, need_q), (xk_, need_k), (proj_, need_w)) if need]
            res = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
            if need_q:
                dq = res.pop(0)
            if need_k:
                dk = res.pop(0)
            if need_w:
                dw = res.pop(0)
            dq = dq.to(xq.dtype) if dq is not None else (torch.zeros_like(xq) if need_q else None)
            dk = dk.to(xk.dtype) if dk is not None else (torch.zeros_like(xk) if need_k else None)
            dw = dw.to(projection.dtype) if dw is not None else (torch.zeros_like(projection) if need_w else None)
        dvv = dv_.to(v.dtype) if need_v else None
        return dq, dk, dvv, dbias, dw, None


def _roundoff_estimate(phiq, xk, v, u, den, out, mode, proj, x_scale, shift_k, group, cdt, dead) -> float:
    """Estimated max abs FFT round-off error of ``out`` relative to rms(v), O(S m d_v) extra work.

    A product with the circulant of u, computed by FFT, errs per element by about eps |u|_2 |a|_2 for a channel
    a (measured: the actual error is below this for every element tried, median 1/25 of it). Summed through the
    contraction with phi(q) and the division by the denominator:
    err(out_ie) ~ eps |u|_2 (sum_f phi(q)_if |phi(k)_f v_e|_2 + |out_ie| sum_f phi(q)_if |phi(k)_f|_2) / den_i.
    It is large when the keys a query row sees are tiny next to the largest key feature of the sequence (e.g.
    early causal rows with PRF): round-off is relative to the whole sequence.
    """
    if mode == "prf":
        phik = torch.exp(_prf_logits(xk.to(cdt), proj, x_scale) - shift_k[..., None]) / math.sqrt(proj.shape[0])
    else:
        phik, _ = _features(xk.to(cdt), mode, None, 1.0, False)
    vc = v.to(cdt)
    sq = phik.square().transpose(-1, -2)                                   # (B, H_kv, m, S)
    nkv = torch.cat([(sq @ vc.square()).sqrt(), sq.sum(-1, keepdim=True).sqrt()], dim=-1)  # (B, H_kv, m, d_v + 1)
    if group > 1:
        nkv = nkv.repeat_interleave(group, dim=1)
    noise = (phiq @ nkv) * u.norm(dim=-1)[None, :, None, None]             # (B, H, N, d_v + 1)
    est = (noise[..., :-1] + out.abs() * noise[..., -1:]) / den[..., None]
    est = est.masked_fill(dead[..., None], 0.0)        # fully masked rows are exact zeros, not FFT results
    scale = vc.square().mean().sqrt().clamp_min(torch.finfo(cdt).tiny)
    return float(est.max() / scale) * torch.finfo(cdt).eps


def _clamp_denominator(den):
    """Denominators are sums of positive terms, but the FFT returns them with absolute round-off ~ eps x the
    largest one of that (batch, head). Values at or below that floor (including non-positive ones) are raised to
    it, so the output stays finite; the returned mask says which rows were clamped (their output is unreliable)."""
    eps = torch.finfo(den.dtype).eps
    floor = 16 * eps * den.abs().amax(dim=-1, keepdim=True)
    floor = torch.clamp(floor, min=torch.finfo(den.dtype).tiny)
    clamped = den <= floor
    return torch.where(clamped, floor.expand_as(den), den), clamped


def kernelized_rpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe_bias: torch.Tensor, *,
                             feature_map: str | Callable = "prf", num_features: int | None = None,
                             causal: bool = False, normalize_qk: bool = False,
                             projection: torch.Tensor | None = None, generator: torch.Generator | None = None,
                             softmax_scale: float | None = None, chunk_size: int | None = None,
                             fft_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """Kernelized attention with a relative positional (Toeplitz) bias, in O(n log n) by FFT.

    Computes, per batch b and query head h (Luo et al., NeurIPS 2021, arXiv 2106.12566, Algorithm 1)::

        out[b, h, i] = sum_j c[h, j-i] (phi(q_i) . phi(k_j)) v_j  /  sum_j c[h, j-i] (phi(q_i) . phi(k_j))
        c[h, r] = exp(rpe_bias[h, r + seqlen_q - 1])

    which approximates softmax(softmax_scale * q k^T + b_{j-i}) v when phi(q).phi(k) ~ exp(softmax_scale q.k)
    (``feature_map="prf"``). The two sums over j are Toeplitz products computed by real FFTs of length
    L = the smallest 2^a 3^b 5^c >= seqlen_q + seqlen_k - 1, chunked over the m * head_dim_v channels.
    Never builds a (seqlen_q, seqlen_k) matrix.

    Parameters
    ----------
    q : torch.Tensor
        (batch_size, num_heads, seqlen_q, head_dim); float16, bfloat16, float32 or float64.
    k : torch.Tensor
        (batch_size, num_heads_k, seqlen_k, head_dim), same dtype and device as q. num_heads must be a multiple
        of num_heads_k (GQA/MQA: query head h reads key/value head h // (num_heads // num_heads_k)).
    v : torch.Tensor
        (batch_size, num_heads_k, seqlen_k, head_dim_v), same dtype and device as q.
    rpe_bias : torch.Tensor
        (num_heads, seqlen_q + seqlen_k - 1), any floating dtype, same device; entry r = j - i + seqlen_q - 1
        holds b_{j-i} for query i and key j (for seqlen_q == seqlen_k == seq: (num_heads, 2*seq - 1), centre
        entry seq - 1 is distance 0). Natural-log units (added to the logits). Differentiable.
    feature_map : {"prf", "relu", "elu+1"} or callable, default "prf"
        "prf": Performer positive random features (arXiv 2009.14794)
        phi(x) = m^-1/2 exp(W x' - |x'|^2/2), x' = softmax_scale**0.5 * x, W (m, head_dim) from ``projection``
        or drawn (orthogonal) per call. "relu": relu(x) + 1e-3 (Performer's ReLU kernel and epsilon);
        "elu+1": elu(x) + 1 (Katharopoulos et al., arXiv 2006.16236); both elementwise, m = head_dim.
        A callable maps x (..., seq, head_dim) to phi (..., seq, m), is applied to q and k separately, must
        return finite values > 0 (checked; ValueError otherwise) and may have parameters (gradients flow).
    num_features : int >= 1, optional
        m for "prf" (default ``projection.shape[0]`` if given, else :func:`default_num_features`).
    causal : bool, default False
        True: query i sees keys j <= i (top-left, like torch SDPA); the Toeplitz matrix is lower triangular
        (c_r = 0 for r > 0)::

            i\\j 0 1 2
            0    x . .
            1    x x .
            2    x x x
    normalize_qk : bool, default False
        L2-normalise q and k per token first (the "stable" variant of Luo et al.: bounded PRF variance, the
        bias supplies the sharpness). Our choice for the open temperature question (docs/ALGORITHMS.md open item 2):
        the default softmax_scale becomes 1.0, i.e. phi estimates exp(q_hat . k_hat).
    projection : torch.Tensor, optional
        (num_features, head_dim) PRF directions W (see :func:`draw_projection`), shared by all heads. Fixes the
        random features; redraw by passing a new one. Receives a gradient if it requires one. "prf" only.
    generator : torch.Generator, optional
        Randomness for drawing W when ``projection`` is None ("prf" only; default torch's global generator).
    softmax_scale : float > 0, optional
        Temperature of the kernel being estimated ("prf" only); default head_dim**-0.5 (1.0 with normalize_qk).
    chunk_size : int >= 1, optional
        Features per FFT chunk; default: as many as fit a ~256 MiB working set.
    fft_dtype : torch.float32 or torch.float64, optional
        Precision of the feature maps, FFTs and accumulation. Default float32 (float64 for float64 inputs).
        Half precision is refused: FFT round-off is relative to the largest term of the whole sequence.
    backend : {"auto", "torch", "triton"}, default "auto"
        "auto": Triton for CUDA tensors, torch (torch.fft) on CPU. "triton" on CPU needs TRITON_INTERPRET=1.

    Returns
    -------
    torch.Tensor
        out, (batch_size, num_heads, seqlen_q, head_dim_v), q's dtype, contiguous. Inputs are not modified.
        A fully masked query row -- every ``rpe_bias`` entry it reads is -inf (all keys, or keys j <= i under
        ``causal``), e.g. a whole head of -inf -- gets out = 0 exactly (as the fused attention ops return for
        rows with no visible key; not 0/0 = NaN), with zero gradient through it; the other rows and their
        gradients are unaffected and finite. Both backends (the masking is applied around the kernels), and
        ``posattn.reference`` (``kernelized_rpe_direct`` / ``kernelized_rpe_fft`` / ``exact_rpe_attention``)
        agree. NaN in rpe_bias is not a mask: it propagates.

    Raises
    ------
    TypeError
        A non-tensor argument, unsupported or mismatched dtypes, a non-bool flag, a half-precision fft_dtype.
    ValueError
        Shapes that disagree (message names the argument, expected vs got), rpe_bias of the wrong length,
        num_features < 1, num_features/projection/softmax_scale given with a non-"prf" map, a callable
        feature map returning values <= 0 or non-finite, an unknown feature_map or backend.
    RuntimeError
        An explicit backend that cannot run here.

    Warns
    -----
    RuntimeWarning
        When some denominators fall below the FFT round-off floor (a bias range too wide for the FFT
        precision): those rows are clamped and unreliable; ``fft_dtype=torch.float64`` helps. Also when the
        estimated FFT round-off of the output exceeds 1e-2 x rms(v): FFT round-off is relative to the largest
        term of the whole sequence, so query rows that only see keys with tiny features (early rows under
        ``causal`` with PRF on long sequences: measured max error 3e-3 at seq 2048, d = m = 32) lose accuracy in
        float32; ``fft_dtype=torch.float64`` fixes it at about 2x the cost.

    Notes
    -----
    Stabilisation (docs/ALGORITHMS.md 3b): max b is subtracted per head; the PRF exponent is shifted by its row max
    for queries and by its global max per (batch, head) for keys; denominators at or below 16 eps x the largest
    of their (batch, head) are clamped. Cost O(batch * num_heads * m * head_dim_v * L log L) time and
    O(batch * num_heads * chunk * head_dim_v * L) scratch. Backward: explicit (FFT adjoints), chunked the same
    way. Not yet run on a GPU.

    Examples
    --------
    >>> import torch
    >>> from posattn import kernelized_rpe_attention
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    >>> bias = torch.zeros(2, 19, requires_grad=True)
    >>> out = kernelized_rpe_attention(q, k, v, bias, feature_map="elu+1", causal=True)
    >>> tuple(out.shape)
    (1, 2, 10, 8)
    >>> out.sum().backward(); tuple(bias.grad.shape)
    (2, 19)
    """
    # ---- checks
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=_DTYPES, ndim=4)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {dtype_name(q.dtype)} (same as q), got {dtype_name(t.dtype)}")
    dims = Dims()
    dims.check("q", q, ("batch_size", "num_heads", "seqlen_q", "head_dim"))
    dims.check("k", k, ("batch_size", "num_heads_k", "seqlen_k", "head_dim"))
    dims.check("v", v, ("batch_size", "num_heads_k", "seqlen_k", "head_dim_v"))
    batch, heads, n, d = q.shape
    heads_k, s = k.shape[1], k.shape[2]
    if heads % heads_k != 0:
        raise ValueError(f"k: num_heads={heads} must be a multiple of num_heads_k, got num_heads_k={heads_k}")
    for name, size in (("seqlen_q", n), ("seqlen_k", s), ("head_dim", d), ("head_dim_v", v.shape[-1]),
                       ("batch_size", batch), ("num_heads_k", heads_k)):
        if size < 1:
            raise ValueError(f"{name}: expected >= 1, got {size} (shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)})")
    check_tensor("rpe_bias", rpe_bias, dtypes=_DTYPES, ndim=2)
    if rpe_bias.device != q.device:
        raise ValueError(f"rpe_bias: expected device {q.device} (same as q), got {rpe_bias.device}")
    if tuple(rpe_bias.shape) != (heads, n + s - 1):
        bshd = (q.shape[2], q.shape[1] + k.shape[1] - 1)
        if tuple(rpe_bias.shape) == bshd and q.shape[2] % max(k.shape[2], 1) == 0:
            # rpe_bias fits q/k/v read as (batch, seq, heads, head_dim): the layout is what is wrong
            raise ValueError(f"q: expected (batch_size, num_heads, seqlen_q, head_dim), got {tuple(q.shape)}, which "
                             f"looks like (batch, seq, heads, head_dim) (rpe_bias {tuple(rpe_bias.shape)} fits "
                             f"num_heads={q.shape[2]}, seqlen_q={q.shape[1]}); kernelized_rpe_attention takes the "
                             f"SDPA layout (batch, heads, seq, head_dim): pass q.transpose(1, 2), k.transpose(1, 2), "
                             f"v.transpose(1, 2)")
        raise ValueError(f"rpe_bias: expected (num_heads={heads}, seqlen_q + seqlen_k - 1={n + s - 1}) "
                         f"(entry j - i + seqlen_q - 1 for query i, key j; q/k/v read as (batch, heads, seq, "
                         f"head_dim): q {tuple(q.shape)}, k {tuple(k.shape)}), got {tuple(rpe_bias.shape)}")
    for name, flag in (("causal", causal), ("normalize_qk", normalize_qk)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if fft_dtype is None:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    elif not isinstance(fft_dtype, torch.dtype):
        raise TypeError(f"fft_dtype: expected torch.float32, torch.float64 or None, got {type(fft_dtype).__name__}")
    elif fft_dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"fft_dtype: half-precision FFTs are not supported (round-off is relative to the largest "
                        f"Toeplitz term of the whole sequence, so small denominators drown); expected torch.float32 "
                        f"or torch.float64, got {dtype_name(fft_dtype)}")
    elif fft_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fft_dtype: expected torch.float32 or torch.float64, got {dtype_name(fft_dtype)}")
    else:
        cdt = fft_dtype
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    be = _backends.resolve(backend, q.device, supported=("triton", "torch"), op="kernelized_rpe")

    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {', '.join(map(repr, FEATURE_MAPS))} or a callable, "
                             f"got {feature_map!r}")
        mode = feature_map
    elif callable(feature_map):
        mode = "precomputed"
    else:
        raise TypeError(f"feature_map: expected a str or a callable, got {type(feature_map).__name__}")
    if mode != "prf":
        for name, val in (("num_features", num_features), ("projection", projection),
                          ("softmax_scale", softmax_scale), ("generator", generator)):
            if val is not None:
                raise ValueError(f"{name}: only used with feature_map='prf', got {name}={'a tensor' if isinstance(val, torch.Tensor) else val!r} "
                                 f"with feature_map={feature_map if isinstance(feature_map, str) else 'a callable'!r}")
    x_scale = 1.0
    if mode == "prf":
        if num_features is not None:
            num_features = check_int("num_features", num_features, minimum=1)
        if projection is not None:
            check_tensor("projection", projection, dtypes=_DTYPES, ndim=2)
            if projection.device != q.device:
                raise ValueError(f"projection: expected device {q.device} (same as q), got {projection.device}")
            expect_m = num_features if num_features is not None else projection.shape[0]
            if tuple(projection.shape) != (expect_m, d):
                raise ValueError(f"projection: expected (num_features={expect_m}, head_dim={d}), "
                                 f"got {tuple(projection.shape)}")
        else:
            m = num_features if num_features is not None else default_num_features(d)
            projection = draw_projection(m, d, generator=generator, device=q.device, dtype=cdt)
        scale = check_float("softmax_scale", softmax_scale, minimum=0.0, allow_none=True)
        if scale is None:
            scale = 1.0 if normalize_qk else d ** -0.5
        elif scale <= 0:
            raise ValueError(f"softmax_scale: expected > 0, got {scale}")
        x_scale = math.sqrt(scale)

    if causal and s > n:
        # top-left causal: keys j >= seqlen_q are visible to no query. They are never read (NaN/inf there made
        # the PRF key shift and the FFT NaN, and FFT round-off gave them a nonzero gradient; found by
        # tests/test_fuzz_kernelized_rpe.py): the op runs on the first seqlen_q keys, and their rpe_bias
        # entries r = j - i + seqlen_q - 1 <= 2 seqlen_q - 2. Gradients of the rest are exactly 0.
        k, v, rpe_bias, s = k[:, :, :n], v[:, :, :n], rpe_bias[:, :2 * n - 1], n

    # ---- inputs of the core: normalised q/k, or the callable's features (ordinary autograd on both)
    xq, xk = q, k
    if normalize_qk:
        # in the FFT precision, then back to q's dtype: F.normalize's eps (1e-12) is 0 in float16, so a zero
        # token gave 0/0 = NaN (found by tests/test_fuzz_kernelized_rpe.py)
        xq = torch.nn.functional.normalize(q.to(cdt), dim=-1).to(q.dtype)
        xk = torch.nn.functional.normalize(k.to(cdt), dim=-1).to(k.dtype)
    if mode == "precomputed":
        xq, xk = feature_map(xq), feature_map(xk)
        for name, phi, x in (("q", xq, q), ("k", xk, k)):
            if not isinstance(phi, torch.Tensor):
                raise TypeError(f"feature_map: expected the callable to return a torch.Tensor, got {type(phi).__name__}")
            if phi.dim() != 4 or tuple(phi.shape[:3]) != tuple(x.shape[:3]) or not phi.is_floating_point():
                raise ValueError(f"feature_map: expected phi({name}) of shape {tuple(x.shape[:3])} + (m,) and a "
                                 f"floating dtype, got {tuple(phi.shape)} {dtype_name(phi.dtype)}")
            with torch.no_grad():
                bad = ~(torch.isfinite(phi) & (phi > 0))
                if bool(bad.any()):
                    idx = tuple(int(i) for i in bad.nonzero()[0])
                    raise ValueError(f"feature_map: phi({name}) must be finite and > 0 everywhere (kernelized attention "
                                     f"needs a positive feature map; add a small epsilon), got {phi[idx].item()} "
                                     f"at index {idx} ({int(bad.sum())} bad values)")
        if xq.shape[-1] != xk.shape[-1]:
            raise ValueError(f"feature_map: phi(q) and phi(k) must have the same number of features, got "
                             f"{xq.shape[-1]} and {xk.shape[-1]}")
        m = xq.shape[-1]
    elif mode == "prf":
        m = projection.shape[0]
    else:
        m = d
    if be == "triton":
        xq = xq if xq.stride(-1) == 1 else xq.contiguous()
        xk = xk if xk.stride(-1) == 1 else xk.contiguous()

    cfg = dict(mode=mode, cdt=cdt, backend=be, causal=causal, x_scale=x_scale, feat_scale=1.0 / math.sqrt(m),
               fft_len=_next_fast_len(n + s - 1), chunk_size=chunk_size, out_dtype=q.dtype)
    out, clamped = _KernelizedRPE.apply(xq, xk, v, rpe_bias, projection if mode == "prf" else None, cfg)
    if cfg["roundoff"] > 1e-2:
        warnings.warn(f"kernelized_rpe_attention: estimated {dtype_name(cdt)} FFT round-off error of the output is "
                      f"{cfg['roundoff']:.1e} x rms(v) (some query rows see only keys whose features are tiny next to "
                      f"the largest key feature of the sequence, e.g. early causal rows with PRF)."
                      + (" Use fft_dtype=torch.float64 for accuracy." if cdt != torch.float64 else ""),
                      RuntimeWarning, stacklevel=2)
    if bool(clamped.any()):
        warnings.warn(f"kernelized_rpe_attention: {int(clamped.sum())} of {clamped.numel()} query rows have a "
                      f"denominator below the {dtype_name(cdt)} FFT round-off floor (rpe_bias spans too wide a range "
                      f"for this precision); their output is unreliable."
                      + (" Try fft_dtype=torch.float64." if cdt != torch.float64 else ""),
                      RuntimeWarning, stacklevel=2)
    return out
