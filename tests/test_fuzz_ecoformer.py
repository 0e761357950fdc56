"""Property-based fuzzing of posattn.ecoformer_attention (torch backend, Triton interpreter) against
reference.ecoformer_pairwise in float64 (the N x N weight matrix: an independent evaluation of the linear form
the op uses): codes +-1 as float tensors (any float dtype, shared q/k codes or separate ones) or packed int32 /
int64 words, num_bits from 1 to 100 (not a multiple of the word size, and exactly 32 / 64), key_padding_mask
(random, all padded rows, none padded), causal with seqlen_q != seqlen_k (0 and 1 included), GQA/MQA, both forms
("consistent", "reference-code"), v dtypes, layouts and value regimes; forward and gradients (v, float codes).

Keys no query can see (padded keys; with causal, keys past the last query) hold NaN/inf in v: the output and the
gradients must not change and stay finite ("reference-code" reads v_i of every query position by its formula,
so only keys past seqlen_q are poisoned there). Inputs are bit-identical afterwards. The CUDA backend is fuzzed
on a GPU by tests/test_fuzz_cuda.py with this file's case builder (``_eco_case(..., device, cuda=True)``); not
yet run on a GPU.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from fuzz_helpers import (grad_output, CPU, DTYPES, LAYOUTS, SEEDS, VALUE_KINDS, assert_unchanged, check_close, cuda_probe,
                          grad_floor, grads, heads, on_device, poisoned_allocations, snapshot, to_device, values,
                          with_layout)
from hypothesis_profiles import examples

CODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NUM_BITS = (1, 2, 7, 16, 31, 32, 33, 63, 64, 65, 100)


def _codes(shape, gen, dtype):
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype)


def _eco_case(data, backend, device=CPU, cuda=False):
    """One ecoformer_attention case, built on CPU from the drawn seed and run on ``device`` (tensors copied with
    their layout, NaN/inf in hidden keys included). ``cuda``: only what the CUDA kernels (csrc/ecoformer.cu,
    ops/ecoformer.py ``_check_cuda_backend``) accept: non-causal, num_bits <= 64, head_dim_v <= 256 (64 and 256
    drawn), v in fp16/bf16/fp32, right padding only (each row: kept keys, then padding); on a backend other than
    "cuda" the case also goes through backend="cuda"'s host-side checks (``cuda_probe``)."""
    device = on_device(device)
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    vdtype = draw(st.sampled_from(DTYPES if triton or cuda else DTYPES + (torch.float64,)), label="v_dtype")
    B = draw(st.integers(1, 2), label="batch")
    H, Hk = draw(heads(4), label="heads")
    lens = st.sampled_from([0, 1, 2, 5, 16, 17]) if triton else st.one_of(st.sampled_from([0, 1, 2, 64, 129]),
                                                                          st.integers(0, 40))
    M = draw(lens, label="seqlen_q")
    form = draw(st.sampled_from(["consistent", "consistent", "reference-code"]), label="form")
    shared = draw(st.booleans(), label="shared_codes")
    if form == "reference-code" or shared:
        N = M
    else:
        N = draw(lens, label="seqlen_k")
    if shared:
        Hk = H
    nb = draw(st.sampled_from([b for b in NUM_BITS if b <= 64] if cuda else NUM_BITS), label="num_bits")
    Dv = draw(st.sampled_from([1, 8, 16, 24] if triton else [1, 3, 8, 40, 64, 256] if cuda else [1, 3, 8, 40]),
              label="head_dim_v")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    causal = draw(st.just(False) if cuda else st.booleans(), label="causal")
    packed = draw(st.sampled_from([None, None, torch.int64, torch.int32]), label="packed_words")
    cdtype = draw(st.sampled_from(CODE_DTYPES), label="code_dtype")
    pad_kind = draw(st.sampled_from(["none", "none", "right", "right", "all"] if cuda else
                                    ["none", "none", "random", "all", "some_rows_all"]), label="key_padding_mask")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    fill = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="hidden_fill")
    want_grad = draw(st.booleans(), label="gradients")

    hq = _codes((B, H, M, nb), gen, torch.float64)
    hk = hq if shared else _codes((B, Hk, N, nb), gen, torch.float64)
    v0 = values((B, Hk, N, Dv), vdtype, kind, gen)
    mask = None
    if pad_kind == "random":
        mask = torch.rand(B, N, generator=gen) < 0.4
    elif pad_kind == "all":
        mask = torch.ones(B, N, dtype=torch.bool)
    elif pad_kind == "some_rows_all":
        mask = torch.rand(B, N, generator=gen) < 0.3
        mask[0] = True
    elif pad_kind == "right":   # each row: kept keys, then padding (0 and N kept included)
        kept = torch.tensor([draw(st.one_of(st.sampled_from([0, N]), st.integers(0, N)), label="kept_keys")
                             for _ in range(B)])
        mask = torch.arange(N)[None, :] >= kept[:, None]

    # keys no query sees: padded (consistent form), or past the last query with causal
    hidden = torch.zeros(B, N, dtype=torch.bool)
    if mask is not None and form == "consistent":
        hidden |= mask
    if causal:
        hidden[:, M:] = True
    vp = v0.clone()
    vp[hidden[:, None, :, None].expand_as(vp)] = fill

    # float64 reference on clean values
    q64 = hq.clone().requires_grad_(True)
    k64 = q64 if shared else hk.clone().requires_grad_(True)
    v64 = v0.double().requires_grad_(True)
    ref = R.ecoformer_pairwise(q64, k64, v64, causal=causal, key_padding_mask=mask, form=form)

    code_grad = want_grad and packed is None
    if packed is not None:
        qc = to_device(posattn.ecoformer_pack_bits(hq, word_dtype=packed), device)
        kc = qc if shared else to_device(posattn.ecoformer_pack_bits(hk, word_dtype=packed), device)
        kw = dict(num_bits=nb)                   # required for packed words
    else:
        qc = to_device(with_layout(hq.to(cdtype), layout), device).requires_grad_(code_grad)
        kc = qc if shared else to_device(with_layout(hk.to(cdtype), layout), device).requires_grad_(code_grad)
        kw = dict(num_bits=nb) if draw(st.booleans(), label="pass_num_bits") else {}
    v = to_device(with_layout(vp, layout), device).requires_grad_(want_grad)
    mask = to_device(mask, device)
    if cuda and backend != "cuda":
        cuda_probe(lambda: posattn.ecoformer_attention(qc, kc, v, key_padding_mask=mask, form=form, backend="cuda",
                                                       **kw))
    snap = snapshot(qc=qc, kc=kc, v=v, mask=mask)
    with poisoned_allocations():
        out = posattn.ecoformer_attention(qc, kc, v, causal=causal, key_padding_mask=mask, form=form,
                                          backend=backend, **kw)
        assert out.dtype == vdtype and out.shape == (B, H, M, Dv) and out.device == device
        check_close(out, ref, vdtype, name="out")
        ours = [v] + ([qc] if code_grad else []) + ([kc] if code_grad and not shared else [])
        theirs = [v64] + ([q64] if code_grad else []) + ([k64] if code_grad and not shared else [])
        names = ["dv"] + (["dq_codes"] if code_grad else []) + (["dk_codes"] if code_grad and not shared else [])
        if want_grad:
            assert out.requires_grad, "out is detached from the inputs' graph"
            dout = grad_output(data, out.shape, vdtype, gen)
            got = grads(out, ours, to_device(dout, device))
    assert_unchanged(snap, qc=qc, kc=kc, v=v, mask=mask)
    if not want_grad:
        return
    want = grads(ref, theirs, dout.double())
    floors = grad_floor(want, names, base=("dv", "dq_codes", "dk_codes"))
    for g, w, n, f in zip(got, want, names, floors):
        gdt = vdtype if n == "dv" else max((vdtype, cdtype), key=lambda t: torch.finfo(t).eps)
        check_close(g, w, gdt, grad=True, name=n, scale=f)


@given(data=st.data())
@examples(40)
def test_fuzz_ecoformer_torch(data):
    _eco_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(10)
def test_fuzz_ecoformer_triton(data):
    _eco_case(data, "triton")
