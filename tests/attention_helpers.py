"""Shared helpers of the fused-attention API tests (test_attention_api.py, test_attention_torch_backend.py).

Inputs are fresh random tensors (the ``seed`` fixture of conftest seeds torch per test); the truth is
``posattn.reference.attention`` in float64 on the same (dtype-rounded) inputs.
"""
from __future__ import annotations

import torch

from posattn import reference as R
from posattn.positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos

PE_KINDS = ["none", "rope", "rope_partial_interleaved", "rope_position_ids", "rope_yarn", "alibi",
            "alibi_learned", "relative", "t5", "t5_causal", "xpos", "urpe", "learned_phase",
            "rope+alibi", "rope+t5", "relative+urpe"]


def make_position(kind: str, *, batch: int, heads: int, seqlen_k: int, head_dim: int, device="cpu"):
    """A position spec for ``kind`` with random learnable tables (requires_grad) and the list of them."""
    leaves = []

    def leaf(t):
        t = t.to(device).requires_grad_(True)
        leaves.append(t)
        return t

    def one(k):
        if k == "none":
            return None
        if k == "rope":
            return RoPE(10000.0)
        if k == "rope_partial_interleaved":
            return RoPE(500.0, rotary_dim=head_dim // 2 if (head_dim // 2) % 2 == 0 else head_dim - 2,
                        interleaved=True)
        if k == "rope_position_ids":
            ids = torch.randint(0, 4 * seqlen_k + 8, (batch, seqlen_k), device=device)
            return RoPE(10000.0, position_ids=ids)
        if k == "rope_yarn":
            return RoPE(10000.0, scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
        if k == "alibi":
            return ALiBi()
        if k == "alibi_learned":  # harmonic slopes 1/h as a learnable parameter (ALGORITHMS.md 5.7)
            return ALiBi(leaf(1.0 / torch.arange(1, heads + 1, dtype=torch.float32)))
        if k == "relative":
            return RelativeBias(leaf(torch.randn(heads, 2 * 6 + 1)), max_distance=6)
        if k in ("t5", "t5_causal"):
            return T5Bias(leaf(torch.randn(16, heads)), num_buckets=16, max_distance=40,
                          bidirectional=(k == "t5"))
        if k == "xpos":
            return XPos(10000.0, scale_base=64.0)
        if k == "urpe":
            return URPE(leaf(1.0 + 0.5 * torch.randn(heads, 2 * 5 + 1)), max_distance=5)
        if k == "learned_phase":
            return LearnedPhaseRoPE(leaf(0.25 + 0.5 * torch.rand(batch, heads, seqlen_k)))
        raise KeyError(k)

    parts = [one(k) for k in kind.split("+")]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None, leaves
    return (parts[0] if len(parts) == 1 else parts), leaves


def qkv(batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, *, head_dim_v=None, device="cpu",
        requires_grad=False):
    """FlashAttention layout (batch, seq, heads, head_dim) random inputs."""
    dv = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=device).to(dtype)
    k = torch.randn(batch, seqlen_k, heads_k, head_dim, device=device).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_k, dv, device=device).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def ref_fa(q, k, v, **kw):
    """reference.attention on FlashAttention-layout inputs; returns out (B, Sq, H, Dv) fp64, lse (B, H, Sq)."""
    out, lse = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    return out.transpose(1, 2), lse


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad with None for inputs not reached."""
    inputs = list(inputs)
    g = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for t, x in zip(inputs, g)]
