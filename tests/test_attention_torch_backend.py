"""Torch backend of fused attention (posattn.ops._attention_torch) through the public API, backend="torch":
forward and every gradient vs the float64 reference for each positional encoding, chunking, dropout,
fully masked rows, float64 gradcheck, the memory bound of the chunk size."""
import pytest
import torch

import posattn
from posattn import reference as R
from posattn.flash_attn_interface import normalize_window
from posattn.ops import _attention_torch as AT
from attention_helpers import PE_KINDS, grads, make_position, qkv, ref_fa
from tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16]  # fp16 runs in test_shapes_window_softcap


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several query chunks (with a ragged last one) at test sizes."""
    def set_rows(batch, heads, seqlen_k, rows):
        monkeypatch.setattr(AT, "CHUNK_BYTES", batch * heads * seqlen_k * 4 * rows)
    return set_rows


def _check_fa(q, k, v, position, leaves, dtype, *, causal=False, window_size=(-1, -1), softcap=0.0,
              check_grads=True):
    out, lse, _ = posattn.flash_attn_func(q, k, v, causal=causal, window_size=window_size, softcap=softcap,
                                          position=position, return_attn_probs=True, backend="torch")
    Sq, Sk = q.shape[1], k.shape[1]
    # FlashAttention semantics: a window side >= seqlen_k means unbounded, causal sets right = 0
    window_size = normalize_window(window_size, causal, Sk)
    ro, rl = ref_fa(q, k, v, causal=causal, offset=Sk - Sq, window_size=window_size, softcap=softcap,
                    position=position)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert_close(out, ro, dtype, name="out")
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse")
    if not check_grads:
        return
    dout = torch.randn_like(out)
    ins = [q, k, v] + leaves
    got = grads(out, ins, dout)
    want = grads(ro, ins, dout.to(torch.float64))
    names = ["dq", "dk", "dv"] + [f"d_leaf{i}" for i in range(len(leaves))]
    for g, w, n in zip(got, want, names):
        assert torch.isfinite(g).all(), n
        assert_close(g, w, dtype, grad=True, name=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pe", PE_KINDS)
def test_every_encoding_bottom_right(pe, causal, dtype, small_chunks):
    """flash_attn_func (bottom-right, GQA 4/2, Sq < Sk, head_dim 40), several chunks, fwd + all grads."""
    B, Sq, Sk, H, Hk, D = 2, 17, 29, 4, 2, 40
    small_chunks(B, H, Sk, 5)
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, requires_grad=True)
    position, leaves = make_position(pe, batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    _check_fa(q, k, v, position, leaves, dtype, causal=causal)


@pytest.mark.parametrize("pe", ["none", "rope+alibi", "relative+urpe", "xpos", "t5"])
def test_every_encoding_top_left_sdpa(pe, small_chunks):
    """scaled_dot_product_attention (top-left) with Sq > Sk, causal, MQA, fp32; fwd + grads."""
    B, Sq, Sk, H, D = 2, 23, 11, 3, 16
    small_chunks(B, H, Sk, 4)
    q = torch.randn(B, H, Sq, D, requires_grad=True)
    k = torch.randn(B, 1, Sk, D, requires_grad=True)
    v = torch.randn(B, 1, Sk, D, requires_grad=True)
    position, leaves = make_position(pe, batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    out = posattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, position=position,
                                               backend="torch")
    ro, _ = R.attention(q, k, v, causal=True, offset=0, position=position)
    assert_close(out, ro, torch.float32)
    dout = torch.randn_like(out)
    for g, w in zip(grads(out, [q, k, v] + leaves, dout), grads(ro, [q, k, v] + leaves, dout.double())):
        assert_close(g, w, torch.float32, grad=True, name="grad")


@pytest.mark.parametrize("seqlens", [(1, 1), (1, 97), (97, 1), (17, 113), (113, 17), (97, 97)], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 72, 128])
def test_shapes_window_softcap(seqlens, head_dim, small_chunks):
    """Awkward lengths, both Sq != Sk directions, head dims, MQA, local window + softcap, fp16, chunked."""
    Sq, Sk = seqlens
    B, H, Hk = 1, 3, 1
    small_chunks(B, H, Sk, 16)
    q, k, v = qkv(B, Sq, Sk, H, Hk, head_dim, torch.float16, requires_grad=True)
    position, leaves = make_position("rope+alibi", batch=B, heads=H, seqlen_k=Sk, head_dim=head_dim)
    _check_fa(q, k, v, position, leaves, torch.float16, causal=True, window_size=(9, 3), softcap=5.0)
    _check_fa(q, k, v, None, [], torch.float16, window_size=(4, 6), check_grads=False)


def test_head_dim_v_differs():
    q, k, v = qkv(2, 9, 12, 2, 2, 32, torch.float32, head_dim_v=24, requires_grad=True)
    _check_fa(q, k, v, None, [], torch.float32, causal=True)


def test_fully_masked_rows_give_zero_and_finite_grads():
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key -> out 0, lse -inf, dq 0."""
    B, Sq, Sk, H = 1, 9, 4, 2
    q, k, v = qkv(B, Sq, Sk, H, H, 16, torch.float32, requires_grad=True)
    out, lse, _ = posattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend="torch",
                                          position=posattn.positional.ALiBi())
    dead = Sq - Sk
    assert (out[:, :dead] == 0).all() and torch.isneginf(lse[:, :, :dead]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, dead:]).all()
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[:, :dead] == 0).all()
    ro, rl = ref_fa(q, k, v, causal=True, offset=Sk - Sq, position=posattn.positional.ALiBi())
    assert_close(out, ro, torch.float32)


def test_lse_gradient(small_chunks):
    """Gradients flowing into softmax_lse are exact on the torch backend."""
    small_chunks(1, 2, 13, 3)
    q, k, v = qkv(1, 8, 13, 2, 1, 16, torch.float32, requires_grad=True)
    out, lse, _ = posattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend="torch")
    ro, rl = ref_fa(q, k, v, causal=True, offset=5)
    w = torch.randn_like(lse)
    got = torch.autograd.grad((lse * w).sum() + out.sum(), [q, k, v])
    want = torch.autograd.grad((rl * w.double()).sum() + ro.sum(), [q, k, v])
    for g, r in zip(got, want):
        assert_close(g, r, torch.float32, grad=True)


def test_gradcheck_float64(small_chunks):
    """torch.autograd.gradcheck of q, k, v and a float mask in float64 (tiny sizes, two chunks)."""
    small_chunks(1, 2, 5, 2)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    pos = [posattn.positional.RoPE(), posattn.positional.ALiBi()]

    def f(q, k, v, mask):
        return posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, position=pos,
                                                    backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-6, atol=1e-5)

    def g(q, k, v):
        return posattn.flash_attn_func(q, k, v, causal=True, window_size=(2, 0), softcap=3.0, backend="torch")

    assert torch.autograd.gradcheck(g, (q.transpose(1, 2).detach().requires_grad_(),
                                        k.transpose(1, 2).detach().requires_grad_(),
                                        v.transpose(1, 2).detach().requires_grad_()), eps=1e-6, atol=1e-5)


def _keep_mask(p, seed, B, H, Sq, Sk):
    """The torch backend's keep-mask for the whole problem, rebuilt chunk by chunk as it draws it."""
    C = AT.chunk_rows(B, H, Sq, Sk)
    parts = [AT.dropout_keep(p, seed, i0, (B, H, min(Sq, i0 + C) - i0, Sk), torch.device("cpu"), torch.float32)
             for i0 in range(0, Sq, C)]
    return torch.cat(parts, dim=2) > 0


def test_dropout_matches_reference_with_same_mask(small_chunks):
    """Forward and backward use the same keep-mask: equal to the reference given that mask."""
    B, Sq, Sk, H, D, p = 2, 11, 19, 2, 16, 0.3
    small_chunks(B, H, Sk, 4)
    q, k, v = qkv(B, Sq, Sk, H, H, D, torch.float32, requires_grad=True)
    position, leaves = make_position("relative", batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    torch.manual_seed(1234)
    out = posattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, position=position, backend="torch")
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())  # as the op layer draws it
    keep = _keep_mask(p, seed, B, H, Sq, Sk)
    ro, _ = ref_fa(q, k, v, causal=True, offset=Sk - Sq, position=position, dropout_mask=keep, dropout_p=p)
    assert_close(out, ro, torch.float32)
    dout = torch.randn_like(out)
    ins = [q, k, v] + leaves
    for g, w in zip(grads(out, ins, dout), grads(ro, ins, dout.double())):
        assert_close(g, w, torch.float32, grad=True)


def test_dropout_preserves_mean_and_rate():
    """v = 1: every output is sum_j p_ij keep_ij / (1 - p), expectation 1; the drop rate is p."""
    B, S, H, D, p = 2, 64, 4, 16, 0.25
    q = 0.01 * torch.randn(B, S, H, D)
    k = torch.randn(B, S, H, D)
    v = torch.ones(B, S, H, D)
    torch.manual_seed(7)
    out = posattn.flash_attn_func(q, k, v, dropout_p=p, backend="torch")
    rows = out[..., 0]
    # per row variance ~ p/(1-p)/S with near-uniform attention; 5 sigma on the mean of B*H*S rows
    sigma = (p / (1 - p) / S / rows.numel()) ** 0.5
    assert abs(rows.mean().item() - 1.0) < 5 * sigma
    keep = _keep_mask(p, 1, B, H, S, S)
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    assert not torch.equal(out, posattn.flash_attn_func(q, k, v, dropout_p=p, backend="torch"))


def test_dropout_one_gives_zero():
    q, k, v = qkv(1, 5, 6, 2, 2, 16, torch.float32)
    out = posattn.flash_attn_func(q, k, v, dropout_p=1.0, backend="torch")
    assert (out == 0).all()


def test_chunk_size_bounds_memory():
    """One chunk's logits stay within CHUNK_BYTES (64 MB) whenever a single row fits."""
    assert AT.CHUNK_BYTES == 64 << 20
    for B, H, Sq, Sk in [(1, 32, 8192, 8192), (4, 16, 4096, 32768), (2, 8, 17, 113), (1, 1, 1, 1)]:
        C = AT.chunk_rows(B, H, Sq, Sk)
        assert 1 <= C <= Sq
        assert B * H * C * Sk * 4 <= AT.CHUNK_BYTES
    assert AT.chunk_rows(64, 64, 10, 1 << 16) == 1  # a row larger than the budget: one row at a time


def test_backward_peak_memory_is_chunked(small_chunks):
    """The backward never holds a seqlen_q x seqlen_k block: with one-row chunks, the largest tensor the
    chunk recomputation creates is (batch, heads, 1, seqlen_k)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, Sq, Sk, H, D = 1, 48, 40, 2, 16
    small_chunks(B, H, Sk, 1)
    q, k, v = qkv(B, Sq, Sk, H, H, D, torch.float32, requires_grad=True)
    position, _ = make_position("rope+t5", batch=B, heads=H, seqlen_k=Sk, head_dim=D)
    biggest = [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in (res if isinstance(res, (tuple, list)) else [res]):
                if isinstance(t, torch.Tensor):
                    biggest[0] = max(biggest[0], t.numel())
            return res

    with Track():
        out = posattn.flash_attn_func(q, k, v, causal=True, position=position, backend="torch")
        out.backward(torch.randn_like(out))
    # inputs/outputs are B*Sq*H*D = 1536 elements; one chunk's logits B*H*Sk = 80; N x N would be 3840
    assert biggest[0] < B * H * Sq * Sk
