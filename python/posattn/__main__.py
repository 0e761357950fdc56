"""posattn command line: ``python -m posattn {info,bench,report}``.

* ``info``   what this machine has (torch/Triton versions, CUDA device, ``_C``) and which
             backends each op can use here.
* ``bench``  the main job: every implemented op on shapes from real models, checked against the
             float64 reference, one table with ratios vs a baseline measured in the same run.
* ``report`` AOT-compiles every kernel for sm_80/sm_90 and prints registers, spills, shared memory.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import _backends
    from .ops_registry import op_backends

    console = Console()
    table = Table(title="posattn info", show_header=False)
    for key, value in _backends.info().items():
        table.add_row(key, str(value) if value is not None else "[dim]none[/dim]")
    console.print(table)
    ops = Table(title="backends per op on this machine")
    ops.add_column("op")
    ops.add_column("cpu tensors")
    ops.add_column("cuda tensors")
    for name, row in op_backends().items():
        ops.add_row(name, row["cpu"], row["cuda"])
    console.print(ops)
    return 0


def _cmd_bench(args) -> int:
    from .benchmarks.cli import run as bench_run
    return bench_run(args)


def _cmd_report(args) -> int:
    from .report import run as report_run
    return report_run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what this machine has and which backends each op can use")
    p_info.set_defaults(func=_cmd_info)

    p_bench = sub.add_parser("bench", help="benchmark every implemented op on the device at hand")
    try:
        from .benchmarks.cli import add_arguments as bench_args
        bench_args(p_bench)
    except ImportError:
        pass
    p_bench.set_defaults(func=_cmd_bench)

    p_report = sub.add_parser("report", help="compile every kernel for sm_80/sm_90 and report resources")
    try:
        from .report import add_arguments as report_args
        report_args(p_report)
    except ImportError:
        pass
    p_report.set_defaults(func=_cmd_report)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
