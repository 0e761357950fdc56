"""Public fused-attention API: scaled_dot_product_attention against torch's own SDPA (float64 truth),
flash_attn_func / packed variants semantics, strided inputs, inputs untouched, bad inputs, custom-op
checks (opcheck, torch.compile), and a few Triton-backend cases under the interpreter."""
import pytest
import torch
import torch.nn.functional as F

import posattn
from posattn.positional import ALiBi, RelativeBias, RoPE, URPE
from attention_helpers import grads, make_position, qkv, ref_fa
from tolerances import assert_close, assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
T = torch.randn


def _sdpa_case(name):
    """(query, key, value, kwargs) of one input form torch accepts."""
    b = torch.ones
    cases = {
        "4d": lambda: ((T(2, 3, 17, 16), T(2, 3, 17, 16), T(2, 3, 17, 16)), {}),
        "4d_causal_q_lt_k": lambda: ((T(2, 3, 9, 16), T(2, 3, 23, 16), T(2, 3, 23, 16)), {"is_causal": True}),
        "4d_causal_q_gt_k": lambda: ((T(2, 3, 23, 16), T(2, 3, 9, 16), T(2, 3, 9, 16)), {"is_causal": True}),
        "3d_unbatched": lambda: ((T(3, 9, 16), T(3, 11, 16), T(3, 11, 16)), {"is_causal": True}),
        "2d_unbatched_mask": lambda: ((T(9, 16), T(11, 16), T(11, 16)), {"attn_mask": T(9, 11)}),
        "5d_broadcast": lambda: ((T(3, 2, 2, 5, 8), T(1, 2, 2, 7, 8), T(3, 1, 2, 7, 8)), {}),
        "q3_k4": lambda: ((T(2, 5, 8), T(1, 2, 7, 8), T(1, 2, 7, 8)), {}),
        "gqa": lambda: ((T(2, 4, 9, 16), T(2, 2, 11, 16), T(2, 2, 11, 16)), {"enable_gqa": True, "is_causal": True}),
        "gqa_k_ne_v_heads": lambda: ((T(2, 4, 9, 16), T(2, 2, 11, 16), T(2, 1, 11, 16)), {"enable_gqa": True}),
        "heads_broadcast": lambda: ((T(2, 4, 9, 16), T(2, 1, 11, 16), T(2, 1, 11, 16)), {}),
        "bool_mask_bcast": lambda: ((T(2, 3, 9, 16), T(2, 3, 11, 16), T(2, 3, 11, 16)),
                                    {"attn_mask": torch.rand(1, 11) > 0.3}),
        "bool_mask_per_head": lambda: ((T(2, 3, 9, 16), T(2, 3, 11, 16), T(2, 3, 11, 16)),
                                       {"attn_mask": torch.rand(3, 9, 11) > 0.3}),
        "float_mask_full": lambda: ((T(2, 3, 9, 16), T(2, 3, 11, 16), T(2, 3, 11, 16)),
                                    {"attn_mask": T(2, 3, 9, 11)}),
        "scale": lambda: ((T(2, 3, 9, 16), T(2, 3, 11, 16), T(2, 3, 11, 16)), {"scale": 0.3}),
        "head_dim_v": lambda: ((T(2, 3, 9, 16), T(2, 3, 11, 16), T(2, 3, 11, 24)), {}),
        "seqlen_1": lambda: ((T(2, 3, 1, 16), T(2, 3, 1, 16), T(2, 3, 1, 16)), {"is_causal": True}),
        "seqlen_113_97": lambda: ((T(1, 2, 113, 40), T(1, 2, 97, 40), T(1, 2, 97, 40)), {"is_causal": True}),
    }
    (q, k, v), kw = cases[name]()
    del b
    return q, k, v, kw


SDPA_CASES = ["4d", "4d_causal_q_lt_k", "4d_causal_q_gt_k", "3d_unbatched", "2d_unbatched_mask", "5d_broadcast",
              "q3_k4", "gqa", "gqa_k_ne_v_heads", "heads_broadcast", "bool_mask_bcast", "bool_mask_per_head",
              "float_mask_full", "scale", "head_dim_v", "seqlen_1", "seqlen_113_97"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_matches_torch(case, dtype):
    """Every input form torch accepts: same shape, values within the dtype tolerance of torch's float64
    result and within 2x torch's own error in the same dtype; gradients too (float mask included)."""
    q, k, v, kw = _sdpa_case(case)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw["attn_mask"] = mask = mask.to(dtype).requires_grad_()
    out = posattn.scaled_dot_product_attention(q, k, v, **kw)
    ins = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    kw64 = dict(kw)
    if mask is not None:
        kw64["attn_mask"] = ins64[3] if mask.requires_grad else mask
    want = F.scaled_dot_product_attention(*ins64[:3], **kw64)
    same = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(),
                                          **{**kw, "attn_mask": None if mask is None else mask.detach()})
    assert out.shape == want.shape and out.dtype == dtype
    assert_close(out, want, dtype)
    assert_within_torch_error(out, same, want, factor=2.0, floor=1e-6)
    dout = torch.randn_like(out)
    for g, w in zip(grads(out, ins, dout), grads(want, ins64, dout.double())):
        if w.norm() < 1e-9:  # e.g. dq, dk with one key: exactly 0 in theory, rounding noise in practice
            assert g.abs().max() < 1e-5
        else:
            assert_close(g, w, dtype, grad=True, name="grad")


def test_sdpa_fully_masked_row_is_zero():
    """Documented choice: a query row with every key masked gives 0 (never NaN), with finite grads."""
    q, k, v = (T(1, 2, 5, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(5, 5) > 0.4
    mask[2] = False
    out = posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    fmask = torch.zeros(5, 5).masked_fill(~mask, float("-inf"))
    out2 = posattn.scaled_dot_product_attention(q, k, v, attn_mask=fmask)
    assert (out2[:, :, 2] == 0).all()
    ref, _ = posattn.reference.attention(q, k, v, attn_mask=mask)
    assert_close(out, ref, torch.float32)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), [q, k, v]))


def test_sdpa_position_top_left_strided():
    """position= with top-left alignment on strided (non-contiguous) views equals the reference; inputs untouched."""
    base = T(2, 11, 3, 3, 40)  # (batch, seq, 3, heads, head_dim): q, k, v are strided views
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    before = base.clone()
    pos, _ = make_position("rope+t5", batch=2, heads=3, seqlen_k=11, head_dim=40)
    out = posattn.scaled_dot_product_attention(q, k, v, is_causal=True, position=pos)
    ref, _ = posattn.reference.attention(q, k, v, causal=True, offset=0, position=pos)
    assert_close(out, ref, torch.float32)
    assert torch.equal(base, before)
    out_c = posattn.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
                                                 position=pos)
    assert_close(out, out_c.double(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_alibi_slopes_equals_position(dtype):
    """alibi_slopes (num_heads,) and (batch, num_heads) == position=ALiBi(slopes), bottom-right; and the reference."""
    B, Sq, Sk, H = 2, 7, 12, 4
    q, k, v = qkv(B, Sq, Sk, H, 2, 32, dtype)
    for slopes in (torch.rand(H), torch.rand(B, H)):
        a = posattn.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
        b = posattn.flash_attn_func(q, k, v, causal=True, position=ALiBi(slopes))
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        ro, _ = ref_fa(q, k, v, causal=True, offset=Sk - Sq, position=ALiBi(slopes))
        assert_close(a, ro, dtype)
    c = posattn.flash_attn_func(q, k, v, alibi_slopes=slopes, position=RoPE())
    ro, _ = ref_fa(q, k, v, offset=Sk - Sq, position=[RoPE(), ALiBi(slopes)])
    assert_close(c, ro, dtype)


def test_flash_attn_return_attn_probs_and_window_semantics():
    B, Sq, Sk, H = 2, 6, 10, 2
    q, k, v = qkv(B, Sq, Sk, H, H, 16, torch.float32)
    out, lse, s = posattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert s is None and lse.shape == (B, H, Sq) and lse.dtype == torch.float32 and out.shape == (B, Sq, H, 16)
    ro, rl = ref_fa(q, k, v, causal=True, offset=Sk - Sq)
    assert_close(lse, rl, torch.float32, name="lse")
    # window (-1, 0) is causal; a side >= seqlen_k means unbounded (FlashAttention normalisation)
    w = posattn.flash_attn_func(q, k, v, window_size=(-1, 0))
    torch.testing.assert_close(w, out, atol=0, rtol=0)
    full = posattn.flash_attn_func(q, k, v)
    torch.testing.assert_close(posattn.flash_attn_func(q, k, v, window_size=(Sk, Sk + 5)), full, atol=0, rtol=0)
    loc = posattn.flash_attn_func(q, k, v, window_size=(2, 1))
    ro, _ = ref_fa(q, k, v, offset=Sk - Sq, window_size=(2, 1))
    assert_close(loc, ro, torch.float32)


def test_packed_variants_match_unpacked():
    B, S, H, D = 2, 9, 3, 16
    qkv_ = T(B, S, 3, H, D, requires_grad=True)
    out = posattn.flash_attn_qkvpacked_func(qkv_, causal=True, position=RoPE())
    q, k, v = qkv_.unbind(2)
    ref = posattn.flash_attn_func(q, k, v, causal=True, position=RoPE())
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), [qkv_])
    assert g.shape == qkv_.shape and torch.isfinite(g).all()
    qq = T(B, 4, 6, D)
    kv = T(B, S, 2, 2, D)
    o2, lse2, _ = posattn.flash_attn_kvpacked_func(qq, kv, return_attn_probs=True)
    o3 = posattn.flash_attn_func(qq, kv[:, :, 0], kv[:, :, 1])
    torch.testing.assert_close(o2, o3, atol=0, rtol=0)


def test_inputs_not_modified_and_output_fresh():
    q, k, v = qkv(2, 7, 9, 4, 2, 16, torch.bfloat16)
    table = T(4, 7)
    saved = [t.clone() for t in (q, k, v, table)]
    pos = [RoPE(), RelativeBias(table, max_distance=3), URPE(table.abs(), max_distance=3)]
    out = posattn.flash_attn_func(q, k, v, causal=True, position=pos, dropout_p=0.1)
    for a, b in zip((q, k, v, table), saved):
        assert torch.equal(a, b)
    assert out.data_ptr() not in (q.data_ptr(), k.data_ptr(), v.data_ptr())


def _raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


def test_bad_inputs_sdpa():
    sdpa = posattn.scaled_dot_product_attention
    q, k, v = T(2, 4, 5, 16), T(2, 4, 7, 16), T(2, 4, 7, 16)
    _raises(TypeError, "key", sdpa, q, k.half(), v)
    _raises(TypeError, "query", sdpa, q.int(), k.int(), v.int())
    _raises(TypeError, "query", sdpa, q.numpy(), k, v)
    _raises(ValueError, "key", sdpa, q, T(2, 4, 7, 8), v)
    _raises(ValueError, "value", sdpa, q, k, T(2, 4, 6, 16))
    _raises(ValueError, "key", sdpa, q, T(2, 2, 7, 16), T(2, 2, 7, 16))       # heads differ, no enable_gqa
    _raises(ValueError, "key", sdpa, T(2, 3, 5, 16), T(2, 2, 7, 16), T(2, 2, 7, 16), enable_gqa=True)
    _raises(ValueError, "key", sdpa, q, T(3, 4, 7, 16), T(3, 4, 7, 16))       # batch does not broadcast
    _raises(ValueError, "attn_mask", sdpa, q, k, v, attn_mask=torch.ones(4, 7, dtype=torch.bool))
    _raises(ValueError, "attn_mask", sdpa, q, k, v, attn_mask=torch.ones(7, dtype=torch.bool))
    _raises(ValueError, "attn_mask", sdpa, q, k, v, attn_mask=torch.ones(1, 2, 4, 5, 7, dtype=torch.bool))
    _raises(TypeError, "attn_mask", sdpa, q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int32))
    _raises(TypeError, "attn_mask", sdpa, q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.float64))
    _raises(ValueError, "attn_mask", sdpa, q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)
    _raises(ValueError, "dropout_p", sdpa, q, k, v, dropout_p=1.5)
    _raises(ValueError, "backend", sdpa, q, k, v, backend="bogus")
    _raises(ValueError, "scaled_dot_product_attention has no .cuda. backend", sdpa, q, k, v, backend="cuda")
    _raises(ValueError, "table", sdpa, q, k, v, position=RelativeBias(T(3, 9), max_distance=4))
    _raises(ValueError, "position_ids", sdpa, q, k, v, position=RoPE(position_ids=torch.arange(5)))
    _raises(ValueError, "position_ids", sdpa, T(2, 4, 9, 16), k, v, position=RoPE(position_ids=torch.arange(7)))
    _raises(TypeError, "position", sdpa, q, k, v, position="rope")


def test_bad_inputs_flash_attn():
    fa = posattn.flash_attn_func
    q, k, v = qkv(2, 5, 7, 4, 2, 16, torch.float16)
    _raises(ValueError, "k", fa, q, k[:, :, :, :8], v)
    _raises(ValueError, "k", fa, q, k[:1], v[:1])
    _raises(ValueError, "v", fa, q, k, v[:, :6])
    _raises(ValueError, "k", fa, q, torch.randn(2, 7, 3, 16).half(), torch.randn(2, 7, 3, 16).half())
    _raises(ValueError, "q", fa, q[0], k, v)
    _raises(TypeError, "v", fa, q, k, v.float())
    _raises(ValueError, "window_size", fa, q, k, v, window_size=(-2, 0))
    _raises(ValueError, "window_size", fa, q, k, v, window_size=3)
    _raises(ValueError, "softcap", fa, q, k, v, softcap=-1.0)
    _raises(TypeError, "alibi_slopes", fa, q, k, v, alibi_slopes=torch.rand(4).half())
    _raises(ValueError, "alibi_slopes", fa, q, k, v, alibi_slopes=torch.rand(3))
    _raises(ValueError, "alibi_slopes", fa, q, k, v, alibi_slopes=torch.rand(4), position=ALiBi())
    _raises(ValueError, "qkv", posattn.flash_attn_qkvpacked_func, torch.randn(2, 5, 2, 4, 16))
    _raises(ValueError, "kv", posattn.flash_attn_kvpacked_func, q, torch.randn(2, 7, 3, 2, 16).half())
    _raises(TypeError, "causal", fa, q, k, v, causal=1)


def test_opcheck_fused_attention():
    """torch.library.opcheck on the forward op (schema, fake kernel, autograd registration, AOT dispatch)."""
    B, Sq, Sk, H, Hk, D = 1, 5, 7, 2, 1, 16
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.float32, requires_grad=True)
    table = T(H, 9, requires_grad=True)
    pe = posattn.ops.attention.build_pe([RoPE(), RelativeBias(table, max_distance=4)], batch_size=B, num_heads=H,
                                        seqlen_q=Sq, seqlen_k=Sk, head_dim=D, offset=Sk - Sq, device="cpu")
    from posattn.ops.attention import _PE_SCALARS, _PE_TENSORS
    mask = torch.rand(1, 1, Sq, Sk) > 0.2
    args = (q, k, v, mask, *(getattr(pe, n) for n in _PE_TENSORS), 0.25, True, Sk - Sq, -1, 0, 0.0,
            *(getattr(pe, n) for n in _PE_SCALARS), 0.0, 0, False, "torch")
    torch.library.opcheck(torch.ops.posattn.fused_attention_fwd.default, args)


def test_torch_compile_fullgraph_smoke():
    """torch.compile(fullgraph=True) traces through the custom ops (fake kernels + autograd);
    aot_eager keeps the test free of a C++ toolchain."""
    q, k, v = qkv(1, 6, 8, 2, 2, 16, torch.float32, requires_grad=True)
    table = T(2, 7, requires_grad=True)

    def f(q, k, v, table):
        out = posattn.flash_attn_func(q, k, v, causal=True, position=RelativeBias(table, max_distance=3))
        return out.square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = cf(q, k, v, table)
    want = f(q, k, v, table)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, [q, k, v, table])
    g2 = torch.autograd.grad(want, [q, k, v, table])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ Triton backend (interpreter on CPU)

@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_flash_attn_rope_alibi_gqa(dtype, device):
    B, Sq, Sk, H, Hk, D = 1, 9, 17, 4, 2, 32
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, device=device, requires_grad=True)
    pos, leaves = make_position("rope+relative", batch=B, heads=H, seqlen_k=Sk, head_dim=D, device=device)
    out, lse, _ = posattn.flash_attn_func(q, k, v, causal=True, position=pos, return_attn_probs=True,
                                          backend="triton")
    ro, rl = ref_fa(q, k, v, causal=True, offset=Sk - Sq, position=pos)
    assert_close(out, ro, dtype)
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse")
    dout = torch.randn_like(out)
    ins = [q, k, v] + leaves
    for g, w in zip(grads(out, ins, dout), grads(ro, ins, dout.double())):
        assert_close(g, w, dtype, grad=True, name="grad")


@pytest.mark.interp
def test_triton_sdpa_mask(device):
    q, k, v = (torch.randn(1, 2, 7, 16, device=device) for _ in range(3))
    mask = torch.rand(7, 7, device=device) > 0.3
    out = posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
    ref, _ = posattn.reference.attention(q, k, v, attn_mask=mask)
    assert_close(out, ref, torch.float32)


@pytest.mark.interp
def test_triton_unsupported_inputs_named(device):
    q, k, v = qkv(1, 4, 4, 2, 2, 8, torch.float32, device=device)
    _raises(ValueError, "q", posattn.flash_attn_func, q, k, v, backend="triton")
    q, k, v = qkv(1, 4, 4, 2, 2, 16, torch.float64, device=device)
    _raises(TypeError, "q", posattn.flash_attn_func, q, k, v, backend="triton")
    q, k, v = qkv(1, 4, 4, 2, 2, 16, torch.float32, device=device)
    slopes = torch.rand(2, device=device, requires_grad=True)
    _raises(ValueError, "alibi_slopes", posattn.flash_attn_func, q, k, v, alibi_slopes=slopes, backend="triton")
