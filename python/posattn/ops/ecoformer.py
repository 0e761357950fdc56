"""EcoFormer binary-hash linear attention: public functions, checks, dispatch, autograd.

EcoFormer (Liu, Pan, He, Cai, Zhuang, NeurIPS 2022, arXiv 2209.09004; code ziplab/EcoFormer);
the math is docs/ALGORITHMS.md section 4, the float64 truth ``posattn.reference.ecoformer_linear`` /
``ecoformer_pairwise``. The hash that produces the codes is ``posattn.nn.KernelizedHash``.

Bit packing (shared by every layer): a code ``h in {-1, +1}^num_bits`` is stored in words of
W = 32 (int32) or 64 (int64) bits; bit t of the code is bit ``t % W`` of word ``t // W``; a set bit
means +1; the unused high bits of the last word are 0. Then ``h_i . h_j = num_bits - 2 popc(w_i ^ w_j)``.
"""
from __future__ import annotations

import math

import torch

from .._memory import madvise_hugepage as _madvise_hugepage

from .. import _backends
from .._checks import Dims, check_choice, check_int, check_same, check_tensor, dtype_name
from ..ops_registry import register

__all__ = ["ecoformer_attention", "ecoformer_pack_bits", "ecoformer_unpack_bits"]

FORMS = ("consistent", "reference-code")
_WORD_BITS = {torch.int32: 32, torch.int64: 64}
_CODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_V_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch backend chunking (CPU; issue 8: time grows linearly, time(64k) / time(8k) <= 10).
# Causal: the query/key chunk of the prefix scan, a (chunk x chunk) pairwise tile per step. CPU time,
# 1 thread, 16 bits, d 64, 2 heads, after the rewrite below: 8k tokens 21.5 / 15.9 / 17.8 / 36.2 ms and
# 64k tokens 164 / 132 / 146 / 250 ms for chunks 64 / 128 / 256 / 512 (fewer Python steps vs a
# larger quadratic tile).
_TORCH_CAUSAL_CHUNK = 128
# Non-causal: rows per step chosen so that one step's block of (rows x (d_v + 1)) fp32 values over
# all heads is ~1 MiB, so each chunk's intermediates are still in L2 when the next op reads them
# (one pass over v, q and out in memory instead of one per op).
_TORCH_CHUNK_ELEMS = 1 << 18


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



def _ecoformer_torch(q, k, v, keep, *, causal: bool, ref_form: bool, chunk: int | None = None):
    """q (B, H, M, b), k (B, Hk, N, b) float codes; v (B, Hk, N, d); keep (B, N) float (0/1) or None.

    Differentiable by torch autograd. Memory O((M + N) d) plus O(b d) state per head; with ``chunk``
    None the chunk lengths above. The state is kept as the matrix T = [S | z] (b, d+1) and the row
    [(b+1) s | (b+1) n], so one matrix product per query chunk gives numerator and denominator together:
    ``[num | den] = q_c T + [(b+1) s | (b+1) n]``. Causal adds the pairwise diagonal tile and then folds
    the chunk's keys into the state (``S += k_c^T v_c``, one GEMM). Without autograd the chunks are
    divided and written straight into the output (one write of it); with autograd they are
    concatenated."""
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    B, H, M, nb = q.shape
    Hk, N, d = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hk
    C = nb + 1.0
    dev = v.device
    q5 = q.to(cdt).reshape(B, Hk, G, M, nb)
    kk, vv = k.to(cdt), v.to(cdt)
    keep_c = None if keep is None else keep.to(cdt)
    kd = kk if keep_c is None else kk * keep_c[:, None, :, None]   # codes of padded keys zeroed
    # values of padded keys zeroed by a select, not a product: 0 * NaN would read them into every sum
    # (NaN/inf in padding gave a NaN output; found by tests/test_fuzz_ecoformer.py)
    vk = vv if keep_c is None else vv.masked_fill(keep_c[:, None, :, None] == 0, 0.0)
    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = None
    if not track:
        out = torch.empty(B, Hk, G, M, d, dtype=v.dtype, device=dev)
        _madvise_hugepage(out)
    outs = []
    # A query with no visible key has den = 0 exactly (every term is 0; otherwise den >= #visible >= 1)
    # and num = 0 or (b+1) v_i: dividing by +inf there gives exactly 0.
    inf = torch.tensor(float("inf"), dtype=cdt, device=dev)

    def emit(c0, c1, num, den, may_be_empty=True):
        if may_be_empty:
            den = torch.where(den == 0, inf, den)
        if out is None:
            outs.append(num / den)
        elif out.dtype == cdt:
            torch.div(num, den, out=out[:, :, :, c0:c1])
        else:
            out[:, :, :, c0:c1].copy_(num.div_(den))

    def key_chunk(c0, c1):
        """(S, z, s, n) of keys c0..c1-1: S = k^T v (one GEMM), z = sum k, s = sum keep v, n = sum keep."""
        kc, vc = kd[:, :, c0:c1], vk[:, :, c0:c1]
        if keep_c is None:
            s_c, n_c = vc.sum(2), float(c1 - c0)
        else:
            mc = keep_c[:, c0:c1]
            s_c, n_c = (mc[:, None, None, :] @ vc)[:, :, 0], mc.sum(1)[:, None]
        return kc.transpose(-1, -2) @ vc, kc.sum(2), s_c, n_c

    def state_matrix(S, z, s, n, n_zero_inf=False):
        """T = [S | z] (B, Hk, 1, b, d+1) and the row [(b+1) s | (b+1) n] (B, Hk, 1, 1, d+1); with
        ``n_zero_inf`` a batch with no kept key gets den = +inf (its z is 0), so its queries give 0."""
        T = torch.cat([S, z[..., None]], -1)[:, :, None]
        cn = C * n
        if n_zero_inf:
            cn = torch.where(n == 0, inf, cn)
        bias = torch.cat([torch.zeros_like(s) if ref_form else C * s, cn.reshape(-1, 1, 1).expand(B, Hk, 1)], -1)
        return T, bias[:, :, None, None]

    def query_chunk(c0, c1, T, bias):
        """[num | den] (B, Hk, G, rows, d+1) of queries c0..c1-1 against the state."""
        R = q5[:, :, :, c0:c1] @ T
        R = R + bias if track else R.add_(bias)
        num, den = R[..., :d], R[..., d:]
        if ref_form:  # the authors' code: + (b+1) v_i, the query's own value (needs M == N)
            num = num + C * vv[:, :, None, c0:c1]
        return num, den

    zeros = lambda *shape: torch.zeros(*shape, dtype=cdt, device=dev)      # noqa: E731
    S, z, s, n = zeros(B, Hk, nb, d), zeros(B, Hk, nb), zeros(B, Hk, d), zeros(B, 1)   # n: kept keys per batch
    if not causal:
        step = chunk or max(256, _TORCH_CHUNK_ELEMS // max(1, B * Hk * (d + 1)))
        for c0 in range(0, N, step):
            dS, dz, ds, dn = key_chunk(c0, min(c0 + step, N))
            S, z, s, n = S + dS, z + dz, s + ds, n + dn
        T, bias = state_matrix(S, z, s, n, n_zero_inf=True)
        step = chunk or max(64, _TORCH_CHUNK_ELEMS // max(1, B * H * (d + 1)))
        for c0 in range(0, max(M, 1), step):   # M = 0: one empty step keeps the result in the graph
            c1 = min(c0 + step, M)
            emit(c0, c1, *query_chunk(c0, c1, T, bias), may_be_empty=False)
    else:
        step = chunk or _TORCH_CAUSAL_CHUNK
        for c0 in range(0, max(M, 1), step):   # M = 0: one empty step keeps the result in the graph
            # keys past M are never visible (j <= i < M): never read (0 * NaN in the tile would be NaN)
            c1 = min(c0 + step, M)
            ck1 = min(c1, N)
            num, den = query_chunk(c0, c1, *state_matrix(S, z, s, n))   # keys before the chunk, via the state
            if ck1 > c0:
                # the diagonal tile, pairwise: w_ij = h_i . h_j + (b+1) for c0 <= j <= i (tril of the tile)
                w = q5[:, :, :, c0:c1] @ kk[:, :, None, c0:ck1].transpose(-1, -2)
                w = torch.tril(w + C) if track else w.add_(C).tril_()
                if keep_c is not None:
                    w = w * keep_c[:, None, None, None, c0:ck1]
                den = den + w.sum(-1, keepdim=True)
                if ref_form:
                    w = w - C * (w != 0)                  # the authors' numerator drops the (b+1) v_j term
                num = num + w @ vk[:, :, None, c0:ck1]
                dS, dz, ds, dn = key_chunk(c0, ck1)
                S, z, s, n = S + dS, z + dz, s + ds, n + dn
            emit(c0, c1, num, den)
    if out is not None:
        return out.reshape(B, H, M, d)
    res = torch.cat(outs, 3) if len(outs) > 1 else outs[0]
    if not res.requires_grad:
        # nothing reached the graph (seqlen_q == seqlen_k == 0): keep the empty result attached so that backward
        # runs (the inputs that require grad are empty here, so this adds exactly 0; tests/test_fuzz_ecoformer.py)
        res = res + sum(t.sum() for t in (q, k, v) if t.requires_grad).to(res.dtype) * 0
    return res.reshape(B, H, M, d).to(v.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton backend: forward kernel on packed bits; backward recomputes with the torch backend.

def _ecoformer_triton_fwd(q_words32, k_words32, v, keep, *, num_bits, causal, ref_form):
    from ..triton_kernels.ecoformer import ecoformer_linear_fwd

    B, H, M, _ = q_words32.shape
    out = torch.empty(B, H, M, v.shape[-1], dtype=v.dtype, device=v.device)
    ecoformer_linear_fwd(q_words32, k_words32, v, out, num_bits=num_bits, causal=causal,
                         key_keep=keep, form_ref=ref_form)
    return out


def _ecoformer_cuda_fwd(q_words32, k_words32, v, keep, *, num_bits, causal, ref_form):
    """posattn._C's linear kernels (csrc/ecoformer.cu via posattn._cuda): non-causal, padding as kv_lens
    (the caller checked that ``keep`` is a kept prefix per batch). Not yet run on a GPU."""
    from .. import _cuda

    assert not causal, "the caller rejects causal for backend='cuda'"
    B, H, M, _ = q_words32.shape
    Hk, N = k_words32.shape[1], k_words32.shape[2]
    if M == 0 or N == 0:   # no key: every output row is 0 by the op's contract
        return torch.zeros(B, H, M, v.shape[-1], dtype=v.dtype, device=v.device)
    words = -(-num_bits // 32)   # int64-packed codes arrive as 2 int32 words each; the _C wrapper wants exactly these
    q_words32, k_words32 = q_words32[..., :words], k_words32[..., :words]
    if Hk != H:  # the _C kernels read keys at the query's (batch*head) index: repeat the kv heads (copies)
        k_words32, v = k_words32.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    kv_lens = None if keep is None else keep.sum(1).to(torch.int32)
    out = _cuda.ecoformer_linear_cuda(q_words32.contiguous(), k_words32.contiguous(), v, nbits=num_bits,
                                      kv_lens=kv_lens, repo_form=ref_form)
    if kv_lens is not None:  # a batch with every key padded: the kernel divides 0 by 0 there
        out.masked_fill_((kv_lens == 0)[:, None, None, None], 0.0)
    return out


_KERNEL_FWD = {"triton": _ecoformer_triton_fwd, "cuda": _ecoformer_cuda_fwd}


class _EcoFormerKernelFn(torch.autograd.Function):
    """Forward: the Triton or CUDA kernel (``kernel``). Backward: recompute the torch backend's chunked
    forward (linear memory) and differentiate it; there is no Triton/CUDA backward kernel yet."""

    @staticmethod
    def forward(ctx, q_f, k_f, v, q_w, k_w, keep, num_bits, causal, ref_form, kernel):
        ctx.save_for_backward(q_f, k_f, v, keep)
        ctx.opts = (causal, ref_form)
        return _KERNEL_FWD[kernel](q_w, k_w, v, keep, num_bits=num_bits, causal=causal, ref_form=ref_form)

    @staticmethod
    def backward(ctx, dout):
        q_f, k_f, v, keep = ctx.saved_tensors
        causal, ref_form = ctx.opts
        need = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(r) for t, r in zip((q_f, k_f, v), need)]
            out = _ecoformer_torch(*ins, keep, causal=causal, ref_form=ref_form)
            wrt = [t for t in ins if t.requires_grad]
            # allow_unused: with seqlen_k == 0 the keys (or with seqlen_q == 0 the queries) take no part, and
            # with both 0 the recomputed output is not attached at all: zero gradients (autograd raised
            # "appears to not have been used" / "does not require grad"; found by tests/test_fuzz_ecoformer.py)
            gl = torch.autograd.grad(out, wrt, dout, allow_unused=True) if wrt and out.requires_grad else \
                [None] * len(wrt)
            grads = iter([torch.zeros_like(t) if g is None else g for t, g in zip(wrt, gl)])
        return tuple(next(grads) if r else None for r in need) + (None,) * 7


def _check_cuda_backend(causal: bool, num_bits: int, v: torch.Tensor, key_padding_mask) -> None:
    """What posattn._C's EcoFormer kernels cover; anything else is an error, never a fallback."""
    if causal:
        raise ValueError("causal: backend='cuda' has no causal EcoFormer kernel, got causal=True "
                         "(use backend='triton' or 'torch')")
    if num_bits > 64:
        raise ValueError(f"num_bits: backend='cuda' supports 1..64 bits, got {num_bits}")
    if v.shape[-1] > 256:
        raise ValueError(f"v: backend='cuda' supports head_dim_v <= 256, got {v.shape[-1]}")
    if v.dtype == torch.float64:
        raise TypeError("v: backend='cuda' takes fp16/bf16/fp32, got float64 (use backend='torch')")
    if key_padding_mask is not None:
        lens = (~key_padding_mask).sum(1, keepdim=True)
        suffix = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)[None, :] >= lens
        if not bool((suffix == key_padding_mask).all()):
            raise ValueError("key_padding_mask: backend='cuda' takes right padding only (each row: keys to "
                             "attend, then padding), got padding before an attended key")


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

        Evaluated as a prefix scan over key blocks (not in the authors' code; docs/ALGORITHMS.md 4b).
    key_padding_mask : bool Tensor (batch, seqlen_k) or None (no padding). torch.nn.MultiheadAttention
        convention: **True marks padding**, excluded from every sum and from N. A query that sees no
        key (all padded, or causal before the first unpadded key) gets output 0.
    form : "consistent" (default) or "reference-code", see above.
    backend : "auto" (default: CUDA tensors -> Triton; CPU tensors -> torch), "triton" (CUDA, or CPU
        under TRITON_INTERPRET=1), "torch", or "cuda" (posattn._C's kernels, csrc/ecoformer.cu; only
        when asked for by name, never chosen by "auto"; non-causal, num_bits <= 64, head_dim_v <= 256,
        right padding only; GQA repeats the key/value heads; not yet run on a GPU). An unavailable
        backend raises; it never falls back.

    Returns
    -------
    out : Tensor (batch, num_heads, seqlen_q, head_dim_v), dtype and device of ``v``; fp32
        accumulation (fp64 for fp64 inputs). There is no lse: the weights are not a softmax.
        Precision: the linear form sums ``h_i^T S + (b+1) s`` over b bits, so fp32 round-off is relative to
        ``(2b+1) sum_j |v_j| / den_i``, not to ``|out_i|``; where codes of opposite sign make the weights small
        (den_i near the number of keys, e.g. a fitted hash) they cancel by up to ~2b: measured 2.7e-5
        relative at b = 70 (2026-11-30, the EcoFormerAttention fuzz case in tests/test_regressions.py).

    Raises
    ------
    TypeError: a non-tensor, wrong dtype, q/k codes of different kinds.
    ValueError: codes not in {-1, +1}; packed words inconsistent with num_bits (wrong word count,
        set bits past num_bits); mismatched batch/heads/lengths/num_bits; num_heads not a multiple
        of num_heads_k; reference-code form with seqlen_q != seqlen_k; devices differ; backend="cuda"
        with causal=True, num_bits > 64, head_dim_v > 256 or padding before an attended key
        (TypeError for float64 v there).
    RuntimeError: the requested backend is not available here.

    Notes
    -----
    Cost O((seqlen_q + seqlen_k) * num_bits * head_dim_v) time and O(num_bits * head_dim_v) state
    per (batch, head). Backward: torch autograd on the torch backend; with backend="triton" or "cuda"
    the forward runs the kernel and the backward recomputes the torch backend's chunked forward.
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

    # "cuda" (posattn._C) only when asked for by name: "auto" never picks it (not yet run on a GPU).
    supported = ("triton", "torch") if backend == "auto" else ("triton", "cuda", "torch")
    be = _backends.resolve(backend, v.device, supported=supported, op="ecoformer_attention")
    if be == "cuda":
        _check_cuda_backend(causal, num_bits, v, key_padding_mask)
    ref_form = form == "reference-code"
    if be == "triton" and v.dtype == torch.float64:
        raise TypeError("v: the triton backend takes fp16/bf16/fp32, got float64 (use backend='torch')")

    if be == "torch":
        q_f = ecoformer_unpack_bits(q_codes, num_bits) if packed else q_codes
        k_f = ecoformer_unpack_bits(k_codes, num_bits) if packed else k_codes
        return _ecoformer_torch(q_f, k_f, v, keep, causal=causal, ref_form=ref_form)

    # triton / cuda: packed int32 words
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
        return _KERNEL_FWD[be](q_w, k_w, v, keep, num_bits=num_bits, causal=causal, ref_form=ref_form)
    if packed:  # the backward recomputes from float codes; packed codes carry no gradient
        q_f = ecoformer_unpack_bits(q_codes, num_bits)
        k_f = ecoformer_unpack_bits(k_codes, num_bits)
    return _EcoFormerKernelFn.apply(q_f, k_f, v, q_w, k_w, keep, num_bits, causal, ref_form, be)


register("ecoformer", "posattn.ops.ecoformer", ("triton", "torch"))
