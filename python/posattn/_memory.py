"""Memory helpers shared by the torch backends (CPU only; advisory)."""
from __future__ import annotations

import torch

_HUGEPAGE_MIN_BYTES = 8 << 20
_MADVISE = None


def madvise_hugepage(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a fresh large CPU tensor, before it is first written.

    A fresh 32 MiB output (64k tokens x 2 heads x 64 fp32) is mmap-ed by malloc on every call, and the
    first write faults in 8192 4-KiB pages: ~14 ms of a ~35 ms call here (1 thread), while at 8k tokens
    malloc reuses already-mapped memory. With MADV_HUGEPAGE (THP in "madvise" mode, the common default;
    what ``THP_MEM_ALLOC_ENABLE=1`` does for every torch allocation) the same write takes ~3.5 ms.
    Advisory only: on any failure, or off Linux, nothing happens."""
    global _MADVISE
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < _HUGEPAGE_MIN_BYTES:
        return
    if _MADVISE is None:
        _MADVISE = False
        try:
            import ctypes
            import sys
            if sys.platform.startswith("linux"):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                _MADVISE = libc.madvise
        except (OSError, AttributeError):
            pass
    if _MADVISE:
        huge, madv_hugepage = 2 << 20, 14
        lo = -(-t.data_ptr() // huge) * huge               # the 2 MiB-aligned interior of the buffer
        hi = (t.data_ptr() + nbytes) // huge * huge
        if hi > lo:
            _MADVISE(lo, hi - lo, madv_hugepage)
