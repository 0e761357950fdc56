"""The list of posattn's ops and the backends each has, for ``info`` and ``bench``.

Each op module registers itself here when it lands (``register``). Ops listed in ``PLANNED`` and
not registered are shown as "not built yet", never hidden.
"""
from __future__ import annotations

import importlib

# op name -> (module that implements it, backends it has in preference order on a GPU)
OPS: dict[str, tuple[str, tuple[str, ...]]] = {}

PLANNED = [
    "fused_attention",      # SDPA drop-in / flash_attn_func with fused positional encodings
    "apply_rotary",
    "varlen_attention",     # flash_attn_varlen_func, padding-free (ByteTransformer)
    "unpad_pad",
    "kvcache_decode",       # flash_attn_with_kvcache, LeanAttention stream-K
    "kernelized_rpe",       # FFT kernelized attention with RPE
    "ecoformer",            # binary-hash linear attention
]


def register(name: str, module: str, backends: tuple[str, ...]) -> None:
    OPS[name] = (module, backends)


def _load_all() -> None:
    import posattn  # noqa: F401  (importing the package imports every op module that exists)


def op_backends() -> dict[str, dict[str, str]]:
    from . import _backends
    import torch

    _load_all()
    out = {}
    for name in PLANNED + [n for n in OPS if n not in PLANNED]:
        if name not in OPS:
            out[name] = {"cpu": "not built yet", "cuda": "not built yet"}
            continue
        _, backends = OPS[name]
        cpu = [b for b in backends if b == "torch" or (b == "triton" and _backends.triton_available(torch.device("cpu")))]
        cuda = []
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            cuda = [b for b in backends if b == "torch" or (b == "triton" and _backends.triton_available(dev))
                    or (b == "cuda" and _backends.cuda_ext_available(dev))]
        out[name] = {"cpu": ", ".join(cpu) or "-", "cuda": ", ".join(cuda) if cuda else "no CUDA device"}
    return out
