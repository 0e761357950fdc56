"""Padding-free (varlen) attention and unpad/pad (ByteTransformer, ALGORITHMS.md 2) vs float64 references.

The truth: ``reference.varlen_attention`` = every sequence alone through the dense ``reference.attention``
(positions restarting at 0, bottom-right alignment per sequence). Inputs are fresh random tensors seeded
from the test id (conftest), rounded to the tested dtype first, so the reference sees the same values.
Backends: torch (CPU default) and Triton (under the interpreter on CPU, marked ``interp``); the CUDA C++
kernels are marked ``gpu``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import posattn
from posattn import reference as ref
from posattn.ops import varlen as V
from posattn.positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos
from tolerances import assert_close, poison_like

F64 = torch.float64
TRITON = pytest.param("triton", marks=pytest.mark.interp)
BACKENDS = ["torch", TRITON]

# lengths mixing 0 (first, middle, last), 1, a block-crossing 17 and short ones; 2 rows past the end
LENS = [0, 3, 1, 17, 0, 5, 1, 9, 0]


def cu_of(lens, device):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device)


def rand(*shape, dtype=torch.float32, device="cpu", grad=False):
    t = torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


PE_KINDS = ["none", "rope", "rope_partial_interleaved", "rope_position_ids", "xpos", "learned_phase", "alibi",
            "alibi_per_sequence", "alibi_slopes_arg", "relative", "t5", "urpe", "rope+t5+urpe"]


def make_position(kind, *, heads, batch, total_k, head_dim, device):
    """(position, alibi_slopes, learnable leaves) for ``kind`` in the varlen layout."""
    leaves = []

    def leaf(t):
        t = t.to(device).requires_grad_(True)
        leaves.append(t)
        return t

    def one(k):
        if k == "rope":
            return RoPE(10000.0)
        if k == "rope_partial_interleaved":
            return RoPE(500.0, rotary_dim=head_dim // 2, interleaved=True)
        if k == "rope_position_ids":  # one id per key token, e.g. packed documents with offsets
            return RoPE(10000.0, position_ids=torch.randint(0, 200, (total_k,), device=device))
        if k == "xpos":
            return XPos(10000.0, scale_base=64.0)
        if k == "learned_phase":
            return LearnedPhaseRoPE(leaf(torch.rand(1, heads, total_k) * 0.9 + 0.05))
        if k == "alibi":
            return ALiBi()
        if k == "alibi_per_sequence":
            return ALiBi(torch.rand(batch, heads, device=device) * 0.5)
        if k == "relative":
            return RelativeBias(leaf(torch.randn(heads, 2 * 6 + 1)), max_distance=6)
        if k == "t5":
            return T5Bias(leaf(torch.randn(16, heads)), num_buckets=16, max_distance=40)
        if k == "urpe":
            return URPE(leaf(torch.rand(heads, 2 * 5 + 1) + 0.5), max_distance=5)
        raise AssertionError(k)

    if kind == "none":
        return None, None, leaves
    if kind == "alibi_slopes_arg":
        return None, torch.rand(batch, heads, device=device) * 0.5, leaves
    return [one(k) for k in kind.split("+")], None, leaves


def check_varlen(backend, *, lens_q, lens_k, heads=4, heads_k=2, head_dim=16, dtype=torch.float32, kind="none",
                 causal=False, extra_rows=2, device="cpu", **kw):
    """Forward (out, lse) and gradients (q, k, v, learnable PE tables) against the float64 reference."""
    B = len(lens_q)
    cu_q, cu_k = cu_of(lens_q, device), cu_of(lens_k, device)
    tq, tk = sum(lens_q) + extra_rows, sum(lens_k) + extra_rows
    q = rand(tq, heads, head_dim, dtype=dtype, device=device, grad=True)
    k = rand(tk, heads_k, head_dim, dtype=dtype, device=device, grad=True)
    v = rand(tk, heads_k, head_dim, dtype=dtype, device=device, grad=True)
    position, slopes, leaves = make_position(kind, heads=heads, batch=B, total_k=tk, head_dim=head_dim, device=device)
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    args = dict(causal=causal, alibi_slopes=slopes, position=position, backend=backend, **kw)
    snapshot = [t.detach().clone() for t in (q, k, v, cu_q, cu_k)]

    with torch.no_grad():
        out, lse, probs = posattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, return_attn_probs=True, **args)
    assert probs is None
    ro, rl = ref.varlen_attention(q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal=causal,
                                  alibi_slopes=slopes, position=position,
                                  **{n: kw[n] for n in ("softmax_scale", "window_size", "softcap") if n in kw})
    assert out.dtype == dtype and out.shape == (tq, heads, head_dim)
    assert lse.dtype == torch.float32 and lse.shape == (heads, tq)
    assert_close(out, ro, dtype, name="out")
    assert_close(lse, rl, dtype, name="lse")
    # rows outside every sequence: out 0, lse -inf
    end = int(cu_q[-1])
    assert torch.all(out[end:] == 0) and torch.all(lse[:, end:] == float("-inf"))

    out = posattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, **args)
    dout = torch.randn_like(out)
    wrt = [q, k, v] + leaves
    grads = torch.autograd.grad(out, wrt, dout, allow_unused=True)
    wrt64 = [t.detach().to(F64).requires_grad_() for t in (q, k, v)]
    ro, _ = ref.varlen_attention(*wrt64, cu_q, cu_k, causal=causal, alibi_slopes=slopes, position=position,
                                 **{n: kw[n] for n in ("softmax_scale", "window_size", "softcap") if n in kw})
    rgrads = torch.autograd.grad(ro, wrt64 + leaves, dout.to(F64), allow_unused=True)
    for name, g, rg, t in zip(["dq", "dk", "dv"] + [f"d_table{i}" for i in range(len(leaves))], grads, rgrads, wrt):
        g = torch.zeros_like(t) if g is None else g
        rg = torch.zeros_like(t, dtype=F64) if rg is None else rg
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        assert_close(g, rg, dtype, grad=True, name=name)
    # no gradient into rows outside every sequence
    assert torch.all(grads[0][end:] == 0)
    assert torch.all(grads[1][int(cu_k[-1]):] == 0) and torch.all(grads[2][int(cu_k[-1]):] == 0)
    # nothing the caller passed was modified
    for before, after in zip(snapshot, (q, k, v, cu_q, cu_k)):
        assert torch.equal(before, after.detach())


# ------------------------------------------------------------------------------------------------
# varlen attention vs each sequence alone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PE_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_torch_every_encoding(kind, causal, device):
    check_varlen("torch", lens_q=LENS, lens_k=LENS, kind=kind, causal=causal, device=device)


@pytest.mark.interp
@pytest.mark.parametrize("kind,causal", [("none", False), ("rope_position_ids", True), ("learned_phase", True),
                                         ("alibi_per_sequence", False), ("alibi_slopes_arg", True),
                                         ("rope+t5+urpe", True)])
def test_varlen_triton_encodings(kind, causal, device):
    # the per-encoding math of the Triton kernel is tested in test_fused_attention_triton.py; here the
    # varlen plumbing: per-token position ids, per-sequence phases and slopes, tables and their gradients
    check_varlen("triton", lens_q=LENS, lens_k=LENS, kind=kind, causal=causal, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_half_precision(backend, dtype, device):
    check_varlen(backend, lens_q=LENS, lens_k=LENS, dtype=dtype, kind="alibi", causal=True, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cross_attention(backend, causal, device):
    # cu_seqlens_q != cu_seqlens_k: more keys than queries, fewer keys (causal: fully masked rows,
    # out 0 / lse -inf), no keys at all, no queries, a length-1 query
    lens_q = [4, 6, 3, 0, 1, 2]
    lens_k = [9, 2, 0, 5, 7, 2]
    check_varlen(backend, lens_q=lens_q, lens_k=lens_k, kind="relative", causal=causal, device=device)


@pytest.mark.parametrize("kind", ["none", "rope_position_ids", "learned_phase"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_torch_chunk_plans(kind, causal, device, monkeypatch):
    # no call overhead: one chunk per distinct length (uniform chunks, no mask); huge overhead: one
    # padded chunk per alignment class (mask path). Both must give the same exact result.
    lens = [4, 4, 0, 7, 1, 4, 7, 2]
    for overhead in (0.0, 1e12):
        monkeypatch.setattr(V, "CALL_OVERHEAD_FLOPS", overhead)
        check_varlen("torch", lens_q=lens, lens_k=lens, kind=kind, causal=causal, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_all_length_one_and_mqa(backend, device):
    check_varlen(backend, lens_q=[1] * 6, lens_k=[1] * 6, heads=3, heads_k=1, kind="rope", causal=True,
                 device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_window_softcap_scale(backend, device):
    check_varlen(backend, lens_q=LENS, lens_k=LENS, kind="alibi", causal=False, window_size=(3, 1), softcap=2.0,
                 softmax_scale=0.4, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_empty_batches(backend, device):
    # every sequence empty, and a batch of zero sequences: out 0, lse -inf, zero gradients
    for lens in ([0, 0, 0], []):
        cu = cu_of(lens, device)
        q = rand(3, 2, 16, device=device, grad=True)
        k = rand(3, 2, 16, device=device, grad=True)
        v = rand(3, 2, 16, device=device, grad=True)
        with torch.no_grad():
            out, lse, _ = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 0, 0, return_attn_probs=True,
                                                         backend=backend)
        assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        out = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 0, 0, backend=backend)
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert t.grad is not None and torch.all(t.grad == 0)


def test_varlen_packed_variants_match(device):
    lens = [5, 0, 3, 8]
    cu = cu_of(lens, device)
    qkv = rand(sum(lens) + 1, 3, 4, 16, device=device, grad=True)
    out = posattn.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    q, k, v = qkv.detach().unbind(1)
    ro, _ = ref.varlen_attention(q, k, v, cu, cu, causal=True)
    assert_close(out, ro, torch.float32)
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    kv = qkv.detach()[:, 1:].clone()
    out2 = posattn.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max(lens), max(lens), causal=True)
    assert_close(out2, ro, torch.float32)


def test_varlen_lse_gradient_torch(device):
    # a loss on lse is differentiated exactly by the torch backend (dense path)
    lens = [4, 0, 7]
    cu = cu_of(lens, device)
    q, k, v = (rand(11, 2, 8, device=device, grad=True) for _ in range(3))
    out, lse, _ = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, return_attn_probs=True,
                                                 backend="torch")
    w = torch.randn_like(lse)
    g = torch.autograd.grad((lse.nan_to_num(neginf=0) * w).sum() + out.sum(), (q, k))
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    ro, rl = ref.varlen_attention(q64, k64, v64, cu, cu, causal=True)
    rg = torch.autograd.grad((rl.nan_to_num(neginf=0) * w.to(F64)).sum() + ro.sum(), (q64, k64))
    for a, b, n in zip(g, rg, ("dq", "dk")):
        assert_close(a, b, torch.float32, grad=True, name=n)


@pytest.mark.interp
def test_varlen_triton_refuses_lse_gradient(device):
    cu = cu_of([3, 2], device)
    q, k, v = (rand(5, 2, 16, device=device, grad=True) for _ in range(3))
    # the forward is fine (lse may be used without differentiating through it); a gradient into lse is refused
    out, lse, _ = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 3, 3, return_attn_probs=True, backend="triton")
    with pytest.raises(RuntimeError, match="lse"):
        (out.sum() + lse.sum()).backward()


@pytest.mark.interp
def test_triton_launch_writes_every_row(device):
    # NaN-poisoned buffers: every row of every sequence written, rows past the end set to 0 / -inf
    lens = [2, 0, 7, 1]
    cu = cu_of(lens, device)
    q, k, v = (rand(sum(lens) + 2, 2, 16, device=device) for _ in range(3))
    a = V._check_varlen(q, k, v, cu, cu, 7, 7, 0.0, None, True, (-1, -1), 0.0, None, False, None)
    out, lse = poison_like(q), poison_like(torch.empty(2, q.shape[0], device=device))
    V._triton_fwd(q, k, v, out, lse, cu, cu, None, a, 0)
    ro, rl = ref.varlen_attention(q, k, v, cu, cu, causal=True)
    assert_close(out, ro, torch.float32)
    assert_close(lse, rl, torch.float32, name="lse")


def test_varlen_dropout_torch(device):
    lens = [6, 0, 9]
    cu = cu_of(lens, device)
    q, k, v = (rand(15, 2, 8, device=device) for _ in range(3))
    torch.manual_seed(1)
    a = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.3)
    torch.manual_seed(1)
    b = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.3)
    ro, _ = ref.varlen_attention(q, k, v, cu, cu)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert (a.double() - ro).abs().max() > 1e-3  # dropout happened


def test_varlen_auto_on_cpu_is_torch(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("CPU dispatch only")
    called = []
    orig = V._varlen_torch
    monkeypatch.setattr(V, "_varlen_torch", lambda *a, **k: called.append(1) or orig(*a, **k))
    cu = cu_of([2, 3], device)
    q = rand(5, 2, 8)
    posattn.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3)
    assert called


# ------------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument
# ------------------------------------------------------------------------------------------------

def _good(device):
    cu = cu_of([3, 4], device)
    q, k, v = (rand(7, 2, 8, device=device) for _ in range(3))
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=4, max_seqlen_k=4)


BAD = [
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), TypeError),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].float(), TypeError),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"] + 1, ValueError),                    # not starting at 0
    ("cu_seqlens_k", lambda a: torch.tensor([0, 5, 4], dtype=torch.int32), ValueError),  # decreasing
    ("cu_seqlens_k", lambda a: torch.tensor([0, 3], dtype=torch.int32), ValueError),  # wrong length
    ("cu_seqlens_q", lambda a: torch.tensor([0, 3, 9], dtype=torch.int32), ValueError),  # > total
    ("max_seqlen_q", lambda a: 3, ValueError),                                         # < a real length
    ("max_seqlen_k", lambda a: 2, ValueError),
    ("max_seqlen_q", lambda a: 4.0, TypeError),
    ("k", lambda a: a["k"][:, :1].expand(7, 3, 8), ValueError),                        # heads not a divisor
    ("v", lambda a: a["v"][:5], ValueError),
    ("k", lambda a: a["k"].half(), TypeError),
    ("q", lambda a: a["q"][None], ValueError),
    ("q", lambda a: a["q"].long(), TypeError),
]


@pytest.mark.parametrize("arg,make,exc", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_varlen_bad_input(arg, make, exc, device):
    kw = _good(device)
    kw[arg] = make(kw)
    with pytest.raises(exc, match=arg):
        posattn.flash_attn_varlen_func(**kw)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(window_size=(2,)), "window_size"), (dict(softcap=-1.0), "softcap"), (dict(dropout_p=1.0), "dropout_p"),
    (dict(alibi_slopes=torch.rand(3)), "alibi_slopes"), (dict(alibi_slopes=torch.rand(2).double()), "alibi_slopes"),
    (dict(position=RoPE(position_ids=torch.arange(5))), "position_ids"),
    (dict(position=LearnedPhaseRoPE(torch.rand(2, 2, 7) * 0.5 + 0.1)), "freqs"),
    (dict(position=ALiBi(), alibi_slopes=torch.rand(2)), "alibi_slopes"),
    (dict(position=RoPE(scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4})),
     "scaling"),
    (dict(backend="fast"), "backend"), (dict(causal=1), "causal"),
])
def test_varlen_bad_options(kwargs, arg, device):
    kw = _good(device)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=arg):
        posattn.flash_attn_varlen_func(**kw)


def test_varlen_cuda_backend_unavailable_on_cpu():
    kw = _good(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cuda"):
        posattn.flash_attn_varlen_func(**kw, backend="cuda")


# ------------------------------------------------------------------------------------------------
# chunk planning of the torch backend
# ------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), max_size=30), st.booleans())
def test_plan_chunks_covers_each_sequence_once(pairs, cross):
    lens_q = [a for a, _ in pairs]
    lens_k = [a + (d if cross else 0) for a, d in pairs]
    chunks = V.plan_chunks(lens_q, lens_k)
    flat = [b for c in chunks for b in c]
    want = [b for b, (lq, lk) in enumerate(zip(lens_q, lens_k)) if lq > 0 and lk > 0]
    assert sorted(flat) == want
    for c in chunks:
        assert len({lens_k[b] - lens_q[b] for b in c}) == 1  # one bottom-right offset per chunk


# ------------------------------------------------------------------------------------------------
# unpad / pad
# ------------------------------------------------------------------------------------------------

def _masks(device):
    m = torch.tensor([[1, 1, 1, 1, 0, 0, 0],   # right padding
                      [0, 0, 0, 1, 1, 1, 1],   # left padding
                      [1, 0, 1, 1, 0, 0, 1],   # holes
                      [0, 0, 0, 0, 0, 0, 0],   # empty row
                      [1, 1, 1, 1, 1, 1, 1]],  # full row
                     device=device)
    return [m, m.bool(), m.to(torch.int32), (torch.rand(3, 11, device=device) > 0.4).long()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpad_pad_roundtrip_and_grads(dtype, device):
    for mask in _masks(device):
        B, S = mask.shape
        x = rand(B, S, 3, 4, dtype=dtype, device=device, grad=True)
        x0 = x.detach().clone()
        xu, idx, cu, max_seqlen, used = posattn.unpad_input(x, mask)
        rxu, ridx, rcu, rmax, rused = ref.unpad_input(x.detach(), mask)
        assert torch.equal(xu.detach(), rxu) and torch.equal(idx, ridx) and torch.equal(cu, rcu)
        assert cu.dtype == torch.int32 and idx.dtype == torch.int64 and int(cu[0]) == 0
        assert max_seqlen == rmax and isinstance(max_seqlen, int) and torch.equal(used, rused)
        assert torch.equal(cu[1:] - cu[:-1], mask.ne(0).sum(-1).to(torch.int32))
        y = posattn.pad_input(xu, idx, B, S)
        assert torch.equal(y.detach(), ref.pad_input(rxu, ridx, B, S))
        assert torch.equal(y.detach(), x0 * mask.ne(0)[..., None, None].to(dtype))
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx, g * mask.ne(0)[..., None, None].to(dtype))  # padding rows get 0
        assert torch.equal(x.detach(), x0)


def test_unpad_feeds_varlen(device):
    # a padded batch through unpad -> varlen -> pad equals the dense reference with a key-padding mask
    mask = _masks(device)[0]
    B, S = mask.shape
    x = rand(B, S, 2, 8, device=device)
    xu, idx, cu, mx, _ = posattn.unpad_input(x, mask)
    out = posattn.pad_input(posattn.flash_attn_varlen_func(xu, xu, xu, cu, cu, mx, mx), idx, B, S)
    xt = x.transpose(1, 2)
    km = mask.bool()[:, None, None, :]
    ro, _ = ref.attention(xt, xt, xt, attn_mask=km)
    ro = ro.transpose(1, 2) * mask.bool()[..., None, None]
    assert_close(out, ro, torch.float32)


@pytest.mark.parametrize("mask,arg,exc", [
    (lambda d: torch.ones(2, 6, device=d), "attention_mask", TypeError),          # float mask
    (lambda d: torch.ones(2, 5, dtype=torch.bool, device=d), "attention_mask", ValueError),  # wrong shape
    (lambda d: torch.full((2, 6), 2, device=d), "attention_mask", ValueError),     # not 0/1
    (lambda d: [[1] * 6] * 2, "attention_mask", TypeError),
])
def test_unpad_bad_mask(mask, arg, exc, device):
    with pytest.raises(exc, match=arg):
        posattn.unpad_input(rand(2, 6, 4, device=device), mask(device))
    with pytest.raises(ValueError, match="hidden_states"):
        posattn.unpad_input(rand(6, device=device), torch.ones(1, 6, dtype=torch.bool, device=device))


def test_pad_bad_indices(device):
    x = rand(3, 4, device=device)
    with pytest.raises(ValueError, match="indices"):
        posattn.pad_input(x, torch.tensor([0, 1], device=device), 2, 2)          # wrong length
    with pytest.raises(ValueError, match="indices"):
        posattn.pad_input(x, torch.tensor([0, 1, 4], device=device), 2, 2)       # out of range
    with pytest.raises(ValueError, match="indices"):
        posattn.pad_input(x, torch.tensor([0, 1, 1], device=device), 2, 2)       # repeated
    with pytest.raises(TypeError, match="indices"):
        posattn.pad_input(x, torch.tensor([0.0, 1.0, 2.0], device=device), 2, 2)
    with pytest.raises(ValueError, match="batch"):
        posattn.pad_input(x, torch.tensor([0, 1, 2], device=device), -1, 2)


# ------------------------------------------------------------------------------------------------
# CUDA C++ kernels (csrc/varlen.cu): need a GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_unpad_pad_kernels_match_torch():
    from posattn._backends import load_C
    if load_C() is None:
        pytest.skip("posattn._C not built")
    for mask in _masks("cuda") + [(torch.rand(40, 300, device="cuda") > 0.3)]:
        B, S = mask.shape
        x = rand(B, S, 3, 8, dtype=torch.float16, device="cuda", grad=True)
        xu, idx, cu, mx, used = posattn.unpad_input(x, mask)
        rxu, ridx, rcu, rmx, rused = ref.unpad_input(x.detach().cpu(), mask.cpu())
        assert torch.equal(idx.cpu(), ridx) and torch.equal(cu.cpu(), rcu) and mx == rmx
        assert torch.equal(used.cpu(), rused) and torch.equal(xu.detach().cpu(), rxu)
        y = posattn.pad_input(xu, idx, B, S)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        keep = mask.ne(0)[..., None, None].to(x.dtype)
        assert torch.equal(y.detach(), x.detach() * keep) and torch.equal(gx, g * keep)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["none", "alibi", "relative", "t5"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_varlen_forward(kind, causal):
    from posattn._backends import load_C
    if load_C() is None:
        pytest.skip("posattn._C not built")
    lens = [0, 1, 17, 64, 3, 100, 0]
    cu = cu_of(lens, "cuda")
    T = sum(lens) + 2
    q, k, v = (rand(T, 4, 64, dtype=torch.float16, device="cuda") for _ in range(3))
    position, slopes, _ = make_position(kind, heads=4, batch=len(lens), total_k=T, head_dim=64, device="cuda")
    position = None if position is None else [p.__class__(p.table.detach(), **({"max_distance": p.max_distance}
                                                if isinstance(p, RelativeBias) else {"num_buckets": 16,
                                                                                      "max_distance": 40}))
                                              if isinstance(p, (RelativeBias, T5Bias)) else p for p in position]
    with torch.no_grad():
        out, lse, _ = posattn.flash_attn_varlen_func(q, k, v, cu, cu, 100, 100, causal=causal, alibi_slopes=slopes,
                                                     position=position, return_attn_probs=True, backend="cuda")
    ro, rl = ref.varlen_attention(q, k, v, cu, cu, causal=causal, alibi_slopes=slopes, position=position)
    assert_close(out, ro, torch.float16)
    assert_close(lse, rl, torch.float16, name="lse")


@pytest.mark.gpu
def test_triton_varlen_on_gpu():
    check_varlen("triton", lens_q=LENS + [130], lens_k=LENS + [130], head_dim=64, dtype=torch.bfloat16,
                 kind="rope+t5+urpe", causal=True, device=torch.device("cuda"))
