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
        ("cache_leftpad", NotImplementedError, (q, kc, vc), dict(cache_seqlens=3, cache_leftpad=torch.zeros(2, **i32))),
        ("rotary_cos", ValueError, (q, kc, vc, k, v, torch.ones(5, 8, device=device), torch.ones(5, 8, device=device)),
         dict(cache_seqlens=6)),
        ("alibi_slopes", TypeError, (q, kc, vc), dict(cache_seqlens=3, alibi_slopes=torch.ones(H, device=device,
                                                                                               dtype=torch.float64))),
        ("schedule", ValueError, (q, kc, vc), dict(cache_seqlens=3, schedule="stream")),
        ("cache_batch_idx", ValueError, (q, kc, vc, k, v), dict(cache_seqlens=3, cache_batch_idx=torch.tensor([1, 1], **i32))),
        ("q", TypeError, (q.double(), kc, vc), dict(cache_seqlens=3)),
    ]


@pytest.mark.parametrize("i", range(13))
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
