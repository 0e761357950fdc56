"""Torch backend of fused attention: forward vs backward time, new backward vs the old autograd recomputation.

The backward of ``posattn.ops._attention_torch`` runs torch's fused CPU attention backward where it computes
everything needed (fp32, no gradient of a positional parameter or of lse), else a FlashAttention-2 style
backward (arXiv 2307.08691, Algorithm 2) on the saved out/lse. ``BWD_IMPL = "recompute"`` selects the
previous implementation (per-chunk recomputation under autograd), timed here as "old".

Each row: median over ``--repeat`` runs of the forward alone (the op with inputs requiring grad) and of the
backward alone (``torch.autograd.grad`` after a fresh forward, not timed); ratio = backward / forward.

Command line (CPU; nothing is asserted about time)::

    python bench/bench_torch_backward.py --threads 1                 # B=1, H=8, N=2048, d=64, fp32, causal
    python bench/bench_torch_backward.py --threads 1 --seqlen 1024 --repeat 3 --no-old

Correctness: each case's new gradients are compared with the old ones (max abs difference over
max abs old gradient, worst input). GPU: not applicable (CPU backend); not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import posattn
from posattn.ops import _attention_torch as AT
from posattn.positional import ALiBi, RelativeBias, RoPE


def make_case(pe: str, B: int, H: int, N: int, D: int, dtype):
    q, k, v = (torch.randn(B, N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    leaves = []
    if pe == "none":
        position = None
    elif pe == "rope":
        position = RoPE()
    elif pe == "alibi":
        position = ALiBi()
    elif pe == "relative":                      # a learned table: its gradient is computed too
        table = (0.1 * torch.randn(H, 2 * 128 + 1)).requires_grad_(True)
        leaves.append(table)
        position = RelativeBias(table, max_distance=128)
    else:
        raise KeyError(pe)
    return q, k, v, position, leaves


def run(pe: str, impl: str, args) -> tuple[float, float, list[torch.Tensor]]:
    AT.BWD_IMPL = impl
    torch.manual_seed(0)
    q, k, v, position, leaves = make_case(pe, 1, args.heads, args.seqlen, args.head_dim, torch.float32)
    ins = [q, k, v] + leaves
    dout = torch.randn(1, args.seqlen, args.heads, args.head_dim)

    def fwd():
        return posattn.flash_attn_func(q, k, v, causal=not args.full, position=position, backend="torch")

    fwd_t, bwd_t, g = [], [], None
    for i in range(args.repeat + 1):            # first round: warm-up, not counted
        t0 = time.perf_counter()
        out = fwd()
        t1 = time.perf_counter()
        g = torch.autograd.grad(out, ins, dout)
        t2 = time.perf_counter()
        if i:
            fwd_t.append(t1 - t0)
            bwd_t.append(t2 - t1)
    return statistics.median(fwd_t), statistics.median(bwd_t), list(g)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="non-causal")
    ap.add_argument("--no-old", action="store_true", help="skip the old (recompute) backward")
    ap.add_argument("--pe", default="none,rope,alibi,relative")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B=1 H={args.heads} N={args.seqlen} "
          f"d={args.head_dim} fp32 {'full' if args.full else 'causal'}, median of {args.repeat}")
    print(f"{'pe':10s} {'path':5s} {'fwd ms':>9s} {'bwd ms':>9s} {'bwd/fwd':>8s} {'max|new-old|/max|old|':>22s}")
    for pe in args.pe.split(","):
        new = run(pe, "auto", args)
        old = None if args.no_old else run(pe, "recompute", args)
        diff = "" if old is None else \
            f"{max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(new[2], old[2])):.2e}"
        print(f"{pe:10s} {'new':5s} {new[0] * 1e3:9.1f} {new[1] * 1e3:9.1f} {new[1] / new[0]:8.2f} {diff:>22s}")
        if old is not None:
            print(f"{pe:10s} {'old':5s} {old[0] * 1e3:9.1f} {old[1] * 1e3:9.1f} {old[1] / old[0]:8.2f}   "
                  f"(new backward {old[1] / new[1]:.1f}x faster)")
    AT.BWD_IMPL = "auto"


if __name__ == "__main__":
    main()
