"""Foundation: the shared checks helper, the backend resolver, the CLI, the bench harness's
exact FLOP count, and the build's archs."""
import subprocess
import sys

import pytest
import torch

import posattn
from posattn import _backends, _checks
from posattn.benchmarks import harness


def test_dims_binds_and_reports_first_conflict():
    d = _checks.Dims()
    d.check("q", torch.empty(2, 5, 4, 128), ("batch_size", "seqlen_q", "num_heads", "head_dim"))
    with pytest.raises(ValueError) as e:
        d.check("k", torch.empty(2, 77, 4, 64), ("batch_size", "seqlen_k", "num_heads_k", "head_dim"))
    msg = str(e.value)
    assert msg.startswith("k: expected (batch_size=2, seqlen_k, num_heads_k, head_dim=128)"), msg
    assert "got (2, 77, 4, 64)" in msg
    with pytest.raises(ValueError, match="v: expected a 4-D tensor"):
        d.check("v", torch.empty(2, 5, 4), ("batch_size", "seqlen_k", "num_heads_k", "head_dim"))


def test_check_tensor_type_dtype_device():
    with pytest.raises(TypeError, match="q: expected a torch.Tensor, got list"):
        _checks.check_tensor("q", [1, 2])
    with pytest.raises(TypeError, match=r"q: expected dtype in \(float16, bfloat16, float32\), got int64"):
        _checks.check_tensor("q", torch.zeros(2, dtype=torch.int64), dtypes=_checks.FLOAT_DTYPES)
    with pytest.raises(ValueError, match="q: expected a 4-D tensor, got 2-D"):
        _checks.check_tensor("q", torch.zeros(2, 2), ndim=4)


@pytest.mark.parametrize("cu, msg", [
    (torch.tensor([0, 3, 5], dtype=torch.int64), "expected dtype in \\(int32\\)"),
    (torch.tensor([1, 3, 5], dtype=torch.int32), "cu_seqlens\\[0\\] == 0"),
    (torch.tensor([0, 5, 3], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([0, 3, 9], dtype=torch.int32), "exceeds the 8 tokens"),
])
def test_check_cu_seqlens(cu, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        _checks.check_cu_seqlens("cu_seqlens_q", cu, batch_size=2, total=8)


def test_check_window_and_scalars():
    assert _checks.check_window("window_size", (-1, 3)) == (-1, 3)
    with pytest.raises(ValueError, match=r"window_size\[0\]: expected >= -1, got -2"):
        _checks.check_window("window_size", (-2, 0))
    with pytest.raises(ValueError, match="window_size: expected a pair"):
        _checks.check_window("window_size", 3)
    with pytest.raises(ValueError, match="dropout_p: expected <= 1"):
        _checks.check_float("dropout_p", 1.5, minimum=0.0, maximum=1.0)
    with pytest.raises(ValueError, match="softcap: expected a finite number"):
        _checks.check_float("softcap", float("nan"))


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert _backends.resolve("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="backend: expected one of"):
        _backends.resolve("tpu", cpu)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        _backends.resolve("cuda", cpu, supported=("cuda", "torch"))
    # the valid set named in the error is the op's own ("auto" + supported), never BACKENDS
    with pytest.raises(ValueError, match=r"backend: expected one of 'auto', 'triton', 'torch', got 'cuda' "
                                         r"\(sdpa has no 'cuda' backend\)"):
        _backends.resolve("cuda", cpu, supported=("triton", "torch"), op="sdpa")
    with pytest.raises(ValueError, match=r"expected one of 'auto', 'triton', 'torch', got 'cdua'$"):
        _backends.resolve("cdua", cpu, supported=("triton", "torch"))
    for name, call in (("scaled_dot_product_attention", lambda b: posattn.scaled_dot_product_attention(
            torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), backend=b)),
                       ("flash_attn_func", lambda b: posattn.flash_attn_func(
            torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), backend=b))):
        with pytest.raises(ValueError, match=r"expected one of 'auto', 'triton', 'torch', got 'cdua'$"):
            call("cdua")
        with pytest.raises(ValueError, match=rf"got 'cuda' \({name} has no 'cuda' backend\)"):
            call("cuda")


@pytest.mark.parametrize("sq, sk, causal, offset, window", [
    (7, 7, True, 0, (-1, -1)), (5, 9, True, 4, (-1, -1)), (9, 5, True, -4, (-1, -1)),
    (8, 8, False, 0, (2, 1)), (6, 11, True, 5, (3, -1)), (1, 1, True, 0, (-1, -1)),
])
def test_visible_pairs_exact(sq, sk, causal, offset, window):
    i = torch.arange(sq)[:, None] + offset
    j = torch.arange(sk)[None, :]
    left, right = window
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    assert harness.visible_pairs(sq, sk, causal=causal, offset=offset, window=window) == int(vis.sum())
    full = harness.attention_flops(2, 3, sq, sk, 16)
    assert full == 2 * sq * sk * 32 * 6
    assert harness.attention_flops(2, 3, sq, sk, 16, mode="bwd") == 2.5 * full


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "posattn", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "fused_attention" in out.stdout


def test_built_extension_archs():
    C = _backends.load_C(build=False)
    if C is None:
        pytest.skip("posattn._C not built here (no nvcc at install time)")
    assert C.cuda_archs == "80,90a"
    if not torch.cuda.is_available():
        assert C.device_count() == 0
