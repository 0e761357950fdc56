"""Property-based fuzzing of posattn.unpad_input / pad_input (the torch path; the CUDA C++ index and row kernels
are fuzzed on a GPU by tests/test_fuzz_cuda.py with this file's case builders, ``device`` and ``cuda=True``; not
yet run on a GPU) against reference.unpad_input / pad_input: random 0/1 masks (all-zero and all-one rows,
left/right padding, holes) in every accepted mask dtype, batch 0/1/many, seqlen 0/1/many, hidden states of any
float (and integer) dtype, trailing shape and layout. Everything is exact (a gather and a scatter): packed rows,
indices (int64, strictly increasing), cu_seqlens (int32, from 0), max_seqlen (a Python int), seqused (int32);
pad(unpad(x)) == where(mask, x, 0) bit for bit, with NaN/inf in the padded positions (never read into a
result); pad_input with any distinct indices (any order, int32 or int64); gradients through both (a scatter and
a gather of dout, exactly). Inputs are bit-identical afterwards.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import _backends
from posattn import reference as R
from fuzz_helpers import (CPU, LAYOUTS, SEEDS, VALUE_KINDS, _bits, assert_unchanged, on_device, poisoned_allocations,
                          snapshot, to_device, values, with_layout)
from hypothesis_profiles import examples

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)


def _exact(a, b, name):
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.equal(_bits(a), _bits(b)), f"{name}: not bit-identical"


def _x(shape, dtype, kind, layout, gen):
    if dtype == torch.int64:
        t = torch.randint(-1000, 1000, shape, generator=gen)
    else:
        t = values(shape, dtype, kind, gen)
    if dtype == torch.int64 and layout in ("offset", "strided"):
        # with_layout's buffers are NaN-filled (floats only): the same layouts over a buffer of -1s
        flat = torch.full((t.numel() + 3,) if layout == "offset" else tuple(shape[:-1]) + (2 * shape[-1],), -1,
                          dtype=t.dtype)
        view = flat[3:].view(t.shape) if layout == "offset" else flat[..., ::2]
        view.copy_(t)
        return view
    return with_layout(t, layout)


@st.composite
def masks(draw, B, S, gen):
    """(batch, seqlen) 0/1 rows of every kind: all zero, all one, left/right padded, random holes."""
    rows = []
    for _ in range(B):
        kind = draw(st.sampled_from(["zeros", "ones", "right", "left", "random", "random"]))
        if kind == "zeros":
            r = torch.zeros(S, dtype=torch.bool)
        elif kind == "ones":
            r = torch.ones(S, dtype=torch.bool)
        elif kind in ("right", "left"):
            n = draw(st.integers(0, S))
            r = torch.arange(S) < n if kind == "right" else torch.arange(S) >= S - n
        else:
            r = torch.rand(S, generator=gen) < draw(st.sampled_from([0.2, 0.5, 0.9]))
        rows.append(r)
    return torch.stack(rows) if rows else torch.zeros(0, S, dtype=torch.bool)


def _kernels_taken(backend, device):
    """unpad_input / pad_input have no backend argument: on a CUDA tensor they take posattn._C's kernels when the
    module is built. backend "cuda" asserts that they do (else a GPU test would fuzz torch ops); others that not."""
    assert _backends.cuda_ext_available(device) == (backend == "cuda"), (
        f"backend {backend!r} on {device}: posattn._C kernels available = {_backends.cuda_ext_available(device)}")


def _mask_rows(draw, B, S, gen):
    """(B, S) bool of every row kind (``masks``); past 8 rows the kinds come from ``gen`` (hypothesis draws stay
    small)."""
    if B <= 8:
        return draw(masks(B, S, gen), label="mask")
    kinds = torch.randint(0, 5, (B,), generator=gen)
    n = (torch.rand(B, generator=gen) * (S + 1)).long().clamp(max=S)
    ar = torch.arange(S)
    rows = torch.rand(B, S, generator=gen) < 0.5                       # random holes
    rows[kinds == 0] = False
    rows[kinds == 1] = True
    rows = torch.where((kinds == 2)[:, None], ar[None] < n[:, None], rows)          # right padded
    return torch.where((kinds == 3)[:, None], ar[None] >= (S - n)[:, None], rows)   # left padded


def _unpad_case(data, backend="torch", device=CPU, cuda=False):
    """unpad_input, then pad_input of its result, built on CPU and run on ``device``. ``backend``: "cuda" when
    posattn._C's kernels must be the ones taken (``_kernels_taken``). ``cuda``: also the CUDA kernels' sizes,
    batches of 33 (several warps) and 1030 (two 1024-sequence chunks of the index kernel's prefix sum), seqlens
    past one 32-token ballot, rows of 8 elements (16-byte copies)."""
    device = on_device(device)
    _kernels_taken(backend, device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from([0, 1, 1, 2, 3, 5] + ([33, 1030] if cuda else [])), label="batch")
    S = draw(st.one_of(st.sampled_from([0, 1, 2, 17] + ([32, 33, 97] if cuda else [])), st.integers(0, 40)),
             label="seqlen")
    if B > 33:
        S = min(S, 5)
    rest = draw(st.sampled_from([(), (1,), (3,), (2, 5), (4, 1, 2), (0,)] + ([(8,)] if cuda else [])),
                label="trailing_shape")
    dtype = draw(st.sampled_from(X_DTYPES), label="dtype")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    mdtype = draw(st.sampled_from(MASK_DTYPES), label="mask_dtype")
    mask_bool = _mask_rows(draw, B, S, gen)
    mask_layout = draw(st.sampled_from(["contiguous", "transposed"]), label="mask_layout")
    fill = draw(st.sampled_from([None, float("nan"), float("inf"), -float("inf")]), label="pad_fill")
    floating = dtype.is_floating_point
    want_grad = floating and draw(st.booleans(), label="requires_grad")

    mask = mask_bool.to(mdtype)
    if mask_layout == "transposed":
        mask = mask.t().contiguous().t()
    x = _x((B, S) + rest, dtype, kind, layout, gen)
    if fill is not None and floating:
        x[~mask_bool] = fill                  # padding is never read into a result
    ru, ri, rc, rm, rs = R.unpad_input(x, mask)
    keep = mask_bool.reshape((B, S) + (1,) * len(rest))
    expect = torch.where(keep, x, torch.zeros((), dtype=dtype))     # pad(unpad(x)), bit for bit
    x, mask = to_device(x, device).requires_grad_(want_grad), to_device(mask, device)
    snap = snapshot(x=x, mask=mask)

    with poisoned_allocations():
        xu, idx, cu, mx, used = posattn.unpad_input(x, mask)
        assert all(t.device == device for t in (xu, idx, cu, used))
        assert isinstance(mx, int) and not isinstance(mx, bool) and mx == rm, f"max_seqlen {mx!r} vs {rm}"
        _exact(idx.cpu(), ri, "indices")
        _exact(cu.cpu(), rc, "cu_seqlens")
        _exact(used.cpu(), rs, "seqused")
        _exact(xu.detach().cpu(), ru, "hidden_unpadded")
        assert idx.dtype == torch.int64 and cu.dtype == torch.int32 and used.dtype == torch.int32
        assert bool((idx.diff() > 0).all()), "indices not strictly increasing"
        assert cu.numel() == B + 1 and int(cu[0]) == 0 and bool((cu.diff() >= 0).all())
        if floating:
            assert torch.isfinite(xu).all(), "padded values (NaN/inf) were read into the packed rows"
        xp = posattn.pad_input(xu, idx, B, S)
        _exact(xp.detach().cpu(), expect, "pad_input(unpad_input(x))")
        if want_grad:
            assert xp.requires_grad and xu.requires_grad
            dout = values(xp.shape, dtype, "unit", gen)
            (gx,) = torch.autograd.grad(xp, [x], dout.to(device), retain_graph=True)
            _exact(gx.cpu(), torch.where(keep, dout, torch.zeros((), dtype=dtype)), "d x through pad(unpad(x))")
            du = values(xu.shape, dtype, "unit", gen)
            (gx2,) = torch.autograd.grad(xu, [x], du.to(device))
            _exact(gx2.cpu(), R.pad_input(du, ri, B, S), "d x through unpad_input")
    assert_unchanged(snap, x=x, mask=mask)


def _pad_case(data, backend="torch", device=CPU, cuda=False):
    """pad_input alone: any distinct destination rows in any order, int32 or int64 indices (strided), any layout;
    built on CPU, run on ``device``. ``backend`` as in ``_unpad_case``; ``cuda``: also 40 sequences, seqlen 33,
    rows of 8 and 3 elements."""
    device = on_device(device)
    _kernels_taken(backend, device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from([0, 1, 2, 4] + ([40] if cuda else [])), label="batch")
    S = draw(st.one_of(st.sampled_from([0, 1, 16] + ([33] if cuda else [])), st.integers(0, 30)), label="seqlen")
    rest = draw(st.sampled_from([(), (2,), (3, 4)] + ([(8,), (1, 3)] if cuda else [])), label="trailing_shape")
    dtype = draw(st.sampled_from(X_DTYPES), label="dtype")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    total = draw(st.integers(0, B * S), label="total")
    order = draw(st.sampled_from(["sorted", "shuffled"]), label="order")
    idx_dtype = draw(st.sampled_from([torch.int64, torch.int32]), label="indices_dtype")
    idx_layout = draw(st.sampled_from(["contiguous", "strided"]), label="indices_layout")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    floating = dtype.is_floating_point
    want_grad = floating and draw(st.booleans(), label="requires_grad")

    idx = torch.randperm(B * S, generator=gen)[:total]
    if order == "sorted":
        idx = idx.sort().values
    idx = idx.to(idx_dtype)
    if idx_layout == "strided":
        buf = torch.full((2 * total,), -7, dtype=idx_dtype)
        buf[::2] = idx
        idx = buf[::2]
    src = _x((total,) + rest, dtype, kind, layout, gen)
    ref = R.pad_input(src, idx.long(), B, S)
    src, idx = to_device(src, device).requires_grad_(want_grad), to_device(idx, device)
    snap = snapshot(src=src, idx=idx)
    with poisoned_allocations():
        out = posattn.pad_input(src, idx, B, S)
        assert out.device == device
        _exact(out.detach().cpu(), ref, "pad_input")
        if want_grad:
            dout = values(out.shape, dtype, "unit", gen)
            (g,) = torch.autograd.grad(out, [src], dout.to(device))
            _exact(g.cpu(), dout.reshape((B * S,) + rest)[idx.long().cpu()], "d hidden_unpadded")
    assert_unchanged(snap, src=src, idx=idx)


@given(data=st.data())
@examples(40)
def test_fuzz_unpad_input_torch(data):
    _unpad_case(data)


@given(data=st.data())
@examples(30)
def test_fuzz_pad_input_torch(data):
    _pad_case(data)
