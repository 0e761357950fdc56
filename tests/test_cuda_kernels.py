"""CUDA C++ kernels of posattn._C (through posattn._cuda) vs the float64 reference, on a GPU.

Marked ``gpu``: skipped without CUDA (conftest). Not yet run on a GPU at the time of writing.
Fresh random inputs (seeded per test id), outputs poisoned with NaN, per-dtype tolerances from
tests/tolerances.py.
"""
import math

import pytest
import torch

from posattn import reference, scheduling
from tolerances import assert_close, poison_like

pytestmark = pytest.mark.gpu

HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def cu():
    from posattn import _cuda
    return _cuda


# ---- apply_rotary ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 32), (40, 24), (72, 16)])
def test_rotary(cu, device, dtype, interleaved, head_dim, rotary_dim):
    B, S, H = 2, 17, 3
    x = torch.randn(B, S, H, head_dim, device=device, dtype=dtype)
    inv = reference.rope_inv_freq(rotary_dim, rotary_dim=rotary_dim).to(device)
    pos = torch.arange(S + 5, device=device, dtype=torch.float32)
    ang = pos[:, None] * inv.float()[None]
    cos, sin = ang.cos(), ang.sin()
    want = reference.apply_rotary(x.double(), cos[:S, None].double(), sin[:S, None].double(), interleaved)
    out = poison_like(x)
    got = cu.apply_rotary_cuda(x, cos, sin, interleaved=interleaved, out=out)
    assert got is out
    assert_close(got, want, dtype)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:]), "pass-through dims must be bit-exact"
    back = cu.apply_rotary_cuda(got.float().to(dtype), cos, sin, interleaved=interleaved, conj=True)
    assert_close(back, reference.apply_rotary(want, cos[:S, None].double(), -sin[:S, None].double(), interleaved), dtype)
    # position_ids and strided (non-contiguous) input, in place
    pid = torch.randint(0, S + 5, (B, S), device=device, dtype=torch.int32)
    xs = torch.randn(B, H, S, head_dim, device=device, dtype=dtype).transpose(1, 2)
    want2 = reference.apply_rotary(xs.double(), cos[pid.long()][:, :, None].double(), sin[pid.long()][:, :, None].double(),
                                   interleaved)
    got2 = cu.apply_rotary_cuda(xs, cos, sin, interleaved=interleaved, position_ids=pid, out=xs)
    assert got2 is xs
    assert_close(xs, want2, dtype)


# ---- unpad / gather / scatter ------------------------------------------------------------------

@pytest.mark.parametrize("batch,seqlen", [(1, 1), (3, 17), (5, 97), (33, 40)])
def test_unpad_gather_scatter(cu, device, batch, seqlen):
    mask = torch.rand(batch, seqlen, device=device) > 0.4  # holes allowed
    mask[0] = False  # an empty sequence
    if batch > 2:
        mask[2] = True  # a full one
    x = torch.randn(batch, seqlen, 3, 8, device=device, dtype=torch.float16)
    want_x, want_idx, want_cu, want_max, want_lens = reference.unpad_input(x, mask)
    idx, cu_seqlens, lens, max_len, total = cu.unpad_index_cuda(mask)
    assert torch.equal(idx, want_idx) and torch.equal(cu_seqlens, want_cu) and torch.equal(lens, want_lens)
    assert max_len == want_max and total == want_idx.numel()
    packed = cu.gather_rows_cuda(x.flatten(0, 1), idx, out=torch.full((total, 3, 8), float("nan"), device=device,
                                                                       dtype=torch.float16))
    assert torch.equal(packed, want_x)
    padded = cu.scatter_rows_cuda(packed, idx, num_rows=batch * seqlen).view_as(x)
    assert torch.equal(padded, reference.pad_input(packed, idx, batch, seqlen))
    odd = torch.randn(batch * seqlen, 3, device=device)[:, :3]  # 12-byte rows: the byte-wise path
    assert torch.equal(cu.gather_rows_cuda(odd, idx), odd[idx])


# ---- short-sequence varlen attention --------------------------------------------------------------

def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", ["none", "alibi", "relative", "t5"])
def test_varlen_attention(cu, device, dtype, head_dim, causal, bias):
    lens_q, lens_k = [1, 17, 0, 113], [5, 17, 3, 97]
    H, Hk = 6, 2
    cq, ck = _cu(lens_q, device), _cu(lens_k, device)
    q = torch.randn(sum(lens_q), H, head_dim, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), Hk, head_dim, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), Hk, head_dim, device=device, dtype=dtype)
    kw, position = {}, None
    from posattn import positional
    if bias == "alibi":
        slopes = reference.alibi_slopes(H).float().to(device)
        kw = dict(bias_mode=1, alibi_slopes=slopes)
        position = positional.ALiBi(slopes)
    elif bias == "relative":
        table = torch.randn(H, 2 * 8 + 1, device=device)
        kw = dict(bias_mode=2, bias_table=table, max_distance=8)
        position = positional.RelativeBias(table, max_distance=8)
    elif bias == "t5":
        table = torch.randn(32, H, device=device)
        kw = dict(bias_mode=3, bias_table=table, max_distance=128, num_buckets=32, bidirectional=not causal)
        position = positional.T5Bias(table, num_buckets=32, max_distance=128, bidirectional=not causal)
    out, lse = poison_like(q), torch.full((H, q.shape[0]), float("nan"), device=device)
    got, got_lse = cu.varlen_attention_fwd_cuda(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                                out=out, lse=lse, **kw)
    assert got is out and got_lse is lse
    want, want_lse = reference.varlen_attention(q, k, v, cq, ck, causal=causal, position=position)
    assert_close(got, want, dtype)
    assert_close(got_lse, want_lse, torch.float32, name="lse")


# ---- LeanAttention decode ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_ctas", [1, 3, 7, 64])
def test_lean_decode(cu, device, dtype, head_dim, num_ctas):
    B, H, Hk, Sq, S_cache = 4, 8, 2, 1, 700
    seqlens = [1, 0, 333, 700]  # ragged, an empty cache, S < block_n, S spanning many tiles
    q = torch.randn(B, Sq, H, head_dim, device=device, dtype=dtype)
    kc = torch.randn(B, S_cache, Hk, head_dim, device=device, dtype=dtype)
    vc = torch.randn(B, S_cache, Hk, head_dim, device=device, dtype=dtype)
    bm, bn = cu.lean_decode_tile_sizes(head_dim)
    n_m = math.ceil(Sq * (H // Hk) / bm)
    sched = scheduling.lean_schedule(seqlens, num_heads_k=Hk, block_n=bn, num_m_blocks=n_m, num_ctas=num_ctas)
    seq_t = torch.tensor(seqlens, dtype=torch.int32, device=device)
    slopes = reference.alibi_slopes(H).float().to(device)
    out, lse = poison_like(q), torch.full((B, H, Sq), float("nan"), device=device)
    for _ in range(2):  # a second call reuses the flags with the next epoch, no memset
        got, got_lse = cu.lean_decode_cuda(q, kc, vc, seq_t, sched, alibi_slopes=slopes, out=out, lse=lse)
    assert got is out
    want, want_lse = reference.kvcache_attention(q, kc, vc, seq_t, alibi_slopes=slopes)
    assert_close(got, want, dtype)
    assert_close(got_lse, want_lse, torch.float32, name="lse")


@pytest.mark.parametrize("dtype", HALF)
def test_lean_decode_paged_rope_gqa_multi_query(cu, device, dtype):
    B, H, Hk, Sq, D, page = 3, 12, 3, 2, 128, 64
    seqlens = [130, 64, 257]
    blocks = torch.randperm(16, device=device)[:15].to(torch.int32).reshape(B, 5)  # (3, 5) of 16 pages
    kc = torch.randn(16, page, Hk, D, device=device, dtype=dtype)
    vc = torch.randn(16, page, Hk, D, device=device, dtype=dtype)
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    inv = reference.rope_inv_freq(D, rotary_dim=64).float().to(device)
    bm, bn = cu.lean_decode_tile_sizes(D)
    sched = scheduling.lean_schedule(seqlens, num_heads_k=Hk, block_n=bn,
                                     num_m_blocks=math.ceil(Sq * (H // Hk) / bm), num_ctas=5)
    seq_t = torch.tensor(seqlens, dtype=torch.int32, device=device)
    got, got_lse = cu.lean_decode_cuda(q, kc, vc, seq_t, sched, block_table=blocks, inv_freq=inv, causal=True,
                                       rotary_interleaved=False)
    # reference: q rotated at positions seqlens - Sq + i, cache already rotated (no append)
    pos = torch.arange(max(seqlens) + 1, dtype=torch.float32, device=device)
    ang = pos[:, None] * inv[None]
    qs = [reference.apply_rotary(q[b].double(), ang.cos()[seqlens[b] - Sq:seqlens[b], None].double(),
                                 ang.sin()[seqlens[b] - Sq:seqlens[b], None].double(), False) for b in range(B)]
    want, want_lse = reference.kvcache_attention(torch.stack(qs), kc, vc, seq_t, block_table=blocks, causal=True)
    assert_close(got, want, dtype)
    # q is rotated in fp32 in the kernel (angle reduced to [-pi, pi], ~1e-6 error): lse gets the dtype's room
    assert_close(got_lse, want_lse, dtype, name="lse")


# ---- EcoFormer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("nbits", [16, 33, 64])
@pytest.mark.parametrize("form", ["pairwise", "linear", "linear-repo"])
def test_ecoformer(cu, device, dtype, nbits, form):
    B, H, N, Dv = 2, 3, 97, 40
    hq = torch.randint(0, 2, (B, H, N, nbits), device=device).float() * 2 - 1
    hk = torch.randint(0, 2, (B, H, N, nbits), device=device).float() * 2 - 1
    v = torch.randn(B, H, N, Dv, device=device, dtype=dtype)
    kv_lens = torch.tensor([N, 50], dtype=torch.int32, device=device)
    pad = torch.arange(N, device=device)[None] >= kv_lens[:, None].long()
    out = poison_like(torch.empty(B, H, N, Dv, device=device, dtype=dtype))
    qc, kc = cu.pack_sign_bits(hq), cu.pack_sign_bits(hk)
    if form == "pairwise":
        got = cu.ecoformer_pairwise_cuda(qc, kc, v, nbits=nbits, kv_lens=kv_lens, out=out)
    else:
        got = cu.ecoformer_linear_cuda(qc, kc, v, nbits=nbits, kv_lens=kv_lens, repo_form=form == "linear-repo", out=out)
    assert got is out
    want = reference.ecoformer_pairwise(hq, hk, v, key_padding_mask=pad,
                                        form="reference-code" if form == "linear-repo" else "consistent")
    assert_close(got, want, dtype)
