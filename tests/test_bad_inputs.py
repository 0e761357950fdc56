"""A catalogue of bad inputs across posattn's public API.

Each case calls one public function with one thing wrong and expects a ValueError or TypeError whose message
names the argument (``match``), never a crash, hang or silent result. Every tensor passed in is snapshotted and
must be bit-identical after the call (an op must not modify its inputs, even when it refuses them; the KV
cache is checked too, since validation must run before any append).
"""
import pytest
import torch

import posattn
import posattn.scheduling
from posattn import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE
from fuzz_helpers import assert_unchanged, snapshot

f16, i32, i64 = torch.float16, torch.int32, torch.int64


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _cu(*vals, dtype=i32):
    return torch.tensor(vals, dtype=dtype)


def _fa(**over):
    a = dict(q=r(1, 5, 2, 16), k=r(1, 7, 1, 16), v=r(1, 7, 1, 16))
    a.update(over)
    return a


def _sdpa(**over):
    a = dict(query=r(1, 2, 5, 16), key=r(1, 2, 7, 16), value=r(1, 2, 7, 16))
    a.update(over)
    return a


def _varlen(**over):
    a = dict(q=r(6, 2, 16), k=r(6, 2, 16), v=r(6, 2, 16), cu_seqlens_q=_cu(0, 2, 6), cu_seqlens_k=_cu(0, 2, 6),
             max_seqlen_q=4, max_seqlen_k=4)
    a.update(over)
    return a


def _kv(**over):
    a = dict(q=r(2, 1, 4, 16), k_cache=r(2, 8, 2, 16), v_cache=r(2, 8, 2, 16), k=r(2, 1, 2, 16),
             v=r(2, 1, 2, 16), cache_seqlens=_cu(3, 5))
    a.update(over)
    return a


def _rot(**over):
    a = dict(x=r(2, 5, 3, 8), cos=r(8, 4), sin=r(8, 4))
    a.update(over)
    return a


def _krpe(**over):
    a = dict(q=r(1, 2, 6, 8), k=r(1, 2, 6, 8), v=r(1, 2, 6, 8), rpe_bias=r(2, 11))
    a.update(over)
    return a


def _unfolded(*shape):
    """A view whose elements overlap (windows of an unfold, stride 1 between neighbours): (..., last)."""
    n = 1
    for d in shape[:-1]:
        n *= d
    return torch.randn(n + shape[-1]).unfold(0, shape[-1], 1)[:n].view(*shape)


def _paged_shared(**over):
    """Two sequences whose appends (cache_seqlens 2 and 2, page 4) land in the same slot of shared page 0."""
    a = dict(q=r(2, 1, 4, 16), k_cache=r(3, 4, 2, 16), v_cache=r(3, 4, 2, 16), k=r(2, 1, 2, 16), v=r(2, 1, 2, 16),
             cache_seqlens=_cu(2, 2), block_table=torch.tensor([[0, 1], [0, 2]], dtype=i32))
    a.update(over)
    return a


def _kv_out_sharing(name):
    """_kv() with ``out`` and the argument ``name`` carved from one buffer (overlapping, valid values); name None:
    ``out`` alone (the caller adds what shares it)."""
    a = _kv()
    out = torch.zeros(2, 1, 4, 16)
    flat, ints = out.view(-1), out.view(i32).view(-1)
    if name == "q":
        a["q"] = out.view(2, 1, 4, 16)                            # the same memory, another tensor object
    elif name in ("k_cache", "v_cache"):
        a[name] = torch.zeros(2, 8, 2, 16)
        out = a[name].view(-1)[128:256].view(2, 1, 4, 16)         # slots 4-7 of cache row 0
    elif name == "k":
        a["k"] = out[:, :, 2:]                                    # (2, 1, 2, 16): heads 2-3 of out
    elif name == "rotary_cos":
        a["rotary_cos"], a["rotary_sin"] = flat[64:128].view(8, 8), r(8, 8)
    elif name == "alibi_slopes":
        a["alibi_slopes"] = flat[60:64]
    elif name == "cache_seqlens":
        ints[6:8] = torch.tensor([3, 5], dtype=i32)               # int32 inside a float32 buffer
        a["cache_seqlens"] = ints[6:8]
    elif name == "cache_batch_idx":
        ints[10:12] = torch.tensor([1, 0], dtype=i32)
        a["cache_batch_idx"] = ints[10:12]
    a["out"] = out
    return a


def _kv_cache_sharing(cache, name):
    """_kv() (appending) with the written ``cache`` sharing memory with the argument ``name``."""
    a = _kv()
    c = a[cache]                                                  # (2, 8, 2, 16); the appends hit slots 3 and 5
    if name == "cache":                                           # both caches are one tensor
        a["k_cache"] = a["v_cache"] = c
    elif name == "packed_same_half":                              # a packed buffer, both caches its half 0
        kv = r(2, 8, 2, 2, 16)
        a["k_cache"], a["v_cache"] = kv[:, :, 0], kv[:, :, 0]
    elif name == "q":
        a["q"] = c.as_strided((2, 1, 4, 16), (256, 64, 16, 1))   # slots 0-1 of each row, read as q
    elif name in ("k", "v"):
        a[name] = c[:, 6:7]
    elif name == "rotary_sin":
        a["rotary_cos"], a["rotary_sin"] = r(8, 8), c[1, 4:8].reshape(-1)[:64].view(8, 8)
    elif name == "alibi_slopes":
        a["alibi_slopes"] = c[0, 7, 1, :4]
    elif name == "block_table":                                   # a paged cache whose page ids live in it
        a = _kv(k_cache=r(4, 4, 2, 16), v_cache=r(4, 4, 2, 16), cache_seqlens=_cu(2, 1))
        ints = a[cache].view(i32).view(-1)
        ints[-4:] = torch.tensor([0, 1, 2, 3], dtype=i32)
        a["block_table"] = ints[-4:].view(2, 2)
    elif name == "cache_leftpad":
        ints = c.view(i32).view(-1)
        ints[-2:] = torch.tensor([1, 2], dtype=i32)
        a["cache_leftpad"] = ints[-2:]
    return a


def _rot_sharing(name):
    """_rot() with x (written in place) sharing memory with cos, sin or position_ids."""
    a = _rot()
    flat = a["x"].view(-1)
    if name == "position_ids":
        ints = a["x"].view(i32).view(-1)
        ints[-5:] = torch.arange(5, dtype=i32)
        a["position_ids"] = ints[-5:]
    else:
        a[name] = flat[:32].view(8, 4) if name == "cos" else flat[100:132].view(8, 4)
    return dict(a, inplace=True)


def _codes(*shape):
    return torch.randint(0, 2, shape).float() * 2 - 1


def _eco(**over):
    c = _codes(1, 2, 6, 16)
    a = dict(q_codes=c, k_codes=c.clone(), v=r(1, 2, 6, 8))
    a.update(over)
    return a


F = posattn
# (id, function, kwargs factory, expected exception, regex the message must match (the argument's name))
CASES = [
    # --- scaled_dot_product_attention
    ("sdpa_query_not_tensor", F.scaled_dot_product_attention, lambda: _sdpa(query=[1.0]), TypeError, "query"),
    ("sdpa_int_query", F.scaled_dot_product_attention, lambda: _sdpa(query=torch.ones(1, 2, 5, 16, dtype=i64)),
     TypeError, "query"),
    ("sdpa_key_dtype_mismatch", F.scaled_dot_product_attention, lambda: _sdpa(key=r(1, 2, 7, 16, dtype=f16)),
     TypeError, "key"),
    ("sdpa_query_1d", F.scaled_dot_product_attention, lambda: _sdpa(query=r(16)), ValueError, "query"),
    ("sdpa_key_head_dim", F.scaled_dot_product_attention, lambda: _sdpa(key=r(1, 2, 7, 8)), ValueError, "key"),
    ("sdpa_value_seqlen", F.scaled_dot_product_attention, lambda: _sdpa(value=r(1, 2, 6, 16)), ValueError, "value"),
    ("sdpa_heads_no_gqa", F.scaled_dot_product_attention,
     lambda: _sdpa(query=r(1, 4, 5, 16), key=r(1, 2, 7, 16), value=r(1, 2, 7, 16)), ValueError, "key"),
    ("sdpa_gqa_not_divisible", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(query=r(1, 3, 5, 16), key=r(1, 2, 7, 16), value=r(1, 2, 7, 16)), enable_gqa=True),
     ValueError, "key"),
    ("sdpa_mask_not_broadcastable", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError, "attn_mask"),
    ("sdpa_mask_int_dtype", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), attn_mask=torch.ones(5, 7, dtype=i32)), TypeError, "attn_mask"),
    ("sdpa_mask_with_causal", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), ValueError, "attn_mask"),
    ("sdpa_negative_dropout", F.scaled_dot_product_attention, lambda: dict(_sdpa(), dropout_p=-0.1),
     ValueError, "dropout_p"),
    ("sdpa_dropout_above_one", F.scaled_dot_product_attention, lambda: dict(_sdpa(), dropout_p=1.5),
     ValueError, "dropout_p"),
    ("sdpa_nan_scale", F.scaled_dot_product_attention, lambda: dict(_sdpa(), scale=float("nan")), ValueError, "scale"),
    ("sdpa_is_causal_not_bool", F.scaled_dot_product_attention, lambda: dict(_sdpa(), is_causal=1), TypeError,
     "is_causal"),
    ("sdpa_unknown_backend", F.scaled_dot_product_attention, lambda: dict(_sdpa(), backend="cudnn"), ValueError,
     "backend"),
    ("sdpa_position_not_encoding", F.scaled_dot_product_attention, lambda: dict(_sdpa(), position="rope"),
     TypeError, "position"),
    ("sdpa_two_rotaries", F.scaled_dot_product_attention, lambda: dict(_sdpa(), position=[RoPE(), F.XPos()]),
     ValueError, r"position\[1\]"),
    ("sdpa_relative_table_wrong_heads", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), position=RelativeBias(r(3, 9), max_distance=4)), ValueError, "table"),
    ("sdpa_t5_table_one_head", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), position=T5Bias(r(32, 1))), ValueError, "table"),
    ("sdpa_urpe_table_wrong_heads", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), position=URPE(torch.ones(1, 5), max_distance=2)), ValueError, "table"),
    ("sdpa_alibi_slopes_wrong_heads", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), position=ALiBi(torch.ones(3))), ValueError, "slopes"),
    ("sdpa_phase_freqs_wrong_seqlen", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), position=LearnedPhaseRoPE(torch.full((1, 2, 6), 0.5))), ValueError, "freqs"),
    ("sdpa_rope_position_ids_wrong_len", F.scaled_dot_product_attention,
     lambda: dict(_sdpa(), position=RoPE(position_ids=torch.arange(3))), ValueError, "position_ids"),
    # --- positional encodings (constructors)
    ("rope_odd_rotary_dim", lambda: RoPE(rotary_dim=5), dict, ValueError, "rotary_dim"),
    ("rope_bad_scaling_type", lambda: RoPE(scaling={"type": "magic", "factor": 2.0}), dict, ValueError, "scaling"),
    ("rope_float_position_ids", lambda: RoPE(position_ids=torch.arange(4.0)), dict, TypeError, "position_ids"),
    ("relative_table_wrong_width", lambda: RelativeBias(r(2, 8), max_distance=4), dict, ValueError, "table"),
    ("relative_zero_distance", lambda: RelativeBias(r(2, 1), max_distance=0), dict, ValueError, "max_distance"),
    ("t5_odd_buckets_bidirectional", lambda: T5Bias(r(7, 2), num_buckets=7), dict, ValueError, "num_buckets"),
    ("phase_freqs_out_of_range", lambda: LearnedPhaseRoPE(torch.full((1, 2, 4), 1.5)), dict, ValueError, "freqs"),
    ("phase_freqs_nan", lambda: LearnedPhaseRoPE(torch.full((1, 2, 4), float("nan"))), dict, ValueError, "freqs"),
    ("alibi_int_slopes", lambda: ALiBi(torch.ones(4, dtype=i64)), dict, TypeError, "slopes"),
    # --- flash_attn_func and packed variants
    ("fa_q_3d", F.flash_attn_func, lambda: _fa(q=r(5, 2, 16)), ValueError, "q"),
    ("fa_batch_mismatch", F.flash_attn_func, lambda: _fa(k=r(2, 7, 1, 16), v=r(2, 7, 1, 16)), ValueError, "k"),
    ("fa_v_seqlen_mismatch", F.flash_attn_func, lambda: _fa(v=r(1, 6, 1, 16)), ValueError, "v"),
    ("fa_heads_not_divisible", F.flash_attn_func, lambda: _fa(q=r(1, 5, 3, 16), k=r(1, 7, 2, 16), v=r(1, 7, 2, 16)),
     ValueError, "k"),
    ("fa_window_below_minus_one", F.flash_attn_func, lambda: dict(_fa(), window_size=(-2, 0)), ValueError,
     "window_size"),
    ("fa_window_not_pair", F.flash_attn_func, lambda: dict(_fa(), window_size=(3,)), ValueError, "window_size"),
    ("fa_negative_softcap", F.flash_attn_func, lambda: dict(_fa(), softcap=-1.0), ValueError, "softcap"),
    ("fa_inf_softcap", F.flash_attn_func, lambda: dict(_fa(), softcap=float("inf")), ValueError, "softcap"),
    ("fa_alibi_slopes_fp16", F.flash_attn_func, lambda: dict(_fa(), alibi_slopes=torch.ones(2, dtype=f16)),
     TypeError, "alibi_slopes"),
    ("fa_alibi_slopes_wrong_shape", F.flash_attn_func, lambda: dict(_fa(), alibi_slopes=torch.ones(3)), ValueError,
     "alibi_slopes"),
    ("fa_alibi_slopes_and_bias", F.flash_attn_func,
     lambda: dict(_fa(), alibi_slopes=torch.ones(2), position=ALiBi()), ValueError, "alibi_slopes"),
    ("fa_triton_head_dim_8", F.flash_attn_func,
     lambda: dict(_fa(q=r(1, 5, 2, 8), k=r(1, 7, 1, 8), v=r(1, 7, 1, 8)), backend="triton"), ValueError, "q"),
    ("qkvpacked_wrong_pack", F.flash_attn_qkvpacked_func, lambda: dict(qkv=r(1, 5, 2, 2, 16)), ValueError, "qkv"),
    ("kvpacked_wrong_pack", F.flash_attn_kvpacked_func, lambda: dict(q=r(1, 5, 2, 16), kv=r(1, 7, 3, 1, 16)),
     ValueError, "kv"),
    # --- varlen, unpad/pad
    ("varlen_cu_int64", F.flash_attn_varlen_func, lambda: _varlen(cu_seqlens_q=_cu(0, 2, 6, dtype=i64)),
     TypeError, "cu_seqlens_q"),
    ("varlen_cu_unsorted", F.flash_attn_varlen_func, lambda: _varlen(cu_seqlens_q=_cu(0, 4, 2)), ValueError,
     "cu_seqlens_q"),
    ("varlen_cu_not_from_zero", F.flash_attn_varlen_func, lambda: _varlen(cu_seqlens_k=_cu(1, 2, 6)), ValueError,
     "cu_seqlens_k"),
    ("varlen_cu_past_total", F.flash_attn_varlen_func, lambda: _varlen(cu_seqlens_k=_cu(0, 2, 9)), ValueError,
     "cu_seqlens_k"),
    ("varlen_cu_length_mismatch", F.flash_attn_varlen_func, lambda: _varlen(cu_seqlens_k=_cu(0, 6)), ValueError,
     "cu_seqlens_k"),
    ("varlen_max_seqlen_too_small", F.flash_attn_varlen_func, lambda: _varlen(max_seqlen_q=3), ValueError,
     "max_seqlen_q"),
    ("varlen_max_seqlen_float", F.flash_attn_varlen_func, lambda: _varlen(max_seqlen_k=4.0), TypeError,
     "max_seqlen_k"),
    ("varlen_q_4d", F.flash_attn_varlen_func, lambda: _varlen(q=r(1, 6, 2, 16)), ValueError, "q"),
    ("varlen_dropout_one", F.flash_attn_varlen_func, lambda: dict(_varlen(), dropout_p=1.0), ValueError, "dropout_p"),
    ("varlen_phase_freqs_not_per_token", F.flash_attn_varlen_func,
     lambda: dict(_varlen(), position=LearnedPhaseRoPE(torch.full((2, 2, 4), 0.5))), ValueError, "freqs"),
    ("unpad_mask_values_not_binary", F.unpad_input, lambda: dict(hidden_states=r(2, 4, 3),
                                                                 attention_mask=torch.tensor([[1, 2, 0, 0]] * 2)),
     ValueError, "attention_mask"),
    ("unpad_mask_wrong_shape", F.unpad_input, lambda: dict(hidden_states=r(2, 4, 3),
                                                           attention_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "attention_mask"),
    ("unpad_mask_float", F.unpad_input, lambda: dict(hidden_states=r(2, 4, 3), attention_mask=torch.ones(2, 4)),
     TypeError, "attention_mask"),
    ("pad_indices_out_of_range", F.pad_input, lambda: dict(hidden_unpadded=r(3, 4), indices=torch.tensor([0, 5, 8]),
                                                           batch=2, seqlen=4), ValueError, "indices"),
    ("pad_indices_repeated", F.pad_input, lambda: dict(hidden_unpadded=r(3, 4), indices=torch.tensor([0, 5, 5]),
                                                       batch=2, seqlen=4), ValueError, "indices"),
    ("pad_negative_batch", F.pad_input, lambda: dict(hidden_unpadded=r(0, 4), indices=torch.zeros(0, dtype=i64),
                                                     batch=-1, seqlen=4), ValueError, "batch"),
    # --- KV-cache decode: every check runs before the append
    ("kvcache_overflow", F.flash_attn_with_kvcache, lambda: _kv(cache_seqlens=_cu(3, 8)), ValueError, "cache_seqlens"),
    ("kvcache_negative_seqlen", F.flash_attn_with_kvcache, lambda: _kv(cache_seqlens=_cu(-1, 2)), ValueError,
     "cache_seqlens"),
    ("kvcache_seqlens_int64", F.flash_attn_with_kvcache, lambda: _kv(cache_seqlens=_cu(3, 5, dtype=i64)), TypeError,
     "cache_seqlens"),
    ("kvcache_k_without_v", F.flash_attn_with_kvcache, lambda: _kv(v=None), ValueError, "k, v"),
    ("kvcache_head_dim_0", F.flash_attn_with_kvcache,   # raised ZeroDivisionError from the default scale
     lambda: _kv(q=r(2, 1, 4, 0), k_cache=r(2, 8, 2, 0), v_cache=r(2, 8, 2, 0), k=None, v=None), ValueError, "head_dim"),
    ("kvcache_heads_not_divisible", F.flash_attn_with_kvcache,
     lambda: _kv(q=r(2, 1, 3, 16)), ValueError, "k_cache"),
    ("kvcache_block_table_out_of_range", F.flash_attn_with_kvcache,
     lambda: dict(q=r(1, 1, 2, 16), k_cache=r(3, 4, 2, 16), v_cache=r(3, 4, 2, 16), k=r(1, 1, 2, 16),
                  v=r(1, 1, 2, 16), cache_seqlens=_cu(5), block_table=torch.tensor([[0, 7]], dtype=i32)),
     ValueError, "block_table"),
    ("kvcache_batch_idx_repeated", F.flash_attn_with_kvcache,
     lambda: _kv(cache_batch_idx=_cu(1, 1)), ValueError, "cache_batch_idx"),
    ("kvcache_rotary_table_short", F.flash_attn_with_kvcache,
     lambda: _kv(rotary_cos=r(4, 8), rotary_sin=r(4, 8)), ValueError, "rotary_cos"),
    ("kvcache_unknown_schedule", F.flash_attn_with_kvcache, lambda: dict(_kv(), schedule="fast"), ValueError,
     "schedule"),
    ("kvcache_out_wrong_dtype", F.flash_attn_with_kvcache, lambda: dict(_kv(), out=r(2, 1, 4, 16, dtype=f16)),
     TypeError, "out"),
    # writes into tensors that alias themselves or require grad (break-it pass): refused before any write
    ("kvcache_out_expanded", F.flash_attn_with_kvcache,
     lambda: dict(_kv(), out=torch.empty(1, 1, 4, 16).expand(2, 1, 4, 16)), ValueError, "out"),
    ("kvcache_out_requires_grad", F.flash_attn_with_kvcache,
     lambda: dict(_kv(), out=torch.zeros(2, 1, 4, 16, requires_grad=True)), ValueError, "out"),
    ("kvcache_k_cache_expanded_append", F.flash_attn_with_kvcache,
     lambda: _kv(k_cache=r(1, 8, 2, 16).expand(2, 8, 2, 16)), ValueError, "k_cache"),
    ("kvcache_v_cache_expanded_append", F.flash_attn_with_kvcache,
     lambda: _kv(v_cache=r(1, 8, 2, 16).expand(2, 8, 2, 16)), ValueError, "v_cache"),
    ("kvcache_k_cache_requires_grad_append", F.flash_attn_with_kvcache,
     lambda: _kv(k_cache=r(2, 8, 2, 16).requires_grad_()), ValueError, "k_cache"),
    ("kvcache_v_cache_requires_grad_append", F.flash_attn_with_kvcache,
     lambda: _kv(v_cache=r(2, 8, 2, 16).requires_grad_()), ValueError, "v_cache"),
    ("kvcache_block_table_shared_append_slot", F.flash_attn_with_kvcache, _paged_shared, ValueError, "block_table"),
    ("kvcache_num_ctas_huge", F.flash_attn_with_kvcache, lambda: dict(_kv(), num_ctas=10**9), ValueError, "num_ctas"),
    # written tensors that share memory with another argument (exact test; packed kv halves are fine)
    *[(f"kvcache_out_shares_{n}", F.flash_attn_with_kvcache, (lambda n=n: _kv_out_sharing(n)), ValueError,
       f"^out: shares memory with {n}; the op writes out")
      for n in ("q", "k_cache", "v_cache", "k", "rotary_cos", "alibi_slopes", "cache_seqlens", "cache_batch_idx")],
    ("kvcache_out_shares_position_alibi_slopes", F.flash_attn_with_kvcache,
     lambda: (lambda a: dict(a, position=ALiBi(a["out"].view(-1)[4:8])))(_kv_out_sharing(None)), ValueError,
     r"^out: shares memory with position \(ALiBi slopes\)"),
    ("kvcache_out_shares_v_cache_read_only", F.flash_attn_with_kvcache,
     lambda: {n: t for n, t in _kv_out_sharing("v_cache").items() if n not in ("k", "v")}, ValueError,
     "^out: shares memory with v_cache"),
    ("kvcache_append_same_tensor_twice", F.flash_attn_with_kvcache, lambda: _kv_cache_sharing("k_cache", "cache"),
     ValueError, "^k_cache: shares memory with v_cache"),
    ("kvcache_append_packed_same_half", F.flash_attn_with_kvcache,
     lambda: _kv_cache_sharing("k_cache", "packed_same_half"), ValueError, "^k_cache: shares memory with v_cache"),
    *[(f"kvcache_append_{c}_shares_{n}", F.flash_attn_with_kvcache, (lambda c=c, n=n: _kv_cache_sharing(c, n)),
       ValueError, f"^{c}: shares memory with {n}; the op writes {c}")
      for c, n in (("k_cache", "q"), ("k_cache", "k"), ("v_cache", "v"), ("v_cache", "k"), ("k_cache", "rotary_sin"),
                   ("v_cache", "alibi_slopes"), ("k_cache", "block_table"), ("v_cache", "cache_leftpad"))],
    # --- apply_rotary
    ("rotary_inplace_expanded_x", F.apply_rotary, lambda: dict(_rot(x=r(1, 5, 1, 8).expand(2, 5, 3, 8)), inplace=True),
     ValueError, "x"),
    ("rotary_inplace_overlapping_x", F.apply_rotary, lambda: dict(_rot(x=_unfolded(2, 5, 3, 8)), inplace=True),
     ValueError, "x"),
    ("rotary_cos_sin_dtype_mismatch", F.apply_rotary, lambda: _rot(sin=r(8, 4, dtype=f16)), TypeError, "sin"),
    ("rotary_dim_past_head_dim", F.apply_rotary, lambda: _rot(cos=r(8, 5), sin=r(8, 5)), ValueError, "cos"),
    ("rotary_table_too_short", F.apply_rotary, lambda: _rot(cos=r(4, 4), sin=r(4, 4)), ValueError, "cos"),
    ("rotary_position_ids_out_of_range", F.apply_rotary, lambda: dict(_rot(), position_ids=torch.tensor([0, 1, 2, 3, 8])),
     ValueError, "position_ids"),
    *[(f"rotary_inplace_x_shares_{n}", F.apply_rotary, (lambda n=n: _rot_sharing(n)), ValueError,
       f"^x: shares memory with {n}; the op writes x") for n in ("cos", "sin", "position_ids")],
    # found by the break-it pass on 8f6e06b: non-strided layouts are refused by name (a sparse alibi_slopes gave a
    # wrong attention silently on the torch backend; sparse cos with inplace=True read "may share memory"; nested x
    # and sparse cache_seqlens crashed inside torch), and the aliasing check sees through vmap's wrapper
    ("kvcache_sparse_alibi_slopes", lambda alibi_slopes, **kw: F.flash_attn_with_kvcache(
        alibi_slopes=alibi_slopes.to_sparse(), **kw), lambda: dict(_kv(), alibi_slopes=torch.rand(4), backend="torch"),
     TypeError, "^alibi_slopes: expected a dense"),
    ("kvcache_sparse_cache_seqlens", lambda cache_seqlens, **kw: F.flash_attn_with_kvcache(
        cache_seqlens=cache_seqlens.to_sparse(), **kw), _kv, TypeError, "^cache_seqlens: expected a dense"),
    ("rotary_inplace_sparse_cos", lambda cos, sin, **kw: F.apply_rotary(cos=cos.to_sparse(), sin=sin.to_sparse(), **kw),
     lambda: dict(_rot(), inplace=True), TypeError, "^cos: expected a dense"),
    ("rotary_nested_x", lambda x, **kw: F.apply_rotary(x=torch.nested.nested_tensor(list(x), layout=torch.jagged),
                                                       **kw), _rot, TypeError, "^x: expected a dense"),
    ("rotary_inplace_vmap_x_shares_cos", lambda x, cos, sin: torch.func.vmap(
        lambda xx: F.apply_rotary(xx, cos, sin, inplace=True))(x),
     lambda: (lambda x: dict(x=x, cos=x[1].reshape(-1)[:32].view(8, 4), sin=r(8, 4)))(r(3, 2, 5, 3, 8)), ValueError,
     "^x: shares memory with cos; the op writes x"),
    ("rotary_position_ids_float", F.apply_rotary, lambda: dict(_rot(), position_ids=torch.arange(5.0)), TypeError,
     "position_ids"),
    # --- kernelized RPE
    ("krpe_bias_wrong_length", F.kernelized_rpe_attention, lambda: _krpe(rpe_bias=r(2, 12)), ValueError, "rpe_bias"),
    ("krpe_fp16_fft", F.kernelized_rpe_attention, lambda: dict(_krpe(), fft_dtype=f16), TypeError, "fft_dtype"),
    ("krpe_unknown_feature_map", F.kernelized_rpe_attention, lambda: dict(_krpe(), feature_map="tanh"), ValueError,
     "feature_map"),
    ("krpe_nonpositive_features", F.kernelized_rpe_attention, lambda: dict(_krpe(), feature_map=lambda x: x),
     ValueError, "feature_map"),
    ("krpe_projection_wrong_dim", F.kernelized_rpe_attention, lambda: dict(_krpe(), projection=r(16, 7)), ValueError,
     "projection"),
    ("krpe_zero_scale", F.kernelized_rpe_attention, lambda: dict(_krpe(), softmax_scale=0.0), ValueError,
     "softmax_scale"),
    # --- EcoFormer
    ("eco_codes_not_binary", F.ecoformer_attention, lambda: _eco(q_codes=r(1, 2, 6, 16)), ValueError, "q_codes"),
    ("eco_codes_mixed_kinds", F.ecoformer_attention,
     lambda: _eco(q_codes=torch.zeros(1, 2, 6, 1, dtype=i64), k_codes=_codes(1, 2, 6, 16), num_bits=16),
     TypeError, "k_codes"),
    ("eco_packed_without_num_bits", F.ecoformer_attention,
     lambda: _eco(q_codes=torch.zeros(1, 2, 6, 1, dtype=i64), k_codes=torch.zeros(1, 2, 6, 1, dtype=i64)),
     ValueError, "num_bits"),
    ("eco_bits_past_num_bits", F.ecoformer_attention,
     lambda: _eco(q_codes=torch.full((1, 2, 6, 1), 1 << 20, dtype=i64), k_codes=torch.zeros(1, 2, 6, 1, dtype=i64),
                  num_bits=16), ValueError, "q_codes"),
    ("eco_reference_form_lengths", F.ecoformer_attention,
     lambda: dict(_eco(q_codes=_codes(1, 2, 5, 16)), form="reference-code"), ValueError, "form"),
    ("eco_padding_mask_not_bool", F.ecoformer_attention, lambda: dict(_eco(), key_padding_mask=torch.zeros(1, 6)),
     TypeError, "key_padding_mask"),
    ("eco_pack_bits_not_binary", F.ecoformer_pack_bits, lambda: dict(codes=torch.tensor([[1.0, 0.0]])), ValueError,
     "codes"),
    # --- nn modules
    ("hash_x_wrong_heads", lambda x: F.nn.KernelizedHash(8, num_bits=4, num_anchors=3, heads=2)(x),
     lambda: dict(x=r(1, 3, 5, 8)), ValueError, "x"),
    ("eco_layer_embed_not_divisible", lambda: F.nn.EcoFormerAttention(30, 4), dict, ValueError, "num_heads"),
    ("krpe_layer_seqlen_past_max", lambda x: F.nn.KernelizedRPEAttention(16, 2, max_seqlen=4)(x),
     lambda: dict(x=r(1, 5, 16)), ValueError, "x"),
    ("hash_fit_empty_batch", lambda x: F.nn.KernelizedHash(8, num_bits=4, num_anchors=3).fit(x),
     lambda: dict(x=r(0, 1, 5, 8)), ValueError, "x"),
    ("krpe_layer_causal_str", lambda: F.nn.KernelizedRPEAttention(16, 2, max_seqlen=4, causal="no"), dict,
     TypeError, "causal"),
    ("krpe_layer_normalize_qk_int", lambda: F.nn.KernelizedRPEAttention(16, 2, max_seqlen=4, normalize_qk=1), dict,
     TypeError, "normalize_qk"),
    ("eco_layer_causal_int", lambda: F.nn.EcoFormerAttention(32, 4, causal=1), dict, TypeError, "causal"),
    # --- scheduling: never a hang, never a float length
    ("lean_schedule_float_length", lambda: F.scheduling.lean_schedule([10.5], num_heads_k=1, block_n=16), dict,
     TypeError, "seqlens_k"),
    ("lean_schedule_huge_num_ctas", lambda: F.scheduling.lean_schedule([100, 5], num_heads_k=2, block_n=16,
                                                                       num_ctas=10**9), dict, ValueError, "num_ctas"),
    ("lean_schedule_too_many_tiles", lambda: F.scheduling.lean_schedule([10**12], num_heads_k=1, block_n=16), dict,
     ValueError, "seqlens_k"),
    ("split_schedule_too_many_tiles", lambda: F.scheduling.split_schedule([10**12], num_heads_k=1, block_n=16), dict,
     ValueError, "seqlens_k"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, fn, make, exc, match = case
    kwargs = make()
    snap = snapshot(**{n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)})
    with pytest.raises(exc, match=match):
        fn(**kwargs)
    assert_unchanged(snap, **{n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)})


def test_catalogue_size():
    """The issue asks for at least 40 distinct bad inputs."""
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


# ---- documented results for non-finite data where the op promises one: NaN/inf in masked data never leaks
def test_nan_in_padded_tokens_does_not_leak_through_unpad_pad():
    x = r(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    x[mask == 0] = float("nan")
    xu, idx, cu, mx, _ = F.unpad_input(x, mask)
    assert torch.isfinite(xu).all()
    y = F.pad_input(xu, idx, 2, 4)
    assert torch.isfinite(y).all() and torch.equal(y[mask == 1], x[mask == 1])


def test_nan_in_cache_slots_past_cache_seqlens_does_not_leak():
    q, kc, vc = r(2, 1, 4, 16), r(2, 8, 2, 16), r(2, 8, 2, 16)
    lens = _cu(3, 5)
    kc[0, 3:], vc[0, 3:], kc[1, 5:], vc[1, 5:] = float("nan"), float("inf"), float("inf"), float("nan")
    out = F.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="torch")
    want, _ = posattn.reference.kvcache_attention(q, kc, vc, lens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
