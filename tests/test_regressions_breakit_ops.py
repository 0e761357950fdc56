"""Regressions from the break-it pass over decode, rotary, scheduling, kernelized RPE and the nn modules: the
cases where a result (not an error) is expected. Each compares with ``posattn.reference`` in float64 on fresh
random inputs. The refused inputs of the same pass are in tests/test_bad_inputs.py."""
import warnings

import numpy
import pytest
import torch

import posattn
import posattn.scheduling as S
from posattn import reference as R


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rn(g, *shape):
    return torch.randn(*shape, generator=g)


def test_kvcache_under_default_dtype_float64_matches_reference():
    """_run_torch allocated its running max/sum/accumulator with the default dtype: RuntimeError under
    torch.set_default_dtype(torch.float64) with fp32 inputs."""
    g = _gen(1)
    q, kc, vc = _rn(g, 2, 2, 4, 16), _rn(g, 2, 12, 2, 16), _rn(g, 2, 12, 2, 16)
    k, v = _rn(g, 2, 2, 2, 16), _rn(g, 2, 2, 2, 16)
    cs = torch.tensor([3, 9], dtype=torch.int32)
    want, _ = R.kvcache_attention(q, kc, vc, cs, k=k, v=v, causal=True)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out, lse = posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, causal=True, backend="torch",
                                                   return_softmax_lse=True)
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_kvcache_reads_expanded_cache_without_append():
    """A stride-0 shared-prefix cache is refused only when written; reading it is exact."""
    g = _gen(2)
    q = _rn(g, 3, 1, 4, 16)
    kc, vc = _rn(g, 1, 10, 2, 16).expand(3, 10, 2, 16), _rn(g, 1, 10, 2, 16).expand(3, 10, 2, 16)
    cs = torch.tensor([4, 10, 7], dtype=torch.int32)
    out = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, backend="torch")
    want, _ = R.kvcache_attention(q, kc.contiguous(), vc.contiguous(), cs)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_kvcache_paged_shared_read_only_prefix_is_allowed():
    """Sequences may share a page they only read; their appends go to pages of their own."""
    g = _gen(3)
    q, k, v = _rn(g, 2, 1, 4, 16), _rn(g, 2, 1, 2, 16), _rn(g, 2, 1, 2, 16)
    kc, vc = _rn(g, 3, 4, 2, 16), _rn(g, 3, 4, 2, 16)
    bt = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    cs = torch.tensor([4, 5], dtype=torch.int32)
    want, _ = R.kvcache_attention(q, kc, vc, cs, k=k, v=v, block_table=bt)
    out = posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, block_table=bt, backend="torch")
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert torch.equal(kc[1, 0], k[0, 0]) and torch.equal(kc[2, 1], k[1, 0])


def _overlapping_views(g):
    base = _rn(g, 200)
    return {"unfold": base.unfold(0, 16, 1)[:8].view(1, 8, 1, 16),
            "expand": _rn(g, 1, 8, 1, 16).expand(2, 8, 3, 16),
            "as_strided": torch.as_strided(_rn(g, 64), (2, 8, 2, 16), (8, 4, 2, 1))}


@pytest.mark.parametrize("kind", ["unfold", "expand", "as_strided"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_not_inplace_on_overlapping_x_matches_reference(kind, interleaved):
    g = _gen(4)
    x = _overlapping_views(g)[kind]
    cos, sin = R.rope_cos_sin(torch.arange(16), R.rope_inv_freq(16, dtype=torch.float32))
    before = x.clone()
    y = posattn.apply_rotary(x, cos, sin, interleaved=interleaved, backend="torch")
    want = R.apply_rotary(x.double().contiguous(), cos.double()[:8, None, :], sin.double()[:8, None, :], interleaved)
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(x, before)


def test_rotary_not_inplace_on_expanded_x_gradient():
    g = _gen(5)
    base = _rn(g, 1, 8, 1, 16).requires_grad_()
    cos, sin = R.rope_cos_sin(torch.arange(8), R.rope_inv_freq(16, dtype=torch.float32))
    w = _rn(g, 2, 8, 3, 16)
    (posattn.apply_rotary(base.expand(2, 8, 3, 16), cos, sin, backend="torch") * w).sum().backward()
    b64 = base.detach().double().requires_grad_()
    (R.apply_rotary(b64.expand(2, 8, 3, 16), cos.double()[:, None, :], sin.double()[:, None, :], False)
     * w.double()).sum().backward()
    torch.testing.assert_close(base.grad.double(), b64.grad, atol=1e-5, rtol=1e-5)


def test_lean_schedule_bounded_and_extra_ctas_empty():
    # rejected up front (before any tile is built: these used to run for minutes)
    for call in (lambda: S.lean_schedule([100, 5], num_heads_k=2, block_n=16, num_ctas=10**9),
                 lambda: S.lean_schedule([10**12], num_heads_k=1, block_n=16),
                 lambda: S.single_schedule([10**12], num_heads_k=1, block_n=16)):
        with pytest.raises(ValueError):
            call()
    # num_ctas above the tiles (documented): the extra CTAs are empty
    s = S.lean_schedule([100, 5], num_heads_k=2, block_n=16, num_ctas=S.MAX_CTAS)
    assert s.num_tiles == 16 and sum(s.loads()) == 16 and s.loads().count(0) == S.MAX_CTAS - 16
    # a long sequence with max_splits: the load is computed, not searched (was linear in the tiles)
    s = S.lean_schedule([2**20 * 16], num_heads_k=1, block_n=16)
    assert s.max_splits <= S.MAX_SPLITS and sum(s.loads()) == s.num_tiles == 2**20
    # numpy ints are ints
    assert S.lean_schedule([numpy.int64(300)], num_heads_k=1, block_n=128).num_tiles == 3


def _masked_bias(g, heads, n, s, causal):
    b = _rn(g, heads, n + s - 1)
    b[0] = float("-inf")                 # head 0: every row fully masked
    b[1, n - 1] = float("-inf")          # head 1: under causal, row 0 only reads entry n - 1 (lag 0)
    return b


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["elu+1", "relu"])
def test_kernelized_rpe_fully_masked_rows_are_zero(causal, feature_map):
    g = _gen(6)
    n = s = 6
    q, k, v = _rn(g, 2, 3, n, 8), _rn(g, 2, 3, s, 8), _rn(g, 2, 3, s, 8)
    bias = _masked_bias(g, 3, n, s, causal).requires_grad_()
    fmap = R.elu1_features if feature_map == "elu+1" else R.relu_features
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no clamping / round-off warning for the masked rows
        out = posattn.kernelized_rpe_attention(q, k, v, bias, feature_map=feature_map, causal=causal,
                                               fft_dtype=torch.float64, backend="torch")
    want = R.kernelized_rpe_direct(q, k, v, bias.detach(), fmap, causal)
    want_fft = R.kernelized_rpe_fft(q, k, v, bias.detach(), fmap, causal)
    assert torch.isfinite(want).all() and torch.isfinite(out).all()
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    if causal:
        assert torch.equal(out[:, 1, 0], torch.zeros_like(out[:, 1, 0]))
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(want_fft, want, atol=1e-9, rtol=1e-9)
    # gradients: finite, and those of the live rows match the reference's
    wgt = _rn(g, *out.shape)
    (out * wgt).sum().backward()
    b64 = bias.detach().double().requires_grad_()
    (R.kernelized_rpe_direct(q, k, v, b64, fmap, causal) * wgt.double()).sum().backward()
    assert torch.isfinite(bias.grad).all() and torch.isfinite(b64.grad).all()
    torch.testing.assert_close(bias.grad.double(), b64.grad, atol=1e-6, rtol=1e-6)


def test_exact_rpe_attention_fully_masked_row_is_zero():
    g = _gen(7)
    q, k, v = _rn(g, 1, 2, 4, 8), _rn(g, 1, 2, 4, 8), _rn(g, 1, 2, 4, 8)
    b = _rn(g, 2, 7)
    b[0] = float("-inf")
    out = R.exact_rpe_attention(q, k, v, b)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1:], R.exact_rpe_attention(q[:, 1:], k[:, 1:], v[:, 1:], b[1:]))


@pytest.mark.parametrize("flag", [True, numpy.bool_(True)])
def test_nn_modules_take_bool_and_numpy_bool(flag):
    layer = posattn.nn.KernelizedRPEAttention(16, 2, max_seqlen=8, causal=flag, normalize_qk=flag,
                                              feature_map="elu+1")
    assert layer.causal is True and layer.normalize_qk is True
    eco = posattn.nn.EcoFormerAttention(16, 2, num_bits=4, num_anchors=3, topk=1, causal=flag)
    assert eco.causal is True
    x = torch.randn(1, 6, 16, generator=_gen(8))
    assert torch.isfinite(layer(x)).all() and torch.isfinite(eco(x)).all()


def test_nn_modules_under_default_dtype_float64():
    """Internal allocations carry explicit dtypes: fp32 modules and inputs work under a float64 default."""
    torch.manual_seed(0)
    eco = posattn.nn.EcoFormerAttention(16, 2, num_bits=4, num_anchors=3, topk=1)
    x = torch.randn(2, 6, 16)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = eco(x)   # the first call fits the hash
    finally:
        torch.set_default_dtype(before)
    assert y.dtype == torch.float32 and torch.isfinite(y).all() and bool(eco.hash.fitted)


@pytest.mark.interp
@pytest.mark.parametrize("append", [False, True])
def test_kvcache_triton_cache_with_strided_head_dim_matches_reference(append):
    """A cache whose head_dim has stride 2 (every other element of a wider buffer; the gaps hold NaN) was read by
    the Triton decode kernel as unit-stride rows: out off by 100% and lse inf (the torch backend was right).
    Found by the fuzz audit (the decode fuzz test drew contiguous caches only)."""
    g = _gen(11)
    q, kc, vc = _rn(g, 2, 1, 4, 16), _rn(g, 2, 20, 2, 16), _rn(g, 2, 20, 2, 16)
    k, v = (_rn(g, 2, 2, 2, 16), _rn(g, 2, 2, 2, 16)) if append else (None, None)
    cs = torch.tensor([5, 11], dtype=torch.int32)
    want, want_lse = R.kvcache_attention(q, kc, vc, cs.long(), k=k, v=v, causal=True)
    bufs = [torch.full((2, 20, 2, 32), float("nan")) for _ in range(2)]
    kca, vca = (b[..., ::2] for b in bufs)
    kca.copy_(kc)
    vca.copy_(vc)
    out, lse = posattn.flash_attn_with_kvcache(q, kca, vca, k, v, cache_seqlens=cs, causal=True,
                                               return_softmax_lse=True, backend="triton")
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    if append:   # the append went into the caller's strided cache, the gaps untouched
        for b in range(2):
            assert torch.equal(kca[b, int(cs[b]):int(cs[b]) + 2], k[b])
            assert torch.equal(vca[b, int(cs[b]):int(cs[b]) + 2], v[b])
        assert all(torch.isnan(bf[..., 1::2]).all() for bf in bufs)


@pytest.mark.interp
@pytest.mark.parametrize("layout", ["block_table_transposed", "block_table_stride_2", "cache_batch_idx_stride_2"])
def test_kvcache_triton_index_tensors_read_through_their_strides(layout):
    """The Triton decode kernel indexed block_table's columns and cache_batch_idx with unit stride: a transposed
    block_table (column stride = batch) picked wrong pages (out off by 0.56), every other column of a wider table
    read the filler entries past the cache (the interpreter aborted). Found probing index-tensor layouts after the
    fuzz audit; both are now copied when not contiguous."""
    g = _gen(5)
    if layout.startswith("block_table"):
        q, kc, vc = _rn(g, 2, 1, 2, 16), _rn(g, 8, 16, 2, 16), _rn(g, 8, 16, 2, 16)
        bt = torch.randperm(8, generator=g)[:6].reshape(2, 3).to(torch.int32)
        cs = torch.tensor([20, 40], dtype=torch.int32)
        if layout == "block_table_transposed":
            view = bt.t().contiguous().t()
        else:
            wide = torch.full((2, 6), 10 ** 6, dtype=torch.int32)
            view = wide[:, ::2]
            view.copy_(bt)
        want, want_lse = R.kvcache_attention(q, kc, vc, cs.long(), block_table=bt.long())
        out, lse = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, block_table=view,
                                                   return_softmax_lse=True, backend="triton")
    else:
        q, kc, vc = _rn(g, 2, 1, 2, 16), _rn(g, 4, 20, 2, 16), _rn(g, 4, 20, 2, 16)
        idx = torch.tensor([3, 1], dtype=torch.int32)
        wide = torch.tensor([3, 10 ** 6, 1, 10 ** 6], dtype=torch.int32)
        view = wide[::2]
        cs = torch.tensor([7, 19], dtype=torch.int32)
        want, want_lse = R.kvcache_attention(q, kc, vc, cs.long(), cache_batch_idx=idx.long())
        out, lse = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, cache_batch_idx=view,
                                                   return_softmax_lse=True, backend="triton")
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
