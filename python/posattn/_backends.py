"""What this machine offers: CUDA, Triton (compiled or interpreted), the compiled module ``_C``.

Backend names used by every op: ``"triton"``, ``"cuda"`` (posattn._C), ``"torch"``, and
``"auto"`` (CUDA tensors -> the fastest available kernel; CPU tensors -> torch). An explicit
backend that is not available raises ``RuntimeError`` naming what is missing; it never falls back
silently.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> bool:
    """Triton can run on ``device``: a CUDA device, or CPU tensors under TRITON_INTERPRET=1."""
    if triton_version() is None:
        return False
    if device.type == "cuda":
        return not triton_interpret()
    return device.type == "cpu" and triton_interpret()


_C_cache: dict = {}


def load_C(build: bool = True):
    """The compiled module ``posattn._C``, or None.

    Order: a prebuilt module installed with the package; else, on a machine with a GPU and nvcc,
    a JIT build into ``~/.cache/posattn/<hash>`` (see ``_build.jit_build``).
    """
    if "mod" in _C_cache:
        return _C_cache["mod"]
    mod = None
    try:
        mod = importlib.import_module("posattn._C")
    except ImportError:
        if build and torch.cuda.is_available():
            from . import _build
            try:
                folder = _build.jit_build(verbose=True)
            except RuntimeError as err:  # build failed: report once, run without _C
                print(f"posattn: JIT build of _C failed: {err}")
                folder = None
            if folder is not None:
                path = next(folder.glob("_C*.so"))
                spec = importlib.util.spec_from_file_location("posattn._C", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
    _C_cache["mod"] = mod
    return mod


def cuda_ext_available(device: torch.device) -> bool:
    return device.type == "cuda" and load_C() is not None


def resolve(backend: str, device: torch.device, *, supported=("triton", "torch"), op: str = "op") -> str:
    """Pick the backend for one call.

    ``supported`` lists the backends that op has, in order of preference on a GPU (for
    ``backend="auto"`` an op may pass only those auto may pick).
    Raises ValueError for a name that is not one of ``"auto"`` + ``supported`` (the message lists
    exactly those), RuntimeError for one of them that cannot run here.

    >>> import torch
    >>> resolve("auto", torch.device("cpu"))
    'torch'
    """
    if backend == "auto" or backend not in supported:
        valid = ("auto",) + tuple(supported)
        if backend not in valid:
            why = f" ({op} has no {backend!r} backend)" if backend in BACKENDS else ""
            raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in valid)}, "
                             f"got {backend!r}{why}")
    if backend == "auto":
        if device.type == "cuda":
            for b in supported:
                if b == "triton" and triton_available(device):
                    return b
                if b == "cuda" and cuda_ext_available(device):
                    return b
        return "torch"
    if backend == "triton" and not triton_available(device):
        why = ("triton is not installed" if triton_version() is None else
               f"tensors are on {device}; Triton runs on CUDA devices, or on CPU with TRITON_INTERPRET=1")
        raise RuntimeError(f"backend='triton' is not available: {why}")
    if backend == "cuda" and not cuda_ext_available(device):
        why = (f"tensors are on {device}, not a CUDA device" if device.type != "cuda"
               else "posattn._C is not built (no nvcc at install time?)")
        raise RuntimeError(f"backend='cuda' is not available: {why}")
    return backend


def info() -> dict:
    """A summary of what is here, for ``python -m posattn info``."""
    C = load_C(build=False)
    return {
        "torch": torch.__version__,
        "triton": triton_version(),
        "TRITON_INTERPRET": triton_interpret(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "posattn._C": (f"built for archs {C.cuda_archs} (CUDA runtime {C.cuda_runtime_version}, "
                       f"{C.device_count()} device(s) visible)") if C is not None else None,
    }
