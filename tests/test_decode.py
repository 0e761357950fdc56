"""flash_attn_with_kvcache (posattn.ops.decode) vs the float64 reference (reference.kvcache_attention).

Triton runs under the interpreter on CPU here (marked ``interp``); the same tests run on CUDA when a
GPU is present. Decode is inference-only (no autograd), so there are no gradient checks.
"""
import math

import pytest
import torch

import posattn
from posattn import reference as R
from posattn.positional import ALiBi, RoPE
from posattn.scheduling import default_block_n, lean_schedule
from tolerances import assert_close, poison_like

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_unavailable(backend, device):
    if backend == "triton":
        from posattn import _backends
        if not _backends.triton_available(device):
            pytest.skip("triton not available on this device")


def _run(q, kc, vc, *, backend, ref_kwargs=None, dtype=None, check_cache=None, **kw):
    """Call the op on clones of the cache with a poisoned out; compare out and lse with the reference."""
    kc2, vc2 = kc.clone(), vc.clone()
    out = poison_like(q)
    o, lse = posattn.flash_attn_with_kvcache(q, kc2, vc2, return_softmax_lse=True, backend=backend, out=out, **kw)
    assert o is out
    rk = dict(kw)
    for key in ("schedule", "num_ctas", "num_splits", "position", "reduce"):
        rk.pop(key, None)
    rk.update(ref_kwargs or {})
    ro, rl = R.kvcache_attention(q, kc, vc, rk.pop("cache_seqlens"), **rk)
    dt = dtype or q.dtype
    assert torch.isfinite(o).all()
    assert_close(o, ro, dt)
    assert_close(lse, rl, torch.float32 if dt == torch.float32 else dt, name="lse")
    return o, lse, kc2, vc2


# ------------------------------------------------------------------------------------------------
@pytest.mark.interp
@pytest.mark.parametrize("G", [1, 2, 3, 7, 132, 264, 1000])
def test_grid_sizes_ragged(G, device):
    """Result independent of G (beyond fp32 rounding); ragged lengths 0, 1, BLOCK_N-1, BLOCK_N+1."""
    _skip_unavailable("triton", device)
    D, Hk, H = 64, 2, 4
    bn = default_block_n(D)
    lens = [0, 1, bn - 1, bn + 1, 2 * bn + 5]
    q = torch.randn(len(lens), 1, H, D, device=device)
    kc = torch.randn(len(lens), 2 * bn + 8, Hk, D, device=device)
    vc = torch.randn_like(kc)
    cs = torch.tensor(lens, dtype=torch.int32, device=device)
    o, lse, _, _ = _run(q, kc, vc, backend="triton", cache_seqlens=cs, schedule="lean", num_ctas=G)
    o1, _, _, _ = _run(q, kc, vc, backend="triton", cache_seqlens=cs, schedule="lean", num_ctas=1)
    assert (o - o1).abs().max().item() <= 1e-5
    assert torch.equal(o[0], torch.zeros_like(o[0])) and bool((lse[0] == -math.inf).all())


@pytest.mark.interp
def test_deterministic_for_a_schedule(device):
    _skip_unavailable("triton", device)
    q = torch.randn(2, 1, 8, 64, device=device)
    kc = torch.randn(2, 700, 2, 64, device=device)
    vc = torch.randn_like(kc)
    cs = torch.tensor([650, 333], dtype=torch.int32, device=device)
    a = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, backend="triton", num_ctas=5)
    b = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, backend="triton", num_ctas=5)
    assert torch.equal(a, b)


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", ["lean", "split", "single"])
def test_append_rotary_gqa(backend, dtype, schedule, device):
    """New k/v appended in place at cache_seqlens (k rotated), GQA 8/2, interleaved rotary."""
    _skip_unavailable(backend, device)
    B, H, Hk, D, S = 3, 8, 2, 64, 200
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    k, v = torch.randn(B, 1, Hk, D, device=device, dtype=dtype), torch.randn(B, 1, Hk, D, device=device, dtype=dtype)
    ang = torch.rand(S + 1, 16, device=device) * 6
    cos, sin = ang.cos(), ang.sin()
    cs = torch.tensor([129, 0, 57], dtype=torch.int32, device=device)
    slopes = torch.rand(H, device=device)
    _, _, kc2, vc2 = _run(q, kc, vc, backend=backend, k=k, v=v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cs,
                          alibi_slopes=slopes, schedule=schedule, num_splits=3, num_ctas=4)
    for b, L in enumerate(cs.tolist()):
        kr = R._kv_rotate(k[b], cos[L:L + 1], sin[L:L + 1], True)   # float64; the op rotates in fp32
        assert_close(kc2[b, L], kr[0], dtype, name="appended k")
        assert torch.equal(vc2[b, L], v[b, 0])
        assert torch.equal(kc2[b, :L], kc[b, :L]) and torch.equal(kc2[b, L + 1:], kc[b, L + 1:])


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_shuffled_block_table(backend, device):
    _skip_unavailable(backend, device)
    B, H, Hk, D, page, nblk = 3, 4, 2, 64, 16, 40
    q = torch.randn(B, 2, H, D, device=device)
    kc = torch.randn(nblk, page, Hk, D, device=device)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nblk, device=device)[:B * 12].reshape(B, 12).to(torch.int32)
    k, v = torch.randn(B, 2, Hk, D, device=device), torch.randn(B, 2, Hk, D, device=device)
    cs = torch.tensor([150, 15, 0], dtype=torch.int32, device=device)
    _, _, kc2, _ = _run(q, kc, vc, backend=backend, k=k, v=v, cache_seqlens=cs, block_table=bt, causal=True,
                        schedule="lean", num_ctas=3)
    assert torch.equal(kc2[bt[0, 150 // page], 150 % page], k[0, 0])
    assert torch.equal(kc2[bt[1, 16 // page], 16 % page], k[1, 1])


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["mqa_causal_window_softcap", "cache_batch_idx_d128", "d256"])
def test_masks_and_layouts(backend, case, device):
    _skip_unavailable(backend, device)
    kw = {}
    if case == "mqa_causal_window_softcap":
        B, Sq, H, Hk, D, S = 2, 3, 4, 1, 64, 140
        kw = dict(causal=True, window_size=(37, -1), softcap=2.5)
    elif case == "cache_batch_idx_d128":
        B, Sq, H, Hk, D, S = 2, 1, 6, 3, 128, 150
    else:
        B, Sq, H, Hk, D, S = 1, 1, 2, 2, 256, 70
    q = torch.randn(B, Sq, H, D, device=device)
    kc = torch.randn(B + 1, S, Hk, D, device=device)
    vc = torch.randn_like(kc)
    cs = torch.randint(1, S - Sq, (B,), device=device, dtype=torch.int32)
    k, v = torch.randn(B, Sq, Hk, D, device=device), torch.randn(B, Sq, Hk, D, device=device)
    idx = torch.randperm(B + 1, device=device)[:B].to(torch.int32)
    _run(q, kc, vc, backend=backend, k=k, v=v, cache_seqlens=cs, cache_batch_idx=idx, schedule="lean", num_ctas=2,
         **kw)


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_past_100k(backend, interleaved, device):
    """RoPE (positional.RoPE, fp32 angles) at positions past 100k; reference uses the same tables."""
    _skip_unavailable(backend, device)
    B, H, Hk, D = 1, 2, 1, 64
    L = 100_003
    q = torch.randn(B, 1, H, D, device=device)
    kc = torch.randn(B, L + 1, Hk, D, device=device)
    vc = torch.randn_like(kc)
    k, v = torch.randn(B, 1, Hk, D, device=device), torch.randn(B, 1, Hk, D, device=device)
    rope = RoPE(theta=10000.0, interleaved=interleaved)
    cs = torch.tensor([L], dtype=torch.int32, device=device)
    cos, sin = R.rope_cos_sin(torch.arange(L + 1, device=device), rope.inv_freq(D, device))
    _run(q, kc, vc, backend=backend, k=k, v=v, cache_seqlens=cs, position=rope, window_size=(300, 0),
         ref_kwargs=dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved))


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_object_per_batch(backend, device):
    _skip_unavailable(backend, device)
    B, H, Hk, D = 2, 4, 2, 64
    q = torch.randn(B, 1, H, D, device=device)
    kc = torch.randn(B, 90, Hk, D, device=device)
    vc = torch.randn_like(kc)
    slopes = torch.rand(B, H, device=device)
    cs = torch.tensor([90, 33], dtype=torch.int32, device=device)
    _run(q, kc, vc, backend=backend, cache_seqlens=cs, position=ALiBi(slopes), ref_kwargs=dict(alibi_slopes=slopes))
    _run(q, kc, vc, backend=backend, cache_seqlens=cs, position=ALiBi(),
         ref_kwargs=dict(alibi_slopes=R.alibi_slopes(H)))


# ------------------------------------------------------------------------------------------------
def _bad_inputs(device):
    B, H, Hk, D, S = 2, 4, 2, 32, 10
    q = torch.randn(B, 1, H, D, device=device)
    kc = torch.randn(B, S, Hk, D, device=device)
    vc = torch.randn_like(kc)
    k, v = torch.randn(B, 1, Hk, D, device=device), torch.randn(B, 1, Hk, D, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    bt = torch.tensor([[0, 1], [2, 9]], **i32)
    kp, vp = torch.randn(4, 8, Hk, D, device=device), torch.randn(4, 8, Hk, D, device=device)
    return [
        ("cache_seqlens", ValueError, (q, kc, vc), dict(cache_seqlens=torch.tensor([3, 11], **i32))),
        ("cache_seqlens", ValueError, (q, kc, vc, k, v), dict(cache_seqlens=torch.tensor([3, 10], **i32))),
        ("cache_seqlens", TypeError, (q, kc, vc), dict(cache_seqlens=torch.tensor([3, 4], device=device))),
        ("block_table", ValueError, (q, kp, vp, k, v), dict(cache_seqlens=torch.tensor([3, 9], **i32), block_table=bt)),
        ("k_cache", ValueError, (torch.randn(B, 1, 3, D, device=device), kc, vc), dict(cache_seqlens=3)),
        ("k, v", ValueError, (q, kc, vc, k), dict(cache_seqlens=3)),
        ("v", ValueError, (q, kc, vc, k, v[..., :16]), dict(cache_seqlens=3)),
        ("cache_leftpad", TypeError, (q, kc, vc, k, v), dict(cache_seqlens=3, cache_leftpad=torch.zeros(2, device=device,
                                                                                                   dtype=torch.int64))),
        ("cache_leftpad", ValueError, (q, kc, vc, k, v), dict(cache_seqlens=torch.tensor([3, 5], **i32),
                                                              cache_leftpad=torch.tensor([0, 6], **i32))),
        ("cache_leftpad", ValueError, (q, kc, vc, k, v), dict(cache_seqlens=3, cache_leftpad=torch.tensor([-1, 0], **i32))),
        ("cache_leftpad", ValueError, (q, kc, vc, k, v), dict(cache_seqlens=3, cache_leftpad=torch.zeros(3, **i32))),
        ("cache_leftpad", ValueError, (q, kp, vp, k, v), dict(cache_seqlens=torch.tensor([3, 5], **i32),
                                                              block_table=bt[:, :1], cache_leftpad=torch.zeros(2, **i32))),
        ("rotary_cos", ValueError, (q, kc, vc, k, v, torch.ones(5, 8, device=device), torch.ones(5, 8, device=device)),
         dict(cache_seqlens=6)),
        ("alibi_slopes", TypeError, (q, kc, vc), dict(cache_seqlens=3, alibi_slopes=torch.ones(H, device=device,
                                                                                               dtype=torch.float64))),
        ("schedule", ValueError, (q, kc, vc), dict(cache_seqlens=3, schedule="stream")),
        ("cache_batch_idx", ValueError, (q, kc, vc, k, v), dict(cache_seqlens=3, cache_batch_idx=torch.tensor([1, 1], **i32))),
        ("q", TypeError, (q.double(), kc, vc), dict(cache_seqlens=3)),
    ]


@pytest.mark.parametrize("i", range(17))
def test_bad_inputs_raise_before_any_write(i, device):
    name, exc, args, kw = _bad_inputs(device)[i]
    caches = [a.clone() for a in args[1:3]]
    with pytest.raises(exc, match=name.split(",")[0]):
        posattn.flash_attn_with_kvcache(*args, backend="torch", **kw)
    assert all(torch.equal(a, b) for a, b in zip(args[1:3], caches)), "cache written before the error"


@pytest.mark.interp
def test_reduce_kernel_needs_gpu(device):
    if device.type == "cuda":
        pytest.skip("the in-kernel reduction runs on a GPU; this checks the interpreter guard")
    _skip_unavailable("triton", device)
    q = torch.randn(1, 1, 2, 32)
    kc = torch.randn(1, 10, 2, 32)
    with pytest.raises(ValueError, match="reduce"):
        posattn.flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=5, backend="triton", reduce="kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["lean", "split"])
def test_gpu_in_kernel_reduction_matches_separate(schedule, device):
    """On a GPU: flag-synchronised host reduction gives the same result as the separate pass."""
    B, H, Hk, D = 2, 32, 8, 128
    q = torch.randn(B, 1, H, D, device=device, dtype=torch.bfloat16)
    kc = torch.randn(B, 20000, Hk, D, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    cs = torch.tensor([19999, 7000], dtype=torch.int32, device=device)
    a = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, backend="triton", schedule=schedule,
                                        reduce="separate")
    b = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, backend="triton", schedule=schedule,
                                        reduce="kernel")
    ro, _ = R.kvcache_attention(q, kc, vc, cs)
    assert_close(b, ro, torch.bfloat16)
    assert (a.float() - b.float()).abs().max().item() <= 1e-2


def test_schedule_block_n_matches_kernel():
    # the launcher and the simulator share default_block_n; a CTA count above the tiles is allowed
    s = lean_schedule([5], num_heads_k=1, block_n=default_block_n(64), num_ctas=9)
    assert s.num_tiles == 1 and s.loads().count(1) == 1


# ------------------------------------------------------------------------------------------------
# backend "cuda": csrc/lean_decode.cu through posattn._cuda.lean_decode_cuda (explicit only). The gpu tests
# compare with the float64 reference on CUDA tensors; not yet run on a GPU at the time of writing.
# ------------------------------------------------------------------------------------------------
HALF = [torch.float16, torch.bfloat16]


def _decode_case(device, *, dtype=torch.float16, B=2, Sq=1, H=4, Hk=2, D=64, S=40, kc=None, vc=None):
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=dtype) if kc is None else kc
    vc = torch.randn(B, S, Hk, D, device=device, dtype=dtype) if vc is None else vc
    k = torch.randn(B, Sq, Hk, D, device=device, dtype=dtype)
    v = torch.randn(B, Sq, Hk, D, device=device, dtype=dtype)
    cs = torch.tensor([S - 2 * Sq, 5][:B], dtype=torch.int32, device=device)
    return q, kc, vc, k, v, cs


@pytest.mark.parametrize("kw", [{}, dict(causal=True), dict(window_size=(-1, 0)), dict(alibi_slopes="slopes"),
                                dict(position="rope"), dict(cache_batch_idx="idx")],
                         ids=["plain", "causal", "causal_window", "alibi", "rope", "cache_batch_idx"])
def test_cuda_backend_on_cpu_tensors_raises(kw):
    """Supported options pass the argument checks and then fail on the device (CPU tensors), before any write."""
    q, kc, vc, k, v, cs = _decode_case("cpu")
    kw = dict(kw)
    if kw.get("alibi_slopes") == "slopes":
        kw["alibi_slopes"] = torch.rand(q.shape[2])
    if kw.get("position") == "rope":
        kw["position"] = RoPE()
    if kw.get("cache_batch_idx") == "idx":
        kw["cache_batch_idx"] = torch.tensor([1, 0], dtype=torch.int32)
    before = kc.clone(), vc.clone()
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, backend="cuda", **kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), "cache written before the error"


def _cuda_bad_cases():
    f16 = dict(dtype=torch.float16)
    B, S, Hk, D = 2, 40, 2, 64
    misaligned = torch.randn(B * S * Hk * D + 1, **f16)[1:].view(B, S, Hk, D)    # data 2 bytes past 16
    return [
        ("q", TypeError, dict(dtype=torch.float32), {}),
        ("q", ValueError, dict(D=32), {}),
        ("softcap", ValueError, {}, dict(softcap=1.5)),
        ("window_size", ValueError, {}, dict(window_size=(16, -1))),
        ("window_size", ValueError, {}, dict(window_size=(-1, 3))),
        ("window_size", ValueError, {}, dict(window_size=(8, 0), causal=True)),
        ("k_cache", ValueError, dict(kc=torch.randn(B, S, Hk, 2 * D, **f16)[..., ::2]), {}),   # last stride 2
        ("v_cache", ValueError, dict(vc=torch.randn(B, S, Hk, D + 4, **f16)[..., :D]), {}),   # stride 68
        ("k_cache", ValueError, dict(kc=misaligned), {}),
    ]


@pytest.mark.parametrize("i", range(9))
def test_cuda_unsupported_options_raise_before_any_write(i):
    """What the CUDA kernel lacks is a ValueError/TypeError naming the argument (checked without a device)."""
    name, exc, case_kw, call_kw = _cuda_bad_cases()[i]
    q, kc, vc, k, v, cs = _decode_case("cpu", **case_kw)
    before = kc.clone(), vc.clone()
    with pytest.raises(exc, match=f"{name}: backend='cuda'"):
        posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, backend="cuda", **call_kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), "cache written before the error"


def test_auto_never_offers_cuda(monkeypatch):
    """Policy: "cuda" is registered (last) but not a candidate of backend="auto" (not yet run on a GPU)."""
    from posattn import _backends, ops_registry
    assert ops_registry.OPS["kvcache_decode"][1][-1] == "cuda"
    seen = {}
    real = _backends.resolve

    def spy(backend, device, *, supported, op):
        seen[backend] = tuple(supported)
        return real(backend, device, supported=supported, op=op)

    monkeypatch.setattr(_backends, "resolve", spy)
    q, kc, vc, _, _, cs = _decode_case("cpu", dtype=torch.float32)
    posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        posattn.flash_attn_with_kvcache(q.half(), kc.half(), vc.half(), cache_seqlens=cs, backend="cuda")
    assert "cuda" not in seen["auto"] and "cuda" in seen["cuda"]


@pytest.mark.gpu
def test_gpu_auto_does_not_use_cuda_kernel(monkeypatch, device):
    from posattn import _backends, _cuda

    def boom(*a, **k):
        raise AssertionError("backend='auto' called the CUDA C++ decode kernel")

    monkeypatch.setattr(_cuda, "lean_decode_cuda", boom)
    monkeypatch.setattr(_backends, "triton_available", lambda dev: False)
    q, kc, vc, k, v, cs = _decode_case(device)
    _run(q, kc, vc, backend="auto", k=k, v=v, cache_seqlens=cs)


def _spy_inv_freq(monkeypatch):
    """Record, per launch, whether q was rotated inside the CUDA kernel (inv_freq given)."""
    from posattn import _cuda
    seen = []
    real = _cuda.lean_decode_cuda

    def spy(*a, **k):
        seen.append(k.get("inv_freq") is not None)
        return real(*a, **k)

    monkeypatch.setattr(_cuda, "lean_decode_cuda", spy)
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("schedule", ["lean", "split", "single"])
def test_gpu_cuda_append_rotary_tables_gqa_alibi(dtype, schedule, monkeypatch, device):
    """Append (k rotated from tables), GQA 8/2, ALiBi, interleaved tables: q is rotated on the host."""
    seen = _spy_inv_freq(monkeypatch)
    B, H, Hk, D, S = 3, 8, 2, 64, 200
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    k, v = torch.randn(B, 1, Hk, D, device=device, dtype=dtype), torch.randn(B, 1, Hk, D, device=device, dtype=dtype)
    ang = torch.rand(S + 1, 16, device=device) * 6
    cos, sin = ang.cos(), ang.sin()
    cs = torch.tensor([129, 0, 57], dtype=torch.int32, device=device)
    slopes = torch.rand(H, device=device)
    _, _, kc2, vc2 = _run(q, kc, vc, backend="cuda", k=k, v=v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cs,
                          alibi_slopes=slopes, schedule=schedule, num_splits=3, num_ctas=4)
    assert seen == [False]
    for b, L in enumerate(cs.tolist()):
        kr = R._kv_rotate(k[b], cos[L:L + 1], sin[L:L + 1], True)
        assert_close(kc2[b, L], kr[0], dtype, name="appended k")
        assert torch.equal(vc2[b, L], v[b, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 7, None])
def test_gpu_cuda_ragged_grid_sizes(D, G, device):
    """Lengths 0, 1, BLOCK_N - 1, BLOCK_N + 1, 2 BLOCK_N + 5; the result does not depend on the grid."""
    from posattn import _cuda
    bn = _cuda.lean_decode_tile_sizes(D)[1]
    lens = [0, 1, bn - 1, bn + 1, 2 * bn + 5]
    q = torch.randn(len(lens), 1, 4, D, device=device, dtype=torch.float16)
    kc = torch.randn(len(lens), 2 * bn + 8, 2, D, device=device, dtype=torch.float16)
    vc = torch.randn_like(kc)
    cs = torch.tensor(lens, dtype=torch.int32, device=device)
    o, lse, _, _ = _run(q, kc, vc, backend="cuda", cache_seqlens=cs, schedule="lean", num_ctas=G)
    o1, _, _, _ = _run(q, kc, vc, backend="cuda", cache_seqlens=cs, schedule="lean", num_ctas=1)
    assert (o.float() - o1.float()).abs().max().item() <= 2e-3
    assert torch.equal(o[0], torch.zeros_like(o[0])) and bool((lse[0] == -math.inf).all())


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("D", [128, 256])
def test_gpu_cuda_rope_in_kernel_past_70k(interleaved, D, monkeypatch, device):
    """RoPE object, causal, seqlen_new == seqlen_q: q rotated inside the kernel from inv_freq."""
    seen = _spy_inv_freq(monkeypatch)
    B, Sq, H, Hk = 2, 2, 8, 2
    lens = [70_001, 517]
    S = max(lens) + Sq
    q = torch.randn(B, Sq, H, D, device=device, dtype=torch.bfloat16)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k, v = torch.randn_like(kc[:, :Sq]), torch.randn_like(kc[:, :Sq])
    rope = RoPE(theta=10000.0, interleaved=interleaved)
    cos, sin = R.rope_cos_sin(torch.arange(S, device=device), rope.inv_freq(D, device))
    cs = torch.tensor(lens, dtype=torch.int32, device=device)
    _run(q, kc, vc, backend="cuda", k=k, v=v, cache_seqlens=cs, position=rope, causal=True,
         ref_kwargs=dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved))
    assert seen == [True]


@pytest.mark.gpu
def test_gpu_cuda_rope_flash_rule_rotates_on_host(monkeypatch, device):
    """Non-causal, no append: FlashAttention puts q at cache_seqlens, not at its attention position."""
    seen = _spy_inv_freq(monkeypatch)
    B, H, Hk, D, S = 2, 4, 4, 64, 300
    q = torch.randn(B, 1, H, D, device=device, dtype=torch.float16)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=torch.float16)
    vc = torch.randn_like(kc)
    rope = RoPE(theta=500.0)
    cos, sin = R.rope_cos_sin(torch.arange(S + 1, device=device), rope.inv_freq(D, device))
    cs = torch.tensor([S, 77], dtype=torch.int32, device=device)
    _run(q, kc, vc, backend="cuda", cache_seqlens=cs, position=rope,
         ref_kwargs=dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False))
    assert seen == [False]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["paged", "cache_batch_idx"])
def test_gpu_cuda_paged_and_cache_batch_idx(layout, device):
    dt = torch.float16
    if layout == "paged":
        B, Sq, H, Hk, D, page, nblk = 3, 2, 4, 2, 128, 16, 40
        q = torch.randn(B, Sq, H, D, device=device, dtype=dt)
        kc = torch.randn(nblk, page, Hk, D, device=device, dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nblk, device=device)[:B * 12].reshape(B, 12).to(torch.int32)
        k, v = torch.randn(B, Sq, Hk, D, device=device, dtype=dt), torch.randn(B, Sq, Hk, D, device=device, dtype=dt)
        cs = torch.tensor([150, 15, 0], dtype=torch.int32, device=device)
        _, _, kc2, _ = _run(q, kc, vc, backend="cuda", k=k, v=v, cache_seqlens=cs, block_table=bt, causal=True,
                            schedule="lean", num_ctas=3)
        assert torch.equal(kc2[bt[0, 150 // page], 150 % page], k[0, 0])
    else:
        B, Sq, H, Hk, D, S = 2, 1, 6, 3, 128, 150
        q = torch.randn(B, Sq, H, D, device=device, dtype=dt)
        kc = torch.randn(B + 1, S, Hk, D, device=device, dtype=dt)
        vc = torch.randn_like(kc)
        k, v = torch.randn(B, Sq, Hk, D, device=device, dtype=dt), torch.randn(B, Sq, Hk, D, device=device, dtype=dt)
        cs = torch.tensor([140, 3], dtype=torch.int32, device=device)
        idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
        _, _, kc2, _ = _run(q, kc, vc, backend="cuda", k=k, v=v, cache_seqlens=cs, cache_batch_idx=idx,
                            schedule="split", num_splits=2)
        assert torch.equal(kc2[2, 140], k[0, 0]) and torch.equal(kc2[1], kc[1])


@pytest.mark.gpu
def test_gpu_cuda_alibi_object_mqa(device):
    B, H, Hk, D = 2, 4, 1, 64
    q = torch.randn(B, 1, H, D, device=device, dtype=torch.bfloat16)
    kc = torch.randn(B, 90, Hk, D, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    slopes = torch.rand(B, H, device=device)
    cs = torch.tensor([90, 33], dtype=torch.int32, device=device)
    _run(q, kc, vc, backend="cuda", cache_seqlens=cs, position=ALiBi(slopes), ref_kwargs=dict(alibi_slopes=slopes))
    _run(q, kc, vc, backend="cuda", cache_seqlens=cs, position=ALiBi(),
         ref_kwargs=dict(alibi_slopes=R.alibi_slopes(H)))


@pytest.mark.gpu
def test_gpu_cuda_grid_limits_raise_before_any_write(device):
    """num_ctas above _C.lean_decode_max_ctas, or a single/split grid larger than it: ValueError, cache intact."""
    from posattn import _backends
    m = int(_backends.load_C().lean_decode_max_ctas(64, "float16"))
    q, kc, vc, k, v, cs = _decode_case(device)
    before = kc.clone()
    with pytest.raises(ValueError, match="num_ctas"):
        posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, backend="cuda", num_ctas=m + 1)
    B, Hk = m // 8 + 1, 8                      # one KV tile per (b, kv head): single grid = B * 8 > m CTAs
    q2 = torch.randn(B, 1, Hk, 64, device=device, dtype=torch.float16)
    kc2 = torch.randn(B, 8, Hk, 64, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="schedule"):
        posattn.flash_attn_with_kvcache(q2, kc2, kc2.clone(), cache_seqlens=4, backend="cuda", schedule="single")
    assert torch.equal(kc, before)


def _emulate_lean_decode(calls):
    """A float64 CPU stand-in for ``_cuda.lean_decode_cuda`` written from its documented contract (docs/INTERNALS.md
    "CUDA launchers"): query i of batch b at ``seqlens_k[b] - seqlen_q + i``, RoPE on q there from ``inv_freq``
    (fp32 angles), paged keys via ``block_table``, causal ``j <= pq``, ALiBi ``-slope |pk - pq|``, empty batches
    out 0 / lse -inf. It checks the wiring of backend "cuda", not the CUDA kernel."""
    from posattn import _cuda

    def fake(q, k_cache, v_cache, seqlens_k, schedule, *, softmax_scale=None, causal=False, block_table=None,
             alibi_slopes=None, inv_freq=None, rotary_interleaved=False, out=None, lse=None, workspace=None):
        B, N, H, D = q.shape
        Hk = k_cache.shape[2]
        g = H // Hk
        lens = seqlens_k.tolist()
        assert seqlens_k.dtype == torch.int32 and out is not None and lse is not None
        bn = _cuda.lean_decode_tile_sizes(D)[1]
        n_m = -(-(N * g) // 16)
        want_tiles = sum(Hk * n_m * -(-L // bn) for L in lens)
        assert schedule.num_tiles == want_tiles, "schedule not built with the kernel's tile sizes"
        calls.append(dict(num_ctas=schedule.num_ctas, inv_freq=inv_freq is not None, causal=causal,
                          block_table=None if block_table is None else block_table.clone()))
        for b, L in enumerate(lens):
            if L == 0:
                out[b], lse[b] = 0, -math.inf
                continue
            j = torch.arange(L)
            if block_table is not None:
                page = k_cache.shape[1]
                blk = block_table[b].long()[j // page]
                kk, vv = k_cache[blk, j % page], v_cache[blk, j % page]
            else:
                kk, vv = k_cache[b, :L], v_cache[b, :L]
            kk = kk.double().repeat_interleave(g, dim=1)
            vv = vv.double().repeat_interleave(g, dim=1)
            pq = L - N + torch.arange(N)
            qq = q[b].double()
            if inv_freq is not None:
                ang = pq.float()[:, None] * inv_freq.float()[None, :]
                qq = R.apply_rotary(qq, ang.cos().double()[:, None], ang.sin().double()[:, None], rotary_interleaved)
            s = torch.einsum("nhd,jhd->hnj", qq, kk) * softmax_scale
            if alibi_slopes is not None:
                sl = (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes).double()
                s = s - sl[:, None, None] * (pq[:, None] - j[None, :]).abs().double()
            if causal:
                s = s.masked_fill(j[None, :] > pq[:, None], -math.inf)
            out[b] = torch.einsum("hnj,jhd->nhd", s.softmax(-1), vv).to(out.dtype)
            lse[b] = s.logsumexp(-1).float()
        return out, lse

    return fake


class _FakeC:
    """posattn._C with a device-free ``lean_decode_max_ctas`` (the real one needs a GPU)."""

    def __init__(self, max_ctas):
        import importlib
        self._real = importlib.import_module("posattn._C")
        self.max_ctas = max_ctas

    def lean_decode_max_ctas(self, head_dim, dtype):
        assert dtype in ("float16", "bfloat16")
        return self.max_ctas

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def emulated_cuda(monkeypatch):
    """backend="cuda" on CPU tensors with the kernel replaced by ``_emulate_lean_decode``."""
    pytest.importorskip("posattn._C")
    from posattn import _backends, _cuda
    calls = []
    fake_c = _FakeC(max_ctas=6)
    monkeypatch.setattr(_backends, "cuda_ext_available", lambda dev: True)
    monkeypatch.setattr(_backends, "load_C", lambda build=True: fake_c)
    monkeypatch.setattr(_cuda, "lean_decode_cuda", _emulate_lean_decode(calls))
    return calls


@pytest.mark.parametrize("case", ["tables_alibi_gqa", "rope_in_kernel_causal", "rope_flash_rule", "paged_causal",
                                  "cache_batch_idx_alibi_obj", "ragged_empty_split", "window_causal_mqa_single"])
def test_cuda_wiring_emulated(case, emulated_cuda):
    """The op's "cuda" path (arguments, RoPE position rule, cache_batch_idx as pages, schedule, CTA cap) against
    the float64 reference, with the kernel emulated on CPU from its contract. Not a test of the CUDA kernel."""
    dt = torch.float16
    B, Sq, H, Hk, D, S = 3, 1, 8, 2, 64, 150
    kw, ref_kw, sched_kw = {}, {}, dict(schedule="lean")
    expect_inv, bt = False, None
    lens = [129, 0, 57]
    if case == "rope_in_kernel_causal":
        Sq, D, S, lens = 2, 128, 300, [290, 3, 0]
        rope = RoPE(theta=10000.0, interleaved=False)
        cos, sin = R.rope_cos_sin(torch.arange(S), rope.inv_freq(D, "cpu"))
        kw = dict(position=rope, causal=True)
        ref_kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)
        expect_inv = True
    elif case == "rope_flash_rule":   # Sq = 2 non-causal: FlashAttention rotates every q at cache_seqlens
        Sq, lens = 2, [100, 7, 31]
        rope = RoPE(theta=1000.0, interleaved=True, rotary_dim=32)
        cos, sin = R.rope_cos_sin(torch.arange(S), rope.inv_freq(D, "cpu"))
        kw = dict(position=rope)
        ref_kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True)
    elif case == "tables_alibi_gqa":
        ang = torch.rand(S, 16) * 6
        kw = dict(rotary_cos=ang.cos(), rotary_sin=ang.sin(), alibi_slopes=torch.rand(H))
        sched_kw = dict(schedule="lean", num_ctas=4)
    elif case == "ragged_empty_split":
        H, Hk, D, lens = 4, 1, 256, [0, 1, 65, 129]     # MQA; 4 split CTAs <= the emulated cap of 6
        B = 4
        sched_kw = dict(schedule="split", num_splits=2)
    elif case == "window_causal_mqa_single":
        Sq, Hk, lens = 3, 1, [40, 120, 9]
        kw = dict(window_size=(-1, 0))
        sched_kw = dict(schedule="single")
    q = torch.randn(B, Sq, H, D, dtype=dt)
    if case == "paged_causal":
        page, nblk = 16, 40
        kc = torch.randn(nblk, page, Hk, D, dtype=dt)
        bt = torch.randperm(nblk)[:B * 12].reshape(B, 12).to(torch.int32)
        kw = dict(block_table=bt, causal=True)
        Sq, lens = 2, [150, 15, 0]
        q = torch.randn(B, Sq, H, D, dtype=dt)
    else:
        kc = torch.randn(B + 1, S, Hk, D, dtype=dt)
    if case == "cache_batch_idx_alibi_obj":
        idx = torch.tensor([3, 0, 2], dtype=torch.int32)
        slopes = torch.rand(B, H)
        kw = dict(cache_batch_idx=idx, position=ALiBi(slopes))
        ref_kw = dict(alibi_slopes=slopes)
    elif case != "paged_causal":
        kc = kc[:B]
    vc = torch.randn_like(kc)
    k, v = torch.randn(B, Sq, Hk, D, dtype=dt), torch.randn(B, Sq, Hk, D, dtype=dt)
    cs = torch.tensor([L - Sq if L >= Sq else 0 for L in lens], dtype=torch.int32) if case != "ragged_empty_split" \
        else torch.tensor(lens, dtype=torch.int32)
    append = {} if case in ("ragged_empty_split", "rope_flash_rule") else dict(k=k, v=v)
    o, lse, kc2, vc2 = _run(q, kc, vc, backend="cuda", cache_seqlens=cs, ref_kwargs=ref_kw, **append, **kw, **sched_kw)
    (call,) = emulated_cuda
    assert call["inv_freq"] == expect_inv
    assert call["num_ctas"] <= 6, "grid above _C.lean_decode_max_ctas"
    assert call["causal"] == (kw.get("causal", False) or kw.get("window_size") == (-1, 0))
    if case == "cache_batch_idx_alibi_obj":
        assert torch.equal(call["block_table"], idx[:, None])
        assert torch.equal(kc2[1], kc[1]), "a cache row no sequence owns was written"
    if case == "ragged_empty_split":
        assert torch.equal(o[0], torch.zeros_like(o[0])) and bool((lse[0] == -math.inf).all())


def test_cuda_num_ctas_over_device_limit_emulated(emulated_cuda):
    q, kc, vc, k, v, cs = _decode_case("cpu")
    before = kc.clone()
    with pytest.raises(ValueError, match="num_ctas: backend='cuda'"):
        posattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, backend="cuda", num_ctas=7)
    q2 = torch.randn(4, 1, 4, 64, dtype=torch.float16)                     # 4 x 2 output tiles, one CTA each
    kc2 = torch.randn(4, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="schedule: 'single'"):
        posattn.flash_attn_with_kvcache(q2, kc2, kc2.clone(), cache_seqlens=5, backend="cuda", schedule="single")
    assert torch.equal(kc, before) and not emulated_cuda


# ------------------------------------------------------------------------------------------------
# cache_leftpad (FlashAttention semantics: keys [leftpad, cache_seqlens), positions count from the pad)
# ------------------------------------------------------------------------------------------------
_LEFTPAD_CASES = [("torch", "lean", torch.float32), ("torch", "lean", torch.bfloat16),
                  ("triton", "lean", torch.float16), ("triton", "split", torch.bfloat16),
                  ("triton", "single", torch.float32)]


@pytest.mark.interp
@pytest.mark.parametrize("backend,schedule,dtype", _LEFTPAD_CASES)
def test_leftpad_append_rotary_alibi(backend, schedule, dtype, device):
    """Ragged left pads (0, == cache_seqlens, lengths off the block size) with append, causal, GQA, RoPE
    (NeoX) and ALiBi vs the reference; NaN poisoned into the pad and past the valid keys must not leak."""
    _skip_unavailable(backend, device)
    B, Sq, H, Hk, D, S = 4, 2, 4, 2, 32, 150
    i32 = dict(dtype=torch.int32, device=device)
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    k, v = torch.randn(B, Sq, Hk, D, device=device, dtype=dtype), torch.randn(B, Sq, Hk, D, device=device, dtype=dtype)
    cs = torch.tensor([140, 37, 1, 60], **i32)
    pad = torch.tensor([3, 37, 0, 59], **i32)
    for b, (L, P) in enumerate(zip(cs.tolist(), pad.tolist())):
        kc[b, :P] = float("nan")
        vc[b, :P] = float("nan")
        kc[b, L + Sq:] = float("nan")
        vc[b, L + Sq:] = float("nan")
    ang = torch.rand(S, 8, device=device) * 6
    cos, sin = ang.cos(), ang.sin()
    slopes = torch.rand(B, H, device=device)
    _, _, kc2, vc2 = _run(q, kc, vc, backend=backend, dtype=dtype, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                          rotary_interleaved=False, cache_seqlens=cs, cache_leftpad=pad, causal=True,
                          alibi_slopes=slopes, schedule=schedule, num_splits=2, num_ctas=3)
    for b, (L, P) in enumerate(zip(cs.tolist(), pad.tolist())):
        # appended at cache index L, rotated at position L - P
        kr = R._kv_rotate(k[b], cos[L - P:L - P + Sq], sin[L - P:L - P + Sq], False)
        assert_close(kc2[b, L:L + Sq], kr, dtype, name="appended k")
        assert torch.equal(vc2[b, L:L + Sq], v[b])
        assert torch.equal(kc2[b, P:L], kc[b, P:L])


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_equals_shifted_cache(backend, device):
    """A left-padded cache gives the same result as the same keys moved to index 0 without a pad
    (independent of the reference): window, RoPE (interleaved), ALiBi, cache_batch_idx, seqlen_q 3."""
    _skip_unavailable(backend, device)
    B, Sq, H, Hk, D, S = 3, 3, 6, 2, 64, 200
    i32 = dict(dtype=torch.int32, device=device)
    q = torch.randn(B, Sq, H, D, device=device, dtype=torch.float16)
    kc = torch.randn(B, S, Hk, D, device=device, dtype=torch.float16)
    vc = torch.randn_like(kc)
    cs = torch.tensor([190, 130, 4], **i32)
    pad = torch.tensor([61, 1, 3], **i32)
    cbi = torch.tensor([2, 0, 1], **i32)
    ks, vs = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    for b, (L, P) in enumerate(zip(cs.tolist(), pad.tolist())):
        r = int(cbi[b])
        kc[r, :P] = float("nan")
        ks[r, :L - P], vs[r, :L - P] = kc[r, P:L], vc[r, P:L]
    ang = torch.rand(S, 16, device=device) * 6
    kw = dict(rotary_cos=ang.cos(), rotary_sin=ang.sin(), window_size=(40, 1), alibi_slopes=torch.rand(H, device=device),
              cache_batch_idx=cbi, backend=backend, return_softmax_lse=True, num_ctas=4)
    o1, l1 = posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, cache_leftpad=pad, **kw)
    o2, l2 = posattn.flash_attn_with_kvcache(q, ks, vs, cache_seqlens=cs - pad, **kw)
    assert torch.isfinite(o1).all()
    assert_close(o1, o2.float(), torch.float16)
    assert_close(l1, l2, torch.float16, name="lse")


@pytest.mark.interp
@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_all_padding_is_empty(backend, device):
    """leftpad == cache_seqlens and no append: no key, so out 0 and lse -inf for that sequence only."""
    _skip_unavailable(backend, device)
    q = torch.randn(2, 1, 2, 32, device=device)
    kc = torch.randn(2, 20, 2, 32, device=device)
    vc = torch.randn_like(kc)
    kc[0, :9] = float("nan")
    cs = torch.tensor([9, 17], dtype=torch.int32, device=device)
    pad = torch.tensor([9, 16], dtype=torch.int32, device=device)
    o, lse, _, _ = _run(q, kc, vc, backend=backend, cache_seqlens=cs, cache_leftpad=pad)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and bool((lse[0] == -math.inf).all())
    assert bool(torch.isfinite(lse[1]).all())


def test_leftpad_cuda_backend_refused(device):
    q = torch.randn(1, 1, 2, 64, device=device, dtype=torch.float16)
    kc = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
    vc = kc.clone()
    with pytest.raises(ValueError, match="cache_leftpad"):
        posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5, backend="cuda",
                                        cache_leftpad=torch.ones(1, dtype=torch.int32, device=device))
