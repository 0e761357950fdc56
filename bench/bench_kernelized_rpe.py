"""Kernelized attention with RPE (FFT, O(n log n)) vs exact softmax attention with the same RPE bias.

    python bench/bench_kernelized_rpe.py                          # CPU sweep 1k..64k, fwd, non-causal
    python bench/bench_kernelized_rpe.py --seqlens 4096 8192 --causal both --memory --check
    python bench/bench_kernelized_rpe.py --mode fwd_bwd --seqlens 1024 4096

Providers (cfg ``provider``):
  posattn-torch     posattn.kernelized_rpe_attention, backend="torch" (torch.fft; pocketfft on CPU)
  posattn-triton    the same with the Triton FFT-input kernel (GPU; on CPU only under TRITON_INTERPRET=1)
  posattn-exact     posattn.scaled_dot_product_attention with RelativeBias(rpe_bias, max_distance=seqlen-1):
                    exact softmax(q k^T / sqrt(d) + b_{j-i}) v, bias fused, never an N x N tensor
  torch-sdpa-bias   torch SDPA with the (heads, N, N) float bias materialised from rpe_bias inside the timed
                    call (the bias is a learnable table, so a training step rebuilds it); causal adds -inf
                    above the diagonal. 4 * heads * N^2 bytes: 32 GiB at N = 64k, heads = 2, so it stops at
                    --max-sdpa (default 16k).

``setup(cfg) -> (fn, inputs)`` is the one builder shared with ``posattn.benchmarks.harness``: cfg keys
``provider``, ``seqlen``, ``batch`` (1), ``heads`` (2), ``head_dim`` (32, = head_dim_v), ``num_features``
(32, PRF), ``causal`` (False), ``dtype`` ("float32"), ``device`` ("cpu"), ``mode`` ("fwd" or "fwd_bwd").
Times are medians after a warm-up (one call when a call takes seconds); nothing is asserted. The first line
printed carries the device, versions, threads and git sha.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import posattn
from posattn.benchmarks import harness

DEFAULTS = dict(provider="posattn-torch", seqlen=4096, batch=1, heads=2, head_dim=32, num_features=32,
                causal=False, dtype="float32", device="cpu", mode="fwd")
PROVIDERS = ("posattn-torch", "posattn-triton", "posattn-exact", "torch-sdpa-bias")


def _inputs(c):
    dev, dt = torch.device(c["device"]), getattr(torch, c["dtype"])
    B, H, N, D = c["batch"], c["heads"], c["seqlen"], c["head_dim"]
    g = torch.Generator().manual_seed(0)
    grad = c["mode"] == "fwd_bwd"
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dev, dt).requires_grad_(grad) for _ in range(3))
    # a smooth learned-looking bias: decays with distance, range ~2 nats
    r = torch.arange(-(N - 1), N, dtype=torch.float32)
    rpe_bias = (-torch.log1p(r.abs())[None, :] * torch.tensor([0.2, 0.35] * H)[:H, None]).to(dev)
    rpe_bias = (rpe_bias + 0.05 * torch.randn(H, 2 * N - 1, generator=g).to(dev)).requires_grad_(grad)
    w = posattn.draw_projection(c["num_features"], D, generator=g, device=dev)
    return q, k, v, rpe_bias, w


def setup(cfg: dict):
    """Build inputs once; return (fn, inputs) with fn() running one call (see module docstring)."""
    c = dict(DEFAULTS, **cfg)
    if c["provider"] not in PROVIDERS:
        raise ValueError(f"provider: expected one of {', '.join(PROVIDERS)}, got {c['provider']!r}")
    q, k, v, b, w = _inputs(c)
    N, grad, causal = c["seqlen"], c["mode"] == "fwd_bwd", c["causal"]

    if c["provider"] in ("posattn-torch", "posattn-triton"):
        backend = c["provider"].split("-")[1]

        def call():
            return posattn.kernelized_rpe_attention(q, k, v, b, projection=w, causal=causal, backend=backend)
    elif c["provider"] == "posattn-exact":
        from posattn.positional import RelativeBias

        def call():
            return posattn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                        position=RelativeBias(b, max_distance=max(N - 1, 1)))
    else:
        def call():
            i = torch.arange(N, device=q.device)
            rel = i[None, :] - i[:, None] + N - 1
            bias = b[:, rel]                                     # (heads, N, N)
            if causal:
                bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf"))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    def fn():
        out = call()
        if grad:
            out.sum().backward()
        return out
    return fn, (q, k, v, b, w)


def check(cfg: dict, out: torch.Tensor) -> float:
    """Max abs error of a kernelized provider vs the float64 FFT reference of the same formula (same W)."""
    from posattn import reference
    c = dict(DEFAULTS, **cfg)
    q, k, v, b, w = _inputs(c)
    fm = lambda x: reference.prf_features(x, w, c["head_dim"] ** -0.5)  # noqa: E731
    ref = reference.kernelized_rpe_fft(q.detach(), k.detach(), v.detach(), b.detach(), fm, c["causal"])
    return (out.detach().double() - ref).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--providers", nargs="*", default=["posattn-exact", "torch-sdpa-bias", "posattn-torch"])
    p.add_argument("--causal", choices=["no", "yes", "both"], default="no")
    p.add_argument("--max-sdpa", type=int, default=16384, help="longest seqlen for torch-sdpa-bias (N^2 bias)")
    p.add_argument("--max-exact", type=int, default=65536, help="longest seqlen for posattn-exact (N^2 time)")
    p.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd")
    p.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    p.add_argument("--head-dim", type=int, default=DEFAULTS["head_dim"])
    p.add_argument("--num-features", type=int, default=DEFAULTS["num_features"])
    p.add_argument("--memory", action="store_true", help="also measure peak extra memory (profiler replay)")
    p.add_argument("--check", action="store_true", help="max error of kernelized providers vs float64 first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads make timings erratic)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = harness.environment(dev)
    print(f"# device: {harness.device_name(dev)}; threads={args.threads}; "
          + "; ".join(f"{k}={v}" for k, v in env.items() if k != "device"))
    print(f"# config: batch=1 heads={args.heads} head_dim=head_dim_v={args.head_dim} "
          f"num_features={args.num_features} (PRF, orthogonal) float32 mode={args.mode}")
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    print("\n| causal | seqlen | provider | median ms | p20-p80 ms | reps | peak MB | max err | posattn-exact/this "
          "| sdpa-bias/this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for causal in causals:
        times: dict[tuple, float] = {}
        for n in args.seqlens:
            for prov in args.providers:
                cfg = dict(provider=prov, seqlen=n, causal=causal, device=args.device, mode=args.mode,
                           heads=args.heads, head_dim=args.head_dim, num_features=args.num_features)
                limit = {"torch-sdpa-bias": args.max_sdpa, "posattn-exact": args.max_exact}.get(prov)
                if limit is not None and n > limit:
                    print(f"| {causal} | {n} | {prov} | skipped (> --max-{prov.split('-')[-1]} {limit}) | | | | | | |")
                    continue
                fn, _ = setup(cfg)
                t0 = time.perf_counter()
                out = fn()                       # warm-up, and the output for --check
                first_ms = (time.perf_counter() - t0) * 1e3
                err = f"{check(cfg, out):.1e}" if args.check and prov.startswith("posattn-") and \
                    prov != "posattn-exact" else ""
                del out
                if first_ms > 3000 and dev.type == "cpu":   # seconds per call: that call is the measurement
                    t = harness.Timing(first_ms, first_ms, first_ms, 1)
                else:
                    t = harness.time_fn(fn, dev, min_time_s=1.0, max_reps=10, warmup=0)
                mem = f"{harness.peak_memory(fn, dev) / 2**20:.0f}" if args.memory else ""
                times[(n, prov)] = t.median_ms
                ratios = []
                for base_prov in ("posattn-exact", "torch-sdpa-bias"):
                    base = times.get((n, base_prov))
                    ratios.append(f"{base / t.median_ms:.2f}x" if base and prov != base_prov else "")
                print(f"| {causal} | {n} | {prov} | {t.median_ms:.1f} | {t.p20_ms:.1f}-{t.p80_ms:.1f} | {t.reps} "
                      f"| {mem} | {err} | {' | '.join(ratios)} |", flush=True)
        for prov in args.providers:
            if (65536, prov) in times and (8192, prov) in times:
                print(f"\n{prov} causal={causal}: time(64k)/time(8k) = "
                      f"{times[(65536, prov)] / times[(8192, prov)]:.2f} (n log n: 10.7, n^2: 64)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
