"""Property-based fuzzing of posattn.kernelized_rpe_attention (torch backend, Triton interpreter) against
reference.kernelized_rpe_direct (the O(N S) formula, float64, same feature map and projection): feature maps
"prf" (explicit projection, or drawn from a generator), "relu", "elu+1" and a callable; normalize_qk,
softmax_scale, causal, GQA/MQA, seqlen_q != seqlen_k (1 included), head_dim_v != head_dim, chunk_size, fft_dtype
float32/float64, input dtypes fp16/bf16/fp32/fp64, layouts (permuted, storage offset, NaN-gapped strides), value
regimes and bias ranges; forward and gradients of q, k, v, rpe_bias and the projection.

What the op promises, and so what is checked: the FFT evaluates the formula exactly up to FFT round-off, which
is relative to the largest term of the sequence (docstring, "Warns"). Keys no query sees (causal, past the last
query) hold NaN/inf and must not change anything (their gradient is exactly 0). The tolerance is the table's for
the input dtype plus twice the op's documented round-off model (err_ie ~ eps |u|_2 (sum_f phi(q)_if |phi(k)_f v_e|_2 +
|out_ie| sum_f phi(q)_if |phi(k)_f|_2) / den_i, evaluated here in float64 from the reference's own features);
gradients get the table's gradient tolerance widened by the same relative round-off. When the op warns
(RuntimeWarning: denominators clamped or round-off above 1e-2 rms(v)) it only promises finite values: that is
what is checked then. Inputs are bit-identical afterwards.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import math
import warnings

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from fuzz_helpers import (grad_output, LAYOUTS, SEEDS, VALUE_KINDS, assert_unchanged, grad_floor, grads, heads,
                          poisoned_allocations, snapshot, values, with_layout)
from hypothesis_profiles import examples
from tolerances import BWD, FWD

IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _phi_ref(fmap, W, scale, lin):
    if fmap == "prf":
        return lambda x: R.prf_features(x, W, scale)
    if fmap == "relu":
        return R.relu_features
    if fmap == "elu+1":
        return R.elu1_features
    return lambda x: torch.exp(x.to(torch.float64) @ lin)


def _phi_dt(fmap, W, scale, lin, dt):
    """The feature maps of _phi_ref evaluated in ``dt`` (the second oracle's precision)."""
    if fmap == "prf":
        def f(x):
            xs = x * math.sqrt(scale)
            return torch.exp(xs @ W.to(dt).transpose(-1, -2) - 0.5 * (xs * xs).sum(-1, keepdim=True)) / \
                math.sqrt(W.shape[0])
        return f
    if fmap == "relu":
        return lambda x: torch.relu(x) + 1e-3
    if fmap == "elu+1":
        return lambda x: torch.nn.functional.elu(x) + 1.0
    return lambda x: torch.exp(x @ lin.to(dt))


def _direct(q, k, v, b, phi, causal, dt, parts=False):
    """reference.kernelized_rpe_direct's formula in ``dt`` (it upcasts to float64 itself); ``parts``: (num, den)."""
    H, n, s = q.shape[1], q.shape[2], k.shape[2]
    fq, fk, vv = phi(q), R._expand_kv(phi(k), H), R._expand_kv(v, H)
    i = torch.arange(n)[:, None]
    j = torch.arange(s)[None, :]
    c = torch.exp(b[:, j - i + n - 1])
    if causal:
        c = c.masked_fill(j > i, 0.0)
    w = (fq @ fk.transpose(-1, -2)) * c
    if parts:
        return w @ vv, w.sum(-1, keepdim=True)
    return (w @ vv) / w.sum(-1, keepdim=True)


def _roundoff(fq, fk, vv, c, out, den, eps):
    """The op's documented FFT round-off model, float64: absolute error per output element (B, H, N, Dv)."""
    u2 = c.norm(dim=-1)[None, :, None, None]                              # (1, H, 1, 1)
    sq = fk.square().transpose(-1, -2)                                    # (B, H, m, S)
    nkv = (sq @ vv.square()).sqrt()                                       # (B, H, m, Dv)
    nk = sq.sum(-1).sqrt()                                                # (B, H, m)
    a = fq @ nkv                                                          # (B, H, N, Dv)
    b = (fq * nk[:, :, None, :]).sum(-1, keepdim=True)                    # (B, H, N, 1)
    return eps * u2 * (a + out.abs() * b) / den


def _kra_case(data, backend):
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(IN_DTYPES), label="dtype")
    B = draw(st.integers(1, 2), label="batch")
    H, Hk = draw(heads(4), label="heads")
    N = draw(st.sampled_from([1, 2, 5, 16, 17]) if triton else st.one_of(st.sampled_from([1, 2, 16, 33]),
                                                                           st.integers(1, 40)), label="seqlen_q")
    S = draw(st.sampled_from([1, 2, 5, 16, 17]) if triton else st.one_of(st.sampled_from([1, 2, 16, 33]),
                                                                           st.integers(1, 40)), label="seqlen_k")
    D = draw(st.sampled_from([1, 3, 8, 16]), label="head_dim")
    Dv = draw(st.sampled_from([1, 5, 8, D]), label="head_dim_v")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    fmap = draw(st.sampled_from(["prf", "prf", "relu", "elu+1", "callable"]), label="feature_map")
    causal = draw(st.booleans(), label="causal")
    normalize = draw(st.booleans(), label="normalize_qk")
    bias_std = draw(st.sampled_from([0.0, 0.3, 1.0, 3.0]), label="bias_std")
    bias_dtype = draw(st.sampled_from([torch.float32, torch.float64]), label="bias_dtype")
    fft = draw(st.sampled_from([None, torch.float32, torch.float64]), label="fft_dtype")
    chunk = draw(st.sampled_from([None, None, 1, 2, 5]), label="chunk_size")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    want_grad = draw(st.booleans(), label="gradients")

    q0 = values((B, H, N, D), dtype, kind, gen)
    k0 = values((B, Hk, S, D), dtype, kind, gen)
    if normalize and want_grad:
        # x / max(|x|, 1e-12) has a derivative of 1e12 at an exact zero token ("ties" draws them): both the op and
        # the reference then return amplified round-off, nothing to compare; such tokens get a nonzero value
        for t in (q0, k0):
            t[t.norm(dim=-1) == 0] = 0.5
    v0 = values((B, Hk, S, Dv), dtype, "unit" if kind == "tiny" else kind, gen)
    bias = (bias_std * torch.randn(H, N + S - 1, generator=gen, dtype=torch.float64)).to(bias_dtype)
    cdt = fft if fft is not None else (torch.float64 if dtype == torch.float64 else torch.float32)

    kw = dict(feature_map=fmap, causal=causal, normalize_qk=normalize, chunk_size=chunk, fft_dtype=fft,
              backend=backend)
    W = lin = None
    scale = None
    if fmap == "prf":
        m = draw(st.integers(1, 12), label="num_features")
        scale = draw(st.sampled_from([None, 0.2, 1.0]), label="softmax_scale")
        kw["softmax_scale"] = scale
        if draw(st.booleans(), label="projection_from_generator"):
            pseed = draw(SEEDS, label="projection_seed")
            kw.update(num_features=m, generator=torch.Generator().manual_seed(pseed))
            W = posattn.draw_projection(m, D, generator=torch.Generator().manual_seed(pseed), dtype=cdt)
        else:
            W = posattn.draw_projection(m, D, orthogonal=draw(st.booleans()), generator=gen,
                                        dtype=draw(st.sampled_from([torch.float32, torch.float64])))
            W.requires_grad_(want_grad)
            kw["projection"] = W
        scale_eff = scale if scale is not None else (1.0 if normalize else D ** -0.5)
    else:
        scale_eff = None
        if fmap == "callable":
            lin = torch.randn(D, draw(st.integers(1, 6)), generator=gen, dtype=torch.float64) / 4
            kw["feature_map"] = lambda x: torch.exp(x.to(torch.float64) @ lin)

    # keys no query sees (causal, past the last query) hold NaN/inf: never read into a result or a gradient
    kp, vp = k0.clone(), v0.clone()
    if causal and S > N:
        fill = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="hidden_fill")
        kp[:, :, N:], vp[:, :, N:] = fill, -fill
    q, k, v = (with_layout(t, layout).requires_grad_(want_grad) for t in (q0, kp, vp))
    bias.requires_grad_(want_grad)

    # float64 reference on the same (rounded) values, same projection
    q64, k64, v64 = (t.detach().clone().double().requires_grad_(True) for t in (q0, k0, v0))
    b64 = bias.detach().clone().double().requires_grad_(True)
    W64 = None if W is None else W.detach().clone().double().requires_grad_(True)
    xq, xk = (torch.nn.functional.normalize(q64, dim=-1), torch.nn.functional.normalize(k64, dim=-1)) \
        if normalize else (q64, k64)
    phi = _phi_ref(fmap, W64, scale_eff, lin)
    ref = R.kernelized_rpe_direct(xq, xk, v64, b64, phi, causal)

    snap = snapshot(q=q, k=k, v=v, bias=bias, W=W)
    with poisoned_allocations(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = posattn.kernelized_rpe_attention(q, k, v, bias, **kw)
        warned = [w for w in caught if issubclass(w.category, RuntimeWarning) and "kernelized_rpe" in str(w.message)]
        assert out.dtype == dtype and out.shape == (B, H, N, Dv) and out.is_contiguous()
        assert torch.isfinite(out).all(), "non-finite output"
        leaves = [t for t in (q, k, v, bias, W) if t is not None and t.requires_grad] if want_grad else []
        if leaves:
            assert out.requires_grad
            dout = grad_output(data, out.shape, dtype, gen)
            got = grads(out, leaves, dout)
            for g in got:
                assert torch.isfinite(g).all(), "non-finite gradient"
            if causal and S > N:
                for t, g in zip(leaves, got):
                    if t is k or t is v:
                        assert not g[:, :, N:].any(), "keys no query sees got a gradient"
    assert_unchanged(snap, q=q, k=k, v=v, bias=bias, W=W)
    if warned:
        event("op warned (round-off / clamped denominators): finiteness checked only")
        return
    event(f"fft {str(cdt)[6:]}")

    # tolerance: the table plus the documented FFT round-off model
    with torch.no_grad():
        fq, fk = phi(xq.detach()), R._expand_kv(phi(xk.detach()), H)
        vv = R._expand_kv(v64.detach(), H)
        c = R.rpe_coefficients(b64.detach(), N, S, causal)                  # (H, N, S)
        cvec = torch.exp(b64.detach())
        if causal:
            cvec = cvec[:, :N]
        den = ((fq @ fk.transpose(-1, -2)) * c).sum(-1, keepdim=True)
        noise = _roundoff(fq, fk, vv, cvec, ref.detach(), den, torch.finfo(cdt).eps)
    order = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
    coarser = lambda *ds: max(ds, key=lambda t: order[t])  # noqa: E731
    tol_dtype = coarser(dtype, cdt)       # float64 inputs with fft_dtype=float32 are computed in float32
    a, e = out.detach().double(), ref.detach()
    atol, rtol, l2 = FWD[tol_dtype]
    mscale = max(1.0, e.abs().max().item())
    bad = (a - e).abs() > atol * mscale + rtol * e.abs() + 2 * noise
    assert not bad.any(), (f"out: {int(bad.sum())} of {e.numel()} elements off; worst {(a - e).abs().max().item():.3e}, "
                           f"round-off model max {noise.max().item():.3e} ({dtype}, fft {cdt})")
    err = (a - e).norm().item()
    assert err <= l2 * max(e.norm().item(), 1e-300) + 2 * noise.norm().item(), \
        f"out: relative L2 error {err / max(e.norm().item(), 1e-300):.3e} > {l2:.1e} + round-off model"
    if not leaves:
        return
    names = [n for n, t in (("dq", q), ("dk", k), ("dv", v), ("d_leaf_bias", bias), ("d_leaf_proj", W))
             if t is not None and t.requires_grad]
    ref_in = {"dq": q64, "dk": k64, "dv": v64, "d_leaf_bias": b64, "d_leaf_proj": W64}
    want = grads(ref, [ref_in[n] for n in names], dout.double())
    # second oracle (STYLE.md): autograd through the same formula evaluated directly in the FFT precision, on the
    # same rounded inputs. Gradients of a ratio cancel (one key: dq = dk = 0 exactly, from terms of size
    # |dout| |v| |phi'| / |phi|, ~1e3 for relu features of tiny values), so their round-off is set by the
    # terms, not by the result; the same formula in the same precision shows that size.
    lv = [t.detach().clone().to(cdt).requires_grad_(True) for t in (q64, k64, v64, b64)]
    Wd = None if W64 is None else W64.detach().clone().to(cdt).requires_grad_(True)
    xq_, xk_ = (torch.nn.functional.normalize(lv[0], dim=-1), torch.nn.functional.normalize(lv[1], dim=-1)) \
        if normalize else (lv[0], lv[1])
    phi_d = _phi_dt(fmap, Wd if Wd is not None else None, scale_eff, lin, cdt)
    o_d = _direct(xq_, xk_, lv[2], lv[3], phi_d, causal, cdt)
    ins_d = {"dq": lv[0], "dk": lv[1], "dv": lv[2], "d_leaf_bias": lv[3], "d_leaf_proj": Wd}
    torch_g = torch.autograd.grad(o_d, [ins_d[n] for n in names], dout.to(cdt), allow_unused=True,
                                  retain_graph=True)
    # ... and through reference.kernelized_rpe_fft in the same precision (plain torch.fft, Algorithm 1 unchunked):
    # FFT round-off is relative to the largest term of the sequence, which the direct sum does not have
    o_f = R.kernelized_rpe_fft(xq_, xk_, lv[2], lv[3], phi_d, causal, dtype=cdt)
    fft_g = torch.autograd.grad(o_f, [ins_d[n] for n in names], dout.to(cdt), allow_unused=True)
    torch_g = [[torch.zeros_like(ins_d[n]) if x is None else x for x in (a, b_)]
               for n, a, b_ in zip(names, torch_g, fft_g)]
    # size of the terms that cancel: out = num / den, so d out = d num / den - out d den / den; the two parts'
    # gradients (float64, |.| elementwise) bound what any evaluation order can leave of round-off
    lt = [t.detach().clone().requires_grad_(True) for t in (q64, k64, v64, b64)]
    Wt = None if W64 is None else W64.detach().clone().requires_grad_(True)
    xq_, xk_ = (torch.nn.functional.normalize(lt[0], dim=-1), torch.nn.functional.normalize(lt[1], dim=-1)) \
        if normalize else (lt[0], lt[1])
    num_t, den_t = _direct(xq_, xk_, lt[2], lt[3], _phi_ref(fmap, Wt, scale_eff, lin), causal, torch.float64,
                           parts=True)
    g64 = dout.double()
    l1 = (g64 * num_t / den_t.detach()).sum()
    l2_ = ((g64 * ref.detach()).sum(-1, keepdim=True) * den_t / den_t.detach()).sum()
    ins_t = {"dq": lt[0], "dk": lt[1], "dv": lt[2], "d_leaf_bias": lt[3], "d_leaf_proj": Wt}
    wrt_t = [ins_t[n] for n in names] + ([xq_, xk_] if normalize else [])
    p1 = torch.autograd.grad(l1, wrt_t, retain_graph=True, allow_unused=True)
    p2 = torch.autograd.grad(l2_, wrt_t, allow_unused=True)
    p1, p2 = ([torch.zeros_like(t) if x is None else x for t, x in zip(wrt_t, p)] for p in (p1, p2))
    if normalize:
        # x / |x| has Jacobian (I - x^ x^T) / |x|: its own cancellation is of size |d x^| / |x| (large for tiny x)
        for name, src, j in (("dq", lt[0], -2), ("dk", lt[1], -1)):
            if name in names:
                i = names.index(name)
                extra = (p1[j].abs() + p2[j].abs()).norm(dim=-1, keepdim=True) / src.detach().norm(dim=-1, keepdim=True)
                p1[i] = p1[i].abs() + extra.expand_as(p1[i])
        p1, p2 = p1[:len(names)], p2[:len(names)]
    # the FFT's own round-off (the forward's model, relative to rms(v)) widens the FFT-precision tolerance
    rel_noise = noise.max().item() / max(v64.detach().square().mean().sqrt().item(), 1e-300)
    cond = max(1.0, 8 * rel_noise / BWD[cdt][2])
    for g, w, tg, n, f, t1, t2 in zip(got, want, torch_g, names, grad_floor(want, names), p1, p2):
        terms = t1.detach().abs() + t2.detach().abs()
        # a parameter's gradient is returned in the parameter's dtype (an fp32 bias with float64 inputs is rounded
        # to fp32), and computed from the input dtype's q, k, v: the coarser of the two rules
        gdt = coarser(tol_dtype, {"d_leaf_bias": bias.dtype, "d_leaf_proj": W.dtype if W is not None else dtype}
                      .get(n, dtype))
        theirs = torch.maximum((tg[0].detach().double() - w).abs(), (tg[1].detach().double() - w).abs())
        if not torch.isfinite(theirs).all():
            event("second oracle overflowed: gradient finiteness checked only")
            continue
        a, e = g.detach().double(), w.detach()
        atol, rtol, l2 = BWD[gdt]
        if n.startswith("d_leaf"):
            wid = max(1.0, math.sqrt(B * H * N * S) / 16)
            atol, rtol, l2 = atol * wid, rtol * wid, l2 * wid
        m = max(1.0, e.abs().max().item(), f / math.sqrt(max(e.numel(), 1)))
        bound = atol * m + rtol * cond * (e.abs() + terms) + 8 * theirs.max().item()
        bad = (a - e).abs() > bound
        assert not bad.any(), (f"{n}: {int(bad.sum())} of {e.numel()} elements off; worst {(a - e).abs().max().item():.3e}"
                               f", {str(cdt)[6:]} direct / torch.fft autograd's worst {theirs.max().item():.3e} ({dtype})")
        err = (a - e).norm().item()
        assert err <= l2 * cond * max(e.norm().item() + terms.norm().item(), f) + 8 * theirs.norm().item() \
            or err == 0.0, \
            f"{n}: L2 error {err:.3e}, |ref| {e.norm().item():.3e}, direct autograd's {theirs.norm().item():.3e}"


@given(data=st.data())
@examples(30)
def test_fuzz_kernelized_rpe_torch(data):
    _kra_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(8)
def test_fuzz_kernelized_rpe_triton(data):
    _kra_case(data, "triton")
