"""Regression tests for bugs a break-it pass found in the attention ops (scaled_dot_product_attention,
flash_attn_func, flash_attn_varlen_func on the torch backend). One test (or parametrised family) per bug; results
are checked against posattn.reference in float64 (or torch's own SDPA where torch defines the behaviour)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import posattn
from posattn import reference as R

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _strided(shape, stride, dtype, g):
    """A fresh random leaf ``base`` and the view ``base.as_strided(shape, stride)`` (elements may share memory)."""
    n = sum((s - 1) * st for s, st in zip(shape, stride)) + 1
    base = torch.randn(n, dtype=dtype, generator=g).requires_grad_(True)
    return base, base.as_strided(shape, stride)


def _ref_grads(bases, views, fn, gout):
    """fp64 reference out and gradients wrt the bases, the views rebuilt with the same geometry."""
    b64 = [b.detach().double().requires_grad_(True) for b in bases]
    v64 = [b.as_strided(v.shape, v.stride()) for b, v in zip(b64, views)]
    out = fn(*v64)
    grads = torch.autograd.grad(out, b64, gout.double())
    return out, grads


# -- 1. inputs whose elements share memory (fast path of the torch backend) ---------------------------------------

# (shape, strides) in torch's SDPA layout (batch, heads, seq, head_dim)
OVERLAP_LAYOUTS = [
    ((1, 1, 5, 8), (8, 8, 1, 1)),      # x.unfold(0, 8, 1)[:5][None, None]: rows overlap
    ((2, 3, 5, 8), (1, 0, 8, 1)),      # batch stride 1, heads stride 0
    ((2, 3, 5, 8), (3, 1, 8, 1)),      # batch and heads overlap
    ((2, 3, 5, 8), (0, 8, 1, 1)),      # batch broadcast, overlapping rows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS, ids=lambda l: str(l[1]))
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_overlapping_inputs(dtype, layout, which, causal):
    """Minimal example: q = x.unfold(0, 8, 1)[:5][None, None] (strides (8, 8, 1, 1)). _fast_prep handed such views
    to aten._scaled_dot_product_flash_attention_for_cpu, which misreads them: wrong out and dq/dk, no error. Now
    _attention_torch._kernel_operand copies a tensor whose elements may share memory before the kernel."""
    shape, stride = layout
    g = _gen(1)
    bases, views = [], []
    for name in "qkv":
        if name in which:
            b, t = _strided(shape, stride, dtype, g)
        else:
            b = torch.randn(shape, dtype=dtype, generator=g).requires_grad_(True)
            t = b.as_strided(b.shape, b.stride())
        bases.append(b)
        views.append(t)
    out = posattn.scaled_dot_product_attention(*views, is_causal=causal, backend="torch")
    gout = torch.randn(out.shape, dtype=dtype, generator=g)
    grads = torch.autograd.grad(out, bases, gout)
    ref, ref_grads = _ref_grads(bases, views, lambda q, k, v: R.attention(q, k, v, causal=causal)[0], gout)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("position", [None, "alibi"])
def test_flash_attn_func_overlapping_q(dtype, position):
    """flash_attn_func layout (batch, seq, heads, head_dim) with an overlapping q and k (rows of one unfolded
    vector), causal (bottom-right) and with ALiBi (the Toeplitz-bias branch of the fast path, rows reversed)."""
    g = _gen(2)
    bq, q = _strided((2, 6, 3, 8), (0, 1, 8, 1), dtype, g)
    bk, k = _strided((2, 7, 3, 8), (2, 8, 1, 1), dtype, g)
    bv = torch.randn(2, 7, 3, 8, dtype=dtype, generator=g).requires_grad_(True)
    v = bv.as_strided(bv.shape, bv.stride())
    pos = None if position is None else posattn.ALiBi()
    out = posattn.flash_attn_func(q, k, v, causal=True, position=pos, backend="torch")
    gout = torch.randn(out.shape, dtype=dtype, generator=g)
    grads = torch.autograd.grad(out, (bq, bk, bv), gout)

    def ref(q, k, v):
        o, _ = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, offset=1,
                           position=pos)
        return o.transpose(1, 2)

    ro, rg = _ref_grads((bq, bk, bv), (q, k, v), ref, gout)
    torch.testing.assert_close(out.double(), ro, **TOL[dtype])
    for name, a, b in zip("qkv", grads, rg):
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda m: f"d{name}: {m}")


def test_sdpa_backward_with_overlapping_grad_output():
    """grad_output reaches torch's fused CPU backward (fp32): an expanded (stride 0) or overlapping grad_output is
    copied first, so dq/dk/dv match the reference."""
    g = _gen(3)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    out = posattn.scaled_dot_product_attention(q, k, v, backend="torch")
    row = torch.randn(8, generator=g)
    x = torch.randn(64, generator=g)
    for gout in (row.expand(out.shape), x.as_strided(out.shape, (3, 1, 8, 1))):
        grads = torch.autograd.grad(out, (q, k, v), gout, retain_graph=True)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = R.attention(q64, k64, v64)[0]
        rg = torch.autograd.grad(ref, (q64, k64, v64), gout.double())
        for name, a, b in zip("qkv", grads, rg):
            torch.testing.assert_close(a.double(), b, **TOL[torch.float32], msg=lambda m: f"d{name}: {m}")


# -- 2. forward-mode AD -------------------------------------------------------------------------------------------

def _sdpa(q, k, v):
    return posattn.scaled_dot_product_attention(q, k, v, backend="torch")


def _flash(q, k, v):
    return posattn.flash_attn_func(q, k, v, backend="torch")


@pytest.mark.parametrize("fn", [_sdpa, _flash], ids=["sdpa", "flash_attn_func"])
def test_forward_mode_ad_raises(fn):
    """Minimal example: torch.func.jvp through scaled_dot_product_attention returned a zero tangent without an error
    (the custom op runs below autograd for dual tensors). Now NotImplementedError saying reverse mode only, for
    torch.func.jvp and torch.autograd.forward_ad, whichever input carries the tangent."""
    g = _gen(4)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g) for _ in range(3))
    tq = torch.randn(q.shape, generator=g)
    with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
        torch.func.jvp(lambda q: fn(q, k, v), (q,), (tq,))
    with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
        torch.func.jvp(lambda v: fn(q, k, v), (v,), (tq,))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="reverse-mode autograd only"):
            fn(q, fwAD.make_dual(k, tq), v)
        out = fn(q, k, v)                      # no tangent anywhere: runs inside a dual level
    torch.testing.assert_close(out, fn(q, k, v))
    # reverse mode is unaffected
    qg = q.clone().requires_grad_(True)
    (gq,) = torch.autograd.grad(fn(qg, k, v).sum(), qg)
    assert gq.shape == q.shape and bool(torch.isfinite(gq).all())


# -- 3. zero heads / zero batch in backward -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 0, 5, 8), (0, 2, 5, 8)])
def test_sdpa_zero_heads_backward(dtype, shape):
    """Minimal example: q, k, v of shape (2, 0, 5, 8) requiring grad: forward worked, backward raised
    ZeroDivisionError in _flash_bwd (group = H // Hkv). Now zero-size gradients of the inputs' shapes, as torch."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    out = posattn.scaled_dot_product_attention(q, k, v, backend="torch")
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype
    ref = [t.detach().requires_grad_(True) for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref).sum().backward()
    assert [t.grad.shape for t in ref] == [t.grad.shape for t in (q, k, v)]


# -- 4. double backward -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [_sdpa, _flash], ids=["sdpa", "flash_attn_func"])
def test_double_backward_raises_clear_error(fn):
    """Minimal example: torch.autograd.grad(out.sum(), q, create_graph=True) then a backward through the result:
    torch's "no autograd formula was registered" for posattn.fused_attention_bwd. Now NotImplementedError naming
    double backward; the first-order gradients with create_graph=True are unchanged."""
    g = _gen(5)
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    gout = torch.randn(1, 4, 2, 8, dtype=torch.float64, generator=g)
    g1 = torch.autograd.grad(fn(q, k, v), (q, k, v), gout, create_graph=True)
    g2 = torch.autograd.grad(fn(q, k, v), (q, k, v), gout)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="does not support double backward"):
        (g1[0] * torch.randn(g1[0].shape, dtype=torch.float64, generator=g)).sum().backward()
    for f in (posattn.scaled_dot_product_attention, posattn.flash_attn_func):
        doc = " ".join(f.__doc__.split())
        assert "Double backward" in doc and "NotImplementedError" in doc


# -- 5. head_dim 0 with the default scale -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_head_dim_0_default_scale(dtype, causal):
    """Minimal example: q, k of shape (1, 2, 4, 0): ZeroDivisionError ('0.0 cannot be raised to a negative power')
    from the default scale. torch's SDPA returns the mean of the visible values (every logit is 0); so does posattn
    now (default scale 1.0 for head_dim 0), forward and dv."""
    g = _gen(6)
    q = torch.randn(2, 3, 4, 0, dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(2, 3, 6, 0, dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(2, 3, 6, 5, dtype=dtype, generator=g).requires_grad_(True)
    out = posattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="torch")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    gout = torch.randn(out.shape, dtype=dtype, generator=g)
    got = torch.autograd.grad(out, (q, k, v), gout)
    want = torch.autograd.grad(ref, (q, k, v), gout)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_head_dim_0_default_scale(causal):
    """flash_attn_func with head_dim 0 (same ZeroDivisionError): bottom-right causal, vs the float64 reference."""
    g = _gen(7)
    q = torch.randn(2, 4, 3, 0, generator=g)
    k = torch.randn(2, 6, 3, 0, generator=g)
    v = torch.randn(2, 6, 3, 5, generator=g)
    out = posattn.flash_attn_func(q, k, v, causal=causal, backend="torch")
    ref, _ = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0, causal=causal,
                         offset=2)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), **TOL[torch.float32])


# -- 6. numpy scalars, 0-d tensors, numpy bools -------------------------------------------------------------------

def test_sdpa_numpy_and_0d_tensor_scalars():
    """torch's SDPA takes scale / dropout_p as numpy floats or 0-d tensors and is_causal as a numpy bool; posattn
    raised TypeError ("is_causal: expected a bool, got bool" for numpy.bool_). Now the same result as Python
    scalars; non-bools still get a TypeError naming the argument and the type."""
    g = _gen(8)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    want = posattn.scaled_dot_product_attention(q, k, v, scale=0.3, dropout_p=0.0, is_causal=True)
    ref, _ = R.attention(q, k, v, scale=0.3, causal=True)
    torch.testing.assert_close(want.double(), ref, **TOL[torch.float32])
    for scale, p in ((np.float32(0.3), np.float64(0.0)), (torch.tensor(0.3), torch.tensor(0.0)),
                     (torch.tensor(0.3, dtype=torch.float64), np.float16(0.0))):
        got = posattn.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=p, is_causal=np.bool_(True),
                                                   enable_gqa=np.bool_(False))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="is_causal: expected a bool, got int"):
        posattn.scaled_dot_product_attention(q, k, v, is_causal=1)
    with pytest.raises(TypeError, match="scale: expected a float, got str"):
        posattn.scaled_dot_product_attention(q, k, v, scale="0.3")
    with pytest.raises(TypeError, match="dropout_p: expected a float, got numpy.bool"):
        posattn.scaled_dot_product_attention(q, k, v, dropout_p=np.bool_(False))


def test_flash_attn_func_numpy_and_0d_tensor_scalars():
    """flash_attn_func: softmax_scale, dropout_p, softcap as numpy floats / 0-d tensors, window_size entries as
    numpy ints / integer 0-d tensors, causal and return_attn_probs as numpy bools."""
    g = _gen(9)
    q = torch.randn(2, 5, 4, 8, generator=g)
    k, v = (torch.randn(2, 7, 2, 8, generator=g) for _ in range(2))
    want = posattn.flash_attn_func(q, k, v, 0.0, 0.4, True, (3, 1), 2.0, return_attn_probs=True)
    ref, ref_lse = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.4, causal=True,
                               offset=2, window_size=(3, 1), softcap=2.0)
    torch.testing.assert_close(want[0].double(), ref.transpose(1, 2), **TOL[torch.float32])
    for args in ((np.float64(0.0), np.float32(0.4), np.bool_(True), (np.int64(3), np.int32(1)), np.float64(2.0)),
                 (torch.tensor(0.0), torch.tensor(0.4), True, (torch.tensor(3), torch.tensor(1)), torch.tensor(2.0))):
        got = posattn.flash_attn_func(q, k, v, *args, return_attn_probs=np.bool_(True))
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="causal: expected a bool, got str"):
        posattn.flash_attn_func(q, k, v, causal="yes")
    with pytest.raises(TypeError, match=r"window_size\[0\]: expected an int, got float"):
        posattn.flash_attn_func(q, k, v, window_size=(1.5, -1))


def test_varlen_numpy_and_0d_tensor_scalars():
    """flash_attn_varlen_func: max_seqlen_q/k as numpy ints / 0-d tensors, scale and dropout as numpy / 0-d
    tensors, causal / deterministic / return_attn_probs as numpy bools: same result as Python scalars."""
    g = _gen(10)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (torch.randn(7, 2, 8, generator=g) for _ in range(3))
    want = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, 0.0, 0.5, True, return_attn_probs=True)
    for mq, mk, p, s in ((np.int64(4), np.int32(4), np.float64(0.0), np.float32(0.5)),
                         (torch.tensor(4), torch.tensor(4, dtype=torch.int32), torch.tensor(0.0), torch.tensor(0.5))):
        got = posattn.flash_attn_varlen_func(q, k, v, cu, cu, mq, mk, p, s, np.bool_(True),
                                             deterministic=np.bool_(False), return_attn_probs=np.bool_(True))
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    for b in range(2):                                # vs the float64 reference, per sequence
        s0, s1 = int(cu[b]), int(cu[b + 1])
        ref, _ = R.attention(*(t[None, s0:s1].transpose(1, 2) for t in (q, k, v)), scale=0.5, causal=True)
        torch.testing.assert_close(want[0][s0:s1].double(), ref[0].transpose(0, 1), **TOL[torch.float32])
    with pytest.raises(TypeError, match="max_seqlen_q: expected an int, got float"):
        posattn.flash_attn_varlen_func(q, k, v, cu, cu, 4.0, 4)
    with pytest.raises(TypeError, match="causal: expected a bool, got int"):
        posattn.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=1)


# -- 7. docstring: float64 gradcheck holds for out, lse is float32 ------------------------------------------------

def test_float64_gradcheck_claim_is_about_out():
    """The flash_attn_func docstring said float64 inputs give full precision "so gradcheck holds", but softmax_lse is
    always float32 (FlashAttention's contract). The wording now limits the claim to out; gradcheck on out holds."""
    doc = " ".join(posattn.flash_attn_func.__doc__.split())
    assert "gradcheck`` holds for ``out``" in doc and "``softmax_lse`` stays float32" in doc
    g = _gen(11)
    q, k, v = (torch.randn(1, 3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: posattn.flash_attn_func(q, k, v, causal=True, backend="torch"),
                                    (q, k, v))
    _, lse, _ = posattn.flash_attn_func(q, k, v, return_attn_probs=True, backend="torch")
    assert lse.dtype == torch.float32


# -- out.sum().backward() on the Triton backend ------------------------------------------------------------------
# The fuzz found it once the gradient layout was drawn (fuzz_helpers.grad_output): the dense Triton backward read
# dO's head dim with unit stride, and out.sum() hands an expanded dO (stride 0 everywhere): dq, dk, dv were garbage
# (1e27 on CPU under the interpreter; on a GPU, reads past the one-element storage). Minimal input: any shape.

@pytest.mark.interp
@pytest.mark.parametrize("api", ["sdpa", "flash_attn_func"])
@pytest.mark.parametrize("dout_kind", ["sum", "expanded_value", "last_dim_stride_2"])
def test_triton_backward_reads_grad_output_through_its_strides(api, dout_kind):
    g = _gen(7)
    B, S, H, D = 1, 17, 2, 32
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    if api == "sdpa":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))

    def run(q, k, v):
        if api == "sdpa":
            return posattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        return posattn.flash_attn_func(q, k, v, causal=True, backend="triton")

    def grads(out, leaves, gout):
        if dout_kind == "sum":
            return torch.autograd.grad(out.sum(), leaves)
        return torch.autograd.grad(out, leaves, gout.to(out.dtype))

    shape = q.shape
    if dout_kind == "last_dim_stride_2":
        wide = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"))
        gout = wide[..., ::2]
        gout.copy_(torch.randn(shape, generator=_gen(3)))
    else:
        gout = torch.tensor(0.75).expand(shape)    # stride 0 everywhere, like out.sum()'s
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = grads(run(*leaves), leaves, gout)
    l64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    if api == "sdpa":
        ref = R.attention(*l64, causal=True)[0]
    else:
        ref = R.attention(*(t.transpose(1, 2) for t in l64), causal=True)[0].transpose(1, 2)
    want = grads(ref, l64, gout)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name}: not finite"
        torch.testing.assert_close(a, b.float(), atol=2e-4, rtol=2e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interp
@pytest.mark.parametrize("which", ["q", "k", "both"])
def test_triton_varlen_reads_strided_cu_seqlens_through_their_strides(which):
    """cu_seqlens given as a strided view (every other entry of a buffer) were indexed by the Triton varlen kernels
    with unit stride: the lengths came from the gaps, reads went past the tensors (the interpreter aborted with
    munmap_chunk(): invalid pointer). Found by the fuzz audit (the varlen fuzz test drew contiguous cu_seqlens)."""
    g = _gen(21)
    cu = torch.tensor([0, 3, 3, 20, 25], dtype=torch.int32)
    q, k, v = (torch.randn(25, h, 16, generator=g) for h in (2, 1, 1))
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    want, want_lse = R.varlen_attention(q64, k64, v64, cu, cu, causal=True)
    buf = torch.full((10,), 10 ** 6, dtype=torch.int32)
    buf[::2] = cu
    cu_q = buf[::2] if which in ("q", "both") else cu
    cu_k = buf[::2] if which in ("k", "both") else cu
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse, _ = posattn.flash_attn_varlen_func(*ins, cu_q, cu_k, 17, 17, causal=True, return_attn_probs=True,
                                                 backend="triton")
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], **TOL[torch.float32])
    dout = torch.randn(want.shape, generator=g)
    got = torch.autograd.grad(out, ins, dout)
    exp = torch.autograd.grad(want, [q64, k64, v64], dout.double())
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=5e-5)
    assert torch.equal(buf[1::2], torch.full((5,), 10 ** 6, dtype=torch.int32))
