"""Regression tests for bugs the property-based fuzzing (tests/test_fuzz_*.py) found.

One test per bug, named after it, with the minimal input hypothesis printed (in the comment) reduced to
the tensors that matter. Each compares with the float64 reference (reference.py) or checks the documented
error, and fails on the code before the fix.
"""
import math

import pytest
import torch

import posattn
from posattn import reference as R
from fuzz_helpers import check_close, grads, poisoned_allocations


def test_rope_position_ids_with_seqlen_k_zero():
    # test_fuzz_sdpa_torch: seed=0, float32, batch=1, heads=(1, 1), seqlen_q=0, seqlen_k=0, head_dim=7,
    # position=[RoPE(rotary_dim=2, position_ids=tensor of shape (0,))]
    # kernel_args reshaped position_ids with reshape(-1, 0) (ambiguous -> RuntimeError) and reference.attention
    # took max() of an empty tensor (RuntimeError). An empty problem must give an empty result.
    for ids_shape, batch in (((0,), 1), ((1, 0), 2), ((2, 0), 2)):
        q = torch.randn(batch, 1, 0, 8)
        k = torch.randn(batch, 1, 0, 8)
        pos = posattn.RoPE(rotary_dim=2, position_ids=torch.zeros(ids_shape, dtype=torch.int64))
        out = posattn.scaled_dot_product_attention(q, k, k, position=pos, backend="torch")
        ro, _ = R.attention(q, k, k, position=pos)
        assert out.shape == ro.shape == (batch, 1, 0, 8)
        out = posattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), position=pos,
                                      backend="torch")
        assert out.shape == (batch, 0, 1, 8)
