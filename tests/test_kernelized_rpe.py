"""Kernelized attention with RPE via FFT (Luo et al., arXiv 2106.12566; ALGORITHMS.md 3).

Oracles: reference.kernelized_rpe_direct (O(N S), float64) for the FFT formula, reference.exact_rpe_attention
for the PRF approximation, an independent plain linear-attention formula for rpe_bias = 0, torch.autograd on
the float64 direct reference (and gradcheck) for gradients.
"""
import math
import warnings

import pytest
import torch

import posattn
from posattn import reference as R
from posattn.ops.kernelized_rpe import _next_fast_len, draw_projection, kernelized_rpe_attention as kra
from tolerances import FWD, assert_close, assert_within_torch_error, poison_like, rel_l2

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(batch, heads, heads_k, n, s, d, dv, dtype=torch.float64, bias_std=0.5, requires_grad=False):
    q = torch.randn(batch, heads, n, d, dtype=dtype)
    k = torch.randn(batch, heads_k, s, d, dtype=dtype)
    v = torch.randn(batch, heads_k, s, dv, dtype=dtype)
    b = bias_std * torch.randn(heads, n + s - 1, dtype=torch.float64)
    if requires_grad:
        for t in (q, k, v, b):
            t.requires_grad_()
    return q, k, v, b


def _ref_map(name, projection=None, scale=None):
    if name == "prf":
        return lambda x: R.prf_features(x, projection, scale)
    return {"relu": R.relu_features, "elu+1": R.elu1_features}[name]


def _kw(name, projection):
    return dict(feature_map=name, projection=projection) if name == "prf" else dict(feature_map=name)


# ---------------------------------------------------------------------------------------------- FFT == direct


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [1, 2, 17, 100, 1000])
def test_reference_fft_equals_direct_float64(seq, causal):
    q, k, v, b = _inputs(1, 2, 2, seq, seq, 8, 8)
    w = draw_projection(8, 8, dtype=torch.float64)
    fm = _ref_map("prf", w, 8 ** -0.5)
    direct = R.kernelized_rpe_direct(q, k, v, b, fm, causal)
    fft = R.kernelized_rpe_fft(q, k, v, b, fm, causal)
    assert (fft - direct).abs().max().item() <= 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [1, 2, 17, 100, 1000])
@pytest.mark.parametrize("fmap", ["prf", "elu+1"])
def test_op_equals_direct_float64(seq, causal, fmap):
    """The op (torch backend, several feature chunks) vs the O(N^2) formula, float64, 1e-10."""
    q, k, v, b = _inputs(1, 2, 1, seq, seq, 8, 8)
    w = draw_projection(8, 8, dtype=torch.float64)
    out = kra(q, k, v, b, causal=causal, chunk_size=3, backend="torch", **_kw(fmap, w))
    ref = R.kernelized_rpe_direct(q, k, v, b, _ref_map(fmap, w, 8 ** -0.5), causal)
    assert out.dtype == torch.float64 and out.is_contiguous()
    assert (out - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("n,s", [(1, 7), (7, 1), (13, 40), (40, 13)])
@pytest.mark.parametrize("causal", [False, True])
def test_op_seqlen_q_ne_seqlen_k(n, s, causal):
    q, k, v, b = _inputs(2, 4, 2, n, s, 8, 5)
    out = kra(q, k, v, b, feature_map="relu", causal=causal, backend="torch")
    ref = R.kernelized_rpe_direct(q, k, v, b, R.relu_features, causal)
    assert_close(out, ref, torch.float64)


@pytest.mark.interp
@pytest.mark.parametrize("fmap", ["prf", "relu", "elu+1", "callable"])
@pytest.mark.parametrize("n,s,causal", [(1, 1, False), (17, 17, True), (33, 20, False), (20, 33, True)])
def test_triton_backend_equals_direct(n, s, causal, fmap):
    """Triton FFT-input kernel (interpreter on CPU) feeding torch.fft, float64, GQA, odd lengths."""
    q, k, v, b = _inputs(2, 4, 2, n, s, 12, 6)
    w = draw_projection(10, 12, dtype=torch.float64)
    if fmap == "callable":
        lin = torch.randn(12, 5, dtype=torch.float64) / 4
        fn = lambda x: torch.exp(x @ lin)  # noqa: E731
        out = kra(q, k, v, b, feature_map=fn, causal=causal, backend="triton", chunk_size=2)
        ref_map = fn
    else:
        out = kra(q, k, v, b, causal=causal, backend="triton", chunk_size=3, **_kw(fmap, w))
        ref_map = _ref_map(fmap, w, 12 ** -0.5)
    ref = R.kernelized_rpe_direct(q, k, v, b, ref_map, causal)
    assert_close(out, ref, torch.float64)


# ---------------------------------------------------------------------------------------------- dtypes, layouts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interp)])
def test_dtypes_against_reference(dtype, backend):
    """fp16/bf16/fp32 in, same dtype out; FFT in fp32. Reference on the same (rounded) inputs in float64.

    fp16/bf16: the table (output rounding dominates). fp32: FFT round-off is relative to the largest term of
    the whole sequence, so early causal rows (few keys) carry ~1e-5 relative error, above the table's
    elementwise 2e-5 but inherent to any fp32 FFT: the table's relative L2 bound plus STYLE.md's second oracle,
    error <= 3 x that of plain torch.fft in fp32 on the same formula (reference.kernelized_rpe_fft).
    """
    q, k, v, b = _inputs(2, 4, 2, 37, 37, 16, 16, dtype=dtype)
    b = b.to(torch.float32)
    w = draw_projection(16, 16)
    out = kra(q, k, v, b, projection=w, causal=True, backend=backend)
    assert out.dtype == dtype
    fm = _ref_map("prf", w, 16 ** -0.5)
    ref = R.kernelized_rpe_direct(q, k, v, b, fm, True)
    if dtype == torch.float32:
        assert torch.isfinite(out).all()
        assert rel_l2(out, ref) <= FWD[torch.float32][2]
        assert_within_torch_error(out, R.kernelized_rpe_fft(q, k, v, b, fm, True, dtype=torch.float32), ref,
                                  factor=3.0)
    else:
        assert_close(out, ref, dtype)


def test_noncontiguous_inputs_and_inputs_untouched():
    """(batch, seq, heads, dim) storage viewed as (batch, heads, seq, dim); inputs are not modified."""
    qs, ks, vs = (torch.randn(2, 19, 3, 8) for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (qs, ks, vs))
    b = torch.randn(3, 37)
    saved = [t.clone() for t in (qs, ks, vs, b)]
    out = kra(q, k, v, b, feature_map="elu+1")
    ref = R.kernelized_rpe_direct(q, k, v, b, R.elu1_features, False)
    assert_close(out, ref, torch.float32)
    for t, s in zip((qs, ks, vs, b), saved):
        assert torch.equal(t, s)


# ---------------------------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("causal", [False, True])
def test_zero_bias_is_plain_linear_attention(causal):
    """b = 0: c = 1, so the op is Performer/Katharopoulos linear attention (independent formula here)."""
    q, k, v, _ = _inputs(2, 2, 2, 23, 23, 8, 6)
    b = torch.zeros(2, 45, dtype=torch.float64)
    w = draw_projection(12, 8, dtype=torch.float64)
    out = kra(q, k, v, b, projection=w, causal=causal)
    fq, fk = R.prf_features(q, w, 8 ** -0.5), R.prf_features(k, w, 8 ** -0.5)
    kv = fk[..., :, None] * v[..., None, :]                     # (B, H, S, m, dv)
    if causal:
        kv, ks = kv.cumsum(2), fk.cumsum(2)
        num = torch.einsum("bhnf,bhnfe->bhne", fq, kv)
        den = (fq * ks).sum(-1, keepdim=True)
    else:
        num = torch.einsum("bhnf,bhfe->bhne", fq, kv.sum(2))
        den = fq @ fk.sum(2)[..., None]
    assert_close(out, num / den, torch.float64)


def test_prf_approaches_exact_softmax_with_bias():
    """Error vs exact softmax(q k^T / sqrt(d) + b) v falls roughly as m^-1/2 (i.i.d. features, 6 seeds)."""
    q, k, v, b = _inputs(1, 1, 1, 24, 24, 8, 4)
    q, k = 0.6 * q, 0.6 * k
    exact = R.exact_rpe_attention(q, k, v, b)
    ms = [16, 64, 256, 1024]
    errs = []
    for m in ms:
        e = []
        for seed in range(6):
            w = draw_projection(m, 8, orthogonal=False, generator=torch.Generator().manual_seed(seed),
                                dtype=torch.float64)
            e.append(rel_l2(kra(q, k, v, b, projection=w), exact))
        errs.append(sum(e) / len(e))
    slope = (math.log(errs[-1]) - math.log(errs[0])) / (math.log(ms[-1]) - math.log(ms[0]))
    assert all(a > c for a, c in zip(errs, errs[1:])), errs
    assert -0.8 <= slope <= -0.3, (slope, errs)
    # orthogonal features (the default) are no worse at the largest m
    e_orf = sum(rel_l2(kra(q, k, v, b, num_features=1024, generator=torch.Generator().manual_seed(s)), exact)
                for s in range(6)) / 6
    assert e_orf <= 1.5 * errs[-1]


def test_normalize_qk_matches_reference_on_unit_vectors():
    q, k, v, b = _inputs(1, 2, 2, 15, 15, 8, 8, bias_std=2.0)
    w = draw_projection(32, 8, dtype=torch.float64)
    out = kra(q, k, v, b, projection=w, normalize_qk=True, causal=True)
    qn, kn = (torch.nn.functional.normalize(t, dim=-1) for t in (q, k))
    ref = R.kernelized_rpe_direct(qn, kn, v, b, _ref_map("prf", w, 1.0), True)
    assert_close(out, ref, torch.float64)


def test_projection_from_generator_is_reproducible():
    q, k, v, b = _inputs(1, 2, 2, 9, 9, 8, 8)
    o1 = kra(q, k, v, b, num_features=7, generator=torch.Generator().manual_seed(3))
    o2 = kra(q, k, v, b, num_features=7, generator=torch.Generator().manual_seed(3))
    o3 = kra(q, k, v, b, num_features=7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(o1, o2) and not torch.allclose(o1, o3)


def test_wide_bias_range_warns_and_stays_finite():
    """Causal row 0 sees only distance 0; a far smaller b_0 than max b puts its denominator below fp32 FFT
    round-off: clamped, finite, and a RuntimeWarning (never silent); float64 FFT resolves it."""
    q, k, v, b = _inputs(1, 1, 1, 64, 64, 8, 8, dtype=torch.float32)
    b = b.float()
    b[0, :63] = 14.0     # distances -63..-1 large
    b[0, 63] = 0.0       # distance 0 tiny in comparison (exp(-14) ~ 8e-7: below fp32 round-off, not fp64's)
    with pytest.warns(RuntimeWarning, match="round-off floor"):
        out = kra(q, k, v, b, feature_map="elu+1", causal=True)
    assert torch.isfinite(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out64 = kra(q, k, v, b, feature_map="elu+1", causal=True, fft_dtype=torch.float64)
    ref = R.kernelized_rpe_direct(q, k, v, b, R.elu1_features, True)
    assert_close(out64, ref, torch.float32)


def test_next_fast_len():
    for n in [1, 2, 3, 7, 11, 97, 1025, 131071]:
        L = _next_fast_len(n)
        r = L
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert L >= n and r == 1 and all(_next_fast_len(x) != x or x == L for x in range(n, L))


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fmap,causal,heads_k,n,s", [("prf", False, 2, 1, 1), ("prf", True, 1, 4, 4),
                                                      ("elu+1", False, 2, 3, 5), ("relu", True, 2, 5, 3)])
def test_gradcheck_float64(fmap, causal, heads_k, n, s):
    """Full finite-difference Jacobians (slow mode: fast mode's scaled atol let a 1% dq error through)."""
    q, k, v, b = _inputs(1, 2, heads_k, n, s, 3, 2, bias_std=0.3, requires_grad=True)
    w = draw_projection(3, 3, dtype=torch.float64).requires_grad_()
    if fmap == "prf":
        fn = lambda q, k, v, b, w: kra(q, k, v, b, projection=w, causal=causal, chunk_size=2)  # noqa: E731
        args = (q, k, v, b, w)
    else:
        fn = lambda q, k, v, b: kra(q, k, v, b, feature_map=fmap, causal=causal, chunk_size=2)  # noqa: E731
        args = (q, k, v, b)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.interp
def test_gradcheck_float64_triton_callable_with_parameters():
    q, k, v, b = _inputs(1, 2, 1, 4, 4, 3, 2, bias_std=0.3, requires_grad=True)
    lin = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, b, lin: kra(q, k, v, b, feature_map=lambda x: torch.exp(x @ lin), causal=True,  # noqa
                                      backend="triton", chunk_size=2, normalize_qk=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, b, lin))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interp)])
def test_gradients_float64_against_reference(backend, causal):
    """Explicit FFT-adjoint backward vs autograd through the O(N^2) formula, float64, to 1e-9; GQA, S != N,
    several feature chunks, gradients of q, k, v, rpe_bias and the projection."""
    q, k, v, b = _inputs(2, 4, 2, 19, 26, 8, 5, requires_grad=True)
    w = draw_projection(7, 8, dtype=torch.float64).requires_grad_()
    out = kra(q, k, v, b, projection=w, causal=causal, chunk_size=3, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, b, w), dout)
    ref = R.kernelized_rpe_direct(q, k, v, b, _ref_map("prf", w, 8 ** -0.5), causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v, b, w), dout)
    for name, g, rg in zip(("dq", "dk", "dv", "drpe_bias", "dprojection"), grads, ref_grads):
        assert (g - rg).abs().max().item() <= 1e-9 * max(1.0, rg.abs().max().item()), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_against_reference(dtype):
    """fp16/bf16/fp32: gradients of q, k, v, rpe_bias vs float64 autograd through the direct formula
    (fp32: relative L2 from the table and <= 3 x the error of autograd through plain fp32 torch.fft)."""
    q, k, v, b = _inputs(1, 4, 2, 21, 21, 8, 8, dtype=dtype)
    b = b.float()
    w = draw_projection(16, 8)
    for t in (q, k, v, b):
        t.requires_grad_()
    dout = torch.randn(1, 4, 21, 8, dtype=dtype)
    out = kra(q, k, v, b, projection=w, causal=True)
    grads = torch.autograd.grad(out, (q, k, v, b), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, b)]
    ref = R.kernelized_rpe_direct(*leaves, _ref_map("prf", w, 8 ** -0.5), True)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    if dtype == torch.float32:
        leaves32 = [t.detach().requires_grad_() for t in (q, k, v, b)]
        torch_out = R.kernelized_rpe_fft(*leaves32, _ref_map("prf", w, 8 ** -0.5), True, dtype=torch.float32)
        torch_grads = torch.autograd.grad(torch_out, leaves32, dout)
    for i, (name, g, rg) in enumerate(zip(("dq", "dk", "dv", "drpe_bias"), grads, ref_grads)):
        assert g.dtype == (dtype if name != "drpe_bias" else torch.float32)
        if dtype == torch.float32:
            assert torch.isfinite(g).all()
            assert rel_l2(g, rg) <= 2 * FWD[torch.float32][2], name
            assert_within_torch_error(g, torch_grads[i], rg, factor=3.0, name=name)
        elif name == "drpe_bias":    # fp32 parameter; its error is set by the low-precision q, k, v
            assert rel_l2(g, rg) <= 2 * FWD[dtype][2], name
        else:
            assert_close(g, rg, dtype, grad=True, name=name)


def test_causal_bias_gradient_ignores_future_distances():
    q, k, v, b = _inputs(1, 2, 2, 8, 8, 4, 4, requires_grad=True)
    kra(q, k, v, b, feature_map="elu+1", causal=True).sum().backward()
    assert torch.equal(b.grad[:, 8:], torch.zeros_like(b.grad[:, 8:]))
    assert (b.grad[:, :8].abs() > 0).all()


# ---------------------------------------------------------------------------------------------- Triton kernel


@pytest.mark.interp
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_triton_fft_input_kernel_writes_every_element(mode):
    """Launcher vs the torch builder on a NaN-poisoned buffer: rows past seqlen (padding) must be written 0."""
    from posattn.ops.kernelized_rpe import _build_input
    from posattn.triton_kernels.kernelized_rpe import kernelized_rpe_fft_input
    names = {0: "precomputed", 1: "prf", 2: "relu", 3: "elu+1"}
    x = torch.randn(2, 3, 45, 7)
    if mode == 0:
        x = x.exp()
    v = torch.randn(2, 3, 45, 5)
    w = torch.randn(6, 7)
    shift = torch.randn(2, 3, 1).expand(2, 3, 45)
    row_scale = torch.randn(2, 3, 45) if mode == 0 else None
    f0, nc, fft_len = (1, 3, 100) if mode in (0, 2, 3) else (2, 4, 100)
    out = poison_like(torch.empty(2, 3, nc * 6, fft_len))
    kw = dict(projection=w, shift=shift) if mode == 1 else {}
    returned = kernelized_rpe_fft_input(x, v, out, feature_mode=mode, f0=f0, num_chunk=nc, row_scale=row_scale,
                                        x_scale=0.6, feat_scale=0.3, **kw)
    assert returned is None
    ref = _build_input("torch", x, v, fft_len, mode=names[mode], f0=f0, num_chunk=nc, row_scale=row_scale,
                       x_scale=0.6, feat_scale=0.3, cdt=torch.float32, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    q, k, v, b = _inputs(1, 2, 2, 5, 5, 4, 4, dtype=torch.float32)
    b = b.float()
    with pytest.raises(ValueError, match=r"rpe_bias: expected \(num_heads=2, seqlen_q \+ seqlen_k - 1=9\)"):
        kra(q, k, v, b[:, :5])
    with pytest.raises(ValueError, match=r"rpe_bias"):
        kra(q, k, v, b[:1])
    with pytest.raises(ValueError, match="num_features: expected >= 1, got 0"):
        kra(q, k, v, b, num_features=0)
    with pytest.raises(ValueError, match=r"feature_map: phi\(q\) must be finite and > 0"):
        kra(q, k, v, b, feature_map=lambda x: x)
    calls = []

    def positive_for_q_only(x):
        calls.append(1)
        return x.exp() if len(calls) == 1 else x.exp() * 0
    with pytest.raises(ValueError, match=r"feature_map: phi\(k\) must be finite and > 0"):
        kra(q, k, v, b, feature_map=positive_for_q_only)
    with pytest.raises(ValueError, match="must be finite"):
        kra(q, k, v, b, feature_map=lambda x: torch.full_like(x, float("nan")))
    with pytest.raises(TypeError, match="fft_dtype: half-precision FFTs are not supported"):
        kra(q, k, v, b, fft_dtype=torch.float16)
    with pytest.raises(TypeError, match="fft_dtype"):
        kra(q, k, v, b, fft_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="feature_map: expected one of"):
        kra(q, k, v, b, feature_map="softmax")
    with pytest.raises(TypeError, match="k: expected dtype float32"):
        kra(q, k.half(), v, b)
    with pytest.raises(ValueError, match="multiple of num_heads_k"):
        kra(q, torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4), b)
    with pytest.raises(ValueError, match=r"v: expected \(batch_size=1, num_heads_k=2, seqlen_k=5"):
        kra(q, k, v[:, :, :3], b)
    with pytest.raises(ValueError, match=r"projection: expected \(num_features=3, head_dim=4\)"):
        kra(q, k, v, b, projection=torch.randn(3, 5))
    with pytest.raises(ValueError, match="num_features: only used with feature_map='prf'"):
        kra(q, k, v, b, feature_map="relu", num_features=8)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        kra(q, k, v, b, causal=1)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        kra(q.numpy(), k, v, b)
    with pytest.raises(ValueError, match="backend"):
        kra(q, k, v, b, backend="cudnn")
    with pytest.raises(ValueError, match="num_features"):
        draw_projection(0, 4)


# ---------------------------------------------------------------------------------------------- nn module


def test_module_matches_functional_and_trains():
    torch.manual_seed(0)
    layer = posattn.nn.KernelizedRPEAttention(16, 4, max_seqlen=20, num_heads_k=2, causal=True, num_features=8)
    with torch.no_grad():
        layer.rpe_bias.normal_()
    x = torch.randn(2, 13, 16)
    y = layer(x)
    assert y.shape == x.shape
    # the same computation through the float64 reference, from the layer's own weights
    xd = x.double()
    q = (xd @ layer.q_proj.weight.double().T + layer.q_proj.bias.double()).view(2, 13, 4, 4).transpose(1, 2)
    k = (xd @ layer.k_proj.weight.double().T + layer.k_proj.bias.double()).view(2, 13, 2, 4).transpose(1, 2)
    v = (xd @ layer.v_proj.weight.double().T + layer.v_proj.bias.double()).view(2, 13, 2, 4).transpose(1, 2)
    bias = layer.rpe_bias.double()[:, 19 - 12: 19 + 13]
    o = R.kernelized_rpe_direct(q, k, v, bias, _ref_map("prf", layer.projection.double(), 0.5), True)
    ref = o.transpose(1, 2).reshape(2, 13, 16) @ layer.out_proj.weight.double().T + layer.out_proj.bias.double()
    assert_close(y, ref, torch.float32)
    y.square().sum().backward()
    assert layer.rpe_bias.grad is not None and layer.rpe_bias.grad[:, 19 - 12: 19 + 13].abs().sum() > 0
    assert torch.equal(layer.rpe_bias.grad[:, : 19 - 12], torch.zeros(4, 7))
    assert layer.q_proj.weight.grad.abs().sum() > 0


def test_module_redraw_policy():
    layer = posattn.nn.KernelizedRPEAttention(8, 2, max_seqlen=8, redraw_interval=2)
    x = torch.randn(1, 5, 8)
    p0 = layer.projection.clone()
    layer(x)
    layer(x)
    assert torch.equal(layer.projection, p0)        # calls 1, 2 use the first draw
    layer(x)
    assert not torch.equal(layer.projection, p0)    # call 3 redraws
    layer.eval()
    p1 = layer.projection.clone()
    for _ in range(4):
        layer(x)
    assert torch.equal(layer.projection, p1)        # never in eval mode
    fixed = posattn.nn.KernelizedRPEAttention(8, 2, max_seqlen=8, redraw_interval=None, feature_map="elu+1")
    assert fixed.projection is None and fixed(x).shape == x.shape
    with pytest.raises(ValueError, match="seqlen <= max_seqlen=8"):
        layer(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="num_heads: expected a divisor of embed_dim=8"):
        posattn.nn.KernelizedRPEAttention(8, 3, max_seqlen=8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_module_factory_dtype_device_for_every_parameter_and_buffer(dtype):
    # new-user report: KernelizedRPEAttention(dtype=torch.float64) still made rpe_bias and projection float32
    layer = posattn.nn.KernelizedRPEAttention(8, 2, max_seqlen=8, num_features=6, dtype=dtype, device="cpu")
    floats = {n: t.dtype for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
              if t.is_floating_point()}
    assert set(floats) >= {"rpe_bias", "projection", "q_proj.weight"} and set(floats.values()) == {dtype}, floats
    assert all(t.device.type == "cpu" for t in list(layer.parameters()) + list(layer.buffers()))
    layer.redraw_features()
    assert layer.projection.dtype == dtype
    x = torch.randn(1, 5, 8, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.rpe_bias.grad.dtype == dtype
    if dtype == torch.float64:   # float64 end to end: gradcheck through the whole layer
        layer.zero_grad()
        with torch.no_grad():
            layer.rpe_bias.normal_()
        layer.eval()                 # no feature redraw between gradcheck's calls
        f = lambda x, b: torch.func.functional_call(layer, {"rpe_bias": b}, (x,))  # noqa: E731
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),
                                            layer.rpe_bias.detach().clone().requires_grad_(True)))


def test_causal_prf_roundoff_warns_and_float64_fixes_it():
    """Early causal rows see only keys whose PRF features are tiny next to the sequence's largest one; fp32 FFT
    round-off (relative to that largest one) then reaches ~3e-3: a RuntimeWarning, and fft_dtype=float64 fixes it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2048, 32, generator=g) for _ in range(3))
    q, k = 1.5 * q, 1.5 * k      # wider PRF feature spread (measured: fp32 max error 1.7e-3, estimate 4.6e-2)
    r = torch.arange(-2047, 2048, dtype=torch.float32)
    b = -0.35 * torch.log1p(r.abs())[None, :]
    w = draw_projection(32, 32, generator=g)
    with pytest.warns(RuntimeWarning, match="round-off error of the output"):
        kra(q, k, v, b, projection=w, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = kra(q, k, v, b, projection=w, causal=True, fft_dtype=torch.float64)
        kra(q, k, v, b, projection=w, causal=False)      # non-causal: every row sees the large keys, no warning
    ref = R.kernelized_rpe_fft(q, k, v, b, _ref_map("prf", w, 32 ** -0.5), True)
    assert_close(out, ref, torch.float32)
