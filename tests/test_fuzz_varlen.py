"""Property-based fuzzing of posattn.flash_attn_varlen_func (+ qkvpacked / kvpacked) on the torch backend and
the Triton interpreter against reference.varlen_attention in float64: batches of sequences with lengths 0, 1
and block boundaries side by side, seqlen_q != seqlen_k per sequence, GQA, causal/window/softcap, alibi_slopes
(per head or per sequence), positional encodings with per-token data (RoPE position_ids over total_k, learned
phases (1, heads, total_k)), dtypes, layouts (cu_seqlens strided or at an offset too), value regimes; out, lse and gradients. Rows past
cu_seqlens[-1] hold NaN/inf: their output must be 0, lse -inf, gradient 0, and nothing else may change.
Inputs are bit-identical afterwards. The CUDA backend (the short-sequence forward) is fuzzed on a GPU by
tests/test_fuzz_cuda.py with this file's case builder (``_varlen_case(..., device, cuda=True)``); not yet run on
a GPU.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from posattn.flash_attn_interface import normalize_window
from fuzz_helpers import (grad_output, CPU, DTYPES, HALF_DTYPES, LAYOUTS, LENGTHS_TINY, SEEDS, VALUE_KINDS, Emulations,
                          assert_unchanged, check_close, cuda_probe, emulation_factor, grad_floor, grads, heads,
                          logit_cond, lse_floor, on_device, poisoned_allocations, position_spec,
                          position_to_device, snapshot, to_device, values, with_layout)
from hypothesis_profiles import examples

LENS = st.sampled_from([0, 0, 1, 2, 5, 15, 16, 17, 33])
LENS_TINY = LENGTHS_TINY
CUDA_LENS = st.sampled_from([0, 0, 1, 2, 5, 15, 16, 17, 33, 64, 97, 130])   # the CUDA kernel's short sequences


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int32)


def _varlen_case(data, backend, device=CPU, cuda=False):
    """One varlen case, built on CPU from the drawn seed and run on ``device`` (tensors copied with their layout,
    the NaN/inf rows past cu_seqlens[-1] included). ``cuda``: only what the CUDA short-sequence forward
    (csrc/varlen.cu, ops/varlen.py ``_varlen_cuda``) accepts: fp16/bf16, head_dim 64/128 (= head_dim_v),
    forward only (no gradients), no softcap / dropout / rotary / URPE, no window but a side reaching past every
    key (>= max_seqlen_k: unbounded) or causal's right side, additive biases only (ALiBi slopes or objects,
    RelativeBias, T5Bias); sequences up to 130 tokens; on a backend other than "cuda" the case also goes through
    backend="cuda"'s host-side checks (``cuda_probe``)."""
    device = on_device(device)
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(HALF_DTYPES if cuda else DTYPES), label="dtype")
    nseq = draw(st.integers(1, 3 if triton else 4), label="batch_size")
    packing = "none" if triton else draw(st.sampled_from(["none", "none", "kv", "qkv"]), label="packing")
    lens = LENS_TINY if triton else CUDA_LENS if cuda else LENS
    lens_q = draw(st.lists(lens, min_size=nseq, max_size=nseq), label="lens_q")
    lens_k = lens_q if packing == "qkv" else draw(st.lists(lens, min_size=nseq, max_size=nseq), label="lens_k")
    H, Hk = draw(heads(4 if triton else 6), label="heads")
    if packing == "qkv":
        Hk = H
    D = draw(st.sampled_from([16, 32] if triton else [64, 128] if cuda else [4, 8, 16, 40]), label="head_dim")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    causal = draw(st.booleans(), label="causal")
    # cuda: no window; "max_k+n", a side of max_seqlen_k + n (resolved below: unbounded after normalisation); with
    # causal a right side (causal's 0 stands)
    wl = draw(st.sampled_from([-1, -1, "max_k+0", "max_k+7"] if cuda else [-1, -1, 0, 2, 40]), label="window_left")
    wr = draw(st.sampled_from([-1, -1, "max_k+1"] + ([0, 3] if causal else []) if cuda else [-1, -1, 0, 3]),
              label="window_right")
    softcap = draw(st.sampled_from([0.0] if cuda else [0.0, 0.0, 2.0]), label="softcap")
    scale = draw(st.sampled_from([None, 0.4]), label="softmax_scale")
    extra_q = 0 if packing == "qkv" else draw(st.sampled_from([0, 0, 1, 5]), label="rows_past_cu_q")
    extra_k = draw(st.sampled_from([0, 0, 2]), label="rows_past_cu_k")
    if packing == "qkv":
        extra_k = extra_q = draw(st.sampled_from([0, 0, 3]), label="rows_past_cu")
    slack = draw(st.sampled_from([0, 0, 3]), label="max_seqlen_slack")
    total_q, total_k = sum(lens_q) + extra_q, sum(lens_k) + extra_k
    slopes_kind = draw(st.sampled_from(["none", "none", "heads", "batch_heads"]), label="alibi_slopes")

    # positional encodings with per-token data over the packed axis; rotary needs lens_q <= lens_k
    allow = ([] if cuda else ["xpos", "urpe"]) + (["alibi", "relative", "t5"] if slopes_kind == "none" else [])
    if not cuda and all(a <= b for a, b in zip(lens_q, lens_k)):
        allow += ["rope", "phase"]
    grad = not (triton or cuda)    # learnable ALiBi slopes (the CUDA kernel is forward-only)
    position, leaves = draw(position_spec(batch=1, heads=H, seqlen_q=0, seqlen_k=total_k, head_dim=D, offset=0,
                                          gen=gen, learnable_alibi=grad, allow=tuple(allow), dynamic=False),
                                label="position")
    # drawn for batch 1 over the packed axis: position_ids (total_k,) / (1, total_k), freqs (1, H, total_k);
    # per-sequence ALiBi slopes are (batch_size, H)
    for p in (position if isinstance(position, list) else [position]):
        if isinstance(p, posattn.ALiBi) and p.slopes is not None and p.slopes.dim() == 2:
            s = (0.02 + torch.rand(nseq, H, generator=gen)).requires_grad_(grad)
            leaves[:] = [t for t in leaves if t is not p.slopes] + ([s] if grad else [])
            p.slopes = s
    alibi = None
    if slopes_kind != "none":
        alibi = 0.02 + torch.rand((H,) if slopes_kind == "heads" else (nseq, H), generator=gen)
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    pad_fill = draw(st.sampled_from([float("nan"), float("inf")]), label="pad_fill")

    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    # cu_seqlens' layout: contiguous, or every other entry of a buffer whose gaps hold a huge length / a view at
    # storage offset 3 (the Triton kernels read strided cu_seqlens with unit stride: test_regressions_breakit_
    # attention.py::test_triton_varlen_reads_strided_cu_seqlens_through_their_strides; _cuda.py copies them too)
    cu_layout = draw(st.sampled_from(["strided", "contiguous", "offset"]), label="cu_seqlens_layout")
    if cu_layout != "contiguous":
        cu_q = with_layout(cu_q, cu_layout)
        cu_k = cu_q if packing == "qkv" else with_layout(cu_k, cu_layout)
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack
    wl, wr = (max_k + int(w[len("max_k+"):]) if isinstance(w, str) else w for w in (wl, wr))
    q = values((total_q, H, D), dtype, kind, gen)
    k = values((total_k, Hk, D), dtype, kind, gen)
    v = values((total_k, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)
    cond = logit_cond(q, k, scale, softcap=softcap)
    gcond = logit_cond(q, k, scale, softcap=softcap, grad=True)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    # FlashAttention's varlen rule: a window side >= max_seqlen_k (the argument) is unbounded
    left, right = normalize_window((wl, wr), causal, max_k)
    ref_kw = dict(softmax_scale=scale, causal=causal, window_size=(left, right), softcap=softcap,
                  alibi_slopes=alibi, position=position)
    ro, rl = R.varlen_attention(q64, k64, v64, cu_q, cu_k, **ref_kw)
    # second oracle: the kernel's roundings (fuzz_helpers.kernel_rounding)
    emu = Emulations(lambda **kr: R.varlen_attention(q64, k64, v64, cu_q, cu_k, **ref_kw, **kr), backend, dtype,
                     seed)
    qp, kp, vp = q.clone(), k.clone(), v.clone()   # rows past cu_seqlens[-1] belong to no sequence
    qp[sum(lens_q):], kp[sum(lens_k):], vp[sum(lens_k):] = pad_fill, -pad_fill, pad_fill

    position_d, moved = position_to_device(position, device)
    leaves_d = [moved.get(id(t), t) for t in leaves]
    cu_q, cu_k, alibi = (to_device(t, device) for t in (cu_q, cu_k, alibi))
    kw = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(wl, wr), softcap=softcap,
              alibi_slopes=alibi, return_attn_probs=True, position=position_d)
    if packing == "qkv":
        args = (with_layout(torch.stack([qp, kp, vp], dim=1), layout),)
        fn, call = posattn.flash_attn_varlen_qkvpacked_func, lambda *a, **o: fn(*a, cu_q, max_q, **o)
        names = ("qkv",)
    elif packing == "kv":
        args = (with_layout(qp, layout), with_layout(torch.stack([kp, vp], dim=1), layout))
        fn, call = posattn.flash_attn_varlen_kvpacked_func, lambda *a, **o: fn(*a, cu_q, cu_k, max_q, max_k, **o)
        names = ("q", "kv")
    else:
        args = tuple(with_layout(t, layout) for t in (qp, kp, vp))
        fn, call = posattn.flash_attn_varlen_func, lambda *a, **o: fn(*a, cu_q, cu_k, max_q, max_k, **o)
        names = ("q", "k", "v")
    args = tuple(to_device(t, device).requires_grad_(not cuda) for t in args)
    if cuda and backend != "cuda":
        cuda_probe(lambda: call(*args, **kw, backend="cuda"))
    named = dict(zip(names, args), cu_q=cu_q, cu_k=cu_k, alibi=alibi)
    snap = snapshot(**named)
    with poisoned_allocations(), torch.set_grad_enabled(not cuda):
        # Triton: lse is returned in the graph; only a gradient flowing into it is refused (in backward)
        out, lse, _ = call(*args, **kw, backend=backend)
        assert out.dtype == dtype and lse.dtype == torch.float32 and out.device == device
        assert out.shape == (total_q, H, D) and lse.shape == (H, total_q)
        check_close(out, ro, dtype, name="out", cond=cond, emulated=emu.output(0),
                    emulation_factor=emulation_factor(position))
        check_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse", cond=cond,
                    scale=lse_floor(rl), emulated=emu.output(1),
                    emulation_factor=emulation_factor(position))
        if not cuda:
            assert out.requires_grad, "out is detached from the inputs' graph"
            dout = grad_output(data, out.shape, dtype, gen)
            got = grads(out, list(args) + leaves_d, to_device(dout, device))
    assert_unchanged(snap, **named)
    if cuda:
        return
    want = grads(ro, [q64, k64, v64] + leaves, dout.double())
    emu_g = emu.grads([q64, k64, v64] + leaves, dout.double(), len(want))
    if packing == "qkv":
        got = [got[0][:, 0], got[0][:, 1], got[0][:, 2]] + got[1:]
    elif packing == "kv":
        got = [got[0], got[1][:, 0], got[1][:, 1]] + got[2:]
    names = ["dq", "dk", "dv"] + [f"d_leaf{i}" for i in range(len(leaves))]
    terms = H * sum(a * b for a, b in zip(lens_q, lens_k))
    for g, w, n, f, we in zip(got, want, names, grad_floor(want, names, positions=max(lens_q + lens_k)), emu_g):
        check_close(g, w, dtype, grad=True, name=n, scale=f, cond=gcond,
                    terms=terms if n.startswith("d_leaf") else None, emulated=we,
                    emulation_factor=emulation_factor(position))


@given(data=st.data())
@examples(25)
def test_fuzz_varlen_torch(data):
    _varlen_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(5)
def test_fuzz_varlen_triton(data):
    _varlen_case(data, "triton")
