"""Layouts that share a buffer without sharing memory must keep working now that the ops refuse written tensors
aliasing their inputs (``posattn._checks.check_disjoint``, an exact test):

* FlashAttention users keep the KV cache as one packed buffer, ``kv = torch.empty(B, S, 2, H, D)``,
  ``k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]`` (byte intervals interleave; ``torch._C._overlaps`` says
  they overlap). Appending into them gives the bits of the same call on two separate caches, on the torch
  backend and the Triton one (interpreter here), contiguous and paged, with rotary and ``cache_batch_idx``.
* Reading only (no k/v), k_cache and v_cache may alias each other, even be one tensor.
* apply_rotary(inplace=True) on an x whose gaps (last-dim stride 2) hold cos and sin.

The refused cases (sharing memory for real) are in tests/test_bad_inputs.py."""
import pytest
import torch

import posattn
from posattn import reference as R
from posattn._checks import shares_memory
from fuzz_helpers import _bits
from tolerances import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interp)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "paged", "batch_idx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_kv_cache_append_matches_separate_caches(backend, layout, dtype, seed):
    g = _gen(seed)
    B, Hk, H, D, s_new = 2, 2, 4, 16, 2
    rows, slots = (3, 4) if layout == "paged" else (B + (layout == "batch_idx"), 9)   # paged: 3 pages of 4
    kv = _rn(g, rows, slots, 2, Hk, D, dtype=dtype)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    assert torch._C._overlaps(k_cache, v_cache) and not shares_memory(k_cache, v_cache)
    q = _rn(g, B, s_new, H, D, dtype=dtype)
    k, v = _rn(g, B, s_new, Hk, D, dtype=dtype), _rn(g, B, s_new, Hk, D, dtype=dtype)
    cos, sin = R.rope_cos_sin(torch.arange(16), R.rope_inv_freq(D, dtype=torch.float32))
    kw = dict(cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), rotary_cos=cos, rotary_sin=sin, causal=True,
              return_softmax_lse=True, backend=backend)
    if layout == "paged":   # sequence 0 appends into page 0 (its second page), sequence 1 into page 1
        kw["cache_seqlens"] = torch.tensor([5, 2], dtype=torch.int32)
        kw["block_table"] = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    elif layout == "batch_idx":
        kw["cache_batch_idx"] = torch.tensor([2, 0], dtype=torch.int32)
    kc_sep, vc_sep = k_cache.clone(), v_cache.clone()
    kv_before = kv.clone()
    o_sep, lse_sep = posattn.flash_attn_with_kvcache(q, kc_sep, vc_sep, k, v, **kw)
    o, lse = posattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kw)
    # the same bits as two separate caches: outputs and both halves of the packed buffer
    assert torch.equal(_bits(o), _bits(o_sep)) and torch.equal(_bits(lse), _bits(lse_sep))
    assert torch.equal(_bits(kv[:, :, 0]), _bits(kc_sep)) and torch.equal(_bits(kv[:, :, 1]), _bits(vc_sep))
    assert not torch.equal(_bits(kv), _bits(kv_before))                  # the append did write into kv
    # and the right answer
    ref_kw = {n: kw[n] for n in ("cache_seqlens", "rotary_cos", "rotary_sin", "causal") if n in kw}
    for n in ("block_table", "cache_batch_idx"):
        if n in kw:
            ref_kw[n] = kw[n]
    ro, rl = R.kvcache_attention(q, kv_before[:, :, 0], kv_before[:, :, 1], ref_kw.pop("cache_seqlens"), k=k, v=v,
                                 **ref_kw)
    assert_close(o, ro, dtype)
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_caches_may_alias_each_other(backend):
    """No k/v: nothing is written, so k_cache and v_cache may be one tensor (or overlap)."""
    g = _gen(7)
    q, kc = _rn(g, 2, 1, 4, 16), _rn(g, 2, 8, 2, 16)
    cs = torch.tensor([3, 8], dtype=torch.int32)
    snap = _bits(kc).clone()
    out = posattn.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=cs, backend=backend)
    want, _ = R.kvcache_attention(q, kc, kc, cs)
    assert_close(out, want, torch.float32)
    # overlapping (shifted by one feature) views of one buffer, read only
    buf = _rn(g, 2 * 8 * 2 * 16 + 1)
    kv, vv = buf[:-1].view(2, 8, 2, 16), buf[1:].view(2, 8, 2, 16)
    out2 = posattn.flash_attn_with_kvcache(q, kv, vv, cache_seqlens=cs, backend=backend)
    want2, _ = R.kvcache_attention(q, kv, vv, cs)
    assert_close(out2, want2, torch.float32)
    assert torch.equal(_bits(kc), snap)


def test_out_in_a_packed_buffer_next_to_the_cache():
    """out may live in the same allocation as the caches as long as it shares no element with them."""
    g = _gen(8)
    buf = _rn(g, 2, 9, 3, 2, 16)       # per (row, slot): k heads, v heads, and a third part holding out
    k_cache, v_cache = buf[:, :, 0], buf[:, :, 1]
    out = buf[:, 0, 2].unsqueeze(1)    # (2, 1, 2, 16): the third part of slot 0 (num_heads == num_heads_k here)
    q, k, v = _rn(g, 2, 1, 2, 16), _rn(g, 2, 1, 2, 16), _rn(g, 2, 1, 2, 16)
    cs = torch.tensor([3, 5], dtype=torch.int32)
    want, _ = R.kvcache_attention(q, k_cache.clone(), v_cache.clone(), cs, k=k, v=v)
    res = posattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cs, out=out, backend="torch")
    assert res is out
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_inplace_with_tables_in_the_gaps_of_x(backend):
    """x = even features of a buffer whose odd ones hold cos and sin: disjoint, so inplace=True works."""
    g = _gen(9)
    buf = _rn(g, 2, 5, 3, 16)
    x = buf[..., 0::2]                               # (2, 5, 3, 8), last-dim stride 2
    odd = buf.view(-1)[1::2]                         # 240 odd elements
    cos, sin = odd[:32].view(8, 4), odd[32:64].view(8, 4)
    cos.copy_(torch.rand(8, 4, generator=g))
    sin.copy_(torch.rand(8, 4, generator=g))
    assert torch._C._overlaps(x, cos) and not shares_memory(x, cos) and not shares_memory(x, sin)
    want = posattn.apply_rotary(x.clone(), cos.clone(), sin.clone(), backend=backend)
    tables = (cos.clone(), sin.clone())
    res = posattn.apply_rotary(x, cos, sin, inplace=True, backend=backend)
    assert res is x and torch.equal(_bits(x), _bits(want))
    assert torch.equal(cos, tables[0]) and torch.equal(sin, tables[1])


# ---- break-it pass on 8f6e06b
def test_rotary_inplace_compiles_with_fullgraph():
    """check_disjoint made Dynamo fail on apply_rotary(inplace=True) (no data pointers while tracing: 'Observed
    exception'); fullgraph compiles worked before 8f6e06b. The check is skipped while Dynamo traces."""
    cos, sin = R.rope_cos_sin(torch.arange(16), R.rope_inv_freq(16, dtype=torch.float32))

    def f(x, c, s):
        posattn.apply_rotary(x, c, s, inplace=True, backend="torch")
        return x * 1

    x = torch.randn(2, 5, 3, 16)
    want = posattn.apply_rotary(x.clone(), cos, sin, backend="torch")
    torch._dynamo.reset()
    try:
        got = torch.compile(f, fullgraph=True, backend="eager")(x, cos, sin)
    finally:
        torch._dynamo.reset()
    assert_close(got, want, torch.float32)
    assert_close(x, want, torch.float32)


def test_kvcache_aliasing_still_refused_under_compile():
    """flash_attn_with_kvcache runs its aliasing checks eagerly under torch.compile (a graph break; the op breaks
    the graph anyway to read cache_seqlens): an out that is q is refused, packed halves still work."""
    g = _gen(10)
    kv = _rn(g, 2, 8, 2, 2, 16)
    q, k, v = _rn(g, 2, 1, 4, 16), _rn(g, 2, 1, 2, 16), _rn(g, 2, 1, 2, 16)
    cs = torch.tensor([3, 5], dtype=torch.int32)

    def f(q, kc, vc, k, v, out):
        return posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, out=out, backend="torch")

    torch._dynamo.reset()
    try:
        fc = torch.compile(f, backend="eager")
        with pytest.raises(ValueError, match=r"^out: shares memory with q"):
            fc(q, kv[:, :, 0], kv[:, :, 1], k, v, q)
        want, _ = R.kvcache_attention(q, kv[:, :, 0].clone(), kv[:, :, 1].clone(), cs, k=k, v=v)
        got = fc(q, kv[:, :, 0], kv[:, :, 1], k, v, torch.empty(2, 1, 4, 16))
    finally:
        torch._dynamo.reset()
    assert_close(got, want, torch.float32)


def test_rotary_inplace_under_vmap():
    """Under torch.func.vmap x is a BatchedTensor without a data pointer: the aliasing check called that 'may share
    memory' and refused every call (it worked before 8f6e06b). It now compares the tensor the wrapper holds."""
    cos, sin = R.rope_cos_sin(torch.arange(16), R.rope_inv_freq(16, dtype=torch.float32))
    xs = torch.randn(3, 2, 5, 3, 16)
    want = torch.stack([posattn.apply_rotary(x, cos, sin, backend="torch") for x in xs])
    torch.func.vmap(lambda x: posattn.apply_rotary(x, cos, sin, inplace=True, backend="torch"))(xs)
    assert_close(xs, want, torch.float32)
    # and what does share memory is still refused, exactly: cos is the start of instance 2's x
    tables = xs[2].reshape(-1)[:128].view(16, 8)
    with pytest.raises(ValueError, match=r"^x: shares memory with cos; "):
        torch.func.vmap(lambda x: posattn.apply_rotary(x, tables, sin, inplace=True, backend="torch"))(xs)


def _negated(t):
    """A float32 tensor equal to t, contiguous, whose memory holds -t: the negative bit of ``z.conj().imag`` kept
    by an ``as_strided`` view (public API). Contiguous, so no ``.contiguous()`` on the way resolves it."""
    w = torch.zeros(t.numel() + 1, dtype=torch.complex64).conj().imag      # negative bit, strides (2,)
    r = w.as_strided(t.shape, torch.empty(t.shape).stride(), 1)              # unit strides over the floats
    r.copy_(t)
    assert r.is_neg() and r.is_contiguous() and torch.equal(r, t)
    assert torch.equal(r.resolve_neg(), t) and torch.equal(torch.view_as_real(w._base.resolve_conj())
                                                            .view(-1)[1:1 + t.numel()].view(t.shape), -t)
    return r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k_cache", "v_cache", "out", "rotary_cos", "alibi_slopes"])
def test_kvcache_negative_bit_views(backend, which):
    """The Triton kernel read (and wrote) the memory of a view with the negative bit set, not its values: a wrong
    attention output, no error, for a negated q, k_cache, v_cache or out. They are resolved (read) or written
    through a buffer and copy_ (out) now."""
    g = _gen(12)
    cos, sin = R.rope_cos_sin(torch.arange(16), R.rope_inv_freq(16, dtype=torch.float32))
    a = dict(q=_rn(g, 2, 1, 4, 16), k_cache=_rn(g, 2, 8, 2, 16), v_cache=_rn(g, 2, 8, 2, 16),
             out=torch.zeros(2, 1, 4, 16), rotary_cos=cos, rotary_sin=sin, alibi_slopes=torch.rand(4, generator=g))
    k, v = _rn(g, 2, 1, 2, 16), _rn(g, 2, 1, 2, 16)
    cs = torch.tensor([3, 5], dtype=torch.int32)
    plain = {n: t.clone() for n, t in a.items()}
    want = posattn.flash_attn_with_kvcache(k=k, v=v, cache_seqlens=cs, backend=backend, **plain)
    a[which] = _negated(a[which])
    got = posattn.flash_attn_with_kvcache(k=k, v=v, cache_seqlens=cs, backend=backend, **a)
    assert torch.equal(got, want)
    assert torch.equal(a["k_cache"], plain["k_cache"]) and torch.equal(a["v_cache"], plain["v_cache"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_inplace_negative_bit_tables(backend):
    """apply_rotary(inplace=True) launches the Triton kernel directly (no dispatcher to resolve a negative bit):
    negated cos and sin (equal strides, so no copy on the way) rotated the wrong way, silently."""
    cos, sin = R.rope_cos_sin(torch.arange(16), R.rope_inv_freq(16, dtype=torch.float32))
    x = torch.randn(2, 5, 3, 16)
    want = posattn.apply_rotary(x.clone(), cos, sin, backend=backend)
    res = posattn.apply_rotary(x, _negated(cos), _negated(sin), inplace=True, backend=backend)
    assert res is x and torch.equal(_bits(x), _bits(want))
    xn = _negated(torch.randn(2, 5, 3, 16))                # a negated x written in place: stays right
    want = posattn.apply_rotary(xn.clone(), cos, sin, backend=backend)
    posattn.apply_rotary(xn, cos, sin, inplace=True, backend=backend)
    assert_close(xn, want, torch.float32)
