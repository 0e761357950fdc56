"""Property-based fuzzing of posattn.apply_rotary (torch backend, Triton interpreter) against
reference.apply_rotary in float64: x layouts and strides (permuted, storage offset, last-dim stride 2 with NaN
in the gaps, (batch, heads, seq, dim) memory seen as (batch, seq, heads, dim)), odd head_dim, rotary_dim <
head_dim, interleaved or not, position_ids None / (seq,) / (1, seq) / (batch, seq) in int32 or int64 (any
order, repeats), cos/sin tables of every float dtype and strided, value regimes; forward, gradients of x and of
cos/sin (when they require grad). ``inplace=True`` must give the bits of the out-of-place call, return x itself
and write nothing outside x's view (the NaN gaps of the storage stay as they were); ``inplace=False`` must not
modify x and returns a contiguous tensor. The CUDA backend is fuzzed on a GPU by tests/test_fuzz_cuda.py with
this file's case builder (``_rotary_case(..., device, cuda=True)``); not yet run on a GPU.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from fuzz_helpers import (grad_output, CPU, DTYPES, LAYOUTS, SEEDS, VALUE_KINDS, _bits, assert_unchanged, check_close, cuda_probe,
                          grads, on_device, poisoned_allocations, same_layout_copy, snapshot, to_device, values,
                          with_layout)
from hypothesis_profiles import examples

TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _x_layout(t, layout):
    """with_layout's layouts plus "bhsd": (batch, heads, seq, dim) memory viewed as (batch, seq, heads, dim)."""
    # always fresh storage: with_layout's "permuted" of a tensor whose transpose is still contiguous (size-1
    # or empty dims) is a view of its input, and inplace=True would then write into the reference's values
    t = t.detach().clone()
    if layout == "bhsd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return with_layout(t, layout)


def _storage_bits(t):
    """Bits of the whole storage under the view t (NaN gaps and offset included)."""
    base = t if t._base is None else t._base
    return _bits(base).clone()


def _worst(*dtypes):
    order = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
    return max(dtypes, key=lambda d: order[d])


def _rotary_case(data, backend, device=CPU, cuda=False):
    """One apply_rotary case, built on CPU from the drawn seed and run on ``device`` (tensors copied with their
    layout, NaN gaps included). ``cuda``: only what the CUDA kernel (csrc/rope.cu) accepts, x in fp16/bf16/fp32
    (no float64), with its code paths' sizes: odd head_dim (the scalar kernel), multiples of 8 up to 128 (the
    16-byte vector kernel; rotary_dim = head_dim drawn more often), seqlen 33; on a backend other than "cuda" the
    case also goes through backend="cuda"'s host-side checks (``cuda_probe``)."""
    device = on_device(device)
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES if triton or cuda else DTYPES + (torch.float64,)), label="dtype")
    B = draw(st.integers(1, 2 if triton else 3), label="batch")
    S = draw(st.sampled_from([0, 1, 2, 7, 9, 16, 17]) if triton else
             st.one_of(st.sampled_from([0, 1, 8, 9, 33] if cuda else [0, 1, 8, 9]), st.integers(0, 40)),
             label="seqlen")
    H = draw(st.integers(1, 2 if triton else 4), label="heads")
    D = draw(st.sampled_from([2, 5, 8, 16, 34] if triton else [2, 3, 5, 8, 16, 33, 40, 64, 72, 128] if cuda else
                             [1, 2, 3, 4, 5, 8, 16, 33, 64]), label="head_dim")
    if D < 2:
        D = 2
    half = draw(st.one_of(st.just(D // 2), st.integers(1, D // 2)) if cuda else st.integers(1, D // 2),
                label="rotary_dim_half")
    interleaved = draw(st.booleans(), label="interleaved")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    layout = draw(st.sampled_from(LAYOUTS + ("bhsd",)), label="x_layout")
    tdtype = draw(st.sampled_from(TABLE_DTYPES), label="table_dtype")
    table_kind = draw(st.sampled_from(["angles", "angles", "random"]), label="table_values")
    table_layout = draw(st.sampled_from(["contiguous", "contiguous", "strided", "transposed"]), label="table_layout")
    table_grad = draw(st.booleans(), label="table_requires_grad")
    pos_kind = draw(st.sampled_from(["none", "seq", "1seq", "bseq"]), label="position_ids")
    pos_dtype = draw(st.sampled_from([torch.int32, torch.int64]), label="position_ids_dtype")
    seqlen_ro = S if pos_kind == "none" else 1
    seqlen_ro = max(1, seqlen_ro + draw(st.sampled_from([0, 0, 1, 13]), label="extra_table_rows"))
    inplace = draw(st.sampled_from([False, False, True]), label="inplace")
    x_grad = draw(st.booleans(), label="x_requires_grad")

    # tables
    if table_kind == "angles":
        inv = R.rope_inv_freq(2 * half, draw(st.sampled_from([10000.0, 10.0])), dtype=torch.float64)
        cos, sin = R.rope_cos_sin(torch.arange(seqlen_ro, dtype=torch.float64), inv)
    else:  # the op is defined for any table values (it does not assume cos^2 + sin^2 = 1)
        cos = torch.randn(seqlen_ro, half, generator=gen, dtype=torch.float64)
        sin = torch.randn(seqlen_ro, half, generator=gen, dtype=torch.float64)
    cos, sin = cos.to(tdtype), sin.to(tdtype)
    if table_layout == "strided":
        cos, sin = with_layout(cos, "strided"), with_layout(sin, "strided")
    elif table_layout == "transposed":
        cos, sin = (t.t().contiguous().t() for t in (cos, sin))
    c64, s64 = (t.detach().clone().double().requires_grad_(True) for t in (cos, sin))
    cos, sin = to_device(cos, device).requires_grad_(table_grad), to_device(sin, device).requires_grad_(table_grad)

    ids = None
    if pos_kind != "none":
        shape = {"seq": (S,), "1seq": (1, S), "bseq": (B, S)}[pos_kind]
        ids = torch.randint(0, seqlen_ro, shape, generator=gen).to(pos_dtype)
        if draw(st.booleans(), label="position_ids_strided"):
            # every other element of a buffer whose gaps hold an id far out of the table: reading them shows
            buf = torch.full(tuple(ids.shape[:-1]) + (2 * S,), 2 ** 30, dtype=pos_dtype)
            buf[..., ::2] = ids
            ids = buf[..., ::2]
    rows = torch.arange(S)[None] if ids is None else ids.long().reshape(1 if ids.dim() == 1 else ids.shape[0], S)
    ids = to_device(ids, device)

    x0 = values((B, S, H, D), dtype, kind, gen)
    xa = to_device(_x_layout(x0, layout), device)

    # float64 reference on the same (rounded) values
    x64 = x0.detach().clone().double().requires_grad_(True)
    ref = R.apply_rotary(x64, c64[rows].unsqueeze(2), s64[rows].unsqueeze(2), interleaved)

    kw = dict(interleaved=interleaved, position_ids=ids, backend=backend)
    if cuda and backend != "cuda":
        cuda_probe(lambda: posattn.apply_rotary(same_layout_copy(xa), cos.detach(), sin.detach(), inplace=inplace,
                                                interleaved=interleaved, position_ids=ids, backend="cuda"))
    snap_t = snapshot(cos=cos, sin=sin, ids=ids)
    with poisoned_allocations():
        if not inplace:
            xa.requires_grad_(x_grad)
            snap = snapshot(x=xa)
            out = posattn.apply_rotary(xa, cos, sin, inplace=False, **kw)
            assert out is not xa and out.is_contiguous(), "inplace=False returns a new contiguous tensor"
            assert_unchanged(snap, x=xa)
            wrt_x = xa
        else:
            # out-of-place on a copy of the same layout: the bits inplace=True must reproduce
            with torch.no_grad():
                expect = posattn.apply_rotary(to_device(_x_layout(x0, layout), device), cos.detach(), sin.detach(),
                                              **kw)
            if x_grad:
                # autograd forbids writing into a leaf that requires grad: x is a non-leaf with x's layout,
                # a copy of the leaf recorded by autograd (x = view.copy_(leaf)); gradients go to the leaf
                leaf_x = x0.clone().to(device).requires_grad_(True)
                xin = to_device(_x_layout(x0, layout), device)
                before = _storage_bits(xin)
                xin = xin.copy_(leaf_x)
                wrt_x = leaf_x
            else:
                xin = xa
                before = _storage_bits(xin)
                wrt_x = None
            res = out = posattn.apply_rotary(xin, cos, sin, inplace=True, **kw)
            after_storage = _storage_bits(xin)
            assert res is xin, "inplace=True returns x itself"
            assert torch.equal(_bits(res), _bits(expect)), "inplace=True differs from the out-of-place result"
            # nothing outside the view was written (the NaN gaps / offset prefix keep their bits)
            outside = torch.ones(before.shape, dtype=torch.bool, device=before.device)
            view_idx = torch.arange(before.numel(), device=before.device).as_strided(xin.shape, xin.stride(),
                                                                                     xin.storage_offset())
            outside.view(-1)[view_idx.reshape(-1)] = False
            assert torch.equal(after_storage[outside], before[outside]), "inplace=True wrote outside x's view"
        assert out.dtype == dtype and out.shape == (B, S, H, D) and out.device == device
        check_close(out, ref, dtype, name="out")
        assert_unchanged(snap_t, cos=cos, sin=sin, ids=ids)
        inputs = [t for t in (wrt_x, cos, sin) if t is not None and t.requires_grad]
        if inputs:
            assert out.requires_grad, "out is detached from the inputs' graph"
            dout = grad_output(data, out.shape, dtype, gen)
            got = grads(out, inputs, to_device(dout, device))
    if not inputs:
        return
    names = [n for n, t in (("dx", wrt_x), ("dcos", cos), ("dsin", sin)) if t is not None and t.requires_grad]
    want = grads(ref, [{"dx": x64, "dcos": c64, "dsin": s64}[n] for n in names], dout.double())
    for g, w, n in zip(got, want, names):
        if n == "dx":
            check_close(g, w, dtype, grad=True, name=n)
        else:
            # a sum over batch, heads and the tokens sharing a table row, in fp32, rounded to the table dtype;
            # each term is of the size of x * dout, so the floor is that size times sqrt(terms)
            assert g.dtype == cos.dtype, f"{n}: dtype {g.dtype}, expected the table's {cos.dtype}"
            terms = B * S * H
            floor = 0.0 if not terms else (x64.detach().abs().max().item() * dout.double().abs().max().item()
                                           * terms ** 0.5)
            check_close(g, w, _worst(dtype, cos.dtype), grad=True, name=n, scale=floor, terms=terms)


@given(data=st.data())
@examples(40)
def test_fuzz_rotary_torch(data):
    _rotary_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(10)
def test_fuzz_rotary_triton(data):
    _rotary_case(data, "triton")
