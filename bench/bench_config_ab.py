"""Side-by-side timing of two launch configs of the fused-attention backward where the compile report
leaves a choice to a GPU: head_dim 256 with learned phases (LearnedPhaseRoPE) on sm_90.

* ``default``: ``BWD_CONFIGS[(256, "phases")]`` as shipped: 64-row dq programs and 64-key dk programs on
  wgmma (HGMMA); ptxas keeps 29 / 11 values in local memory outside the loops (docs/KERNEL_RESOURCES.md).
* ``no_spill``: 32-row dq and 32-key dk/dv programs at 8 warps: no local memory at all, but mma.sync (HMMA)
  instead of wgmma, twice the dq programs (each reads all of K and V) and twice the dk/dv programs.

Both run the same inputs in one process; the script prints and writes (``--out``) the median backward time of
each (posattn.benchmarks.harness.time_fn, as every bench here), their ratio and the largest difference between
their gradients. Needs a CUDA device: elsewhere it says so and exits 0 (``--list`` prints what it would run and
touches nothing).

    python bench/bench_config_ab.py --out ab.json      # in bench/gpu_check.sh
"""
from __future__ import annotations

import argparse
import sys

import torch

VARIANTS = {
    "default": {},
    "no_spill": dict(dq_BLOCK_M=32, dq_num_warps=8, BLOCK_N=32, num_warps=8),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--list", action="store_true", help="print the variants and shape; run nothing")
    a = p.parse_args(argv)
    shape = f"batch {a.batch}, seqlen {a.seqlen}, heads {a.heads}, head_dim 256, {a.dtype}, causal"
    if a.list:
        for name, v in VARIANTS.items():
            print(f"{name}: BWD_CONFIGS[(256, 'phases')] | {v or '(as shipped)'}; {shape}")
        return 0
    if not torch.cuda.is_available():
        print("bench_config_ab: skipped, no CUDA device (it compares GPU launch configs)")
        return 0

    import posattn
    from posattn.benchmarks.harness import device_name, emit_json, time_fn
    import posattn.triton_kernels.fused_attention as fa

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(a.batch, a.seqlen, a.heads, 256, device="cuda", dtype=dt, generator=g)
               .requires_grad_(True) for _ in range(3))
    freqs = (0.05 + 0.9 * torch.rand(a.batch, a.heads, a.seqlen, device="cuda", generator=g)).requires_grad_(True)
    dout = torch.randn(a.batch, a.seqlen, a.heads, 256, device="cuda", dtype=dt, generator=g)
    base = dict(fa.BWD_CONFIGS[(256, "phases")])
    results, grads = {}, {}
    try:
        for name, variant in VARIANTS.items():
            fa.BWD_CONFIGS[(256, "phases")] = dict(base, **variant)
            out = posattn.flash_attn_func(q, k, v, causal=True, position=posattn.LearnedPhaseRoPE(freqs),
                                          backend="triton")

            def bwd():
                return torch.autograd.grad(out, (q, k, v, freqs), dout, retain_graph=True)
            grads[name] = bwd()
            results[name] = time_fn(bwd, dev).median_ms
    finally:
        fa.BWD_CONFIGS[(256, "phases")] = base
    diff = {n: max((x.float() - y.float()).abs().max().item() for x, y in zip(grads["default"], grads[n]))
            for n in grads}
    rec = dict(device=device_name(dev), shape=shape, backward_ms=results,
               ratio_no_spill_over_default=results["no_spill"] / results["default"], max_grad_diff=diff)
    emit_json(rec, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
