"""Test configuration shared by every test file.

* Without a GPU, Triton runs under its interpreter: TRITON_INTERPRET=1 is set here before triton
  is imported, and Triton tests run on CPU tensors (marked ``interp``).
* ``device`` fixture: "cuda" when present, else "cpu"; never hard-code "cuda".
* ``gpu``-marked tests are skipped without CUDA.
* Fresh random inputs seeded from the test id (``seed`` fixture): reproducible, never zeros.
"""
import hashlib
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here); runs on a lent GPU via bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def seed(request):
    """Seed torch from the test id so every test gets fresh but reproducible inputs."""
    s = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little")
    torch.manual_seed(s)
    return s


# ---- hypothesis profiles "ci" (default, fast) and "deep" (>= 5000 examples per op and backend), chosen with
# ---- pytest's --hypothesis-profile=deep; defined in tests/hypothesis_profiles.py (owner: the fuzz tests)
import hypothesis_profiles  # noqa: E402,F401
