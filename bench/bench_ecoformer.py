"""EcoFormer benchmark: time and peak memory of ``posattn.ecoformer_attention`` vs exact softmax
attention (torch SDPA) over sequence lengths, and the cost of ``KernelizedHash.fit``.

    python bench/bench_ecoformer.py                       # CPU sweep 1k..64k, non-causal and causal
    python bench/bench_ecoformer.py --seqlens 1024 8192 --memory --check
    python bench/bench_ecoformer.py --fit 256 1024        # cost of the KSH fit

``setup(cfg) -> (fn, inputs)`` is the one builder shared with the harness
(``posattn.benchmarks.harness``): cfg keys ``provider`` ("posattn-torch", "posattn-triton",
"torch-sdpa", "fit"), ``seqlen``, ``batch`` (1), ``heads`` (2), ``head_dim`` (64), ``num_bits`` (16),
``causal`` (False), ``dtype`` ("float32"), ``device`` ("cpu"), ``mode`` ("fwd" or "fwd_bwd").
Times are medians of repeated calls after a warm-up; nothing is asserted. The rows carry the device
name, versions and git sha (printed above the table). On CPU a second column gives the median CPU
time of the calling thread (``time.thread_time``; with 1 torch thread all the work runs there): on a
shared machine the wall time of a long call includes the time other processes held the core, which a
short call often escapes, so wall-time ratios between lengths are biased upward under load; the CPU
time is not (cache and memory contention still show in it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import posattn
from posattn.benchmarks import harness

DEFAULTS = dict(provider="posattn-torch", seqlen=4096, batch=1, heads=2, head_dim=64, num_bits=16,
                causal=False, dtype="float32", device="cpu", mode="fwd")


def setup(cfg: dict):
    """Build inputs once; return (fn, inputs) with fn() running one call (see module docstring)."""
    c = dict(DEFAULTS, **cfg)
    dev, dt = torch.device(c["device"]), getattr(torch, c["dtype"])
    B, H, N, D, nb = c["batch"], c["heads"], c["seqlen"], c["head_dim"], c["num_bits"]
    g = torch.Generator().manual_seed(0)
    grad = c["mode"] == "fwd_bwd"
    if c["provider"] == "fit":
        x = torch.randn(1, H, N, D, generator=g).to(dev)
        hasher = posattn.nn.KernelizedHash(D, nb, 25, heads=H).to(dev)
        return (lambda: hasher.fit(x, topk=10, max_tokens=N)), (x,)
    v = torch.randn(B, H, N, D, generator=g).to(dev, dt).requires_grad_(grad)
    if c["provider"] == "torch-sdpa":
        q = torch.randn(B, H, N, D, generator=g).to(dev, dt).requires_grad_(grad)
        k = torch.randn(B, H, N, D, generator=g).to(dev, dt).requires_grad_(grad)

        def fn():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=c["causal"])
            if grad:
                out.sum().backward()
            return out
        return fn, (q, k, v)
    backend = {"posattn-torch": "torch", "posattn-triton": "triton"}[c["provider"]]
    codes = (torch.randint(0, 2, (B, H, N, nb), generator=g) * 2 - 1).to(dev, dt).requires_grad_(grad)

    def fn():
        out = posattn.ecoformer_attention(codes, codes, v, causal=c["causal"], backend=backend)
        if grad:
            out.sum().backward()
        return out
    return fn, (codes, v)


def _check(cfg, out) -> float:
    """Max abs error vs the float64 linear reference (the pairwise one is N x N)."""
    from posattn import reference
    _, (codes, v) = setup(cfg)
    ref = reference.ecoformer_linear(codes, codes, v, causal=cfg["causal"])
    return (out.double() - ref).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--providers", nargs="*", default=["torch-sdpa", "posattn-torch"])
    p.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    p.add_argument("--max-exact", type=int, default=16384, help="longest seqlen for torch-sdpa (quadratic)")
    p.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd")
    p.add_argument("--memory", action="store_true", help="also measure peak extra memory (slower)")
    p.add_argument("--check", action="store_true", help="max error vs the float64 reference first")
    p.add_argument("--fit", type=int, nargs="*", default=None, help="time KernelizedHash.fit on these token counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine, more threads make timings erratic)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = harness.environment(dev)
    print(f"# device: {harness.device_name(dev)}; " + "; ".join(f"{k}={v}" for k, v in env.items() if k != "device"))

    if args.fit is not None:
        print("\n| tokens | heads | head_dim | bits | anchors | fit median (s) |\n|---|---|---|---|---|---|")
        for n in args.fit:
            fn, _ = setup(dict(provider="fit", seqlen=n, device=args.device))
            t = harness.time_fn(fn, dev, min_time_s=0.0, max_reps=3, warmup=0)
            print(f"| {n} | 2 | 64 | 16 | 25 | {t.median_ms / 1e3:.2f} |")
        return 0

    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    print(f"\n| causal | seqlen | provider | mode | median ms | p20-p80 ms | cpu ms | peak MB | max err | vs sdpa |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for causal in causals:
        times: dict[tuple, float] = {}
        cpu_times: dict[tuple, float] = {}
        for n in args.seqlens:
            for prov in args.providers:
                cfg = dict(provider=prov, seqlen=n, causal=causal, device=args.device, mode=args.mode)
                if prov == "torch-sdpa" and n > args.max_exact:
                    print(f"| {causal} | {n} | {prov} | {args.mode} | skipped (> --max-exact) | | | | | |")
                    continue
                fn, _ = setup(cfg)
                out = fn()
                err = f"{_check(cfg, out.detach()):.1e}" if args.check and prov != "torch-sdpa" else ""
                cpu: list[float] = []

                def timed(fn=fn, cpu=cpu):
                    c0 = time.thread_time()
                    fn()
                    cpu.append((time.thread_time() - c0) * 1e3)
                t = harness.time_fn(timed, dev, min_time_s=0.5, max_reps=20)
                cpu_ms = statistics.median(cpu[1:] or cpu) if dev.type == "cpu" else None   # cpu[0]: warm-up
                if cpu_ms is not None:
                    cpu_times[(n, prov)] = cpu_ms
                mem = f"{harness.peak_memory(fn, dev) / 2**20:.1f}" if args.memory else ""
                times[(n, prov)] = t.median_ms
                ratio = times.get((n, "torch-sdpa"))
                ratio = f"{ratio / t.median_ms:.2f}x" if ratio and prov != "torch-sdpa" else ""
                cpu_s = f"{cpu_ms:.2f}" if cpu_ms is not None else ""
                print(f"| {causal} | {n} | {prov} | {args.mode} | {t.median_ms:.2f} | {t.p20_ms:.2f}-{t.p80_ms:.2f} "
                      f"| {cpu_s} | {mem} | {err} | {ratio} |", flush=True)
        for prov in args.providers:
            if (65536, prov) in times and (8192, prov) in times:
                cpu_r = ""
                if (65536, prov) in cpu_times and (8192, prov) in cpu_times:
                    cpu_r = f", CPU time {cpu_times[(65536, prov)] / cpu_times[(8192, prov)]:.2f}"
                print(f"\n{prov} causal={causal}: time(64k)/time(8k) = {times[(65536, prov)] / times[(8192, prov)]:.2f} "
                      f"wall{cpu_r} (linear: 8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
