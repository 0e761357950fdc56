"""Positional encodings as data: what to fuse into an attention kernel.

Each class holds the parameters of one encoding (validated in its constructor) and nothing else;
the math lives once per backend: ``reference.py`` (float64 truth, dtype-generic torch helpers),
``triton_kernels/positional.py`` (``@triton.jit`` helpers) and ``csrc/include/posattn/*.cuh``.
Learned tensors (``RelativeBias.table``, ``T5Bias.table``, ``URPE.table``,
``LearnedPhaseRoPE.freqs``, ``ALiBi`` slopes) are kept *by reference*, never copied, so
gradients flow back to the caller's parameters.

Positions (docs/INTERNALS.md): query row ``i`` sits at ``pq = i + offset`` (``offset = 0``:
top-left, torch SDPA; ``seqlen_k - seqlen_q``: bottom-right, FlashAttention), key ``j`` at
``pk = j``. RoPE ``position_ids`` replace the rotation positions only; masks and every relative
bias use ``pk - pq`` of the index positions.

=================  ==========================================  ===========================================
class              what                                        source
=================  ==========================================  ===========================================
RoPE               rotary, + linear/NTK/dynamic/Llama-3/YaRN   Su et al. arXiv 2104.09864; transformers
                   context scaling                             ``modeling_rope_utils.py`` formulas
ALiBi              ``-slope_h * |pq - pk|`` added to logits    Press et al. arXiv 2108.12409; FlashAttention-2
RelativeBias       learned ``table[h, clamp(pk-pq)]`` added    Shaw et al. arXiv 1803.02155 (scalar form)
T5Bias             log-bucketed learned bias                   Raffel et al. arXiv 1910.10683; HF T5
XPos               interleaved RoPE with per-pair decay        Sun et al. arXiv 2212.10554; torchscale
URPE               Toeplitz multiplier after softmax           Luo et al. arXiv 2205.13401
LearnedPhaseRoPE   CARoPE: per-token/head cumulated phases     Veisi et al. arXiv 2507.23083
=================  ==========================================  ===========================================

Combine at most one rotary (RoPE / XPos / LearnedPhaseRoPE), one additive bias (ALiBi /
RelativeBias / T5Bias) and one URPE by passing a list (``parse_position``). RoPE + ALiBi with
user-chosen slopes (e.g. harmonic ``1/h``) is the "factored RoPE + ALiBi" composition of
docs/ALGORITHMS.md 5.7.

Example
-------
>>> import torch
>>> from posattn.positional import RoPE, ALiBi, parse_position, kernel_args
>>> spec = parse_position([RoPE(10000.0), ALiBi()])
>>> pe = kernel_args(spec, batch_size=2, num_heads=4, seqlen_q=5, seqlen_k=5, head_dim=8, offset=0,
...                  device=torch.device("cpu"))
>>> pe.rotary_mode, pe.bias_mode, tuple(pe.alibi_slopes.shape), tuple(pe.inv_freq.shape)
(1, 1, (2, 4), (4,))
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import reference as _ref
from ._checks import check_choice, check_float, check_int, check_tensor

__all__ = ["RoPE", "ALiBi", "RelativeBias", "T5Bias", "XPos", "URPE", "LearnedPhaseRoPE",
           "PositionSpec", "parse_position", "KernelPE", "kernel_args"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)

# keys each RoPE scaling type accepts (besides "type"/"rope_type"); True = required
_SCALING_KEYS = {
    "linear": {"factor": True},
    "ntk": {"factor": True},
    "dynamic": {"factor": True, "original_max_position_embeddings": True},
    "llama3": {"factor": True, "low_freq_factor": False, "high_freq_factor": False,
               "original_max_position_embeddings": False},
    "yarn": {"factor": True, "original_max_position_embeddings": True, "beta_fast": False, "beta_slow": False,
             "attention_factor": False, "mscale": False, "mscale_all_dim": False, "truncate": False},
}


def _check_rotary_dim(arg: str, rotary_dim):
    if rotary_dim is None:
        return None
    r = check_int(arg, rotary_dim, minimum=2)
    if r % 2:
        raise ValueError(f"{arg}: expected an even int (pairs of features rotate), got {r}")
    return r


def _resolve_rotary_dim(arg: str, rotary_dim, head_dim: int) -> int:
    r = head_dim if rotary_dim is None else rotary_dim
    if r % 2 or r < 2 or r > head_dim:
        raise ValueError(f"{arg}: expected an even rotary_dim in [2, head_dim={head_dim}], got {r}")
    return r


def _check_scaling(scaling):
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling: expected None or a dict, got {type(scaling).__name__}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default") and all(k in ("type", "rope_type") for k in scaling):
        return None
    check_choice("scaling['type']", kind, tuple(_SCALING_KEYS))
    keys = _SCALING_KEYS[kind]
    for key in scaling:
        if key not in keys and key not in ("type", "rope_type"):
            raise ValueError(f"scaling: key {key!r} is not used by type {kind!r} (accepted: {', '.join(keys)})")
    for key, required in keys.items():
        if required and scaling.get(key) is None:
            raise ValueError(f"scaling['{key}']: required for type {kind!r}, got None")
    if check_float("scaling['factor']", scaling["factor"]) <= 0:
        raise ValueError(f"scaling['factor']: expected > 0, got {scaling['factor']}")
    if scaling.get("original_max_position_embeddings") is not None:
        check_int("scaling['original_max_position_embeddings']", scaling["original_max_position_embeddings"], minimum=1)
    if kind == "llama3":
        lo = check_float("scaling['low_freq_factor']", scaling.get("low_freq_factor") or 1.0, minimum=1e-12)
        hi = check_float("scaling['high_freq_factor']", scaling.get("high_freq_factor") or 4.0, minimum=1e-12)
        if hi <= lo:
            raise ValueError(f"scaling['high_freq_factor']: expected > low_freq_factor={lo}, got {hi}")
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if scaling.get(key) is not None:
                check_float(f"scaling['{key}']", scaling[key], minimum=1e-12)
    return dict(scaling)


def _check_float_table(arg: str, table, ndim: int):
    return check_tensor(arg, table, dtypes=_FLOATS, ndim=ndim)


def _check_distance_table(table, max_distance):
    """(max_distance, table) for a per-head table indexed by clamped distance: (num_heads, 2*D+1)."""
    max_distance = _check_distance("max_distance", max_distance)
    _check_float_table("table", table, 2)
    if table.shape[1] != 2 * max_distance + 1:
        raise ValueError(f"table: expected (num_heads, 2*max_distance+1={2 * max_distance + 1}), "
                         f"got {tuple(table.shape)}")
    return max_distance, table


def _check_distance(arg: str, value) -> int:
    return check_int(arg, value, minimum=1)


class RoPE:
    """Rotary position embedding (Su et al., arXiv 2104.09864) with optional context scaling.

    Parameters
    ----------
    theta : float, default 10000.0
        Base of ``theta_i = theta**(-2i/r)``, > 0 (Llama-3: 500000).
    rotary_dim : int or None, keyword
        ``r``: the first r features of every head rotate, the rest pass through. Even, >= 2,
        <= head_dim (checked when the head_dim is known). None (default) = head_dim.
    interleaved : bool, default False
        False: GPT-NeoX / Llama half-rotated pairs ``(i, i + r/2)``; True: GPT-J pairs ``(2i, 2i+1)``.
    scaling : dict or None
        Hugging Face ``rope_scaling``-style dict: ``{"type": "linear"|"ntk"|"dynamic"|"llama3"|"yarn",
        "factor": s, ...}`` (``"rope_type"`` is accepted for ``"type"``). Extra keys: dynamic needs
        ``original_max_position_embeddings``; llama3 takes ``low_freq_factor`` (1),
        ``high_freq_factor`` (4), ``original_max_position_embeddings`` (8192); yarn needs
        ``original_max_position_embeddings`` and takes ``beta_fast`` (32), ``beta_slow`` (1),
        ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate`` (True). Formulas of
        transformers' ``modeling_rope_utils.py`` (docs/ALGORITHMS.md 5.1). Unknown keys raise.
    position_ids : int Tensor (seqlen_k,) or (batch_size or 1, seqlen_k), or None
        Rotation positions of the keys; query row i uses ``position_ids[..., i + offset]``.
        None = ``arange``. Kept by reference.

    Precision
    ---------
    For fp16 / bf16 / fp32 inputs the angles are fp32 products of the integer positions and fp32 inverse
    frequencies (as the rotary caches of FlashAttention and transformers are): an angle is off by up to
    ~|position| * 6e-8 rad, so far from 0 the result drifts from the float64 reference more than the fp32
    tolerance (1e-5): measured max abs error of the attention output 3e-4 to 4e-4 at positions ~3e4, 1e-3 to
    3e-3 at ~1.3e5, 5e-3 at ~1e6 (2026-11-30, head_dim 64, unit-normal inputs). Relative positions are what
    matter to the scores, so keep positions small where that is possible (e.g. restart them per document).
    float64 inputs compute the angles in float64.

    Raises
    ------
    TypeError, ValueError naming the argument.

    Examples
    --------
    >>> import torch
    >>> from posattn import RoPE
    >>> RoPE(10000.0).inv_freq(8, "cpu").dtype, RoPE(10000.0).inv_freq(8, "cpu").shape
    (torch.float32, torch.Size([4]))
    >>> RoPE(scaling={"type": "linear", "factor": 2.0}).inv_freq(4, "cpu")
    tensor([0.5000, 0.0050])
    """

    rotary_mode = 1

    def __init__(self, theta: float = 10000.0, *, rotary_dim: int | None = None, interleaved: bool = False,
                 scaling: dict | None = None, position_ids: torch.Tensor | None = None):
        self.theta = check_float("theta", theta, minimum=0.0)
        if self.theta <= 0:
            raise ValueError(f"theta: expected > 0, got {theta}")
        self.rotary_dim = _check_rotary_dim("rotary_dim", rotary_dim)
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
        self.interleaved = interleaved
        self.scaling = _check_scaling(scaling)
        if position_ids is not None:
            check_tensor("position_ids", position_ids, dtypes=_INTS, ndim=(1, 2))
        self.position_ids = position_ids

    @property
    def attention_factor(self) -> float:
        """YaRN's cos/sin multiplier (``0.1 ln s + 1`` unless given); 1.0 for every other scaling."""
        return _ref.yarn_attention_factor(self.scaling)

    def get_rotary_dim(self, head_dim: int) -> int:
        return _resolve_rotary_dim("rotary_dim", self.rotary_dim, head_dim)

    def inv_freq(self, head_dim: int, device=None, seqlen: int | None = None, *,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Scaled inverse frequencies (rotary_dim // 2,) on ``device``, computed in float64 and returned
        in ``dtype`` (default fp32, the kernels' type; float64 for the torch backend's float64 inputs).

        ``seqlen`` is the current length, used by ``"dynamic"`` scaling only."""
        r = self.get_rotary_dim(head_dim)
        return _ref.rope_inv_freq(head_dim, self.theta, r, self.scaling, seqlen, dtype=dtype, device=device)

    def __repr__(self):
        return (f"RoPE(theta={self.theta}, rotary_dim={self.rotary_dim}, interleaved={self.interleaved}, "
                f"scaling={self.scaling}, position_ids={'None' if self.position_ids is None else 'tensor'})")


class ALiBi:
    """Attention with linear biases: ``-slope_h * |pq - pk|`` added to the scaled logits.

    Press et al., arXiv 2108.12409; symmetric ``|.|`` form and fp32 slopes of FlashAttention-2
    (with causal masking it equals the paper's ``-slope * (i - j)``).

    Parameters
    ----------
    slopes : float Tensor (num_heads,) or (batch_size, num_heads), or None
        Slopes per head (any positive or negative values, e.g. a harmonic ``1/h`` schedule). None
        (default) = the paper's geometric slopes for the call's head count (any count, including
        non-powers of 2). Kept by reference.
    num_heads : int or None, keyword
        With ``slopes=None``, the head count the paper slopes are built for (checked against the
        call); None = take it from the call.

    Examples
    --------
    >>> import torch
    >>> from posattn import ALiBi
    >>> ALiBi().get_slopes(1, 4, "cpu")
    tensor([[0.2500, 0.0625, 0.0156, 0.0039]])
    """

    bias_mode = 1

    def __init__(self, slopes: torch.Tensor | None = None, *, num_heads: int | None = None):
        if slopes is not None:
            _check_float_table("slopes", slopes, (1, 2))
        if num_heads is not None:
            num_heads = check_int("num_heads", num_heads, minimum=1)
            if slopes is not None and slopes.shape[-1] != num_heads:
                raise ValueError(f"num_heads: {num_heads} does not match slopes of shape {tuple(slopes.shape)}")
        self.slopes = slopes
        self.num_heads = num_heads

    def slopes_for(self, batch_size: int, num_heads: int, device=None) -> torch.Tensor:
        """Slopes (num_heads,) or (batch_size, num_heads) in their own dtype (paper slopes: float64)."""
        if self.num_heads is not None and self.num_heads != num_heads:
            raise ValueError(f"position.num_heads: ALiBi was built for {self.num_heads} heads, the call has {num_heads}")
        if self.slopes is None:
            return _ref.alibi_slopes(num_heads, device=device)
        s = self.slopes
        ok = (s.dim() == 1 and s.shape[0] == num_heads) or (s.dim() == 2 and tuple(s.shape) == (batch_size, num_heads))
        if not ok:
            raise ValueError(f"position.slopes: expected (num_heads={num_heads},) or (batch_size={batch_size}, "
                             f"num_heads={num_heads}), got {tuple(s.shape)}")
        return s if device is None else s.to(device)

    def get_slopes(self, batch_size: int, num_heads: int, device=None, *,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch_size, num_heads) in ``dtype`` (default fp32, the kernels' type), contiguous, on ``device``
        (differentiable w.r.t. ``slopes``)."""
        s = self.slopes_for(batch_size, num_heads, device).to(dtype)
        if s.dim() == 1:
            s = s.unsqueeze(0).expand(batch_size, num_heads)
        return s.contiguous()

    def __repr__(self):
        return f"ALiBi(slopes={'paper' if self.slopes is None else tuple(self.slopes.shape)}, num_heads={self.num_heads})"


class RelativeBias:
    """Learned scalar relative-position bias ``table[h, clamp(pk - pq, -D, D) + D]`` added to the logits.

    Scalar-per-offset form of Shaw et al. (arXiv 1803.02155), clipped at ``max_distance`` D as there.

    Parameters
    ----------
    table : float Tensor (num_heads, 2 * max_distance + 1)
        Kept by reference (may require grad; gradients flow to it).
    max_distance : int >= 1, keyword
        Offsets beyond +-D share the edge entries.

    Examples
    --------
    >>> import torch
    >>> from posattn import RelativeBias
    >>> RelativeBias(torch.zeros(4, 9), max_distance=4).table.shape
    torch.Size([4, 9])
    """

    bias_mode = 2

    def __init__(self, table: torch.Tensor, *, max_distance: int):
        self.max_distance, self.table = _check_distance_table(table, max_distance)

    def __repr__(self):
        return f"RelativeBias(table{tuple(self.table.shape)}, max_distance={self.max_distance})"


class T5Bias:
    """T5 relative position bias: ``table[bucket(pk - pq), h]`` added to the logits.

    Raffel et al., arXiv 1910.10683; the bucket function of transformers'
    ``T5Attention._relative_position_bucket`` (docs/ALGORITHMS.md 5.3). T5 does not scale logits by
    ``1/sqrt(d)``: to reproduce T5 pass ``scale=1.0`` to the SDPA drop-in
    (``posattn.scaled_dot_product_attention``) or ``softmax_scale=1.0`` to ``flash_attn_func`` and
    the other FlashAttention-style functions.

    Parameters
    ----------
    table : float Tensor (num_buckets, num_heads)
        The ``relative_attention_bias.weight`` of HF T5; kept by reference.
    num_buckets : int, default 32
        Even, >= 4 (bidirectional) or >= 2.
    max_distance : int, default 128
        Distances at or beyond it share the last bucket; must exceed the exact-bucket range.
    bidirectional : bool, default True
        True: encoder (half the buckets for keys after the query); False: decoder (future keys in bucket 0).

    Examples
    --------
    >>> import torch
    >>> from posattn import T5Bias
    >>> T5Bias(torch.zeros(32, 8)).num_buckets
    32
    """

    bias_mode = 3

    def __init__(self, table: torch.Tensor, *, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True):
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional: expected a bool, got {type(bidirectional).__name__}")
        self.num_buckets = check_int("num_buckets", num_buckets, minimum=4 if bidirectional else 2)
        if bidirectional and self.num_buckets % 2:
            raise ValueError(f"num_buckets: expected an even number when bidirectional=True, got {self.num_buckets}")
        exact = (self.num_buckets // 2 if bidirectional else self.num_buckets) // 2
        self.max_distance = check_int("max_distance", max_distance, minimum=exact + 1)
        self.bidirectional = bidirectional
        _check_float_table("table", table, 2)
        if table.shape[0] != self.num_buckets:
            raise ValueError(f"table: expected (num_buckets={self.num_buckets}, num_heads), got {tuple(table.shape)}")
        self.table = table

    def __repr__(self):
        return (f"T5Bias(table{tuple(self.table.shape)}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional})")


class XPos:
    """xPos (Sun et al., arXiv 2212.10554; torchscale ``XPOS``): interleaved RoPE over the full head_dim
    with ``theta_i = theta**(-2i/d)``, and a per-pair decay ``zeta_i ** ((pq - pk) / scale_base)``,
    ``zeta_i = (2i + 0.4 d) / (1.4 d)`` (docs/ALGORITHMS.md 5.4). Non-causal keys after the query grow
    as ``zeta_i ** (-(pk - pq)/scale_base)``; prefer it with causal masking.

    Parameters
    ----------
    theta : float, default 10000.0 (> 0).
    scale_base : float, default 512.0 (> 0), keyword.

    Examples
    --------
    >>> import torch
    >>> from posattn import XPos
    >>> XPos().scale_base
    512.0
    """

    rotary_mode = 2
    interleaved = True
    position_ids = None

    def __init__(self, theta: float = 10000.0, *, scale_base: float = 512.0):
        self.theta = check_float("theta", theta, minimum=0.0)
        if self.theta <= 0:
            raise ValueError(f"theta: expected > 0, got {theta}")
        self.scale_base = check_float("scale_base", scale_base, minimum=0.0)
        if self.scale_base <= 0:
            raise ValueError(f"scale_base: expected > 0, got {scale_base}")

    def get_rotary_dim(self, head_dim: int) -> int:
        return _resolve_rotary_dim("head_dim", None, head_dim)

    def inv_freq(self, head_dim: int, device=None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(head_dim // 2,) in ``dtype`` (default fp32): ``theta ** (-2i / head_dim)``."""
        return _ref.rope_inv_freq(head_dim, self.theta, dtype=dtype, device=device)

    def __repr__(self):
        return f"XPos(theta={self.theta}, scale_base={self.scale_base})"


class URPE:
    """Universal RPE (Luo et al., NeurIPS 2022, arXiv 2205.13401): the softmax probabilities are
    multiplied by ``table[h, clamp(pk - pq, -D, D) + D]`` before ``@ v``; the softmax normaliser
    (and lse) are unchanged. A table of ones gives plain attention.

    Parameters
    ----------
    table : float Tensor (num_heads, 2 * max_distance + 1); kept by reference (learnable).
    max_distance : int >= 1, keyword.

    Examples
    --------
    >>> import torch
    >>> from posattn import URPE
    >>> URPE(torch.ones(2, 5), max_distance=2).max_distance
    2
    """

    def __init__(self, table: torch.Tensor, *, max_distance: int):
        self.max_distance, self.table = _check_distance_table(table, max_distance)

    def __repr__(self):
        return f"URPE(table{tuple(self.table.shape)}, max_distance={self.max_distance})"


class LearnedPhaseRoPE:
    """CARoPE (Veisi et al., arXiv 2507.23083): RoPE whose phases accumulate learned per-token,
    per-head frequencies: ``phase_i(m) = sum_{t <= m} freqs[b, h, t] ** i``, i = 0..rotary_dim/2-1
    (docs/ALGORITHMS.md 5.6; the bounded map producing ``freqs``, e.g. ``1/(softplus(x W) + 1)``, is the
    caller's). Constant ``freqs = theta**(-2/r)`` reproduces RoPE scores exactly.

    Parameters
    ----------
    freqs : float Tensor (batch_size or 1, num_heads, seqlen_k), values in (0, 1]
        Kept by reference; gradients flow to it. Query row i uses the phase at key index
        ``i + offset``, which must lie in [0, seqlen_k).
    rotary_dim : int or None, keyword; None = head_dim.
    interleaved : bool, default False (pair layout as in ``RoPE``).

    Examples
    --------
    >>> import torch
    >>> from posattn import LearnedPhaseRoPE
    >>> LearnedPhaseRoPE(torch.full((1, 2, 6), 0.5)).freqs.shape
    torch.Size([1, 2, 6])
    """

    rotary_mode = 3
    position_ids = None

    def __init__(self, freqs: torch.Tensor, *, rotary_dim: int | None = None, interleaved: bool = False):
        _check_float_table("freqs", freqs, 3)
        if freqs.numel():
            f = freqs.detach()
            if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()) or bool((f > 1).any()):
                raise ValueError(f"freqs: expected values in (0, 1], got min {f.min().item():.4g}, "
                                 f"max {f.max().item():.4g}")
        self.freqs = freqs
        self.rotary_dim = _check_rotary_dim("rotary_dim", rotary_dim)
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
        self.interleaved = interleaved

    def get_rotary_dim(self, head_dim: int) -> int:
        return _resolve_rotary_dim("rotary_dim", self.rotary_dim, head_dim)

    def __repr__(self):
        return (f"LearnedPhaseRoPE(freqs{tuple(self.freqs.shape)}, rotary_dim={self.rotary_dim}, "
                f"interleaved={self.interleaved})")


_ROTARY = (RoPE, XPos, LearnedPhaseRoPE)
_BIAS = (ALiBi, RelativeBias, T5Bias)


class PositionSpec:
    """The parsed ``position`` argument: ``(rotary, bias, urpe)``, each an object or None.

    Iterates and indexes like the 3-tuple ``(rotary, bias, urpe)``; ``names`` maps each kind to the
    argument name used in error messages (``"position"`` or ``"position[1]"``).
    """

    __slots__ = ("rotary", "bias", "urpe", "names")

    def __init__(self, rotary=None, bias=None, urpe=None, names: dict | None = None):
        self.rotary, self.bias, self.urpe = rotary, bias, urpe
        self.names = names or {"rotary": "position", "bias": "position", "urpe": "position"}

    def __iter__(self):
        return iter((self.rotary, self.bias, self.urpe))

    def __getitem__(self, i):
        return (self.rotary, self.bias, self.urpe)[i]

    def __len__(self):
        return 3

    def __bool__(self):
        return any(x is not None for x in self)

    def __repr__(self):
        return f"PositionSpec(rotary={self.rotary!r}, bias={self.bias!r}, urpe={self.urpe!r})"


def parse_position(position) -> PositionSpec:
    """Split ``position`` into one rotary, one additive bias and one URPE.

    Parameters
    ----------
    position : None, one of RoPE / XPos / LearnedPhaseRoPE / ALiBi / RelativeBias / T5Bias / URPE,
        a list or tuple of them, or an already parsed ``PositionSpec`` (returned as is).

    Returns
    -------
    PositionSpec(rotary, bias, urpe)

    Raises
    ------
    TypeError for an unknown object; ValueError for two of the same kind (e.g. RoPE and XPos),
    naming ``position[i]``.

    Examples
    --------
    >>> import torch
    >>> from posattn.positional import ALiBi, RoPE, parse_position
    >>> parse_position([RoPE(), ALiBi()]).bias
    ALiBi(slopes=paper, num_heads=None)
    >>> parse_position(None).rotary is None
    True
    """
    if isinstance(position, PositionSpec):
        return position
    if position is None:
        return PositionSpec()
    single = not isinstance(position, (list, tuple))
    items = [position] if single else list(position)
    slots = {"rotary": None, "bias": None, "urpe": None}
    names = {"rotary": "position", "bias": "position", "urpe": "position"}
    for i, obj in enumerate(items):
        name = "position" if single else f"position[{i}]"
        if isinstance(obj, _ROTARY):
            kind = "rotary"
        elif isinstance(obj, _BIAS):
            kind = "bias"
        elif isinstance(obj, URPE):
            kind = "urpe"
        else:
            raise TypeError(f"{name}: expected one of RoPE, XPos, LearnedPhaseRoPE, ALiBi, RelativeBias, T5Bias, "
                            f"URPE (or a list of them), got {type(obj).__name__}")
        if slots[kind] is not None:
            raise ValueError(f"{name}: at most one {kind} encoding per call; got {type(slots[kind]).__name__} "
                             f"({names[kind]}) and {type(obj).__name__}")
        slots[kind] = obj
        names[kind] = name
    return PositionSpec(slots["rotary"], slots["bias"], slots["urpe"], names)


class KernelPE(NamedTuple):
    """What a kernel needs of the positional encodings; built by ``kernel_args`` (docs/INTERNALS.md).

    Float tensors are fp32 (the Triton/CUDA kernels' type), or float64 when ``kernel_args`` was called
    with ``dtype=torch.float64`` (the torch backend with float64 inputs, so gradcheck holds).
    Tensors are contiguous and on the call's device; learned ones (bias_table, urpe_table, phases,
    alibi_slopes) stay connected to the caller's parameters in autograd (the same object when it is
    already fp32, contiguous and on the device; else a differentiable copy), so the op layer can
    push the kernel's d_bias_table / d_urpe_table / d_phases back with ``torch.autograd.backward``.
    """

    rotary_mode: int = 0                      # 0 none, 1 RoPE, 2 xPos, 3 learned phase
    rotary_dim: int = 0
    interleaved: bool = False
    rotary_scale: float = 1.0                 # YaRN attention factor (multiplies cos and sin), else 1.0
    inv_freq: Optional[torch.Tensor] = None   # fp32 (rotary_dim // 2,)
    position_ids: Optional[torch.Tensor] = None  # int32 (batch_size or 1, seqlen_k); None = arange
    phases: Optional[torch.Tensor] = None     # fp32 (batch_size, num_heads, seqlen_k, rotary_dim // 2)
    xpos_scale_base: float = 512.0
    bias_mode: int = 0                        # 0 none, 1 ALiBi, 2 RelativeBias, 3 T5
    alibi_slopes: Optional[torch.Tensor] = None  # fp32 (batch_size, num_heads)
    bias_table: Optional[torch.Tensor] = None  # fp32 RelativeBias (num_heads, 2D+1) or T5 (num_buckets, num_heads)
    max_distance: int = 0
    num_buckets: int = 0
    bidirectional: bool = True
    urpe_table: Optional[torch.Tensor] = None  # fp32 (num_heads, 2D+1)
    urpe_max_distance: int = 0


def _to_kernel(t: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """Same object when already right; else a differentiable conversion (never a detached copy)."""
    if t.device == torch.device(device) and t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(device=device, dtype=dtype).contiguous()


def kernel_args(spec, *, batch_size: int, num_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                offset: int, device, dtype: torch.dtype = torch.float32) -> KernelPE:
    """Validate ``spec`` against one call and flatten it into the kernel-facing ``KernelPE``.

    Parameters
    ----------
    spec : PositionSpec, or anything ``parse_position`` takes (a raw ``position`` gives exact names
        like ``position[0].table`` in errors).
    batch_size, num_heads, seqlen_q, seqlen_k, head_dim : int
        Of the call (num_heads = query heads; tables are per query head).
    offset : int
        Query row i sits at position ``i + offset`` (0 top-left, ``seqlen_k - seqlen_q`` bottom-right).
    device : torch.device or str
        Where the kernel runs.
    dtype : torch.float32 (default) or torch.float64, keyword
        Of the float tensors (inv_freq, phases, alibi_slopes, bias_table, urpe_table). The Triton and
        CUDA kernels take fp32; the torch backend takes float64 for float64 inputs (full precision,
        ``torch.autograd.gradcheck`` holds).

    Returns
    -------
    KernelPE

    Raises
    ------
    ValueError naming the argument (``position.table``, ``position[1].slopes``, ``position_ids``, ...)
    when a table, slope vector, position_ids or freqs does not fit the call.

    Examples
    --------
    >>> import torch
    >>> from posattn.positional import RelativeBias, kernel_args
    >>> pe = kernel_args(RelativeBias(torch.zeros(3, 9), max_distance=4), batch_size=1, num_heads=3,
    ...                  seqlen_q=4, seqlen_k=4, head_dim=8, offset=0, device="cpu")
    >>> pe.bias_mode, pe.max_distance
    (2, 4)
    """
    spec = parse_position(spec)
    device = torch.device(device)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    out = {}
    rot, bias, urpe = spec
    if rot is not None:
        name = spec.names["rotary"]
        if isinstance(rot, XPos):
            if head_dim % 2:
                raise ValueError(f"{name}: XPos rotates the full head_dim, which must be even; got head_dim={head_dim}")
            out.update(rotary_mode=2, rotary_dim=head_dim, interleaved=True,
                       inv_freq=rot.inv_freq(head_dim, device, dtype=dtype),
                       xpos_scale_base=rot.scale_base)
        elif isinstance(rot, LearnedPhaseRoPE):
            r = _resolve_rotary_dim(f"{name}.rotary_dim", rot.rotary_dim, head_dim)
            fr = rot.freqs
            if fr.shape[0] not in (1, batch_size) or fr.shape[1] != num_heads or fr.shape[2] != seqlen_k:
                raise ValueError(f"{name}.freqs: expected (batch_size={batch_size} or 1, num_heads={num_heads}, "
                                 f"seqlen_k={seqlen_k}), got {tuple(fr.shape)}")
            if seqlen_q > 0 and (offset < 0 or seqlen_q + offset > seqlen_k):
                raise ValueError(f"{name}.freqs: query rows sit at positions [{offset}, {seqlen_q + offset}), "
                                 f"outside the seqlen_k={seqlen_k} learned phases")
            ph = _ref.learned_phases(fr.to(device=device, dtype=dtype), r)
            ph = ph.expand(batch_size, -1, -1, -1).contiguous()
            out.update(rotary_mode=3, rotary_dim=r, interleaved=rot.interleaved, phases=ph)
        else:
            r = _resolve_rotary_dim(f"{name}.rotary_dim", rot.rotary_dim, head_dim)
            ids = rot.position_ids
            seqlen = seqlen_k
            if ids is not None:
                arg = f"{name}.position_ids"
                ok = (ids.dim() == 1 and ids.shape[0] == seqlen_k) or (
                    ids.dim() == 2 and ids.shape[0] in (1, batch_size) and ids.shape[1] == seqlen_k)
                if not ok:
                    raise ValueError(f"{arg}: expected (seqlen_k={seqlen_k},) or (batch_size={batch_size} or 1, "
                                     f"seqlen_k={seqlen_k}), got {tuple(ids.shape)}")
                if seqlen_q > 0 and (offset < 0 or seqlen_q + offset > seqlen_k):
                    raise ValueError(f"{arg}: query rows sit at key indices [{offset}, {seqlen_q + offset}), "
                                     f"outside the seqlen_k={seqlen_k} position ids")
                ids = ids.reshape(1 if ids.dim() == 1 else ids.shape[0], seqlen_k)  # -1 is ambiguous at seqlen_k=0
                ids = ids.to(device=device, dtype=torch.int32).contiguous()
                if ids.numel():
                    seqlen = int(ids.max()) + 1
            out.update(rotary_mode=1, rotary_dim=r, interleaved=rot.interleaved,
                       rotary_scale=rot.attention_factor,
                       inv_freq=rot.inv_freq(head_dim, device, seqlen, dtype=dtype),
                       position_ids=ids)
    if bias is not None:
        name = spec.names["bias"]
        if isinstance(bias, ALiBi):
            try:
                slopes = bias.get_slopes(batch_size, num_heads, device, dtype=dtype)
            except ValueError as err:
                raise ValueError(str(err).replace("position.", f"{name}.", 1)) from None
            out.update(bias_mode=1, alibi_slopes=slopes)
        elif isinstance(bias, RelativeBias):
            want = (num_heads, 2 * bias.max_distance + 1)
            if tuple(bias.table.shape) != want:
                raise ValueError(f"{name}.table: expected (num_heads={want[0]}, 2*max_distance+1={want[1]}), "
                                 f"got {tuple(bias.table.shape)}")
            out.update(bias_mode=2, bias_table=_to_kernel(bias.table, device, dtype), max_distance=bias.max_distance)
        else:
            want = (bias.num_buckets, num_heads)
            if tuple(bias.table.shape) != want:
                raise ValueError(f"{name}.table: expected (num_buckets={want[0]}, num_heads={want[1]}), "
                                 f"got {tuple(bias.table.shape)}")
            out.update(bias_mode=3, bias_table=_to_kernel(bias.table, device, dtype), max_distance=bias.max_distance,
                       num_buckets=bias.num_buckets, bidirectional=bias.bidirectional)
    if urpe is not None:
        name = spec.names["urpe"]
        want = (num_heads, 2 * urpe.max_distance + 1)
        if tuple(urpe.table.shape) != want:
            raise ValueError(f"{name}.table: expected (num_heads={want[0]}, 2*max_distance+1={want[1]}), "
                             f"got {tuple(urpe.table.shape)}")
        out.update(urpe_table=_to_kernel(urpe.table, device, dtype), urpe_max_distance=urpe.max_distance)
    return KernelPE(**out)
