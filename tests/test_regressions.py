"""Regression tests for bugs the property-based fuzzing (tests/test_fuzz_*.py) found.

One test per bug, named after it, with the minimal input hypothesis printed (in the comment) reduced to
the tensors that matter. Each compares with the float64 reference (reference.py) or checks the documented
error, and fails on the code before the fix.
"""
import math

import pytest
import torch

import posattn
from posattn import reference as R
from fuzz_helpers import check_close, grad_floor, grads, poisoned_allocations


def test_rope_position_ids_with_seqlen_k_zero():
    # test_fuzz_sdpa_torch: seed=0, float32, batch=1, heads=(1, 1), seqlen_q=0, seqlen_k=0, head_dim=7,
    # position=[RoPE(rotary_dim=2, position_ids=tensor of shape (0,))]
    # kernel_args reshaped position_ids with reshape(-1, 0) (ambiguous -> RuntimeError) and reference.attention
    # took max() of an empty tensor (RuntimeError). An empty problem must give an empty result.
    for ids_shape, batch in (((0,), 1), ((1, 0), 2), ((2, 0), 2)):
        q = torch.randn(batch, 1, 0, 8)
        k = torch.randn(batch, 1, 0, 8)
        pos = posattn.RoPE(rotary_dim=2, position_ids=torch.zeros(ids_shape, dtype=torch.int64))
        out = posattn.scaled_dot_product_attention(q, k, k, position=pos, backend="torch")
        ro, _ = R.attention(q, k, k, position=pos)
        assert out.shape == ro.shape == (batch, 1, 0, 8)
        out = posattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), position=pos,
                                      backend="torch")
        assert out.shape == (batch, 0, 1, 8)


def test_causally_hidden_nan_keys_leak_into_torch_backend():
    # test_fuzz_sdpa_torch: seed=0, float32, batch=1, heads=(1, 1), seqlen_q=1, seqlen_k=15, head_dim=1,
    # is_causal=True, poison_hidden_keys=nan
    # Keys 1..14 are hidden from the only query (top-left causal) and hold NaN; the torch backend formed
    # p @ v with p = 0 and v = NaN (0 * NaN = NaN) and dq = ds @ k likewise. Hidden data must never be read.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 4, generator=g)
    k = torch.randn(1, 1, 15, 4, generator=g)
    v = torch.randn(1, 1, 15, 4, generator=g)
    ro, _ = R.attention(q, k, v, causal=True)
    for fill in (float("nan"), float("inf")):
        kp, vp = k.clone(), v.clone()
        kp[:, :, 1:], vp[:, :, 1:] = fill, -fill
        qa, ka, va = (t.clone().requires_grad_(True) for t in (q, kp, vp))
        with poisoned_allocations():
            out = posattn.scaled_dot_product_attention(qa, ka, va, is_causal=True, backend="torch")
            dq, dk, dv = grads(out, [qa, ka, va], torch.ones_like(out))
        check_close(out, ro, torch.float32)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert (dk[:, :, 1:] == 0).all() and (dv[:, :, 1:] == 0).all()
    # the same through a bool key-padding mask (keys hidden from every query by the mask)
    mask = torch.zeros(1, 1, 1, 15, dtype=torch.bool)
    mask[..., :3] = True
    kp, vp = k.clone(), v.clone()
    kp[:, :, 3:], vp[:, :, 3:] = float("nan"), float("inf")
    ro, _ = R.attention(q, k, v, attn_mask=mask)
    out = posattn.scaled_dot_product_attention(q, kp, vp, attn_mask=mask, backend="torch")
    check_close(out, ro, torch.float32)


def test_varlen_no_work_rows_past_cu_seqlens_give_nan():
    # test_fuzz_varlen_torch: seed=0, float32, batch_size=1, lens_q=[1], lens_k=[0], heads=(1, 1), head_dim=4,
    # rows_past_cu_k=2, pad_fill=nan
    # With nothing to compute (no sequence has both queries and keys) the torch backend connected the graph with
    # out + 0 * (q.sum() + k.sum() + v.sum()): NaN/inf in rows outside every sequence made the output NaN.
    q = torch.randn(2, 1, 4, requires_grad=True)
    k = torch.full((3, 1, 4), float("nan"))
    v = torch.full((3, 1, 4), float("inf"))
    for cq, ck in (([0, 1], [0, 0]), ([0, 0], [0, 1])):
        cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
        out, lse, _ = posattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 1, return_attn_probs=True,
                                                     backend="torch")
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        (dq,) = torch.autograd.grad(out, [q], torch.ones_like(out))
        assert torch.equal(dq, torch.zeros_like(dq))


def test_reference_varlen_alibi_slopes_with_position():
    # test_fuzz_varlen_torch: lens_q=[1], lens_k=[0], alibi_slopes (num_heads,), position=[XPos()]
    # reference.varlen_attention appended ALiBi to list(parse_position(position)), which holds None for the
    # empty slots -> TypeError; the truth must accept alibi_slopes together with a rotary/URPE position.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.25])
    out, _ = R.varlen_attention(q, k, v, cu, cu, alibi_slopes=slopes, position=posattn.XPos())
    want, _ = R.varlen_attention(q, k, v, cu, cu, position=[posattn.XPos(), posattn.ALiBi(slopes)])
    assert torch.equal(out, want)


def _hidden_key_case(case):
    """(q, k, v (B, H|Hk, S, D) fp32, kwargs of R.attention, run(q, k, v, *leaves) -> out (B, H, Sq, D),
    leaves, hidden (B, Hk, Sk) bool: keys no query of the kv head's group sees)."""
    from fuzz_helpers import hidden_keys, visibility
    g = torch.Generator().manual_seed(0)
    B, H, Hk, D = 1, 2, 1, 16
    Sq, Sk = (1, 2) if case == "causal_1x2" else (3, 40)
    q = torch.randn(B, H, Sq, D, generator=g)
    k = torch.randn(B, Hk, Sk, D, generator=g)
    v = torch.randn(B, Hk, Sk, D, generator=g)
    leaves, ref_kw = [], {}
    if case in ("causal_1x2", "causal"):
        ref_kw = dict(causal=True)
        allowed = visibility(B, H, Sq, Sk, causal=True, offset=0)

        def run(q, k, v):
            return posattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
    elif case == "window":   # bottom-right causal, window (4, 0): keys 0..32 hidden, key 32 in a visible block
        ref_kw = dict(causal=True, offset=Sk - Sq, window_size=(4, 0), softcap=2.0)
        allowed = visibility(B, H, Sq, Sk, causal=True, offset=Sk - Sq, left=4, right=0)

        def run(q, k, v):
            out = posattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                          window_size=(4, 0), softcap=2.0, backend="triton")
            return out.transpose(1, 2)
    else:                    # key padding (bool) / -inf float mask; learned phases read the hidden keys too
        pad = torch.rand(B, 1, 1, Sk, generator=g) < 0.5
        pad[..., :2] = True
        if case == "float_mask":
            mask = torch.randn(B, 1, 1, Sk, generator=g).masked_fill(~pad, float("-inf"))
            allowed = visibility(B, H, Sq, Sk, causal=False, offset=0, float_mask=mask)
        else:
            mask = pad
            allowed = visibility(B, H, Sq, Sk, causal=False, offset=0, bool_mask=mask)
        ref_kw = dict(attn_mask=mask)
        if case == "phases_mask":
            leaves = [(0.2 + 0.8 * torch.rand(B, H, Sk, generator=g)).requires_grad_(True)]

        def run(q, k, v, *fr):
            pos = posattn.LearnedPhaseRoPE(fr[0]) if fr else None
            return posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, position=pos,
                                                        backend="triton")
    return q, k, v, ref_kw, run, leaves, hidden_keys(allowed, Hk)


@pytest.mark.interp
@pytest.mark.parametrize("case", ["causal_1x2", "causal", "window", "bool_mask", "float_mask", "phases_mask"])
def test_causally_hidden_nan_keys_leak_into_triton_kernel(case):
    # test_fuzz_sdpa_triton: seed=0, float32, batch=1, heads=(1, 1), seqlen_q=1, seqlen_k=2, head_dim=16,
    # is_causal=True, poison_hidden_keys=nan (key 1 is hidden from the only query, top-left causal)
    # The Triton kernels read keys hidden by the causal mask / window / attn_mask inside a partly visible key
    # block: p = 0 but p @ v (and dp = dO v^T, ds @ k, the phase gradient) formed 0 * NaN = NaN. Keys no query
    # sees are now never read (zeros), forward and backward; results must equal the clean float64 truth.
    q, k, v, ref_kw, run, leaves, hid = _hidden_key_case(case)
    assert hid.any() and not hid.all()
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_pos = None if not leaves else posattn.LearnedPhaseRoPE(leaves[0])
    ro, _ = R.attention(q64, k64, v64, position=ref_pos, **ref_kw)
    dout = torch.randn(ro.shape, generator=torch.Generator().manual_seed(1))
    want = grads(ro, [q64, k64, v64] + leaves, dout.double())
    for fill in (float("nan"), float("inf")):
        kp, vp = k.clone(), v.clone()
        kp[hid], vp[hid] = fill, -fill
        qa, ka, va = (t.clone().requires_grad_(True) for t in (q, kp, vp))
        with poisoned_allocations():
            out = run(qa, ka, va, *leaves)
            got = grads(out, [qa, ka, va] + leaves, dout)
        check_close(out, ro, torch.float32)
        names = ["dq", "dk", "dv", "d_leaf0"][:len(got)]
        for gt, w, n, f in zip(got, want, names, grad_floor(want, names, positions=k.shape[2])):
            check_close(gt, w, torch.float32, grad=True, name=n, scale=f,
                        terms=q.numel() // q.shape[-1] * k.shape[2] if n == "d_leaf0" else None)
        assert (got[1][hid] == 0).all() and (got[2][hid] == 0).all()


@pytest.mark.parametrize("kind", ["relative_bias", "urpe", "alibi_slopes"])
@pytest.mark.parametrize("api", ["sdpa", "flash_attn_func"])
def test_float64_positional_tables_keep_float64_on_torch_backend(kind, api):
    # new-user report: kernel_args cast tables/slopes to fp32, so float64 q/k/v with float64 tables were only
    # ~1e-8 accurate and torch.autograd.gradcheck failed ("Jacobian mismatch ... input 3") for RelativeBias,
    # URPE and ALiBi slopes on the torch backend. float64 inputs now get float64 tables (kernels keep fp32).
    from tolerances import assert_close
    H, S, D = 2, 5, 4
    if kind == "relative_bias":
        param = torch.randn(H, 7, dtype=torch.float64)
        make = lambda t: posattn.RelativeBias(t, max_distance=3)  # noqa: E731
    elif kind == "urpe":
        param = 1 + 0.3 * torch.randn(H, 7, dtype=torch.float64)
        make = lambda t: posattn.URPE(t, max_distance=3)  # noqa: E731
    else:
        param = torch.rand(H, dtype=torch.float64) + 0.1
        make = posattn.ALiBi
    q, k, v = (torch.randn(1, H, S, D, dtype=torch.float64) for _ in range(3))

    def f(q, k, v, t):
        if api == "sdpa":
            return posattn.scaled_dot_product_attention(q, k, v, is_causal=True, position=make(t), backend="torch")
        out = posattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                      position=make(t), backend="torch")
        return out.transpose(1, 2)

    ro, _ = R.attention(q, k, v, causal=True, position=make(param))
    assert_close(f(q, k, v, param), ro, torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v, param))
    assert torch.autograd.gradcheck(f, inputs)
    # the kernels' copy stays fp32
    pe = posattn.positional.kernel_args(make(param), batch_size=1, num_heads=H, seqlen_q=S, seqlen_k=S,
                                        head_dim=D, offset=0, device="cpu")
    assert all(t.dtype == torch.float32 for t in (pe.bias_table, pe.urpe_table, pe.alibi_slopes) if t is not None)


@pytest.mark.interp
def test_varlen_triton_return_attn_probs_with_grad_inputs():
    # new-user report: flash_attn_varlen_func(..., return_attn_probs=True, backend="triton") raised at forward
    # time when q/k/v required grad, even if lse was never differentiated; flash_attn_func only refuses a
    # gradient that actually flows into lse (in backward). Varlen now does the same.
    from tolerances import assert_close
    q, k, v = (torch.randn(5, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    ro, rl = R.varlen_attention(q, k, v, cu, cu, causal=True)
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse, _ = posattn.flash_attn_varlen_func(qa, ka, va, cu, cu, 3, 3, causal=True, return_attn_probs=True,
                                                 backend="triton")
    assert_close(out, ro, torch.float32)
    assert_close(lse, rl, torch.float32, name="lse")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [qa, ka, va], dout, retain_graph=True)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    r64, _ = R.varlen_attention(q64, k64, v64, cu, cu, causal=True)
    want = torch.autograd.grad(r64, [q64, k64, v64], dout.double())
    for g, w, n in zip((dq, dk, dv), want, ("dq", "dk", "dv")):
        assert_close(g, w, torch.float32, grad=True, name=n)
    # a zero gradient into lse is no gradient; a non-zero one is refused, not dropped
    torch.autograd.grad([out, lse], [qa], [dout, torch.zeros_like(lse)], retain_graph=True)
    with pytest.raises(RuntimeError, match="gradient through the returned lse"):
        torch.autograd.grad([out, lse], [qa], [dout, torch.ones_like(lse)])


def test_error_messages_a_new_user_met():
    # new-user report: messages that hid the cause. Each names the argument and now says the likely fix.
    sdpa = posattn.scaled_dot_product_attention
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    layout = r"layout: the SDPA drop-in takes \(batch, heads, seq, head_dim\); flash_attn_func takes"
    # forgetting enable_gqa: the hint was unreachable behind the broadcast check
    with pytest.raises(ValueError, match=r"^key: num_heads_k=2 differs .*pass enable_gqa=True for grouped-query"):
        sdpa(q, k, k)
    # heads that no GQA explains: no GQA hint, but the layout hint (q given as (B, S, H, D))
    with pytest.raises(ValueError, match=layout) as err:
        sdpa(q.transpose(1, 2), q, q)                     # query (2, 6, 4, 8): 6 "heads" vs 4
    assert "enable_gqa" not in str(err.value)
    with pytest.raises(ValueError, match=r"^key: enable_gqa=True needs .*" + layout):
        sdpa(q.transpose(1, 2), q, q, enable_gqa=True)
    with pytest.raises(ValueError, match=r"^k: num_heads=4 must be a multiple of num_heads_k.*" + layout):
        posattn.flash_attn_func(torch.randn(2, 6, 4, 8), torch.randn(2, 6, 3, 8), torch.randn(2, 6, 3, 8))
    # kernelized_rpe_attention in the (B, S, H, D) layout blamed rpe_bias
    qs = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match=r"^q: expected \(batch_size, num_heads, seqlen_q, head_dim\).*transpose"):
        posattn.kernelized_rpe_attention(qs, qs, qs, torch.zeros(2, 19))
    with pytest.raises(ValueError, match=r"^rpe_bias: expected \(num_heads=2, seqlen_q \+ seqlen_k - 1=19\)"):
        posattn.kernelized_rpe_attention(qs.transpose(1, 2), qs.transpose(1, 2), qs.transpose(1, 2), torch.zeros(2, 18))
    # mask dtype list without duplicates
    with pytest.raises(TypeError, match=r"^attn_mask: expected dtype in \(bool, float32\), got int64$"):
        sdpa(q, q, q, attn_mask=torch.ones(6, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^attn_mask: expected dtype in \(bool, float32, float16\), got int64$"):
        sdpa(q.half(), q.half(), q.half(), attn_mask=torch.ones(6, 6, dtype=torch.int64))
    # apply_rotary(inplace=True) on a leaf that requires grad: a ValueError naming x, x untouched
    x = torch.randn(1, 4, 2, 8, requires_grad=True)
    before = x.detach().clone()
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    for arg in (x, x[:, :3]):
        with pytest.raises(ValueError, match=r"^x: inplace=True cannot write into a leaf tensor that requires grad"):
            posattn.apply_rotary(arg, cos, sin, inplace=True)
    assert torch.equal(x.detach(), before)
    with torch.no_grad():  # allowed without autograd, as torch allows it
        assert posattn.apply_rotary(x, cos, sin, inplace=True) is x
    # backend typos list the op's own backends only
    with pytest.raises(ValueError, match=r"^backend: expected one of 'auto', 'triton', 'torch', got 'cdua'$"):
        sdpa(q, q, q, backend="cdua")
    with pytest.raises(ValueError, match=r"got 'cuda' \(scaled_dot_product_attention has no 'cuda' backend\)$"):
        sdpa(q, q, q, backend="cuda")
    codes = torch.ones(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"^backend: expected one of 'auto', 'triton', 'cuda', 'torch', got 'x'$"):
        posattn.ecoformer_attention(codes, codes, torch.randn(1, 1, 4, 8), backend="x")


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_torch_fast_path_last_dim_strided(which, gqa):
    """Deep fuzz profile (test_fuzz_sdpa_torch), minimal example: batch 1, heads (4, 2), seqlen 1 x 1,
    head_dim 7, layout_k='strided' (every other element, NaN in the gaps) -> relative error 1.0 / NaN.
    torch's fused CPU kernel behind the torch backend's fast path misreads a non-unit head_dim stride."""
    import posattn
    from posattn import reference
    hq = 4 if gqa else 2
    shapes = {"q": (1, hq, 5, 7), "k": (1, 2, 6, 7), "v": (1, 2, 6, 7)}
    t = {n: torch.randn(*s) for n, s in shapes.items()}
    base = torch.full((*shapes[which][:-1], 14), float("nan"))
    base[..., ::2] = t[which]
    t[which] = base[..., ::2]
    assert t[which].stride(-1) == 2
    for causal in (False, True):
        out = posattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal, enable_gqa=gqa)
        ref, _ = reference.attention(t["q"].double(), t["k"].double(), t["v"].double(), causal=causal)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_varlen_torch_last_dim_strided():
    """Same kernel in the varlen torch backend: q/k/v (total, heads, head_dim) with head_dim stride 2."""
    import posattn
    from posattn import reference
    lens = [3, 5]
    total = sum(lens)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    t = {}
    for n in "qkv":
        base = torch.full((total, 2, 16), float("nan"))
        base[..., ::2] = torch.randn(total, 2, 8)
        t[n] = base[..., ::2]
    out = posattn.flash_attn_varlen_func(t["q"], t["k"], t["v"], cu, cu, 5, 5)
    for b, (s, e) in enumerate([(0, 3), (3, 8)]):
        ref, _ = reference.attention(*(t[n][s:e].transpose(0, 1)[None].double() for n in "qkv"))
        torch.testing.assert_close(out[s:e].transpose(0, 1)[None].double(), ref, atol=2e-5, rtol=2e-5)


# Deep profile of the Triton interpreter backends (2026-11-30), first 500-example batches: fp16 gradients with
# large values (N(0, 2.5^2)) and a rotary encoding, often with softcap, over the dtype's table, e.g.
#   flash_attn_func: seed 0, fp16, batch 1, heads (1, 1), seqlen_q 2, seqlen_k 16, head_dim 16, 'large',
#     softcap 0.5, alibi_slopes (1,), position [XPos(scale_base=32.0)]:  dq relative L2 1.1e-2 > 4e-3
#   flash_attn_func: seed 162121, fp16, seqlen_q 5, seqlen_k 17, causal, window (3, -1), softcap 5.0, scale 0.3,
#     alibi (2,), [LearnedPhaseRoPE(freqs (1, 2, 17), rotary_dim=14)]:  dq 1 of 160 elements 5.6e-3 off
#   scaled_dot_product_attention: seed 2714, fp16, heads (2, 2), seqlen_q 1, seqlen_k 2/3, head_dim 16, 'large'
#     or 'unit' with scale 1.3, [LearnedPhaseRoPE, URPE(max_distance=1)] / [XPos(scale_base=32.0), URPE]:
#     phase gradient 2.4e-2 > 1.6e-2; dk 1 element 1.6e-2 off
#   flash_attn_varlen_func: seed 0, fp16, lens_q [0, 5, 0], lens_k [0, 3, 0], heads (3, 3), head_dim 16,
#     'large', softcap 2.0, alibi (3, 3), [XPos(scale_base=32.0)]:  dk relative L2 4.3e-3 > 4e-3
# Not kernel bugs: the kernels round the rotated q / k, P, dS and out (for delta = rowsum(dO * out)) to fp16
# for the tensor-core dots, as FlashAttention does; the softcap derivative (1 - tanh^2 of a pre-cap logit of
# ~20-50) and cancelling phase gradients amplify those roundings past the table. The errors are the size of
# reference.attention(kernel_rounding=fp16)'s (the second oracle of fuzz_helpers.check_close); this pins
# that the Triton backward stays within EMULATION_FACTOR of it in this regime.
_ROUNDING_CASES = {
    "xpos_softcap_alibi": dict(sq=2, sk=16, h=1, softcap=0.5, scale=None, causal=False, window=(-1, -1),
                               alibi=True, position=lambda g: [posattn.XPos(scale_base=32.0)]),
    "phases_softcap_window": dict(sq=5, sk=17, h=2, softcap=5.0, scale=0.3, causal=True, window=(3, -1),
                                  alibi=True, position=lambda g: [posattn.LearnedPhaseRoPE(
                                      (0.05 + 0.95 * torch.rand(1, 2, 17, generator=g)).requires_grad_(True),
                                      rotary_dim=14)]),
    # bf16, no encoding: dq's error is all delta = rowsum(dO * out) of the rounded out (deep profile:
    # seed 0, batch 2, heads (3, 3), seqlen 2 x 2, causal, head_dim 32, 'large', softcap 5, scale 1.0: dq 5.9e-2)
    "bf16_softcap_no_position": dict(sq=2, sk=2, h=3, softcap=5.0, scale=1.0, causal=True, window=(-1, -1),
                                     alibi=False, position=lambda g: [], dtype=torch.bfloat16, head_dim=32),
    "xpos_urpe_scale": dict(sq=1, sk=3, h=2, softcap=0.0, scale=1.3, causal=False, window=(-1, -1), alibi=False,
                            position=lambda g: [posattn.XPos(scale_base=32.0),
                                                posattn.URPE((torch.rand(2, 3, generator=g) + 0.5).requires_grad_(True),
                                                             max_distance=1)]),
}


@pytest.mark.interp
@pytest.mark.parametrize("case", sorted(_ROUNDING_CASES))
def test_low_precision_triton_gradients_within_kernel_rounding(case):
    from fuzz_helpers import emulation_factor, emulations, logit_cond, values
    c = _ROUNDING_CASES[case]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        dt, d = c.get("dtype", torch.float16), c.get("head_dim", 16)
        q = values((1, c["sq"], c["h"], d), dt, "large", g)
        k = values((1, c["sk"], c["h"], d), dt, "large", g)
        v = values((1, c["sk"], c["h"], d), dt, "large", g)
        alibi = 0.02 + torch.rand(c["h"], generator=g) if c["alibi"] else None
        position = c["position"](g)
        leaves = [t for p in position for t in (getattr(p, "freqs", None), getattr(p, "table", None))
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        ref_pos = position + ([posattn.ALiBi(alibi)] if alibi is not None else [])
        q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
        left, right = c["window"]
        kw = dict(scale=c["scale"], causal=c["causal"], offset=c["sk"] - c["sq"], softcap=c["softcap"],
                  window_size=(left if left >= 0 else -1, right), position=ref_pos)

        def ref(**kr):
            o, lse = R.attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2), **kw, **kr)
            return o.transpose(1, 2), lse
        ro, _ = ref()
        emus = emulations(ref, "triton", dt, seed)
        qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
        with poisoned_allocations():
            out = posattn.flash_attn_func(qa, ka, va, softmax_scale=c["scale"], causal=c["causal"],
                                          window_size=c["window"], softcap=c["softcap"], alibi_slopes=alibi,
                                          position=position, backend="triton")
            dout = values(out.shape, dt, "unit", g)
            got = grads(out, [qa, ka, va] + leaves, dout)
        want = grads(ro, [q64, k64, v64] + leaves, dout.double())
        emu = list(zip(*[grads(o, [q64, k64, v64] + leaves, dout.double()) for o, _ in emus]))
        cond = logit_cond(q, k, c["scale"], softcap=c["softcap"], grad=True)
        names = ["dq", "dk", "dv"] + [f"d_leaf{i}" for i in range(len(leaves))]
        for gg, w, n, f, we in zip(got, want, names, grad_floor(want, names, positions=c["sk"]), emu):
            terms = c["h"] * c["sq"] * c["sk"] if n.startswith("d_leaf") else None
            check_close(gg, w, dt, grad=True, name=f"{case} seed {seed} {n}", scale=f, terms=terms,
                        cond=cond, emulated=list(we),
                    emulation_factor=emulation_factor(position))


# Deep profile 2026-11-30 (flash_attn_func, torch backend, after 4,000 passing examples): fp32, batch 1, heads
# (1, 1), packing 'qkv', seqlen 31, head_dim 40, 'large' values, softcap 0.5, softmax_scale 1.0, alibi_slopes (1,),
# position [XPos(theta=100.0, scale_base=32.0)]: dq relative L2 error 3.8e-5 > 2e-5 (the table; the previous
# recompute backward gave the same). Analysis: logits near the cap's knee (|s| / softcap < 4) have
# sum_d |q_d k_d| up to ~230, so fp32 computes them with an absolute error of ~eps * 230 ~ 1.4e-5 (any fp32 dot
# does; the float64 reference's logit differs by that much); the backward multiplies dS by 1 - tanh^2(s / 0.5),
# whose relative error is 2 |tanh| * 1.4e-5 / 0.5 ~ 6e-5 per element. The test's model was wrong, not the
# kernel: logit_cond capped the logit bound by softcap (true for the capped value, false for its error and for
# the cap's derivative). logit_cond(grad=True) now widens gradients by B * max(1, 2 / softcap) / 8 (B: the
# Cauchy-Schwarz logit bound, 379 here: factor 190). Emulating only the rounding of each logit to nearest
# (relative to |s|, not to sum |q k|) gives 1e-6-5e-6: too small, which is how the error was located.
def test_fp32_softcap_gradient_error_follows_logit_magnitude():
    from fuzz_helpers import check_close, grad_floor, logit_cond, values
    g = torch.Generator().manual_seed(1)
    alibi = 0.02 + torch.rand(1, generator=g)
    q, k, v = (values((1, 31, 1, 40), torch.float32, "large", g) for _ in range(3))
    position = [posattn.XPos(theta=100.0, scale_base=32.0)]
    qkv = torch.stack([q, k, v], dim=2).requires_grad_(True)
    out = posattn.flash_attn_qkvpacked_func(qkv, softmax_scale=1.0, softcap=0.5, alibi_slopes=alibi,
                                            position=position, backend="torch")
    dout = values(out.shape, torch.float32, "unit", g)
    got = torch.autograd.grad(out, qkv, dout)[0].unbind(2)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ro, _ = R.attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2), scale=1.0, softcap=0.5,
                        position=position + [posattn.ALiBi(alibi)])
    want = torch.autograd.grad(ro.transpose(1, 2), (q64, k64, v64), dout.double())
    cond = logit_cond(q, k, 1.0, softcap=0.5, grad=True)
    assert cond > 100                        # the regime: the old rule (softcap-capped bound) gave 1
    names = ["dq", "dk", "dv"]
    for gg, w, n, f in zip(got, want, names, grad_floor(want, names, positions=31)):
        check_close(gg, w, torch.float32, grad=True, name=n, scale=f, cond=cond)


# Break-it pass 2026-11-30: RoPE at large positions in fp32 misses the fp32 table (4e-4 at ~3e4, up to 5e-3 at
# ~1e6): fp32 angles (positions x fp32 inverse frequencies, FlashAttention's and transformers' convention; the
# issue fixes "angles computed in fp32") are off by ~|position| * 6e-8 rad. Documented in RoPE's docstring
# ("Precision"); this pins the documented size (so a regression to coarser angles shows) and float64 exactness.
@pytest.mark.parametrize("start", [30000, 130000])
def test_rope_far_positions_error_is_the_documented_fp32_angle_error(start):
    g = torch.Generator().manual_seed(start)
    q, k, v = (torch.randn(1, 2, 6, 64, generator=g) for _ in range(3))
    p = posattn.RoPE(position_ids=torch.arange(6) + start)
    want = R.attention(q.double(), k.double(), v.double(), position=p)[0]
    err = (posattn.scaled_dot_product_attention(q, k, v, position=p, backend="torch").double() - want).abs().max()
    assert err <= 6e-8 * (start + 6) * 1.0, err       # one angle error's worth, |v| ~ 1 (measured 3e-4 / 3e-3)
    q64, k64, v64 = q.double(), k.double(), v.double()
    err64 = (posattn.scaled_dot_product_attention(q64, k64, v64, position=p, backend="torch") - want).abs().max()
    assert err64 <= 1e-12, err64


# Deep profile 2026-11-30, after the break-it fixes: apply_rotary(inplace=True) on an empty x (seqlen 0, batch 2)
# whose strides come out (0, 2, 0, 1) raised "x: is written in place, so its elements must not share memory":
# _checks.may_overlap judged the stride-0 batch dim without noticing that the tensor has no element at all.
def test_apply_rotary_inplace_on_empty_x_with_stride_zero_dims():
    x = torch.empty(2, 0, 1, 2).as_strided((2, 0, 1, 2), (0, 2, 0, 1))
    cos, sin = torch.rand(4, 1), torch.rand(4, 1)
    out = posattn.apply_rotary(x, cos, sin, inplace=True)
    assert out.shape == (2, 0, 1, 2)


# Deep profile 2026-11-30 (EcoFormerAttention, torch, after 4,089 examples): seed 424, 1 head, head_dim 8, batch 2,
# seqlen 2, 64 (then 70) bits, 1 anchor, 'consistent', fitted hash, right padding, 'ties' values: the module's output
# vs the float64 reference 1.97e-5 (1.18e-5) > 1e-5 relative to |y|. Not a bug: fp32 round-off relative to the
# terms summed. The op's linear form computes out_i = [h_i^T S + (b+1) s] / [h_i^T z + (b+1) n]: for a query whose
# one visible key has the opposite code, h_i^T S = -b v_j and (b+1) v_j cancel to v_j, so the op alone is off by
# 2.7e-5 relative (~b eps); the output projection's E = 8 products cancel again (rms |y| 0.36).
# tests/test_fuzz_modules.py now measures against that magnitude (sum (2b+1)|v_j| / den_i through |W|). This replays
# both examples: DidNotReproduce means they ran and passed.
@pytest.mark.parametrize("blob", [b"AEIBqEEBQQJBAkECQQRBAQBBAEEDQQFBAkEB", b"AEIBqEEBQQJBAkECQQVBAQBBAEEDQQFBAkEB"])
def test_ecoformer_module_output_projection_cancellation(blob):
    from hypothesis import given, reproduce_failure, strategies as st
    from hypothesis.errors import DidNotReproduce
    import test_fuzz_modules as M

    @reproduce_failure("6.155.2", blob)
    @given(data=st.data())
    def case(data):
        M._eco_module_case(data, "torch")
    with pytest.raises(DidNotReproduce):
        case()
