"""EcoFormer binary-hash linear attention: public functions, checks, dispatch, autograd.

EcoFormer (Liu, Pan, He, Cai, Zhuang, NeurIPS 2022, arXiv 2209.09004; code ziplab/EcoFormer);
the math is ALGORITHMS.md section 4, the float64 truth ``posattn.reference.ecoformer_linear`` /
``ecoformer_pairwise``. The hash that produces the codes is ``posattn.nn.KernelizedHash``.

Bit packing (shared by every layer): a code ``h in {-1, +1}^num_bits`` is stored in words of
W = 32 (int32) or 64 (int64) bits; bit t of the code is bit ``t % W`` of word ``t // W``; a set bit
means +1; the unused high bits of the last word are 0. Then ``h_i . h_j = num_bits - 2 popc(w_i ^ w_j)``.
"""
from __future__ import annotations

import math

import torch

from .. import _backends
from .._checks import Dims, check_choice, check_int, check_same, check_tensor, dtype_name
from ..ops_registry import register

__all__ = ["ecoformer_attention", "ecoformer_pack_bits", "ecoformer_unpack_bits"]

FORMS = ("consistent", "reference-code")
_WORD_BITS = {torch.int32: 32, torch.int64: 64}
_CODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_V_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Chunk length of the torch backend's causal prefix scan: a (chunk x chunk) pairwise tile per step.
# 256 was fastest of 64/128/256 on CPU at 4k tokens, 16 bits, d 64 (1 thread: 28 / 45 / 58 ms for
# 256 / 128 / 64): fewer Python steps outweigh the larger tile.
_TORCH_CHUNK = 256


def _check_pm1(arg: str, codes: torch.Tensor) -> None:
    bad = (codes != 1) & (codes != -1)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{arg}: expected binary codes with values in {{-1, +1}}, got {int(bad.sum())} "
                         f"other value(s), e.g. {codes[idx].item()!r} at index {idx}")


def ecoformer_pack_bits(codes: torch.Tensor, *, word_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Pack binary codes into integer words.

    Parameters
    ----------
    codes : Tensor (..., num_bits), any float or integer dtype, values in {-1, +1}.
    word_dtype : torch.int64 (default, 64 bits per word) or torch.int32 (32 bits per word).

    Returns
    -------
    Tensor (..., ceil(num_bits / W)) of ``word_dtype``: bit t of the code is bit ``t % W`` of word
    ``t // W``, set for +1; unused high bits of the last word are 0 (two's complement, so a word
    with its top bit set is negative).

    Raises
    ------
    TypeError: codes not a tensor, or word_dtype not int32/int64.
    ValueError: a value other than -1 or +1; a 0-D tensor or num_bits == 0.

    Examples
    --------
    >>> import torch, posattn
    >>> w = posattn.ecoformer_pack_bits(torch.tensor([[1., -1., 1., 1.]]))
    >>> w
    tensor([[13]])
    >>> posattn.ecoformer_unpack_bits(w, 4)
    tensor([[ 1., -1.,  1.,  1.]])
    """
    check_tensor("codes", codes)
    if word_dtype not in _WORD_BITS:
        raise TypeError(f"word_dtype: expected torch.int32 or torch.int64, got {word_dtype}")
    if codes.dim() < 1 or codes.shape[-1] == 0:
        raise ValueError(f"codes: expected shape (..., num_bits) with num_bits >= 1, got {tuple(codes.shape)}")
    _check_pm1("codes", codes)
    width = _WORD_BITS[word_dtype]
    num_bits = codes.shape[-1]
    num_words = -(-num_bits // width)
    bits = (codes > 0).to(torch.int64)
    bits = torch.nn.functional.pad(bits, (0, num_words * width - num_bits))
    bits = bits.reshape(*codes.shape[:-1], num_words, width)
    shifts = torch.arange(width, device=codes.device, dtype=torch.int64)
    words = (bits << shifts).sum(-1)          # disjoint bits: the sum never carries
    if width == 32:
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(word_dtype)


def ecoformer_unpack_bits(words: torch.Tensor, num_bits: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack integer words into binary codes; the inverse of :func:`ecoformer_pack_bits`.

    Parameters
    ----------
    words : Tensor (..., num_words), int32 or int64 (32 or 64 bits per word).
    num_bits : int, 1 <= num_bits <= W * num_words; the unused high bits must be 0.
    dtype : float dtype of the result (default float32).

    Returns
    -------
    Tensor (..., num_bits) of ``dtype`` with values in {-1, +1}.

    Raises
    ------
    TypeError: words not int32/int64. ValueError: num_bits out of range, or a set bit past num_bits
    (the words were not packed with this num_bits).

    Examples
    --------
    >>> import torch, posattn
    >>> posattn.ecoformer_unpack_bits(torch.tensor([5], dtype=torch.int32), 3)
    tensor([ 1., -1.,  1.])
    """
    _check_words("words", words, num_bits)
    width = _WORD_BITS[words.dtype]
    shifts = torch.arange(width, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[..., None] >> shifts) & 1
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * width)[..., :num_bits]
    return (bits * 2 - 1).to(dtype)


def _check_words(arg: str, words: torch.Tensor, num_bits) -> int:
    check_tensor(arg, words, dtypes=tuple(_WORD_BITS))
    if words.dim() < 1:
        raise ValueError(f"{arg}: expected shape (..., num_words), got a 0-D tensor")
    width = _WORD_BITS[words.dtype]
    num_words = words.shape[-1]
    if num_bits is None:
        raise ValueError(f"num_bits: packed {arg} ({dtype_name(words.dtype)} words) need num_bits= to say how many "
                         f"bits each code has, got None")
    num_bits = check_int("num_bits", num_bits, minimum=1)
    need = -(-num_bits // width)
    if num_words != need:
        if num_words < need:
            raise ValueError(f"{arg}: num_bits={num_bits} needs {need} {dtype_name(words.dtype)} word(s) per code "
                             f"({width} bits per word; pack longer codes over several words), got {num_words}")
        raise ValueError(f"{arg}: expected ceil(num_bits / {width}) = {need} word(s) for num_bits={num_bits}, "
                         f"got {num_words}")
    spare = need * width - num_bits
    if spare:
        last = words[..., -1].to(torch.int64)
        if width == 32:
            last = last & 0xFFFFFFFF
        if bool((last >> (width - spare)).any()):
            raise ValueError(f"{arg}: bits past num_bits={num_bits} are set in the last word: the codes were not "
                             f"packed with num_bits={num_bits} (see ecoformer_pack_bits)")
    return num_bits


def _pack_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words -> int32 words, same bit order (little-endian halves), contiguous."""
    if words.dtype == torch.int32:
        return words
    w = words.contiguous()
    return w.view(torch.int32).reshape(*w.shape[:-1], 2 * w.shape[-1])


# ---------------------------------------------------------------------------------------------------
# torch backend: memory-bounded (never N x N), differentiable by torch autograd.

def _ecoformer_torch(q, k, v, keep, *, causal: bool, ref_form: bool, chunk: int = _TORCH_CHUNK):
    """q (B, H, M, b), k (B, Hk, N, b) float codes; v (B, Hk, N, d); keep (B, N) float or None."""
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    B, H, M, nb = q.shape
    Hk, N, d = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hk
    C = nb + 1.0
    q5 = q.to(cdt).reshape(B, Hk, G, M, nb)
    kk, vv = k.to(cdt), v.to(cdt)
    keep4 = (torch.ones(B, N, dtype=cdt, device=v.device) if keep is None else keep.to(cdt))[:, None, :, None]
    # A query with no visible key has num = 0 (or (b+1) v_i) and den = 0: dividing by +inf there
    # gives exactly 0. In-place adds/divides keep the passes over the (M, d) output few (the op is
    # memory-bound on CPU at long lengths).
    inf = torch.tensor(float("inf"), dtype=cdt, device=v.device)
    if not causal:
        km, vm = (kk, vv) if keep is None else (kk * keep4, vv * keep4)
        S = km.transpose(-1, -2) @ vm                                 # (B, Hk, b, d)
        z = km.sum(2)                                                 # (B, Hk, b)
        s = vm.sum(2)                                                 # (B, Hk, d)
        n = keep4.sum(2).reshape(B, 1, 1, 1, 1)
        num = q5 @ S[:, :, None]                                      # (B, Hk, G, M, d)
        den = q5 @ z[:, :, None, :, None] + C * n                     # (B, Hk, G, M, 1)
        num = num.add_(C * (vv[:, :, None, :M] if ref_form else s[:, :, None, None, :]))
        out = num.div_(torch.where(n > 0, den, inf))
    else:
        P = max(M, N)
        pad = lambda t, L: torch.nn.functional.pad(t, (0, 0, 0, P - L))
        if M != N:  # pad the shorter side to P positions (padded keys are masked out)
            q5, kk, vv, keep4 = (torch.nn.functional.pad(q5, (0, 0, 0, P - M)), pad(kk, N), pad(vv, N),
                                 pad(keep4, N))
        S = q5.new_zeros(B, Hk, nb, d)
        z = q5.new_zeros(B, Hk, nb)
        s = q5.new_zeros(B, Hk, d)
        n = q5.new_zeros(B, 1, 1)
        outs = []
        for c0 in range(0, M, chunk):
            c1 = min(c0 + chunk, P)
            L = c1 - c0
            qc, kc, vc, mc = q5[:, :, :, c0:c1], kk[:, :, c0:c1], vv[:, :, c0:c1], keep4[:, :, c0:c1]
            tri = torch.ones(L, L, dtype=cdt, device=v.device).tril()
            vis = tri * mc[:, :, None, :, 0][:, :, :, None, :]        # (B, 1, 1, L, L): j <= i, not padded
            dots = torch.einsum("bhgic,bhjc->bhgij", qc, kc)
            w = (dots + C) * vis
            num_c = torch.einsum("bhgmc,bhcd->bhgmd", qc, S) + ((dots * vis) if ref_form else w) @ vc[:, :, None]
            if ref_form:
                num_c = num_c + C * vc[:, :, None]
            else:
                num_c = num_c + C * s[:, :, None, None, :]
            den_c = torch.einsum("bhgmc,bhc->bhgm", qc, z) + C * n[..., None] + w.sum(-1)
            n_vis = n[..., None] + vis.sum(-1)
            outs.append(num_c / torch.where(n_vis > 0, den_c, inf)[..., None])
            kcm, vcm = kc * mc, vc * mc
            S = S + kcm.transpose(-1, -2) @ vcm
            z = z + kcm.sum(2)
            s = s + vcm.sum(2)
            n = n + mc.sum(2)
        out = torch.cat(outs, 3)[:, :, :, :M]
    return out.reshape(B, H, M, d).to(v.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton backend: forward kernel on packed bits; backward recomputes with the torch backend.

def _ecoformer_triton_fwd(q_words32, k_words32, v, keep, *, num_bits, causal, ref_form):
    from ..triton_kernels.ecoformer import ecoformer_linear_fwd

    B, H, M, _ = q_words32.shape
    out = torch.empty(B, H, M, v.shape[-1], dtype=v.dtype, device=v.device)
    ecoformer_linear_fwd(q_words32, k_words32, v, out, num_bits=num_bits, causal=causal,
                         key_keep=keep, form_ref=ref_form)
    return out


class _EcoFormerTritonFn(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: recompute the torch backend's chunked forward (linear
    memory) and differentiate it; there is no Triton backward kernel yet."""

    @staticmethod
    def forward(ctx, q_f, k_f, v, q_w, k_w, keep, num_bits, causal, ref_form):
        ctx.save_for_backward(q_f, k_f, v, keep)
        ctx.opts = (causal, ref_form)
        return _ecoformer_triton_fwd(q_w, k_w, v, keep, num_bits=num_bits, causal=causal, ref_form=ref_form)

    @staticmethod
    def backward(ctx, dout):
        q_f, k_f, v, keep = ctx.saved_tensors
        causal, ref_form = ctx.opts
        need = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(r) for t, r in zip((q_f, k_f, v), need)]
            out = _ecoformer_torch(*ins, keep, causal=causal, ref_form=ref_form)
            wrt = [t for t in ins if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, dout)) if wrt else iter(())
        return tuple(next(grads) if r else None for r in need) + (None,) * 6


def ecoformer_attention(q_codes: torch.Tensor, k_codes: torch.Tensor, v: torch.Tensor, *, num_bits: int | None = None,
                        causal: bool = False, key_padding_mask: torch.Tensor | None = None,
                        form: str = "consistent", backend: str = "auto") -> torch.Tensor:
    """EcoFormer attention from binary codes, in time and memory linear in the sequence length.

    With codes h in {-1, +1}^b, the weight of key j for query i is ``w_ij = h_i . h_j + (b + 1)``
    (>= 1, since h_i . h_j >= -b), and

    * ``form="consistent"`` (default) — the weighted average ``out_i = sum_j w_ij v_j / sum_j w_ij``,
      evaluated by its linear form
      ``out_i = [h_i^T (sum_j h_j v_j^T) + (b+1) sum_j v_j] / [h_i^T (sum_j h_j) + (b+1) N]``;
    * ``form="reference-code"`` — what the authors' code (ziplab/EcoFormer, ``pvt/performer.py``)
      computes: the numerator's constant term is ``(b+1) v_i`` (the query's own value) instead of
      ``(b+1) sum_j v_j``; the denominator is unchanged, so the weights do not sum to one. Kept to
      reproduce published checkpoints; needs seqlen_q == seqlen_k.

    Sums run over the visible keys: not padded, and ``j <= i`` when causal; N is their count.

    Parameters
    ----------
    q_codes : Tensor (batch, num_heads, seqlen_q, num_bits), float (fp16/bf16/fp32/fp64) with values
        in {-1, +1} — e.g. ``posattn.nn.KernelizedHash(...)(x)`` — or packed words
        (batch, num_heads, seqlen_q, num_words) int32/int64 from :func:`ecoformer_pack_bits`
        (then ``num_bits`` is required). Float codes are differentiable: the gradient is that of the
        formula above with h treated as real (what the straight-through estimator passes on).
    k_codes : Tensor (batch, num_heads_k, seqlen_k, num_bits) or packed (..., num_words); the same
        kind (float or packed, and the same word dtype) as ``q_codes``. EcoFormer shares q and k,
        so ``k_codes`` is usually ``q_codes``.
    v : Tensor (batch, num_heads_k, seqlen_k, head_dim_v), fp16/bf16/fp32 (fp64 on the torch backend).
        GQA/MQA: query head h reads key/value head ``h // (num_heads // num_heads_k)``.
    num_bits : int or None. Required for packed codes; for float codes None (taken from the last
        dim) or equal to it.
    causal : bool, default False. Top-left alignment (torch SDPA): key j visible to query i iff
        j <= i; queries past the last key see every key. For seqlen_q = seqlen_k = 4::

            1 0 0 0
            1 1 0 0
            1 1 1 0
            1 1 1 1

        Evaluated as a prefix scan over key blocks (not in the authors' code; ALGORITHMS.md 4b).
    key_padding_mask : bool Tensor (batch, seqlen_k) or None (no padding). torch.nn.MultiheadAttention
        convention: **True marks padding**, excluded from every sum and from N. A query that sees no
        key (all padded, or causal before the first unpadded key) gets output 0.
    form : "consistent" (default) or "reference-code", see above.
    backend : "auto" (default: CUDA tensors -> Triton; CPU tensors -> torch), "triton" (CUDA, or CPU
        under TRITON_INTERPRET=1), "torch". An unavailable backend raises; it never falls back.

    Returns
    -------
    out : Tensor (batch, num_heads, seqlen_q, head_dim_v), dtype and device of ``v``; fp32
        accumulation (fp64 for fp64 inputs). There is no lse: the weights are not a softmax.

    Raises
    ------
    TypeError: a non-tensor, wrong dtype, q/k codes of different kinds.
    ValueError: codes not in {-1, +1}; packed words inconsistent with num_bits (wrong word count,
        set bits past num_bits); mismatched batch/heads/lengths/num_bits; num_heads not a multiple
        of num_heads_k; reference-code form with seqlen_q != seqlen_k; devices differ.
    RuntimeError: the requested backend is not available here.

    Notes
    -----
    Cost O((seqlen_q + seqlen_k) * num_bits * head_dim_v) time and O(num_bits * head_dim_v) state
    per (batch, head). Backward: torch autograd on the torch backend; with backend="triton" the
    forward runs the kernel and the backward recomputes the torch backend's chunked forward.
    The Triton kernel has been run under the interpreter only (not yet run on a GPU).

    Examples
    --------
    >>> import torch, posattn
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randint(0, 2, (1, 2, 5, 16), generator=g).float() * 2 - 1
    >>> v = torch.randn(1, 2, 5, 8, generator=g)
    >>> out = posattn.ecoformer_attention(h, h, v, causal=True)
    >>> out.shape
    torch.Size([1, 2, 5, 8])
    >>> torch.allclose(out[:, :, 0], v[:, :, 0])   # the first query sees only the first key
    True
    >>> w = posattn.ecoformer_pack_bits(h)          # the same codes, packed into int64 words
    >>> torch.allclose(posattn.ecoformer_attention(w, w, v, num_bits=16, causal=True), out)
    True
    """
    # ---- checks
    check_tensor("v", v, dtypes=_V_DTYPES, ndim=4)
    check_tensor("q_codes", q_codes, ndim=4, device=v.device)
    check_tensor("k_codes", k_codes, ndim=4, device=v.device)
    check_choice("form", form, FORMS)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    packed = q_codes.dtype in _WORD_BITS
    if packed:
        if k_codes.dtype != q_codes.dtype:
            raise TypeError(f"k_codes: expected packed {dtype_name(q_codes.dtype)} words like q_codes, "
                            f"got {dtype_name(k_codes.dtype)}")
        num_bits = _check_words("q_codes", q_codes, num_bits)
        _check_words("k_codes", k_codes, num_bits)
    else:
        check_tensor("q_codes", q_codes, dtypes=_CODE_DTYPES)
        check_tensor("k_codes", k_codes, dtypes=_CODE_DTYPES)
        if num_bits is not None:
            num_bits = check_int("num_bits", num_bits, minimum=1)
            if q_codes.shape[-1] != num_bits:
                raise ValueError(f"q_codes: expected (batch_size, num_heads, seqlen_q, num_bits={num_bits}), "
                                 f"got {tuple(q_codes.shape)}")
        num_bits = q_codes.shape[-1]
    dims = Dims()
    last = "num_words" if packed else "num_bits"
    dims.check("q_codes", q_codes, ("batch_size", "num_heads", "seqlen_q", last))
    dims.check("k_codes", k_codes, ("batch_size", "num_heads_k", "seqlen_k", last))
    dims.check("v", v, ("batch_size", "num_heads_k", "seqlen_k", "head_dim_v"))
    if num_bits == 0:
        raise ValueError(f"q_codes: expected num_bits >= 1, got shape {tuple(q_codes.shape)}")
    if dims["num_heads"] % dims["num_heads_k"]:
        raise ValueError(f"k_codes: num_heads={dims['num_heads']} must be a multiple of "
                         f"num_heads_k={dims['num_heads_k']} (GQA), got num_heads_k={dims['num_heads_k']}")
    if form == "reference-code" and dims["seqlen_q"] != dims["seqlen_k"]:
        raise ValueError(f"form: 'reference-code' adds the query's own value v_i, so it needs seqlen_q == seqlen_k, "
                         f"got seqlen_q={dims['seqlen_q']}, seqlen_k={dims['seqlen_k']}")
    if not packed:
        _check_pm1("q_codes", q_codes.detach())
        if k_codes is not q_codes:
            _check_pm1("k_codes", k_codes.detach())
    keep = None
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), ndim=2, device=v.device)
        dims.check("key_padding_mask", key_padding_mask, ("batch_size", "seqlen_k"))
        keep = (~key_padding_mask).to(torch.float32)

    be = _backends.resolve(backend, v.device, supported=("triton", "torch"), op="ecoformer_attention")
    ref_form = form == "reference-code"
    if be == "triton" and v.dtype == torch.float64:
        raise TypeError("v: the triton backend takes fp16/bf16/fp32, got float64 (use backend='torch')")

    if be == "torch":
        q_f = ecoformer_unpack_bits(q_codes, num_bits) if packed else q_codes
        k_f = ecoformer_unpack_bits(k_codes, num_bits) if packed else k_codes
        return _ecoformer_torch(q_f, k_f, v, keep, causal=causal, ref_form=ref_form)

    # triton
    if packed:
        q_w, k_w = _pack_int32(q_codes), _pack_int32(k_codes)
        q_f = k_f = None
    else:
        q_w = ecoformer_pack_bits(q_codes.detach(), word_dtype=torch.int32)
        k_w = q_w if k_codes is q_codes else ecoformer_pack_bits(k_codes.detach(), word_dtype=torch.int32)
        q_f, k_f = q_codes, k_codes
    needs_grad = torch.is_grad_enabled() and (v.requires_grad or (not packed and (q_codes.requires_grad or
                                                                                  k_codes.requires_grad)))
    if not needs_grad:
        return _ecoformer_triton_fwd(q_w, k_w, v, keep, num_bits=num_bits, causal=causal, ref_form=ref_form)
    if packed:  # the backward recomputes from float codes; packed codes carry no gradient
        q_f = ecoformer_unpack_bits(q_codes, num_bits)
        k_f = ecoformer_unpack_bits(k_codes, num_bits)
    return _EcoFormerTritonFn.apply(q_f, k_f, v, q_w, k_w, keep, num_bits, causal, ref_form)


register("ecoformer", "posattn.ops.ecoformer", ("triton", "torch"))
