"""The torch backend's backward (posattn.ops._attention_torch): the FlashAttention-2 style backward on the
saved out/lse (``_flash_bwd``) and torch's fused CPU backward (``_aten_bwd``) against float64 reference
gradients, with the autograd recomputation (``_bwd``) made to raise so a test cannot pass through it.

Covered: every positional encoding and combinations (incl. gradients of tables, slopes, learned phases, URPE,
float masks with broadcast dims), several chunks and several row blocks per chunk, causal with
seqlen_q != seqlen_k both ways, local windows, GQA/MQA, softcap, dropout with the forward's keep-mask, dlse,
fully masked rows with NaN in their q/dout and in hidden keys, bf16, float64 gradcheck."""
import pytest
import torch

import posattn
from posattn import reference as R
from posattn.flash_attn_interface import normalize_window
from posattn.positional import ALiBi, RelativeBias, T5Bias, URPE
from posattn.ops import _attention_torch as AT
from attention_helpers import grads, make_position, qkv, ref_fa
from tolerances import assert_close


def _no_recompute(*args, **kwargs):
    raise AssertionError("the autograd-recompute backward ran; the fast backward should have")


@pytest.fixture
def path(request, monkeypatch):
    """"flash": the FlashAttention-2 backward for everything; "auto": aten where it applies, else flash.
    Either way the recompute path raises. Also forces several chunks and several row blocks per chunk."""
    monkeypatch.setattr(AT, "_bwd", _no_recompute)
    if request.param == "flash":
        monkeypatch.setattr(AT, "_aten_bwd_ok", lambda *a, **k: False)

    def small(batch, heads, seqlen_k, rows, block_rows=None):
        monkeypatch.setattr(AT, "CHUNK_BYTES", batch * heads * seqlen_k * 4 * rows)
        monkeypatch.setattr(AT, "BLOCK_ELEMS", batch * heads * seqlen_k * (block_rows or max(1, rows // 2)))
    return small


BOTH = pytest.mark.parametrize("path", ["flash", "auto"], indirect=True)
FLASH = pytest.mark.parametrize("path", ["flash"], indirect=True)


def _check(q, k, v, position, leaves, dtype, *, causal=False, window_size=(-1, -1), softcap=0.0, lse_weight=False):
    out, lse, _ = posattn.flash_attn_func(q, k, v, causal=causal, window_size=window_size, softcap=softcap,
                                          position=position, return_attn_probs=True, backend="torch")
    Sq, Sk = q.shape[1], k.shape[1]
    window_size = normalize_window(window_size, causal, Sk)   # FlashAttention: a side >= seqlen_k is unbounded
    ro, rl = ref_fa(q, k, v, causal=causal, offset=Sk - Sq, window_size=window_size, softcap=softcap,
                    position=position)
    dout = torch.randn_like(out)
    ins = [q, k, v] + leaves
    if lse_weight:
        w = torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0)
        got = grads([out, lse], ins, [dout, w])
        want = grads([ro, rl], ins, [dout.double(), w.double()])
    else:
        got = grads(out, ins, dout)
        want = grads(ro, ins, dout.double())
    for i, (g, r) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"grad {i} not finite"
        assert_close(g, r, dtype, grad=True, name=f"grad {i}")


@BOTH
@pytest.mark.parametrize("pe", ["none", "rope", "rope_partial_interleaved", "rope_position_ids", "rope_yarn",
                                "alibi", "alibi_learned", "relative", "t5", "t5_causal", "xpos", "urpe",
                                "learned_phase", "rope+alibi", "rope+t5", "relative+urpe", "xpos+relative"])
def test_every_encoding_chunked_gqa(pe, path):
    """Bottom-right causal, Sq < Sk, GQA 4/2, head_dim 24, 3 chunks of 2 row blocks: all gradients."""
    B, Sq, Sk, H, Hk, D = 2, 13, 21, 4, 2, 24
    path(B, H, Sk, 5, 2)
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.float32, requires_grad=True)
    position, leaves = make_position(pe, batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    _check(q, k, v, position, leaves, torch.float32, causal=True)


@FLASH
@pytest.mark.parametrize("seqlens", [(19, 7), (7, 19), (1, 9), (9, 1), (16, 16)], ids=str)
@pytest.mark.parametrize("mode", ["causal", "window_softcap", "full"])
def test_shapes_and_masks(seqlens, mode, path):
    """Sq != Sk both ways (fully masked rows when Sq > Sk causal), windows, softcap, MQA, dlse."""
    Sq, Sk = seqlens
    B, H, D = 2, 3, 16
    path(B, H, Sk, 4, 3)
    q, k, v = qkv(B, Sq, Sk, H, 1, D, torch.float32, requires_grad=True)
    position, leaves = make_position("rope+relative", batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    kw = dict(causal=True) if mode == "causal" else \
        dict(window_size=(3, 2), softcap=4.0) if mode == "window_softcap" else {}
    _check(q, k, v, position, leaves, torch.float32, lse_weight=True, **kw)


@BOTH
def test_bf16_and_head_dim_v(path):
    B, Sq, Sk, H, D = 1, 12, 17, 2, 32
    path(B, H, Sk, 5)
    q, k, v = qkv(B, Sq, Sk, H, H, D, torch.bfloat16, requires_grad=True)
    position, leaves = make_position("alibi_learned+urpe", batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    _check(q, k, v, position, leaves, torch.bfloat16, causal=True)
    q, k, v = qkv(B, Sq, Sk, H, H, D, torch.float32, head_dim_v=24, requires_grad=True)
    _check(q, k, v, None, [], torch.float32, causal=True)


@FLASH
@pytest.mark.parametrize("mask_shape", ["full", "heads_bcast", "rows_bcast", "batch_bcast", "bool"])
def test_attn_mask_gradient(mask_shape, path):
    """Float attn_mask gradients summed over the mask's broadcast dims (SDPA, top-left), with T5 + RoPE, GQA."""
    B, H, Hk, Sq, Sk, D = 2, 4, 2, 11, 14, 16
    path(B, H, Sk, 4, 2)
    q = torch.randn(B, H, Sq, D, requires_grad=True)
    k = torch.randn(B, Hk, Sk, D, requires_grad=True)
    v = torch.randn(B, Hk, Sk, D, requires_grad=True)
    shape = {"full": (B, H, Sq, Sk), "heads_bcast": (B, 1, Sq, Sk), "rows_bcast": (1, H, 1, Sk),
             "batch_bcast": (1, H, Sq, Sk), "bool": (B, 1, Sq, Sk)}[mask_shape]
    if mask_shape == "bool":
        mask = torch.rand(shape) > 0.3
        mask[:, :, 2] = False                         # a fully masked row
    else:
        mask = torch.randn(shape)
        mask.masked_fill_(torch.rand(shape) < 0.2, float("-inf"))
        mask.requires_grad_(True)
    position, leaves = make_position("rope+t5", batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    out = posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, position=position,
                                               backend="torch")
    ro, _ = R.attention(q, k, v, attn_mask=mask, position=position)
    ins = [q, k, v] + leaves + ([mask] if mask.requires_grad else [])
    dout = torch.randn_like(out)
    for i, (g, r) in enumerate(zip(grads(out, ins, dout), grads(ro, ins, dout.double()))):
        assert torch.isfinite(g).all(), f"grad {i}"
        assert_close(g, r.nan_to_num(0.0) if i == len(ins) - 1 else r, torch.float32, grad=True, name=f"grad {i}")


@BOTH
@pytest.mark.parametrize("case", ["dead_rows", "hidden_keys"])
def test_fully_masked_rows_and_hidden_nan(case, path):
    """Rows without a visible key (causal, Sq > Sk) get dq 0 even when their q and dout are NaN; keys no query
    sees (window, Sq < Sk) hold inf/NaN and get dk = dv = 0; every other gradient is finite and exact."""
    Sq, Sk = (14, 9) if case == "dead_rows" else (6, 12)
    B, H, D = 1, 2, 16
    path(B, H, Sk, 4)
    q, k, v = qkv(B, Sq, Sk, H, H, D, torch.float32)
    dead = max(0, Sq - Sk)
    hidden = 4 if case == "hidden_keys" else 0       # first row sits at position 6, sees keys 4..6
    q[:, :dead] = float("nan")
    k[:, :hidden], v[:, :hidden] = float("inf"), float("nan")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    pos = ALiBi()
    out = posattn.flash_attn_func(q, k, v, causal=True, window_size=(2, 0), position=pos, backend="torch")
    assert (out[:, :dead] == 0).all() and torch.isfinite(out).all()
    dout = torch.randn_like(out)
    dout[:, :dead] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], dout)
    assert (dq[:, :dead] == 0).all() and (dk[:, :hidden] == 0).all() and (dv[:, :hidden] == 0).all()
    qc, kc, vc = (t.detach().clone() for t in (q, k, v))
    qc[:, :dead], kc[:, :hidden], vc[:, :hidden] = 0.0, 0.0, 0.0
    qc, kc, vc = (t.requires_grad_(True) for t in (qc, kc, vc))
    ro, _ = ref_fa(qc, kc, vc, causal=True, offset=Sk - Sq, window_size=(2, 0), position=pos)
    want = torch.autograd.grad(ro, [qc, kc, vc], dout.nan_to_num(0.0).double())
    for g, r in zip((dq, dk, dv), want):
        assert_close(g, r, torch.float32, grad=True)


def _keep_mask(p, seed, B, H, Sq, Sk):
    C = AT.chunk_rows(B, H, Sq, Sk)
    parts = [AT.dropout_keep(p, seed, i0, (B, H, min(Sq, i0 + C) - i0, Sk), torch.device("cpu"), torch.float32)
             for i0 in range(0, Sq, C)]
    return torch.cat(parts, dim=2) > 0


@FLASH
@pytest.mark.parametrize("pe", ["rope+alibi_learned", "relative+urpe", "learned_phase"])
def test_dropout_same_keep_mask(pe, path):
    """The backward regenerates the forward's keep-mask per chunk, also when a chunk has several row blocks."""
    B, Sq, Sk, H, Hk, D, p = 2, 13, 17, 4, 2, 16, 0.3
    path(B, H, Sk, 5, 2)
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.float32, requires_grad=True)
    position, leaves = make_position(pe, batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    torch.manual_seed(99)
    out, lse, _ = posattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, position=position,
                                          return_attn_probs=True, backend="torch")
    torch.manual_seed(99)
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())  # as the op layer draws it
    keep = _keep_mask(p, seed, B, H, Sq, Sk)
    ro, rl = ref_fa(q, k, v, causal=True, offset=Sk - Sq, position=position, dropout_mask=keep, dropout_p=p)
    assert_close(out, ro, torch.float32)
    dout, w = torch.randn_like(out), torch.randn_like(lse)
    ins = [q, k, v] + leaves
    for g, r in zip(grads([out, lse], ins, [dout, w]), grads([ro, rl], ins, [dout.double(), w.double()])):
        assert_close(g, r, torch.float32, grad=True)


@FLASH
def test_gradcheck_float64_every_parameter(path):
    """gradcheck (float64) of q, k, v, a float mask and the RelativeBias and URPE tables, two chunks; and of
    the ALiBi slopes and learned-phase freqs with softcap, window and GQA."""
    path(1, 2, 6, 2, 1)
    q = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    utab = (1 + 0.3 * torch.randn(2, 5, dtype=torch.float64)).requires_grad_(True)

    def f(q, k, v, mask, table, utab):
        pos = [posattn.positional.RoPE(), RelativeBias(table, max_distance=3), URPE(utab, max_distance=2)]
        return posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, position=pos,
                                                    backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, v, mask, table, utab), eps=1e-6, atol=1e-6)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    freqs = (0.3 + 0.5 * torch.rand(1, 2, 6, dtype=torch.float64)).requires_grad_(True)
    t5 = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)

    def g(q, k, v, slopes, freqs):
        pos = [posattn.positional.LearnedPhaseRoPE(freqs), ALiBi(slopes)]
        return posattn.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), softcap=3.0, position=pos,
                                       backend="torch")

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(g, (qt, kt, vt, slopes, freqs), eps=1e-6, atol=1e-6)

    def h(q, k, v, t5):
        pos = [posattn.positional.XPos(scale_base=8.0), T5Bias(t5, num_buckets=8, max_distance=6)]
        # (lse is fp32 even for float64 inputs: its gradient is checked against the reference elsewhere)
        return posattn.flash_attn_func(q, k, v, position=pos, backend="torch")

    assert torch.autograd.gradcheck(h, (qt, kt, vt, t5), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["auto"], indirect=True)
@pytest.mark.parametrize("pe", ["none", "rope", "xpos", "alibi", "rope_position_ids"])
def test_aten_path_taken_for_plain_cases(pe, path, monkeypatch):
    """fp32 without learned parameters or dlse runs torch's fused backward (the flash path made to raise)."""
    def boom(*a, **k):
        raise AssertionError("the flash backward ran")
    monkeypatch.setattr(AT, "_flash_bwd", boom)
    B, Sq, Sk, H, Hk, D = 1, 10, 15, 4, 1, 16
    path(B, H, Sk, 4)
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.float32, requires_grad=True)
    position, leaves = make_position(pe, batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    _check(q, k, v, position, leaves, torch.float32, causal=True, window_size=(6, 0))


def test_flash_agrees_with_recompute(monkeypatch):
    """Flash and recompute backward give the same gradients (fp32) on a mixed case."""
    B, Sq, Sk, H, D = 1, 9, 12, 2, 16
    q, k, v = qkv(B, Sq, Sk, H, H, D, torch.float32, requires_grad=True)
    position, leaves = make_position("learned_phase+relative+urpe", batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    dout = torch.randn(B, Sq, H, D)
    res = []
    for impl in ("recompute", "auto"):
        monkeypatch.setattr(AT, "BWD_IMPL", impl)
        out = posattn.flash_attn_func(q, k, v, causal=True, softcap=5.0, position=position, backend="torch")
        res.append(grads(out, [q, k, v] + leaves, dout))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_diag_sums_matches_loop():
    g = torch.randn(3, 70, 5, dtype=torch.float64)      # more rows than the piece size (64)
    got = AT._diag_sums(g)
    want = torch.zeros(3, 74, dtype=torch.float64)
    for r in range(70):
        for j in range(5):
            want[:, r + j] += g[:, r, j]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["flash"], indirect=True)
@pytest.mark.parametrize("seqlens", [(0, 0), (0, 3), (3, 0)], ids=str)
def test_empty_lengths_learned_phase_gqa(seqlens, path):
    """Zero-length q or k with learned phases and GQA (k/v expanded to the query heads): zero gradients, no
    error (found by the fuzz tests: reshape of an empty tensor); NaN in keys no query sees stays out."""
    Sq, Sk = seqlens
    B, H, Hk, D = 1, 2, 1, 6
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.float32)
    k = k.fill_(float("nan")).requires_grad_(True)   # never read: no query row, or no key
    q.requires_grad_(True)
    v.requires_grad_(True)
    freqs = (0.25 + 0.5 * torch.rand(B, H, Sk)).requires_grad_(True)
    position = posattn.positional.LearnedPhaseRoPE(freqs) if Sq == 0 or Sk > 0 else None
    out = posattn.flash_attn_func(q, k, v, position=position, backend="torch")
    ins = [q, k, v] + ([freqs] if position is not None else [])
    for g in torch.autograd.grad(out, ins, torch.randn_like(out), allow_unused=True):
        assert g is None or (g == 0).all()
