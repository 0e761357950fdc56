"""Default benchmark suites of ``python -m posattn bench``: shapes taken from real models.

* BERT-base (12 heads x 64) on a real length mix (STS-B sentences when ../shared/data is
  present, else the sentences shipped with posattn), padding-free vs padded SDPA;
* Llama-3-8B (32 q / 8 kv heads x 128) with RoPE: prefill, and decode over a KV cache;
* an ALiBi model (MPT-7B / BLOOM style: 32 heads x 128) and T5-style relative buckets;
* kernelized attention with RPE (FFT) and EcoFormer, long sequences, vs exact attention;
* all-MiniLM-L6-v2 end to end (tokens/s), stock SDPA vs ``attn_implementation="posattn"``.

Each suite returns :class:`~posattn.benchmarks.harness.Case` rows; an op whose public function
does not exist yet yields one row with status "not built yet" (never hidden).
Sizes: ``quick`` fits this 2-core CPU in under a minute; ``full`` is the default; ``gpu`` fills
an H100/H200-class chip.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

import posattn

from .harness import Case, attention_flops

SIZES = ("quick", "full", "gpu")


def _missing(op: str, shape: str, name: str) -> Case:
    def setup():
        raise NotImplementedError(f"no posattn.{name}")
    return Case(op, shape, "posattn", setup)


def _ref_check(q, k, v, *, causal, offset, position=None, layout="bhsd", nq: int = 64, **kw) -> Callable:
    """Max abs error of the output's first ``nq`` query rows vs the float64 reference."""
    from posattn import reference

    def check(out):
        if isinstance(out, tuple):
            out = out[0]
        if layout == "bshd":
            qq, kk, vv, oo = (t.transpose(1, 2) for t in (q, k, v, out))
        else:
            qq, kk, vv, oo = q, k, v, out
        n = min(nq, qq.shape[2])
        # top-left queries keep their positions when sliced; bottom-right needs the offset kept
        ref, _ = reference.attention(qq[:, :, :n].double(), kk.double(), vv.double(), causal=causal,
                                     offset=offset, position=position, **kw)
        return (oo[:, :, :n].double() - ref).abs().max().item()
    return check


def fused_attention_cases(size: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    op = "fused_attention"
    if not hasattr(posattn, "scaled_dot_product_attention") or not hasattr(posattn, "RoPE"):
        return [_missing(op, "llama3-8b prefill", "scaled_dot_product_attention")]
    seqlen = {"quick": 256, "full": 1024, "gpu": 8192}[size]
    dt = str(dtype).replace("torch.", "")
    cases = []

    # Llama-3-8B prefill with RoPE (theta 500000), causal, GQA 32/8, head_dim 128
    B, H, Hk, D = 1, 32, 8, 128
    shape = f"llama3-8b prefill B{B} H{H}/{Hk} S{seqlen} d{D} causal rope"
    flops = attention_flops(B, H, seqlen, seqlen, D, causal=True)

    def mk():
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(B, H, seqlen, D, generator=g).to(device, dtype)
        k = torch.randn(B, Hk, seqlen, D, generator=g).to(device, dtype)
        v = torch.randn(B, Hk, seqlen, D, generator=g).to(device, dtype)
        return q, k, v

    q, k, v = mk()
    rope = posattn.RoPE(theta=500000.0)

    def posattn_rope():
        return (lambda: posattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                             position=rope)), (q, k, v)

    def sdpa_rope():
        from posattn import reference
        inv = reference.rope_inv_freq(D, 500000.0, D, None).to(device)

        def fn():
            pos = torch.arange(seqlen, device=device, dtype=torch.float32)
            cos, sin = reference.rope_cos_sin(pos, inv)
            qr = reference.apply_rotary(q.transpose(1, 2).float(), cos, sin, False).transpose(1, 2).to(dtype)
            kr = reference.apply_rotary(k.transpose(1, 2).float(), cos, sin, False).transpose(1, 2).to(dtype)
            return torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=True)
        return fn, (q, k, v)

    chk = _ref_check(q, k, v, causal=True, offset=0, position=rope)
    cases.append(Case(op, shape, "torch-sdpa (rotate, then sdpa)", sdpa_rope, dt, flops=flops, check=chk,
                      note="baseline: rotated q/k materialised"))
    cases.append(Case(op, shape, "posattn", posattn_rope, dt, flops=flops, check=chk,
                      baseline="torch-sdpa (rotate, then sdpa)"))

    # ALiBi model (MPT-7B: 32 heads x 128, causal) and T5 buckets (bidirectional, 12 x 64)
    for kind in ("alibi", "t5", "relative"):
        if kind == "alibi":
            B, H, D, causal = 1, 32, 128, True
            label = f"mpt-7b B{B} H{H} S{seqlen} d{D} causal alibi"
        else:
            B, H, D, causal = 1, 12, 64, False
            label = f"t5-base-like B{B} H{H} S{seqlen} d{D} {kind}"
        g = torch.Generator(device="cpu").manual_seed(1)
        qa = torch.randn(B, H, seqlen, D, generator=g).to(device, dtype)
        ka = torch.randn(B, H, seqlen, D, generator=g).to(device, dtype)
        va = torch.randn(B, H, seqlen, D, generator=g).to(device, dtype)
        if kind == "alibi":
            pe = posattn.ALiBi(num_heads=H)
        elif kind == "t5":
            pe = posattn.T5Bias(torch.randn(32, H, generator=g).to(device), num_buckets=32, max_distance=128)
        else:
            pe = posattn.RelativeBias(torch.randn(H, 2 * 128 + 1, generator=g).to(device), max_distance=128)
        fl = attention_flops(B, H, seqlen, seqlen, D, causal=causal)
        chk = _ref_check(qa, ka, va, causal=causal, offset=0, position=pe)

        def fused(qa=qa, ka=ka, va=va, pe=pe, causal=causal):
            return (lambda: posattn.scaled_dot_product_attention(qa, ka, va, is_causal=causal, position=pe)), ()

        def materialised(qa=qa, ka=ka, va=va, pe=pe, causal=causal, H=H):
            from posattn import reference

            def fn():
                bias = reference.position_bias(pe, batch_size=1, num_heads=H, seqlen_q=seqlen, seqlen_k=seqlen,
                                               offset=0, device=device).to(dtype)
                if causal:
                    tri = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
                    bias = bias.masked_fill(~tri, float("-inf"))
                return torch.nn.functional.scaled_dot_product_attention(qa, ka, va, attn_mask=bias)
            return fn, ()
        base = "torch-sdpa (materialised bias)"
        cases.append(Case(op, label, base, materialised, dt, flops=fl, check=chk, note="baseline: N x N bias in memory"))
        cases.append(Case(op, label, "posattn", fused, dt, flops=fl, check=chk, baseline=base))
    return cases


def decode_cases(size: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    op = "kvcache_decode"
    if not hasattr(posattn, "flash_attn_with_kvcache"):
        return [_missing(op, "llama3-8b decode", "flash_attn_with_kvcache")]
    ctx = {"quick": 4096, "full": 16384, "gpu": 262144}[size]
    B, H, Hk, D = 1, 32, 8, 128
    dt = str(dtype).replace("torch.", "")
    shape = f"llama3-8b decode B{B} H{H}/{Hk} ctx{ctx} d{D}"
    g = torch.Generator(device="cpu").manual_seed(2)
    q = torch.randn(B, 1, H, D, generator=g).to(device, dtype)
    kc = torch.randn(B, ctx, Hk, D, generator=g).to(device, dtype)
    vc = torch.randn(B, ctx, Hk, D, generator=g).to(device, dtype)
    seqlens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    nbytes = 2 * kc.numel() * kc.element_size()

    def check(out):
        from posattn import reference
        out = out[0] if isinstance(out, tuple) else out
        ref, _ = reference.attention(q.transpose(1, 2).double(), kc.transpose(1, 2).double(),
                                     vc.transpose(1, 2).double())
        return (out.transpose(1, 2).double() - ref).abs().max().item()

    def sdpa():
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        return (lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)), ()

    cases = [Case(op, shape, "torch-sdpa", sdpa, dt, bytes=nbytes, check=check, note="baseline")]
    for sched in ("lean", "split", "single"):
        def fn(sched=sched):
            return (lambda: posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, schedule=sched)), ()
        cases.append(Case(op, shape, f"posattn schedule={sched}", fn, dt, bytes=nbytes, check=check,
                          baseline="torch-sdpa"))
    return cases


def _length_mix(batch: int, max_len: int) -> list[int]:
    """A real length mix: STS-B sentence lengths (words * 1.3 + 2 tokens) when the shared data is
    present, else the sentences shipped with posattn; clipped to max_len."""
    from pathlib import Path
    lengths = []
    root = Path(__file__).resolve()
    for parent in root.parents:
        sts = parent / "shared" / "data" / "stsbenchmark" / "sts-dev.tsv"
        alt = parent.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.tsv"
        for cand in (sts, alt):
            if cand.exists():
                for line in cand.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 7:
                        lengths.append(int(len(parts[5].split()) * 1.3) + 2)
                break
        if lengths:
            break
    if not lengths:
        shipped = Path(posattn.__file__).parent / "data" / "sentences.txt"
        if shipped.exists():
            lengths = [int(len(s.split()) * 1.3) + 2 for s in shipped.read_text().splitlines() if s.strip()]
    if not lengths:
        g = torch.Generator().manual_seed(3)
        lengths = (torch.rand(batch, generator=g) * 0.8 * max_len + 0.2 * max_len).long().tolist()
    # scale so the longest is max_len and the mix keeps its shape
    sel = lengths[:batch] if len(lengths) >= batch else (lengths * (batch // len(lengths) + 1))[:batch]
    m = max(sel)
    return [max(1, min(max_len, round(x * max_len / m))) for x in sel]


def varlen_cases(size: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    op = "varlen_attention"
    if not hasattr(posattn, "flash_attn_varlen_func"):
        return [_missing(op, "bert-base varlen", "flash_attn_varlen_func")]
    batch, max_len = {"quick": 16, "full": 64, "gpu": 256}[size], {"quick": 128, "full": 256, "gpu": 512}[size]
    H, D = 12, 64
    lens = _length_mix(batch, max_len)
    total = sum(lens)
    L = max(lens)
    dt = str(dtype).replace("torch.", "")
    shape = f"bert-base B{batch} H{H} d{D} maxlen {L} avg {total / batch:.0f} (real mix)"
    g = torch.Generator(device="cpu").manual_seed(4)
    q = torch.randn(total, H, D, generator=g).to(device, dtype)
    k = torch.randn(total, H, D, generator=g).to(device, dtype)
    v = torch.randn(total, H, D, generator=g).to(device, dtype)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    # padded copies for SDPA
    qp = torch.zeros(batch, L, H, D, device=device, dtype=dtype)
    kp, vp = qp.clone(), qp.clone()
    mask = torch.zeros(batch, 1, 1, L, dtype=torch.bool, device=device)
    for b, n in enumerate(lens):
        s = int(cu[b])
        qp[b, :n], kp[b, :n], vp[b, :n] = q[s:s + n], k[s:s + n], v[s:s + n]
        mask[b, ..., :n] = True
    real = sum(n * n for n in lens) * 4 * D * H
    padded = batch * L * L * 4 * D * H

    def check(out):
        from posattn import reference
        out = out[0] if isinstance(out, tuple) else out
        err = 0.0
        for b, n in enumerate(lens[:4]):
            s = int(cu[b])
            sl = slice(s, s + n)
            ref, _ = reference.attention(q[sl].transpose(0, 1)[None].double(), k[sl].transpose(0, 1)[None].double(),
                                         v[sl].transpose(0, 1)[None].double())
            err = max(err, (out[sl].transpose(0, 1)[None].double() - ref).abs().max().item())
        return err

    def sdpa():
        qt, kt, vt = qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2)
        return (lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)), ()

    def varlen():
        return (lambda: posattn.flash_attn_varlen_func(q, k, v, cu, cu, L, L)), ()

    ideal = padded / real
    return [Case(op, shape, "torch-sdpa (padded)", sdpa, dt, flops=padded, note="baseline; FLOPs counted padded"),
            Case(op, shape, "posattn varlen", varlen, dt, flops=real, check=check, baseline="torch-sdpa (padded)",
                 note=f"ideal ratio {ideal:.2f}x (padded/real FLOPs)")]


def kernelized_rpe_cases(size: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    op = "kernelized_rpe"
    if not hasattr(posattn, "kernelized_rpe_attention"):
        return [_missing(op, "long sequence", "kernelized_rpe_attention")]
    S = {"quick": 2048, "full": 8192, "gpu": 65536}[size]
    B, H, D = 1, 2, 64
    shape = f"B{B} H{H} S{S} d{D} m=64"
    g = torch.Generator(device="cpu").manual_seed(5)
    q = torch.randn(B, H, S, D, generator=g).to(device)
    k = torch.randn(B, H, S, D, generator=g).to(device)
    v = torch.randn(B, H, S, D, generator=g).to(device)
    b = (0.1 * torch.randn(H, 2 * S - 1, generator=g)).to(device)

    def fft():
        return (lambda: posattn.kernelized_rpe_attention(q, k, v, b, num_features=64)), ()

    def exact():
        idx = torch.arange(S, device=device)
        rel = idx[None, :] - idx[:, None] + S - 1

        def fn():
            bias = b[:, rel][None]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return fn, ()
    return [Case(op, shape, "exact sdpa + materialised RPE", exact, "float32", note="baseline (exact softmax)"),
            Case(op, shape, "posattn kernelized FFT", fft, "float32", baseline="exact sdpa + materialised RPE",
                 note="approximation (random features): no max err vs exact")]


def ecoformer_cases(size: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    op = "ecoformer"
    if not hasattr(posattn, "ecoformer_attention"):
        return [_missing(op, "long sequence", "ecoformer_attention")]
    S = {"quick": 2048, "full": 8192, "gpu": 65536}[size]
    B, H, D, nb = 1, 2, 64, 16
    shape = f"B{B} H{H} S{S} d{D} bits{nb}"
    g = torch.Generator(device="cpu").manual_seed(6)
    qc = (torch.randint(0, 2, (B, H, S, nb), generator=g) * 2 - 1).float().to(device)
    kc = (torch.randint(0, 2, (B, H, S, nb), generator=g) * 2 - 1).float().to(device)
    v = torch.randn(B, H, S, D, generator=g).to(device)
    q = torch.randn(B, H, S, D, generator=g).to(device)
    k = torch.randn(B, H, S, D, generator=g).to(device)

    def check(out):
        from posattn import reference
        ref = reference.ecoformer_linear(qc.double(), kc.double(), v.double())
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = out[0] if isinstance(out, tuple) else out
        return (out.double() - ref).abs().max().item()

    def eco():
        return (lambda: posattn.ecoformer_attention(qc, kc, v)), ()

    def exact():
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), ()
    return [Case(op, shape, "exact sdpa", exact, "float32", note="baseline (exact softmax)"),
            Case(op, shape, "posattn ecoformer", eco, "float32", check=check, baseline="exact sdpa")]


def minilm_cases(size: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """all-MiniLM-L6-v2 on real sentences: stock (sdpa) vs attn_implementation="posattn"."""
    op = "minilm_e2e"
    try:
        from posattn.benchmarks import e2e
    except ImportError as err:
        def setup():
            raise NotImplementedError(str(err))
        return [Case(op, "all-MiniLM-L6-v2", "posattn", setup)]
    return e2e.minilm_cases(size, device)


SUITES: dict[str, Callable] = {
    "fused_attention": fused_attention_cases,
    "varlen_attention": varlen_cases,
    "kvcache_decode": decode_cases,
    "kernelized_rpe": kernelized_rpe_cases,
    "ecoformer": ecoformer_cases,
    "minilm_e2e": minilm_cases,
}
