"""Float64 reference implementations of every posattn op: the truth every kernel is tested against.

Short and obviously correct; materialises N x N matrices freely; computes in float64 whatever the
input dtype. Each attention-like op returns ``(out, lse)``; a fully masked query row gives out 0
and lse -inf. Math and sources: ../shared/design/ALGORITHMS.md (section numbers below).

Each section is owned by one op; edit only inside your section.
"""
from __future__ import annotations

import math

import torch

# ==== section: positional encodings and dense attention (ALGORITHMS.md 5.1-5.7) ====

# ==== end section: positional encodings and dense attention ====

# ==== section: varlen attention (ALGORITHMS.md 2) ====

# ==== end section: varlen attention ====

# ==== section: KV-cache decode and state merge (ALGORITHMS.md 1) ====

# ==== end section: KV-cache decode ====

# ==== section: kernelized attention with RPE (ALGORITHMS.md 3) ====

# ==== end section: kernelized attention with RPE ====

# ==== section: EcoFormer hash attention (ALGORITHMS.md 4) ====

# ==== end section: EcoFormer ====
