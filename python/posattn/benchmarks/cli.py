"""``python -m posattn bench``: every implemented op on the device at hand, one table.

Options: ``--quick`` (about a minute on a 2-core CPU), ``--suite`` to pick a group of suites
(``models`` default, ``flash``, ``papers``, ``claims``, ``all``), ``--ops`` to choose suites within it,
``--modes`` (fwd, bwd, fwd_bwd), ``--providers`` to keep some providers, ``--dtype``, ``--no-check``
to skip the reference check, ``--memory`` for peak extra memory, ``--save CSV`` to append rows,
``--markdown FILE`` for the README table, ``--plot PNG`` for time vs seqlen per provider,
``--max-seconds`` to stop starting new rows after a time budget (the rest are listed as skipped).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import harness, suites
from .providers import MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes; about a minute on a 2-core CPU")
    p.add_argument("--size", choices=suites.SIZES, default=None,
                   help="shape sizes (default: gpu on CUDA, full on CPU; --quick sets quick)")
    p.add_argument("--suite", default="models", choices=[*suites.GROUPS, "all"],
                   help="group of suites: models (real-model shapes, default), flash (FlashAttention's "
                        "benchmark shapes), papers (LeanAttention decode, ByteTransformer mixes), claims "
                        "(README CPU claims; use --memory), all")
    p.add_argument("--ops", default="all", help=f"comma list of suites: {', '.join(suites.ALL_SUITES)} (default all "
                                                "of --suite)")
    p.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} (default per suite)")
    p.add_argument("--providers", default=None,
                   help="comma list of provider names (or prefixes) to keep, e.g. posattn,sdpa")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="input dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the max-error check against the reference")
    p.add_argument("--memory", action="store_true", help="also measure peak extra memory per call")
    p.add_argument("--save", metavar="CSV", default=None, help="append the rows to this CSV")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write the table as markdown")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="write time vs seqlen per provider (one panel per swept shape; matplotlib)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per row (CPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: rows not started within it are listed as skipped")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--list", action="store_true",
                   help="print the rows that would run (op | shape | provider | mode) and exit; touches no device")


def select(args, device, size, dtype) -> list:
    group = dict(suites.ALL_SUITES) if args.suite == "all" else suites.GROUPS[args.suite]
    names = list(group) if args.ops == "all" else [s.strip() for s in args.ops.split(",")]
    unknown = [n for n in names if n not in suites.ALL_SUITES]
    if unknown:
        raise SystemExit(f"--ops: unknown suite(s) {unknown}; known: {', '.join(suites.ALL_SUITES)}")
    modes = None
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",")]
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise SystemExit(f"--modes: expected a comma list of {MODES}, got {bad}")
    keep = [p.strip() for p in args.providers.split(",")] if args.providers else None
    out = []
    for name in names:
        try:
            cases = suites.ALL_SUITES[name](size, device, dtype, modes)
        except Exception as err:  # a suite that cannot even build its cases is a row
            out.append(harness.Result(name, "-", "posattn", str(dtype), "fwd", f"error: {type(err).__name__}: {err}"))
            continue
        if keep:
            cases = [c for c in cases if any(c.provider.startswith(k) for k in keep)]
        out += cases
    return out


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = "quick" if args.quick else (args.size or ("gpu" if device.type == "cuda" else "full"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = args.min_time if args.min_time is not None else (0.05 if size == "quick" else 0.3)
    cases = select(args, device, size, dtype)
    if args.list:
        for c in cases:
            print(f"{c.op} | {c.shape} | {c.provider} | {c.mode}")
        print(f"{len(cases)} rows ({device.type}, size {size}, {dtype})")
        return 0
    start = time.perf_counter()
    results = []
    for case in cases:
        if isinstance(case, harness.Result):
            results.append(case)
            continue
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            results.append(harness.Result(case.op, case.shape, case.provider, case.dtype, case.mode,
                                          f"skipped (--max-seconds {args.max_seconds:g} spent)", x=case.x,
                                          series=case.series))
            continue
        print(f"[bench] {case.op} | {case.shape} | {case.provider} | {case.mode}", file=sys.stderr, flush=True)
        results.append(harness.run_case(case, device, check=not args.no_check, memory=args.memory,
                                        min_time_s=min_time))
    harness.fill_ratios(results)
    env = harness.environment(device)
    env["copy_GBps"] = f"{harness.copy_bandwidth(device):.1f}"
    harness.print_table(results, env)
    print(f"[bench] {len(results)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
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
    """Time vs seqlen per provider, one panel per (op, swept shape, mode, dtype), log-log axes.

    Rows of suites that do not sweep a length (a single x per panel) are drawn as points, so every
    timed row appears; rows without a time (absent, error) are left out of the plot (they are in
    the table and the CSV)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timed = [r for r in results if r.median_ms and r.x]
    panels: dict = {}
    for r in timed:
        panels.setdefault((r.op, r.series, r.mode, r.dtype), []).append(r)
    if not panels:
        print(f"--plot: no timed rows; {path} not written", file=sys.stderr)
        return
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, rs) in zip(axes.flat, sorted(panels.items())):
        by_prov: dict = {}
        for r in rs:
            by_prov.setdefault(r.provider, []).append((r.x, r.median_ms))
        for prov, pts in sorted(by_prov.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("seqlen (context for decode)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{key[0]} {key[1]} {key[2]} {key[3]}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"posattn bench: {env['device']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
