"""Providers of dense attention for the benchmark harness, each behind an availability check.

One problem (:class:`DenseProblem`: shapes, causal flag, positional encoding, dtype, device) is run
by every provider on the same inputs. A provider that cannot run here raises
:class:`~posattn.benchmarks.harness.Absent` from its setup, so the table keeps the row with the
reason (never a crash, never a silent omission).

Providers (``PROVIDERS``)
-------------------------
* ``posattn-torch``, ``posattn-triton``: ``posattn.scaled_dot_product_attention(..., position=pe,
  backend=...)``, the positional encoding fused; ``posattn-cuda``: absent (dense attention has no
  CUDA C++ kernel; csrc holds varlen and decode kernels).
* ``sdpa`` (CPU: torch's own dispatch) and ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``,
  ``sdpa-cudnn`` (CUDA, one backend each via ``torch.nn.attention.sdpa_kernel``): the encoding the
  way a model without posattn applies it: RoPE rotates q and k first (cos/sin tables built once,
  outside the timed call, as models do per forward); additive biases are materialised as a
  ``(1, H, Sq, Sk)`` float mask inside the timed call (that N x N tensor is what posattn avoids).
* ``flex_attention``: ``torch.nn.attention.flex_attention`` compiled, with a ``score_mod`` for
  ALiBi / relative bias / T5 buckets (bucket of every distance precomputed, a gather in score_mod)
  and a causal ``BlockMask``; CUDA only here (CPU flex needs an inductor C++ build per shape).
* ``flash_attn``: ``flash_attn.flash_attn_func`` (ALiBi through ``alibi_slopes``; RoPE rotated
  first; no relative/T5 bias: absent), when importable on CUDA.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` without a bias (RoPE rotated first),
  when importable on CUDA.

Modes: ``fwd`` (inference: under ``torch.no_grad``), ``bwd`` (backward of a forward computed once
in setup, ``retain_graph=True``), ``fwd_bwd`` (both per call). Gradients go to q, k, v.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .harness import Absent, Case, attention_flops

MODES = ("fwd", "bwd", "fwd_bwd")
SDPA_CUDA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
             "sdpa-math": "MATH", "sdpa-cudnn": "CUDNN_ATTENTION"}
PROVIDERS = ("posattn-triton", "posattn-torch", "posattn-cuda", "sdpa", *SDPA_CUDA, "flex_attention",
             "flash_attn", "xformers")


@dataclasses.dataclass
class DenseProblem:
    """Inputs of one dense attention benchmark, torch layout ``(batch, heads, seq, head_dim)``.

    pe: "none", "rope" (theta ``rope_theta``), "alibi", "relative" (table (H, 2*128+1)),
    "t5" (32 buckets, max_distance 128, bidirectional). Causal is top-left (torch's rule).
    """
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool = False
    pe: str = "none"
    heads_k: Optional[int] = None
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0
    rope_theta: float = 10000.0

    @property
    def hk(self) -> int:
        return self.heads if self.heads_k is None else self.heads_k

    def label(self) -> str:
        h = f"H{self.heads}" + (f"/{self.hk}" if self.hk != self.heads else "")
        s = f"S{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"Sq{self.seqlen_q} Sk{self.seqlen_k}"
        return f"B{self.batch} {h} {s} d{self.head_dim}{' causal' if self.causal else ''} {self.pe}"

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen_q, self.seqlen_k, self.head_dim,
                               causal=self.causal, mode=mode)

    def make(self):
        """Fresh random q, k, v (seeded) and the posattn position object (or None)."""
        import posattn
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        B, H, Hk, D = self.batch, self.heads, self.hk, self.head_dim

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(self.device, self.dtype)
        q, k, v = rnd(B, H, self.seqlen_q, D), rnd(B, Hk, self.seqlen_k, D), rnd(B, Hk, self.seqlen_k, D)
        pe = {"none": lambda: None,
              "rope": lambda: posattn.RoPE(theta=self.rope_theta),
              "alibi": lambda: posattn.ALiBi(num_heads=H),
              "relative": lambda: posattn.RelativeBias(torch.randn(H, 2 * 128 + 1, generator=g).to(self.device),
                                                       max_distance=128),
              "t5": lambda: posattn.T5Bias(torch.randn(32, H, generator=g).to(self.device), num_buckets=32,
                                           max_distance=128)}[self.pe]()
        return q, k, v, pe


# ---------------------------------------------------------------------------------------------
# Baseline pieces: rotate first, materialise the bias, flex score_mods
# ---------------------------------------------------------------------------------------------
def _rotary_tables(p: DenseProblem):
    from posattn import reference
    inv = reference.rope_inv_freq(p.head_dim, p.rope_theta, dtype=torch.float32, device=p.device)
    pos = torch.arange(max(p.seqlen_q, p.seqlen_k), device=p.device)
    cos, sin = reference.rope_cos_sin(pos, inv)  # (S, d/2) fp32
    return cos, sin


def _rotate(x: torch.Tensor, cos, sin) -> torch.Tensor:
    """RoPE (NeoX halves) of x (B, H, S, d) in fp32, back to x's dtype; positions 0..S-1."""
    from posattn import reference
    s = x.shape[-2]
    return reference.apply_rotary(x.float(), cos[:s], sin[:s], False).to(x.dtype)


def _dense_bias(p: DenseProblem, pe) -> torch.Tensor:
    """(1, H, Sq, Sk) additive bias in q's dtype, -inf above the diagonal when causal."""
    from posattn import reference
    bias = reference.position_bias(pe, batch_size=1, num_heads=p.heads, seqlen_q=p.seqlen_q,
                                   seqlen_k=p.seqlen_k, offset=0, device=p.device, dtype=p.dtype).to(p.dtype)
    if p.causal:
        keep = torch.ones(p.seqlen_q, p.seqlen_k, dtype=torch.bool, device=p.device).tril()
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias


def _score_mod(p: DenseProblem, pe):
    """FlexAttention score_mod with the same bias as posattn (pk - pq = kv_idx - q_idx)."""
    if p.pe == "alibi":
        slopes = pe.get_slopes(1, p.heads, p.device)[0]

        def mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (kv_idx - q_idx).abs()
        return mod
    if p.pe == "relative":
        table, dmax = pe.table.float(), pe.max_distance

        def mod(score, b, h, q_idx, kv_idx):
            return score + table[h, (kv_idx - q_idx).clamp(-dmax, dmax) + dmax]
        return mod
    if p.pe == "t5":
        from posattn import reference
        span = max(p.seqlen_q, p.seqlen_k)
        rel = torch.arange(-span + 1, span, device=p.device)
        bucket = reference.t5_bucket(rel, pe.num_buckets, pe.max_distance, pe.bidirectional)
        table = pe.table.float()

        def mod(score, b, h, q_idx, kv_idx):
            return score + table[bucket[kv_idx - q_idx + span - 1], h]
        return mod
    return None


# ---------------------------------------------------------------------------------------------
# Forward functions per provider: forward(q, k, v) -> out (B, H, Sq, d)
# ---------------------------------------------------------------------------------------------
def forward_fn(provider: str, p: DenseProblem, pe) -> Callable:
    """The forward call of ``provider`` on ``p``; raises Absent when it cannot run here."""
    cuda = p.device.type == "cuda"
    gqa = p.hk != p.heads
    if provider.startswith("posattn-"):
        import posattn
        from posattn import _backends
        backend = provider.split("-", 1)[1]
        if backend == "cuda":
            raise Absent("no CUDA C++ kernel for dense fused attention (csrc has varlen and decode)")
        if backend == "triton" and not cuda:
            raise Absent("Triton needs a CUDA device here (the CPU interpreter is for tests, not timing)")
        if backend == "triton" and not _backends.triton_available(p.device):
            raise Absent("Triton not available")

        def fwd(q, k, v):
            return posattn.scaled_dot_product_attention(q, k, v, is_causal=p.causal, enable_gqa=gqa,
                                                        position=pe, backend=backend)
        return fwd

    rope = p.pe == "rope"
    cos_sin = _rotary_tables(p) if rope else None

    def prep(q, k):
        return (_rotate(q, *cos_sin), _rotate(k, *cos_sin)) if rope else (q, k)

    if provider == "sdpa" or provider in SDPA_CUDA:
        if provider == "sdpa" and cuda:
            raise Absent("on CUDA each SDPA backend is its own row (sdpa-flash, ...)")
        if provider in SDPA_CUDA and not cuda:
            raise Absent("per-backend SDPA rows are CUDA only (CPU: row 'sdpa')")
        F = torch.nn.functional
        has_bias = p.pe in ("alibi", "relative", "t5")

        def call(q, k, v):
            q, k = prep(q, k)
            if has_bias:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_bias(p, pe), enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal, enable_gqa=gqa)
        if provider == "sdpa":
            return call
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, SDPA_CUDA[provider])

        def fwd(q, k, v):
            with sdpa_kernel([backend]):
                return call(q, k, v)
        return fwd

    if provider == "flex_attention":
        if not cuda:
            raise Absent("FlexAttention rows run on CUDA only (CPU flex compiles an inductor C++ kernel per shape)")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as err:
            raise Absent(f"torch.nn.attention.flex_attention not importable ({err})") from None
        score_mod = _score_mod(p, pe)
        block_mask = None
        if p.causal:
            def causal_mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx
            block_mask = create_block_mask(causal_mod, None, None, p.seqlen_q, p.seqlen_k, device=p.device)
        compiled = torch.compile(flex_attention, dynamic=False)

        def fwd(q, k, v):
            q, k = prep(q, k)
            return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
        return fwd

    if provider == "flash_attn":
        if not cuda:
            raise Absent("flash_attn needs CUDA")
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise Absent("flash_attn not importable") from None
        if p.pe in ("relative", "t5"):
            raise Absent(f"flash_attn has no {p.pe} bias")
        slopes = pe.get_slopes(1, p.heads, p.device)[0] if p.pe == "alibi" else None

        def fwd(q, k, v):
            q, k = prep(q, k)
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=p.causal,
                                alibi_slopes=slopes)
            return o.transpose(1, 2)
        return fwd

    if provider == "xformers":
        if not cuda:
            raise Absent("xformers needs CUDA")
        try:
            import xformers.ops as xops
        except ImportError:
            raise Absent("xformers not importable") from None
        if p.pe not in ("none", "rope"):
            raise Absent("xformers rows are run without an additive bias")
        group = p.heads // p.hk
        bias = xops.LowerTriangularMask() if p.causal else None

        def fwd(q, k, v):
            q, k = prep(q, k)
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            o = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                attn_bias=bias)
            return o.transpose(1, 2)
        return fwd
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def mode_fn(forward: Callable, q, k, v, mode: str) -> Callable:
    """One timed call in ``mode`` (fwd / bwd / fwd_bwd); inputs are detached copies for grads."""
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return forward(q, k, v)
        return fn
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    g = torch.Generator(device="cpu").manual_seed(1234)
    if mode == "bwd":
        out = forward(*leaves)
        dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    dout = torch.randn(shape, generator=g).to(q.device, q.dtype)
    return lambda: torch.autograd.grad(forward(*leaves), leaves, dout)


def reference_check(q, k, v, *, causal: bool, position=None, nq: int = 64) -> Callable:
    """Max abs error of the first ``nq`` query rows of a fwd output vs the float64 reference
    (top-left queries keep their positions when the rows are sliced)."""
    def check(out):
        from posattn import reference
        if isinstance(out, tuple):
            out = out[0]
        n = min(nq, q.shape[2])
        ref, _ = reference.attention(q[:, :, :n].double(), k.double(), v.double(), causal=causal,
                                     offset=0, position=position)
        return (out[:, :, :n].double() - ref).abs().max().item()
    return check


def dense_cases(op: str, p: DenseProblem, providers, modes, *, baseline: Optional[str], shape: str = "",
                x: Optional[int] = None, series: str = "", note: Callable[[str], str] = lambda prov: "") -> list[Case]:
    """Cases for every (mode, provider) of one problem; inputs are built once and shared."""
    shape = shape or p.label()
    state: dict = {}
    dt = str(p.dtype).replace("torch.", "")

    def inputs():
        if "qkv" not in state:
            state["qkv"] = p.make()
        return state["qkv"]

    cases = []
    for mode in modes:
        for prov in providers:
            def setup(prov=prov, mode=mode):
                q, k, v, pe = inputs()
                return mode_fn(forward_fn(prov, p, pe), q, k, v, mode), (q, k, v)

            def check(out):
                q, k, v, pe = inputs()
                return reference_check(q, k, v, causal=p.causal, position=pe)(out)
            cases.append(Case(op, shape, prov, setup, dt, mode=mode, flops=p.flops(mode),
                              check=check if mode == "fwd" else None,
                              baseline=None if prov == baseline else baseline, note=note(prov),
                              x=x if x is not None else p.seqlen_q, series=series))
    return cases


def default_providers(device: torch.device) -> list[str]:
    """posattn first, then the baselines of the device at hand (absent ones stay as rows)."""
    if device.type == "cuda":
        return ["posattn-triton", "posattn-cuda", *SDPA_CUDA, "flex_attention", "flash_attn", "xformers"]
    return ["posattn-torch", "sdpa", "posattn-triton", "sdpa-flash", "flex_attention", "flash_attn"]


def baseline_provider(device: torch.device, pe: str = "none") -> str:
    """The row ratios are taken against: torch SDPA (CUDA: its flash backend, or the memory-efficient
    one for an additive bias, which the flash backend does not take)."""
    if device.type != "cuda":
        return "sdpa"
    return "sdpa-efficient" if pe in ("alibi", "relative", "t5") else "sdpa-flash"


def flash_shapes(size: str) -> list[tuple[int, int]]:
    """(batch, seqlen) pairs of FlashAttention's benchmark_flash_attention.py (16k tokens per batch)
    on a GPU; a CPU-sized look (1k tokens) otherwise."""
    if size == "gpu":
        return [(16384 // s, s) for s in (512, 1024, 2048, 4096, 8192, 16384)]
    seqlens = (128, 256) if size == "quick" else (128, 256, 512, 1024)
    return [(max(1, 1024 // s), s) for s in seqlens]


def flash_hidden(size: str) -> int:
    return 2048 if size == "gpu" else 256


__all__ = ["DenseProblem", "MODES", "PROVIDERS", "forward_fn", "mode_fn", "dense_cases", "reference_check",
           "default_providers", "baseline_provider", "flash_shapes", "flash_hidden", "setup_from_cfg"]


def setup_from_cfg(cfg: dict):
    """``setup(cfg) -> (fn, inputs)`` of one dense provider from plain values (for subprocess runs such
    as ``harness.rss_peak_memory("posattn.benchmarks.providers:setup_from_cfg", cfg)``).

    cfg keys: provider, mode ("fwd"), batch, heads, seqlen_q, seqlen_k, head_dim, causal (False),
    pe ("none"), heads_k (None), dtype ("float32"), device ("cpu"), seed (0).
    """
    c = dict(mode="fwd", causal=False, pe="none", heads_k=None, dtype="float32", device="cpu", seed=0)
    c.update(cfg)
    p = DenseProblem(c["batch"], c["heads"], c["seqlen_q"], c["seqlen_k"], c["head_dim"], causal=c["causal"],
                     pe=c["pe"], heads_k=c["heads_k"], dtype=getattr(torch, c["dtype"]),
                     device=torch.device(c["device"]), seed=c["seed"])
    q, k, v, pe = p.make()
    return mode_fn(forward_fn(c["provider"], p, pe), q, k, v, c["mode"]), (q, k, v)
