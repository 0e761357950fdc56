"""Property-based fuzzing of the CUDA C++ backends (``posattn._C`` from csrc/, explicit ``backend="cuda"``) against
the float64 reference, on a GPU. **Not yet run on a GPU**: written without one; on CPU only the harness
self-check below has run.

One hypothesis test per op (marked ``gpu``: skipped without CUDA, run by bench/gpu_check.sh's ``gpu_tests``
stage, and at depth by its ``--deep-fuzz N`` stage), drawing only cases the CUDA backend accepts:

* ``apply_rotary`` (csrc/rope.cu): x in fp16/bf16/fp32 (float64 is refused); otherwise the CPU fuzz's space:
  any layout, odd head_dim (scalar kernel) and 16-byte-vectorisable ones, rotary_dim <= head_dim,
  interleaved, position_ids (strided, int32/int64), tables of any float dtype and layout, inplace,
  gradients of x (the kernel's ``conj`` path) and of the tables.
* ``unpad_input`` / ``pad_input`` (csrc/varlen.cu index and row kernels, taken for every CUDA tensor when
  posattn._C is built; checked): every mask and hidden-state dtype, batches past one warp and past the index
  kernel's 1024-sequence chunk, row sizes that do and do not allow 16-byte copies, gradients; bit-exact.
* ``flash_attn_varlen_func`` (+ kv/qkv packed; csrc/varlen.cu short-sequence forward): fp16/bf16, head_dim
  64/128, forward only (no grad), no rotary / URPE / window / softcap / dropout (a window side >= max_seqlen_k
  is no window and is drawn), ALiBi (slopes or objects, per head or per sequence), RelativeBias, T5Bias, GQA,
  causal, rows past cu_seqlens[-1] filled with NaN/inf.
* ``flash_attn_with_kvcache`` (csrc/lean_decode.cu, stream-K): fp16/bf16, head_dim 64/128/256, no softcap,
  no window but the causal one, no cache_leftpad; contiguous (with cache_batch_idx) and paged caches, appends,
  rotary tables / RoPE objects (in-kernel q rotation and host rotation), ALiBi, GQA, the three schedules,
  num_ctas, out= (poisoned, strided); invalid cache slots hold NaN/inf; the cache update is bit-exact.
* ``ecoformer_attention`` (csrc/ecoformer.cu): non-causal, num_bits <= 64, head_dim_v <= 256, v in
  fp16/bf16/fp32, right padding only; float or packed codes, both forms, GQA, gradients (recomputed in torch).

Checks as in the CPU fuzz files (tests/fuzz_helpers.py, tests/tolerances.py): float64 reference, NaN in
allocations (``poisoned_allocations``) and in ``out=``, inputs bit-identical afterwards, NaN/inf in data the op
must not read. Each test body is ``_check_<op>(data, backend, device)``; the CPU self-check at the end runs
the same functions with ``backend="torch"`` on ``device="cpu"`` (a few examples), so CI proves that the
builders make valid cases and that the checks pass on a known-good backend, and runs each case through the
op's ``backend="cuda"`` host-side checks (``_cuda_probe``), so a case the CUDA backend would refuse fails
here rather than on the GPU.

The CPU fuzz files' case builders build and run on CPU (they take a backend, no device), so each op's case is
rebuilt here in their style for ``device`` (tensors made on CPU from the drawn seed, then moved with their
layout, NaN gaps included: ``_to``), importing their helpers and constants. The GPU tests carry
``@pytest.mark.gpu`` one by one: a module-level ``pytestmark`` would mark the CPU self-check too. Their ci
counts (25-30 examples each) are sized from the CPU self-check's time per example (mostly the float64
reference on CPU), not measured on a GPU.

Deep run on a GPU: ``bash bench/gpu_check.sh OUT --deep-fuzz N`` (N examples per test), or
``POSATTN_FUZZ_EXAMPLES=N python -m pytest tests/test_fuzz_cuda.py -m gpu --hypothesis-profile=deep``."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import _backends
from posattn import reference as R
from posattn.flash_attn_interface import normalize_window
from fuzz_helpers import (DTYPES, LAYOUTS, SEEDS, VALUE_KINDS, _bits, assert_unchanged, check_close, grad_floor,
                          grads, heads, logit_cond, lse_floor, poisoned_allocations, position_spec, snapshot, values,
                          with_layout)
from hypothesis_profiles import examples
from test_fuzz_decode import TABLE_DTYPES
from test_fuzz_ecoformer import CODE_DTYPES, NUM_BITS, _codes
from test_fuzz_rotary import _storage_bits, _worst, _x_layout
from test_fuzz_unpad import MASK_DTYPES, X_DTYPES, _exact, _x, masks
from test_fuzz_varlen import _cu

HALF = (torch.float16, torch.bfloat16)
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# device placement and the CPU probe of the CUDA path
# ---------------------------------------------------------------------------------------------

def _device(device):
    """torch.device with an index ("cuda" -> "cuda:<current>"), so that ``t.device == device`` compares."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _to(t, device):
    """``t`` on ``device`` with its strides, storage offset and the bytes around it (NaN gaps, offset prefix):
    the whole storage is copied. On t's own device: t itself."""
    if t is None or t.device == device:
        return t
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = t.detach().as_strided((n,), (1,), 0)
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def _same_layout_copy(t):
    """A fresh copy of t with t's strides and storage offset (for probes that may write)."""
    if t is None:
        return None
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = t.detach().as_strided((n,), (1,), 0).clone()
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


# where the CUDA path stops on a machine without a GPU: posattn._cuda / _C ("no CUDA device", "must be a CUDA
# tensor") or torch.cuda.device(cpu) ("Expected a cuda device")
_DEVICE_ERRORS = ("no CUDA device", "must be a CUDA tensor", "Expected a cuda device")


def _cuda_probe(call):
    """CPU self-check: the case passes every host-side check of the op's ``backend="cuda"`` path.

    posattn._C is reported available for the call (``_backends.cuda_ext_available``), so the op resolves
    ``backend="cuda"`` for CPU tensors and runs all its CUDA-path checks (dtype, head_dim, options, layouts,
    schedule); it may then only stop where it reaches the device (``_DEVICE_ERRORS``) or return early (nothing
    to launch). A ValueError / TypeError of the op means the builder drew a case the CUDA backend refuses.
    Without posattn._C there is no CUDA path to probe."""
    if _backends.load_C() is None:
        return
    with mock.patch.object(_backends, "cuda_ext_available", lambda device: True), torch.no_grad():
        try:
            call()
        except Exception as e:  # noqa: BLE001 - anything but a device error is a refusal
            if not any(s in str(e) for s in _DEVICE_ERRORS):
                raise AssertionError(f"backend='cuda' refuses this case: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# apply_rotary
# ---------------------------------------------------------------------------------------------

def _check_rotary(data, backend, device):
    """tests/test_fuzz_rotary.py's case on ``device``, x in fp16/bf16/fp32 (the CUDA kernel has no float64)."""
    device = _device(device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    B = draw(st.integers(1, 3), label="batch")
    S = draw(st.one_of(st.sampled_from([0, 1, 8, 9, 33]), st.integers(0, 40)), label="seqlen")
    H = draw(st.integers(1, 4), label="heads")
    # odd sizes: the scalar kernel; multiples of 8 with a matching rotary_dim: the 16-byte vector kernel
    D = draw(st.sampled_from([2, 3, 5, 8, 16, 33, 40, 64, 72, 128]), label="head_dim")
    half = draw(st.one_of(st.just(D // 2), st.integers(1, D // 2)), label="rotary_dim_half")
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

    if table_kind == "angles":
        inv = R.rope_inv_freq(2 * half, draw(st.sampled_from([10000.0, 10.0])), dtype=torch.float64)
        cos, sin = R.rope_cos_sin(torch.arange(seqlen_ro, dtype=torch.float64), inv)
    else:
        cos = torch.randn(seqlen_ro, half, generator=gen, dtype=torch.float64)
        sin = torch.randn(seqlen_ro, half, generator=gen, dtype=torch.float64)
    cos, sin = cos.to(tdtype), sin.to(tdtype)
    if table_layout == "strided":
        cos, sin = with_layout(cos, "strided"), with_layout(sin, "strided")
    elif table_layout == "transposed":
        cos, sin = (t.t().contiguous().t() for t in (cos, sin))
    c64, s64 = (t.detach().clone().double().requires_grad_(True) for t in (cos, sin))
    cos, sin = _to(cos, device).requires_grad_(table_grad), _to(sin, device).requires_grad_(table_grad)

    ids = None
    if pos_kind != "none":
        shape = {"seq": (S,), "1seq": (1, S), "bseq": (B, S)}[pos_kind]
        ids = torch.randint(0, seqlen_ro, shape, generator=gen).to(pos_dtype)
        if draw(st.booleans(), label="position_ids_strided"):
            buf = torch.full(tuple(ids.shape[:-1]) + (2 * S,), 2 ** 30, dtype=pos_dtype)  # gaps: far out of the table
            buf[..., ::2] = ids
            ids = buf[..., ::2]
    rows = torch.arange(S)[None] if ids is None else ids.long().reshape(1 if ids.dim() == 1 else ids.shape[0], S)
    ids = _to(ids, device)

    x0 = values((B, S, H, D), dtype, kind, gen)
    x64 = x0.detach().clone().double().requires_grad_(True)
    ref = R.apply_rotary(x64, c64[rows].unsqueeze(2), s64[rows].unsqueeze(2), interleaved)
    xa = _to(_x_layout(x0, layout), device)
    kw = dict(interleaved=interleaved, position_ids=ids, backend=backend)
    if backend != "cuda":
        _cuda_probe(lambda: posattn.apply_rotary(_same_layout_copy(xa), cos.detach(), sin.detach(), inplace=inplace,
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
            with torch.no_grad():
                expect = posattn.apply_rotary(_to(_x_layout(x0, layout), device), cos.detach(), sin.detach(), **kw)
            if x_grad:  # autograd forbids writing into a leaf that requires grad: x is a copy recorded by autograd
                leaf_x = x0.clone().to(device).requires_grad_(True)
                xin = _to(_x_layout(x0, layout), device)
                before = _storage_bits(xin)
                xin = xin.copy_(leaf_x)
                wrt_x = leaf_x
            else:
                xin = xa
                before = _storage_bits(xin)
                wrt_x = None
            res = out = posattn.apply_rotary(xin, cos, sin, inplace=True, **kw)
            after = _storage_bits(xin)
            assert res is xin, "inplace=True returns x itself"
            assert torch.equal(_bits(res), _bits(expect)), "inplace=True differs from the out-of-place result"
            outside = torch.ones(before.shape, dtype=torch.bool, device=before.device)
            view_idx = torch.arange(before.numel(), device=before.device).as_strided(xin.shape, xin.stride(),
                                                                                     xin.storage_offset())
            outside.view(-1)[view_idx.reshape(-1)] = False
            assert torch.equal(after[outside], before[outside]), "inplace=True wrote outside x's view"
        assert out.dtype == dtype and out.shape == (B, S, H, D) and out.device == device
        check_close(out, ref, dtype, name="out")
        assert_unchanged(snap_t, cos=cos, sin=sin, ids=ids)
        inputs = [t for t in (wrt_x, cos, sin) if t is not None and t.requires_grad]
        if inputs:
            assert out.requires_grad, "out is detached from the inputs' graph"
            dout = values(out.shape, dtype, "unit", gen)
            got = grads(out, inputs, dout.to(device))
    if not inputs:
        return
    names = [n for n, t in (("dx", wrt_x), ("dcos", cos), ("dsin", sin)) if t is not None and t.requires_grad]
    want = grads(ref, [{"dx": x64, "dcos": c64, "dsin": s64}[n] for n in names], dout.double())
    for g, w, n in zip(got, want, names):
        if n == "dx":
            check_close(g, w, dtype, grad=True, name=n)
        else:  # fp32 sums over batch, heads and the tokens of a table row, rounded to the table dtype
            assert g.dtype == cos.dtype, f"{n}: dtype {g.dtype}, expected the table's {cos.dtype}"
            terms = B * S * H
            floor = 0.0 if not terms else (x64.detach().abs().max().item() * dout.double().abs().max().item()
                                           * terms ** 0.5)
            check_close(g, w, _worst(dtype, cos.dtype), grad=True, name=n, scale=floor, terms=terms)


# ---------------------------------------------------------------------------------------------
# unpad_input / pad_input
# ---------------------------------------------------------------------------------------------

def _kernels_taken(backend, device):
    """unpad_input / pad_input have no backend argument: on a CUDA tensor they take posattn._C's kernels when the
    module is built. backend "cuda" asserts that they do (else the test would fuzz torch ops); others that not."""
    assert _backends.cuda_ext_available(device) == (backend == "cuda"), (
        f"backend {backend!r} on {device}: posattn._C kernels available = {_backends.cuda_ext_available(device)}")


def _mask_rows(draw, B, S, gen):
    """(B, S) bool of every row kind; past 8 rows the kinds come from ``gen`` (hypothesis draws stay small)."""
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


def _check_unpad(data, backend, device):
    """tests/test_fuzz_unpad.py's unpad case on ``device``, plus batches of 33 (several warps) and 1030 (two
    1024-sequence chunks of the index kernel's prefix sum) and seqlens past one 32-token ballot."""
    device = _device(device)
    _kernels_taken(backend, device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 33, 1030]), label="batch")
    S = draw(st.one_of(st.sampled_from([0, 1, 2, 17, 32, 33, 97]), st.integers(0, 40)), label="seqlen")
    if B > 33:
        S = min(S, 5)
    rest = draw(st.sampled_from([(), (1,), (3,), (8,), (2, 5), (4, 1, 2), (0,)]), label="trailing_shape")
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
    expect = torch.where(keep, x, torch.zeros((), dtype=dtype))
    x, mask = _to(x, device).requires_grad_(want_grad), _to(mask, device)
    snap = snapshot(x=x, mask=mask)

    with poisoned_allocations():
        xu, idx, cu, mx, used = posattn.unpad_input(x, mask)
        assert all(t.device == device for t in (xu, idx, cu, used))
        assert isinstance(mx, int) and not isinstance(mx, bool) and mx == rm, f"max_seqlen {mx!r} vs {rm}"
        _exact(idx.cpu(), ri, "indices")
        _exact(cu.cpu(), rc, "cu_seqlens")
        _exact(used.cpu(), rs, "seqused")
        _exact(xu.detach().cpu(), ru, "hidden_unpadded")
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


def _check_pad(data, backend, device):
    """tests/test_fuzz_unpad.py's pad case on ``device``: distinct destination rows in any order, int32/int64
    indices (strided), every dtype, trailing shape and layout, gradients (a gather), bit-exact."""
    device = _device(device)
    _kernels_taken(backend, device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from([0, 1, 2, 4, 40]), label="batch")
    S = draw(st.one_of(st.sampled_from([0, 1, 16, 33]), st.integers(0, 30)), label="seqlen")
    rest = draw(st.sampled_from([(), (2,), (3, 4), (8,), (1, 3)]), label="trailing_shape")
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
    src, idx = _to(src, device).requires_grad_(want_grad), _to(idx, device)
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


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func: the short-sequence fused forward
# ---------------------------------------------------------------------------------------------

VARLEN_LENS = st.sampled_from([0, 0, 1, 2, 5, 15, 16, 17, 33, 64, 97, 130])


def _check_varlen(data, backend, device):
    """tests/test_fuzz_varlen.py's case restricted to the CUDA kernel (ops/varlen.py ``_varlen_cuda``): fp16/bf16,
    head_dim 64/128 (= head_dim_v), forward only, additive biases only, no window / softcap / dropout."""
    device = _device(device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(HALF), label="dtype")
    nseq = draw(st.integers(1, 4), label="batch_size")
    packing = draw(st.sampled_from(["none", "none", "kv", "qkv"]), label="packing")
    lens_q = draw(st.lists(VARLEN_LENS, min_size=nseq, max_size=nseq), label="lens_q")
    lens_k = lens_q if packing == "qkv" else draw(st.lists(VARLEN_LENS, min_size=nseq, max_size=nseq),
                                                  label="lens_k")
    H, Hk = draw(heads(6), label="heads")
    if packing == "qkv":
        Hk = H
    D = draw(st.sampled_from([64, 128]), label="head_dim")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    causal = draw(st.booleans(), label="causal")
    scale = draw(st.sampled_from([None, 0.4]), label="softmax_scale")
    extra_q = 0 if packing == "qkv" else draw(st.sampled_from([0, 0, 1, 5]), label="rows_past_cu_q")
    extra_k = draw(st.sampled_from([0, 0, 2]), label="rows_past_cu_k")
    if packing == "qkv":
        extra_k = extra_q = draw(st.sampled_from([0, 0, 3]), label="rows_past_cu")
    slack = draw(st.sampled_from([0, 0, 3]), label="max_seqlen_slack")
    total_q, total_k = sum(lens_q) + extra_q, sum(lens_k) + extra_k
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack
    # windows the kernel takes: none, a side reaching past every key (normalised away), causal's right 0
    wl = draw(st.sampled_from([-1, -1, max_k, max_k + 7]), label="window_left")
    wr = draw(st.sampled_from([-1, -1, max_k + 1] + ([0, 3] if causal else [])), label="window_right")
    slopes_kind = draw(st.sampled_from(["none", "none", "heads", "batch_heads"]), label="alibi_slopes")
    allow = ("alibi", "relative", "t5") if slopes_kind == "none" else ()
    position, _ = draw(position_spec(batch=1, heads=H, seqlen_q=0, seqlen_k=total_k, head_dim=D, offset=0, gen=gen,
                                     allow=allow), label="position")
    for p in (position if isinstance(position, list) else [position]):
        if isinstance(p, posattn.ALiBi) and p.slopes is not None and p.slopes.dim() == 2:
            p.slopes = 0.02 + torch.rand(nseq, H, generator=gen)     # per sequence: (batch_size, H)
    alibi = None
    if slopes_kind != "none":
        alibi = 0.02 + torch.rand((H,) if slopes_kind == "heads" else (nseq, H), generator=gen)
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    pad_fill = draw(st.sampled_from([float("nan"), float("inf")]), label="pad_fill")

    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = values((total_q, H, D), dtype, kind, gen)
    k = values((total_k, Hk, D), dtype, kind, gen)
    v = values((total_k, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)
    cond = logit_cond(q, k, scale)
    left, right = normalize_window((wl, wr), causal, max_k)
    ro, rl = R.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, softmax_scale=scale, causal=causal,
                                window_size=(left, right), alibi_slopes=alibi, position=position)
    qp, kp, vp = q.clone(), k.clone(), v.clone()   # rows past cu_seqlens[-1] belong to no sequence
    qp[sum(lens_q):], kp[sum(lens_k):], vp[sum(lens_k):] = pad_fill, -pad_fill, pad_fill
    # positional tensors on the device (the objects are the reference's: their tensors are swapped in place)
    for p in (position if isinstance(position, list) else [position]):
        for attr in ("slopes", "table"):
            if isinstance(getattr(p, attr, None), torch.Tensor):
                setattr(p, attr, _to(getattr(p, attr).detach(), device))
    cu_q, cu_k, alibi = _to(cu_q, device), _to(cu_k, device), _to(alibi, device)

    kw = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(wl, wr), softcap=0.0,
              alibi_slopes=alibi, return_attn_probs=True, position=position)
    if packing == "qkv":
        args = (_to(with_layout(torch.stack([qp, kp, vp], dim=1), layout), device),)
        fn, call = posattn.flash_attn_varlen_qkvpacked_func, lambda *a, **o: fn(*a, cu_q, max_q, **o)
        names = ("qkv",)
    elif packing == "kv":
        args = (_to(with_layout(qp, layout), device), _to(with_layout(torch.stack([kp, vp], dim=1), layout), device))
        fn, call = posattn.flash_attn_varlen_kvpacked_func, lambda *a, **o: fn(*a, cu_q, cu_k, max_q, max_k, **o)
        names = ("q", "kv")
    else:
        args = tuple(_to(with_layout(t, layout), device) for t in (qp, kp, vp))
        fn, call = posattn.flash_attn_varlen_func, lambda *a, **o: fn(*a, cu_q, cu_k, max_q, max_k, **o)
        names = ("q", "k", "v")
    if backend != "cuda":
        _cuda_probe(lambda: call(*args, **kw, backend="cuda"))
    named = dict(zip(names, args), cu_q=cu_q, cu_k=cu_k, alibi=alibi)
    snap = snapshot(**named)
    with poisoned_allocations(), torch.no_grad():   # the CUDA kernel is forward-only
        out, lse, _ = call(*args, **kw, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.device == device
    assert out.shape == (total_q, H, D) and lse.shape == (H, total_q)
    check_close(out, ro, dtype, name="out", cond=cond)
    check_close(lse, rl, dtype, name="lse", cond=cond, scale=lse_floor(rl))
    assert_unchanged(snap, **named)


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: LeanAttention decode
# ---------------------------------------------------------------------------------------------

def _check_decode(data, backend, device):
    """tests/test_fuzz_decode.py's case restricted to the CUDA kernel (ops/decode.py ``_check_cuda_args``):
    fp16/bf16, head_dim 64/128/256, no softcap, window (-1, -1) or the causal one, no cache_leftpad."""
    device = _device(device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(HALF), label="dtype")
    B = draw(st.integers(1, 3), label="batch")
    Sq = draw(st.sampled_from([1, 1, 2, 3, 5]), label="seqlen_q")
    H, Hk = draw(heads(6), label="heads")
    D = draw(st.sampled_from([64, 128, 256]), label="head_dim")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    s_new = draw(st.sampled_from([None, None, 0, 1, 1, 2, 3]), label="seqlen_new")
    sn = s_new or 0
    long = draw(st.sampled_from([False, False, False, True]), label="long_cache")  # > 128 keys: tiles split
    paged = draw(st.booleans(), label="paged")
    fill = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="invalid_fill")

    if paged:
        page = draw(st.sampled_from([1, 3, 16, 64] if long else [1, 2, 3, 5, 16]), label="page_block_size")
        max_blocks = draw(st.integers(1, (300 // page + 1) if long else max(1, 24 // page + 1)), label="max_blocks")
        max_blocks = max(max_blocks, -(-sn // page))
        capacity = page * max_blocks
        num_blocks = B * max_blocks + draw(st.integers(0, 3), label="unused_blocks")
    else:
        capacity = draw(st.integers(140, 300) if long else st.integers(1, 24), label="seqlen_cache")
    capacity = max(capacity, sn)
    lens_kind = draw(st.sampled_from(["tensor", "tensor", "int", "none"]) if s_new is None else
                     st.sampled_from(["tensor", "tensor", "int"]), label="cache_seqlens_kind")
    if lens_kind == "none":
        lens = [capacity] * B
    elif lens_kind == "int":
        lens = [draw(st.sampled_from([0, capacity - sn, (capacity - sn) // 2]), label="cache_seqlens")] * B
    else:
        lens = [draw(st.one_of(st.sampled_from([0, capacity - sn]), st.integers(0, capacity - sn)))
                for _ in range(B)]
    use_bidx = (not paged) and draw(st.booleans(), label="cache_batch_idx")

    causal = draw(st.booleans(), label="causal")
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (-1, 0)]), label="window")
    scale = draw(st.sampled_from([None, 0.3]), label="softmax_scale")
    rot = draw(st.sampled_from(["none", "none", "tables", "rope"]), label="rotary")
    alibi = draw(st.sampled_from(["none", "none", "heads", "batch_heads", "object"]), label="alibi")
    schedule = draw(st.sampled_from(["lean", "split", "single"]), label="schedule")
    num_splits = draw(st.sampled_from([0, 1, 2, 3, 7]), label="num_splits")
    num_ctas = draw(st.sampled_from([None, None, 1, 2, 3, 5]), label="num_ctas")
    ret_lse = draw(st.booleans(), label="return_softmax_lse")
    out_kind = draw(st.sampled_from(["none", "none", "buffer", "strided"]), label="out")

    q = values((B, Sq, H, D), dtype, kind, gen)
    if draw(st.booleans(), label="q_noncontiguous"):
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    if paged:
        k_cache = values((num_blocks, page, Hk, D), dtype, kind, gen)
        v_cache = values((num_blocks, page, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)
        block_table = torch.randperm(num_blocks, generator=gen)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
        bidx = None
    else:
        Bc = B + (draw(st.integers(0, 2), label="extra_cache_rows") if use_bidx else 0)
        k_cache = values((Bc, capacity, Hk, D), dtype, kind, gen)
        v_cache = values((Bc, capacity, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)
        block_table = None
        bidx = torch.randperm(Bc, generator=gen)[:B].to(torch.int32) if use_bidx else None
    k_new = v_new = None
    if s_new is not None:
        k_new = values((B, sn, Hk, D), dtype, kind, gen)
        v_new = values((B, sn, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)

    # invalid slots (not a valid cached key nor an append target) hold NaN/inf
    valid = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b in range(B):
        for j in range(lens[b] + sn):
            if paged:
                valid[int(block_table[b, j // page]), j % page] = True
            else:
                valid[b if bidx is None else int(bidx[b]), j] = True
    k_cache[~valid] = fill
    v_cache[~valid] = -fill if draw(st.booleans(), label="v_fill_negated") else fill
    cache_seqlens = torch.tensor(lens, dtype=torch.int32) if lens_kind == "tensor" else (
        lens[0] if lens_kind == "int" else None)

    rot_kw, ref_rot = {}, {}
    need = max(lens) + sn + Sq + 1
    if rot != "none":
        half = draw(st.one_of(st.just(D // 2), st.integers(1, D // 2)), label="rotary_dim_half")
        interleaved = draw(st.booleans(), label="rotary_interleaved")
        if rot == "tables":
            tdtype = draw(st.sampled_from(TABLE_DTYPES), label="table_dtype")
            inv = R.rope_inv_freq(2 * half, draw(st.sampled_from([10000.0, 500.0])), dtype=torch.float64)
            cos, sin = (t.to(tdtype) for t in R.rope_cos_sin(torch.arange(need + draw(st.integers(0, 3))), inv))
            rot_kw = dict(rotary_cos=_to(cos, device), rotary_sin=_to(sin, device), rotary_interleaved=interleaved)
        else:
            rope = posattn.RoPE(draw(st.sampled_from([10000.0, 500.0])), rotary_dim=2 * half, interleaved=interleaved)
            # the op's fp32 angles, computed on the op's device by the op's functions (cos/sin of the GPU may
            # differ from the CPU's in the last bit; the appended k must match bit for bit)
            inv = rope.inv_freq(D, device, seqlen=max(lens) + sn)
            cos, sin = (t.cpu() for t in R.rope_cos_sin(torch.arange(need, device=device), inv))
            rot_kw = dict(position=rope)
        ref_rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    slopes = None
    if alibi != "none":
        slopes = 0.02 + torch.rand((B, H) if alibi == "batch_heads" else (H,), generator=gen)
        if alibi == "object":
            obj = posattn.ALiBi(_to(slopes, device))
            rot_kw["position"] = [rot_kw["position"], obj] if "position" in rot_kw else obj
        else:
            rot_kw["alibi_slopes"] = _to(slopes, device)

    ro, rl = R.kvcache_attention(q, k_cache, v_cache, torch.tensor(lens), k=k_new, v=v_new, cache_batch_idx=bidx,
                                 block_table=block_table, softmax_scale=scale, causal=causal, window_size=window,
                                 alibi_slopes=slopes, **ref_rot)
    k_all = k_cache.reshape(-1, Hk, D)[valid.reshape(-1)]
    cond = logit_cond(q, torch.cat([k_all, k_new.reshape(-1, Hk, D)]) if k_new is not None else k_all, scale)
    # expected caches after the call: the new k (rotated in fp32 by the shared formula, rounded) and v at
    # cache_seqlens[b] + t, nothing else
    ek, ev = k_cache.clone(), v_cache.clone()
    if sn:
        kn = k_new
        if rot != "none":
            c32, s32 = cos.to(torch.float32), sin.to(torch.float32)
            kpos = torch.tensor(lens)[:, None] + torch.arange(sn)[None, :]
            kn = R.apply_rotary(k_new.float(), c32[kpos][:, :, None, :], s32[kpos][:, :, None, :],
                                interleaved).to(dtype)
        for b in range(B):
            for t in range(sn):
                j = lens[b] + t
                blk, col = ((int(block_table[b, j // page]), j % page) if paged else
                            ((b if bidx is None else int(bidx[b])), j))
                ek[blk, col], ev[blk, col] = kn[b, t], v_new[b, t]

    out_buf = None
    if out_kind == "buffer":
        out_buf = torch.full((B, Sq, H, D), float("nan"), dtype=dtype)
    elif out_kind == "strided":
        out_buf = torch.full((B, Sq, H, 2 * D), float("nan"), dtype=dtype)[..., ::2]
    q, k_cache, v_cache, k_new, v_new, bidx, block_table, out_buf = (
        _to(t, device) for t in (q, k_cache, v_cache, k_new, v_new, bidx, block_table, out_buf))
    if isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = _to(cache_seqlens, device)

    def call(backend, k_cache, v_cache, out):
        return posattn.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, cache_batch_idx=bidx,
            block_table=block_table, softmax_scale=scale, causal=causal, window_size=window, num_splits=num_splits,
            return_softmax_lse=ret_lse, schedule=schedule, backend=backend, num_ctas=num_ctas, out=out, **rot_kw)

    if backend != "cuda":
        _cuda_probe(lambda: call("cuda", *(_same_layout_copy(t) for t in (k_cache, v_cache, out_buf))))
    tabs = dict(cos=rot_kw.get("rotary_cos"), sin=rot_kw.get("rotary_sin"), slopes=rot_kw.get("alibi_slopes"))
    named = dict(q=q, k=k_new, v=v_new, bidx=bidx, block_table=block_table,
                 cache_seqlens=cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None, **tabs)
    snap = snapshot(**named)
    with poisoned_allocations():
        res = call(backend, k_cache, v_cache, out_buf)
    out, lse = res if ret_lse else (res, None)
    if out_buf is not None:
        assert out is out_buf, "out= is returned"
    assert out.dtype == dtype and out.shape == (B, Sq, H, D) and out.device == device
    check_close(out, ro, dtype, name="out", cond=cond)
    if ret_lse:
        assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
        check_close(lse, rl, dtype, name="lse", cond=cond, scale=lse_floor(rl))
    assert_unchanged(snap, **named)
    assert torch.equal(_bits(k_cache.cpu()), _bits(ek)), "k_cache: the append wrote the wrong values or other slots"
    assert torch.equal(_bits(v_cache.cpu()), _bits(ev)), "v_cache: the append wrote the wrong values or other slots"


# ---------------------------------------------------------------------------------------------
# ecoformer_attention
# ---------------------------------------------------------------------------------------------

def _check_ecoformer(data, backend, device):
    """tests/test_fuzz_ecoformer.py's case restricted to the CUDA kernels (ops/ecoformer.py
    ``_check_cuda_backend``): non-causal, num_bits <= 64, head_dim_v <= 256, v fp16/bf16/fp32, right padding."""
    device = _device(device)
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    vdtype = draw(st.sampled_from(DTYPES), label="v_dtype")
    B = draw(st.integers(1, 2), label="batch")
    H, Hk = draw(heads(4), label="heads")
    lens = st.one_of(st.sampled_from([0, 1, 2, 64, 129]), st.integers(0, 40))
    M = draw(lens, label="seqlen_q")
    form = draw(st.sampled_from(["consistent", "consistent", "reference-code"]), label="form")
    shared = draw(st.booleans(), label="shared_codes")
    N = M if form == "reference-code" or shared else draw(lens, label="seqlen_k")
    if shared:
        Hk = H
    nb = draw(st.sampled_from([b for b in NUM_BITS if b <= 64]), label="num_bits")
    Dv = draw(st.sampled_from([1, 3, 8, 40, 64, 256]), label="head_dim_v")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    packed = draw(st.sampled_from([None, None, torch.int64, torch.int32]), label="packed_words")
    cdtype = draw(st.sampled_from(CODE_DTYPES), label="code_dtype")
    pad_kind = draw(st.sampled_from(["none", "none", "right", "right", "all"]), label="key_padding_mask")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    fill = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="hidden_fill")
    want_grad = draw(st.booleans(), label="gradients")

    hq = _codes((B, H, M, nb), gen, torch.float64)
    hk = hq if shared else _codes((B, Hk, N, nb), gen, torch.float64)
    v0 = values((B, Hk, N, Dv), vdtype, kind, gen)
    mask = None
    if pad_kind == "right":   # each row: kept keys, then padding (0 and N kept included)
        kept = torch.tensor([draw(st.one_of(st.sampled_from([0, N]), st.integers(0, N)), label="kept_keys")
                             for _ in range(B)])
        mask = torch.arange(N)[None, :] >= kept[:, None]
    elif pad_kind == "all":
        mask = torch.ones(B, N, dtype=torch.bool)
    vp = v0.clone()
    if mask is not None and form == "consistent":   # padded keys are read by nothing (reference-code reads v_i)
        vp[mask[:, None, :, None].expand_as(vp)] = fill

    q64 = hq.clone().requires_grad_(True)
    k64 = q64 if shared else hk.clone().requires_grad_(True)
    v64 = v0.double().requires_grad_(True)
    ref = R.ecoformer_pairwise(q64, k64, v64, key_padding_mask=mask, form=form)

    code_grad = want_grad and packed is None
    if packed is not None:
        qc = _to(posattn.ecoformer_pack_bits(hq, word_dtype=packed), device)
        kc = qc if shared else _to(posattn.ecoformer_pack_bits(hk, word_dtype=packed), device)
        kw = dict(num_bits=nb)
    else:
        qc = _to(with_layout(hq.to(cdtype), layout), device).requires_grad_(code_grad)
        kc = qc if shared else _to(with_layout(hk.to(cdtype), layout), device).requires_grad_(code_grad)
        kw = dict(num_bits=nb) if draw(st.booleans(), label="pass_num_bits") else {}
    v = _to(with_layout(vp, layout), device).requires_grad_(want_grad)
    mask = _to(mask, device)
    if backend != "cuda":
        _cuda_probe(lambda: posattn.ecoformer_attention(qc, kc, v, key_padding_mask=mask, form=form, backend="cuda",
                                                        **kw))
    snap = snapshot(qc=qc, kc=kc, v=v, mask=mask)
    with poisoned_allocations():
        out = posattn.ecoformer_attention(qc, kc, v, key_padding_mask=mask, form=form, backend=backend, **kw)
        assert out.dtype == vdtype and out.shape == (B, H, M, Dv) and out.device == device
        check_close(out, ref, vdtype, name="out")
        ours = [v] + ([qc] if code_grad else []) + ([kc] if code_grad and not shared else [])
        theirs = [v64] + ([q64] if code_grad else []) + ([k64] if code_grad and not shared else [])
        names = ["dv"] + (["dq_codes"] if code_grad else []) + (["dk_codes"] if code_grad and not shared else [])
        if want_grad:
            assert out.requires_grad, "out is detached from the inputs' graph"
            dout = values(out.shape, vdtype, "unit", gen)
            got = grads(out, ours, dout.to(device))
    assert_unchanged(snap, qc=qc, kc=kc, v=v, mask=mask)
    if not want_grad:
        return
    want = grads(ref, theirs, dout.double())
    for g, w, n, f in zip(got, want, names, grad_floor(want, names, base=("dv", "dq_codes", "dk_codes"))):
        gdt = vdtype if n == "dv" else max((vdtype, cdtype), key=lambda t: torch.finfo(t).eps)
        check_close(g, w, gdt, grad=True, name=n, scale=f)


# ---------------------------------------------------------------------------------------------
# the tests: backend "cuda" on a GPU (device fixture: "cuda" there; skipped without one), the most intricate
# kernels first (a deep run stopped at its time cap has given them the most examples) ...
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@given(data=st.data())
@examples(25)
def test_fuzz_cuda_kvcache(data, device):
    _check_decode(data, "cuda", device)


@pytest.mark.gpu
@given(data=st.data())
@examples(25)
def test_fuzz_cuda_varlen(data, device):
    _check_varlen(data, "cuda", device)


@pytest.mark.gpu
@given(data=st.data())
@examples(25)
def test_fuzz_cuda_ecoformer(data, device):
    _check_ecoformer(data, "cuda", device)


@pytest.mark.gpu
@given(data=st.data())
@examples(30)
def test_fuzz_cuda_rotary(data, device):
    _check_rotary(data, "cuda", device)


@pytest.mark.gpu
@given(data=st.data())
@examples(25)
def test_fuzz_cuda_unpad_input(data, device):
    _check_unpad(data, "cuda", device)


@pytest.mark.gpu
@given(data=st.data())
@examples(25)
def test_fuzz_cuda_pad_input(data, device):
    _check_pad(data, "cuda", device)


# ---------------------------------------------------------------------------------------------
# ... and the harness self-check: the same functions, backend "torch" on CPU (not gpu-marked)
# ---------------------------------------------------------------------------------------------

_CHECKS = {"rotary": _check_rotary, "unpad_input": _check_unpad, "pad_input": _check_pad, "varlen": _check_varlen,
           "kvcache": _check_decode, "ecoformer": _check_ecoformer}


@pytest.mark.parametrize("op", list(_CHECKS))
@given(data=st.data())
@examples(8)
def test_fuzz_cuda_harness_on_cpu(op, data):
    _CHECKS[op](data, "torch", CPU)
