"""One entry point per op, re-exported from ``posattn.ops.*`` (the implementations live there).

Each op adds its own lines below (one import line per op module, plus its names in ``__all__``).
"""
from .ops.attention import (  # noqa: F401
    flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, scaled_dot_product_attention)
from .ops.rotary import apply_rotary  # noqa: F401

__all__ = ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "apply_rotary"]
# other ops: add `from .ops.<op> import <names>` above and extend __all__ here
