"""reference.attention (float64 dense attention with positional encodings) against independent
formulations: torch SDPA in float64, explicit masks, hand-built bias matrices, complex-number RoPE,
and autograd gradcheck. This is the oracle every kernel test relies on, so it is tested directly."""
import math

import pytest
import torch
import torch.nn.functional as F

from posattn import reference as R
from posattn.positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos

f64 = torch.float64


def _qkv(B=2, H=4, Hkv=None, Sq=5, Sk=7, D=8, Dv=None, dtype=f64, requires_grad=False):
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Sq, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, Hkv, Sk, Dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def _dense(q, k, v, bias=None, allowed=None, scale=None, post=None):
    """Plain materialised softmax attention, written independently of reference.attention."""
    D = q.shape[-1]
    s = q @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    if post is not None:
        p = p * post
    return p @ v, lse


# ---------------------------------------------------------------- vs torch SDPA (float64)

@pytest.mark.parametrize("Sq, Sk", [(5, 7), (7, 5), (1, 6), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(Sq, Sk, causal):
    q, k, v = _qkv(Sq=Sq, Sk=Sk, Dv=6)
    out, lse = R.attention(q, k, v, causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.dtype == f64 and out.shape == (2, 4, Sq, 6) and lse.shape == (2, 4, Sq)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    allowed = torch.ones(Sq, Sk, dtype=torch.bool).tril() if causal else None
    _, want_lse = _dense(q, k, v, allowed=allowed)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_matches_sdpa_masks_scale_gqa():
    q, k, v = _qkv(H=6, Hkv=2, Sq=5, Sk=9)
    bool_mask = torch.rand(2, 1, 5, 9) > 0.3
    bool_mask[..., 0] = True  # keep every row alive (SDPA gives NaN for fully masked rows)
    float_mask = torch.randn(5, 9, dtype=f64)
    for mask in (bool_mask, float_mask):
        out, _ = R.attention(q, k, v, attn_mask=mask, scale=0.37)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.37, enable_gqa=True)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_are_upcast():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out, lse = R.attention(q, k, v, causal=True)
    assert out.dtype == f64 and lse.dtype == f64
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- alignment, window, softcap

@pytest.mark.parametrize("Sq, Sk", [(3, 8), (8, 3), (5, 5)])
def test_bottom_right_causal_vs_explicit_mask(Sq, Sk):
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    out, lse = R.attention(q, k, v, causal=True, offset=Sk - Sq)
    allowed = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    live = allowed.any(-1)
    want, want_lse = _dense(q, k, v, allowed=allowed)
    torch.testing.assert_close(out[:, :, live], want[:, :, live], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[:, :, live], want_lse[:, :, live], rtol=1e-12, atol=1e-12)
    # rows above the diagonal (Sq > Sk) see no key: out 0, lse -inf
    assert torch.equal(out[:, :, ~live], torch.zeros_like(out[:, :, ~live]))
    assert bool((lse[:, :, ~live] == -math.inf).all())


@pytest.mark.parametrize("window, causal, offset", [((2, 1), False, 0), ((3, -1), False, 2), ((-1, 0), False, 0),
                                                    ((1, 5), True, 2), ((0, 0), False, 1)])
def test_window_vs_explicit_mask(window, causal, offset):
    Sq, Sk = 6, 8
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    out, lse = R.attention(q, k, v, window_size=window, causal=causal, offset=offset)
    i = torch.arange(Sq)[:, None] + offset
    j = torch.arange(Sk)[None]
    allowed = torch.ones(Sq, Sk, dtype=torch.bool)
    if window[0] >= 0:
        allowed &= j >= i - window[0]
    if window[1] >= 0:
        allowed &= j <= i + window[1]
    if causal:
        allowed &= j <= i
    assert allowed.any(-1).all()
    want, want_lse = _dense(q, k, v, allowed=allowed)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_softcap_then_bias_order():
    q, k, v = _qkv(Sq=4, Sk=6)
    q = q * 4  # logits large enough for the cap to matter
    slopes = torch.rand(4, dtype=f64)
    out, lse = R.attention(q, k, v, softcap=2.5, position=ALiBi(slopes), causal=True, offset=2)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    s = 2.5 * torch.tanh(s / 2.5)
    i = torch.arange(4)[:, None] + 2
    j = torch.arange(6)[None]
    s = s - slopes.view(1, 4, 1, 1) * (i - j).abs()
    s = s.masked_fill(j > i, -math.inf)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- fully masked rows

def test_fully_masked_rows_give_zero_and_minus_inf_without_nan_grads():
    q, k, v = _qkv(Sq=4, Sk=5, requires_grad=True)
    mask = torch.ones(2, 4, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = False
    mask[1, :, 0] = False
    out, lse = R.attention(q, k, v, attn_mask=mask, position=RelativeBias(torch.randn(4, 5, dtype=f64),
                                                                           max_distance=2))
    assert torch.equal(out[0, 1, 2], torch.zeros(8, dtype=f64)) and lse[0, 1, 2].item() == -math.inf
    assert torch.equal(out[1, :, 0], torch.zeros(4, 8, dtype=f64)) and bool((lse[1, :, 0] == -math.inf).all())
    assert torch.isfinite(out).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 1, 2], torch.zeros(8, dtype=f64))


def test_float_mask_with_minus_inf_rows():
    q, k, v = _qkv(Sq=3, Sk=4)
    mask = torch.zeros(3, 4, dtype=f64)
    mask[1] = -math.inf
    out, lse = R.attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])) and bool((lse[:, :, 1] == -math.inf).all())
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- positional encodings

def _rope_rotate(x, pos, inv_freq):
    """Half-rotated RoPE via complex multiplication; x (B, H, S, d), pos (S,) or (B, S)."""
    r = 2 * inv_freq.numel()
    z = torch.complex(x[..., : r // 2], x[..., r // 2: r])
    pos = pos if pos.dim() == 2 else pos[None]
    ang = pos[:, None, :, None].double() * inv_freq
    z = z * torch.polar(torch.ones_like(ang), ang)
    return torch.cat((z.real, z.imag, x[..., r:]), dim=-1)


@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_rope_vs_prerotated_sdpa(rotary_dim):
    q, k, v = _qkv(H=4, Hkv=2, Sq=4, Sk=7)
    out, _ = R.attention(q, k, v, causal=True, offset=3, position=RoPE(10000.0, rotary_dim=rotary_dim))
    inv = R.rope_inv_freq(8, 10000.0, rotary_dim)
    qr = _rope_rotate(q, torch.arange(4) + 3, inv)
    kr = _rope_rotate(k, torch.arange(7), inv)
    mask = torch.ones(4, 7, dtype=torch.bool).tril(diagonal=3)
    want = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_rope_position_ids_and_shift_invariance():
    q, k, v = _qkv(Sq=6, Sk=6)
    ids = torch.stack([torch.arange(6) * 3, torch.arange(6) + 5])
    out, _ = R.attention(q, k, v, position=RoPE(position_ids=ids))
    inv = R.rope_inv_freq(8, 10000.0)
    want = F.scaled_dot_product_attention(_rope_rotate(q, ids, inv), _rope_rotate(k, ids, inv), v)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    shifted, _ = R.attention(q, k, v, position=RoPE(position_ids=ids + 1000))
    torch.testing.assert_close(shifted, out, rtol=1e-9, atol=1e-10)
    # default positions are arange; the offset moves the queries only
    a, _ = R.attention(q[:, :, 2:], k, v, offset=2, position=RoPE())
    b, _ = R.attention(q, k, v, position=RoPE())
    torch.testing.assert_close(a, b[:, :, 2:], rtol=1e-12, atol=1e-12)


def test_yarn_attention_factor_scales_rotated_logits():
    q, k, v = _qkv(Sq=3, Sk=5)
    cfg = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    out, lse = R.attention(q, k, v, position=RoPE(scaling=cfg))
    inv = R.rope_inv_freq(8, 10000.0, None, cfg)
    af = 0.1 * math.log(4.0) + 1
    want, want_lse = _dense(_rope_rotate(q, torch.arange(3), inv) * af, _rope_rotate(k, torch.arange(5), inv) * af, v)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_alibi_vs_explicit_bias():
    H = 6
    q, k, v = _qkv(H=H, Hkv=3, Sq=5, Sk=8)
    out, lse = R.attention(q, k, v, causal=True, offset=3, position=ALiBi())
    exps = [-2, -4, -6, -8, -1, -3]  # ALGORITHMS.md 5.2, H = 6
    i = torch.arange(5)[:, None] + 3
    j = torch.arange(8)[None]
    bias = torch.stack([-(2.0 ** e) * (i - j).abs().double() for e in exps])[None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(j > i, -math.inf), enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # per-batch slopes, non-causal (symmetric |i - j|)
    slopes = torch.rand(2, H, dtype=f64)
    out, _ = R.attention(q, k, v, position=ALiBi(slopes))
    bias = -slopes[:, :, None, None] * (torch.arange(5)[:, None] - torch.arange(8)[None]).abs()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_relative_bias_and_t5_vs_explicit_bias():
    q, k, v = _qkv(H=3, Sq=4, Sk=9)
    table = torch.randn(3, 7, dtype=f64)
    out, _ = R.attention(q, k, v, offset=2, position=RelativeBias(table, max_distance=3))
    bias = torch.empty(3, 4, 9, dtype=f64)
    for h in range(3):
        for i in range(4):
            for j in range(9):
                bias[h, i, j] = table[h, min(3, max(-3, j - (i + 2))) + 3]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-12, atol=1e-12)

    t5 = torch.randn(8, 3, dtype=f64)
    out, _ = R.attention(q, k, v, scale=1.0, position=T5Bias(t5, num_buckets=8, max_distance=6, bidirectional=False))
    bias = R.t5_bias(t5, torch.arange(4)[None], torch.arange(9)[None], 8, 6, False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0),
                               rtol=1e-12, atol=1e-12)
    assert R.position_bias(T5Bias(t5, num_buckets=8, max_distance=6, bidirectional=False), batch_size=2, num_heads=3,
                           seqlen_q=4, seqlen_k=9).equal(bias)


def test_xpos_scores_depend_only_on_distance_in_attention():
    q, k, v = _qkv(Sq=5, Sk=5)
    out, lse = R.attention(q, k, v, causal=True, position=XPos(scale_base=16.0))
    # the same problem placed further along (keys padded in front, masked out) gives the same result
    pad = 7
    kp = torch.cat((torch.randn(2, 4, pad, 8, dtype=f64), k), dim=2)
    vp = torch.cat((torch.randn(2, 4, pad, 8, dtype=f64), v), dim=2)
    mask = torch.ones(5, 5 + pad, dtype=torch.bool)
    mask[:, :pad] = False
    out2, lse2 = R.attention(q, kp, vp, causal=True, offset=pad, attn_mask=mask, position=XPos(scale_base=16.0))
    torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse2, lse, rtol=1e-10, atol=1e-10)


def test_urpe_ones_is_plain_attention_and_matches_explicit_product():
    q, k, v = _qkv(Sq=5, Sk=6)
    plain, plain_lse = R.attention(q, k, v, causal=True, offset=1)
    out, lse = R.attention(q, k, v, causal=True, offset=1, position=URPE(torch.ones(4, 9, dtype=f64), max_distance=4))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    table = torch.rand(4, 5, dtype=f64) + 0.5
    out, lse = R.attention(q, k, v, causal=True, offset=1, position=URPE(table, max_distance=2))
    i = torch.arange(5)[:, None] + 1
    j = torch.arange(6)[None]
    C = table[:, (j - i).clamp(-2, 2) + 2]  # (H, Sq, Sk)
    want, want_lse = _dense(q, k, v, allowed=j <= i, post=C)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)  # normaliser unchanged


@pytest.mark.parametrize("interleaved", [False, True])
def test_carope_constant_freqs_equals_rope(interleaved):
    q, k, v = _qkv(H=4, Hkv=2, Sq=4, Sk=6)
    r = 6
    theta1 = 10000.0 ** (-2 / r)
    freqs = torch.full((1, 4, 6), theta1, dtype=f64)
    a, la = R.attention(q, k, v, causal=True, offset=2, position=LearnedPhaseRoPE(freqs, rotary_dim=r,
                                                                                   interleaved=interleaved))
    b, lb = R.attention(q, k, v, causal=True, offset=2, position=RoPE(rotary_dim=r, interleaved=interleaved))
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(la, lb, rtol=1e-11, atol=1e-11)


def test_dropout_mask_scales_kept_probabilities():
    q, k, v = _qkv(Sq=4, Sk=5)
    keep = torch.rand(2, 4, 4, 5) > 0.25
    out, lse = R.attention(q, k, v, dropout_mask=keep, dropout_p=0.25)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(out, (p * keep / 0.75) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1), rtol=1e-12, atol=1e-12)


def test_combined_rope_bias_urpe_vs_manual():
    q, k, v = _qkv(H=2, Sq=3, Sk=5)
    table = torch.randn(2, 5, dtype=f64)
    ut = torch.rand(2, 3, dtype=f64) + 0.5
    out, _ = R.attention(q, k, v, offset=2, position=[URPE(ut, max_distance=1), RoPE(),
                                                      RelativeBias(table, max_distance=2)])
    inv = R.rope_inv_freq(8, 10000.0)
    i = torch.arange(3)[:, None] + 2
    j = torch.arange(5)[None]
    bias = table[:, (j - i).clamp(-2, 2) + 2]
    C = ut[:, (j - i).clamp(-1, 1) + 1]
    want, _ = _dense(_rope_rotate(q, torch.arange(3) + 2, inv), _rope_rotate(k, torch.arange(5), inv), v, bias=bias,
                     post=C)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- gradients

def test_gradcheck_relative_bias_table():
    q, k, v = _qkv(B=1, H=2, Hkv=1, Sq=3, Sk=4, D=4, Dv=3, requires_grad=True)
    table = torch.randn(2, 5, dtype=f64, requires_grad=True)

    def fn(q, k, v, table):
        out, lse = R.attention(q, k, v, causal=True, offset=1, position=[RelativeBias(table, max_distance=2), RoPE()])
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, table))


def test_gradcheck_urpe_table_and_carope_freqs():
    q, k, v = _qkv(B=1, H=2, Sq=3, Sk=3, D=4, Dv=2, requires_grad=True)
    ut = (torch.rand(2, 5, dtype=f64) + 0.5).requires_grad_()
    freqs = (torch.rand(1, 2, 3, dtype=f64) * 0.8 + 0.1).requires_grad_()

    def fn(q, k, v, ut, freqs):
        out, _ = R.attention(q, k, v, position=[URPE(ut, max_distance=2), LearnedPhaseRoPE(freqs)])
        return out

    assert torch.autograd.gradcheck(fn, (q, k, v, ut, freqs))


def test_gradcheck_alibi_slopes_softcap_float_mask():
    q, k, v = _qkv(B=1, H=2, Sq=2, Sk=3, D=4, requires_grad=True)
    slopes = torch.rand(2, dtype=f64, requires_grad=True)
    mask = torch.randn(2, 3, dtype=f64, requires_grad=True)

    def fn(q, k, v, slopes, mask):
        return R.attention(q, k, v, softcap=1.5, attn_mask=mask, position=ALiBi(slopes))[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, slopes, mask))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=torch.randn(2, 3, 7, 8)), ValueError, "num_heads_k"),
    (dict(k=torch.randn(2, 4, 7, 6)), ValueError, "k:"),
    (dict(v=torch.randn(2, 4, 6, 8)), ValueError, "v:"),
    (dict(q=torch.randn(4, 5, 8)), ValueError, "q:"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 8))), TypeError, "q:"),
    (dict(attn_mask=torch.ones(3, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(dropout_p=0.1), ValueError, "dropout_mask"),
    (dict(dropout_p=1.0, dropout_mask=torch.ones(1, dtype=torch.bool)), ValueError, "dropout_p"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(window_size=(2,)), ValueError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\]"),
    (dict(offset=1.5), TypeError, "offset"),
    (dict(causal=1), TypeError, "causal"),
    (dict(position=RelativeBias(torch.zeros(3, 5), max_distance=2)), ValueError, r"position\.table"),
    (dict(position=[RoPE(), T5Bias(torch.zeros(32, 2))]), ValueError, r"position\[1\]\.table"),
    (dict(position=[RoPE(), XPos()]), ValueError, r"position\[1\]"),
    (dict(position=LearnedPhaseRoPE(torch.full((2, 4, 5), 0.5))), ValueError, r"position\.freqs"),
    (dict(position=RoPE(position_ids=torch.arange(5))), ValueError, "position_ids"),
    (dict(position=ALiBi(torch.ones(3))), ValueError, r"position\.slopes"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    q, k, v = _qkv(Sq=5, Sk=7)
    args = dict(q=q, k=k, v=v)
    args.update({n: kwargs.pop(n) for n in ("q", "k", "v") if n in kwargs})
    with pytest.raises(exc, match=match):
        R.attention(args["q"], args["k"], args["v"], **kwargs)


def test_no_keys_and_no_queries():
    q, k, v = _qkv(Sq=3, Sk=0, Dv=5)
    out, lse = R.attention(q, k, v)
    assert torch.equal(out, torch.zeros(2, 4, 3, 5, dtype=f64)) and bool((lse == -math.inf).all())
    q, k, v = _qkv(Sq=0, Sk=4)
    out, lse = R.attention(q, k, v, causal=True, position=RoPE())
    assert out.shape == (2, 4, 0, 8) and lse.shape == (2, 4, 0)


def test_docstring_examples_run():
    """The examples in this section's docstrings (CI runs plain pytest, not --doctest-modules)."""
    import doctest

    import posattn.positional as P

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    objs = [P] + [getattr(R, n) for n in ("rope_inv_freq", "apply_rotary", "alibi_slopes", "t5_bucket",
                                           "learned_phases", "attention", "position_bias")]
    ran = 0
    for obj in objs:
        for test in finder.find(obj, globs={"torch": torch, **vars(R), **vars(P)}):
            if obj is not P and test.name.split(".")[-1] != obj.__name__:
                continue
            runner.run(test)
            ran += len(test.examples)
    assert ran > 20
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed (see output above)"


def test_inputs_not_modified():
    q, k, v = _qkv()
    copies = [t.clone() for t in (q, k, v)]
    table = torch.randn(4, 5, dtype=f64)
    tcopy = table.clone()
    R.attention(q, k, v, causal=True, position=[RoPE(), RelativeBias(table, max_distance=2)])
    for t, c in zip((q, k, v, table), copies + [tcopy]):
        assert torch.equal(t, c)
