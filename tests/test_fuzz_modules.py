"""Property-based fuzzing of the nn modules (python/posattn/nn/) against the functional ops they wrap, on the torch
backend and the Triton interpreter: posattn.nn.KernelizedRPEAttention and posattn.nn.EcoFormerAttention forward
and backward equal, bit for bit, the documented computation written with the functional op (projections, head
split, the bias-table window of the module, the op, the output projection), for random widths, heads (GQA for the
kernelized layer), lengths (1 included), feature maps, causal, key_padding_mask, forms, dtypes; gradients of the
input and of every parameter. The EcoFormer layer is checked against the float64 reference of the op too (its
codes are exact, so the chain is well defined), and posattn.nn.KernelizedHash against its documented formula.
The op fuzz files cover the ops themselves; this file covers the wiring.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from fuzz_helpers import SEEDS, check_close, grad_output, grads, poisoned_allocations, values
from hypothesis_profiles import examples


def _same(a, b, name):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    # equal values (+0 and -0 alike: a slice's backward passes the op's -0.0, an index's adds it to +0)
    assert torch.equal(a, b), f"{name}: module and functional op differ (max {(a - b).abs().max()})"


def _krpe_module_case(data, backend):
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    heads_k = draw(st.integers(1, 2), label="num_heads_k")
    heads = heads_k * draw(st.sampled_from([1, 2]), label="group")
    head_dim = draw(st.sampled_from([1, 4, 8]), label="head_dim")
    E = heads * head_dim
    max_seqlen = draw(st.integers(1, 12 if triton else 40), label="max_seqlen")
    L = draw(st.integers(1, max_seqlen), label="seqlen")
    B = draw(st.integers(1, 2), label="batch")
    fmap = draw(st.sampled_from(["prf", "relu", "elu+1"]), label="feature_map")
    kw = dict(num_features=draw(st.integers(1, 8), label="num_features")) if fmap == "prf" else {}
    causal = draw(st.booleans(), label="causal")
    normalize = draw(st.booleans(), label="normalize_qk")
    bias = draw(st.booleans(), label="bias")
    layer = posattn.nn.KernelizedRPEAttention(E, heads, max_seqlen, num_heads_k=heads_k, feature_map=fmap,
                                              causal=causal, normalize_qk=normalize, bias=bias, backend=backend,
                                              redraw_interval=None, dtype=dtype, **kw)
    with torch.no_grad():
        layer.rpe_bias.normal_(0.0, draw(st.sampled_from([0.1, 1.0]), label="bias_std"), generator=gen)
    layer.train(draw(st.booleans(), label="train"))
    x = values((B, L, E), dtype, draw(st.sampled_from(["unit", "tiny", "ties"]), label="values"), gen)
    x.requires_grad_(True)
    params = [p for p in layer.parameters()]

    with poisoned_allocations():
        y = layer(x)
        # the documented computation with the functional op
        q = F.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(B, L, heads, head_dim).transpose(1, 2)
        k = F.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(B, L, heads_k, head_dim).transpose(1, 2)
        v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, L, heads_k, head_dim).transpose(1, 2)
        # rpe_bias entry max_seqlen - 1 + (j - i); the op's entry r = j - i + L - 1
        r = torch.arange(2 * L - 1)
        table = layer.rpe_bias[:, max_seqlen - 1 + r - (L - 1)]
        extra = dict(projection=layer.projection) if fmap == "prf" else {}
        o = posattn.kernelized_rpe_attention(q, k, v, table, feature_map=fmap, causal=causal, normalize_qk=normalize,
                                             backend=backend, **extra)
        yf = F.linear(o.transpose(1, 2).reshape(B, L, E), layer.out_proj.weight, layer.out_proj.bias)
        assert y.shape == (B, L, E) and y.dtype == dtype
        _same(y, yf, "forward")
        dy = grad_output(data, y.shape, dtype, gen)
        g1 = grads(y, [x] + params, dy)
        g2 = grads(yf, [x] + params, dy)
    names = ["dx"] + [n for n, _ in layer.named_parameters()]
    for a, b, n in zip(g1, g2, names):
        _same(a, b, n)
    # rpe_bias rows outside the window the sequence uses get no gradient
    grad_b = g1[1 + [n for n, _ in layer.named_parameters()].index("rpe_bias")]
    outside = torch.ones(2 * max_seqlen - 1, dtype=torch.bool)
    outside[max_seqlen - 1 - (L - 1): max_seqlen + L - 1] = False
    assert not grad_b[:, outside].any(), "rpe_bias entries beyond the sequence got a gradient"


def _eco_module_case(data, backend):
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = draw(st.integers(1, 3), label="num_heads")
    head_dim = draw(st.sampled_from([2, 4, 8]), label="head_dim")
    E = heads * head_dim
    B = draw(st.integers(1, 2), label="batch")
    L = draw(st.integers(1, 12 if triton else 40), label="seqlen")
    nb = draw(st.sampled_from([1, 7, 16, 33, 64, 70]), label="num_bits")
    na = draw(st.integers(1, 6), label="num_anchors")
    causal = draw(st.booleans(), label="causal")
    form = draw(st.sampled_from(["consistent", "reference-code"]), label="form")
    fit = draw(st.sampled_from([False, False, False, True]), label="fit_hash")
    layer = posattn.nn.EcoFormerAttention(E, heads, num_bits=nb, num_anchors=na, causal=causal, form=form,
                                          topk=draw(st.integers(1, 4), label="topk"), backend=backend)
    if not fit:
        layer.hash.fitted.fill_(True)        # a loaded, fitted hash: kept as is (random anchors and projection)
    pad_kind = draw(st.sampled_from(["none", "random", "right"]), label="key_padding_mask")
    mask = None
    if pad_kind == "random":
        mask = torch.rand(B, L, generator=gen) < 0.3
    elif pad_kind == "right":
        mask = torch.arange(L)[None, :] >= torch.randint(1, L + 1, (B, 1), generator=gen)
    x = values((B, L, E), torch.float32, draw(st.sampled_from(["unit", "ties", "large"]), label="values"), gen)
    x.requires_grad_(True)
    if fit:
        # the fit (KernelizedHash.fit) needs num_anchors unpadded tokens in the first batch element and 2 * topk
        # of them (the layer caps topk at seqlen // 2): otherwise the first forward raises ValueError
        n0 = L if mask is None else int((~mask[0]).sum())
        if n0 < na or 2 * min(layer.topk, max(1, L // 2)) > n0:
            with pytest.raises(ValueError, match="topk|num_anchors"):
                layer(x, key_padding_mask=mask)
            return
        with torch.no_grad():
            layer(x, key_padding_mask=mask)      # the first call fits the hash; it must not refit after
        assert bool(layer.hash.fitted)
        for hist in layer.hash.fit_history:
            for bit in hist:
                assert bit["loss"] <= bit["initial"] + 1e-12, "KSH kept a bit whose binary loss got worse"
    params = list(layer.parameters())
    with poisoned_allocations():
        y = layer(x, key_padding_mask=mask)
        qk = F.linear(x, layer.qk_proj.weight, layer.qk_proj.bias).view(B, L, heads, head_dim).transpose(1, 2)
        v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, L, heads, head_dim).transpose(1, 2)
        codes = layer.hash(qk, key_padding_mask=mask).to(v.dtype)
        o = posattn.ecoformer_attention(codes, codes, v, causal=causal, key_padding_mask=mask, form=form,
                                        backend=backend)
        yf = F.linear(o.transpose(1, 2).reshape(B, L, E), layer.out_proj.weight, layer.out_proj.bias)
        assert y.shape == (B, L, E) and y.dtype == torch.float32
        _same(y, yf, "forward")
        dy = grad_output(data, y.shape, torch.float32, gen)
        g1 = grads(y, [x] + params, dy)
        g2 = grads(yf, [x] + params, dy)
    for a, b, n in zip(g1, g2, ["dx"] + [n for n, _ in layer.named_parameters()]):
        _same(a, b, n)
    # the module's output against the float64 reference of the op on the module's own (exact) codes
    with torch.no_grad():
        v64 = v.detach().double()
        ref = R.ecoformer_pairwise(codes.detach().double(), codes.detach().double(), v64, causal=causal,
                                   key_padding_mask=mask, form=form)
        o64 = ref.transpose(1, 2).reshape(B, L, E)
        y64 = o64 @ layer.out_proj.weight.double().T + layer.out_proj.bias.double()
        # fp32 round-off is relative to the magnitude of the terms summed, not to the result (deep profile
        # 2026-11-30, 'ties' values, a fitted hash: tests/test_regressions.py::
        # test_ecoformer_module_output_projection_cancellation): the op's linear form sums, per query i,
        # h_i^T S + (b+1) s over b bits and the visible keys, terms of total size (2b+1) sum_j |v_j| (+ (b+1)|v_i|
        # for 'reference-code'), divided by den_i = sum_j (h_i.h_j + b + 1), which a fitted hash can bring down
        # to ~#keys (codes of opposite sign): |o_i| then cancels by up to ~2b; the output projection then sums
        # E terms |o_e W_fe| + |b_f|
        c = codes.detach().double()
        vis = R._ecoformer_key_mask(B, L, mask, c.device)[:, None, None, :].expand(B, heads, L, L)
        if causal:
            vis = vis * torch.ones(L, L, dtype=torch.float64).tril()
        den = ((c @ c.transpose(-1, -2) + nb + 1) * vis).sum(-1, keepdim=True)
        num_abs = (2 * nb + 1) * (vis @ v64.abs()) + (nb + 1) * v64.abs()
        o_abs = torch.where(den > 0, num_abs / den.clamp_min(1.0), 0.0).transpose(1, 2).reshape(B, L, E)
        terms = (o_abs @ layer.out_proj.weight.double().abs().T + layer.out_proj.bias.double().abs()).norm()
    check_close(y, y64, torch.float32, name="module vs float64 reference", scale=terms.item())


def _hash_case(data):
    """KernelizedHash: codes are sign(A (kappa(x) - mu)) with the documented RBF features (float64 here), +1 at 0."""
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = draw(st.integers(1, 3), label="heads")
    d = draw(st.sampled_from([1, 3, 8]), label="head_dim")
    nb = draw(st.sampled_from([1, 5, 16, 65]), label="num_bits")
    na = draw(st.integers(1, 8), label="num_anchors")
    hasher = posattn.nn.KernelizedHash(d, num_bits=nb, num_anchors=na, heads=heads)
    with torch.no_grad():
        hasher.feature_mean.uniform_(0.0, 0.5, generator=gen)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), label="dtype")
    x = values((draw(st.integers(1, 2)), heads, draw(st.integers(1, 20)), d), dtype,
               draw(st.sampled_from(["unit", "large", "ties"]), label="values"), gen)
    codes = hasher(x)
    assert codes.dtype == dtype and codes.shape == x.shape[:-1] + (nb,)
    xd = x.double()
    xh = xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a = hasher.anchors.double()
    d2 = ((xh[:, :, :, None, :] - a[None, :, None, :, :]) ** 2).sum(-1)        # (B, H, N, m)
    sigma = d2.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    kappa = torch.exp(-d2 / (2 * sigma)) - hasher.feature_mean.double()[None, :, None, :]
    proj = torch.einsum("bhnm,hkm->bhnk", kappa, hasher.projection.double())
    expect = torch.where(proj >= 0, 1.0, -1.0)
    # the module computes in fp32 (fp64 for fp64 x): a projection within its round-off of 0 may go either way
    eps = 1e-12 if dtype == torch.float64 else 1e-5
    sure = proj.abs() > eps * (1 + hasher.projection.double().abs().sum(-1)[None, :, None, :])
    assert torch.equal(codes.double()[sure], expect[sure]), "codes differ from sign(A (kappa(x) - mu))"
    assert bool(((codes == 1) | (codes == -1)).all())


@given(data=st.data())
@examples(20)
def test_fuzz_kernelized_rpe_module_torch(data):
    _krpe_module_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(5)
def test_fuzz_kernelized_rpe_module_triton(data):
    _krpe_module_case(data, "triton")


@given(data=st.data())
@examples(20)
def test_fuzz_ecoformer_module_torch(data):
    _eco_module_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(5)
def test_fuzz_ecoformer_module_triton(data):
    _eco_module_case(data, "triton")


@given(data=st.data())
@examples(20)
def test_fuzz_kernelized_hash(data):
    _hash_case(data)
