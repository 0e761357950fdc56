"""Property-based fuzzing of posattn.flash_attn_func and its packed variants (flash_attn_qkvpacked_func,
flash_attn_kvpacked_func) on the torch backend and the Triton interpreter, against reference.attention in
float64 with FlashAttention's bottom-right alignment: window sizes (including ones past seqlen_k), softcap,
alibi_slopes, deterministic, GQA/MQA with odd groups, seqlen_q != seqlen_k both ways with 0 and 1, every positional
encoding and their compositions, dtypes, layouts, value regimes; out, lse and every gradient (of a subset of
q, k, v too; through out and the returned lse on the torch backend). Keys no query
can see hold NaN/inf and must not change anything; inputs are bit-identical afterwards.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from posattn.flash_attn_interface import normalize_window
from fuzz_helpers import (grad_output, lse_floor, DTYPES, LAYOUTS, LENGTHS, LENGTHS_TINY, SEEDS, VALUE_KINDS, assert_unchanged,
                          check_close, grad_floor, grads, heads, hidden_keys, logit_cond, Emulations, emulation_factor, poison_rows,
                          poisoned_allocations, position_spec, snapshot, values, visibility, with_layout)
from hypothesis_profiles import examples


def _fa_case(data, backend):
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    B = draw(st.integers(1, 2), label="batch")
    H, Hk = draw(heads(4 if triton else 6), label="heads")
    packing = draw(st.sampled_from(["none", "none", "kv", "qkv"]), label="packing")
    Sq = draw(LENGTHS_TINY if triton else LENGTHS, label="seqlen_q")
    Sk = Sq if packing == "qkv" else draw(LENGTHS_TINY if triton else LENGTHS, label="seqlen_k")
    if packing == "qkv":
        Hk = H
    D = draw(st.sampled_from([16, 24, 32] if triton else [1, 6, 8, 16, 40]), label="head_dim")
    Dv = D if (triton or packing != "none") else draw(st.sampled_from([D, 12]), label="head_dim_v")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    causal = draw(st.booleans(), label="causal")
    wl = draw(st.sampled_from([-1, -1, 0, 1, 3, 16, 100]), label="window_left")
    wr = draw(st.sampled_from([-1, -1, 0, 2, 16, 100]), label="window_right")
    softcap = draw(st.sampled_from([0.0, 0.0, 0.5, 5.0]), label="softcap")
    scale = draw(st.sampled_from([None, 0.3, 1.0]), label="softmax_scale")
    offset = Sk - Sq
    slopes_kind = draw(st.sampled_from(["none", "none", "heads", "batch_heads"]), label="alibi_slopes")
    # alibi_slopes is an additive bias: position= may then hold no other one
    allow = ("rope", "xpos", "phase", "urpe") + (("alibi", "relative", "t5") if slopes_kind == "none" else ())
    position, leaves = draw(position_spec(batch=B, heads=H, seqlen_q=Sq, seqlen_k=Sk, head_dim=D, offset=offset,
                                          gen=gen, learnable_alibi=not triton, allow=allow), label="position")
    alibi = None
    if slopes_kind != "none":
        alibi = 0.02 + torch.rand((H,) if slopes_kind == "heads" else (B, H), generator=gen)
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    # both backends (Triton: test_regressions.py::test_causally_hidden_nan_keys_leak_into_triton_kernel)
    poison = draw(st.sampled_from([None, float("nan"), float("inf")]), label="poison_hidden_keys")
    deterministic = draw(st.booleans(), label="deterministic")
    # which of q, k, v require grad (unpacked inputs): the backward must give each needed gradient alone
    grad_of = draw(st.sampled_from(["qkv", "qkv", "q", "k", "v", "kv"]), label="requires_grad") \
        if packing == "none" else "qkv"
    # a loss through the returned lse too (torch backend; the Triton backward refuses a gradient into lse)
    lse_grad = not triton and draw(st.sampled_from([False, False, True]), label="loss_through_lse")

    q = values((B, Sq, H, D), dtype, kind, gen)
    k = values((B, Sk, Hk, D), dtype, kind, gen)
    v = values((B, Sk, Hk, Dv), dtype, "unit" if kind == "tiny" else kind, gen)
    left, right = normalize_window((wl, wr), causal, Sk)
    cond = logit_cond(q, k, scale, softcap=softcap)
    gcond = logit_cond(q, k, scale, softcap=softcap, grad=True)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_pos = position
    if alibi is not None:
        ref_pos = ([p for p in position] if isinstance(position, list) else
                   ([] if position is None else [position])) + [posattn.ALiBi(alibi)]
    ref_kw = dict(scale=scale, causal=causal, offset=offset, window_size=(left, right), softcap=softcap,
                  position=ref_pos)
    ro, rl = R.attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2), **ref_kw)
    ro = ro.transpose(1, 2)
    # second oracle: the kernel's roundings (fuzz_helpers.kernel_rounding)
    emu = Emulations(lambda **kr: R.attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2),
                                              **ref_kw, **kr), backend, dtype, seed, transform=lambda o: o.transpose(1, 2))

    k_in, v_in = k, v
    if poison is not None:
        allowed = visibility(B, H, Sq, Sk, causal=causal, offset=offset, left=left, right=right)
        hid = hidden_keys(allowed, Hk)
        k_in = poison_rows(k, hid, "bshd", poison)
        v_in = poison_rows(v, hid, "bshd", -poison)
    kw = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(wl, wr), softcap=softcap,
              alibi_slopes=alibi, deterministic=deterministic, return_attn_probs=True, position=position,
              backend=backend)
    with poisoned_allocations():
        if packing == "qkv":
            qkv = with_layout(torch.stack([q, k_in, v_in], dim=2), layout).requires_grad_(True)
            snap = snapshot(qkv=qkv, alibi=alibi)
            out, lse, _ = posattn.flash_attn_qkvpacked_func(qkv, **kw)
            ours = [qkv]
        elif packing == "kv":
            qa = with_layout(q, layout).requires_grad_(True)
            kv = with_layout(torch.stack([k_in, v_in], dim=2), layout).requires_grad_(True)
            snap = snapshot(q=qa, kv=kv, alibi=alibi)
            out, lse, _ = posattn.flash_attn_kvpacked_func(qa, kv, **kw)
            ours = [qa, kv]
        else:
            qa, ka, va = (with_layout(t, layout).requires_grad_(n in grad_of) for t, n in zip((q, k_in, v_in), "qkv"))
            snap = snapshot(q=qa, k=ka, v=va, alibi=alibi)
            out, lse, _ = posattn.flash_attn_func(qa, ka, va, **kw)
            ours = [t for t, n in zip((qa, ka, va), "qkv") if n in grad_of]
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert out.requires_grad, "out is detached from the inputs' graph"
        check_close(out, ro, dtype, name="out", cond=cond, emulated=emu.output(0),
                    emulation_factor=emulation_factor(position))
        check_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse", cond=cond,
                    scale=lse_floor(rl), emulated=emu.output(1),
                    emulation_factor=emulation_factor(position))
        dout = grad_output(data, out.shape, dtype, gen)
        if lse_grad:
            # rows with lse = -inf (no visible key) get no lse gradient (0 there)
            dlse = values(lse.shape, torch.float32, "unit", gen).masked_fill(~torch.isfinite(rl), 0.0)
            assert lse.requires_grad, "lse is detached from the inputs' graph"
            got = grads([out, lse], ours + leaves, [dout, dlse])
        else:
            got = grads(out, ours + leaves, dout)
    # the reference's gradients of all of q, k, v (the floors need the siblings: dq is exactly 0 with one key)
    theirs = [q64, k64, v64] + leaves
    if lse_grad:
        fin = torch.isfinite(rl)
        rl_ = torch.where(fin, rl, torch.zeros((), dtype=rl.dtype))   # -inf rows: no lse path (NaN-free 0 * x)
        # an output the reference left unattached (e.g. seqlen_q 0) carries no gradient (grads skips it)
        want = grads([ro, rl_], theirs, [dout.double(), dlse.double()])
        emu_g = [None] * len(want)
    else:
        want = grads(ro, theirs, dout.double())
        emu_g = emu.grads(theirs, dout.double(), len(want))
    if packing == "qkv":
        got = [got[0][:, :, 0], got[0][:, :, 1], got[0][:, :, 2]] + got[1:]
    elif packing == "kv":
        got = [got[0], got[1][:, :, 0], got[1][:, :, 1]] + got[2:]
    names = ["dq", "dk", "dv"] + [f"d_leaf{i}" for i in range(len(leaves))]
    floors = grad_floor(want, names, positions=max(Sq, Sk))
    keep = [i for i, n in enumerate(names) if n.startswith("d_leaf") or n[1] in grad_of]
    want, emu_g, names, floors = ([x[i] for i in keep] for x in (want, emu_g, names, floors))
    for g, w, n, f, we in zip(got, want, names, floors, emu_g):
        terms = B * H * Sq * Sk if n.startswith("d_leaf") else None
        check_close(g, w, dtype, grad=True, name=n, scale=f, terms=terms, cond=gcond, emulated=we,
                    emulation_factor=emulation_factor(position))
    if packing == "qkv":
        assert_unchanged(snap, qkv=qkv, alibi=alibi)
    elif packing == "kv":
        assert_unchanged(snap, q=qa, kv=kv, alibi=alibi)
    else:
        assert_unchanged(snap, q=qa, k=ka, v=va, alibi=alibi)


@given(data=st.data())
@examples(30)
def test_fuzz_flash_attn_torch(data):
    _fa_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(6)
def test_fuzz_flash_attn_triton(data):
    _fa_case(data, "triton")
