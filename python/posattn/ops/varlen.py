"""Padding-free (variable-length) attention and the unpad/pad pair, after ByteTransformer.

ByteTransformer (Zhai et al., IPDPS 2023, arXiv 2210.03052; docs/ALGORITHMS.md section 2) removes the
padding of a batch once, runs every token-wise op and the attention on the packed tokens, and restores
the padding at the end. The API copies FlashAttention's names and semantics (``flash_attn.bert_padding``
``unpad_input`` / ``pad_input`` and ``flash_attn_varlen_func``), with the positional encodings of the
fused attention added through ``position=``.

Layout: ``q`` (total_q, num_heads, head_dim), ``k``/``v`` (total_k, num_heads_k, head_dim[_v]); sequence
``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` (int32, batch_size+1 entries, starting at 0).
Positions restart at 0 in every sequence; causal masks, windows and relative biases are aligned
bottom-right per sequence (query i of sequence b sits at ``i + seqlen_k_b - seqlen_q_b``).

Backends (``backend=``):

* ``"torch"`` (CPU default): sequences are grouped into chunks of similar length (bounded padding
  waste) and each chunk runs through the dense attention's torch backend with a key-padding mask, so
  the attention math exists once (``ops/attention.py``); gradients flow through it.
* ``"triton"``: the fused attention's Triton kernels in their IS_VARLEN mode (cu_seqlens, one launch,
  forward and backward; ``triton_kernels/fused_attention.py``). On CPU only under TRITON_INTERPRET=1.
* ``"cuda"``: the CUDA C++ short-sequence forward (``csrc/varlen.cu``, ByteTransformer's fused regime),
  forward only; requested explicitly. ``"auto"`` on a GPU picks Triton: no GPU benchmark has been run
  yet, so the CUDA kernel is not chosen automatically (not yet run on a GPU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import ops_registry
from .. import reference as _ref
from .._backends import resolve
from .._checks import (FLOAT_DTYPES, Dims, check_bool, check_choice, check_cu_seqlens, check_float, check_int,
                       check_tensor, check_window, dtype_name)
from .._memory import madvise_hugepage as _madvise_hugepage  # THP hint for fresh large CPU outputs

__all__ = [
    "unpad_input",
    "pad_input",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]

_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# =============================================================================================
# unpad / pad
# =============================================================================================

def _use_cuda_kernels(t: torch.Tensor) -> bool:
    """The CUDA C++ row/index kernels (posattn._cuda over posattn._C) run for CUDA tensors when built."""
    if t.device.type != "cuda":
        return False
    from .._backends import cuda_ext_available
    return cuda_ext_available(t.device)


def _gather_rows(src: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """dst[t] = src[indices[t]] for 2-D ``src`` (rows, width); no autograd."""
    if _use_cuda_kernels(src):
        from .. import _cuda
        return _cuda.gather_rows_cuda(src, indices)
    return src.index_select(0, indices)


def _scatter_rows(src: torch.Tensor, indices: torch.Tensor, rows: int) -> torch.Tensor:
    """dst = zeros(rows, width); dst[indices[t]] = src[t]; no autograd (indices are distinct)."""
    if _use_cuda_kernels(src):
        from .. import _cuda
        return _cuda.scatter_rows_cuda(src, indices, num_rows=rows)
    return src.new_zeros((rows, src.shape[1])).index_copy_(0, indices, src)


class _IndexFirstAxis(torch.autograd.Function):
    """Pack: out = x[indices]; backward scatters into zeros (rows not gathered get gradient 0)."""

    @staticmethod
    def forward(ctx, x2d, indices):
        ctx.save_for_backward(indices)
        ctx.rows = x2d.shape[0]
        return _gather_rows(x2d, indices)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return _scatter_rows(grad.contiguous(), indices, ctx.rows), None


class _IndexPutFirstAxis(torch.autograd.Function):
    """Pad: out = zeros(rows); out[indices] = x; backward gathers."""

    @staticmethod
    def forward(ctx, x2d, indices, rows):
        ctx.save_for_backward(indices)
        return _scatter_rows(x2d, indices, rows)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return _gather_rows(grad.contiguous(), indices), None, None


def _check_mask(attention_mask, batch: int, seqlen: int) -> torch.Tensor:
    check_tensor("attention_mask", attention_mask, dtypes=_INT_DTYPES)
    if tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask: expected (batch_size={batch}, seqlen={seqlen}) like the first two dims of "
                         f"hidden_states, got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:
        bad = (attention_mask != 0) & (attention_mask != 1)
        if bool(bad.any()):
            raise ValueError(f"attention_mask: expected 0/1 values (1 = token), got "
                             f"{attention_mask[bad].unique().tolist()[:8]}")
    return attention_mask


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    """Remove the padding of a batch: pack the tokens of every sequence into one axis.

    FlashAttention's ``flash_attn.bert_padding.unpad_input`` semantics (without its ``unused_mask``);
    ByteTransformer's padding-free pack (arXiv 2210.03052, docs/ALGORITHMS.md 2a).

    Parameters
    ----------
    hidden_states : Tensor (batch_size, seqlen, ...)
        Any dtype and trailing shape (e.g. (batch, seqlen, hidden) or (batch, seqlen, heads, head_dim)).
        Not modified; differentiable.
    attention_mask : Tensor (batch_size, seqlen), bool or integer 0/1
        1 (True) = a token, 0 = padding. Left padding, right padding and holes are all handled: the
        tokens of row b are packed in order, so a sequence with holes becomes contiguous (its
        positions restart at 0 and skip the holes).

    Returns
    -------
    hidden_unpadded : Tensor (total, ...), same dtype, the rows of the tokens in row-major order.
    indices : int64 Tensor (total,)
        ``b * seqlen + s`` of every token (for ``pad_input``).
    cu_seqlens : int32 Tensor (batch_size + 1,)
        Prefix sums of the lengths, starting at 0 (a sequence with no token has length 0).
    max_seqlen : int
        The longest length (0 for an empty batch); a host int (one device sync, as in FlashAttention).
    seqused : int32 Tensor (batch_size,)
        Tokens per sequence (FlashAttention's ``used_seqlens_in_batch``; equal to the lengths here).

    Raises
    ------
    TypeError
        ``hidden_states`` not a tensor; ``attention_mask`` not bool/integer.
    ValueError
        ``hidden_states`` with fewer than 2 dims; ``attention_mask`` of the wrong shape or with values
        other than 0/1.

    Notes
    -----
    On CUDA with ``posattn._C`` built, the index build (one CTA, ballot + popcount + prefix sum) and
    the row gather are CUDA C++ kernels (``csrc/varlen.cu`` through ``posattn._cuda``; not yet run on a
    GPU); elsewhere torch ops. Backward scatters the gradient into zeros.

    Examples
    --------
    >>> import torch
    >>> from posattn import unpad_input
    >>> x = torch.arange(8.).reshape(2, 4, 1)
    >>> mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    >>> xu, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    >>> xu.flatten().tolist(), indices.tolist(), cu_seqlens.tolist(), max_seqlen
    ([0.0, 1.0, 2.0, 5.0, 6.0], [0, 1, 2, 5, 6], [0, 3, 5], 3)
    """
    check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() < 2:
        raise ValueError(f"hidden_states: expected (batch_size, seqlen, ...) with at least 2 dims, got shape "
                         f"{tuple(hidden_states.shape)}")
    batch, seqlen = hidden_states.shape[:2]
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}")
    _check_mask(attention_mask, batch, seqlen)
    mask = attention_mask.to(hidden_states.device)
    indices, cu_seqlens, seqlens = _unpad_index(mask)
    max_seqlen = int(seqlens.max()) if batch > 0 else 0
    rest = hidden_states.shape[2:]
    # explicit width: reshape(0, -1) is ambiguous (batch or seqlen 0; found by tests/test_fuzz_unpad.py)
    flat = hidden_states.reshape(batch * seqlen, math.prod(rest))
    packed = _IndexFirstAxis.apply(flat, indices).reshape(indices.numel(), *rest)
    return packed, indices, cu_seqlens, max_seqlen, seqlens


def _unpad_index(mask: torch.Tensor):
    """(indices int64 (total,), cu_seqlens int32 (batch+1,), seqlens int32 (batch,)) of a 0/1 mask."""
    batch, seqlen = mask.shape
    if _use_cuda_kernels(mask) and batch > 0 and seqlen > 0:
        from .. import _cuda
        indices, cu, seqlens, _, _ = _cuda.unpad_index_cuda(mask)
        return indices, cu, seqlens
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).flatten()
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=mask.device)
    if batch > 0:
        cu[1:] = torch.cumsum(seqlens, dim=0, dtype=torch.int32)
    return indices, cu, seqlens


def pad_input(hidden_unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Restore the padding removed by ``unpad_input``: scatter packed rows into a zero batch.

    FlashAttention's ``flash_attn.bert_padding.pad_input`` semantics.

    Parameters
    ----------
    hidden_unpadded : Tensor (total, ...), any dtype. Not modified; differentiable.
    indices : int64 (or int32) Tensor (total,)
        Distinct destination rows ``b * seqlen + s`` in [0, batch * seqlen) (from ``unpad_input``).
    batch, seqlen : int >= 0
        The padded shape.

    Returns
    -------
    Tensor (batch, seqlen, ...) with zeros at the padding positions.

    Raises
    ------
    TypeError / ValueError naming the argument: wrong types, ``indices`` of the wrong length, out of
    range or repeated.

    Examples
    --------
    >>> import torch
    >>> from posattn import pad_input, unpad_input
    >>> x = torch.arange(8.).reshape(2, 4, 1)
    >>> xu, indices, *_ = unpad_input(x, torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]]))
    >>> pad_input(xu, indices, 2, 4)[..., 0].tolist()
    [[0.0, 1.0, 2.0, 0.0], [0.0, 5.0, 6.0, 0.0]]
    """
    check_tensor("hidden_unpadded", hidden_unpadded)
    if hidden_unpadded.dim() < 1:
        raise ValueError("hidden_unpadded: expected (total, ...), got a 0-D tensor")
    check_tensor("indices", indices, dtypes=(torch.int64, torch.int32), ndim=1)
    batch = check_int("batch", batch, minimum=0)
    seqlen = check_int("seqlen", seqlen, minimum=0)
    total = hidden_unpadded.shape[0]
    if indices.numel() != total:
        raise ValueError(f"indices: expected (total={total},) like hidden_unpadded's first dim, got "
                         f"{tuple(indices.shape)}")
    rows = batch * seqlen
    idx = indices.to(device=hidden_unpadded.device, dtype=torch.int64)
    if total:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= rows:
            raise ValueError(f"indices: expected values in [0, batch*seqlen={rows}), got min {lo}, max {hi}")
        if total > 1 and bool((torch.sort(idx).values.diff() == 0).any()):
            raise ValueError("indices: expected distinct rows, got repeated values")
    rest = hidden_unpadded.shape[1:]
    flat = hidden_unpadded.reshape(total, math.prod(rest))   # explicit width: total may be 0
    return _IndexPutFirstAxis.apply(flat, idx, rows).reshape(batch, seqlen, *rest)


# =============================================================================================
# varlen attention: argument checks
# =============================================================================================

class _Args:
    """Validated, normalised arguments of one varlen call."""
    __slots__ = ("batch_size", "num_heads", "num_heads_k", "head_dim", "head_dim_v", "total_q", "total_k",
                 "lens_q", "lens_k", "cu_q", "cu_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal",
                 "window_left", "window_right", "softcap", "dropout_p", "position", "deterministic")


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                  causal, window_size, softcap, alibi_slopes, deterministic, position) -> _Args:
    from .. import positional as _pos

    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3, device=q.device)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=3, device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {dtype_name(q.dtype)} (same as q), got {dtype_name(t.dtype)}")
    d = Dims()
    d.check("q", q, ("total_q", "num_heads", "head_dim"))
    d.check("k", k, ("total_k", "num_heads_k", "head_dim"))
    d.check("v", v, ("total_k", "num_heads_k", "head_dim_v"))
    a = _Args()
    a.total_q, a.num_heads, a.head_dim = d["total_q"], d["num_heads"], d["head_dim"]
    a.total_k, a.num_heads_k, a.head_dim_v = d["total_k"], d["num_heads_k"], d["head_dim_v"]
    if a.num_heads_k < 1 or a.num_heads % a.num_heads_k:
        raise ValueError(f"k: num_heads={a.num_heads} must be a multiple of num_heads_k, got num_heads_k="
                         f"{a.num_heads_k}")
    if a.head_dim < 1:
        raise ValueError(f"q: expected head_dim >= 1, got {a.head_dim}")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total=a.total_q, device=q.device)
    a.batch_size = cu_seqlens_q.numel() - 1
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, batch_size=a.batch_size, total=a.total_k, device=q.device)
    a.cu_q = cu_seqlens_q.tolist()
    a.cu_k = cu_seqlens_k.tolist()
    a.lens_q = [a.cu_q[b + 1] - a.cu_q[b] for b in range(a.batch_size)]
    a.lens_k = [a.cu_k[b + 1] - a.cu_k[b] for b in range(a.batch_size)]
    for name, value, lens in (("max_seqlen_q", max_seqlen_q, a.lens_q), ("max_seqlen_k", max_seqlen_k, a.lens_k)):
        value = check_int(name, value, minimum=0)
        longest = max(lens, default=0)
        if value < longest:
            cu_name = "cu_seqlens_" + name[-1]
            raise ValueError(f"{name}: expected >= the longest sequence in {cu_name} ({longest}), got {value}")
        setattr(a, name, value)
    a.dropout_p = check_float("dropout_p", dropout_p, minimum=0.0)
    if a.dropout_p >= 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    scale = check_float("softmax_scale", softmax_scale, allow_none=True)
    a.softmax_scale = a.head_dim ** -0.5 if scale is None else scale
    a.causal = causal = check_bool("causal", causal)
    left, right = check_window("window_size", window_size)
    if causal:
        right = 0
    # a window reaching past every key is no window (STYLE.md: normalise once)
    if left >= a.max_seqlen_k:
        left = -1
    if right >= a.max_seqlen_k:
        right = -1
    a.window_left, a.window_right = left, right
    a.softcap = check_float("softcap", softcap, minimum=0.0)
    a.deterministic = check_bool("deterministic", deterministic)
    spec = _pos.parse_position(position)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2), device=q.device)
        want = ((a.num_heads,), (a.batch_size, a.num_heads))
        if tuple(alibi_slopes.shape) not in want:
            raise ValueError(f"alibi_slopes: expected (num_heads={a.num_heads},) or (batch_size={a.batch_size}, "
                             f"num_heads={a.num_heads}), got {tuple(alibi_slopes.shape)}")
        if spec.bias is not None:
            raise ValueError(f"alibi_slopes: position= already carries an additive bias ({spec.bias!r}); "
                             f"pass ALiBi through one of them, got both")
        spec = _pos.parse_position([x for x in spec if x is not None] + [_pos.ALiBi(alibi_slopes)])
    _check_varlen_position(spec, a, q.device)
    a.position = spec
    return a


def _check_varlen_position(spec, a: _Args, device) -> None:
    """Per-token and per-sequence shapes of the positional encodings in the varlen layout."""
    from .. import positional as _pos

    rot, bias, _ = spec
    if isinstance(rot, _pos.RoPE):
        name = spec.names["rotary"]
        if rot.scaling is not None and rot.scaling.get("type", rot.scaling.get("rope_type")) == "dynamic":
            raise ValueError(f"{name}.scaling: 'dynamic' NTK scaling depends on each sequence's length and is not "
                             f"supported by the varlen op; run the sequences through the dense op instead")
        ids = rot.position_ids
        if ids is not None and not ((ids.dim() == 1 and ids.shape[0] == a.total_k)
                                    or (ids.dim() == 2 and tuple(ids.shape) == (1, a.total_k))):
            raise ValueError(f"{name}.position_ids: expected one id per key token, (total_k={a.total_k},) or "
                             f"(1, total_k={a.total_k}), got {tuple(ids.shape)}")
    elif isinstance(rot, _pos.LearnedPhaseRoPE):
        name = spec.names["rotary"]
        fr = rot.freqs
        if tuple(fr.shape) != (1, a.num_heads, a.total_k):
            raise ValueError(f"{name}.freqs: expected one frequency per key token and head, (1, num_heads="
                             f"{a.num_heads}, total_k={a.total_k}), got {tuple(fr.shape)}")
    if isinstance(bias, _pos.ALiBi) and bias.slopes is not None:
        s = bias.slopes
        if not ((s.dim() == 1 and s.shape[0] == a.num_heads) or
                (s.dim() == 2 and tuple(s.shape) == (a.batch_size, a.num_heads))):
            raise ValueError(f"{spec.names['bias']}.slopes: expected (num_heads={a.num_heads},) or (batch_size="
                             f"{a.batch_size}, num_heads={a.num_heads}), got {tuple(s.shape)}")
    if a.max_seqlen_q > 0:
        for b in range(a.batch_size):
            if a.lens_q[b] > a.lens_k[b] and (rot is not None and not isinstance(rot, _pos.XPos)):
                # query i sits at key index i + len_k - len_q < 0: no rotation position to read
                raise ValueError(f"cu_seqlens_q: sequence {b} has more queries ({a.lens_q[b]}) than keys "
                                 f"({a.lens_k[b]}); with {spec.names['rotary']} the query positions "
                                 f"(bottom-right aligned) would be negative")


# =============================================================================================
# varlen attention: public functions
# =============================================================================================

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, *, position=None, backend="auto"):
    """Attention over packed variable-length sequences (padding-free), forward and backward.

    FlashAttention 2's ``flash_attn_varlen_func`` semantics (names, layout, bottom-right causal
    alignment, ``window_size``, ``softcap``, ``alibi_slopes``), plus the positional encodings of the
    fused attention through ``position=``. The padding-free scheme is ByteTransformer's
    (arXiv 2210.03052). Each sequence attends only to its own keys; the result equals running every
    sequence alone through the dense attention.

    Parameters
    ----------
    q : Tensor (total_q, num_heads, head_dim), float16 / bfloat16 / float32
        Queries of all sequences packed along dim 0. Any strides (a unit last-dim stride avoids a copy).
        float64 is refused (TypeError) on every backend, the torch one included, unlike
        ``flash_attn_func`` whose torch backend takes float64 (use it on padded tensors for float64).
    k : Tensor (total_k, num_heads_k, head_dim), same dtype and device
        ``num_heads % num_heads_k == 0``; GQA/MQA: query head h reads kv head ``h // (num_heads // num_heads_k)``.
    v : Tensor (total_k, num_heads_k, head_dim_v)
    cu_seqlens_q, cu_seqlens_k : int32 Tensor (batch_size + 1,), on q's device
        Start row of every sequence, starting at 0, non-decreasing; ``cu_seqlens_q[-1] <= total_q``,
        ``cu_seqlens_k[-1] <= total_k``. Rows past the last entry belong to no sequence: their output
        is 0, their lse -inf and their gradient 0. Zero-length sequences are allowed anywhere;
        ``cu_seqlens_q != cu_seqlens_k`` is cross-attention.
    max_seqlen_q, max_seqlen_k : int
        At least the longest sequence of each side (host ints, as in FlashAttention; they size the grid).
    dropout_p : float in [0, 1), default 0.0
        Dropout on the attention probabilities (training only; keep-mask drawn by the backend).
    softmax_scale : float or None
        Logit scale; None (default) = ``head_dim ** -0.5``.
    causal : bool, default False
        Bottom-right aligned per sequence (FlashAttention): key j visible to query i iff
        ``j <= i + seqlen_k_b - seqlen_q_b``. For seqlen_q_b=2, seqlen_k_b=5::

            x x x x .
            x x x x x

    window_size : (left, right), default (-1, -1)
        Local attention: keys ``i + off - left <= j <= i + off + right`` with ``off = seqlen_k_b - seqlen_q_b``;
        -1 = unbounded on that side. ``causal=True`` sets right to 0.
    softcap : float, default 0.0
        0 = off; else logits become ``softcap * tanh(logits / softcap)`` before any bias.
    alibi_slopes : float32 Tensor (num_heads,) or (batch_size, num_heads), or None
        FlashAttention's ALiBi: bias ``-slope * |i + seqlen_k_b - seqlen_q_b - j|``. Same as
        ``position=ALiBi(alibi_slopes)``; giving both is an error.
    deterministic : bool, default False
        Deterministic backward (Triton backend; the torch backend always is).
    return_attn_probs : bool, default False
        If True, return ``(out, lse, None)`` as FlashAttention does: the attention probabilities are
        never materialised, so the third entry is always None. lse is differentiable on
        ``backend="torch"``; on ``backend="triton"`` it is returned in the graph but the backward
        raises RuntimeError if a non-zero gradient reaches lse (as ``flash_attn_func``): using lse
        without differentiating through it is fine.
    position : positional encoding(s) of ``posattn.positional``, keyword
        RoPE, XPos, LearnedPhaseRoPE, ALiBi, RelativeBias, T5Bias, URPE or a list (one of each kind).
        Positions restart at 0 in every sequence (key j of sequence b is at j). Per-token data uses
        the packed axis: ``RoPE(position_ids=...)`` takes (total_k,) int ids, the rotation position of
        every key token (queries read the id at their bottom-right aligned key index);
        ``LearnedPhaseRoPE(freqs)`` takes freqs (1, num_heads, total_k), the cumulative phase restarting
        at every sequence; ``ALiBi`` slopes may be per sequence (batch_size, num_heads). RoPE
        ``scaling={"type": "dynamic"}`` is not supported here (it depends on each sequence's length).
    backend : {"auto", "torch", "triton", "cuda"}, keyword
        See the module docstring. "auto": CPU -> torch, GPU -> Triton.

    Returns
    -------
    out : Tensor (total_q, num_heads, head_dim_v), q's dtype
    lse : float32 Tensor (num_heads, total_q), natural-log logsumexp (only with return_attn_probs=True);
        -inf for a query with no visible key.

    Raises
    ------
    TypeError
        Wrong type/dtype: q/k/v not fp16/bf16/fp32 or mixed; cu_seqlens not int32; alibi_slopes not fp32.
    ValueError
        Shapes that do not agree (message names the argument, the expected and the got shape);
        cu_seqlens not starting at 0, decreasing, of different lengths, or whose last entry exceeds the
        tokens given; ``max_seqlen_*`` smaller than a real length; bad window/softcap/dropout; an
        unknown backend; position tensors of the wrong shape.
    RuntimeError
        An explicit backend that cannot run here.

    Examples
    --------
    >>> import torch
    >>> from posattn import flash_attn_varlen_func
    >>> q = torch.randn(7, 2, 8); k = torch.randn(7, 1, 8); v = torch.randn(7, 1, 8)
    >>> cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)   # lengths 3, 0, 4
    >>> out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True, return_attn_probs=True)
    >>> out.shape, lse.shape
    (torch.Size([7, 2, 8]), torch.Size([2, 7]))
    """
    a = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, position)
    return_attn_probs = check_bool("return_attn_probs", return_attn_probs)
    # no GPU measurement yet: "auto" never picks the CUDA kernel (an explicit backend="cuda" does)
    candidates = ("triton", "torch") if backend == "auto" else ("triton", "cuda", "torch")
    which = resolve(backend, q.device, supported=candidates, op="varlen_attention")
    need_lse_grad = return_attn_probs and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad)
    if which == "torch":
        out, lse = _varlen_torch(q, k, v, a, need_lse_grad, need_lse=return_attn_probs)
    elif which == "triton":
        out, lse = _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, a, need_lse_grad)
    else:
        out, lse = _varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, a)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, position=None, backend="auto"):
    """``flash_attn_varlen_func`` for packed self-attention input ``qkv`` (total, 3, num_heads, head_dim).

    FlashAttention's ``flash_attn_varlen_qkvpacked_func``: q, k, v = ``qkv.unbind(1)`` (views, no copy;
    gradients flow back into ``qkv``), ``cu_seqlens``/``max_seqlen`` shared by queries and keys.
    Other parameters, returns and errors as ``flash_attn_varlen_func``.

    Examples
    --------
    >>> import torch
    >>> from posattn import flash_attn_varlen_qkvpacked_func
    >>> qkv = torch.randn(5, 3, 2, 8)
    >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    >>> flash_attn_varlen_qkvpacked_func(qkv, cu, 3).shape
    torch.Size([5, 2, 8])
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=4)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected (total, 3, num_heads, head_dim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  position=position, backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    position=None, backend="auto"):
    """``flash_attn_varlen_func`` with keys and values packed as ``kv`` (total_k, 2, num_heads_k, head_dim).

    FlashAttention's ``flash_attn_varlen_kvpacked_func``: k, v = ``kv.unbind(1)`` (views). Other
    parameters, returns and errors as ``flash_attn_varlen_func``.

    Examples
    --------
    >>> import torch
    >>> from posattn import flash_attn_varlen_kvpacked_func
    >>> q = torch.randn(3, 4, 8); kv = torch.randn(6, 2, 2, 8)
    >>> cq = torch.tensor([0, 1, 3], dtype=torch.int32); ck = torch.tensor([0, 4, 6], dtype=torch.int32)
    >>> flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 2, 4, causal=True).shape
    torch.Size([3, 4, 8])
    """
    check_tensor("kv", kv, dtypes=FLOAT_DTYPES, ndim=4)
    if kv.shape[1] != 2:
        raise ValueError(f"kv: expected (total_k, 2, num_heads_k, head_dim), got {tuple(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, position=position, backend=backend)


# =============================================================================================
# torch backend: chunks of similar-length sequences through the dense torch backend
# =============================================================================================

# A chunk pads its sequences to its longest one and costs one dense call. The plan minimises
#   sum over chunks of (call overhead + padded attention FLOPs + gather cost of a multi-sequence chunk),
# in FLOP-equivalents of torch's fused CPU attention kernel (~50 GFLOP/s at head_dim 64, fp32, 1 thread,
# measured here). A call of the dense torch backend (custom op, positional encoding setup) costs
# ~300 us = CALL_OVERHEAD_FLOPS; a direct call of the fused kernel on plain attention ~20 us
# (FAST_CALL_OVERHEAD_RATIO of it). A chunk of one sequence (or of equal-length sequences adjacent in
# the packed layout) is a view of q/k/v; any other chunk copies its padded rows, ~0.5 ns per byte
# (index_select of 3 KB rows into fresh memory) = GATHER_FLOPS_PER_BYTE. Tokens per chunk are bounded
# so a chunk's padded copies of q/k/v stay small.
CALL_OVERHEAD_FLOPS = 1.5e7
FAST_CALL_OVERHEAD_RATIO = 1.0 / 15
GATHER_FLOPS_PER_BYTE = 25.0
CHUNK_MAX_TOKENS = 1 << 16
_DP_WINDOW = 48  # a chunk spans at most this many distinct lengths (keeps planning O(48 * lengths))


def plan_chunks(lens_q, lens_k, *, overhead: float = 0.0, gather: float = 0.0,
                max_tokens: int = CHUNK_MAX_TOKENS) -> list:
    """Group sequences for the torch backend: a list of lists of sequence ids.

    Sequences with no query or no key are dropped (their rows are out 0, lse -inf). Only sequences
    with the same ``len_k - len_q`` share a chunk (right padding then keeps every bottom-right
    alignment exact). Within that class, sequences sorted by length are cut into runs minimising
    ``sum(overhead + n * Lq * Lk + (gather * n * max(Lq, Lk) if n > 1))`` (padded logits per head;
    ``overhead`` = the cost of one more chunk and ``gather`` = the cost of copying one padded token's
    q/k/v rows, in the same unit: a chunk of one sequence is a view and copies nothing) by dynamic
    programming over the distinct lengths. Sequences of one length stay together unless copying one
    of them costs more than a call (then each may be its own chunk).

    >>> plan_chunks([3, 0, 4, 3], [3, 5, 4, 3])                 # no call overhead: no padding at all
    [[0, 3], [2]]
    >>> plan_chunks([3, 0, 4, 3], [3, 5, 4, 3], overhead=100)   # 48 padded logits < 100 + 34
    [[0, 3, 2]]
    >>> plan_chunks([3, 0, 4, 3], [3, 5, 4, 3], overhead=1, gather=10)  # copies cost more than calls
    [[0], [3], [2]]
    """
    classes: dict = {}
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq > 0 and lk > 0:
            classes.setdefault(lk - lq, {}).setdefault(lq, []).append(b)
    chunks = []
    for off in sorted(classes):
        units = []  # (len_q, ids) by increasing length; a length with too many tokens is split
        for lq in sorted(classes[off]):
            ids = classes[off][lq]
            if len(ids) > 1 and gather * max(lq, lq + off) > overhead:   # one call each beats a copy
                units += [(lq, [b]) for b in ids]
                continue
            per = max(1, max_tokens // max(lq, lq + off))
            units += [(lq, ids[i:i + per]) for i in range(0, len(ids), per)]
        m = len(units)
        best = [0.0] + [float("inf")] * m
        cut = [0] * (m + 1)
        for j in range(1, m + 1):
            lq_j = units[j - 1][0]
            lk_j = lq_j + off
            n = 0
            for i in range(j - 1, max(-1, j - 1 - _DP_WINDOW), -1):
                n += len(units[i][1])
                if n * max(lq_j, lk_j) > max_tokens and i < j - 1:
                    break
                c = best[i] + overhead + n * lq_j * lk_j + (gather * n * max(lq_j, lk_j) if n > 1 else 0.0)
                if c < best[j]:
                    best[j], cut[j] = c, i
        j, runs = m, []
        while j > 0:
            runs.append((cut[j], j))
            j = cut[j]
        for i, j in reversed(runs):
            chunks.append([b for _, ids in units[i:j] for b in ids])
    return chunks


def _chunk_position(spec, seqs, a: _Args, Lk: int, kidx: torch.Tensor, kvalid: torch.Tensor):
    """The dense ``position`` of one chunk (batch = len(seqs), keys right-padded to Lk)."""
    from .. import positional as _pos
    import copy

    items = []
    for obj in spec:
        if obj is None:
            continue
        o2 = copy.copy(obj)
        if isinstance(obj, _pos.RoPE) and obj.position_ids is not None:
            ids = obj.position_ids.reshape(-1)
            # padded keys get id 0: they are masked out, the value only has to be a valid position
            o2.position_ids = torch.where(kvalid, ids[kidx.clamp(max=max(ids.numel() - 1, 0))],
                                          torch.zeros((), dtype=ids.dtype, device=ids.device))
        elif isinstance(obj, _pos.ALiBi) and obj.slopes is not None and obj.slopes.dim() == 2:
            o2.slopes = obj.slopes[torch.tensor(seqs, device=obj.slopes.device)]
        elif isinstance(obj, _pos.LearnedPhaseRoPE):
            fr = obj.freqs[0]  # (H, total_k)
            # padded keys get frequency 1 (a valid value); they are after the real keys, so the real
            # keys' cumulative phases are unchanged
            g = fr[:, kidx.clamp(max=max(fr.shape[1] - 1, 0)).reshape(-1)].reshape(fr.shape[0], *kidx.shape)
            g = torch.where(kvalid[None], g, torch.ones((), dtype=fr.dtype, device=fr.device))
            o2.freqs = g.permute(1, 0, 2)  # (chunk, H, Lk)
        items.append(o2)
    return items or None


def _sdpa_cpu_ok(q, a: _Args, need_lse_grad: bool) -> bool:
    """Plain attention on CPU runs on torch's fused CPU SDPA kernel (the one the padded baseline uses).

    Only when it computes exactly this op: no positional encoding, softcap, window or dropout; causal
    only when no query row is fully masked (len_k >= len_q); and no gradient through lse (torch's
    kernel returns a non-differentiable logsumexp).
    """
    if q.device.type != "cpu" or a.position or a.softcap or a.dropout_p or a.window_left >= 0 or need_lse_grad:
        return False
    if a.window_right >= 0 and not (a.causal and a.window_right == 0):
        return False
    if a.causal and any(lk < lq for lq, lk in zip(a.lens_q, a.lens_k) if lq > 0 and lk > 0):
        return False
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _varlen_torch(q, k, v, a: _Args, need_lse_grad: bool = True, need_lse: bool = True):
    """Chunks of similar-length sequences, right-padded, through a dense kernel with a key mask.

    Dense kernel: torch's fused CPU SDPA for plain attention (``_sdpa_cpu_ok``), else the dense
    attention's torch backend (``ops/attention.py``, every positional encoding). A chunk whose
    sequences all have the same lengths needs no padding and no mask (the common case with the
    default plan).

    Data movement (it cost as much as the attention itself when every chunk was gathered separately and
    the outputs concatenated): a chunk of equal-length sequences that are adjacent in the packed layout
    is a view of q/k/v and writes its output rows in place; the other chunks are gathered with one
    ``index_select`` per tensor for all of them, padded rows reading row 0. Each chunk's output goes
    straight into ``out`` with an in-place ``index_copy_``; padded rows are sent to one spare row past
    the end (dropped), so rows outside every sequence keep out 0 / lse -inf and get no gradient.
    """
    from . import attention as _attn

    dev = q.device
    H, D, Dv = a.num_heads, a.head_dim, a.head_dim_v
    fast = _sdpa_cpu_ok(q, a, need_lse_grad)
    unit = 2.0 * a.num_heads * (a.head_dim + a.head_dim_v)        # FLOPs of one logit, all heads
    token_bytes = q.element_size() * (a.num_heads * a.head_dim + a.num_heads_k * (a.head_dim + a.head_dim_v))
    chunks = plan_chunks(a.lens_q, a.lens_k,
                         overhead=CALL_OVERHEAD_FLOPS * (FAST_CALL_OVERHEAD_RATIO if fast else 1.0) / unit,
                         gather=GATHER_FLOPS_PER_BYTE * token_bytes / unit)
    if not chunks:
        out = q.new_zeros((a.total_q, H, Dv))
        lse = torch.full((H, a.total_q), float("-inf"), dtype=torch.float32, device=dev)
        if q.requires_grad or k.requires_grad or v.requires_grad:
            # keep the graph connected so backward gives zero gradients instead of an error; sums of empty
            # slices read no data (0 * sum(q) would turn NaN/inf in rows outside every sequence into NaN)
            out = out + (q[:0].sum() + k[:0].sum() + v[:0].sum())
        return out, lse
    # chunk layout: where its rows come from (a view or a slice of the one gather) and where they go
    plans, gather_q, gather_k, nq, nk = [], [], [], 0, 0
    covered = 0
    for seqs in chunks:
        n = len(seqs)
        lq_list = [a.lens_q[b] for b in seqs]
        lk_list = [a.lens_k[b] for b in seqs]
        Lq, Lk = max(lq_list), max(lk_list)
        covered += sum(lq_list)
        uniform = min(lq_list) == Lq and min(lk_list) == Lk
        adjacent = uniform and all(a.cu_q[s1] == a.cu_q[s0] + Lq and a.cu_k[s1] == a.cu_k[s0] + Lk
                                   for s0, s1 in zip(seqs, seqs[1:]))
        p = dict(seqs=seqs, n=n, Lq=Lq, Lk=Lk, uniform=uniform, adjacent=adjacent, lq=lq_list, lk=lk_list)
        if not adjacent:
            p["gq"], p["gk"] = nq, nk
            nq, nk = nq + n * Lq, nk + n * Lk
            ar_q = torch.arange(Lq, device=dev)
            ar_k = torch.arange(Lk, device=dev)
            qidx = (torch.tensor([a.cu_q[b] for b in seqs], device=dev)[:, None] + ar_q[None]).reshape(-1)
            kidx = (torch.tensor([a.cu_k[b] for b in seqs], device=dev)[:, None] + ar_k[None]).reshape(-1)
            if not uniform:
                p["qvalid"] = ar_q[None] < torch.tensor(lq_list, device=dev)[:, None]   # (n, Lq)
                p["kvalid"] = ar_k[None] < torch.tensor(lk_list, device=dev)[:, None]   # (n, Lk)
                p["rows"] = torch.where(p["qvalid"].reshape(-1), qidx, a.total_q)     # padded -> spare row
                qidx = torch.where(p["qvalid"].reshape(-1), qidx, 0)                  # padded rows read row 0
                kidx = torch.where(p["kvalid"].reshape(-1), kidx, 0)
            else:
                p["rows"] = qidx
            p["kidx"] = kidx
            gather_q.append(qidx)
            gather_k.append(kidx)
        plans.append(p)
    # rows outside every chunk (past cu_seqlens_q[-1], or of a sequence without keys) must read 0 / -inf
    full = covered == a.total_q
    out = q.new_empty((a.total_q + 1, H, Dv))
    _madvise_hugepage(out)       # fresh pages: ~18 ms of page faults at 37 MB with 4 KiB pages (1 thread)
    if not full:
        out.zero_()
    lse = torch.empty((H, a.total_q + 1), dtype=torch.float32, device=dev)
    if not (full and need_lse):
        lse.fill_(float("-inf"))
    if gather_q:  # one gather per tensor for all chunks that are not views
        qi, ki = torch.cat(gather_q), torch.cat(gather_k)
        qg, kg, vg = q.index_select(0, qi), k.index_select(0, ki), v.index_select(0, ki)
    for p in plans:
        seqs, n, Lq, Lk, uniform = p["seqs"], p["n"], p["Lq"], p["Lk"], p["uniform"]
        if p["adjacent"]:
            s_q, s_k = a.cu_q[seqs[0]], a.cu_k[seqs[0]]
            qc = q[s_q:s_q + n * Lq].view(n, Lq, H, D)
            kc = k[s_k:s_k + n * Lk].view(n, Lk, a.num_heads_k, D)
            vc = v[s_k:s_k + n * Lk].view(n, Lk, a.num_heads_k, Dv)
        else:
            qc = qg[p["gq"]:p["gq"] + n * Lq].view(n, Lq, H, D)
            kc = kg[p["gk"]:p["gk"] + n * Lk].view(n, Lk, a.num_heads_k, D)
            vc = vg[p["gk"]:p["gk"] + n * Lk].view(n, Lk, a.num_heads_k, Dv)
        kvalid = p.get("kvalid")
        if fast:
            bias, is_causal = None, False
            if a.causal and uniform and Lq == Lk:
                is_causal = True                              # top-left == bottom-right here
            elif not uniform or a.causal:
                ar_q = torch.arange(Lq, device=dev)
                ar_k = torch.arange(Lk, device=dev)
                allowed = torch.ones((n, 1, 1, Lk), dtype=torch.bool, device=dev) if uniform else \
                    kvalid[:, None, None, :]
                if a.causal:                                  # bottom-right: j <= i + Lk - Lq
                    allowed = allowed & (ar_k[None, :] <= ar_q[:, None] + (Lk - Lq))[None, None]
                bias = torch.zeros(allowed.shape, dtype=q.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
            # the kernel reads GQA k/v heads itself (query head h -> kv head h // group); its out is laid out
            # (n, Lq, H, Dv) in memory, so the transpose back is a view
            # the aten kernel assumes a unit stride in head_dim (see _attention_torch._fast_chunk)
            qc, kc, vc = (t if t.stride(-1) == 1 else t.contiguous() for t in (qc, kc, vc))
            oc, lc = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), 0.0, is_causal, attn_mask=bias,
                scale=a.softmax_scale)
            oc = oc.transpose(1, 2)
        else:
            kidx = p["kidx"] if not p["adjacent"] else \
                (a.cu_k[seqs[0]] + torch.arange(n * Lk, device=dev))
            pe = _attn.build_pe(_chunk_position(a.position, seqs, a, Lk, kidx.reshape(n, Lk),
                                                torch.ones((n, Lk), dtype=torch.bool, device=dev)
                                                if kvalid is None else kvalid),
                                batch_size=n, num_heads=H, seqlen_q=Lq, seqlen_k=Lk, head_dim=D,
                                offset=Lk - Lq, device=dev)
            oc, lc = _attn.fused_attention(qc, kc, vc, attn_mask=None if uniform else kvalid[:, None, None, :],
                                           softmax_scale=a.softmax_scale, causal=a.causal, offset=Lk - Lq,
                                           window_left=a.window_left, window_right=a.window_right,
                                           softcap=a.softcap, pe=pe, dropout_p=a.dropout_p,
                                           deterministic=a.deterministic, backend="torch")
        oc = oc.reshape(n * Lq, H, Dv).to(q.dtype)
        if need_lse:
            lc = lc.to(torch.float32).permute(1, 0, 2).reshape(H, n * Lq)
            lc = lc if need_lse_grad else lc.detach()
        if p["adjacent"]:
            s_q = a.cu_q[seqs[0]]
            out[s_q:s_q + n * Lq] = oc
            if need_lse:
                lse[:, s_q:s_q + n * Lq] = lc
        else:
            out.index_copy_(0, p["rows"], oc)
            if need_lse:
                lse.index_copy_(1, p["rows"], lc)
    return out[:a.total_q], lse[:, :a.total_q]


# =============================================================================================
# Triton and CUDA backends
# =============================================================================================

def _varlen_kernel_pe(q, a: _Args):
    """KernelPE for the varlen launchers: per-token position data moved to per-sequence rows.

    The kernels index ``position_ids`` (batch_size, max_seqlen_k) and learned ``phases``
    (batch_size, num_heads, max_seqlen_k, rotary_dim/2) by (sequence, index in the sequence), so
    RoPE ids (total_k,) and CARoPE freqs (1, num_heads, total_k) are scattered into right-padded
    per-sequence rows here (phases accumulate per row, i.e. restart at every sequence; the padding
    after a sequence's last key never reaches its keys). Differentiable w.r.t. freqs and tables.
    """
    from .. import positional as _pos

    spec = a.position
    if not spec:
        return None
    dev = q.device
    B, Lk = a.batch_size, a.max_seqlen_k
    lens = torch.tensor(a.lens_k, device=dev)
    starts = torch.tensor(a.cu_k[:-1], device=dev)
    ar = torch.arange(Lk, device=dev)
    valid = ar[None] < lens[:, None]                              # (B, Lk)
    src = torch.where(valid, starts[:, None] + ar[None], 0)       # packed row of (b, j)
    items = []
    for obj in spec:
        if obj is None:
            continue
        o2 = obj
        if isinstance(obj, _pos.RoPE) and obj.position_ids is not None:
            import copy
            ids = obj.position_ids.reshape(-1).to(dev)
            o2 = copy.copy(obj)
            o2.position_ids = torch.where(valid, ids[src] if ids.numel() else src, 0)
        elif isinstance(obj, _pos.LearnedPhaseRoPE):
            import copy
            fr = obj.freqs[0].to(dev)                             # (H, total_k)
            g = fr[:, src.reshape(-1)].reshape(fr.shape[0], B, Lk) if fr.shape[1] else \
                fr.new_ones((fr.shape[0], B, Lk))
            g = torch.where(valid[None], g, torch.ones((), dtype=fr.dtype, device=dev))
            o2 = copy.copy(obj)
            o2.freqs = g.permute(1, 0, 2)                         # (B, H, Lk)
        items.append(o2)
    return _pos.kernel_args(items, batch_size=B, num_heads=a.num_heads, seqlen_q=min(a.max_seqlen_q, Lk),
                            seqlen_k=Lk, head_dim=a.head_dim, offset=0, device=dev)


def _triton_fwd(q, k, v, out, lse, cu_q, cu_k, pe, a: _Args, seed: int) -> None:
    """One launch of the fused varlen forward into ``out``/``lse``; rows outside every sequence get
    out 0 and lse -inf (the launcher leaves them untouched)."""
    from . import attention as _attn
    _attn._launcher().fused_attention_fwd(
        q, k, v, out, lse, softmax_scale=a.softmax_scale, causal=a.causal, offset=None,
        window_left=a.window_left, window_right=a.window_right, softcap=a.softcap, pe=pe, dropout_p=a.dropout_p,
        seed=seed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=a.max_seqlen_q, max_seqlen_k=a.max_seqlen_k)
    end = a.cu_q[-1]
    if end < a.total_q:
        out[end:] = 0
        lse[:, end:] = float("-inf")


class _VarlenTriton(torch.autograd.Function):
    """Autograd glue of the Triton varlen path: saves out and lse (fp32), backward = one bwd launch.

    lse stays in the graph (as in flash_attn_func): backward raises only if a non-zero gradient reaches it."""

    @staticmethod
    def forward(ctx, q, k, v, phases, bias_table, urpe_table, cu_q, cu_k, pe, a, seed):
        out = torch.empty((a.total_q, a.num_heads, a.head_dim_v), dtype=q.dtype, device=q.device)
        lse = torch.empty((a.num_heads, a.total_q), dtype=torch.float32, device=q.device)
        _triton_fwd(q, k, v, out, lse, cu_q, cu_k, pe, a, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.pe, ctx.a, ctx.seed = pe, a, seed
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from . import attention as _attn
        if dlse is not None and bool(dlse.any()):
            raise RuntimeError("backend='triton': a gradient through the returned lse is not supported by the "
                               "Triton backward; use backend='torch' to differentiate through lse")
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        pe, a = ctx.pe, ctx.a
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        need_tab, need_urpe, need_ph = ctx.needs_input_grad[4], ctx.needs_input_grad[5], ctx.needs_input_grad[3]
        d_tab = torch.zeros_like(pe.bias_table, dtype=torch.float32) if need_tab else None
        d_urpe = torch.zeros_like(pe.urpe_table, dtype=torch.float32) if need_urpe else None
        d_ph = torch.zeros_like(pe.phases, dtype=torch.float32) if need_ph else None
        _attn._launcher().fused_attention_bwd(
            dout.contiguous(), q, k, v, out, lse, dq, dk, dv, softmax_scale=a.softmax_scale, causal=a.causal,
            offset=None, window_left=a.window_left, window_right=a.window_right, softcap=a.softcap, pe=pe,
            dropout_p=a.dropout_p, seed=ctx.seed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=a.max_seqlen_q, max_seqlen_k=a.max_seqlen_k, d_bias_table=d_tab, d_urpe_table=d_urpe,
            d_phases=d_ph, deterministic=a.deterministic)
        # rows outside every sequence: zero gradient (the launcher does not touch them)
        if a.cu_q[-1] < a.total_q:
            dq[a.cu_q[-1]:] = 0
        if a.cu_k[-1] < a.total_k:
            dk[a.cu_k[-1]:] = 0
            dv[a.cu_k[-1]:] = 0
        cast = lambda g, t: None if g is None else g.to(t.dtype)  # noqa: E731
        return (dq, dk, dv, cast(d_ph, pe.phases), cast(d_tab, pe.bias_table), cast(d_urpe, pe.urpe_table),
                None, None, None, None, None)


def _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, a: _Args, need_lse_grad: bool):
    from . import attention as _attn
    from .._checks import check_last_dim_contiguous

    pe = _varlen_kernel_pe(q, a)  # need_lse_grad: checked in _VarlenTriton.backward (a non-zero dlse raises)
    _attn._check_backend_support("triton", q, k, v, None, pe, dropout_p=a.dropout_p)
    q, k, v = (check_last_dim_contiguous(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    # the kernels index cu_seqlens with unit stride: a strided view (every other entry of a buffer) was read
    # past its end (garbage lengths, out-of-bounds reads; the interpreter aborted with munmap_chunk)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    seed = _attn._draw_seed(a.dropout_p)
    pe_ = pe if pe is not None else __import__("posattn.positional", fromlist=["KernelPE"]).KernelPE()
    return _VarlenTriton.apply(q, k, v, pe_.phases, pe_.bias_table, pe_.urpe_table, cu_seqlens_q, cu_seqlens_k, pe_,
                               a, seed)


def _varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, a: _Args):
    """CUDA C++ short-sequence forward (csrc/varlen.cu): whole K/V of a sequence in shared memory.

    Forward only; fp16/bf16; head_dim 64 or 128 (head_dim_v == head_dim); ALiBi / RelativeBias /
    T5Bias; no rotary, URPE, window, softcap or dropout. Not yet run on a GPU.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("backend='cuda': the CUDA C++ varlen kernel is forward-only; use backend='triton' "
                           "for training (or run under torch.no_grad())")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q: backend='cuda' takes float16 or bfloat16, got {dtype_name(q.dtype)}")
    if a.head_dim not in (64, 128) or a.head_dim_v != a.head_dim:
        raise ValueError(f"q: backend='cuda' supports head_dim 64 or 128 with head_dim_v == head_dim, got "
                         f"head_dim={a.head_dim}, head_dim_v={a.head_dim_v}")
    rot, bias, urpe = a.position
    unsupported = [n for n, bad in (("a rotary encoding", rot is not None), ("URPE", urpe is not None),
                                    ("window_size", a.window_left >= 0 or (a.window_right >= 0 and not a.causal)),
                                    ("softcap", a.softcap > 0), ("dropout_p", a.dropout_p > 0)) if bad]
    if unsupported:
        raise ValueError(f"backend='cuda': the short-sequence kernel does not support {', '.join(unsupported)}; "
                         f"use backend='triton'")
    from .. import _cuda
    pe = _varlen_kernel_pe(q, a)
    bias_args = {}
    if pe is not None and pe.bias_mode == 1:
        bias_args = dict(bias_mode=1, alibi_slopes=pe.alibi_slopes)
    elif pe is not None and pe.bias_mode in (2, 3):
        bias_args = dict(bias_mode=int(pe.bias_mode), bias_table=pe.bias_table, max_distance=int(pe.max_distance),
                    num_buckets=int(pe.num_buckets) or 32, bidirectional=bool(pe.bidirectional))
    out, lse = _cuda.varlen_attention_fwd_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k,
                                               softmax_scale=a.softmax_scale, causal=a.causal, **bias_args)
    end = a.cu_q[-1]
    if end < a.total_q:
        out[end:] = 0
        lse[:, end:] = float("-inf")
    return out, lse


ops_registry.register("varlen_attention", "posattn.ops.varlen", ("triton", "cuda", "torch"))
ops_registry.register("unpad_pad", "posattn.ops.varlen", ("cuda", "torch"))
