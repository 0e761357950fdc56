"""pytest-benchmark: FlashAttention's benchmark sweep at CPU scale (1k tokens, hidden 256, head_dim 64,
causal and not, seqlen 128 and 256), fwd and bwd, posattn's torch backend vs torch SDPA."""
import pytest
import torch

from bench_util import case_id, run_benchmark
from posattn.benchmarks import suites

_DEV = torch.device("cpu")
_CASES = [c for c in suites.flash_cases("quick", _DEV, torch.float32, ("fwd", "bwd"))
          if c.provider in ("posattn-torch", "sdpa") and "d64" in c.shape]


@pytest.mark.parametrize("case", _CASES, ids=[case_id(c) for c in _CASES])
def test_flash_shapes(benchmark, case):
    run_benchmark(benchmark, case)
