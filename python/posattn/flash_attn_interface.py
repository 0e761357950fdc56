"""FlashAttention-compatible entry points (names, layout and semantics of ``flash_attn`` 2.x).

``flash_attn_func``, ``flash_attn_qkvpacked_func`` and ``flash_attn_kvpacked_func`` take the
FlashAttention layout (batch, seqlen, heads, head_dim), bottom-right causal alignment and
``window_size``/``softcap``/``alibi_slopes`` as FlashAttention does, plus a ``position=`` keyword that
fuses any ``posattn.positional`` encoding. They share validation, dispatch and autograd with
``posattn.scaled_dot_product_attention`` (``posattn.ops.attention``). Varlen and KV-cache entry points
live with their ops (``posattn.ops.varlen``, ``posattn.ops.decode``).

Differences from flash_attn: float32 and float64 (torch backend) inputs are accepted besides fp16/bf16;
``return_attn_probs=True`` returns ``None`` in place of the debug ``S_dmask``; the dropout RNG differs.
"""
from __future__ import annotations

import torch

from . import positional as _pos
from ._checks import Dims, check_bool, check_float, check_tensor, check_window
from .ops import attention as _attn

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]


def normalize_window(window_size, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """FlashAttention's normalisation, done once: a side at or past ``seqlen_k`` becomes -1 (unbounded);
    ``causal`` sets the right side to 0. Returns (window_left, window_right).

    >>> from posattn.flash_attn_interface import normalize_window
    >>> normalize_window((-1, -1), True, 10)
    (-1, 0)
    >>> normalize_window((12, 3), False, 10)
    (-1, 3)
    """
    left, right = check_window("window_size", window_size)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    return left, right


def _alibi_position(position, alibi_slopes, batch_size, num_heads, device):
    """Fold ``alibi_slopes`` into the position spec as ``ALiBi(alibi_slopes)``."""
    spec = _pos.parse_position(position)
    if alibi_slopes is None:
        return spec
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes: expected device {device} (same as q), got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((num_heads,), (batch_size, num_heads)):
        raise ValueError(f"alibi_slopes: expected (num_heads={num_heads},) or (batch_size={batch_size}, "
                         f"num_heads={num_heads}), got {tuple(alibi_slopes.shape)}")
    if spec.bias is not None:
        raise ValueError(f"alibi_slopes: {spec.names['bias']} already holds an additive bias "
                         f"({type(spec.bias).__name__}); pass ALiBi through one of them")
    names = dict(spec.names)
    names["bias"] = "alibi_slopes"
    return _pos.PositionSpec(spec.rotary, _pos.ALiBi(alibi_slopes), spec.urpe, names)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, position=None,
                    backend="auto"):
    r"""Exact attention in the FlashAttention layout, positional encodings fused in.

    Parameters
    ----------
    q : Tensor (batch_size, seqlen_q, num_heads, head_dim)
        float16, bfloat16 or float32; float64 on ``backend="torch"`` only (the default on CPU; ``out`` in
        full float64 precision, positional tables included, so ``torch.autograd.gradcheck`` holds for ``out``;
        ``softmax_lse`` stays float32 as in FlashAttention, so gradcheck through lse does not; the Triton
        kernels raise TypeError). ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` do not take float64 on
        any backend. Any strides (a last-dim stride other than 1 is copied once for the Triton backend).
    k : Tensor (batch_size, seqlen_k, num_heads_k, head_dim), same dtype/device; num_heads must be a
        multiple of num_heads_k (MQA/GQA: query head h reads kv head ``h // (num_heads // num_heads_k)``).
    v : Tensor (batch_size, seqlen_k, num_heads_k, head_dim_v)
        head_dim_v may differ from head_dim on the torch backend only.
    dropout_p : float in [0, 1], default 0.0
        Dropout on the probabilities (kept ones scaled by ``1/(1-dropout_p)``); the seed is drawn from
        torch's default generator and the mask regenerated identically in backward. Any real number
        (Python, numpy) or 0-d tensor.
    softmax_scale : float or None
        None means ``head_dim ** -0.5`` (1.0 for head_dim 0, where every logit is 0). Any real number
        (Python, numpy) or 0-d tensor.
    causal : bool, default False
        Bottom-right aligned (FlashAttention; a Python or numpy bool, as ``deterministic`` and
        ``return_attn_probs``): query i sees keys ``j <= i + seqlen_k - seqlen_q``::

            seqlen_q=2, seqlen_k=5:   x x x x .
                                      x x x x x
        Rows with no visible key (seqlen_q > seqlen_k) give output 0 and lse -inf.
    window_size : (left, right), default (-1, -1)
        Local attention: keys ``i + off - left <= j <= i + off + right`` with ``off = seqlen_k - seqlen_q``;
        -1 = unbounded. As in FlashAttention, a side ``>= seqlen_k`` is treated as -1, and ``causal``
        sets right to 0. Entries are ints (Python, numpy, or integer 0-d tensors).
    softcap : float >= 0, default 0.0
        0 = off; else the scaled logits become ``softcap * tanh(logits / softcap)`` before any bias
        (Gemma-2 / FlashAttention order).
    alibi_slopes : float32 Tensor (num_heads,) or (batch_size, num_heads), or None
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the logits; same as passing
        ``posattn.positional.ALiBi(alibi_slopes)`` in ``position`` (then ``position`` must not hold
        another additive bias).
    deterministic : bool, default False
        Passed to the Triton backward (deterministic reduction order); the torch backend always is.
    return_attn_probs : bool, default False
        True: return ``(out, softmax_lse, None)``; softmax_lse is fp32 (batch_size, num_heads, seqlen_q),
        natural log, ``-inf`` for fully masked rows. The third item (FlashAttention's debug S_dmask) is
        always None.
    position : positional encoding, list of them, or None (keyword)
        ``posattn.positional`` objects; positions are bottom-right aligned like the causal mask
        (query i at ``i + seqlen_k - seqlen_q``, key j at ``j``).
    backend : {"auto", "triton", "torch"} (keyword)

    Returns
    -------
    out : Tensor (batch_size, seqlen_q, num_heads, head_dim_v), q's dtype (contiguous).
    (out, softmax_lse, None) when ``return_attn_probs``.

    Raises
    ------
    TypeError
        Non-tensors, unsupported or mismatched dtypes, ``alibi_slopes`` not float32.
    ValueError
        Shapes that do not fit (message names the argument with expected vs got), heads not divisible,
        bad ``window_size``/``softcap``/``dropout_p``, a head_dim the chosen backend does not support.
    RuntimeError
        ``backend`` names a backend that cannot run here.
    NotImplementedError
        Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``): reverse mode only. Double
        backward (differentiating the gradients, ``create_graph=True`` then another backward) raises it at
        the second backward.

    Notes
    -----
    Semantics of ``flash_attn.flash_attn_func`` (Dao, arXiv 2205.14135 and 2307.08691). Not yet run on
    a GPU.

    Examples
    --------
    >>> import torch, posattn
    >>> from posattn.positional import RoPE
    >>> q = torch.randn(2, 8, 4, 32); k = torch.randn(2, 12, 2, 32); v = torch.randn(2, 12, 2, 32)
    >>> out, lse, _ = posattn.flash_attn_func(q, k, v, causal=True, position=RoPE(), return_attn_probs=True)
    >>> out.shape, lse.shape, lse.dtype
    (torch.Size([2, 8, 4, 32]), torch.Size([2, 4, 8]), torch.float32)
    """
    _attn._check_qkv(q, k, v)
    d = Dims()
    d.check("q", q, ("batch_size", "seqlen_q", "num_heads", "head_dim"))
    d.check("k", k, ("batch_size", "seqlen_k", "num_heads_k", "head_dim"))
    d.check("v", v, ("batch_size", "seqlen_k", "num_heads_k", "head_dim_v"))
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    if Hk < 1 or H % Hk:
        raise ValueError(f"k: num_heads={H} must be a multiple of num_heads_k, got num_heads_k={Hk} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)}); {_attn.LAYOUT_HINT}")
    dropout_p = check_float("dropout_p", dropout_p, minimum=0.0, maximum=1.0)
    softmax_scale = check_float("softmax_scale", softmax_scale, allow_none=True)
    softmax_scale = _attn.default_scale(D) if softmax_scale is None else softmax_scale
    softcap = check_float("softcap", softcap, minimum=0.0)
    causal = check_bool("causal", causal)
    deterministic = check_bool("deterministic", deterministic)
    return_attn_probs = check_bool("return_attn_probs", return_attn_probs)
    left, right = normalize_window(window_size, causal, Sk)
    causal = causal or (left < 0 and right == 0)  # FlashAttention: window (-1, 0) is causal
    offset = Sk - Sq
    spec = _alibi_position(position, alibi_slopes, B, H, q.device)
    pe = _attn.build_pe(spec, batch_size=B, num_heads=H, seqlen_q=Sq, seqlen_k=Sk, head_dim=D, offset=offset,
                        device=q.device, input_dtype=q.dtype)
    out, lse = _attn.fused_attention(q, k, v, softmax_scale=softmax_scale, causal=causal, offset=offset,
                                     window_left=left, window_right=right, softcap=softcap, pe=pe,
                                     dropout_p=dropout_p, deterministic=deterministic, backend=backend)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              position=None, backend="auto"):
    """``flash_attn_func`` on a packed ``qkv`` (batch_size, seqlen, 3, num_heads, head_dim).

    Same semantics, defaults, returns and errors as ``flash_attn_func`` (FlashAttention's
    ``flash_attn_qkvpacked_func``); q, k and v are strided views of ``qkv`` (no copy), and the gradient
    is one tensor shaped like ``qkv``.

    >>> import torch, posattn
    >>> qkv = torch.randn(1, 6, 3, 2, 16)
    >>> posattn.flash_attn_qkvpacked_func(qkv, causal=True).shape
    torch.Size([1, 6, 2, 16])
    """
    check_tensor("qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected (batch_size, seqlen, 3, num_heads, head_dim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, position=position, backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             position=None, backend="auto"):
    """``flash_attn_func`` with packed ``kv`` (batch_size, seqlen_k, 2, num_heads_k, head_dim).

    Same semantics, defaults, returns and errors as ``flash_attn_func`` (FlashAttention's
    ``flash_attn_kvpacked_func``); k and v are strided views of ``kv``.

    >>> import torch, posattn
    >>> q = torch.randn(1, 3, 4, 16); kv = torch.randn(1, 7, 2, 2, 16)
    >>> posattn.flash_attn_kvpacked_func(q, kv, causal=True).shape
    torch.Size([1, 3, 4, 16])
    """
    check_tensor("kv", kv, ndim=5)
    if kv.shape[2] != 2:
        raise ValueError(f"kv: expected (batch_size, seqlen_k, 2, num_heads_k, head_dim), got {tuple(kv.shape)}")
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, position=position, backend=backend)
