"""Regression tests for bugs found by the second round of property-based fuzzing (issue 10: tests/test_fuzz_rotary.py,
test_fuzz_unpad.py, test_fuzz_decode.py, test_fuzz_kernelized_rpe.py, test_fuzz_ecoformer.py, test_fuzz_modules.py).
Each test is the minimal input hypothesis printed, checked against reference.py."""
import pytest
import torch

import posattn
from posattn import reference as R

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids_shape", [(0,), (1, 0), (2, 0)])
def test_apply_rotary_seqlen_0_with_position_ids(backend, ids_shape):
    """Minimal example: x (batch, 0, heads, dim) with position_ids of shape (0,) / (b, 0). ops/rotary.py reshaped
    the ids with reshape(-1, seqlen), which is ambiguous for seqlen 0 (RuntimeError). Now an empty result, and an
    empty (zero) gradient for the tables."""
    x = torch.randn(2, 0, 1, 4, requires_grad=True)
    cos = torch.randn(3, 2, requires_grad=True)
    sin = torch.randn(3, 2, requires_grad=True)
    ids = torch.zeros(ids_shape, dtype=torch.int64)
    out = posattn.apply_rotary(x, cos, sin, position_ids=ids, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(cos.grad, torch.zeros_like(cos)) and torch.equal(sin.grad, torch.zeros_like(sin))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_grad", [False, True])
def test_apply_rotary_inplace_with_table_gradients(backend, x_grad):
    """Minimal example: inplace=True with cos/sin requiring grad (seqlen 0 was enough). The op saved x for the table
    gradients and then overwrote it with the result (x.copy_(out)), so backward raised "modified by an inplace
    operation". ops/rotary.py now hands the op a copy of x in that case. Gradients vs the float64 reference."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 6, generator=g)
    cos = torch.randn(5, 2, generator=g).requires_grad_(True)
    sin = torch.randn(5, 2, generator=g).requires_grad_(True)
    ids = torch.tensor([[4, 0, 2], [1, 1, 3]])
    leaf = x0.clone().requires_grad_(x_grad)
    x = leaf * 1.0 if x_grad else leaf           # inplace needs a non-leaf when x requires grad
    res = posattn.apply_rotary(x, cos, sin, position_ids=ids, inplace=True, backend=backend)
    assert res is x
    dout = torch.randn(res.shape, generator=g)
    wrt = ([leaf] if x_grad else []) + [cos, sin]
    got = torch.autograd.grad(res, wrt, dout)
    x64 = x0.double().requires_grad_(True)
    c64, s64 = (t.detach().double().requires_grad_(True) for t in (cos, sin))
    ref = R.apply_rotary(x64, c64[ids].unsqueeze(2), s64[ids].unsqueeze(2))
    assert torch.allclose(res.double(), ref, atol=1e-6)
    want = torch.autograd.grad(ref, ([x64] if x_grad else []) + [c64, s64], dout.double())
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,seqlen,rest", [(1, 1, ()), (0, 0, ()), (2, 0, (3,)), (0, 5, (2, 2))])
def test_unpad_pad_with_no_token(batch, seqlen, rest):
    """Minimal examples: pad_input of 0 packed rows (an all-padding mask, batch 1, seqlen 1) and unpad_input of a
    batch with batch * seqlen == 0. ops/varlen.py reshaped with (0, -1), which torch refuses as ambiguous
    (RuntimeError). Now empty results, zeros after padding, and a zero gradient."""
    x = torch.randn((batch, seqlen) + rest, requires_grad=True)
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    xu, idx, cu, mx, used = posattn.unpad_input(x, mask)
    ru, ri, rc, rm, rs = R.unpad_input(x.detach(), mask)
    assert xu.shape == ru.shape and torch.equal(idx, ri) and torch.equal(cu, rc) and mx == rm == 0
    assert torch.equal(used, rs)
    xp = posattn.pad_input(xu, idx, batch, seqlen)
    assert torch.equal(xp, torch.zeros_like(x))
    (g,) = torch.autograd.grad(xp, [x], torch.randn_like(xp))
    assert torch.equal(g, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmap", ["prf", "elu+1"])
def test_kernelized_rpe_normalize_qk_zero_token_float16(backend, fmap):
    """Minimal example: float16 q/k with an all-zero token (the "ties" regime draws exact zeros; head_dim 1),
    normalize_qk=True. F.normalize's eps (1e-12) is 0 in float16, so the token became 0/0 = NaN and so did the
    output. ops/kernelized_rpe.py now normalises in the FFT precision and rounds back to q's dtype."""
    q = torch.tensor([[[[0.0], [1.0]]]], dtype=torch.float16)
    k = torch.tensor([[[[-0.5], [0.0], [1.0]]]], dtype=torch.float16)
    v = torch.tensor([[[[0.5], [1.0], [-2.0]]]], dtype=torch.float16)
    bias = torch.zeros(1, 4)
    kw = dict(projection=torch.ones(1, 1)) if fmap == "prf" else {}
    out = posattn.kernelized_rpe_attention(q, k, v, bias, feature_map=fmap, normalize_qk=True, backend=backend, **kw)
    assert torch.isfinite(out).all()
    qn, kn = (torch.nn.functional.normalize(t.double(), dim=-1) for t in (q, k))
    phi = (lambda x: R.prf_features(x, torch.ones(1, 1, dtype=torch.float64), 1.0)) if fmap == "prf" else R.elu1_features
    ref = R.kernelized_rpe_direct(qn, kn, v.double(), bias.double(), phi, False)
    assert torch.allclose(out.double(), ref, atol=2e-3, rtol=2e-3)


def _pm1(*shape, seed=0):
    return (torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_ecoformer_padded_values_are_never_read(backend, fill):
    """Minimal example (torch: batch 1, 1 query, num_bits 2, random key_padding_mask, NaN in the padded v):
    padded keys were excluded by multiplying with 0, and 0 * NaN = NaN, so the whole output became NaN. The torch
    backend (ops/ecoformer.py) and the Triton kernels (triton_kernels/ecoformer.py) now select 0 instead."""
    h = _pm1(1, 1, 5, 2)
    v = torch.randn(1, 1, 5, 3)
    mask = torch.tensor([[False, True, False, True, True]])
    vp = v.clone()
    vp[:, :, mask[0]] = fill
    out = posattn.ecoformer_attention(h, h, vp, key_padding_mask=mask, backend=backend)
    ref = R.ecoformer_pairwise(h, h, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ecoformer_causal_keys_past_last_query_are_never_read(backend):
    """Minimal example (Triton: causal, seqlen_q 5 < seqlen_k 17, NaN in v of keys 5..16, which no query sees):
    the diagonal tile multiplied them by weight 0 (the torch backend also read them into its tile). Now they are
    never read."""
    q, k = _pm1(2, 2, 5, 7), _pm1(2, 2, 17, 7, seed=1)
    v = torch.randn(2, 2, 17, 1)
    vp = v.clone()
    vp[:, :, 5:] = float("nan")
    out = posattn.ecoformer_attention(q, k, vp, causal=True, backend=backend)
    ref = R.ecoformer_pairwise(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_ecoformer_backward_with_no_key(backend, packed):
    """Minimal examples: seqlen_q == seqlen_k == 0 with v (and float codes) requiring grad. The torch backend returned
    an output detached from the graph (backward raised "does not require grad"); the Triton backward raised "appears
    to not have been used in the graph" (seqlen_k == 0). Now zero (empty) gradients."""
    h = _pm1(1, 1, 0, 3).requires_grad_(not packed)
    codes = posattn.ecoformer_pack_bits(h.detach()) if packed else h
    v = torch.randn(1, 1, 0, 2, requires_grad=True)
    out = posattn.ecoformer_attention(codes, codes, v, num_bits=3, backend=backend)
    assert out.shape == (1, 1, 0, 2) and out.requires_grad
    wrt = [v] + ([] if packed else [h])
    g = torch.autograd.grad(out, wrt, torch.randn(out.shape), allow_unused=True)  # torch: v may take no part
    assert all(x is None or (x.shape == t.shape and not x.any()) for x, t in zip(g, wrt))


@pytest.mark.interp
def test_ecoformer_triton_backward_with_no_key_but_queries():
    """seqlen_k == 0 with queries (Triton backward recomputes with the torch backend: the keys take no part):
    output 0, gradients 0 for the codes."""
    q = _pm1(1, 2, 3, 4).requires_grad_(True)
    k = _pm1(1, 2, 0, 4).requires_grad_(True)
    v = torch.randn(1, 2, 0, 2, requires_grad=True)
    out = posattn.ecoformer_attention(q, k, v, backend="triton")
    assert torch.equal(out, torch.zeros(1, 2, 3, 2))
    gq, gk, gv = torch.autograd.grad(out, [q, k, v], torch.randn(out.shape))
    assert torch.equal(gq, torch.zeros_like(q)) and gk.shape == k.shape and gv.shape == v.shape


def test_ecoformer_layer_output_of_real_tokens_ignores_padding_content():
    """Found while fuzzing the modules: 20 random paddings changed the unpadded rows by up to 6e-3, NaN padding by
    8e-3 (embed 8, 2 heads, 16 bits, 4 anchors, 10 real tokens of 40): KernelizedHash's bandwidth sigma averaged
    over padding too. Fixed: the layer passes key_padding_mask to the hash, sigma (and fit's feature mean) use
    kept tokens only, by select so that NaN padding stays out."""
    torch.manual_seed(0)
    layer = posattn.nn.EcoFormerAttention(8, 2, num_bits=16, num_anchors=4, topk=2)
    layer.hash.fitted.fill_(True)
    x = torch.randn(1, 40, 8)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, 10:] = True
    with torch.no_grad():
        y1 = layer(x, key_padding_mask=mask)
        x2 = x.clone()
        x2[0, 10:] = float("nan")
        y2 = layer(x2, key_padding_mask=mask)
    assert torch.equal(y1[0, :10], y2[0, :10])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernelized_rpe_causal_keys_past_last_query_are_never_read(backend):
    """Found by the deep profile (PRF, causal, seqlen_q 5 < seqlen_k 16, bias std 3): keys j >= seqlen_q, which no
    query sees, got a gradient of FFT round-off (2e-4), and NaN there made the PRF key shift and the FFT NaN. The op
    (ops/kernelized_rpe.py) now drops them: output as the reference, their gradients exactly 0, NaN/inf ignored."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 3, generator=g)
    k0 = torch.randn(1, 2, 16, 3, generator=g)
    v0 = torch.randn(1, 2, 16, 2, generator=g)
    b = (3.0 * torch.randn(2, 20, generator=g)).requires_grad_(True)
    W = torch.randn(4, 3, generator=g)
    k, v = k0.clone(), v0.clone()
    k[:, :, 5:], v[:, :, 5:] = float("nan"), float("inf")
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = posattn.kernelized_rpe_attention(q, k, v, b, projection=W, causal=True, fft_dtype=torch.float64,
                                           backend=backend)
    ref = R.kernelized_rpe_direct(q.double(), k0.double(), v0.double(), b.detach().double(),
                                  lambda x: R.prf_features(x, W.double(), 3 ** -0.5), True)
    assert torch.isfinite(out).all() and torch.allclose(out.double(), ref, atol=1e-5)
    gk, gv, gb = torch.autograd.grad(out, [k, v, b], torch.randn(out.shape, generator=g))
    assert torch.isfinite(gk).all() and torch.isfinite(gv).all() and torch.isfinite(gb).all()
    assert not gk[:, :, 5:].any() and not gv[:, :, 5:].any() and not gb[:, 9:].any()


@pytest.mark.interp
@pytest.mark.parametrize("causal", [True, False])
def test_ecoformer_triton_no_key_with_queries(causal):
    """Found by the deep profile (a segmentation fault of the whole run): causal, seqlen_q 2, seqlen_k 0, Triton. The
    launcher's exclusive prefix of key-block states was empty (no block), so the kernel loaded state -1 (out of
    bounds). triton_kernels/ecoformer.py now always has the leading zero state. Every query sees no key: output 0."""
    q = _pm1(1, 3, 2, 32)
    k = _pm1(1, 3, 0, 32)
    v = torch.randn(1, 3, 0, 8, dtype=torch.float16)
    out = posattn.ecoformer_attention(q, k, v, causal=causal, backend="triton")
    assert torch.equal(out, torch.zeros(1, 3, 2, 8, dtype=torch.float16))


@pytest.mark.parametrize("seqlens", [(0, 0), (0, 3), (3, 0)])
def test_flash_attn_kvpacked_loss_through_lse_with_empty_sequences(seqlens):
    """Deep fuzz, loss through the returned lse (torch backend): kv-packed, seqlen_q = seqlen_k = 0, head_dim 1,
    float32, seed 0 raised 'element 1 of tensors does not require grad' on the test's float64 side (an empty
    reference lse is not attached). The op's side: out and lse attached, gradients zero with the inputs' shapes."""
    Sq, Sk = seqlens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Sq, 1, 1, generator=g).requires_grad_(True)
    kv = torch.randn(1, Sk, 2, 1, 1, generator=g).requires_grad_(True)
    out, lse, _ = posattn.flash_attn_kvpacked_func(q, kv, return_attn_probs=True, backend="torch")
    assert out.requires_grad and lse.requires_grad
    dlse = torch.randn(lse.shape, generator=g).masked_fill(~torch.isfinite(lse), 0.0)   # -inf rows: no lse path
    dq, dkv = torch.autograd.grad([out, lse], [q, kv], [torch.randn(out.shape, generator=g), dlse],
                                  allow_unused=True)
    for name, t, grad in (("dq", q, dq), ("dkv", kv, dkv)):
        grad = torch.zeros_like(t) if grad is None else grad
        assert grad.shape == t.shape and torch.equal(grad, torch.zeros_like(t)), name
