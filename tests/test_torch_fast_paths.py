"""CPU fast paths of the torch backends (issues 3 and 4): the fused attention forward on
``aten._scaled_dot_product_flash_attention_for_cpu`` (Toeplitz bias view, reversed query rows, visible key
range, dead keys/rows) and the varlen torch backend's views / one gather / in-place output writes.

Every case checks the fast path is really taken (the kernel is called), then compares with the float64
reference (out, lse; fully masked rows out 0 / lse -inf) and, where cheap, the gradients (the backward
recomputes on the general path). Keys hidden from every query hold NaN/inf and must not leak."""
import pytest
import torch

import posattn
from posattn import reference as R
from posattn.ops import _attention_torch as AT
from posattn.ops import attention as A
from posattn.ops import varlen as V
from posattn.positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, XPos
from tolerances import assert_close


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the fused CPU kernel made by the attention torch backend."""
    calls = []
    real = AT._FLASH_CPU

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(AT, "_FLASH_CPU", counting)
    return calls


def _position(kind, B, H, Sk, D):
    if kind == "none":
        return None
    if kind == "alibi":
        return ALiBi(0.05 + torch.rand(B, H))
    if kind == "relative":
        return RelativeBias(torch.randn(H, 2 * 5 + 1), max_distance=5)
    if kind == "relative_neginf":      # a table that forbids far-left keys: rows/keys hidden by the bias itself
        t = torch.randn(H, 2 * 3 + 1)
        t[:, :2] = float("-inf")
        return RelativeBias(t, max_distance=3)
    if kind == "t5":
        return T5Bias(torch.randn(8, H), num_buckets=8, max_distance=20, bidirectional=True)
    if kind == "rope+alibi":
        return [RoPE(), ALiBi()]
    if kind == "xpos":
        return XPos(scale_base=32.0)
    if kind == "phase+relative":
        return [LearnedPhaseRoPE(0.1 + 0.8 * torch.rand(B, H, Sk)), RelativeBias(torch.randn(H, 9), max_distance=4)]
    raise KeyError(kind)


def _mask(kind, B, H, Sq, Sk, dtype):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, H, Sq, Sk) < 0.6
        m[0, 0, min(1, Sq - 1)] = False                     # one fully masked row
        return m
    if kind == "bool_keys":                                 # key padding (B, 1, 1, Sk), last key always hidden
        m = torch.rand(B, 1, 1, Sk) < 0.7
        m[..., -1] = False
        return m
    if kind == "float":
        return torch.randn(1, H, Sq, Sk, dtype=dtype).masked_fill(torch.rand(1, H, Sq, Sk) < 0.3, float("-inf"))
    raise KeyError(kind)


CASES = [
    # (B, Sq, Sk, H, Hk, D, pe, mask, causal, window, offset)
    (1, 37, 53, 4, 2, 16, "alibi", None, False, (-1, -1), 0),
    (2, 17, 29, 3, 3, 8, "relative", None, True, (-1, -1), 12),
    (1, 29, 17, 2, 1, 16, "t5", None, True, (-1, -1), -12),        # Sq > Sk bottom-right: fully masked rows
    (2, 23, 23, 4, 4, 16, "rope+alibi", None, False, (4, 2), 0),
    (1, 19, 31, 2, 2, 8, "xpos", None, True, (-1, -1), 12),
    (1, 13, 21, 4, 2, 8, "phase+relative", None, False, (3, -1), 8),
    (1, 11, 15, 2, 2, 8, "relative_neginf", None, False, (-1, -1), 4),
    (2, 9, 14, 2, 1, 8, "none", "bool", False, (-1, -1), 0),
    (2, 9, 14, 4, 2, 8, "alibi", "bool_keys", True, (-1, -1), 5),
    (1, 12, 12, 3, 3, 8, "relative", "float", False, (2, 2), 0),
    (1, 1, 1, 1, 1, 1, "alibi", None, False, (-1, -1), 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[6]}-{c[7]}-c{int(c[8])}-w{c[9][0]}_{c[9][1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_fast_forward_vs_reference(case, dtype, kernel_calls, monkeypatch):
    B, Sq, Sk, H, Hk, D, pe_kind, mask_kind, causal, (wl, wr), offset = case
    monkeypatch.setattr(AT, "CHUNK_BYTES", B * H * Sk * 4 * 5)    # chunks of 5 rows: ragged last chunk
    q = torch.randn(B, Sq, H, D).to(dtype)
    k = torch.randn(B, Sk, Hk, D).to(dtype)
    v = torch.randn(B, Sk, Hk, D).to(dtype)
    position = _position(pe_kind, B, H, Sk, D)
    mask = _mask(mask_kind, B, H, Sq, Sk, dtype)
    ro, rl = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.3, causal=causal,
                         offset=offset, window_size=(wl, 0 if causal else wr), attn_mask=mask, position=position)
    # keys no query can see get NaN/inf: they must not change anything
    i = torch.arange(Sq)[:, None] + offset
    j = torch.arange(Sk)[None]
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    right = 0 if causal else wr
    if right >= 0:
        vis &= j <= i + right
    if wl >= 0:
        vis &= j >= i - wl
    if pe_kind == "relative_neginf":                        # table entries -inf at pk - pq <= -2
        vis &= j - i > -2
    vis = vis.expand(B, H, Sq, Sk)
    if mask is not None:
        vis = vis & (mask if mask.dtype == torch.bool else ~torch.isneginf(mask))
    group = H // Hk
    hidden = ~vis.reshape(B, Hk, group, Sq, Sk).any(2).any(2)      # (B, Hk, Sk)
    k_in = k.masked_fill(hidden.transpose(1, 2)[..., None], float("nan"))
    v_in = v.masked_fill(hidden.transpose(1, 2)[..., None], float("inf"))
    pe = A.build_pe(position, batch_size=B, num_heads=H, seqlen_q=Sq, seqlen_k=Sk, head_dim=D, offset=offset,
                    device=q.device)
    out, lse = A.fused_attention(q, k_in, v_in, attn_mask=mask, softmax_scale=0.3, causal=causal, offset=offset,
                                 window_left=wl, window_right=wr, pe=pe, backend="torch")
    assert kernel_calls, "the fused CPU kernel was not used"
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert_close(out, ro.transpose(1, 2), dtype, name="out")
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse")
    dead = torch.isneginf(rl)
    assert torch.equal(torch.isneginf(lse), dead)
    assert (out.transpose(1, 2)[dead] == 0).all()


def test_attention_fast_path_gradients_float64(kernel_calls, monkeypatch):
    """Forward on the fused kernel, backward by recomputation: gradients of q, k, v, the table and the
    ALiBi slopes against float64 autograd through the reference."""
    B, Sq, Sk, H, D = 1, 14, 19, 2, 8
    monkeypatch.setattr(AT, "CHUNK_BYTES", B * H * Sk * 4 * 4)
    q, k, v = (torch.randn(B, s, H, D, dtype=torch.float64, requires_grad=True) for s in (Sq, Sk, Sk))
    table = torch.randn(H, 9, dtype=torch.float64, requires_grad=True)
    slopes = (0.1 + torch.rand(H, dtype=torch.float32)).requires_grad_(True)
    out, lse, _ = posattn.flash_attn_func(q, k, v, causal=True, window_size=(6, -1), return_attn_probs=True,
                                          position=[RoPE(), RelativeBias(table, max_distance=4)], backend="torch")
    assert kernel_calls
    ro, rl = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, offset=Sk - Sq,
                         window_size=(6, 0), position=[RoPE(), RelativeBias(table, max_distance=4)])
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (q, k, v, table), (dout, dlse))
    want = torch.autograd.grad((ro.transpose(1, 2), rl), (q, k, v, table), (dout, dlse))
    # float64 inputs, but RoPE's inv_freq reaches the backend as fp32 (KernelPE): ~1e-8 differences
    torch.testing.assert_close(out, ro.transpose(1, 2), atol=1e-6, rtol=1e-6)
    for g, w, n in zip(got, want, ("dq", "dk", "dv", "dtable")):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=lambda m: f"{n}: {m}")
    out = posattn.flash_attn_func(q, k, v, alibi_slopes=slopes, backend="torch")
    ro, _ = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), offset=Sk - Sq,
                        position=ALiBi(slopes))
    g1 = torch.autograd.grad(out, slopes, dout)[0]
    g2 = torch.autograd.grad(ro.transpose(1, 2), slopes, dout)[0]
    torch.testing.assert_close(g1.double(), g2.double(), atol=1e-9, rtol=1e-6)


def test_attention_slow_path_kept_for_softcap_urpe_dropout(kernel_calls):
    """softcap, URPE and dropout are not 'scale * q.k + bias': the fused kernel must not be called."""
    q = torch.randn(1, 6, 2, 8)
    posattn.flash_attn_func(q, q, q, softcap=2.0, backend="torch")
    posattn.flash_attn_func(q, q, q, dropout_p=0.5, backend="torch")
    from posattn.positional import URPE
    posattn.flash_attn_func(q, q, q, position=URPE(torch.ones(2, 5), max_distance=2), backend="torch")
    assert not kernel_calls


@pytest.mark.parametrize("plan", ["views", "gathered"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_fast_path_views_and_gathers(plan, causal, monkeypatch):
    """Plain attention on the fused kernel: one view per sequence (default costs) or padded gathered chunks
    (huge call overhead); equal adjacent lengths; GQA; rows past cu_seqlens hold NaN and stay 0 / -inf."""
    if plan == "gathered":
        monkeypatch.setattr(V, "CALL_OVERHEAD_FLOPS", 1e12)
    lens_q = [5, 5, 5, 3, 9, 1, 0, 9, 4]
    lens_k = lens_q if not causal else [lq + (2 if b % 3 == 0 else 0) for b, lq in enumerate(lens_q)]
    H, Hk, D = 4, 2, 8
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    extra = 3
    q = torch.randn(int(cu_q[-1]) + extra, H, D, requires_grad=True)
    k = torch.randn(int(cu_k[-1]) + extra, Hk, D)
    v = torch.randn(int(cu_k[-1]) + extra, Hk, D)
    with torch.no_grad():
        q[-extra:] = float("nan")
        k[-extra:] = float("nan")
        v[-extra:] = float("inf")
    calls = []
    real_ok = V._sdpa_cpu_ok
    monkeypatch.setattr(V, "_sdpa_cpu_ok", lambda *a, **kw: calls.append(real_ok(*a, **kw)) or calls[-1])
    # a gradient through lse needs the general path: out with autograd, lse from a call without it
    out = posattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         backend="torch")
    with torch.no_grad():
        out2, lse, _ = posattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                      return_attn_probs=True, backend="torch")
    assert calls == [True, True], "plain varlen attention did not take the fused-kernel path"
    assert torch.equal(out.detach(), out2)
    assert out.shape == (q.shape[0], H, D) and out.is_contiguous()
    assert (out[-extra:] == 0).all() and torch.isneginf(lse[:, -extra:]).all()
    dout = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, dout)
    assert (dq[-extra:] == 0).all()
    for b in range(len(lens_q)):
        sq, sk = int(cu_q[b]), int(cu_k[b])
        lq, lk = lens_q[b], lens_k[b]
        if lq == 0:
            continue
        qb = q[sq:sq + lq].detach().double().requires_grad_(True)
        ro, rl = R.attention(qb.transpose(0, 1)[None], k[sk:sk + lk].transpose(0, 1)[None],
                             v[sk:sk + lk].transpose(0, 1)[None], causal=causal, offset=lk - lq)
        assert_close(out[sq:sq + lq], ro[0].transpose(0, 1), torch.float32, name=f"out[{b}]")
        assert_close(lse[:, sq:sq + lq], rl[0], torch.float32, name=f"lse[{b}]")
        (gq,) = torch.autograd.grad(ro[0].transpose(0, 1), qb, dout[sq:sq + lq].double())
        assert_close(dq[sq:sq + lq], gq, torch.float32, grad=True, name=f"dq[{b}]")


def test_plan_chunks_gather_cost_splits_only_when_copies_cost_more():
    lens = [64, 64, 64, 2, 2, 2]
    # copying a 64-token sequence (64 * 10) costs more than a call (100): one chunk each; 2-token ones grouped
    assert V.plan_chunks(lens, lens, overhead=100, gather=10) == [[3, 4, 5], [0], [1], [2]]
    assert V.plan_chunks(lens, lens, overhead=100, gather=0) == [[3, 4, 5], [0, 1, 2]]
