"""Property-based fuzzing of posattn.scaled_dot_product_attention (torch backend, Triton interpreter) against
reference.attention in float64: shapes (leading batch dims, unbatched, kv batch broadcast), dtypes, layouts,
GQA/MQA, lengths with 0 and 1 and block boundaries, causal, bool/float masks of every broadcast shape (fully
masked rows included), every positional encoding and their compositions, value regimes with exact ties;
forward and gradients (q, k, v, learnable tables, a float mask). Keys that no query can see are filled with
NaN/inf: the results and gradients must not change. Inputs must be bit-identical after forward and backward.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from fuzz_helpers import (grad_output, DTYPES, LAYOUTS, LENGTHS, LENGTHS_TINY, SEEDS, VALUE_KINDS, assert_unchanged,
                          check_close, grad_floor, grads, heads, hidden_keys, logit_cond, Emulations, emulation_factor, poison_rows,
                          poisoned_allocations, position_spec, snapshot, values, visibility, with_layout)
from hypothesis_profiles import examples

POISON = (None, float("nan"), float("inf"))


def _sdpa_case(data, backend):
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    B = draw(st.integers(1, 2), label="batch")
    H, Hk = draw(heads(4 if triton else 6), label="heads")
    Sq = draw(LENGTHS_TINY if triton else LENGTHS, label="seqlen_q")
    Sk = draw(LENGTHS_TINY if triton else LENGTHS, label="seqlen_k")
    D = draw(st.sampled_from([16, 24, 32] if triton else [1, 7, 8, 16, 40]), label="head_dim")
    Dv = D if triton else draw(st.sampled_from([D, 12]), label="head_dim_v")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    is_causal = draw(st.booleans(), label="is_causal")
    enable_gqa = True if Hk not in (1, H) else draw(st.booleans(), label="enable_gqa")
    scale = draw(st.sampled_from([None, 0.05, 0.5, 1.3]), label="scale")

    # mask (not with is_causal): bool or float, broadcast shape (mb, mh, mq, Sk) with leading dims dropped
    mask_kind = "none" if is_causal else draw(st.sampled_from(["none", "bool", "float"]), label="mask")
    bool_mask = float_mask = mask = None
    mask_grad = False
    if mask_kind != "none":
        mb = draw(st.sampled_from([1, B]))
        mh = draw(st.sampled_from([1, H]))
        mq = draw(st.sampled_from([1, Sq]))
        mshape = (mb, mh, mq, Sk)
        mdims = draw(st.sampled_from([2, 3, 4]) if (mb == 1 and (mh == 1 or True)) else st.just(4))
        if mb != 1:
            mdims = 4
        elif mh != 1:
            mdims = max(mdims, 3)
        if mask_kind == "bool":
            p = draw(st.sampled_from([0.3, 0.8]))
            full = torch.rand(mshape, generator=gen) < p
            bool_mask = full.expand(B, H, Sq, Sk)
        else:
            full = torch.randn(mshape, generator=gen) * 2
            full = full.masked_fill(torch.rand(mshape, generator=gen) < 0.2, -math.inf)
            full = full.to(draw(st.sampled_from([torch.float32, dtype])))
            float_mask = full.expand(B, H, Sq, Sk)
            mask_grad = not triton and draw(st.booleans(), label="mask_grad")
        mask = full.reshape(mshape[4 - mdims:])

    position, leaves = draw(position_spec(batch=B, heads=H, seqlen_q=Sq, seqlen_k=Sk, head_dim=D, offset=0,
                                          gen=gen, learnable_alibi=not triton), label="position")
    shape_kind = draw(st.sampled_from(["4d", "5d", "3d", "kv_bcast"]), label="shape")
    if shape_kind == "3d" and (B != 1 or (mask is not None and mask.dim() == 4)):
        shape_kind = "4d"
    if shape_kind == "kv_bcast" and B == 1:
        shape_kind = "4d"
    layouts = [draw(st.sampled_from(LAYOUTS), label=f"layout_{n}") for n in "qkv"]
    # both backends: keys no query sees are never read (test_regressions.py::
    # test_causally_hidden_nan_keys_leak_into_triton_kernel for the Triton kernels)
    poison = draw(st.sampled_from(POISON), label="poison_hidden_keys")

    Bk = 1 if shape_kind == "kv_bcast" else B
    q = values((B, H, Sq, D), dtype, kind, gen)
    k = values((Bk, Hk, Sk, D), dtype, kind, gen)
    # tiny q/k give near-uniform softmax; v stays unit-scale (tiny fp16 outputs would be subnormal)
    v = values((Bk, Hk, Sk, Dv), dtype, "unit" if kind == "tiny" else kind, gen)

    cond = logit_cond(q, k, scale)
    # truth on float64 leaves (the same rounded values)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    m64 = None
    if mask is not None:
        m64 = mask.double().requires_grad_(True) if mask_grad else mask
    ref_kw = dict(scale=scale, causal=is_causal, offset=0, attn_mask=m64, position=position)
    ro, _ = R.attention(q64, k64.expand(B, -1, -1, -1), v64.expand(B, -1, -1, -1), **ref_kw)
    # second oracle: the kernel's roundings (fuzz_helpers.kernel_rounding)
    emu = Emulations(lambda **kr: R.attention(q64, k64.expand(B, -1, -1, -1), v64.expand(B, -1, -1, -1),
                                              **ref_kw, **kr), backend, dtype, seed)

    # keys nobody sees may hold anything
    k_in, v_in = k, v
    if poison is not None and Bk == B:
        allowed = visibility(B, H, Sq, Sk, causal=is_causal, offset=0, bool_mask=bool_mask, float_mask=float_mask)
        hid = hidden_keys(allowed, Hk)
        k_in = poison_rows(k, hid, "bhsd", poison)
        v_in = poison_rows(v, hid, "bhsd", -poison)

    def api(t):
        if shape_kind == "5d":
            return t.reshape((1,) + tuple(t.shape))
        if shape_kind == "3d":
            return t[0]
        return t

    qa, ka, va = (with_layout(api(t), lay).requires_grad_(True) for t, lay in zip((q, k_in, v_in), layouts))
    ma = None
    if mask is not None:
        ma = mask.clone().requires_grad_(mask_grad)
    snap = snapshot(q=qa, k=ka, v=va, mask=ma)
    with poisoned_allocations():
        out = posattn.scaled_dot_product_attention(qa, ka, va, attn_mask=ma, is_causal=is_causal, scale=scale,
                                                   enable_gqa=enable_gqa, position=position, backend=backend)
        assert out.dtype == dtype
        assert out.requires_grad, "out is detached from the inputs' graph"
        out4 = out.reshape(B, H, Sq, Dv)
        check_close(out4, ro, dtype, name="out", cond=cond, emulated=emu.output(0),
                    emulation_factor=emulation_factor(position))
        dout = grad_output(data, out4.shape, dtype, gen)
        ours = [qa, ka, va] + leaves + ([ma] if mask_grad else [])
        theirs = [q64, k64, v64] + leaves + ([m64] if mask_grad else [])
        got = grads(out4, ours, dout)
    want = grads(ro, theirs, dout.double())
    emu_g = emu.grads(theirs, dout.double(), len(want))
    names = ["dq", "dk", "dv"] + [f"d_leaf{i}" for i in range(len(leaves))] + (["d_mask"] if mask_grad else [])
    for g, w, n, f, we in zip(got, want, names, grad_floor(want, names, positions=max(Sq, Sk)), emu_g):
        terms = B * H * Sq * Sk if n.startswith("d_leaf") or n == "d_mask" else None
        check_close(g.reshape(w.shape), w, dtype, grad=True, name=n, scale=f, terms=terms, cond=cond,
                    emulated=we,
                    emulation_factor=emulation_factor(position))
    assert_unchanged(snap, q=qa, k=ka, v=va, mask=ma)


@given(data=st.data())
@examples(30)
def test_fuzz_sdpa_torch(data):
    _sdpa_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(6)
def test_fuzz_sdpa_triton(data):
    _sdpa_case(data, "triton")
