"""Positional encodings: the data classes (validation, kernel_args) and the reference PE math
(python/posattn/positional.py and the PE helpers of reference.py), each checked against an
independent formulation or the worked values of ALGORITHMS.md section 5."""
import math

import pytest
import torch

from posattn import reference as R
from posattn.positional import (ALiBi, KernelPE, LearnedPhaseRoPE, PositionSpec, RelativeBias, RoPE, T5Bias, URPE,
                                XPos, kernel_args, parse_position)

CPU = torch.device("cpu")


# ---------------------------------------------------------------- ALiBi slopes (ALGORITHMS.md 5.2)

@pytest.mark.parametrize("num_heads, exponents", [
    (8, [-1, -2, -3, -4, -5, -6, -7, -8]),
    (6, [-2, -4, -6, -8, -1, -3]),
    (12, [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]),
    (1, [-8]),
])
def test_alibi_slopes_paper_values(num_heads, exponents):
    got = R.alibi_slopes(num_heads)
    want = torch.tensor([2.0 ** e for e in exponents], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    # the kernel-facing copy: fp32, (batch, heads), every row the same
    ks = ALiBi().get_slopes(3, num_heads, CPU)
    assert ks.dtype == torch.float32 and ks.shape == (3, num_heads) and ks.is_contiguous()
    torch.testing.assert_close(ks, want.float().expand(3, -1))


def test_alibi_bias_formula():
    slopes = torch.rand(2, 3, dtype=torch.float64) + 0.1
    pq = torch.arange(4)[None] + 2
    pk = torch.arange(6)[None]
    b = R.alibi_bias(slopes, pq, pk)
    assert b.shape == (2, 3, 4, 6)
    for bi in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(6):
                    assert b[bi, h, i, j].item() == pytest.approx(-slopes[bi, h].item() * abs(i + 2 - j), abs=1e-15)


# ---------------------------------------------------------------- T5 buckets (ALGORITHMS.md 5.3)

def _t5_bucket_py(rp, num_buckets, max_distance, bidirectional):
    """Scalar transcription of the T5 bucket rule, independent of the tensor code."""
    ret = 0
    if bidirectional:
        nb = num_buckets // 2
        if rp > 0:
            ret = nb
        n = abs(rp)
    else:
        nb = num_buckets
        n = max(-rp, 0)
    e = nb // 2
    if n < e:
        return ret + n
    return ret + min(nb - 1, e + int(math.log(n / e) / math.log(max_distance / e) * (nb - e)))


def test_t5_bucket_worked_values_bidirectional():
    worked = {0: 0, 1: 17, -1: 1, -7: 7, 7: 23, -8: 8, -20: 10, -127: 15, 200: 31}
    rel = torch.tensor(list(worked))
    assert R.t5_bucket(rel, 32, 128, True).tolist() == list(worked.values())


def test_t5_bucket_worked_values_causal():
    worked = {5: 0, -5: 5, -15: 15, -16: 16, -31: 21, -127: 31, -1000: 31}
    rel = torch.tensor(list(worked))
    assert R.t5_bucket(rel, 32, 128, False).tolist() == list(worked.values())


@pytest.mark.parametrize("num_buckets, max_distance, bidirectional", [(32, 128, True), (32, 128, False),
                                                                       (8, 20, True), (16, 64, False)])
def test_t5_bucket_matches_scalar_rule(num_buckets, max_distance, bidirectional):
    rel = torch.arange(-300, 301)
    got = R.t5_bucket(rel, num_buckets, max_distance, bidirectional)
    want = [_t5_bucket_py(r, num_buckets, max_distance, bidirectional) for r in rel.tolist()]
    assert got.tolist() == want
    assert int(got.min()) >= 0 and int(got.max()) <= num_buckets - 1


def test_t5_bias_gathers_table():
    table = torch.randn(32, 3, dtype=torch.float64)
    pq, pk = torch.arange(5)[None], torch.arange(9)[None]
    b = R.t5_bias(table, pq, pk, 32, 128, True)
    assert b.shape == (1, 3, 5, 9)
    for h in range(3):
        for i in range(5):
            for j in range(9):
                assert b[0, h, i, j].item() == table[_t5_bucket_py(j - i, 32, 128, True), h].item()


def test_relative_bias_and_urpe_clamp():
    D = 2
    table = torch.randn(2, 2 * D + 1, dtype=torch.float64)
    pq, pk = torch.arange(4)[None] + 1, torch.arange(7)[None]
    for fn in (R.relative_bias, R.urpe_coeff):
        b = fn(table, pq, pk, D)
        assert b.shape == (1, 2, 4, 7)
        for h in range(2):
            for i in range(4):
                for j in range(7):
                    assert b[0, h, i, j].item() == table[h, max(-D, min(D, j - (i + 1))) + D].item()


# ---------------------------------------------------------------- RoPE (ALGORITHMS.md 5.1)

def _rope_complex(x, pos, inv_freq, interleaved):
    """Independent RoPE: pairs as complex numbers times exp(i * p * theta). x (S, d), pos (S,)."""
    r = 2 * inv_freq.numel()
    xr = x[:, :r]
    if interleaved:
        z = torch.complex(xr[:, 0::2], xr[:, 1::2])
    else:
        z = torch.complex(xr[:, : r // 2], xr[:, r // 2:])
    z = z * torch.polar(torch.ones_like(pos[:, None] * inv_freq), pos[:, None].double() * inv_freq)
    if interleaved:
        rot = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        rot = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rot, x[:, r:]), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_matches_complex_form(interleaved):
    S, d, r = 7, 10, 6
    x = torch.randn(S, d, dtype=torch.float64)
    pos = torch.arange(S) * 3 - 4
    inv = R.rope_inv_freq(d, 10000.0, r)
    cos, sin = R.rope_cos_sin(pos, inv)
    got = R.apply_rotary(x, cos, sin, interleaved)
    torch.testing.assert_close(got, _rope_complex(x, pos, inv, interleaved), rtol=1e-13, atol=1e-13)


def test_rope_layouts_equal_up_to_permutation():
    S, d, r = 5, 12, 8
    x = torch.randn(2, 3, S, d, dtype=torch.float64)
    cos, sin = R.rope_cos_sin(torch.arange(S), R.rope_inv_freq(d, 10000.0, r))
    half = R.apply_rotary(x, cos, sin, interleaved=False)
    # interleaved position 2i <-> half-rotated i, 2i+1 <-> i + r/2
    perm = torch.tensor([i // 2 + (r // 2) * (i % 2) for i in range(r)] + list(range(r, d)))
    inter = R.apply_rotary(x[..., perm], cos, sin, interleaved=True)
    torch.testing.assert_close(inter, half[..., perm], rtol=0, atol=1e-14)


def test_rope_norm_preserved_and_pass_through_bit_exact():
    S, d, r = 9, 16, 10
    x = torch.randn(1, 2, S, d, dtype=torch.float32)
    cos, sin = R.rope_cos_sin(torch.arange(S) + 1000, R.rope_inv_freq(d, 10000.0, r, dtype=torch.float32))
    for interleaved in (False, True):
        y = R.apply_rotary(x, cos, sin, interleaved)
        assert torch.equal(y[..., r:], x[..., r:])
        torch.testing.assert_close(y[..., :r].double().norm(dim=-1), x[..., :r].double().norm(dim=-1),
                                   rtol=1e-5, atol=1e-6)


def test_rope_scores_invariant_to_position_shift():
    S, d = 6, 8
    q, k = torch.randn(S, d, dtype=torch.float64), torch.randn(S, d, dtype=torch.float64)
    inv = R.rope_inv_freq(d, 10000.0)
    scores = []
    for shift in (0, 37, 12345):
        c, s = R.rope_cos_sin(torch.arange(S) + shift, inv)
        scores.append(R.apply_rotary(q, c, s) @ R.apply_rotary(k, c, s).T)
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores[2], scores[0], rtol=1e-9, atol=1e-9)


def _base_inv_freq(r, base):
    return [base ** (-2 * i / r) for i in range(r // 2)]


def test_inv_freq_linear_ntk_dynamic_formulas():
    d, r, base, s = 16, 12, 10000.0, 4.0
    plain = _base_inv_freq(r, base)
    got = R.rope_inv_freq(d, base, r, {"type": "linear", "factor": s})
    torch.testing.assert_close(got, torch.tensor([f / s for f in plain], dtype=torch.float64), rtol=1e-14, atol=0)
    got = R.rope_inv_freq(d, base, r, {"type": "ntk", "factor": s})
    want = _base_inv_freq(r, base * s ** (r / (r - 2)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    dyn = {"type": "dynamic", "factor": s, "original_max_position_embeddings": 64}
    torch.testing.assert_close(R.rope_inv_freq(d, base, r, dyn, seqlen=64), torch.tensor(plain, dtype=torch.float64))
    L = 200
    want = _base_inv_freq(r, base * (s * L / 64 - (s - 1)) ** (r / (r - 2)))
    torch.testing.assert_close(R.rope_inv_freq(d, base, r, dyn, seqlen=L), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-13, atol=0)
    # the class goes through the same path and hands out fp32
    rope = RoPE(base, rotary_dim=r, scaling=dyn)
    assert rope.inv_freq(d, CPU, seqlen=L).dtype == torch.float32
    torch.testing.assert_close(rope.inv_freq(d, CPU, seqlen=L), torch.tensor(want, dtype=torch.float32))


def test_inv_freq_llama31():
    d, base = 128, 500000.0
    cfg = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
    got = R.rope_inv_freq(d, base, None, cfg)
    want = []
    for f in _base_inv_freq(d, base):
        lam = 2 * math.pi / f
        if lam < 8192 / 4:
            want.append(f)
        elif lam > 8192 / 1:
            want.append(f / 8)
        else:
            g = (8192 / lam - 1) / (4 - 1)
            want.append((1 - g) * f / 8 + g * f)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    # all three regimes occur for this config
    ratio = (got / torch.tensor(_base_inv_freq(d, base), dtype=torch.float64))
    assert (ratio == 1).any() and ((ratio - 1 / 8).abs() < 1e-15).any() and ((ratio > 1 / 8) & (ratio < 1)).any()


def test_inv_freq_yarn_and_attention_factor():
    d, base, s, L0 = 64, 10000.0, 4.0, 2048
    cfg = {"type": "yarn", "factor": s, "original_max_position_embeddings": L0}
    got = R.rope_inv_freq(d, base, None, cfg)

    def cdim(rot):
        return d * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = max(math.floor(cdim(32)), 0), min(math.ceil(cdim(1)), d - 1)
    want = []
    for i, f in enumerate(_base_inv_freq(d, base)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate (keep f), 1: interpolate (f / s)
        want.append(f / s * ramp + f * (1 - ramp))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    assert got[0] == 1.0 and abs(got[-1].item() - _base_inv_freq(d, base)[-1] / s) < 1e-18
    assert RoPE(scaling=cfg).attention_factor == pytest.approx(0.1 * math.log(s) + 1)
    assert RoPE(scaling=dict(cfg, attention_factor=1.5)).attention_factor == 1.5
    assert RoPE().attention_factor == 1.0


# ---------------------------------------------------------------- xPos (ALGORITHMS.md 5.4)

def test_xpos_zeta_range():
    z = R.xpos_zeta(64)
    assert z[0].item() == pytest.approx(0.4 / 1.4) and z[-1].item() == pytest.approx((62 + 25.6) / 89.6)
    assert round(z[0].item(), 3) == 0.286 and round(z[-1].item(), 3) == 0.978


def test_xpos_scores_depend_only_on_distance():
    S, d = 5, 8
    q = torch.randn(1, 1, S, d, dtype=torch.float64)
    k = torch.randn(1, 1, S, d, dtype=torch.float64)
    base = None
    for shift, center in ((0, 0.0), (300, 0.0), (300, 250.0), (-40, 7.0)):
        p = (torch.arange(S) + shift)[None]
        qs = R.xpos_rotate(q, p, is_key=False, center=center)
        ks = R.xpos_rotate(k, p, is_key=True, center=center)
        sc = qs @ ks.transpose(-1, -2)
        if base is None:
            base = sc
        torch.testing.assert_close(sc, base, rtol=1e-10, atol=1e-10)
    # and the decay is zeta ** ((n - m) / B) applied per pair to the plain rotated product
    p = torch.arange(S)[None]
    c, s = R.rope_cos_sin(p[:, None], R.rope_inv_freq(d, 10000.0))
    qr, kr = R.apply_rotary(q, c, s, True), R.apply_rotary(k, c, s, True)
    z = R.xpos_zeta(d)
    want = torch.zeros(S, S, dtype=torch.float64)
    for n in range(S):
        for m in range(S):
            pair = (qr[0, 0, n].view(-1, 2) * kr[0, 0, m].view(-1, 2)).sum(-1)
            want[n, m] = (z ** ((n - m) / 512.0) * pair).sum()
    torch.testing.assert_close(base[0, 0], want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- CARoPE phases (ALGORITHMS.md 5.6)

def test_learned_phases_cumsum_of_powers():
    f = torch.rand(2, 3, 5, dtype=torch.float64) * 0.9 + 0.05
    ph = R.learned_phases(f, 6)
    assert ph.shape == (2, 3, 5, 3)
    for b in range(2):
        for h in range(3):
            for m in range(5):
                for i in range(3):
                    want = sum(f[b, h, t].item() ** i for t in range(m + 1))
                    assert ph[b, h, m, i].item() == pytest.approx(want, rel=1e-13)


def test_learned_phases_constant_is_shifted_rope():
    d = 8
    theta1 = 10000.0 ** (-2 / d)
    ph = R.learned_phases(torch.full((1, 1, 6), theta1, dtype=torch.float64), d)[0, 0]
    want = (torch.arange(6, dtype=torch.float64)[:, None] + 1) * R.rope_inv_freq(d, 10000.0)
    torch.testing.assert_close(ph, want, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- positions

def test_positions_offset_and_ids():
    pq, pk = R.positions(2, 3, 5, offset=2)
    assert pq.tolist() == [[2, 3, 4]] and pk.tolist() == [[0, 1, 2, 3, 4]]
    ids = torch.tensor([[10, 11, 12, 13, 14], [0, 2, 4, 6, 8]])
    pq, pk = R.positions(2, 3, 5, offset=2, position_ids=ids)
    assert pq.tolist() == [[12, 13, 14], [4, 6, 8]] and torch.equal(pk, ids)
    with pytest.raises(ValueError, match="position_ids"):
        R.positions(2, 4, 5, offset=2, position_ids=ids)
    with pytest.raises(ValueError, match="position_ids"):
        R.positions(3, 3, 5, offset=0, position_ids=torch.zeros(2, 5, dtype=torch.long))


# ---------------------------------------------------------------- parse_position / kernel_args

def test_parse_position_kinds_and_conflicts():
    spec = parse_position([XPos(), URPE(torch.ones(2, 3), max_distance=1), T5Bias(torch.zeros(32, 2))])
    assert isinstance(spec, PositionSpec)
    rot, bias, urpe = spec
    assert isinstance(rot, XPos) and isinstance(bias, T5Bias) and isinstance(urpe, URPE)
    assert spec.names == {"rotary": "position[0]", "bias": "position[2]", "urpe": "position[1]"}
    assert parse_position(spec) is spec
    assert tuple(parse_position(None)) == (None, None, None)
    with pytest.raises(ValueError, match=r"position\[1\].*rotary"):
        parse_position([RoPE(), XPos()])
    with pytest.raises(ValueError, match=r"position\[1\].*bias"):
        parse_position([ALiBi(), RelativeBias(torch.zeros(2, 3), max_distance=1)])
    with pytest.raises(TypeError, match=r"position\[0\]"):
        parse_position(["rope"])
    with pytest.raises(TypeError, match="position"):
        parse_position(3.0)


def _ka(position, B=2, H=4, Sq=5, Sk=7, D=8, offset=2):
    return kernel_args(position, batch_size=B, num_heads=H, seqlen_q=Sq, seqlen_k=Sk, head_dim=D, offset=offset,
                       device=CPU)


def test_kernel_args_rope_fields():
    ids = torch.arange(7) * 2
    pe = _ka(RoPE(500000.0, rotary_dim=6, interleaved=True, position_ids=ids))
    assert isinstance(pe, KernelPE)
    assert (pe.rotary_mode, pe.rotary_dim, pe.interleaved, pe.bias_mode) == (1, 6, True, 0)
    assert pe.inv_freq.dtype == torch.float32 and pe.inv_freq.shape == (3,)
    torch.testing.assert_close(pe.inv_freq, R.rope_inv_freq(8, 500000.0, 6, dtype=torch.float32))
    assert pe.position_ids.dtype == torch.int32 and pe.position_ids.shape == (1, 7)
    assert pe.position_ids.tolist() == [ids.tolist()]
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    assert _ka(RoPE(scaling=yarn)).rotary_scale == pytest.approx(0.1 * math.log(2) + 1)
    empty = _ka(None)
    assert empty.rotary_mode == 0 and empty.bias_mode == 0 and empty.urpe_table is None


def test_kernel_args_xpos_alibi_t5_urpe_fields():
    pe = _ka([XPos(scale_base=256.0), ALiBi()])
    assert (pe.rotary_mode, pe.rotary_dim, pe.interleaved, pe.xpos_scale_base) == (2, 8, True, 256.0)
    assert pe.bias_mode == 1 and pe.alibi_slopes.shape == (2, 4) and pe.alibi_slopes.dtype == torch.float32
    slopes = torch.rand(2, 4)
    assert _ka(ALiBi(slopes)).alibi_slopes is slopes  # fp32, contiguous, on device: same object
    table = torch.randn(32, 4, dtype=torch.float64)
    pe = _ka([T5Bias(table, bidirectional=False, max_distance=64), URPE(torch.ones(4, 5), max_distance=2)])
    assert (pe.bias_mode, pe.num_buckets, pe.max_distance, pe.bidirectional) == (3, 32, 64, False)
    assert pe.bias_table.dtype == torch.float32 and torch.equal(pe.bias_table, table.float())
    assert pe.urpe_table.shape == (4, 5) and pe.urpe_max_distance == 2


def test_kernel_args_tables_stay_differentiable():
    table = torch.randn(4, 7, requires_grad=True)
    pe = _ka(RelativeBias(table, max_distance=3))
    assert pe.bias_table is table
    t64 = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    pe = _ka(URPE(t64, max_distance=3))
    g = torch.randn(4, 7)
    torch.autograd.backward(pe.urpe_table, g)
    torch.testing.assert_close(t64.grad, g.double())
    freqs = (torch.rand(1, 4, 7, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    pe = _ka(LearnedPhaseRoPE(freqs, rotary_dim=4))
    assert pe.rotary_mode == 3 and pe.phases.shape == (2, 4, 7, 2) and pe.phases.dtype == torch.float32
    assert pe.phases.is_contiguous()
    torch.testing.assert_close(pe.phases, R.learned_phases(freqs.detach(), 4).expand(2, -1, -1, -1).float())
    pe.phases[:, :, :, 1].sum().backward()  # d/df sum_b sum_m sum_{t<=m} f_t = batch * (Sk - t)
    torch.testing.assert_close(freqs.grad, (2.0 * (7 - torch.arange(7, dtype=torch.float64))).expand(1, 4, 7))


@pytest.mark.parametrize("position, match", [
    ([RoPE(), RelativeBias(torch.zeros(3, 7), max_distance=3)], r"position\[1\]\.table"),
    (RelativeBias(torch.zeros(4, 7), max_distance=3), None),
    (T5Bias(torch.zeros(32, 5)), r"position\.table"),
    ([URPE(torch.zeros(2, 7), max_distance=3)], r"position\[0\]\.table"),
    (ALiBi(torch.zeros(3)), r"position\.slopes"),
    ([XPos(), ALiBi(num_heads=6)], r"position\[1\]\.num_heads"),
    (RoPE(position_ids=torch.arange(6)), r"position\.position_ids"),
    (RoPE(position_ids=torch.zeros(3, 7, dtype=torch.long)), r"position\.position_ids"),
    (RoPE(rotary_dim=10), r"position\.rotary_dim"),
    (LearnedPhaseRoPE(torch.full((2, 4, 6), 0.5)), r"position\.freqs"),
    (LearnedPhaseRoPE(torch.full((2, 3, 7), 0.5)), r"position\.freqs"),
])
def test_kernel_args_rejects_mismatches(position, match):
    if match is None:  # the matching case is accepted
        _ka(position)
        return
    with pytest.raises(ValueError, match=match):
        _ka(position)


def test_kernel_args_query_positions_outside_ids():
    with pytest.raises(ValueError, match="position_ids"):
        _ka(RoPE(position_ids=torch.arange(7)), Sq=5, Sk=7, offset=3)
    with pytest.raises(ValueError, match="freqs"):
        _ka(LearnedPhaseRoPE(torch.full((1, 4, 7), 0.5)), Sq=8, Sk=7, offset=0)


# ---------------------------------------------------------------- constructor validation

@pytest.mark.parametrize("make, exc, match", [
    (lambda: RoPE(-1.0), ValueError, "theta"),
    (lambda: RoPE("big"), TypeError, "theta"),
    (lambda: RoPE(rotary_dim=5), ValueError, "rotary_dim"),
    (lambda: RoPE(rotary_dim=0), ValueError, "rotary_dim"),
    (lambda: RoPE(interleaved=1), TypeError, "interleaved"),
    (lambda: RoPE(scaling={"type": "cubic", "factor": 2.0}), ValueError, r"scaling\['type'\]"),
    (lambda: RoPE(scaling={"type": "linear"}), ValueError, r"scaling\['factor'\]"),
    (lambda: RoPE(scaling={"type": "linear", "factor": -2.0}), ValueError, r"scaling\['factor'\]"),
    (lambda: RoPE(scaling={"type": "linear", "factor": 2.0, "beta_fast": 3}), ValueError, "beta_fast"),
    (lambda: RoPE(scaling={"type": "yarn", "factor": 2.0}), ValueError, "original_max_position_embeddings"),
    (lambda: RoPE(scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     ValueError, "high_freq_factor"),
    (lambda: RoPE(scaling="linear"), TypeError, "scaling"),
    (lambda: RoPE(position_ids=torch.zeros(4)), TypeError, "position_ids"),
    (lambda: RoPE(position_ids=torch.zeros(1, 2, 4, dtype=torch.long)), ValueError, "position_ids"),
    (lambda: ALiBi([0.5, 0.25]), TypeError, "slopes"),
    (lambda: ALiBi(torch.ones(2, 3, 4)), ValueError, "slopes"),
    (lambda: ALiBi(torch.ones(4), num_heads=3), ValueError, "num_heads"),
    (lambda: ALiBi(num_heads=0), ValueError, "num_heads"),
    (lambda: RelativeBias(torch.zeros(4, 8), max_distance=4), ValueError, "table"),
    (lambda: RelativeBias(torch.zeros(4, 9, dtype=torch.long), max_distance=4), TypeError, "table"),
    (lambda: RelativeBias(torch.zeros(4, 9), max_distance=0), ValueError, "max_distance"),
    (lambda: T5Bias(torch.zeros(16, 4)), ValueError, "table"),
    (lambda: T5Bias(torch.zeros(31, 4), num_buckets=31), ValueError, "num_buckets"),
    (lambda: T5Bias(torch.zeros(32, 4), max_distance=4), ValueError, "max_distance"),
    (lambda: T5Bias(torch.zeros(32, 4), bidirectional="yes"), TypeError, "bidirectional"),
    (lambda: XPos(scale_base=0.0), ValueError, "scale_base"),
    (lambda: XPos(theta=0.0), ValueError, "theta"),
    (lambda: URPE(torch.zeros(4), max_distance=2), ValueError, "table"),
    (lambda: URPE(torch.zeros(4, 5), max_distance=3), ValueError, "table"),
    (lambda: LearnedPhaseRoPE(torch.full((2, 3), 0.5)), ValueError, "freqs"),
    (lambda: LearnedPhaseRoPE(torch.full((1, 2, 3), 1.5)), ValueError, "freqs"),
    (lambda: LearnedPhaseRoPE(torch.zeros(1, 2, 3)), ValueError, "freqs"),
    (lambda: LearnedPhaseRoPE(torch.full((1, 2, 3), 0.5), rotary_dim=3), ValueError, "rotary_dim"),
])
def test_constructors_reject_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_constructors_keep_tensors_by_reference():
    t = torch.randn(3, 9, requires_grad=True)
    f = torch.full((1, 3, 4), 0.5, requires_grad=True)
    ids = torch.arange(4)
    assert RelativeBias(t, max_distance=4).table is t
    assert URPE(t, max_distance=4).table is t
    assert LearnedPhaseRoPE(f).freqs is f
    assert RoPE(position_ids=ids).position_ids is ids
