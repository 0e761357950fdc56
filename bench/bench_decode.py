"""Decode benchmark cases for the shared harness: ``setup(cfg) -> (fn, inputs)``.

cfg keys (defaults): batch 1, num_heads 32, num_heads_k 8, head_dim 128, context 262144, dtype
"bfloat16", provider "posattn-triton" | "posattn-torch" | "flash_attn" | "torch-sdpa",
schedule "lean" | "split" | "single", device ("cuda" if present else "cpu").
``inputs`` also carries ``bytes`` (K + V bytes read: the memory-bound figure of merit, GB/s =
bytes / time). Timings are never asserted. Not yet run on a GPU.
"""
from __future__ import annotations

import torch


def _dtype(name):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def setup(cfg: dict):
    import posattn

    c = dict(batch=1, num_heads=32, num_heads_k=8, head_dim=128, context=262144, dtype="bfloat16",
             provider="posattn-triton", schedule="lean")
    c.update(cfg or {})
    dev = torch.device(c.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = _dtype(c["dtype"])
    B, H, Hk, D, S = c["batch"], c["num_heads"], c["num_heads_k"], c["head_dim"], c["context"]
    q = torch.randn(B, 1, H, D, device=dev, dtype=dt)
    k_cache = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    cache_seqlens = torch.full((B,), S, dtype=torch.int32, device=dev)
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                  bytes=2 * k_cache.numel() * k_cache.element_size())
    p = c["provider"]
    if p.startswith("posattn-"):
        backend = p.split("-", 1)[1]

        def fn():
            return posattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                   schedule=c["schedule"], backend=backend)
    elif p == "flash_attn":
        from flash_attn import flash_attn_with_kvcache as fa  # noqa: PLC0415  (optional baseline)

        def fn():
            return fa(q, k_cache, v_cache, cache_seqlens=cache_seqlens)
    elif p == "torch-sdpa":
        qt = q.transpose(1, 2)
        kt, vt = k_cache.transpose(1, 2), v_cache.transpose(1, 2)

        def fn():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=H != Hk)
    else:
        raise ValueError(f"provider: expected posattn-triton, posattn-torch, flash_attn or torch-sdpa, got {p!r}")
    return fn, inputs
