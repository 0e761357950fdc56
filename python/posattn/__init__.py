"""posattn: attention kernels with positional encodings fused in.

The public API, nothing else. See README.md for the feature table and docs/ALGORITHMS.md for the
math of every op.
"""
__version__ = "0.1.0"

from .positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos
from .ops.attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                            scaled_dot_product_attention)
from .ops.rotary import apply_rotary
from .ops.varlen import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func, pad_input, unpad_input)
from .ops.decode import flash_attn_with_kvcache
from .ops.kernelized_rpe import default_num_features, draw_projection, kernelized_rpe_attention
from .ops.ecoformer import ecoformer_attention, ecoformer_pack_bits, ecoformer_unpack_bits
from . import nn

__all__ = [
    "__version__",
    # positional encodings (data passed as position=)
    "RoPE", "XPos", "LearnedPhaseRoPE", "ALiBi", "RelativeBias", "T5Bias", "URPE",
    # fused attention: torch SDPA drop-in and FlashAttention-compatible entry points
    "scaled_dot_product_attention", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "apply_rotary",
    # padding-free variable-length attention
    "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
    "unpad_input", "pad_input",
    # decode over a KV cache (LeanAttention stream-K)
    "flash_attn_with_kvcache",
    # kernelized attention with RPE via FFT
    "kernelized_rpe_attention", "draw_projection", "default_num_features",
    # EcoFormer binary-hash attention
    "ecoformer_attention", "ecoformer_pack_bits", "ecoformer_unpack_bits",
    "nn",
]
