"""Property-based fuzzing of the CUDA C++ backends (``posattn._C`` from csrc/, explicit ``backend="cuda"``) against
the float64 reference, on a GPU. **Not yet run on a GPU**: written without one; on CPU only the harness
self-check below has run.

One hypothesis test per op (``test_fuzz_cuda[op]``, marked ``gpu``: skipped without CUDA, run by bench/gpu_check.sh's ``gpu_tests``
stage, and at depth by its ``--deep-fuzz N`` stage). Each runs the CPU fuzz file's case builder for that op with
``device`` (tensors built on CPU from the drawn seed, then copied to the GPU with their layout, NaN gaps
included: ``fuzz_helpers.to_device``) and ``cuda=True``, which narrows the drawn options to what the CUDA
backend accepts (and adds its kernels' sizes); the builders' docstrings say what each draws:

* ``flash_attn_with_kvcache`` (csrc/lean_decode.cu, stream-K): tests/test_fuzz_decode.py ``_decode_case``.
* ``flash_attn_varlen_func`` (+ kv/qkv packed; csrc/varlen.cu short-sequence forward):
  tests/test_fuzz_varlen.py ``_varlen_case``.
* ``ecoformer_attention`` (csrc/ecoformer.cu): tests/test_fuzz_ecoformer.py ``_eco_case``.
* ``apply_rotary`` (csrc/rope.cu): tests/test_fuzz_rotary.py ``_rotary_case``.
* ``unpad_input`` / ``pad_input`` (csrc/varlen.cu index and row kernels, taken for every CUDA tensor when
  posattn._C is built; checked): tests/test_fuzz_unpad.py ``_unpad_case`` / ``_pad_case``.

Checks as in the CPU fuzz files (tests/fuzz_helpers.py, tests/tolerances.py): float64 reference, NaN in
allocations (``poisoned_allocations``) and in ``out=``, inputs bit-identical afterwards, NaN/inf in data the op
must not read. The CPU self-check at the end runs the same builders with ``cuda=True`` and ``backend="torch"``
on CPU (a few examples), so CI proves that they make valid cases and that the checks pass on a known-good
backend, and runs each case through the op's ``backend="cuda"`` host-side checks (``fuzz_helpers.cuda_probe``),
so a case the CUDA backend would refuse fails here rather than on the GPU.

The GPU test carries ``@pytest.mark.gpu`` itself: a module-level ``pytestmark`` would mark the CPU
self-check too. Its ci count (25 examples per op) is sized from the CPU self-check's time per example
(mostly the float64 reference on CPU), not measured on a GPU.

Deep run on a GPU: ``bash bench/gpu_check.sh OUT --deep-fuzz N`` (N examples per test), or
``POSATTN_FUZZ_EXAMPLES=N python -m pytest tests/test_fuzz_cuda.py -m gpu --hypothesis-profile=deep``."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import CPU
from hypothesis_profiles import examples
from test_fuzz_decode import _decode_case
from test_fuzz_ecoformer import _eco_case
from test_fuzz_rotary import _rotary_case
from test_fuzz_unpad import _pad_case, _unpad_case
from test_fuzz_varlen import _varlen_case


# the builders, the most intricate kernels first (a deep run stopped at its time cap has given them the most
# examples)
_CASES = {"kvcache": _decode_case, "varlen": _varlen_case, "ecoformer": _eco_case, "rotary": _rotary_case,
          "unpad_input": _unpad_case, "pad_input": _pad_case}


# the tests: backend "cuda" on a GPU (device fixture: "cuda" there; skipped without one) ...

@pytest.mark.gpu
@pytest.mark.parametrize("op", list(_CASES))
@given(data=st.data())
@examples(25)
def test_fuzz_cuda(op, data, device):
    _CASES[op](data, "cuda", device, cuda=True)


# ... and the harness self-check: the same builders, backend "torch" on CPU (not gpu-marked)

@pytest.mark.parametrize("op", list(_CASES))
@given(data=st.data())
@examples(8)
def test_fuzz_cuda_harness_on_cpu(op, data):
    _CASES[op](data, "torch", CPU, cuda=True)
