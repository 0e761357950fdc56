"""bench/bench_config_ab.py (the head_dim 256 learned-phase config A/B for a lent GPU): the variants name
real config keys (a typo would time the shipped config twice), --list and the no-CUDA path run here."""
import importlib.util
import pathlib

import pytest
import torch

from posattn.triton_kernels import fused_attention as fa

_PATH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "bench_config_ab.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_config_ab", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_override_existing_keys_with_new_values():
    mod = _module()
    base = fa.BWD_CONFIGS[(256, "phases")]
    assert set(mod.VARIANTS) == {"default", "no_spill"} and mod.VARIANTS["default"] == {}
    for key, value in mod.VARIANTS["no_spill"].items():
        assert key in base or key in fa.config_for(fa.BWD_CONFIGS, 256, "phases"), key
    assert any(fa.config_for(fa.BWD_CONFIGS, 256, "phases").get(k) != v for k, v in mod.VARIANTS["no_spill"].items())


def test_list_runs_nothing(capsys):
    assert _module().main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "no_spill" in out and "head_dim 256" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_says_skipped(capsys):
    assert _module().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
