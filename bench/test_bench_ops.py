"""pytest-benchmark: every op of ``python -m posattn bench --quick`` (model shapes, CPU sizes) with its
CPU baseline, grouped per op and shape so posattn and the baseline sit side by side."""
import pytest
import torch

from bench_util import case_id, run_benchmark
from posattn.benchmarks import suites

_DEV = torch.device("cpu")
# minilm_e2e loads real weights (an optional extra) and takes seconds per call: left to the CLI
_CASES = [c for name, build in suites.SUITES.items() if name != "minilm_e2e"
          for c in build("quick", _DEV, torch.float32)]


@pytest.mark.parametrize("case", _CASES, ids=[case_id(c) for c in _CASES])
def test_op(benchmark, case):
    run_benchmark(benchmark, case)
