"""``python -m posattn bench``: every implemented op on the device at hand, one table.

Options: ``--quick`` (under a minute on a 2-core CPU), ``--ops`` to choose suites, ``--dtype``,
``--no-check`` to skip the reference check, ``--memory`` for peak memory, ``--save CSV`` to append
rows, ``--markdown FILE`` for the README table, ``--plot PNG`` for time vs shape per provider.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import harness, suites


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes; under a minute on a 2-core CPU")
    p.add_argument("--size", choices=suites.SIZES, default=None,
                   help="shape suite (default: gpu on CUDA, full on CPU; --quick sets quick)")
    p.add_argument("--ops", default="all", help=f"comma list of suites: {', '.join(suites.SUITES)} (default all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="input dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the max-error check against the reference")
    p.add_argument("--memory", action="store_true", help="also measure peak extra memory per call")
    p.add_argument("--save", metavar="CSV", default=None, help="append the rows to this CSV")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write the table as markdown")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a bar plot of time per provider")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per row (CPU)")


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = "quick" if args.quick else (args.size or ("gpu" if device.type == "cuda" else "full"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    names = list(suites.SUITES) if args.ops == "all" else [s.strip() for s in args.ops.split(",")]
    unknown = [n for n in names if n not in suites.SUITES]
    if unknown:
        print(f"--ops: unknown suite(s) {unknown}; known: {', '.join(suites.SUITES)}", file=sys.stderr)
        return 2
    min_time = args.min_time if args.min_time is not None else (0.05 if size == "quick" else 0.3)
    results = []
    for name in names:
        try:
            cases = suites.SUITES[name](size, device, dtype)
        except Exception as err:  # a suite that cannot even build its inputs is a row
            results.append(harness.Result(name, "-", "posattn", str(dtype), "fwd",
                                          f"error: {type(err).__name__}: {err}"))
            continue
        for case in cases:
            print(f"[bench] {case.op} | {case.shape} | {case.provider}", file=sys.stderr, flush=True)
            results.append(harness.run_case(case, device, check=not args.no_check, memory=args.memory,
                                            min_time_s=min_time))
    harness.fill_ratios(results)
    env = harness.environment(device)
    harness.print_table(results, env)
    if args.save:
        print(f"appended {len(results)} rows to {harness.write_csv(results, args.save, env)}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(harness.markdown_table(results, env))
        print(f"wrote {args.markdown}")
    if args.plot:
        plot(results, args.plot, env)
    failed = [r for r in results if r.status.startswith("error")]
    return 1 if failed and any(r.provider.startswith("posattn") for r in failed) else 0


def plot(results, path, env) -> None:
    """Time per provider, one panel per op (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = sorted({r.op for r in results if r.median_ms})
    if not ops:
        return
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in results if r.op == op and r.median_ms]
        labels = [f"{r.provider}\n{r.shape[:40]}" for r in rows]
        ax.barh(range(len(rows)), [r.median_ms for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.set_xlabel("ms (median)")
        ax.set_title(op, fontsize=9)
    fig.suptitle(f"posattn bench — {env['device']} — {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
