"""Run Hugging Face transformers models on posattn: ``attn_implementation="posattn"``.

Importing this module registers the name ``"posattn"`` (or call ``register()``) in two places of
transformers (5.x; checked with 5.24):

* ``AttentionInterface``: the attention function, ``attention_forward`` below;
* ``AttentionMaskInterface``: the mask builder, ``attention_mask`` below. This half matters: a custom
  name registered only in ``AttentionInterface`` receives **no mask at all** (transformers' mask
  creation exits early for names it has no mask function for), so a padded batch would silently
  attend to its padding. With the mask builder registered, the model's padding mask reaches posattn.

What runs:

* the common masks (plain causal or bidirectional plus padding, the cases FlashAttention gets) arrive
  as the 2-D padding mask (or None when nothing is padded); the batch is then run padding-free:
  ``unpad_input`` -> ``flash_attn_varlen_func`` -> ``pad_input`` (ByteTransformer, arXiv 2210.03052),
  with bottom-right causal alignment per sequence, which is transformers' alignment when decoding
  with a cache;
* any other mask pattern (sliding windows, chunked attention, packed-sequence or custom overlays, or a
  4-D mask passed in by the caller) arrives as transformers' exact 4-D boolean mask (``sdpa_mask``)
  and runs through ``posattn.scaled_dot_product_attention`` on the padded batch: never padding-free,
  but never a silently different mask either.

Padded query rows come out as zeros. ``output_attentions=True`` is not supported (the weights are
never materialised; None is returned with a warning, as transformers' FlashAttention path does).

Example (CPU; ``HF_HUB_OFFLINE=1`` with a local model folder)::

    import posattn.integrations.transformers  # registers "posattn"
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path, attn_implementation="posattn")

>>> import posattn.integrations.transformers as pt
>>> pt.register() == "posattn"
True
"""
from __future__ import annotations

import warnings

import torch

from ..ops.varlen import flash_attn_varlen_func, pad_input, unpad_input

__all__ = ["NAME", "register", "attention_forward", "attention_mask", "set_backend"]

NAME = "posattn"
_STATE = {"backend": "auto"}


def set_backend(backend: str) -> None:
    """Backend used by ``attention_forward`` ("auto", "torch", "triton", "cuda"); default "auto"."""
    from .._checks import check_choice
    from .._backends import BACKENDS
    _STATE["backend"] = check_choice("backend", backend, BACKENDS)


def _plain_mask_functions():
    from transformers import masking_utils as mu
    return (mu.causal_mask_function, mu.bidirectional_mask_function)


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers ``AttentionMaskInterface`` function for ``"posattn"``.

    Returns the 2-D boolean padding mask (batch_size, kv_length) (True = token), or None when nothing
    is padded, for plain causal/bidirectional masks (transformers' ``flash_attention_mask``); for any
    other ``mask_function`` the exact 4-D boolean mask (batch_size, 1, q_length, kv_length) of
    transformers' ``sdpa_mask``, never skipped.
    """
    from transformers import masking_utils as mu
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if mask_function in _plain_mask_functions():
        return mu.flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                       attention_mask, **kwargs)
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                        **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers ``AttentionInterface`` function for ``"posattn"``.

    Parameters
    ----------
    module : the attention module (its ``is_causal`` is used when ``is_causal`` is None).
    query : Tensor (batch, num_heads, q_len, head_dim); key/value (batch, num_heads_k, kv_len, head_dim[_v]).
    attention_mask : what ``attention_mask`` (the mask function above) built: None, 2-D bool
        (batch, kv_len) padding mask, or a 4-D bool/float mask.
    dropout, scaling, sliding_window, softcap, is_causal : transformers' names; sliding_window w means
        keys within w - 1 positions (FlashAttention convention of transformers' FA path).

    Returns
    -------
    (attn_output (batch, q_len, num_heads, head_dim_v), None)
    """
    if kwargs.get("output_attentions", False):
        warnings.warn("posattn does not return attention weights (output_attentions=True); returning None",
                      stacklevel=2)
    if kwargs.get("s_aux") is not None:
        raise ValueError("s_aux: attention sinks are not supported by the posattn attention implementation")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    backend = _STATE["backend"]
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        return _dense(query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, backend), None
    if attention_mask is not None and tuple(attention_mask.shape) != (B, Lk):
        raise ValueError(f"attention_mask: expected a 2-D padding mask (batch_size={B}, kv_len={Lk}) or a 4-D mask, "
                         f"got {tuple(attention_mask.shape)}")
    q = query.transpose(1, 2)  # (B, Lq, H, D)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    window = (-1, -1)
    if sliding_window is not None and Lk > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    if attention_mask is None:
        # nothing padded: equal lengths, still one varlen call (no copies besides the layout change)
        cu_q = torch.arange(0, B * Lq + 1, Lq, dtype=torch.int32, device=query.device)
        cu_k = torch.arange(0, B * Lk + 1, Lk, dtype=torch.int32, device=query.device)
        out = flash_attn_varlen_func(q.reshape(B * Lq, H, -1), k.reshape(B * Lk, *k.shape[2:]),
                                     v.reshape(B * Lk, *v.shape[2:]), cu_q, cu_k, Lq, Lk, dropout_p=dropout,
                                     softmax_scale=scaling, causal=is_causal, window_size=window,
                                     softcap=softcap or 0.0, backend=backend)
        return out.reshape(B, Lq, H, -1), None
    mask = attention_mask.to(device=query.device, dtype=torch.bool)
    k_u, idx_k, cu_k, max_k, _ = unpad_input(k, mask)
    v_u = v.reshape(B * Lk, *v.shape[2:])[idx_k]
    if Lq == Lk:
        idx_q, cu_q, max_q = idx_k, cu_k, max_k
        q_u = q.reshape(B * Lq, H, -1)[idx_q]
    else:  # decoding with a cache: the queries are the last Lq positions of every row
        q_u, idx_q, cu_q, max_q, _ = unpad_input(q, mask[:, -Lq:])
    out_u = flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling,
                                   causal=is_causal, window_size=window, softcap=softcap or 0.0, backend=backend)
    return pad_input(out_u, idx_q, B, Lq), None


def _dense(query, key, value, mask, dropout, scaling, sliding_window, softcap, backend):
    from ..ops.attention import scaled_dot_product_attention
    if softcap:
        raise ValueError("softcap: not supported together with a 4-D attention mask in the posattn implementation")
    # sliding windows are already part of transformers' 4-D mask
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=False,
                                       scale=scaling, enable_gqa=query.shape[1] != key.shape[1], backend=backend)
    return out.transpose(1, 2)


def register(name: str = NAME) -> str:
    """Register ``name`` (default "posattn") in transformers' AttentionInterface and AttentionMaskInterface.

    Idempotent. Returns the name to pass as ``attn_implementation``. Raises ImportError when transformers
    is not installed.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


register()
