"""CPU simulator of the three decode schedules (lean stream-K, split-KV, one block per head).

For a grid of (batch 1..64, kv heads 1..8, context 1k..512k), d=128, bf16, 132 SMs (H100 SXM),
it builds each schedule with ``posattn.scheduling`` (the arrays the kernels run) and reports:

* ``balance``: max CTA tiles / mean CTA tiles over the launched CTAs;
* ``util``: busy SM-time / (132 x makespan), from a list scheduler that places CTAs in launch
  order on the SM that frees first (one resident CTA per SM, a simplification; lean is given
  ``max_ctas = 132`` to match, while the op's default on a GPU is 2 CTAs per SM);
* ``model_us``: a bandwidth model, not a measurement. Each KV tile moves
  ``2 x BLOCK_N x d x 2`` bytes; an SM streams at ``min(SM_PEAK_GBS, HBM_GBS / busy SMs)``
  (so few busy SMs cannot reach HBM bandwidth); each CTA pays ``CTA_OVERHEAD_US``
  (prologue, q load, epilogue); each partial costs a write and a read of ``BLOCK_M x d`` fp32
  plus ``m, l``; a separate reduction launch adds ``LAUNCH_US``.

Usage: ``python bench/lean_simulator.py [--csv out.csv]``. Nothing here ran on a GPU.
"""
from __future__ import annotations

import argparse
import csv
import heapq
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from posattn.scheduling import default_block_n, lean_schedule, split_schedule, single_schedule  # noqa: E402

NUM_SMS = 132
HBM_GBS = 3350.0          # H100 SXM HBM3 peak (GB/s)
SM_PEAK_GBS = 60.0        # assumed bandwidth one SM can pull on its own (GB/s)
CTA_OVERHEAD_US = 1.0
LAUNCH_US = 2.5
BLOCK_M = 64              # query rows packed per output tile: 32 q heads / 8 kv heads = 4 rows -> padded


def tile_bytes(head_dim: int, block_n: int, elem: int = 2) -> int:
    return 2 * block_n * head_dim * elem


def simulate(sched, head_dim: int, *, num_sms: int = NUM_SMS, in_kernel_reduce: bool = True) -> dict:
    loads = sched.loads()
    used = [x for x in loads if x > 0] or [0]
    mean = sum(used) / len(used)
    balance = max(used) / mean if mean else 1.0
    tb = tile_bytes(head_dim, default_block_n(head_dim))
    # list scheduling of CTAs (launch order) onto SMs
    busy = min(num_sms, len(used))
    bw = min(SM_PEAK_GBS, HBM_GBS / max(busy, 1)) * 1e3   # bytes per microsecond
    free = [(0.0, s) for s in range(num_sms)]
    heapq.heapify(free)
    work = 0.0
    end = 0.0
    for x in loads:
        if x == 0:
            continue
        t0, s = heapq.heappop(free)
        dt = CTA_OVERHEAD_US + x * tb / bw
        work += dt
        end = max(end, t0 + dt)
        heapq.heappush(free, (t0 + dt, s))
    part_bytes = sched.num_slots * BLOCK_M * (head_dim + 2) * 4 * 2
    t = end + part_bytes / (HBM_GBS * 1e3)
    if sched.num_slots and not in_kernel_reduce:
        t += LAUNCH_US
    util = work / (num_sms * end) if end else 1.0
    return dict(ctas=sched.num_ctas, balance=balance, util=util, model_us=t, max_splits=sched.max_splits)


def run_grid(batches=(1, 2, 4, 8, 16, 32, 64), kv_heads=(1, 2, 4, 8),
             contexts=(1024, 4096, 16384, 65536, 262144, 524288), head_dim=128):
    rows = []
    bn = default_block_n(head_dim)
    for B in batches:
        for Hk in kv_heads:
            for S in contexts:
                lens = [S] * B
                lean = simulate(lean_schedule(lens, num_heads_k=Hk, block_n=bn, max_ctas=NUM_SMS), head_dim)
                split = simulate(split_schedule(lens, num_heads_k=Hk, block_n=bn, num_splits=0, num_sms=NUM_SMS),
                                 head_dim, in_kernel_reduce=False)
                single = simulate(single_schedule(lens, num_heads_k=Hk, block_n=bn), head_dim)
                rows.append(dict(batch=B, kv_heads=Hk, context=S,
                                 **{f"{k}_{m}": v for k, d in (("lean", lean), ("split", split), ("single", single))
                                    for m, v in d.items()}))
    return rows


def _ctx(S):
    return f"{S // 1024}k"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", help="write every row to this CSV")
    args = ap.parse_args(argv)
    rows = run_grid()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    worst = max(rows, key=lambda r: r["lean_balance"])
    print(f"{len(rows)} configurations, d=128 bf16, {NUM_SMS} SMs (modelled, not measured)")
    print(f"lean balance (max/mean CTA tiles): worst {worst['lean_balance']:.3f} at batch {worst['batch']}, "
          f"kv heads {worst['kv_heads']}, context {_ctx(worst['context'])}; "
          f"max splits per tile {max(r['lean_max_splits'] for r in rows)}")
    for name in ("split", "single"):
        lose = [r for r in rows if r[f"{name}_model_us"] > 1.1 * r["lean_model_us"]]
        print(f"{name} slower than lean by >10% (model) in {len(lose)} of {len(rows)} configurations; "
              f"worst {max(r[f'{name}_model_us'] / r['lean_model_us'] for r in rows):.2f}x")
    print()
    print("| batch | kv heads | context | lean balance | lean util | lean us | split us (splits) | single us |"
          " split/lean | single/lean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["batch"] in (1, 4, 16, 64) and r["kv_heads"] in (1, 8) and r["context"] in (4096, 65536, 524288):
            print(f"| {r['batch']} | {r['kv_heads']} | {_ctx(r['context'])} | {r['lean_balance']:.3f} | "
                  f"{r['lean_util']:.2f} | {r['lean_model_us']:.1f} | {r['split_model_us']:.1f} "
                  f"({r['split_max_splits']}) | {r['single_model_us']:.1f} | "
                  f"{r['split_model_us'] / r['lean_model_us']:.2f} | {r['single_model_us'] / r['lean_model_us']:.2f} |")


if __name__ == "__main__":
    main()
