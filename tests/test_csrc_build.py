"""The compiled module posattn._C (csrc/, built by ``pip install -e .`` when nvcc is found).

Marked ``compile``: checks what can be checked without a GPU -- the module imports, reports the
archs it was built for, carries sm_80 and sm_90a cubins for every kernel file, and each launcher
raises RuntimeError "no CUDA device" here; the most register-hungry kernels compile without spills.
Kernel numerics are in tests/test_cuda_kernels.py (marked ``gpu``).
"""
import importlib
import re
import subprocess
from pathlib import Path

import pytest
import torch

from posattn import _build

pytestmark = pytest.mark.compile

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.stem for p in (ROOT / "csrc").glob("*.cu"))


@pytest.fixture(scope="module")
def C():
    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found: posattn._C is not built on this machine")
    try:
        return importlib.import_module("posattn._C")
    except ImportError as err:
        pytest.fail(f"nvcc is present but posattn._C does not import ({err}); run pip install -e .")


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        pytest.skip("cuobjdump not found in the triton package")
    return str(path)


def test_archs_and_runtime(C):
    assert C.cuda_archs == _build.cuda_archs().replace(";", ",") == "80,90a"
    assert C.cuda_runtime_version >= 12000


def test_cubins_for_both_archs(C):
    listing = subprocess.run([_cuobjdump(), "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    cubins = set(re.findall(r"(\w+)\.(sm_\w+)\.cubin", listing))
    assert KERNEL_FILES, "no csrc/*.cu found"
    for stem in KERNEL_FILES:
        for arch in ("sm_80", "sm_90a"):
            assert (stem, arch) in cubins, f"{stem}.cu has no {arch} cubin in {C.__file__}: {sorted(cubins)}"


LAUNCHERS = {
    "rotary": "RotaryParams", "unpad_index": "UnpadIndexParams", "row_copy": "RowCopyParams",
    "varlen_attention_fwd": "VarlenAttnParams", "lean_decode": "DecodeParams",
    "ecoformer_pairwise": "EcoParams", "ecoformer_linear": "EcoParams",
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launchers_raise_without_device(C, name):
    if C.device_count() > 0:
        pytest.skip("a CUDA device is present")
    params = getattr(C, LAUNCHERS[name])()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        getattr(C, name)(params, 0)


def test_params_fields_round_trip(C):
    p = C.DecodeParams()
    assert p.q == 0 and p.num_ctas == 0  # zero-initialised (params = {})
    p.q, p.epoch, p.dtype, p.softmax_scale = 2**40 + 16, 2**32 - 1, "bfloat16", 0.125
    assert (p.q, p.epoch, p.dtype, p.softmax_scale) == (2**40 + 16, 2**32 - 1, "bfloat16", 0.125)
    with pytest.raises(RuntimeError, match="unsupported dtype float64"):
        p.dtype = "float64"
    with pytest.raises(AttributeError):
        p.not_a_field = 1


def test_decode_tiles_match_scheduler(C):
    from posattn import scheduling
    for d in (64, 128, 256):
        bm, bn = C.lean_decode_tile_sizes(d)
        assert bm == 16 and bn == scheduling.default_block_n(d)


def test_python_wrappers_raise_without_device(C):
    from posattn import _cuda
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    x = torch.randn(1, 3, 2, 8)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.apply_rotary_cuda(x, torch.ones(3, 4), torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.unpad_index_cuda(torch.ones(2, 3, dtype=torch.bool))


def test_pack_sign_bits_matches_reference():
    from posattn import _cuda, reference
    for nbits in (1, 16, 31, 32, 33, 64):
        h = torch.randint(0, 2, (2, 3, 5, nbits)).to(torch.float32) * 2 - 1
        packed = _cuda.pack_sign_bits(h)
        assert packed.dtype == torch.int32 and packed.shape == (2, 3, 5, (nbits + 31) // 32)
        assert torch.equal(packed, reference.pack_bits(h, torch.int32))
        assert torch.equal(reference.unpack_bits(packed, nbits), h.to(torch.float64))


@pytest.mark.parametrize("src", ["lean_decode.cu", "ecoformer.cu"])
def test_no_register_spills(src):
    """ptxas -v on the most register-hungry kernels (sm_90a, where spills first appeared)."""
    nvcc = _build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    res = subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
                          "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas=-v", "-c", str(ROOT / "csrc" / src),
                          "-o", "/dev/null"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    assert spills, "no ptxas -v report"
    assert all(s == ("0", "0") for s in spills), f"register spills in {src}: {spills}"
