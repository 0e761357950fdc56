"""Helpers of the pytest-benchmark suites of the CPU paths (``pytest bench/ --benchmark-only``); not part of the test
command (``testpaths = ["tests"]``). Cases come from the same harness as ``python -m posattn bench``,
so a regression shows up by comparing saved runs::

    pytest bench/ --benchmark-only --benchmark-autosave            # saves .benchmarks/<machine>/NNNN_*.json
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:25%

Each benchmark first checks its output against the float64 reference (a wrong kernel fails, a slow
one never does: no timing is asserted). Triton runs only on CUDA here; without a GPU the Triton rows
are skipped with their reason, never run under the interpreter (it is for tests, not timing).
"""
import hashlib
import math
import re

import pytest
import torch

from posattn.benchmarks.harness import Absent

# max abs error vs the float64 reference that counts as correct, per dtype (the benchmarks run fp32 on
# CPU; wrong kernels err by O(1), fp32 attention on these sizes by < 1e-5)
MAX_ERR = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


def case_id(case) -> str:
    return re.sub(r"[^A-Za-z0-9_.=/-]+", "_", f"{case.op}-{case.shape}-{case.provider}-{case.mode}")[:120]


def run_benchmark(benchmark, case, *, rounds: int = 3):
    """Check once against the reference, then time ``rounds`` calls after one warm-up call."""
    s = int.from_bytes(hashlib.sha256(case_id(case).encode()).digest()[:4], "little")
    torch.manual_seed(s)
    try:
        fn, _ = case.setup()
    except (Absent, NotImplementedError) as err:
        pytest.skip(f"{case.provider}: {err}")
    out = fn()
    if case.check is not None:
        err = float(case.check(out))
        assert math.isfinite(err) and err <= MAX_ERR.get(case.dtype, 1e-3), \
            f"{case.provider} on {case.shape}: max err {err:.2e} vs the float64 reference"
    del out
    benchmark.group = f"{case.op} | {case.shape} | {case.mode}"
    benchmark.extra_info.update(provider=case.provider, dtype=case.dtype, mode=case.mode,
                                flops=case.flops, bytes=case.bytes, baseline=case.baseline or "")
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
