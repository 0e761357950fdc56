"""Fused attention with positional encodings: the SDPA drop-in, dispatch, autograd and custom ops.

Layers (docs/INTERNALS.md): the public functions here (``scaled_dot_product_attention``) and in
``posattn.flash_attn_interface`` (``flash_attn_func`` and the packed variants) validate their inputs
once and normalise them to the launcher layout (batch, seqlen, heads, head_dim), then call the
``torch.library`` custom op ``posattn::fused_attention_fwd`` whose autograd formula calls
``posattn::fused_attention_bwd``. Each op runs one backend:

* ``"triton"``: ``posattn.triton_kernels.fused_attention.fused_attention_fwd/_bwd`` (CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``);
* ``"torch"``: ``posattn.ops._attention_torch`` (chunked over queries, fp32 accumulation, memory
  O(chunk x seqlen_k); also runs float64, used for gradcheck).

``backend="auto"`` picks Triton for CUDA tensors and torch for CPU tensors (``_backends.resolve``).
Forward saves ``out`` and ``lse`` (fp32) for backward. The fake (meta) kernels allocate the documented
shapes without reading data, so ``torch.compile(fullgraph=True)`` traces through both ops.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .. import _backends, ops_registry
from .. import positional as _pos
from .._checks import (FLOAT_DTYPES, check_bool, check_float, check_last_dim_contiguous, check_same, check_tensor,
                      dtype_name)
from . import _attention_torch

__all__ = ["scaled_dot_product_attention"]

ops_registry.register("fused_attention", "posattn.ops.attention", ("triton", "torch"))

_PE_TENSORS = ("inv_freq", "position_ids", "phases", "alibi_slopes", "bias_table", "urpe_table")
_PE_SCALARS = ("rotary_mode", "rotary_dim", "interleaved", "rotary_scale", "xpos_scale_base", "bias_mode",
               "max_distance", "num_buckets", "bidirectional", "urpe_max_distance")
# appended to head-count mismatch errors: the most common cause is the other API's layout
LAYOUT_HINT = ("layout: the SDPA drop-in takes (batch, heads, seq, head_dim); flash_attn_func takes "
               "(batch, seq, heads, head_dim)")
# inputs of the forward op that can receive a gradient, in the order of the backward op's outputs
_GRAD_INPUTS = ("q", "k", "v", "attn_mask", "phases", "alibi_slopes", "bias_table", "urpe_table")


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

def _options(softmax_scale, causal, offset, window_left, window_right, softcap, rotary_mode, rotary_dim,
             interleaved, rotary_scale, xpos_scale_base, bias_mode, max_distance, num_buckets, bidirectional,
             urpe_max_distance, dropout_p, seed) -> dict:
    return dict(softmax_scale=softmax_scale, causal=causal, offset=offset, window_left=window_left,
                window_right=window_right, softcap=softcap, rotary_mode=rotary_mode, rotary_dim=rotary_dim,
                interleaved=interleaved, rotary_scale=rotary_scale, xpos_scale_base=xpos_scale_base,
                bias_mode=bias_mode, max_distance=max_distance, num_buckets=num_buckets,
                bidirectional=bidirectional, urpe_max_distance=urpe_max_distance, dropout_p=dropout_p, seed=seed)


def _kernel_pe(o: dict, pe_tensors: dict):
    fields = {n: o[n] for n in _PE_SCALARS}
    fields.update(pe_tensors)
    return _pos.KernelPE(**fields)


def _launcher():
    from ..triton_kernels import fused_attention  # noqa: WPS433 (import on first Triton call)
    return fused_attention


def _triton_kwargs(o: dict, pe_tensors: dict, attn_mask):
    return dict(softmax_scale=o["softmax_scale"], causal=o["causal"], offset=o["offset"],
                window_left=o["window_left"], window_right=o["window_right"], softcap=o["softcap"],
                pe=_kernel_pe(o, pe_tensors), attn_mask=attn_mask, dropout_p=o["dropout_p"], seed=o["seed"])


def _expand_mask(attn_mask, q, k):
    """The launcher takes a mask viewed as (batch, heads, seqlen_q, seqlen_k) with stride 0 where broadcast."""
    if attn_mask is None:
        return None
    return attn_mask.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


@torch.library.custom_op("posattn::fused_attention_fwd", mutates_args=())
def _fused_attention_fwd_op(
        q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
        inv_freq: Optional[Tensor], position_ids: Optional[Tensor], phases: Optional[Tensor],
        alibi_slopes: Optional[Tensor], bias_table: Optional[Tensor], urpe_table: Optional[Tensor],
        softmax_scale: float, causal: bool, offset: int, window_left: int, window_right: int, softcap: float,
        rotary_mode: int, rotary_dim: int, interleaved: bool, rotary_scale: float, xpos_scale_base: float,
        bias_mode: int, max_distance: int, num_buckets: int, bidirectional: bool, urpe_max_distance: int,
        dropout_p: float, seed: int, deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    """out (batch, seqlen_q, heads, head_dim_v) in q's dtype, lse fp32 (batch, heads, seqlen_q)."""
    o = _options(softmax_scale, causal, offset, window_left, window_right, softcap, rotary_mode, rotary_dim,
                 interleaved, rotary_scale, xpos_scale_base, bias_mode, max_distance, num_buckets, bidirectional,
                 urpe_max_distance, dropout_p, seed)
    pe = dict(inv_freq=inv_freq, position_ids=position_ids, phases=phases, alibi_slopes=alibi_slopes,
              bias_table=bias_table, urpe_table=urpe_table)
    if backend == "torch":
        return _attention_torch.attention_torch_fwd(q, k, v, attn_mask, o=o, **pe)
    B, Sq, H, _ = q.shape
    out = torch.empty((B, Sq, H, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    _launcher().fused_attention_fwd(q, k, v, out, lse, **_triton_kwargs(o, pe, _expand_mask(attn_mask, q, k)))
    return out, lse


@_fused_attention_fwd_op.register_fake
def _(q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, urpe_table, *args):
    B, Sq, H, _ = q.shape
    return (q.new_empty((B, Sq, H, v.shape[3])), q.new_empty((B, H, Sq), dtype=torch.float32))


def _empty():
    return torch.empty(0)


@torch.library.custom_op("posattn::fused_attention_bwd", mutates_args=())
def _fused_attention_bwd_op(
        dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        attn_mask: Optional[Tensor],
        inv_freq: Optional[Tensor], position_ids: Optional[Tensor], phases: Optional[Tensor],
        alibi_slopes: Optional[Tensor], bias_table: Optional[Tensor], urpe_table: Optional[Tensor],
        softmax_scale: float, causal: bool, offset: int, window_left: int, window_right: int, softcap: float,
        rotary_mode: int, rotary_dim: int, interleaved: bool, rotary_scale: float, xpos_scale_base: float,
        bias_mode: int, max_distance: int, num_buckets: int, bidirectional: bool, urpe_max_distance: int,
        dropout_p: float, seed: int, deterministic: bool, backend: str,
        needs: List[bool]) -> List[Tensor]:
    """Gradients for _GRAD_INPUTS (q, k, v, attn_mask, phases, alibi_slopes, bias_table, urpe_table);
    an input that needs no gradient gets an empty (0,) tensor."""
    o = _options(softmax_scale, causal, offset, window_left, window_right, softcap, rotary_mode, rotary_dim,
                 interleaved, rotary_scale, xpos_scale_base, bias_mode, max_distance, num_buckets, bidirectional,
                 urpe_max_distance, dropout_p, seed)
    pe = dict(inv_freq=inv_freq, position_ids=position_ids, phases=phases, alibi_slopes=alibi_slopes,
              bias_table=bias_table, urpe_table=urpe_table)
    need = dict(zip(_GRAD_INPUTS, needs))
    src = dict(q=q, k=k, v=v, attn_mask=attn_mask, phases=phases, alibi_slopes=alibi_slopes,
               bias_table=bias_table, urpe_table=urpe_table)
    for n in _GRAD_INPUTS:  # nothing to differentiate: absent, integer or bool tensors
        need[n] = bool(need[n]) and src[n] is not None and src[n].is_floating_point()
    if dlse is not None and not bool(dlse.any()):
        dlse = None
    if backend == "torch":
        g = _attention_torch.attention_torch_bwd(dout, dlse, q, k, v, out, lse, attn_mask, o=o, need=need, **pe)
    else:
        if dlse is not None:
            raise RuntimeError("backend='triton': a gradient flowing into softmax_lse is not supported by the "
                               "Triton backward; use backend='torch' to differentiate through lse")
        bad = [n for n in ("attn_mask", "alibi_slopes") if need[n]]
        if bad:  # caught at the forward call already; kept as a guard against silent zero gradients
            raise RuntimeError(f"backend='triton': no gradient for {', '.join(bad)}; use backend='torch'")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_tab = torch.zeros_like(bias_table, dtype=torch.float32) if need["bias_table"] else None
        d_urpe = torch.zeros_like(urpe_table, dtype=torch.float32) if need["urpe_table"] else None
        d_ph = torch.zeros_like(phases, dtype=torch.float32) if need["phases"] else None
        kw = _triton_kwargs(o, pe, _expand_mask(attn_mask, q, k))
        # the kernels read dO's head dim with unit stride: out.sum().backward() hands an expanded dO (stride 0
        # everywhere), which read as unit-stride rows gave garbage gradients; copied once when needed
        dout = check_last_dim_contiguous("dout", dout)
        _launcher().fused_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, **kw, d_bias_table=d_tab,
                                        d_urpe_table=d_urpe, d_phases=d_ph, deterministic=deterministic)
        g = dict(q=dq, k=dk, v=dv, attn_mask=None, alibi_slopes=None,
                 bias_table=None if d_tab is None else d_tab.to(bias_table.dtype),
                 urpe_table=None if d_urpe is None else d_urpe.to(urpe_table.dtype),
                 phases=None if d_ph is None else d_ph.to(phases.dtype))
    res = []
    for n in _GRAD_INPUTS:
        t = g.get(n) if need[n] else None
        res.append(t if t is not None else q.new_empty((0,)))
    return res


@_fused_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
      urpe_table, *args):
    needs = args[-1]
    src = [q, k, v, attn_mask, phases, alibi_slopes, bias_table, urpe_table]
    return [torch.empty_like(t) if (nd and t is not None and t.is_floating_point()) else q.new_empty((0,))
            for nd, t in zip(needs, src)]


# forward-op input positions of the tensors that get gradients
_FWD_INDEX = {"q": 0, "k": 1, "v": 2, "attn_mask": 3, "phases": 6, "alibi_slopes": 7, "bias_table": 8,
              "urpe_table": 9}
_NUM_FWD_INPUTS = 30


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.save_for_backward(*inputs[:10], out, lse)
    ctx.scalars = inputs[10:]


def _backward(ctx, dout, dlse):
    q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, urpe_table, out, lse = \
        ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[_FWD_INDEX[n]]) for n in _GRAD_INPUTS]
    grads = torch.ops.posattn.fused_attention_bwd(
        dout, dlse, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
        urpe_table, *ctx.scalars, needs)
    res = [None] * _NUM_FWD_INPUTS
    for n, g, nd in zip(_GRAD_INPUTS, grads, needs):
        if nd:  # the backward op returns a real gradient for every float input that needs one
            res[_FWD_INDEX[n]] = g
    return tuple(res)


_fused_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)

DOUBLE_BACKWARD_MSG = ("posattn attention does not support double backward (differentiating its gradients, e.g. "
                       "torch.autograd.grad(..., create_graph=True) followed by another backward): its backward is "
                       "a fused kernel without a derivative of its own")
FORWARD_AD_MSG = ("posattn attention supports reverse-mode autograd only (loss.backward(), torch.autograd.grad); "
                  "forward-mode AD (torch.func.jvp, torch.autograd.forward_ad, jacfwd) "
                  "is not implemented: {arg} carries a forward-mode tangent")


def _double_backward(ctx, *grads):
    raise NotImplementedError(DOUBLE_BACKWARD_MSG)


# Without a formula torch raises "no autograd formula was registered" only at the second backward; with this one
# the message names the limitation (the first-order gradients, create_graph or not, are unchanged).
_fused_attention_bwd_op.register_autograd(_double_backward)


def reject_forward_ad(**tensors) -> None:
    """Raise NotImplementedError when any of ``tensors`` (name -> Tensor or None) carries a forward-mode AD
    tangent (``torch.autograd.forward_ad`` dual tensor, or a ``torch.func.jvp`` input).

    The custom ops have a reverse-mode formula only; forward mode would otherwise run them on the primal values
    and return a zero tangent without an error (torch's SDPA raises too)."""
    if torch.compiler.is_compiling():   # traced graphs: forward-mode AD is not traced through custom ops either
        return
    unpack = torch.autograd.forward_ad.unpack_dual
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and unpack(t).tangent is not None:
            raise NotImplementedError(FORWARD_AD_MSG.format(arg=name))


def default_scale(head_dim: int) -> float:
    """``head_dim ** -0.5``; 1.0 for head_dim 0 (the logits are 0 whatever the scale, as in torch's SDPA)."""
    return head_dim ** -0.5 if head_dim > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# Shared front half of every public entry point
# ---------------------------------------------------------------------------------------------

def _check_qkv(q, k, v, names=("q", "k", "v"), allow_fp64=True):
    """Types, dtypes, devices of q/k/v. fp16/bf16/fp32 (and fp64 for the torch backend)."""
    dts = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    check_tensor(names[0], q, dtypes=dts)
    for n, t in zip(names[1:], (k, v)):
        check_tensor(n, t)
        check_same(n, t, names[0], q)


def _draw_seed(dropout_p: float) -> int:
    """Dropout seed from torch's default generator (torch.manual_seed reproduces a call); 0 without dropout."""
    if dropout_p <= 0:
        return 0
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())


def _check_backend_support(backend: str, q, k, v, attn_mask, pe, dropout_p, name_q="q", name_v="v"):
    """Limits of the Triton kernels, checked before launching (ValueError naming the argument)."""
    if backend != "triton":
        return
    if q.dtype == torch.float64:
        raise TypeError(f"{name_q}: backend='triton' takes float16, bfloat16 or float32, got {dtype_name(q.dtype)} "
                        f"(float64 runs on backend='torch')")
    # triton_kernels/fused_attention.py: head dims 16..256 (padded to a power of two inside), dropout_p < 1
    for n, t in ((name_q, q), (name_v, v)):
        if not 16 <= t.shape[-1] <= 256:
            raise ValueError(f"{n}: backend='triton' supports head_dim in [16, 256], got {t.shape[-1]} "
                             f"(shape {tuple(t.shape)}); backend='torch' takes any")
    if dropout_p >= 1.0:
        raise ValueError(f"dropout_p: backend='triton' takes dropout_p in [0, 1), got {dropout_p}")
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad:
        raise ValueError("attn_mask: backend='triton' computes no gradient for a float mask that requires grad; "
                         "use backend='torch' or detach the mask")
    if pe is not None and pe.alibi_slopes is not None and pe.alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes: backend='triton' computes no gradient for ALiBi slopes that require grad; "
                         "use backend='torch' or detach the slopes")


def fused_attention(q, k, v, *, attn_mask=None, softmax_scale: float, causal: bool, offset: int,
                    window_left: int = -1, window_right: int = -1, softcap: float = 0.0, pe=None,
                    dropout_p: float = 0.0, deterministic: bool = False, backend: str = "auto",
                    name_q: str = "q", name_v: str = "v"):
    """Validated core shared by the public entry points (not public).

    q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, heads_k, head_dim[_v]) with heads % heads_k == 0,
    attn_mask None or 4-D broadcastable to (batch, heads, seqlen_q, seqlen_k), pe a ``KernelPE`` or None.
    Returns (out (batch, seqlen_q, heads, head_dim_v), lse fp32 (batch, heads, seqlen_q)).
    """
    op = "scaled_dot_product_attention" if name_q == "query" else "flash_attn_func"
    name = _backends.resolve(backend, q.device, supported=("triton", "torch"), op=op)
    _check_backend_support(name, q, k, v, attn_mask, pe, dropout_p, name_q=name_q, name_v=name_v)
    if name == "triton":
        from .._checks import check_last_dim_contiguous
        q, k, v = (check_last_dim_contiguous(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    pe = pe if pe is not None else _pos.KernelPE()
    reject_forward_ad(**{name_q: q, "k" if name_q == "q" else "key": k, name_v: v, "attn_mask": attn_mask},
                      **{n: getattr(pe, n) for n in _PE_TENSORS})
    seed = _draw_seed(dropout_p)
    out, lse = torch.ops.posattn.fused_attention_fwd(
        q, k, v, attn_mask, *(getattr(pe, n) for n in _PE_TENSORS),
        float(softmax_scale), bool(causal), int(offset), int(window_left), int(window_right), float(softcap),
        *(getattr(pe, n) for n in _PE_SCALARS), float(dropout_p), seed, bool(deterministic), name)
    return out, lse


def build_pe(position, *, batch_size, num_heads, seqlen_q, seqlen_k, head_dim, offset, device,
             input_dtype=None):
    """KernelPE for ``position`` (None when there is nothing to fuse).

    ``input_dtype`` is q's dtype: float64 inputs (torch backend only) get float64 tables, slopes and
    phases, so the torch backend keeps full precision; every other dtype gets the kernels' fp32."""
    if position is None:
        return None
    spec = _pos.parse_position(position)
    if not spec:
        return None
    dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    return _pos.kernel_args(spec, batch_size=batch_size, num_heads=num_heads, seqlen_q=seqlen_q,
                            seqlen_k=seqlen_k, head_dim=head_dim, offset=offset, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

def _broadcast(arg, shapes, what):
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ValueError(f"{arg}: {what} {tuple(shapes[1])} do not broadcast with query's "
                         f"{tuple(shapes[0])}") from None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, position=None, backend="auto"):
    r"""Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with positional encodings fused in.

    Computes ``softmax(scale * rot(q) rot(k)^T + bias + mask) [* urpe] @ v`` without ever materialising
    an N x N positional bias. Semantics are torch's (PyTorch 2.5+ ``scaled_dot_product_attention``) for
    every argument torch has, with two documented differences: a fully masked query row gives 0 (torch's
    backends give 0 or NaN depending on the backend), and ``attn_mask`` together with ``is_causal=True``
    is an error (torch documents it as one; some torch backends accept it).

    Parameters
    ----------
    query : Tensor (..., num_heads, seqlen_q, head_dim)
        torch's layout: ``(batch, heads, seq, head_dim)``; also unbatched ``(heads, seq, head_dim)``,
        ``(seq, head_dim)``, or any number of leading batch dims (broadcast between query, key and
        value as torch does; broadcast inputs with more than one leading batch dim are copied once).
        float16, bfloat16 or float32 (float64 on ``backend="torch"``: the output in float64 precision, so
        ``torch.autograd.gradcheck`` holds); any strides, including expanded or overlapping views (copied
        where a fused CPU kernel would misread them).
    key : Tensor (..., num_heads_k, seqlen_k, head_dim), same dtype and device as query.
    value : Tensor (..., num_heads_k, seqlen_k, head_dim_v), same dtype and device as query.
    attn_mask : Tensor or None
        Broadcastable to ``(..., num_heads, seqlen_q, seqlen_k)`` (at least 2-D, not more dims than the
        output). bool: True = attend; float (float32 or query's dtype): added to the logits after the
        positional bias. Differentiable (float) on ``backend="torch"``. None: no mask.
    dropout_p : float in [0, 1], default 0.0
        Dropout on the attention probabilities, kept ones scaled by ``1/(1-dropout_p)`` (any real number,
        Python or numpy, or a 0-d tensor, as ``scale``). The mask comes from a seed drawn from torch's
        default generator (``torch.manual_seed`` reproduces it) and is regenerated identically in backward.
        The torch and Triton backends draw different masks.
    is_causal : bool, default False
        Top-left causal mask (torch; a Python or numpy bool, as ``enable_gqa``): query i sees keys ``j <= i``::

            seqlen_q=3, seqlen_k=5:   x . . . .
                                      x x . . .
                                      x x x . .
    scale : float or None
        Logit scale; None means ``head_dim ** -0.5`` (1.0 for head_dim 0: every logit is then 0 and each
        row averages the values of its visible keys, as torch's SDPA).
    enable_gqa : bool, default False
        Grouped-query attention: num_heads must be a multiple of num_heads_k, and query head h reads kv
        head ``h // (num_heads // num_heads_k)``. Without it, head counts must match or broadcast (1).
    position : positional encoding, list of them, or None (keyword)
        ``posattn.positional`` objects (RoPE, XPos, LearnedPhaseRoPE, ALiBi, RelativeBias, T5Bias, URPE;
        at most one rotary, one additive bias, one URPE). Query row i sits at position ``i`` and key j at
        ``j`` (top-left, as the causal mask). None: plain attention, equal to torch's result.
    backend : {"auto", "triton", "torch"} (keyword)
        "auto": Triton for CUDA tensors, torch for CPU tensors. An explicit backend that cannot run here
        raises RuntimeError.

    Returns
    -------
    Tensor (..., num_heads, seqlen_q, head_dim_v), query's dtype. It may be a transposed view of a
    ``(batch, seqlen_q, heads, head_dim_v)`` buffer (strides differ from torch's, values do not).

    Raises
    ------
    TypeError
        Non-tensor inputs, unsupported or mismatched dtypes, a mask dtype other than bool / float32 /
        query's dtype.
    ValueError
        Mismatched shapes or devices (naming ``key``, ``value`` or ``attn_mask``), heads not divisible
        under ``enable_gqa``, a mask that does not broadcast, ``attn_mask`` with ``is_causal``,
        ``dropout_p`` outside [0, 1], a positional table that does not fit, a head_dim the chosen
        backend does not support.
    RuntimeError
        ``backend`` names a backend that cannot run on these tensors.
    NotImplementedError
        Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``), like torch's SDPA: posattn
        supports reverse-mode autograd only. Double backward (differentiating the gradients,
        ``create_graph=True`` then another backward) raises it at the second backward.

    Notes
    -----
    Source: the semantics of ``torch.nn.functional.scaled_dot_product_attention``; online softmax of
    FlashAttention (arXiv 2205.14135); positional encodings as in ``posattn.positional``. Not yet run on
    a GPU.

    Examples
    --------
    >>> import torch, posattn
    >>> from posattn.positional import ALiBi
    >>> q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
    >>> out = posattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    True
    >>> posattn.scaled_dot_product_attention(q, k, v, position=ALiBi()).shape
    torch.Size([2, 4, 16, 32])
    """
    _check_qkv(query, key, value, names=("query", "key", "value"))
    for n, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{n}: expected at least 2 dims (..., seq, head_dim), got shape {tuple(t.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key: expected head_dim={query.shape[-1]} (query's last dim), got shape {tuple(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value: expected seqlen_k={key.shape[-2]} (key's dim -2), got shape {tuple(value.shape)}")
    is_causal = check_bool("is_causal", is_causal)
    enable_gqa = check_bool("enable_gqa", enable_gqa)
    dropout_p = check_float("dropout_p", dropout_p, minimum=0.0, maximum=1.0)
    scale = check_float("scale", scale, allow_none=True)
    head_dim = query.shape[-1]
    softmax_scale = default_scale(head_dim) if scale is None else scale

    in_ndim = max(query.dim(), key.dim(), value.dim())
    nd = max(in_ndim, 3)
    q_, k_, v_ = (t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    hq, hk, hv = q_.shape[-3], k_.shape[-3], v_.shape[-3]
    shapes = {"query": tuple(query.shape), "key": tuple(key.shape), "value": tuple(value.shape)}
    if enable_gqa:
        for n, h in (("key", hk), ("value", hv)):
            if h < 1 or hq % h:
                raise ValueError(f"{n}: enable_gqa=True needs num_heads={hq} (query) to be a multiple of "
                                 f"num_heads_k, got num_heads_k={h} (query {shapes['query']}, {n} {shapes[n]}); "
                                 f"{LAYOUT_HINT}")
        heads = hq
        if hk != hv:  # one kv head count for the kernels: repeat the one with fewer heads (copy)
            hmax = max(hk, hv)
            k_ = k_.repeat_interleave(hmax // hk, dim=-3) if hk != hmax else k_
            v_ = v_.repeat_interleave(hmax // hv, dim=-3) if hv != hmax else v_
    else:
        for n, h in (("key", hk), ("value", hv)):
            if h != hq and h != 1 and hq != 1:  # neither equal nor broadcast
                gqa = " pass enable_gqa=True for grouped-query attention;" if h >= 1 and hq % h == 0 else ""
                raise ValueError(f"{n}: num_heads_k={h} differs from query's num_heads={hq} and does not broadcast "
                                 f"(query {shapes['query']}, {n} {shapes[n]});{gqa} {LAYOUT_HINT}")
        heads = _broadcast("key", [(hq,), (hk,), (hv,)], "num_heads of key/value")[0]
    bshape = _broadcast("key", [q_.shape[:-3], k_.shape[:-3], v_.shape[:-3]], "batch dims of key/value")
    seqlen_q, seqlen_k = q_.shape[-2], k_.shape[-2]
    hkv = k_.shape[-3] if enable_gqa else heads
    q4 = q_.expand(bshape + (heads,) + q_.shape[-2:])
    k4 = k_.expand(bshape + (hkv,) + k_.shape[-2:])
    v4 = v_.expand(bshape + (hkv,) + v_.shape[-2:])
    nb = math.prod(bshape)
    q4, k4, v4 = (t.reshape((nb,) + tuple(t.shape[-3:])) for t in (q4, k4, v4))

    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask: expected None when is_causal=True (pass one or the other), got a tensor")
        check_tensor("attn_mask", attn_mask, dtypes=dict.fromkeys((torch.bool, torch.float32, query.dtype)))
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device} (same as query), got {attn_mask.device}")
        full = bshape + (heads, seqlen_q, seqlen_k)
        if attn_mask.dim() < 2 or attn_mask.dim() > len(full):
            raise ValueError(f"attn_mask: expected 2 to {len(full)} dims broadcastable to {full}, "
                             f"got shape {tuple(attn_mask.shape)}")
        try:
            ok = tuple(torch.broadcast_shapes(attn_mask.shape, full)) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask: expected a shape broadcastable to {full}, got {tuple(attn_mask.shape)}")
        m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
        if len(bshape) != 1:  # fold the batch dims into one (copies only a mask broadcast over some of them)
            m = m.expand(bshape + tuple(m.shape[-3:])).reshape((nb,) + tuple(m.shape[-3:]))
        attn_mask = m

    pe = build_pe(position, batch_size=nb, num_heads=heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                  head_dim=head_dim, offset=0, device=query.device, input_dtype=query.dtype)
    out, _ = fused_attention(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), attn_mask=attn_mask,
                             softmax_scale=softmax_scale, causal=is_causal, offset=0, pe=pe,
                             dropout_p=dropout_p, backend=backend, name_q="query", name_v="value")
    out = out.transpose(1, 2)  # (nb, heads, seqlen_q, head_dim_v)
    out = out.reshape(bshape + tuple(out.shape[1:]))
    if in_ndim == 2:
        out = out.reshape(out.shape[-2:])
    return out


from ..flash_attn_interface import (  # noqa: E402  (defined on top of the core above)
    flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func)

__all__ += ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]
