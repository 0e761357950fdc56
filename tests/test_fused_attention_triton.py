"""Triton fused attention kernels (triton_kernels/fused_attention.py) against the float64 reference.

Runs under the Triton interpreter on CPU (``interp``; conftest sets TRITON_INTERPRET=1 without a
GPU) with small blocks (16) so that seqlens 1, 17, 33 leave partial blocks. Each case compares
out, lse and the gradients (dq, dk, dv, and the positional tables / learned phases) with
``posattn.reference.attention`` differentiated in float64, per-dtype tolerances from
tests/tolerances.py, outputs poisoned with NaN before the kernels write them.
"""
import pytest
import torch

from posattn import reference as ref
from posattn.positional import (ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos, kernel_args,
                                parse_position)
from tolerances import assert_close, poison_like

fa = pytest.importorskip("posattn.triton_kernels.fused_attention")

pytestmark = pytest.mark.interp

BLOCK = dict(block_m=16, block_n=16)
F64 = torch.float64


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def _positions(kind, *, batch, heads, seqlen_k, head_dim, device):
    """(position for the reference with float64 leaves, position for the kernel, {name: leaf})."""
    if kind is None:
        return None, None, {}
    if isinstance(kind, (list, tuple)):
        refs, kers, leaves = [], [], {}
        for kd in kind:
            r, k_, lv = _positions(kd, batch=batch, heads=heads, seqlen_k=seqlen_k, head_dim=head_dim, device=device)
            refs.append(r)
            kers.append(k_)
            leaves.update(lv)
        return refs, kers, leaves
    if kind == "rope":
        p = RoPE(10000.0)
        return p, p, {}
    if kind == "rope_partial_ids":  # half layout, rotary_dim < head_dim, shuffled position ids
        ids = torch.randperm(3 * seqlen_k, device=device)[:seqlen_k].sort().values.repeat(batch, 1)
        p = RoPE(500.0, rotary_dim=head_dim // 2, position_ids=ids)
        return p, p, {}
    if kind == "rope_interleaved_yarn":
        p = RoPE(10000.0, rotary_dim=head_dim - 8 if head_dim % 16 else head_dim, interleaved=True,
                 scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
        return p, p, {}
    if kind == "xpos":
        p = XPos(10000.0, scale_base=64.0)  # small scale_base: visible decay at these lengths
        return p, p, {}
    if kind in ("phases", "phases_interleaved"):
        fr = (torch.rand(batch, heads, seqlen_k, device=device, dtype=F64) * 0.5 + 0.4).requires_grad_()
        kw = dict(rotary_dim=head_dim - 8 if head_dim % 16 else head_dim, interleaved=kind == "phases_interleaved")
        return LearnedPhaseRoPE(fr, **kw), LearnedPhaseRoPE(fr.detach().float(), **kw), {"freqs": fr}
    if kind == "alibi":
        return ALiBi(), ALiBi(), {}
    if kind == "relbias":
        t = torch.randn(heads, 2 * 5 + 1, device=device, dtype=F64).requires_grad_()
        return RelativeBias(t, max_distance=5), RelativeBias(t.detach().float(), max_distance=5), {"bias": t}
    if kind in ("t5", "t5_causal"):
        bi = kind == "t5"
        t = torch.randn(8, heads, device=device, dtype=F64).requires_grad_()
        kw = dict(num_buckets=8, max_distance=12, bidirectional=bi)
        return T5Bias(t, **kw), T5Bias(t.detach().float(), **kw), {"bias": t}
    if kind == "urpe":
        t = (1.0 + 0.5 * torch.randn(heads, 2 * 6 + 1, device=device, dtype=F64)).requires_grad_()
        return URPE(t, max_distance=6), URPE(t.detach().float(), max_distance=6), {"urpe": t}
    raise ValueError(kind)


def _check(device, *, dtype=torch.float32, batch=2, seqlen_q=17, seqlen_k=33, heads=4, heads_k=2, head_dim=40,
           head_dim_v=None, causal=False, offset=0, window=(-1, -1), softcap=0.0, position=None, attn_mask=None,
           dropout_p=0.0, seed=0, grads=True, softmax_scale=None):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = _randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device)
    k = _randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device)
    v = _randn(batch, seqlen_k, heads_k, head_dim_v, dtype=dtype, device=device)
    pos_ref, pos_ker, leaves = _positions(position, batch=batch, heads=heads, seqlen_k=seqlen_k, head_dim=head_dim,
                                          device=device)
    pe = kernel_args(pos_ker, batch_size=batch, num_heads=heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                     head_dim=head_dim, offset=offset, device=device)
    opts = dict(softmax_scale=softmax_scale, causal=causal, offset=offset, window_left=window[0],
                window_right=window[1], softcap=softcap, pe=pe, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                **BLOCK)
    out = poison_like(torch.empty(batch, seqlen_q, heads, head_dim_v, dtype=dtype, device=device))
    lse = poison_like(torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=device))
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    fa.fused_attention_fwd(q, k, v, out, lse, **opts)
    assert torch.equal(q, q_in) and torch.equal(k, k_in) and torch.equal(v, v_in), "inputs modified"

    keep = None
    if dropout_p > 0:
        keep = fa.dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, device=device)
    q64, k64, v64 = (t.transpose(1, 2).to(F64).requires_grad_() for t in (q, k, v))
    ro, rl = ref.attention(q64, k64, v64, scale=softmax_scale, causal=causal, offset=offset, window_size=window,
                           softcap=softcap, attn_mask=attn_mask, position=pos_ref, dropout_mask=keep,
                           dropout_p=dropout_p)
    assert_close(out.transpose(1, 2), ro, dtype, name="out")
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse")
    if not grads:
        return out, lse
    dout = _randn(*out.shape, dtype=dtype, device=device)
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    spec = parse_position(pos_ker)
    d_bias = poison_like(pe.bias_table.float()) if spec.bias is not None and pe.bias_mode in (2, 3) else None
    d_urpe = poison_like(pe.urpe_table.float()) if pe.urpe_table is not None else None
    d_ph = poison_like(pe.phases) if pe.phases is not None else None
    fa.fused_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, d_bias_table=d_bias, d_urpe_table=d_urpe,
                           d_phases=d_ph, **opts)
    names = ["dq", "dk", "dv"] + list(leaves)
    wrt = [q64, k64, v64] + list(leaves.values())
    grads_ref = torch.autograd.grad(ro, wrt, dout.transpose(1, 2).to(F64), allow_unused=True)
    got = {"dq": dq.transpose(1, 2), "dk": dk.transpose(1, 2), "dv": dv.transpose(1, 2)}
    if "bias" in leaves:
        got["bias"] = d_bias
    if "urpe" in leaves:
        got["urpe"] = d_urpe
    if "freqs" in leaves:  # chain the kernel's d phases through the cumulated phases, in float64
        r = pe.rotary_dim
        phases64 = ref.learned_phases(leaves["freqs"], r)
        got["freqs"] = torch.autograd.grad(phases64, leaves["freqs"], d_ph.to(F64))[0]
    for name, g_ref in zip(names, grads_ref):
        assert_close(got[name], g_ref, dtype, grad=True, name=name)
    return out, lse


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_gqa(device, dtype):
    _check(device, dtype=dtype, seqlen_q=17, seqlen_k=33, heads=4, heads_k=2, head_dim=40)


@pytest.mark.parametrize("seqlen_q,seqlen_k,offset", [(33, 17, 0), (33, 17, -16), (17, 33, 0), (17, 33, 16),
                                                      (1, 1, 0), (1, 17, 16)])
def test_causal_offsets(device, seqlen_q, seqlen_k, offset):
    # (33, 17, -16): bottom-right with seqlen_q > seqlen_k leaves 16 fully masked rows (out 0, lse -inf)
    out, lse = _check(device, seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=True, offset=offset, heads=2, heads_k=1,
                      batch=1)
    if offset < 0:
        assert torch.all(lse[:, :, : -offset] == float("-inf"))
        assert torch.all(out[:, : -offset] == 0)


def test_mqa_head_dim_64_window_softcap(device):
    _check(device, seqlen_q=33, seqlen_k=33, heads=3, heads_k=1, head_dim=64, window=(5, 3), softcap=2.5, batch=1)


def test_window_only_left_offset(device):
    _check(device, seqlen_q=17, seqlen_k=33, heads=2, heads_k=2, window=(7, -1), offset=16, batch=1,
           head_dim_v=24)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask(device, kind):
    b, h, sq, sk = 2, 2, 17, 33
    if kind == "bool":  # (seqlen_q, seqlen_k) broadcast over batch and heads; row 3 fully masked
        m = torch.rand(sq, sk, device=device) > 0.3
        m[3] = False
    else:  # (batch, 1, seqlen_q, seqlen_k) float with -inf entries
        m = torch.randn(b, 1, sq, sk, device=device)
        m[torch.rand(b, 1, sq, sk, device=device) < 0.2] = float("-inf")
    out, lse = _check(device, batch=b, heads=h, heads_k=1, seqlen_q=sq, seqlen_k=sk, attn_mask=m)
    if kind == "bool":
        assert torch.all(lse[:, :, 3] == float("-inf")) and torch.all(out[:, 3] == 0)


@pytest.mark.parametrize("position,causal,dtype", [
    ("rope", False, torch.float32),
    ("rope_partial_ids", True, torch.float32),
    ("rope_interleaved_yarn", False, torch.float16),
    ("xpos", True, torch.float32),
    ("phases", True, torch.float32),
    ("phases_interleaved", False, torch.bfloat16),
    ("alibi", False, torch.float32),
    ("alibi", True, torch.float16),
    ("relbias", False, torch.float32),
    ("t5", False, torch.float32),
    ("t5_causal", True, torch.float32),
    ("urpe", False, torch.float32),
    (["rope", "alibi"], True, torch.float32),
    (["rope", "t5"], False, torch.bfloat16),
    (["relbias", "urpe"], True, torch.float32),
])
def test_positional(device, position, causal, dtype):
    _check(device, dtype=dtype, position=position, causal=causal, offset=16, seqlen_q=17, seqlen_k=33, batch=1,
           heads=4, heads_k=2)


def test_positional_head_dim_64_seqlen_q_longer(device):
    # seqlen_q > seqlen_k with top-left alignment, xPos (non-causal) + URPE at head_dim 64
    _check(device, position=["xpos", "urpe"], seqlen_q=33, seqlen_k=17, head_dim=64, heads=2, heads_k=1, batch=1,
           softmax_scale=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout(device, dtype):
    p = 0.3
    keep = fa.dropout_keep_mask(2, 2, 17, 33, p, 1234, device=device)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.05, frac
    assert not torch.equal(keep, fa.dropout_keep_mask(2, 2, 17, 33, p, 1235, device=device))
    assert torch.equal(keep, fa.dropout_keep_mask(2, 2, 17, 33, p, 1234, device=device))
    _check(device, dtype=dtype, heads=2, heads_k=1, dropout_p=p, seed=1234, position="urpe", causal=True, offset=16)


def test_strided_inputs_and_determinism(device):
    # q, k, v as views of one packed (batch, seqlen, 3, heads, head_dim) tensor: non-contiguous
    b, s, h, d = 2, 17, 2, 32
    qkv = torch.randn(b, s, 3, h, d, device=device)
    q, k, v = qkv.unbind(2)
    pe = kernel_args(None, batch_size=b, num_heads=h, seqlen_q=s, seqlen_k=s, head_dim=d, offset=0, device=device)
    out = poison_like(torch.empty(b, s, h, d, device=device))
    lse = poison_like(torch.empty(b, h, s, device=device))
    opts = dict(causal=True, offset=0, pe=pe, **BLOCK)
    fa.fused_attention_fwd(q, k, v, out, lse, **opts)
    ro, rl = ref.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert_close(out.transpose(1, 2), ro, torch.float32)
    dout = torch.randn_like(out)
    results = []
    for _ in range(2):
        dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
        fa.fused_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, **opts)
        results.append((dq, dk, dv))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_), "backward is not bitwise reproducible"


@pytest.mark.parametrize("position", [None, ["rope", "relbias"]])
def test_varlen(device, position):
    # sequences of lengths q (5, 0, 17, 3), k (9, 4, 17, 0); a zero-length sequence on each side;
    # bottom-right causal per sequence (offset=None); one padding row past cu_seqlens[-1]
    lq, lk = [5, 0, 17, 3], [9, 4, 17, 0]
    h, hk, d = 4, 2, 40
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=device)
    tq, tk = sum(lq) + 1, sum(lk) + 1
    q = torch.randn(tq, h, d, device=device)
    k = torch.randn(tk, hk, d, device=device)
    v = torch.randn(tk, hk, d, device=device)
    maxq, maxk = max(lq), max(lk)
    tables = {}
    if position is not None:
        tables["bias"] = torch.randn(h, 2 * 4 + 1, device=device, dtype=F64).requires_grad_()
        pos_ker = [RoPE(10000.0), RelativeBias(tables["bias"].detach().float(), max_distance=4)]
        pe = kernel_args(pos_ker, batch_size=len(lq), num_heads=h, seqlen_q=maxq, seqlen_k=maxk, head_dim=d,
                         offset=0, device=device)
    else:
        pe = kernel_args(None, batch_size=len(lq), num_heads=h, seqlen_q=maxq, seqlen_k=maxk, head_dim=d, offset=0,
                         device=device)
    opts = dict(causal=True, offset=None, pe=pe, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=maxq,
                max_seqlen_k=maxk, **BLOCK)
    out = poison_like(q)
    lse = poison_like(torch.empty(h, tq, device=device))
    fa.fused_attention_fwd(q, k, v, out, lse, **opts)
    assert torch.isnan(out[-1]).all() and torch.isnan(lse[:, -1]).all(), "rows past cu_seqlens_q[-1] were written"
    dout = torch.randn_like(out)
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    d_bias = poison_like(pe.bias_table) if position is not None else None
    fa.fused_attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, d_bias_table=d_bias, **opts)
    d_bias_ref = torch.zeros(h, 9, dtype=F64, device=device)
    for b in range(len(lq)):
        sq_, sk_ = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lq[b] == 0:
            if lk[b]:  # keys no query sees: zero gradient
                assert torch.all(dk[sk_] == 0) and torch.all(dv[sk_] == 0)
            continue
        q64, k64, v64 = (t[s].unsqueeze(0).transpose(1, 2).to(F64).requires_grad_() for t, s in
                         ((q, sq_), (k, sk_), (v, sk_)))
        pos_ref = None
        if position is not None:
            pos_ref = [RoPE(10000.0), RelativeBias(tables["bias"], max_distance=4)]
        ro, rl = ref.attention(q64, k64, v64, causal=True, offset=lk[b] - lq[b], position=pos_ref)
        assert_close(out[sq_].unsqueeze(0).transpose(1, 2), ro, torch.float32, name=f"out[{b}]")
        assert_close(lse[:, sq_].unsqueeze(0), rl, torch.float32, name=f"lse[{b}]")
        wrt = [q64, k64, v64] + ([tables["bias"]] if position is not None else [])
        g = torch.autograd.grad(ro, wrt, dout[sq_].unsqueeze(0).transpose(1, 2).to(F64), allow_unused=True)
        g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt)]
        assert_close(dq[sq_].unsqueeze(0).transpose(1, 2), g[0], torch.float32, grad=True, name=f"dq[{b}]")
        if lk[b]:
            assert_close(dk[sk_].unsqueeze(0).transpose(1, 2), g[1], torch.float32, grad=True, name=f"dk[{b}]")
            assert_close(dv[sk_].unsqueeze(0).transpose(1, 2), g[2], torch.float32, grad=True, name=f"dv[{b}]")
        if position is not None:
            d_bias_ref += g[3]
    assert torch.isnan(dq[-1]).all() and torch.isnan(dk[-1]).all(), "rows past cu_seqlens[-1] were written"
    if position is not None:
        assert_close(d_bias, d_bias_ref, torch.float32, grad=True, name="d_bias_table")


def test_configs_cover_head_dims():
    for configs in (fa.FWD_CONFIGS, fa.BWD_CONFIGS):
        for d in (16, 40, 64, 72, 128, 256):
            for kind in fa.CONFIG_KINDS:
                for arch in fa.ARCH_FAMILIES:
                    cfg = fa.config_for(configs, d, kind, arch)
                    assert {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} <= set(cfg)
                    assert set(cfg) <= {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "dq_BLOCK_M", "dq_BLOCK_N",
                                        "dq_num_warps", "dq_num_stages", "split_dkdv", "split_dk"}, cfg
    # an "sm<arch>" entry overrides its arch only
    assert fa.config_for(fa.BWD_CONFIGS, 128, "phases", 80)["BLOCK_N"] == 32
    assert fa.config_for(fa.BWD_CONFIGS, 128, "phases", 90)["BLOCK_N"] == 64
    with pytest.raises(ValueError, match="arch"):
        fa.config_for(fa.FWD_CONFIGS, 64, "plain", 75)
    with pytest.raises(ValueError, match="head_dim"):
        fa.config_for(fa.FWD_CONFIGS, 512)
    with pytest.raises(ValueError, match="kind"):
        fa.config_for(fa.FWD_CONFIGS, 64, "alibi")


# ------------------------------------------------------------------------------------------------
# rotary angles: range reduction + cos / sin (positional.cos_sin)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from posattn.triton_kernels.positional import cos_sin, reduce_angle  # noqa: E402


@triton.jit
def _cos_sin_probe(A, C, S, R, n, FAST_TRIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    a = tl.load(A + offs, mask=ok, other=0.0)
    c, s = cos_sin(a, FAST_TRIG)
    tl.store(C + offs, c, mask=ok)
    tl.store(S + offs, s, mask=ok)
    tl.store(R + offs, reduce_angle(a), mask=ok)


def test_rotary_angle_reduction(device):
    # fp32 angles pos * inv_freq for positions up to 1e6 (inv_freq 1 and RoPE-like smaller ones),
    # plus the edges (0, +-pi, multiples of 2 pi, negatives): cos / sin must match float64 cos / sin
    # of the exact fp32 angle to 1e-6 absolute (libm path under the interpreter, sin/cos.approx
    # on a GPU, same reduction bits on both since tl.fma rounds once everywhere).
    pos = torch.cat([torch.arange(0, 4096), torch.randint(0, 1_000_001, (4096,)), torch.tensor([999_999, 10**6])])
    freq = torch.tensor([1.0, 0.5, 1e-1, 1e-2, 1e-4], dtype=torch.float32)
    ang = (pos.float()[:, None] * freq[None, :]).flatten()
    edges = torch.tensor([0.0, 3.1415925, 3.1415927, -3.1415927, 6.2831855, -6.2831855, 1e6, -1e6, -12345.678,
                          4.0, -4.0, 2.0**23, 1e-30], dtype=torch.float32)
    a = torch.cat([ang, -ang[:1000], edges]).to(device)
    n = a.numel()
    c, s, r = (torch.full_like(a, float("nan")) for _ in range(3))
    _cos_sin_probe[(triton.cdiv(n, 1024),)](a, c, s, r, n, FAST_TRIG=not fa._interpreting(), BLOCK=1024)
    a64 = a.double().cpu()
    err_c = (c.double().cpu() - torch.cos(a64)).abs().max().item()
    err_s = (s.double().cpu() - torch.sin(a64)).abs().max().item()
    assert err_c <= 1e-6 and err_s <= 1e-6, (err_c, err_s)
    # the reduced angle itself: a - 2 pi k to ~2.5e-7, in [-pi, pi] up to the fp32 rounding of
    # a / (2 pi) that picks k (|r| <= pi + 2 pi ulp(a / 2 pi) <= pi + 2**-23 |a|)
    r64 = r.double().cpu()
    assert bool((r64.abs() <= torch.pi + 1e-6 + a64.abs() * 2.0**-23).all())
    k = torch.round((a64 - r64) / (2 * torch.pi))
    assert (r64 - (a64 - 2 * torch.pi * k)).abs().max().item() <= 2.5e-7


@pytest.mark.parametrize("position,dtype", [(None, torch.float16), (["rope", "relbias"], torch.bfloat16),
                                            ("phases", torch.float32)])
def test_default_configs(device, position, dtype):
    # the launch configs a GPU gets (no block overrides): BLOCK_M != BLOCK_N, dq kernel blocks that
    # differ from the dk/dv kernel's, the transposed dk/dv orientation, a partial last block
    global BLOCK
    saved, BLOCK = BLOCK, {}
    try:
        _check(device, dtype=dtype, position=position, causal=True, offset=0, seqlen_q=70, seqlen_k=70, batch=1,
               heads=2, heads_k=1, head_dim=64)
    finally:
        BLOCK = saved


def test_rotary_head_dim_16(device):
    # head_dim 16 with rotary: padded to 32 so each half tile is a tl.dot operand (K >= 16)
    _check(device, position="rope_interleaved_yarn", head_dim=16, seqlen_q=17, seqlen_k=17, heads=2, heads_k=1,
           batch=1, causal=True)


@pytest.mark.parametrize("split,position", [("dkdv", None), ("dkdv", "rope"), ("dkdv", "phases"),
                                            ("dk", "rope"), ("dk", "phases"), ("dk", ["rope", "relbias"])])
def test_split_dkdv_launches(device, monkeypatch, split, position):
    # head_dim 256 runs the dk/dv kernel as separate launches (dv, then dk; with "split_dk" and rotary the
    # rotated-space dk in two halves through an fp32 buffer): the same gradients, here forced at head_dim 64
    # with GQA, a partial last block and causal alignment
    cfg = {"split_dkdv": True, "split_dk": split == "dk"}
    for key in [k for k in fa.BWD_CONFIGS if k == 64 or (isinstance(k, tuple) and k[0] == 64)]:
        monkeypatch.setitem(fa.BWD_CONFIGS, key, dict(fa.BWD_CONFIGS[key], **cfg))
    torch.manual_seed(0)
    # fp32 with learned phases: their freqs gradient cancels to ~0 at t = 0 (a global rotation changes
    # nothing), beyond fp16's atol (test_fuzz_*.py cover fp16 with norm floors)
    dtype = torch.float32 if position == "phases" else torch.float16
    _check(device, dtype=dtype, position=position, causal=True, seqlen_q=23, seqlen_k=37, batch=1,
           heads=4, heads_k=2, head_dim=64)


def test_sm80_configs(device):
    # the launches an sm_80 GPU gets (fa.force_target_arch): 32-key dk/dv programs at 4 warps with learned
    # phases at head_dim 128, checked for correctness here (their resources: tests/test_compile.py)
    global BLOCK
    saved, BLOCK = BLOCK, {}
    try:
        with fa.force_target_arch(80):
            assert fa.config_for(fa.BWD_CONFIGS, 128, "phases", fa.target_arch(device))["BLOCK_N"] == 32
            torch.manual_seed(0)
            _check(device, dtype=torch.float32, position="phases", causal=True, seqlen_q=40, seqlen_k=40, batch=1,
                   heads=2, heads_k=1, head_dim=128)
            _check(device, dtype=torch.float16, position=["rope", "relbias"], causal=True, seqlen_q=40, seqlen_k=40,
                   batch=1, heads=2, heads_k=1, head_dim=128)
    finally:
        BLOCK = saved
