"""posattn.apply_rotary: torch and Triton (interpreter) backends vs the float64 reference rotation, both
layouts, partial rotary, position_ids, inplace, gradients of x / cos / sin, bad inputs, opcheck."""
import pytest
import torch

import posattn
from posattn import reference as R
from tolerances import assert_close, poison_like

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(seqlen_ro, rotary_dim, dtype=torch.float32, device="cpu"):
    inv = R.rope_inv_freq(rotary_dim, 10000.0, dtype=torch.float32, device=device)
    cos, sin = R.rope_cos_sin(torch.arange(seqlen_ro, device=device), inv)
    return cos.to(dtype), sin.to(dtype)


def _ref(x, cos, sin, interleaved, position_ids=None):
    """float64 truth: rows of cos/sin gathered per token, reference.apply_rotary in (B, S, H, D) layout."""
    B, S = x.shape[:2]
    rows = torch.arange(S).unsqueeze(0) if position_ids is None else position_ids.long().reshape(-1, S)
    c = cos.double()[rows].unsqueeze(2)
    s = sin.double()[rows].unsqueeze(2)
    return R.apply_rotary(x.double(), c, s, interleaved)


def _run(backend, x, cos, sin, **kw):
    return posattn.apply_rotary(x, cos, sin, backend=backend, **kw)


# "cuda" (posattn._cuda.apply_rotary_cuda over csrc/rope.cu) runs only on a GPU: not yet run on a GPU
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interp), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("shape", [(2, 17, 3, 64, 64), (1, 1, 2, 40, 24), (2, 9, 1, 72, 72), (1, 13, 2, 128, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_with_grads(shape, interleaved, dtype, backend, device):
    """(batch, seqlen, heads, head_dim, rotary_dim); position_ids per batch; grads of x, cos, sin."""
    B, S, H, D, r = shape
    x = torch.randn(B, S, H, D, device=device).to(dtype).requires_grad_()
    cos, sin = _tables(S + 20, r, device=device)
    cos, sin = cos.requires_grad_(), sin.requires_grad_()
    pid = torch.randint(0, S + 20, (B, S), device=device)
    x_before = x.detach().clone()
    y = _run(backend, x, cos, sin, interleaved=interleaved, position_ids=pid)
    assert torch.equal(x.detach(), x_before)
    x64, c64, s64 = (t.detach().double().requires_grad_() for t in (x, cos, sin))
    want = _ref(x64, c64, s64, interleaved, pid)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, want, dtype)
    assert torch.equal(y[..., r:], x.detach()[..., r:])  # pass-through dims are bit-exact
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, cos, sin], dy)
    ref = torch.autograd.grad(want, [x64, c64, s64], dy.double())
    for g, w, n in zip(got, ref, ("dx", "dcos", "dsin")):
        assert_close(g, w, dtype if n == "dx" else torch.float32 if dtype == torch.float32 else dtype,
                     grad=True, name=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_positions_strided_and_1d_ids(backend, device):
    """position_ids None = arange; a 1-D position_ids; a strided (non-contiguous) x."""
    base = torch.randn(2, 3, 11, 32, device=device)
    x = base.transpose(1, 2)  # (2, 11, 3, 32) strided
    cos, sin = _tables(11, 32, device=device)
    y = _run(backend, x, cos, sin)
    assert_close(y, _ref(x, cos, sin, False), torch.float32)
    y1 = _run(backend, x, cos, sin, position_ids=torch.arange(11, device=device))
    torch.testing.assert_close(y1, y, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace(backend, device):
    x = torch.randn(2, 7, 2, 16, device=device)
    cos, sin = _tables(7, 12, device=device)
    want = _ref(x, cos, sin, True)
    x_in = x.clone()
    out = _run(backend, x_in, cos, sin, interleaved=True, inplace=True)
    assert out is x_in
    assert_close(x_in, want, torch.float32)
    # with autograd: result copied into x (a non-leaf), gradient of the original leaf still exact
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0
    z = _run(backend, y, cos, sin, interleaved=True, inplace=True)
    assert z is y
    (g,) = torch.autograd.grad(z, [leaf], torch.ones_like(z))
    x64 = x.double().requires_grad_()
    (w,) = torch.autograd.grad(_ref(x64, cos, sin, True), [x64], torch.ones_like(x64))
    assert_close(g, w, torch.float32, grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fp16_tables_and_no_poison_left(dtype):
    """cos/sin in the input dtype; the output buffer is fully written (NaN-poisoned x rows untouched)."""
    x = torch.randn(1, 5, 2, 16).to(dtype)
    cos, sin = _tables(5, 16, dtype)
    y = posattn.apply_rotary(x, cos, sin)
    assert torch.isfinite(y).all()
    assert_close(y, _ref(x, cos, sin, False), dtype)
    # a NaN in x stays in its own pair only
    xp = x.clone()
    xp[0, 2, 1, 3] = poison_like(xp[0, 2, 1, 3])
    yp = posattn.apply_rotary(xp, cos, sin)
    assert torch.isnan(yp).sum() == 2 and torch.isfinite(yp[0, :2]).all()


def test_bad_inputs():
    ar = posattn.apply_rotary
    x = torch.randn(2, 5, 2, 16)
    cos, sin = _tables(8, 16)

    def raises(exc, match, *a, **kw):
        with pytest.raises(exc, match=match):
            ar(*a, **kw)

    raises(ValueError, "x", x[0], cos, sin)
    raises(TypeError, "x", x.int(), cos, sin)
    raises(ValueError, "cos", x, cos[:4], sin[:4])                       # table shorter than seqlen
    raises(ValueError, "sin", x, cos, sin[:, :4])
    raises(TypeError, "sin", x, cos, sin.double())
    raises(ValueError, "cos", x, torch.randn(8, 9), torch.randn(8, 9))   # rotary_dim 18 > head_dim 16
    raises(ValueError, "position_ids", x, cos, sin, position_ids=torch.arange(4))
    raises(ValueError, "position_ids", x, cos, sin, position_ids=torch.tensor([0, 1, 2, 3, 8]))
    raises(ValueError, "position_ids", x, cos, sin, position_ids=torch.tensor([0, 1, -1, 3, 4]))
    raises(TypeError, "position_ids", x, cos, sin, position_ids=torch.arange(5.0))
    raises(TypeError, "interleaved", x, cos, sin, interleaved=1)
    raises(ValueError, "backend", x, cos, sin, backend="nope")
    raises(RuntimeError, "cuda", x, cos, sin, backend="cuda")


def test_opcheck_apply_rotary():
    x = torch.randn(2, 5, 2, 16, requires_grad=True)
    cos, sin = _tables(7, 12)
    cos.requires_grad_()
    pid = torch.randint(0, 7, (2, 5))
    torch.library.opcheck(torch.ops.posattn.apply_rotary.default, (x, cos, sin, pid, False, False, "torch"))
    torch.library.opcheck(torch.ops.posattn.apply_rotary.default, (x, cos, sin, None, True, True, "torch"))


# ---- backend "cuda": explicit only ---------------------------------------------------------------

def test_cuda_backend_on_cpu_tensors_raises():
    x = torch.randn(2, 5, 2, 16)
    cos, sin = _tables(5, 16)
    before = x.clone()
    for inplace in (False, True):
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            posattn.apply_rotary(x, cos, sin, inplace=inplace, backend="cuda")
    assert torch.equal(x, before)


def test_auto_never_offers_cuda(monkeypatch):
    """Policy: "cuda" is registered (last) but not a candidate of backend="auto" (not yet run on a GPU)."""
    from posattn import _backends, ops_registry
    assert ops_registry.OPS["apply_rotary"][1][-1] == "cuda"
    seen = {}
    real = _backends.resolve

    def spy(backend, device, *, supported, op):
        seen[backend] = tuple(supported)
        return real(backend, device, supported=supported, op=op)

    monkeypatch.setattr(_backends, "resolve", spy)
    x = torch.randn(1, 3, 1, 8)
    cos, sin = _tables(3, 8)
    posattn.apply_rotary(x, cos, sin)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        posattn.apply_rotary(x, cos, sin, backend="cuda")
    assert "cuda" not in seen["auto"] and "cuda" in seen["cuda"]


@pytest.mark.gpu
def test_gpu_auto_does_not_use_cuda_kernel(monkeypatch, device):
    """On a GPU, even without Triton, backend="auto" must not call the CUDA C++ kernel."""
    from posattn import _backends, _cuda

    def boom(*a, **k):
        raise AssertionError("backend='auto' called the CUDA C++ rotary kernel")

    monkeypatch.setattr(_cuda, "apply_rotary_cuda", boom)
    monkeypatch.setattr(_backends, "triton_available", lambda dev: False)
    x = torch.randn(2, 4, 2, 16, device=device)
    cos, sin = _tables(4, 16, device=device)
    assert_close(posattn.apply_rotary(x, cos, sin), _ref(x, cos, sin, False), torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_inplace_non_unit_last_stride(backend, device):
    """In place on a view whose last stride is 2 (the CUDA kernel needs unit stride: computed aside, copied back)."""
    base = torch.randn(2, 6, 3, 32, device=device)
    x = base[..., ::2]
    cos, sin = _tables(6, 12, device=device)
    want = _ref(x, cos, sin, True)
    odd = base[..., 1::2].clone()
    out = posattn.apply_rotary(x, cos, sin, interleaved=True, inplace=True, backend=backend)
    assert out is x
    assert_close(x, want, torch.float32)
    assert torch.equal(base[..., 1::2], odd), "elements between the view's columns were written"


@pytest.mark.gpu
def test_gpu_cuda_rejects_float64(device):
    x = torch.randn(1, 3, 1, 8, device=device, dtype=torch.float64)
    cos, sin = _tables(3, 8, device=device)
    with pytest.raises(TypeError, match="x"):
        posattn.apply_rotary(x, cos, sin, backend="cuda")
