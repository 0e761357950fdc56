"""apply_rotary: rotary position embedding of one tensor from given cos/sin tables, with backward.

Custom op ``posattn::apply_rotary`` (torch backend: ``posattn.reference.apply_rotary`` in fp32 on gathered
tables; Triton backend: ``posattn.triton_kernels.rotary.apply_rotary_fwd``; CUDA backend, explicit only and
not yet run on a GPU: ``posattn._cuda.apply_rotary_cuda`` over ``csrc/rope.cu``). Backward of x is the same
op with the inverse rotation (sin negated; the ``conj`` flag of the CUDA kernel); gradients of cos/sin (when
they require grad) are reduced over batch and heads and scattered to their table rows in torch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends, ops_registry
from .. import reference as _ref
from .._checks import (FLOAT_DTYPES, Dims, check_disjoint, check_no_overlap, check_same, check_tensor,
                       dense_for_reading, dtype_name)

__all__ = ["apply_rotary"]

# "cuda" is last and never picked by backend="auto": the CUDA C++ kernel has not yet run on a GPU (a GPU
# benchmark decides once it has); an explicit backend="cuda" uses it.
_AUTO_BACKENDS = ("triton", "torch")
_BACKENDS = ("triton", "torch", "cuda")

ops_registry.register("apply_rotary", "posattn.ops.rotary", _BACKENDS)


def _rows(position_ids, batch, seqlen, device):
    """Table row of every token: (batch or 1, seqlen) int64."""
    if position_ids is None:
        return torch.arange(seqlen, dtype=torch.int64, device=device).unsqueeze(0)
    return _pos2d(position_ids, seqlen).to(torch.int64)


def _pos2d(position_ids, seqlen):
    """position_ids (seqlen,) or (batch|1, seqlen) as 2-D; an explicit leading size, since reshape(-1, 0)
    is ambiguous for seqlen 0 (found by tests/test_fuzz_rotary.py)."""
    return position_ids.reshape(1 if position_ids.dim() == 1 else position_ids.shape[0], seqlen)


def _rotary_torch(x, cos, sin, position_ids, interleaved, conjugate):
    batch, seqlen = x.shape[:2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = _rows(position_ids, batch, seqlen, x.device)
    c = cos.to(acc)[rows].unsqueeze(2)        # (batch|1, seqlen, 1, r/2)
    s = sin.to(acc)[rows].unsqueeze(2)
    if conjugate:
        s = -s
    return _ref.apply_rotary(x.to(acc), c, s, interleaved).to(x.dtype)


def _launch(x, cos, sin, position_ids, interleaved, conjugate, backend, out):
    if backend == "torch":
        out.copy_(_rotary_torch(x, cos, sin, position_ids, interleaved, conjugate))
        return
    if backend == "cuda":
        if x.numel() == 0:
            return
        from .. import _cuda
        cos, sin = cos.resolve_neg(), sin.resolve_neg()   # as for Triton below
        if out is not x:
            x = x.resolve_neg()
        pos = None if position_ids is None else _pos2d(position_ids.resolve_neg(), x.shape[1])
        kw = dict(interleaved=interleaved, conj=conjugate, position_ids=pos)
        with torch.cuda.device(x.device):
            if out is x and x.stride(-1) != 1:   # the kernel rotates in place only with a unit last-dim stride
                out.copy_(_cuda.apply_rotary_cuda(x.resolve_neg(), cos, sin, **kw))   # copy_ applies out's sign
            else:
                _cuda.apply_rotary_cuda(x, cos, sin, out=out, **kw)
        return
    from ..triton_kernels.rotary import apply_rotary_fwd
    # the kernel reads memory, not torch's view of it: tables / positions with the negative bit set
    # (``z.conj().imag``) are read through a copy with the sign applied (apply_rotary(inplace=True) reaches here
    # without the dispatcher, which resolves them for the custom op). A negated x written in place needs
    # nothing: the rotation is linear, so rotating the stored values rotates -x.
    cos, sin = cos.resolve_neg(), sin.resolve_neg()
    if position_ids is not None:
        position_ids = position_ids.resolve_neg()
    if out is not x:
        x = x.resolve_neg()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    pos = None if position_ids is None else _pos2d(position_ids, x.shape[1])
    apply_rotary_fwd(x, cos, sin, out, position_ids=pos, interleaved=interleaved, conjugate=conjugate)


@torch.library.custom_op("posattn::apply_rotary", mutates_args=())
def _apply_rotary_op(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor], interleaved: bool,
                     conjugate: bool, backend: str) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, cos, sin, position_ids, interleaved, conjugate, backend, out)
    return out


@_apply_rotary_op.register_fake
def _(x, cos, sin, position_ids, interleaved, conjugate, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    x, cos, sin, position_ids, interleaved, conjugate, backend = inputs
    need_table = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(x if need_table else None, cos, sin, position_ids)
    ctx.opts = (interleaved, conjugate, backend)


def _table_grads(x, dout, cos, sin, position_ids, interleaved, conjugate):
    """d cos, d sin (seqlen_ro, r/2): sum over heads of each token's pair products, added to its table row."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[1]
    r = 2 * half
    xr, gr = x[..., :r].to(acc), dout[..., :r].to(acc)
    if interleaved:
        x1, x2, g1, g2 = xr[..., 0::2], xr[..., 1::2], gr[..., 0::2], gr[..., 1::2]
    else:
        x1, x2, g1, g2 = xr[..., :half], xr[..., half:], gr[..., :half], gr[..., half:]
    dc = (g1 * x1 + g2 * x2).sum(dim=2)          # (batch, seqlen, r/2)
    ds = (g2 * x1 - g1 * x2).sum(dim=2)
    if conjugate:
        ds = -ds
    batch, seqlen = x.shape[:2]
    rows = _rows(position_ids, batch, seqlen, x.device).expand(batch, seqlen).reshape(-1)
    dcos = torch.zeros(cos.shape, dtype=acc, device=x.device).index_add_(0, rows, dc.reshape(-1, half))
    dsin = torch.zeros(sin.shape, dtype=acc, device=x.device).index_add_(0, rows, ds.reshape(-1, half))
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


def _backward(ctx, dout):
    x, cos, sin, position_ids = ctx.saved_tensors
    interleaved, conjugate, backend = ctx.opts
    dx = dcos = dsin = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.posattn.apply_rotary(dout, cos, sin, position_ids, interleaved, not conjugate, backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dcos, dsin = _table_grads(x, dout, cos, sin, position_ids, interleaved, conjugate)
    return dx, dcos, dsin, None, None, None, None


_apply_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rotary(x, cos, sin, *, interleaved=False, position_ids=None, inplace=False, backend="auto"):
    r"""Apply rotary position embedding (RoPE) to ``x`` with precomputed cos/sin tables.

    Token t of sequence b uses table row ``position_ids[b, t]`` (default ``t``); each pair ``(a, b)`` of the
    first ``rotary_dim = 2 * cos.shape[1]`` features becomes ``(a cos - b sin, a sin + b cos)``, computed in
    fp32; the remaining features pass through unchanged.

    Parameters
    ----------
    x : Tensor (batch, seqlen, num_heads, head_dim)
        FlashAttention's ``apply_rotary_emb`` layout. float16, bfloat16 or float32 (float64 on
        ``backend="torch"``); any strides. With ``inplace=False`` an x whose elements share memory
        (``expand``-ed or overlapping ``unfold``/``as_strided`` views) is read through a contiguous copy.
    cos, sin : Tensor (seqlen_ro, rotary_dim // 2)
        cos and sin of the angles (e.g. ``reference.rope_cos_sin(arange(seqlen_ro), inv_freq)``); same
        shape, same float dtype (any float dtype; upcast to fp32), same device as x.
        ``rotary_dim <= head_dim``. Differentiable (gradients reduced over batch and heads).
    interleaved : bool, default False
        False: GPT-NeoX / Llama pairs ``(i, i + rotary_dim/2)``; True: GPT-J pairs ``(2i, 2i+1)``.
    position_ids : int Tensor (seqlen,) or (batch, seqlen), or None
        Table row of each token, in ``[0, seqlen_ro)``; None means ``arange(seqlen)`` (then
        ``seqlen_ro >= seqlen``). FlashAttention's ``seqlen_offsets`` is ``position_ids = arange(seqlen) + offset``.
    inplace : bool, default False
        True: write the result into ``x`` and return ``x`` (x is modified). With autograd active the result
        is computed into a new buffer and copied into x (the copy is recorded by autograd; x must not be
        a leaf that requires grad, nor a view of one: ValueError). x must not alias itself (no
        ``expand``-ed or overlapping view: ValueError naming x; pass ``x.contiguous()``) and must share
        no memory with cos, sin or position_ids (ValueError naming x and that argument; an exact test,
        ``posattn._checks.shares_memory``; not made while ``torch.compile`` traces, which has no data
        pointers: fullgraph compiles keep working). False: x is not modified; a new contiguous tensor is
        returned.
    backend : {"auto", "triton", "torch", "cuda"}
        "auto": Triton for CUDA tensors, torch for CPU tensors; never "cuda". "cuda": the CUDA C++
        kernel (``csrc/rope.cu`` via ``posattn._cuda.apply_rotary_cuda``; forward, and the backward of
        x through its ``conj`` flag), CUDA tensors in float16/bfloat16/float32 only; **not yet run on a
        GPU**, so only an explicit request uses it.

    Returns
    -------
    Tensor (batch, seqlen, num_heads, head_dim), x's dtype (``x`` itself when ``inplace``).

    Raises
    ------
    TypeError
        Non-tensors, unsupported dtypes (float64 with backend "triton" or "cuda"), cos/sin dtypes that
        differ, non-integer position_ids.
    ValueError
        ``inplace=True`` on a leaf that requires grad (with autograd enabled), on an x whose elements
        share memory (expanded / overlapping view) or on an x that shares memory with cos, sin or
        position_ids;
        wrong ranks or shapes (cos vs sin, rotary_dim > head_dim, position_ids shape), a table too short
        for the tokens (``position_ids`` values outside [0, seqlen_ro), or seqlen_ro < seqlen without
        position_ids), tensors on different devices.
    RuntimeError
        ``backend`` cannot run here (e.g. "cuda" with CPU tensors or without ``posattn._C``).

    Notes
    -----
    RoPE of Su et al. (arXiv 2104.09864); semantics of FlashAttention's ``apply_rotary_emb`` (flash_attn
    ``layers/rotary.py``), with ``position_ids`` in place of ``seqlen_offsets``/``cu_seqlens``. The Triton
    and CUDA kernels are not yet run on a GPU.

    Examples
    --------
    >>> import torch, posattn
    >>> from posattn.reference import rope_cos_sin, rope_inv_freq
    >>> x = torch.randn(2, 5, 3, 8)
    >>> cos, sin = rope_cos_sin(torch.arange(16), rope_inv_freq(8, dtype=torch.float32))
    >>> y = posattn.apply_rotary(x, cos, sin)
    >>> y.shape, torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    (torch.Size([2, 5, 3, 8]), True)
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=4)
    check_tensor("cos", cos, ndim=2)
    check_tensor("sin", sin, ndim=2)
    if not cos.is_floating_point():
        raise TypeError(f"cos: expected a floating dtype, got {dtype_name(cos.dtype)}")
    check_same("sin", sin, "cos", cos)
    check_same("cos", cos, "x", x, dtype=False)
    for n, val in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(val, bool):
            raise TypeError(f"{n}: expected a bool, got {type(val).__name__}")
    base = x if x._base is None else x._base
    if inplace and torch.is_grad_enabled() and base.is_leaf and base.requires_grad:
        raise ValueError(f"x: inplace=True cannot write into a leaf tensor that requires grad (or a view of one); "
                         f"autograd forbids it. Got x{' (a view)' if x is not base else ''} with requires_grad=True: pass "
                         f"inplace=False, a non-leaf x (e.g. the output of a projection), or run under "
                         f"torch.no_grad()")
    d = Dims()
    d.check("x", x, ("batch", "seqlen", "num_heads", "head_dim"))
    if inplace:
        check_no_overlap("x", x)   # torch refuses such a write opaquely, or the kernels write wrong values
    d.check("cos", cos, ("seqlen_ro", "rotary_dim/2"))
    d.check("sin", sin, ("seqlen_ro", "rotary_dim/2"))
    batch, seqlen, _, head_dim = x.shape
    seqlen_ro, half = cos.shape
    if half < 1 or 2 * half > head_dim:
        raise ValueError(f"cos: expected (seqlen_ro, rotary_dim/2) with 1 <= rotary_dim/2 <= head_dim/2={head_dim // 2}, "
                         f"got {tuple(cos.shape)}")
    if position_ids is None:
        if seqlen_ro < seqlen:
            raise ValueError(f"cos: expected seqlen_ro >= seqlen={seqlen} rows (no position_ids given), "
                             f"got {tuple(cos.shape)}")
    else:
        check_tensor("position_ids", position_ids, dtypes=(torch.int32, torch.int64), ndim=(1, 2))
        check_same("position_ids", position_ids, "x", x, dtype=False)
        ok = (position_ids.dim() == 1 and position_ids.shape[0] == seqlen) or (
            position_ids.dim() == 2 and position_ids.shape[0] in (1, batch) and position_ids.shape[1] == seqlen)
        if not ok:
            raise ValueError(f"position_ids: expected (seqlen={seqlen},) or (batch={batch}, seqlen={seqlen}), "
                             f"got {tuple(position_ids.shape)}")
        if position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= seqlen_ro:
                raise ValueError(f"position_ids: expected values in [0, seqlen_ro={seqlen_ro}) (rows of cos/sin), "
                                 f"got values in [{lo}, {hi}]")
    if inplace:   # the write into x must not change what the op reads
        check_disjoint("x", x, {"cos": cos, "sin": sin, "position_ids": position_ids})
    name = _backends.resolve(backend, x.device, supported=_AUTO_BACKENDS if backend == "auto" else _BACKENDS,
                             op="apply_rotary")
    if name in ("triton", "cuda") and x.dtype == torch.float64:
        raise TypeError(f"x: backend={name!r} takes float16, bfloat16 or float32, got float64")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if inplace and not needs_grad:
        _launch(x, cos, sin, position_ids, interleaved, False, name, x)
        return x
    src = x if inplace else dense_for_reading(x)   # overlapping views read densely (inplace: refused above)
    if inplace and (cos.requires_grad or sin.requires_grad):
        # the table gradients need x as it was; x is overwritten below, so the op saves a copy
        # (without it backward failed: "modified by an inplace operation"; tests/test_fuzz_rotary.py)
        src = x.clone()
    out = torch.ops.posattn.apply_rotary(src, cos, sin, position_ids, interleaved, False, name)
    if inplace:
        return x.copy_(out)
    return out
