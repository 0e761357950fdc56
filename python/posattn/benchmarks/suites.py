"""Benchmark suites of ``python -m posattn bench``, in groups (``--suite``).

``models`` (default): shapes taken from real models, one suite per op
  * fused attention: Llama-3-8B prefill (RoPE, GQA 32/8), MPT-7B (ALiBi), T5-base-like (T5 buckets,
    relative bias), fwd (+ fwd_bwd beyond ``quick``);
  * apply_rotary on Llama-3-8B q; unpad/pad of BERT-base hidden states;
  * varlen: BERT-base (12 heads x 64) on a real length mix (STS-B sentences when ../shared/data is
    present, else the sentences shipped with posattn), padding-free vs padded SDPA;
  * decode: Llama-3-8B over a KV cache, every schedule;
  * kernelized attention with RPE (FFT) and EcoFormer, long sequences, vs exact attention;
  * all-MiniLM-L6-v2 end to end (tokens/s), stock SDPA vs ``attn_implementation="posattn"``.
``flash``: FlashAttention's own benchmark shapes (seqlen 512..16k, batch = 16k / seqlen, hidden
  2048, head_dim 64 and 128, causal and not; fwd, bwd, fwd_bwd); at CPU scale unless ``--size gpu``.
``papers``: the seed papers' shapes: LeanAttention decode contexts (up to 512k on a GPU) and
  ByteTransformer length mixes (lengths uniform in [0.2, 1] x max: average 0.6 x max).
``claims``: the CPU claims of README (issue 3: bias memory/time at N=8192; issue 4: varlen speedup
  vs the ideal ratio); run with ``--memory``.

Each suite returns :class:`~posattn.benchmarks.harness.Case` rows; an op whose public function does
not exist yet yields one row with status "not built yet", a provider that cannot run here one row
with status "absent: <reason>" (never hidden). Sizes: ``quick`` fits this 2-core CPU in about a
minute; ``full`` is the CPU default; ``gpu`` fills an H100/H200-class chip.
"""
from __future__ import annotations

from typing import Callable

import torch

import posattn

from .harness import Absent, Case, absent_case
from .providers import (MODES, DenseProblem, baseline_provider, default_providers, dense_cases, flash_hidden,
                        flash_shapes)

SIZES = ("quick", "full", "gpu")


def _missing(op: str, shape: str, name: str) -> Case:
    def setup():
        raise NotImplementedError(f"no posattn.{name}")
    return Case(op, shape, "posattn", setup)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _modes(size: str, modes, default=("fwd", "fwd_bwd")) -> tuple:
    if modes:
        return tuple(modes)
    return ("fwd",) if size == "quick" else tuple(default)


# ---------------------------------------------------------------------------------------------
# Dense fused attention
# ---------------------------------------------------------------------------------------------
def fused_attention_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """Model shapes with their positional encoding: Llama-3-8B prefill (RoPE theta 5e5, GQA 32/8,
    causal), MPT-7B (ALiBi, causal), T5-base-like (T5 buckets, relative bias; bidirectional)."""
    op = "fused_attention"
    if not hasattr(posattn, "scaled_dot_product_attention") or not hasattr(posattn, "RoPE"):
        return [_missing(op, "llama3-8b prefill", "scaled_dot_product_attention")]
    seqlen = {"quick": 256, "full": 1024, "gpu": 8192}[size]
    kw = dict(dtype=dtype, device=device)
    problems = [
        ("llama3-8b prefill", DenseProblem(1, 32, seqlen, seqlen, 128, causal=True, pe="rope", heads_k=8,
                                           rope_theta=500000.0, seed=0, **kw)),
        ("mpt-7b", DenseProblem(1, 32, seqlen, seqlen, 128, causal=True, pe="alibi", seed=1, **kw)),
        ("t5-base-like", DenseProblem(1, 12, seqlen, seqlen, 64, pe="t5", seed=2, **kw)),
        ("t5-base-like", DenseProblem(1, 12, seqlen, seqlen, 64, pe="relative", seed=3, **kw)),
    ]
    cases = []
    for name, p in problems:
        def note(prov, p=p):
            if not prov.startswith("sdpa"):
                return ""
            return "q, k rotated first" if p.pe == "rope" else "N x N bias materialised"
        cases += dense_cases(op, p, default_providers(device), _modes(size, modes),
                             baseline=baseline_provider(device, p.pe), shape=f"{name} {p.label()}", series=name,
                             note=note)
    return cases


def flash_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """FlashAttention's benchmark shapes (benchmarks/benchmark_flash_attention.py in flash-attention):
    batch x seqlen = 16k tokens, seqlen 512..16k, hidden 2048 (heads = 2048 / head_dim), head_dim 64
    and 128, causal and not, fwd / bwd / fwd+bwd, no positional encoding. Below ``size="gpu"``: the
    same sweep at CPU scale (1k tokens, hidden 256) for a dry look."""
    hidden = flash_hidden(size)
    md = tuple(modes) if modes else (("fwd", "bwd") if size == "quick" else MODES)
    cases = []
    for causal in (False, True):
        for head_dim in (64, 128):
            series = f"hidden{hidden} d{head_dim}{' causal' if causal else ''}"
            for batch, seqlen in flash_shapes(size):
                p = DenseProblem(batch, hidden // head_dim, seqlen, seqlen, head_dim, causal=causal,
                                 dtype=dtype, device=device, seed=seqlen + head_dim)
                cases += dense_cases("flash_shapes", p, default_providers(device), md,
                                     baseline=baseline_provider(device), series=series)
    return cases


# ---------------------------------------------------------------------------------------------
# apply_rotary, unpad/pad (memory bound)
# ---------------------------------------------------------------------------------------------
def apply_rotary_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """RoPE on Llama-3-8B q (B, S, 32, 128): posattn.apply_rotary vs torch eager (fp32 rotate).
    Memory bound: GB/s of x read + out written, vs the measured copy bandwidth."""
    op = "apply_rotary"
    if not hasattr(posattn, "apply_rotary"):
        return [_missing(op, "llama3-8b q", "apply_rotary")]
    from posattn import reference
    S = {"quick": 1024, "full": 4096, "gpu": 32768}[size]
    B, H, D = 1, 32, 128
    shape = f"llama3-8b q B{B} S{S} H{H} d{D}"
    state: dict = {}

    def inputs():
        if "t" not in state:
            g = torch.Generator(device="cpu").manual_seed(7)
            x = torch.randn(B, S, H, D, generator=g).to(device, dtype)
            inv = reference.rope_inv_freq(D, 500000.0, dtype=torch.float32, device=device)
            cos, sin = reference.rope_cos_sin(torch.arange(S, device=device), inv)
            state["t"] = (x, cos, sin)
        return state["t"]

    def check(out):
        x, cos, sin = inputs()
        ref = reference.apply_rotary(x.double(), cos.double()[:, None], sin.double()[:, None])
        return (out.double() - ref).abs().max().item()

    def eager():
        x, cos, sin = inputs()
        c, s_ = cos[:, None], sin[:, None]
        return (lambda: reference.apply_rotary(x.float(), c, s_).to(dtype)), ()

    dt, cuda = _dt(dtype), device.type == "cuda"
    kw = dict(bytes=2 * B * S * H * D * dtype.itemsize, check=check, x=S, series="llama3-8b q")
    cases = [Case(op, shape, "torch eager", eager, dt, note="baseline: reference rotate in fp32", **kw)]
    for backend in ("triton", "torch", "cuda"):
        prov = f"posattn-{backend}"
        if backend != "torch" and not cuda:
            why = "Triton needs a CUDA device here" if backend == "triton" else "the _C kernels need a CUDA device"
            cases.append(absent_case(op, shape, prov, why, dtype=dt, **kw))
            continue

        def fn(backend=backend):
            x, cos, sin = inputs()
            return (lambda: posattn.apply_rotary(x, cos, sin, backend=backend)), ()
        cases.append(Case(op, shape, prov, fn, dt, baseline="torch eager", **kw))
    return cases


def unpad_pad_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """unpad_input + pad_input of BERT-base hidden states (B, L, 768) on the real length mix, vs
    torch boolean indexing. Memory bound: bytes = tokens read + written by unpad, B*L rows by pad."""
    op = "unpad_pad"
    if not hasattr(posattn, "unpad_input"):
        return [_missing(op, "bert-base hidden", "unpad_input")]
    batch, max_len = {"quick": 16, "full": 64, "gpu": 256}[size], {"quick": 128, "full": 256, "gpu": 512}[size]
    lens = _length_mix(batch, max_len)
    L, total, Dm = max(lens), sum(lens), 768
    shape = f"bert-base hidden B{batch} L{L} x{Dm} avg {total / batch:.0f} (real mix)"
    state: dict = {}

    def inputs():
        if "t" not in state:
            g = torch.Generator(device="cpu").manual_seed(8)
            h = torch.randn(batch, L, Dm, generator=g).to(device, dtype)
            mask = (torch.arange(L)[None, :] < torch.tensor(lens)[:, None]).to(device)
            state["t"] = (h, mask)
        return state["t"]

    def check(out):
        h, mask = inputs()
        return (out.double() - (h * mask[..., None]).double()).abs().max().item()

    def eager():
        h, mask = inputs()

        def fn():
            packed = h[mask]
            out = torch.zeros_like(h)
            out[mask] = packed
            return out
        return fn, ()

    def fused():
        h, mask = inputs()

        def fn():
            hu, idx, *_ = posattn.unpad_input(h, mask)
            return posattn.pad_input(hu, idx, batch, L)
        return fn, ()

    dt = _dt(dtype)
    kw = dict(bytes=(2 * total + batch * L) * Dm * dtype.itemsize, check=check, x=L, series="bert-base hidden")
    prov = "posattn-cuda" if device.type == "cuda" else "posattn-torch"
    return [Case(op, shape, "torch indexing", eager, dt, note="baseline: h[mask], out[mask] = .", **kw),
            Case(op, shape, prov, fused, dt, baseline="torch indexing", note="unpad_input + pad_input", **kw)]


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------
def decode_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None, *, contexts=None,
                 batch: int = 1, series: str = "llama3-8b decode") -> list[Case]:
    """Llama-3-8B decode (32 q / 8 kv heads x 128, one new token) over a full KV cache, each schedule.
    Memory bound: GB/s of K + V read, vs the measured copy bandwidth."""
    op = "kvcache_decode"
    if not hasattr(posattn, "flash_attn_with_kvcache"):
        return [_missing(op, "llama3-8b decode", "flash_attn_with_kvcache")]
    contexts = contexts or [{"quick": 1024, "full": 16384, "gpu": 262144}[size]]
    B, H, Hk, D = batch, 32, 8, 128
    dt, cuda = _dt(dtype), device.type == "cuda"
    cases = []
    for ctx in contexts:
        shape = f"{series} B{B} H{H}/{Hk} ctx{ctx} d{D}"
        state: dict = {}

        def inputs(ctx=ctx, state=state):
            if "t" not in state:
                g = torch.Generator(device="cpu").manual_seed(2)
                q = torch.randn(B, 1, H, D, generator=g).to(device, dtype)
                kc = torch.randn(B, ctx, Hk, D, generator=g).to(device, dtype)
                vc = torch.randn(B, ctx, Hk, D, generator=g).to(device, dtype)
                state["t"] = (q, kc, vc, torch.full((B,), ctx, dtype=torch.int32, device=device))
            return state["t"]

        def check(out, inputs=inputs):
            from posattn import reference
            q, kc, vc, _ = inputs()
            out = out[0] if isinstance(out, tuple) else out  # (B, 1, H, D)
            b = min(B, 2)
            ref, _ = reference.attention(q[:b].transpose(1, 2).double(), kc[:b].transpose(1, 2).double(),
                                         vc[:b].transpose(1, 2).double())
            return (out[:b].transpose(1, 2).double() - ref).abs().max().item()

        def sdpa(inputs=inputs):
            q, kc, vc, _ = inputs()
            qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
            F = torch.nn.functional
            return (lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)), ()

        def flash(inputs=inputs):
            if not cuda:
                raise Absent("flash_attn needs CUDA")
            try:
                from flash_attn import flash_attn_with_kvcache as fa
            except ImportError:
                raise Absent("flash_attn not importable") from None
            q, kc, vc, sl = inputs()
            return (lambda: fa(q, kc, vc, cache_seqlens=sl)), ()

        kw = dict(bytes=2 * B * ctx * Hk * D * dtype.itemsize, x=ctx, series=series)
        cases.append(Case(op, shape, "sdpa", sdpa, dt, check=check, note="baseline: whole cache", **kw))
        cases.append(Case(op, shape, "flash_attn", flash, dt, check=check, baseline="sdpa", **kw))
        for backend in (("triton", "cuda") if cuda else ("torch",)):
            for sched in ("lean", "split", "single"):
                def fn(sched=sched, inputs=inputs, backend=backend):
                    q, kc, vc, sl = inputs()
                    return (lambda: posattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, schedule=sched,
                                                                    backend=backend)), ()
                cases.append(Case(op, shape, f"posattn-{backend} {sched}", fn, dt, check=check, baseline="sdpa",
                                  **kw))
        if not cuda:
            cases.append(absent_case(op, shape, "posattn-cuda", "the _C kernels need a CUDA device", dtype=dt, **kw))
    return cases


def lean_paper_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """LeanAttention's decode sweep (arXiv 2405.10480: contexts up to 512k at batch 1), Llama-3-8B heads."""
    contexts = {"quick": [1024, 4096], "full": [2048, 8192, 32768],
                "gpu": [8192, 32768, 131072, 524288]}[size]
    return decode_cases(size, device, dtype, contexts=contexts, series="lean decode")


# ---------------------------------------------------------------------------------------------
# Varlen
# ---------------------------------------------------------------------------------------------
def _length_mix(batch: int, max_len: int) -> list[int]:
    """A real length mix: STS-B sentence lengths (words * 1.3 + 2 tokens) when the shared data is
    present, else the sentences shipped with posattn; scaled so the longest is max_len (the
    ratios n_i / max, hence the ideal padded/real FLOP ratio, are the real ones)."""
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
        return bytetransformer_mix(batch, max_len)
    sel = lengths[:batch] if len(lengths) >= batch else (lengths * (batch // len(lengths) + 1))[:batch]
    m = max(sel)
    return [max(1, min(max_len, round(x * max_len / m))) for x in sel]


def bytetransformer_mix(batch: int, max_len: int, seed: int = 3) -> list[int]:
    """ByteTransformer's synthetic mix (arXiv 2210.03052): lengths uniform in [0.2, 1] x max_len
    (average 0.6 x max), seeded; the first is max_len so the padded length is max_len."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.rand(batch, generator=g) * 0.8 * max_len + 0.2 * max_len).long().clamp(1, max_len).tolist()
    lens[0] = max_len
    return lens


def varlen_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None, *, lens=None,
                 label: str = "bert-base", mix: str = "real mix") -> list[Case]:
    """BERT-base (12 heads x 64) padding-free varlen attention vs padded SDPA with a key-padding mask.
    The ideal ratio is padded / real attention FLOPs (sum of L^2 vs sum of n_i^2)."""
    op = "varlen_attention"
    if not hasattr(posattn, "flash_attn_varlen_func"):
        return [_missing(op, "bert-base varlen", "flash_attn_varlen_func")]
    if lens is None:
        batch, max_len = {"quick": 16, "full": 64, "gpu": 256}[size], {"quick": 128, "full": 256, "gpu": 512}[size]
        lens = _length_mix(batch, max_len)
    batch, H, D = len(lens), 12, 64
    total, L = sum(lens), max(lens)
    dt, cuda = _dt(dtype), device.type == "cuda"
    shape = f"{label} B{batch} H{H} d{D} maxlen {L} avg {total / batch:.0f} ({mix})"
    state: dict = {}

    def inputs():
        if "t" not in state:
            g = torch.Generator(device="cpu").manual_seed(4)
            q, k, v = (torch.randn(total, H, D, generator=g).to(device, dtype) for _ in range(3))
            cu = torch.zeros(batch + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(lens).cumsum(0)
            state["t"] = (q, k, v, cu.to(device))
        return state["t"]

    def padded():
        if "p" not in state:
            q, k, v, cu = inputs()
            qp = torch.zeros(batch, L, H, D, device=device, dtype=dtype)
            kp, vp = qp.clone(), qp.clone()
            mask = torch.zeros(batch, 1, 1, L, dtype=torch.bool, device=device)
            for b, n in enumerate(lens):
                s = int(cu[b])
                qp[b, :n], kp[b, :n], vp[b, :n] = q[s:s + n], k[s:s + n], v[s:s + n]
                mask[b, ..., :n] = True
            state["p"] = (qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask)
        return state["p"]

    def check(out):
        from posattn import reference
        q, k, v, cu = inputs()
        out = out[0] if isinstance(out, tuple) else out
        err = 0.0
        for b, n in enumerate(lens[:4]):
            sl = slice(int(cu[b]), int(cu[b]) + n)
            ref, _ = reference.attention(*(t[sl].transpose(0, 1)[None].double() for t in (q, k, v)))
            err = max(err, (out[sl].transpose(0, 1)[None].double() - ref).abs().max().item())
        return err

    def check_padded(out):
        q, k, v, cu = inputs()
        # padded out (B, H, L, D) -> packed rows (total, H, D)
        rows = torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
        return check(rows)

    def sdpa():
        qt, kt, vt, mask = padded()
        return (lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)), ()

    def varlen(backend):
        def setup():
            q, k, v, cu = inputs()
            return (lambda: posattn.flash_attn_varlen_func(q, k, v, cu, cu, L, L, backend=backend)), ()
        return setup

    def flash():
        if not cuda:
            raise Absent("flash_attn needs CUDA")
        try:
            from flash_attn import flash_attn_varlen_func as fa
        except ImportError:
            raise Absent("flash_attn not importable") from None
        q, k, v, cu = inputs()
        return (lambda: fa(q, k, v, cu, cu, L, L)), ()

    real = sum(n * n for n in lens) * 4 * D * H
    pad_flops = batch * L * L * 4 * D * H
    ideal = pad_flops / real
    base = "sdpa (padded)" if not cuda else "sdpa-flash (padded)"
    kw = dict(x=L, series=label)

    def sdpa_setup():
        if not cuda:
            return sdpa()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        fn, _ = sdpa()

        def call():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                return fn()
        return call, ()
    cases = [Case(op, shape, base, sdpa_setup, dt, flops=pad_flops, check=check_padded,
                  note="baseline; FLOPs counted padded", **kw)]
    note = f"ideal ratio {ideal:.2f}x (padded/real FLOPs)"
    for backend in (("triton", "cuda") if cuda else ("torch",)):
        cases.append(Case(op, shape, f"posattn-{backend}", varlen(backend), dt, flops=real, check=check,
                          baseline=base, note=note, **kw))
    if not cuda:
        cases.append(absent_case(op, shape, "posattn-triton", "Triton needs a CUDA device here", dtype=dt, **kw))
    cases.append(Case(op, shape, "flash_attn", flash, dt, flops=real, check=check, baseline=base, note=note, **kw))
    return cases


def bytetransformer_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """ByteTransformer's length mixes (average 0.6 x max) over max lengths, BERT-base heads."""
    batch = {"quick": 8, "full": 16, "gpu": 16}[size]
    maxes = {"quick": [128, 256], "full": [128, 256, 512], "gpu": [256, 512, 1024, 2048]}[size]
    cases = []
    for m in maxes:
        cases += varlen_cases(size, device, dtype, lens=bytetransformer_mix(batch, m), label="bytetransformer",
                              mix="avg 0.6 max")
    return cases


# ---------------------------------------------------------------------------------------------
# Kernelized RPE, EcoFormer, MiniLM end to end
# ---------------------------------------------------------------------------------------------
def kernelized_rpe_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """FFT kernelized attention with RPE (fixed PRF projection, m=64) vs exact softmax with the
    materialised Toeplitz bias; max err is vs the float64 kernelized formula (same projection)."""
    op = "kernelized_rpe"
    if not hasattr(posattn, "kernelized_rpe_attention"):
        return [_missing(op, "long sequence", "kernelized_rpe_attention")]
    S = {"quick": 512, "full": 4096, "gpu": 65536}[size]
    B, H, D, m = 1, 2, 64, 64
    shape = f"B{B} H{H} S{S} d{D} m={m}"
    state: dict = {}

    def inputs():
        if "t" not in state:
            g = torch.Generator(device="cpu").manual_seed(5)
            q, k, v = (torch.randn(B, H, S, D, generator=g).to(device) for _ in range(3))
            b = (0.1 * torch.randn(H, 2 * S - 1, generator=g)).to(device)
            w = posattn.draw_projection(m, D, generator=g).to(device)
            state["t"] = (q, k, v, b, w)
        return state["t"]

    def check(out):
        from posattn import reference
        q, k, v, b, w = inputs()
        n = 64  # rows of the O(N S) float64 formula
        fm = lambda x: reference.prf_features(x, w, D ** -0.5)  # noqa: E731
        # query rows 0..n-1 see bias entries r = j - i + S - 1 of the full problem: slice the table
        ref = reference.kernelized_rpe_direct(q[:, :, :n], k, v, b[:, S - n:], fm)
        return (out[:, :, :n].double() - ref).abs().max().item()

    def fft(backend):
        def setup():
            q, k, v, b, w = inputs()
            return (lambda: posattn.kernelized_rpe_attention(q, k, v, b, projection=w, backend=backend)), ()
        return setup

    def exact():
        q, k, v, b, w = inputs()
        idx = torch.arange(S, device=device)
        rel = idx[None, :] - idx[:, None] + S - 1
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=b[:, rel][None])), ()

    backend = "triton" if device.type == "cuda" else "torch"
    return [Case(op, shape, "sdpa + materialised RPE", exact, "float32", x=S, series=op,
                 note="baseline (exact softmax, a different function)"),
            Case(op, shape, f"posattn-{backend} FFT", fft(backend), "float32", check=check,
                 baseline="sdpa + materialised RPE", x=S, series=op,
                 note="approximation; max err vs the fp64 kernelized formula")]


def ecoformer_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """EcoFormer binary-hash linear attention (16 bits) vs exact softmax attention of the same size."""
    op = "ecoformer"
    if not hasattr(posattn, "ecoformer_attention"):
        return [_missing(op, "long sequence", "ecoformer_attention")]
    S = {"quick": 2048, "full": 8192, "gpu": 65536}[size]
    B, H, D, nb = 1, 2, 64, 16
    shape = f"B{B} H{H} S{S} d{D} bits{nb}"
    state: dict = {}

    def inputs():
        if "t" not in state:
            g = torch.Generator(device="cpu").manual_seed(6)
            qc = (torch.randint(0, 2, (B, H, S, nb), generator=g) * 2 - 1).float().to(device)
            kc = (torch.randint(0, 2, (B, H, S, nb), generator=g) * 2 - 1).float().to(device)
            v, q, k = (torch.randn(B, H, S, D, generator=g).to(device) for _ in range(3))
            state["t"] = (qc, kc, v, q, k)
        return state["t"]

    def check(out):
        from posattn import reference
        qc, kc, v, _, _ = inputs()
        ref = reference.ecoformer_linear(qc.double(), kc.double(), v.double())
        return (out.double() - ref).abs().max().item()

    def eco():
        qc, kc, v, _, _ = inputs()
        return (lambda: posattn.ecoformer_attention(qc, kc, v)), ()

    def exact():
        _, _, v, q, k = inputs()
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), ()
    return [Case(op, shape, "sdpa (exact)", exact, "float32", x=S, series=op,
                 note="baseline (exact softmax, a different function)"),
            Case(op, shape, "posattn ecoformer", eco, "float32", check=check, baseline="sdpa (exact)", x=S,
                 series=op)]


def minilm_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """all-MiniLM-L6-v2 on real sentences: stock (sdpa) vs attn_implementation="posattn"."""
    op = "minilm_e2e"
    try:
        from posattn.benchmarks import e2e
    except ImportError as err:
        def setup():
            raise NotImplementedError(str(err))
        return [Case(op, "all-MiniLM-L6-v2", "posattn", setup)]
    return e2e.minilm_cases(size, device)


# ---------------------------------------------------------------------------------------------
# The CPU claims of README (issues 3 and 4)
# ---------------------------------------------------------------------------------------------
def claim_bias_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """Issue 3: ALiBi and RelativeBias at N=8192, H=8, d=64 (B=1, non-causal), posattn's torch backend
    vs SDPA with the materialised bias; run with ``--memory`` (peak extra memory per call).
    ``size="quick"``: N=2048 for a dry look."""
    n = 2048 if size == "quick" else 8192
    cases = []
    for pe in ("alibi", "relative"):
        p = DenseProblem(1, 8, n, n, 64, pe=pe, dtype=dtype, device=device, seed=11)
        provs = ["posattn-torch", "sdpa"] if device.type == "cpu" else ["posattn-triton", "sdpa-efficient"]
        cases += dense_cases("claim_bias", p, provs, modes or ("fwd",), baseline=provs[1], series=pe,
                             note=lambda prov: "N x N bias materialised" if prov.startswith("sdpa") else "")
    return cases


def claim_varlen_cases(size: str, device: torch.device, dtype: torch.dtype, modes=None) -> list[Case]:
    """Issue 4: padding-free vs padded SDPA on the real length mix, BERT-base shapes (12 x 64), batch 64,
    max 256 (``quick``: batch 16, max 128); the claim is ratio >= 0.8 x the ideal ratio."""
    batch, max_len = (16, 128) if size == "quick" else (64, 256)
    return [dataclasses_replace(c, op="claim_varlen") for c in
            varlen_cases(size, device, dtype, lens=_length_mix(batch, max_len), label="bert-base")]


def dataclasses_replace(case: Case, **kw) -> Case:
    import dataclasses
    return dataclasses.replace(case, **kw)


GROUPS: dict[str, dict[str, Callable]] = {
    "models": {
        "fused_attention": fused_attention_cases,
        "apply_rotary": apply_rotary_cases,
        "unpad_pad": unpad_pad_cases,
        "varlen_attention": varlen_cases,
        "kvcache_decode": decode_cases,
        "kernelized_rpe": kernelized_rpe_cases,
        "ecoformer": ecoformer_cases,
        "minilm_e2e": minilm_cases,
    },
    "flash": {"flash_shapes": flash_cases},
    "papers": {"lean_decode": lean_paper_cases, "bytetransformer": bytetransformer_cases},
    "claims": {"claim_bias": claim_bias_cases, "claim_varlen": claim_varlen_cases},
}
SUITES: dict[str, Callable] = GROUPS["models"]
ALL_SUITES: dict[str, Callable] = {name: fn for group in GROUPS.values() for name, fn in group.items()}
