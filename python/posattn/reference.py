"""Float64 reference implementations of every posattn op: the truth every kernel is tested against.

Short and obviously correct; materialises N x N matrices freely; computes in float64 whatever the
input dtype. Each attention-like op returns ``(out, lse)``; a fully masked query row gives out 0
and lse -inf. Math and sources: docs/ALGORITHMS.md (section numbers below).

Each section is owned by one op; edit only inside your section.
"""
from __future__ import annotations

import math

import torch

# ==== section: positional encodings and dense attention (docs/ALGORITHMS.md 5.1-5.7) ====
#
# Conventions of this section (shared with python/posattn/positional.py and the torch backend):
#
# * Dense attention layout is torch's ``(batch, heads, seq, head_dim)``.
# * Positions: query row ``i`` sits at ``pq = i + offset`` and key ``j`` at ``pk = j``
#   (``offset = 0``: top-left, torch SDPA; ``offset = seqlen_k - seqlen_q``: bottom-right, FlashAttention).
#   RoPE ``position_ids`` replace these *rotation* positions only; masks and every relative bias
#   use the index positions ``pk - pq``.
# * The PE helpers are dtype-generic (they compute in the dtype of their floating inputs, at least
#   float32 for angles), so the torch backend can call them per chunk in float32; ``attention``
#   upcasts everything to float64.


def _angle_dtype(*ts) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (never fp16/bf16 for angles)."""
    for t in ts:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _scaling_get(scaling: dict, key: str, default=None):
    v = scaling.get(key, default)
    return default if v is None else v


def rope_inv_freq(head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None,
                  scaling: dict | None = None, seqlen: int | None = None, *,
                  dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """RoPE inverse frequencies ``theta_i = theta**(-2i/r)``, i = 0..r/2-1, after context scaling.

    Parameters
    ----------
    head_dim : int
        Head dimension ``d``; used as ``rotary_dim`` when that is None.
    theta : float
        RoPE base (10000; Llama-3: 500000).
    rotary_dim : int or None
        ``r``, even, ``2 <= r <= head_dim``; None means ``head_dim``.
    scaling : dict or None
        None (plain RoPE) or a Hugging Face ``rope_scaling``-style dict with ``"type"`` (or
        ``"rope_type"``) in ``"linear"`` (theta_i / s), ``"ntk"`` (base * s**(r/(r-2))),
        ``"dynamic"`` (base * (s*L/L0 - (s-1))**(r/(r-2)) when ``L = seqlen > L0``),
        ``"llama3"`` (keys ``low_freq_factor`` = 1, ``high_freq_factor`` = 4,
        ``original_max_position_embeddings`` = 8192) or ``"yarn"`` (``beta_fast`` = 32,
        ``beta_slow`` = 1, ``original_max_position_embeddings``, ``truncate`` = True), and
        ``"factor"`` = s. Formulas of transformers' ``modeling_rope_utils.py`` (docs/ALGORITHMS.md 5.1).
    seqlen : int or None
        Current sequence length ``L``, used only by ``"dynamic"`` (None: no dynamic rescale).
    dtype, device
        Of the result (computed in float64, then cast).

    Returns
    -------
    Tensor (r // 2,) of ``dtype``.

    Examples
    --------
    >>> rope_inv_freq(8, 10000.0).tolist()
    [1.0, 0.1, 0.01, 0.001]
    """
    r = head_dim if rotary_dim is None else int(rotary_dim)
    if r < 2 or r % 2 or r > head_dim:
        raise ValueError(f"rotary_dim: expected an even int in [2, head_dim={head_dim}], got {r}")
    base = float(theta)
    exps = torch.arange(0, r, 2, dtype=torch.float64) / r
    kind = None if scaling is None else scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        inv = base ** (-exps)
    elif kind == "linear":
        inv = base ** (-exps) / float(scaling["factor"])
    elif kind in ("ntk", "dynamic"):
        s = float(scaling["factor"])
        if r <= 2:
            raise ValueError(f"rotary_dim: NTK scaling needs rotary_dim > 2 (exponent r/(r-2)), got {r}")
        if kind == "ntk":
            base = base * s ** (r / (r - 2))
        else:
            l0 = int(scaling["original_max_position_embeddings"])
            if seqlen is not None and seqlen > l0:
                base = base * (s * seqlen / l0 - (s - 1)) ** (r / (r - 2))
        inv = base ** (-exps)
    elif kind == "llama3":
        s = float(scaling["factor"])
        lo = float(_scaling_get(scaling, "low_freq_factor", 1.0))
        hi = float(_scaling_get(scaling, "high_freq_factor", 4.0))
        l0 = float(_scaling_get(scaling, "original_max_position_embeddings", 8192))
        inv = base ** (-exps)
        wavelen = 2 * math.pi / inv
        gamma = (l0 / wavelen - lo) / (hi - lo)
        smoothed = (1 - gamma) * inv / s + gamma * inv
        inv = torch.where(wavelen < l0 / hi, inv, torch.where(wavelen > l0 / lo, inv / s, smoothed))
    elif kind == "yarn":
        s = float(scaling["factor"])
        l0 = float(scaling["original_max_position_embeddings"])
        beta_fast = float(_scaling_get(scaling, "beta_fast", 32.0))
        beta_slow = float(_scaling_get(scaling, "beta_slow", 1.0))

        def correction_dim(rotations):  # dim index whose wavelength makes `rotations` turns over l0
            return r * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if _scaling_get(scaling, "truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp (as transformers does)
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep theta_i (high frequencies); 0: interpolate theta_i / s
        pos = base ** exps
        inv = (1.0 / (s * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    else:
        raise ValueError(f"scaling['type']: expected one of 'linear', 'ntk', 'dynamic', 'llama3', 'yarn', got {kind!r}")
    return inv.to(dtype=dtype, device=device)


def yarn_attention_factor(scaling: dict | None) -> float:
    """YaRN's cos/sin multiplier: ``attention_factor`` if given, else ``0.1 ln s + 1`` (or the
    ``mscale``/``mscale_all_dim`` ratio of transformers); 1.0 for s <= 1 or non-YaRN scaling."""
    if scaling is None or scaling.get("type", scaling.get("rope_type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    s = float(scaling["factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(s, m) / mscale(s, m_all))
    return float(mscale(s))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles ``positions[..., None] * inv_freq``.

    positions: any shape, integer or float; inv_freq: (r//2,) or broadcastable to
    ``positions.shape + (r//2,)``. Computed in float64 if either input is float64, else float32
    (angles at p ~ 1e6 lose all precision in fp16/bf16). Returns two tensors ``positions.shape + (r//2,)``.
    """
    dt = _angle_dtype(positions, inv_freq)
    ang = positions.to(dt).unsqueeze(-1) * inv_freq.to(dt)
    return torch.cos(ang), torch.sin(ang)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``r = 2 * cos.shape[-1]`` features of ``x``; the rest pass through unchanged.

    Parameters
    ----------
    x : Tensor (..., d), any layout: the caller makes ``cos``/``sin`` broadcast against it
        (e.g. x (B, H, S, d) with cos (B or 1, 1, S, r/2), or x (B, S, H, d) with cos (B, S, 1, r/2)).
    cos, sin : Tensor (..., r/2), broadcastable to ``x.shape[:-1] + (r/2,)``.
    interleaved : bool
        False: GPT-NeoX / Llama half-rotated pairs ``(i, i + r/2)``; True: GPT-J pairs ``(2i, 2i+1)``.

    Each pair ``(a, b)`` becomes ``(a cos - b sin, a sin + b cos)`` (docs/ALGORITHMS.md 5.1). The result has
    the promoted dtype of x and cos; x is not modified.

    Examples
    --------
    >>> x = torch.tensor([[1.0, 0.0, 5.0]])
    >>> c, s = rope_cos_sin(torch.tensor([0]), torch.tensor([1.0]))
    >>> apply_rotary(x, c, s)
    tensor([[1., 0., 5.]])
    """
    half = cos.shape[-1]
    r = 2 * half
    if r > x.shape[-1]:
        raise ValueError(f"cos: rotary_dim 2*{half}={r} exceeds the last dim of x ({x.shape[-1]})")
    xr, rest = x[..., :r], x[..., r:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
    else:
        a, b = xr[..., :half], xr[..., half:]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    if interleaved:
        rot = torch.stack((ra, rb), dim=-1).flatten(-2)
    else:
        rot = torch.cat((ra, rb), dim=-1)
    return torch.cat((rot, rest.to(rot.dtype)), dim=-1)


def alibi_slopes(num_heads: int, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """ALiBi head slopes of Press et al. (arXiv 2108.12409), for any head count.

    ``H = 2**k``: ``2**(-8h/H)``, h = 1..H. Otherwise with ``P = 2**floor(log2 H)``: the P slopes for P,
    then the first ``H - P`` even-indexed slopes for 2P (docs/ALGORITHMS.md 5.2). Returns (num_heads,).

    >>> alibi_slopes(4)
    tensor([0.2500, 0.0625, 0.0156, 0.0039], dtype=torch.float64)
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected an int >= 1, got {num_heads!r}")

    def pow2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    vals = pow2(p) + pow2(2 * p)[0::2][: num_heads - p]
    return torch.tensor(vals, dtype=dtype, device=device)


def _relpos(pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """``pk - pq``: (B or 1, Sq) and (B or 1, Sk) -> (B or 1, Sq, Sk), int64."""
    return pk.long().unsqueeze(-2) - pq.long().unsqueeze(-1)


def alibi_bias(slopes: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """Symmetric ALiBi bias ``-slope_h * |pq - pk|`` (FlashAttention-2 convention).

    slopes (H,) or (B, H); pq (B or 1, Sq); pk (B or 1, Sk). Returns (B or 1, H, Sq, Sk) in the
    dtype of ``slopes`` (at least float32).
    """
    dt = torch.promote_types(slopes.dtype, torch.float32)
    dist = _relpos(pq, pk).abs().to(dt).unsqueeze(-3)  # (B|1, 1, Sq, Sk)
    s = slopes.to(dt)
    s = s.view(1, -1, 1, 1) if s.dim() == 1 else s.view(s.shape[0], s.shape[1], 1, 1)
    return 0.0 - s * dist  # 0 - x, not -x: no -0.0 on the diagonal


def _toeplitz_gather(table: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, max_distance: int) -> torch.Tensor:
    """``table[h, clamp(pk - pq, -D, D) + D]`` -> (B or 1, H, Sq, Sk); differentiable in ``table``."""
    idx = _relpos(pq, pk).clamp(-max_distance, max_distance) + max_distance  # (B|1, Sq, Sk)
    return table[:, idx].movedim(0, 1)  # (H, B|1, Sq, Sk) -> (B|1, H, Sq, Sk)


def relative_bias(table: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Learned relative bias ``table[h, clamp(pk - pq, -D, D) + D]``; table (H, 2D+1).

    Returns (B or 1, H, Sq, Sk) in the table's dtype (differentiable w.r.t. ``table``).
    """
    return _toeplitz_gather(table, pq, pk, max_distance)


def t5_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128,
              bidirectional: bool = True) -> torch.Tensor:
    """T5 relative-position bucket of ``rel = pk - pq`` (key minus query), int64, same shape.

    Same function as transformers' ``T5Attention._relative_position_bucket`` (docs/ALGORITHMS.md 5.3),
    including its float32 log; ``log(0)`` is never evaluated (n is clamped to >= 1 in the
    log branch, which is only selected for n >= num_buckets/4 or /2).

    >>> t5_bucket(torch.tensor([0, 1, -1, -20, 200]))
    tensor([ 0, 17,  1, 10, 31])
    """
    rel = rel.long()
    if bidirectional:
        nb = num_buckets // 2
        ret = (rel > 0).long() * nb
        n = rel.abs()
    else:
        nb = num_buckets
        ret = torch.zeros_like(rel)
        n = (-rel).clamp(min=0)
    exact = nb // 2
    n_log = n.clamp(min=1).float()
    large = exact + (torch.log(n_log / exact) / math.log(max_distance / exact) * (nb - exact)).long()
    large = large.clamp(max=nb - 1)
    return ret + torch.where(n < exact, n, large)


def t5_bias(table: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, num_buckets: int = 32,
            max_distance: int = 128, bidirectional: bool = True) -> torch.Tensor:
    """T5 bias ``table[bucket(pk - pq), h]``; table (num_buckets, H). Returns (B or 1, H, Sq, Sk)."""
    b = t5_bucket(_relpos(pq, pk), num_buckets, max_distance, bidirectional)  # (B|1, Sq, Sk)
    return table[b].movedim(-1, 1)


def xpos_zeta(head_dim: int, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """xPos per-pair decay base ``zeta_i = (2i + 0.4 d) / (1.4 d)``, i = 0..d/2-1 (torchscale)."""
    i = torch.arange(0, head_dim, 2, dtype=dtype, device=device)
    return (i + 0.4 * head_dim) / (1.4 * head_dim)


def xpos_scale(positions: torch.Tensor, head_dim: int, scale_base: float = 512.0, center: float = 0.0) -> torch.Tensor:
    """``zeta_i ** ((p - center) / scale_base)``: positions shape + (head_dim/2,); float64 if
    ``positions`` is float64 else float32. Queries are multiplied by it, keys divided by it, so a
    score carries ``zeta_i ** ((pq - pk) / scale_base)`` whatever ``center`` is."""
    dt = _angle_dtype(positions)
    z = xpos_zeta(head_dim, dtype=dt, device=positions.device)
    return z ** ((positions.to(dt).unsqueeze(-1) - center) / scale_base)


def xpos_rotate(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, scale_base: float = 512.0, *,
                is_key: bool, center: float = 0.0) -> torch.Tensor:
    """xPos (Sun et al., arXiv 2212.10554; torchscale ``XPOS``): interleaved RoPE over the full head_dim
    with ``theta_i = theta**(-2i/d)``, each pair scaled by ``xpos_scale`` (queries) or its inverse (keys).

    x (B, H, S, d) (or any (..., S, d)); positions broadcastable to x.shape[:-1] without the last
    dim, i.e. (B or 1, S) for x (B, H, S, d) — it is unsqueezed at dim -2 for the heads.
    """
    d = x.shape[-1]
    dt = _angle_dtype(x, positions)
    p = positions.to(dt).unsqueeze(-2)  # (B|1, 1, S)
    inv = rope_inv_freq(d, theta, dtype=dt, device=x.device)
    cos, sin = rope_cos_sin(p, inv)
    sc = xpos_scale(p, d, scale_base, center)
    if is_key:
        sc = 1.0 / sc
    return apply_rotary(x, cos * sc, sin * sc, interleaved=True)


def urpe_coeff(table: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, max_distance: int) -> torch.Tensor:
    """URPE Toeplitz coefficients ``C = table[h, clamp(pk - pq, -D, D) + D]`` (Luo et al., arXiv 2205.13401);
    table (H, 2D+1). Returns (B or 1, H, Sq, Sk); multiplies the softmax probabilities."""
    return _toeplitz_gather(table, pq, pk, max_distance)


def learned_phases(freqs: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """CARoPE phases (Veisi et al., arXiv 2507.23083): ``phase_i(m) = sum_{t<=m} freqs[..., t] ** i``,
    i = 0..rotary_dim/2-1.

    freqs (B, H, S) in (0, 1] -> (B, H, S, rotary_dim/2) in the dtype of ``freqs``; differentiable.
    With constant ``freqs = theta**(-2/r)`` this is ``(m + 1) * theta_i`` (RoPE shifted by one position).

    >>> learned_phases(torch.full((1, 1, 3), 0.5), 4)[0, 0]
    tensor([[1.0000, 0.5000],
            [2.0000, 1.0000],
            [3.0000, 1.5000]])
    """
    i = torch.arange(rotary_dim // 2, dtype=freqs.dtype, device=freqs.device)
    return torch.cumsum(freqs.unsqueeze(-1) ** i, dim=-2)


def positions(batch: int, seqlen_q: int, seqlen_k: int, offset: int = 0, position_ids: torch.Tensor | None = None,
              *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions: ``pq`` (B or 1, Sq), ``pk`` (B or 1, Sk), int64.

    Without ``position_ids``: ``pq = arange(Sq) + offset``, ``pk = arange(Sk)`` (batch dim 1).
    With ``position_ids`` (Sk,) or (B or 1, Sk): ``pk = position_ids`` and ``pq`` = the ids at key
    indices ``i + offset``; every such index must lie in [0, Sk), else ValueError.
    """
    dev = device if position_ids is None else position_ids.device
    iq = torch.arange(seqlen_q, device=dev) + int(offset)
    ik = torch.arange(seqlen_k, device=dev)
    if position_ids is None:
        return iq.unsqueeze(0), ik.unsqueeze(0)
    ids = position_ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[-1] != seqlen_k or ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids: expected ({seqlen_k},) or (batch_size={batch} or 1, seqlen_k={seqlen_k}), "
                         f"got {tuple(position_ids.shape)}")
    if seqlen_q > 0 and (int(offset) < 0 or seqlen_q + int(offset) > seqlen_k):
        raise ValueError(f"position_ids: query rows sit at key indices [{int(offset)}, {seqlen_q + int(offset)}), "
                         f"outside the {seqlen_k} position ids given (seqlen_k)")
    return ids[:, iq], ids


def _rotary_positions(position, batch, seqlen_q, seqlen_k, offset, device):
    ids = getattr(position, "position_ids", None)
    return positions(batch, seqlen_q, seqlen_k, offset, ids, device=device)


def _rounded(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator | None) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (kept in x's dtype): to nearest, or with ``gen`` a random relative error
    uniform in +-(unit roundoff), another rounding a kernel may make."""
    if gen is None:
        return x.to(dtype).to(x.dtype)
    r = torch.rand(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype) * 2 - 1
    return x * (1 + r * (torch.finfo(dtype).eps / 2))


def _round_st(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator | None = None) -> torch.Tensor:
    """``_rounded`` straight-through for autograd."""
    return x + (_rounded(x.detach(), dtype, gen) - x.detach())


class _RoundGrad(torch.autograd.Function):
    """Identity forward; the incoming gradient rounded (``_rounded``) in backward."""

    @staticmethod
    def forward(ctx, x, dtype, gen):
        ctx.dtype, ctx.gen = dtype, gen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _rounded(g, ctx.dtype, ctx.gen), None, None


class _RoundedOutDelta(torch.autograd.Function):
    """``out`` rounded (``_rounded``); in backward, besides ``dout`` to ``out``, ``-dout . (round(out) - out_exact)``
    to ``lse``: a flash backward takes ``delta = rowsum(dO * O)`` from the output it returned (computed from
    rounded probabilities, then rounded), i.e. ``dS = P * (dP - delta_exact - dO . (O - O_exact))``, and
    ``d lse / d S = P``."""

    @staticmethod
    def forward(ctx, out, lse, out_exact, dtype, gen):
        rounded = _rounded(out, dtype, gen)
        ctx.save_for_backward(rounded - out_exact)
        return rounded

    @staticmethod
    def backward(ctx, dout):
        (err,) = ctx.saved_tensors
        return dout, -(dout * err).sum(-1), None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
              offset: int = 0, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              attn_mask: torch.Tensor | None = None, position=None, dropout_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, kernel_rounding: torch.dtype | None = None,
              rounding_generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 dense attention with positional encodings: the truth for the fused kernels.

    Parameters
    ----------
    q : Tensor (B, H, Sq, D), any float dtype (upcast to float64).
    k : Tensor (B, Hkv, Sk, D); ``H % Hkv == 0`` (GQA: query head h reads kv head h // (H // Hkv)).
    v : Tensor (B, Hkv, Sk, Dv).
    scale : float or None
        Logit scale; None means ``D ** -0.5``.
    causal : bool
        Key j visible to query i iff ``j <= i + offset``.
    offset : int
        Query position offset: 0 = top-left alignment (torch SDPA), ``Sk - Sq`` = bottom-right
        (FlashAttention). Used by the causal mask, the window and every positional encoding::

            Sq=2, Sk=4, causal     offset=0      offset=2
                                   x . . .       x x x .
                                   x x . .       x x x x
    window_size : (left, right)
        Keys ``i + offset - left <= j <= i + offset + right``; -1 means unbounded on that side.
    softcap : float
        0 = off; else the scaled logits become ``softcap * tanh(s / softcap)`` before any bias is
        added (FlashAttention order).
    attn_mask : Tensor or None
        Broadcastable to (B, H, Sq, Sk) (torch SDPA rules): bool (True = attend) or float (added
        to the logits after the positional bias).
    position : None, a positional-encoding object of ``posattn.positional`` or a list of them
        (see ``positional.parse_position``): one rotary (RoPE / XPos / LearnedPhaseRoPE) applied to q
        and k at their positions; one additive bias (ALiBi / RelativeBias / T5Bias) added after
        softcap; one URPE multiplying the probabilities after softmax (normaliser unchanged).
    dropout_mask : bool Tensor broadcastable to (B, H, Sq, Sk) or None
        Keep-mask; kept probabilities are scaled by ``1 / (1 - dropout_p)``. Required when
        ``dropout_p > 0`` (the reference is deterministic).
    dropout_p : float in [0, 1).
    kernel_rounding : torch.dtype or None
        None (default): exact. Else the roundings of a flash-style kernel whose tensor-core
        operands are in this dtype (fp32 accumulation), each straight-through (value rounded,
        gradient passed unchanged): the rotated (and xPos-scaled) q and k before ``q k^T``, the
        probabilities before ``p v`` (so also in ``dv = p^T dO``), the output, and in the backward
        ``delta = rowsum(dO * out)`` from the rounded output and the gradient of ``q k^T`` (``dS``)
        before ``dS k`` and ``dS^T q``. Not the truth: a second oracle. A
        kernel in fp16 / bf16 cannot be closer to the truth than this emulation is (FlashAttention's
        tests compare against the same computation in the low dtype); tests bound the kernel's
        error by a multiple of the emulation's where the dtype's table is too tight (softcap
        derivatives and cancelling gradients amplify the roundings).
    rounding_generator : torch.Generator or None
        With ``kernel_rounding``: every rounding above is a random relative error of up to the
        dtype's unit roundoff (uniform, from this generator) instead of round-to-nearest: another
        rounding a kernel may equally make (its xPos centre, its unnormalised probabilities, its
        rotation order differ from this function's). The error of a gradient through ``delta`` is
        one projection ``dO . (O - O_exact)`` per row, so one realisation can be far below another;
        tests take the worst of several to gauge the spread.

    Returns
    -------
    out : float64 (B, H, Sq, Dv)
    lse : float64 (B, H, Sq), natural-log logsumexp of the (biased, masked) logits, before URPE and
        dropout. A fully masked row gives out 0 and lse -inf (never NaN, also in gradients).

    Differentiable in float64 w.r.t. q, k, v, float masks and the positional tables/freqs (they are
    used by reference).

    Raises
    ------
    ValueError / TypeError naming the argument.

    Examples
    --------
    >>> q = torch.randn(1, 2, 3, 4); k = torch.randn(1, 1, 5, 4); v = torch.randn(1, 1, 5, 4)
    >>> out, lse = attention(q, k, v, causal=True)
    >>> out.shape, lse.shape, out.dtype
    (torch.Size([1, 2, 3, 4]), torch.Size([1, 2, 3]), torch.float64)
    """
    from . import positional as _pos  # local import: positional.py imports this module

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, dim), got shape {tuple(t.shape)}")
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected (batch_size={B}, num_heads_k, seqlen_k, head_dim={D}), got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, Hkv, Sk):
        raise ValueError(f"v: expected (batch_size={B}, num_heads_k={Hkv}, seqlen_k={Sk}, head_dim_v), got {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k: num_heads={H} must be a multiple of num_heads_k, got num_heads_k={Hkv}")
    if softcap < 0:
        raise ValueError(f"softcap: expected >= 0 (0 = off), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("dropout_mask: required when dropout_p > 0 (the reference is deterministic), got None")
    from ._checks import check_int, check_window

    left, right = check_window("window_size", window_size)
    offset = check_int("offset", offset)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    spec = _pos.parse_position(position)
    dev = q.device
    f64 = torch.float64
    scale = D ** -0.5 if scale is None else float(scale)

    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    if Hkv != H:
        k64 = k64.repeat_interleave(H // Hkv, dim=1)
        v64 = v64.repeat_interleave(H // Hkv, dim=1)

    # index positions (masks and biases): pq (1, Sq), pk (1, Sk)
    iq, ik = positions(B, Sq, Sk, offset, device=dev)

    rot = spec.rotary
    if rot is not None:
        if isinstance(rot, _pos.XPos):
            if D % 2:
                raise ValueError(f"{spec.names['rotary']}: XPos needs an even head_dim, got {D}")
            center = float(Sk // 2)  # any common centre cancels in q.k; this keeps the factors near 1
            q64 = xpos_rotate(q64, iq, rot.theta, rot.scale_base, is_key=False, center=center)
            k64 = xpos_rotate(k64, ik, rot.theta, rot.scale_base, is_key=True, center=center)
        elif isinstance(rot, _pos.LearnedPhaseRoPE):
            r = rot.get_rotary_dim(D)
            fr = rot.freqs
            if fr.shape[0] not in (1, B) or fr.shape[1] != H or fr.shape[2] != Sk:
                raise ValueError(f"{spec.names['rotary']}.freqs: expected (batch_size={B} or 1, num_heads={H}, seqlen_k={Sk}), "
                                 f"got {tuple(fr.shape)}")
            if Sq > 0 and (offset < 0 or Sq + offset > Sk):
                raise ValueError(f"{spec.names['rotary']}.freqs: query rows sit at positions [{offset}, {Sq + offset}), outside "
                                 f"the seqlen_k={Sk} learned phases")
            ph = learned_phases(fr.to(dev, f64), r)  # (B|1, H, Sk, r/2)
            phq = ph[:, :, iq[0]]
            q64 = apply_rotary(q64, torch.cos(phq), torch.sin(phq), rot.interleaved)
            k64 = apply_rotary(k64, torch.cos(ph), torch.sin(ph), rot.interleaved)
        else:  # RoPE
            r = rot.get_rotary_dim(D)
            pq_r, pk_r = _rotary_positions(rot, B, Sq, Sk, offset, dev)
            ids = rot.position_ids
            seqlen = Sk if ids is None or ids.numel() == 0 else int(ids.max()) + 1
            inv = rope_inv_freq(D, rot.theta, r, rot.scaling, seqlen, device=dev)
            af = yarn_attention_factor(rot.scaling)
            cq, sq_ = rope_cos_sin(pq_r.unsqueeze(1), inv)  # (B|1, 1, Sq, r/2)
            ck, sk_ = rope_cos_sin(pk_r.unsqueeze(1), inv)
            q64 = apply_rotary(q64, cq * af, sq_ * af, rot.interleaved)
            k64 = apply_rotary(k64, ck * af, sk_ * af, rot.interleaved)

    if kernel_rounding is not None and rot is not None:  # unrotated q / k reach the dots as given
        q64 = _round_st(q64, kernel_rounding, rounding_generator)
        k64 = _round_st(k64, kernel_rounding, rounding_generator)
    qk = torch.matmul(q64, k64.transpose(-1, -2))
    if kernel_rounding is not None:
        qk = _RoundGrad.apply(qk, kernel_rounding, rounding_generator)
    s = qk * scale  # (B, H, Sq, Sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)

    if spec.bias is not None:
        s = s + _additive_bias(spec, B, H, iq, ik, dev, f64)

    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=dev)
    rel = _relpos(iq, ik)[0]  # (Sq, Sk): j - (i + offset)
    if causal:
        allowed &= rel <= 0
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    allowed = allowed.expand(B, H, Sq, Sk)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, Sq, Sk))
        except RuntimeError:
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B={B}, H={H}, Sq={Sq}, Sk={Sk}), "
                             f"got {tuple(attn_mask.shape)}") from None
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask.to(dev)
        else:
            s = s + attn_mask.to(dev, f64)
    s = s.masked_fill(~allowed, float("-inf"))

    if Sk == 0:  # no key at all: every row is fully masked (amax over an empty dim is undefined)
        return s.new_zeros(B, H, Sq, v.shape[-1]) + 0 * s.sum(), s.new_full((B, H, Sq), float("-inf"))

    # softmax with an explicit guard for rows without a finite logit (never exp(-inf - (-inf)))
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # the max cancels; detach keeps grads exact
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    live = l > 0
    l_safe = torch.where(live, l, torch.ones_like(l))
    p = e / l_safe
    lse = torch.where(live, m + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)

    if spec.urpe is not None:
        u = spec.urpe
        _check_table(f"{spec.names['urpe']}.table", u.table, (H, 2 * u.max_distance + 1))
        p = p * urpe_coeff(u.table.to(dev, f64), iq, ik, u.max_distance)
    if dropout_mask is not None:
        if dropout_mask.dtype != torch.bool:
            raise TypeError(f"dropout_mask: expected dtype bool (True = keep), got {dropout_mask.dtype}")
        p = p * dropout_mask.to(dev) / (1.0 - dropout_p)
    if kernel_rounding is None:
        return torch.matmul(p, v64), lse
    # the kernels round p (after URPE / dropout) for the p v and p^T dO dots; their backward's delta is
    # rowsum(dO * out) of the output they returned, so it carries the rounding of p and of out
    out_exact = torch.matmul(p.detach(), v64.detach())
    out = torch.matmul(_round_st(p, kernel_rounding, rounding_generator), v64)
    return _RoundedOutDelta.apply(out, lse, out_exact, kernel_rounding, rounding_generator), lse


def _additive_bias(spec, B, H, iq, ik, dev, dtype):
    from . import positional as _pos

    bias, name = spec.bias, spec.names["bias"]
    if isinstance(bias, _pos.ALiBi):
        try:
            slopes = bias.slopes_for(B, H, dev)
        except ValueError as err:
            raise ValueError(str(err).replace("position.", f"{name}.", 1)) from None
        return alibi_bias(slopes.to(dtype), iq, ik)
    if isinstance(bias, _pos.RelativeBias):
        _check_table(f"{name}.table", bias.table, (H, 2 * bias.max_distance + 1))
        return relative_bias(bias.table.to(dev, dtype), iq, ik, bias.max_distance)
    _check_table(f"{name}.table", bias.table, (bias.num_buckets, H))
    return t5_bias(bias.table.to(dev, dtype), iq, ik, bias.num_buckets, bias.max_distance, bias.bidirectional)


def position_bias(position, *, batch_size: int, num_heads: int, seqlen_q: int, seqlen_k: int, offset: int = 0,
                  device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The additive positional bias of ``position`` as a dense tensor (for baselines and tests).

    ``position``: an ALiBi / RelativeBias / T5Bias (or a list holding only such one); positions as in
    ``attention`` (query row i at ``i + offset``). Returns (batch_size or 1, num_heads, seqlen_q,
    seqlen_k) of ``dtype``, usable as a float ``attn_mask`` of torch SDPA. Raises ValueError naming
    ``position`` for a rotary or URPE encoding (not expressible as an additive bias).

    >>> position_bias(__import__("posattn").ALiBi(), batch_size=1, num_heads=2, seqlen_q=2, seqlen_k=2)[0, 0]
    tensor([[ 0.0000, -0.0625],
            [-0.0625,  0.0000]], dtype=torch.float64)
    """
    from . import positional as _pos

    spec = _pos.parse_position(position)
    if spec.rotary is not None or spec.urpe is not None or spec.bias is None:
        raise ValueError(f"position: expected exactly one additive bias (ALiBi, RelativeBias, T5Bias) and nothing "
                         f"else, got {spec!r}")
    iq, ik = positions(batch_size, seqlen_q, seqlen_k, offset, device=device)
    return _additive_bias(spec, batch_size, num_heads, iq, ik, device, dtype)


def _check_table(arg: str, table: torch.Tensor, shape: tuple) -> None:
    if tuple(table.shape) != tuple(shape):
        raise ValueError(f"{arg}: expected shape {tuple(shape)}, got {tuple(table.shape)}")

# ==== end section: positional encodings and dense attention ====

# ==== section: varlen attention (docs/ALGORITHMS.md 2) ====
#
# Padding-free (ByteTransformer, arXiv 2210.03052) semantics in FlashAttention's varlen layout:
# tokens of all sequences packed along one axis, sequence b owning rows cu_seqlens[b]:cu_seqlens[b+1].
# The truth is "each sequence alone through the dense reference above": positions restart at 0 in
# every sequence, causal/window/bias alignment is FlashAttention's bottom-right per sequence
# (offset_b = seqlen_k_b - seqlen_q_b).


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    """Truth of ``posattn.unpad_input`` by a plain loop over rows and columns.

    hidden_states (batch, seqlen, ...), attention_mask (batch, seqlen) (nonzero = token). Returns
    ``(hidden_unpadded (total, ...), indices int64 (total,), cu_seqlens int32 (batch+1,),
    max_seqlen int, seqused int32 (batch,))`` with tokens in row-major order (holes squeezed out).
    """
    batch, seqlen = attention_mask.shape
    idx, lens = [], []
    for b in range(batch):
        row = [b * seqlen + s for s in range(seqlen) if bool(attention_mask[b, s] != 0)]
        idx += row
        lens.append(len(row))
    indices = torch.tensor(idx, dtype=torch.int64, device=hidden_states.device)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    flat = hidden_states.reshape(batch * seqlen, *hidden_states.shape[2:])
    return (flat[indices], indices, torch.tensor(cu, dtype=torch.int32, device=hidden_states.device),
            max(lens, default=0), torch.tensor(lens, dtype=torch.int32, device=hidden_states.device))


def pad_input(hidden_unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Truth of ``posattn.pad_input``: zeros (batch, seqlen, ...) with row ``indices[t]`` = token t."""
    out = hidden_unpadded.new_zeros((batch * seqlen, *hidden_unpadded.shape[1:]))
    for t in range(indices.numel()):
        out[int(indices[t])] = hidden_unpadded[t]
    return out.reshape(batch, seqlen, *hidden_unpadded.shape[1:])


def varlen_sequence_position(position, b: int, k0: int, k1: int):
    """The positional encoding(s) of sequence ``b`` (keys ``k0:k1`` of the packed axis) as a dense
    single-sequence ``position`` argument (a list for several encodings, None for none).

    Per-token data is sliced, shared data kept: RoPE ``position_ids`` (total_k,) or (1, total_k)
    -> ``[k0:k1]``; ALiBi ``slopes`` (batch_size, num_heads) -> row b; LearnedPhaseRoPE ``freqs``
    (1, num_heads, total_k) -> ``[..., k0:k1]`` (phases restart at 0 per sequence); tables and
    XPos unchanged. Differentiable (slices are views).
    """
    import copy
    from . import positional as _pos

    spec = _pos.parse_position(position)
    items = []
    for obj in spec:
        if obj is None:
            continue
        obj2 = copy.copy(obj)
        if isinstance(obj, _pos.RoPE) and obj.position_ids is not None:
            obj2.position_ids = obj.position_ids.reshape(-1)[k0:k1]
        elif isinstance(obj, _pos.ALiBi) and obj.slopes is not None and obj.slopes.dim() == 2:
            obj2.slopes = obj.slopes[b]
        elif isinstance(obj, _pos.LearnedPhaseRoPE):
            obj2.freqs = obj.freqs[..., k0:k1]
        items.append(obj2)
    if not items:
        return None
    return items[0] if len(items) == 1 else items


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None, position=None,
                     kernel_rounding: torch.dtype | None = None,
                     rounding_generator: torch.Generator | None = None):
    """Float64 truth of ``posattn.flash_attn_varlen_func``: every sequence alone through ``attention``
    (``kernel_rounding``, ``rounding_generator``: see ``attention``).

    q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_seqlens int (batch+1,).
    ``alibi_slopes`` (H,) or (batch, H): FlashAttention's ``-slope * |i + sk - sq - j|``, i.e.
    ``position=ALiBi(alibi_slopes)``. Returns out float64 (total_q, H, Dv) and lse float64
    (H, total_q); rows outside every sequence (past cu_seqlens_q[-1]) get out 0 and lse -inf.
    """
    from . import positional as _pos

    total_q, H, _ = q.shape
    out = torch.zeros(total_q, H, v.shape[-1], dtype=torch.float64, device=q.device)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float64, device=q.device)
    if alibi_slopes is not None:
        extra = [_pos.ALiBi(alibi_slopes)]
        position = extra + [x for x in _pos.parse_position(position) if x is not None]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        o, l = attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                         v[k0:k1].transpose(0, 1)[None], scale=softmax_scale, causal=causal,
                         offset=(k1 - k0) - (q1 - q0), window_size=window_size, softcap=softcap,
                         position=varlen_sequence_position(position, b, k0, k1), kernel_rounding=kernel_rounding,
                         rounding_generator=rounding_generator)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return out, lse

# ==== end section: varlen attention ====

# ==== section: KV-cache decode and state merge (docs/ALGORITHMS.md 1) ====
def _kv_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``apply_rotary`` in float64 for x (T, H, D) with per-token cos/sin (T, r/2)."""
    return apply_rotary(x.to(torch.float64), cos.to(torch.float64)[:, None, :], sin.to(torch.float64)[:, None, :],
                        interleaved)


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, rotary_cos=None,
                      rotary_sin=None, rotary_interleaved=True, cache_batch_idx=None, block_table=None,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                      alibi_slopes=None, cache_leftpad=None):
    """Float64 truth of ``flash_attn_with_kvcache`` (FlashAttention 2.x semantics); inputs untouched.

    q (B, Sq, H, D); k_cache/v_cache (B_cache, S_cache, H_kv, D[v]) or, with ``block_table``
    (B, max_blocks) int, paged (num_blocks, page, H_kv, D[v]); cache_seqlens (B,) ints: valid
    length before the append; k/v (B, S_new, H_kv, D[v]) appended (after rotary on k) at
    ``cache_seqlens``. Batch b has ``Sk_b = cache_seqlens[b] + S_new`` keys; query i sits at
    ``i + Sk_b - Sq`` (bottom-right): causal keeps ``j <= i + Sk_b - Sq``, the window keeps
    ``i + Sk_b - Sq - left <= j <= i + Sk_b - Sq + right``, ALiBi adds
    ``-slope * |i + Sk_b - Sq - j|``. Rotary (cos/sin (seqlen_ro, r/2)): the new k at positions
    ``cache_seqlens + t``; q at ``cache_seqlens + i`` when causal or windowed, else at
    ``cache_seqlens`` (FlashAttention's rule). softcap > 0: ``s <- softcap * tanh(s / softcap)``
    before the bias. cache_leftpad (B,) ints (contiguous cache only; FlashAttention's left
    padding): cache indices below ``cache_leftpad[b]`` are never read and every position above
    counts from the pad, i.e. read ``cache_seqlens`` as ``cache_seqlens - cache_leftpad`` keys at
    cache indices ``cache_leftpad + j`` (the append index is still ``cache_seqlens``). Returns
    ``(out (B, Sq, H, Dv), lse (B, H, Sq))`` float64; rows with no visible key give out 0, lse -inf.
    """
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    g = H // Hk
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    seqlens = [int(x) for x in torch.as_tensor(cache_seqlens).reshape(-1).expand(B).tolist()]
    pads = [0] * B if cache_leftpad is None else [int(x) for x in torch.as_tensor(cache_leftpad).reshape(-1).tolist()]
    if cache_leftpad is not None and block_table is not None:
        raise ValueError("cache_leftpad: not defined for a paged cache (block_table)")
    s_new = 0 if k is None else k.shape[1]
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(B, Sq, H, v_cache.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Sq), -math.inf, dtype=torch.float64)
    for b in range(B):
        P = pads[b]
        L = seqlens[b] - P                     # cached keys, counted from the left pad
        if block_table is not None:
            page = k_cache.shape[1]
            idx = torch.arange(L)
            blocks = block_table[b].cpu().long()[idx // page]
            kb, vb = k_cache.cpu()[blocks, idx % page], v_cache.cpu()[blocks, idx % page]
        else:
            cb = b if cache_batch_idx is None else int(cache_batch_idx[b])
            kb, vb = k_cache.cpu()[cb, P:P + L], v_cache.cpu()[cb, P:P + L]
        kb, vb = kb.to(torch.float64), vb.to(torch.float64)
        qb = q[b].cpu().to(torch.float64)
        if rotary_cos is not None:
            r2 = rotary_cos.shape[-1]
            cos64, sin64 = rotary_cos.cpu().to(torch.float64), rotary_sin.cpu().to(torch.float64)
            qpos = L + torch.arange(Sq) if (causal or window_size != (-1, -1)) else torch.full((Sq,), L)
            qb = _kv_rotate(qb, cos64[qpos, :r2], sin64[qpos, :r2], rotary_interleaved)
        if k is not None:
            kn = k[b].cpu().to(torch.float64)
            if rotary_cos is not None:
                kpos = L + torch.arange(s_new)
                kn = _kv_rotate(kn, cos64[kpos], sin64[kpos], rotary_interleaved)
            kb = torch.cat([kb, kn]).to(torch.float64)
            vb = torch.cat([vb, v[b].cpu().to(torch.float64)])
        Sk = kb.shape[0]
        kh = kb.repeat_interleave(g, dim=1)      # (Sk, H, D): query head h reads kv head h // g
        vh = vb.repeat_interleave(g, dim=1)
        s = torch.einsum("ihd,jhd->hij", qb, kh) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(Sq)[:, None]
        j = torch.arange(Sk)[None, :]
        rel = i + Sk - Sq - j                      # query position minus key position
        if alibi_slopes is not None:
            sl = alibi_slopes.cpu().to(torch.float64)
            sl = sl[b] if sl.dim() == 2 else sl
            s = s - sl[:, None, None] * rel.abs()
        visible = torch.ones(Sq, Sk, dtype=torch.bool)
        if right >= 0:
            visible &= rel >= -right
        if left >= 0:
            visible &= rel <= left
        s = s.masked_fill(~visible, -math.inf)
        lse_b = torch.logsumexp(s, dim=-1)        # (H, Sq)
        p = torch.where(torch.isfinite(lse_b)[..., None], torch.exp(s - lse_b[..., None]), torch.zeros_like(s))
        out[b] = torch.einsum("hij,jhd->ihd", p.nan_to_num(0.0), vh)
        lse[b] = lse_b
    return out, lse


def merge_states(outs: torch.Tensor, lses: torch.Tensor):
    """Merge attention partials over disjoint key sets (docs/ALGORITHMS.md "Conventions", split form).

    outs (S, ..., D) normalised partial outputs, lses (S, ...) their natural-log lse; returns
    ``(out, lse)`` with ``LSE = log sum_s exp(lse_s)`` and ``out = sum_s exp(lse_s - LSE) out_s``,
    in float64. Entries whose partials are all empty (lse -inf) give out 0, lse -inf.
    """
    outs = outs.to(torch.float64)
    lses = lses.to(torch.float64)
    lse = torch.logsumexp(lses, dim=0)
    w = torch.where(torch.isfinite(lse)[None], torch.exp(lses - lse[None]), torch.zeros_like(lses))
    return (w.nan_to_num(0.0)[..., None] * outs).sum(0), lse
# ==== end section: KV-cache decode ====

# ==== section: kernelized attention with RPE (docs/ALGORITHMS.md 3) ====
# Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding",
# NeurIPS 2021, arXiv 2106.12566. Layout (batch, heads, seq, head_dim); rpe_bias (heads, seqlen_q + seqlen_k - 1)
# with entry r = j - i + seqlen_q - 1 holding b_{j-i} (query i, key j). Causal: keys j > i excluded (c_r = 0, r > 0).


def prf_features(x: torch.Tensor, projection: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Performer positive random features (FAVOR+, arXiv 2009.14794), float64, unstabilised.

    phi(x) = m^-1/2 exp(w_f . x' - |x'|^2 / 2), x' = x * scale**0.5, so that E[phi(q) . phi(k)] =
    exp(scale * q . k) for w_f ~ N(0, I). x (..., d), projection (m, d) -> (..., m).
    """
    x = x.to(torch.float64) * math.sqrt(scale)
    w = projection.to(torch.float64)
    logits = x @ w.transpose(-1, -2) - 0.5 * (x * x).sum(-1, keepdim=True)
    return torch.exp(logits) / math.sqrt(w.shape[0])


def relu_features(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """relu(x) + eps elementwise (Performer's ReLU kernel with its kernel_epsilon), float64."""
    return torch.relu(x.to(torch.float64)) + eps


def elu1_features(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 elementwise (Katharopoulos et al., arXiv 2006.16236), float64."""
    return torch.nn.functional.elu(x.to(torch.float64)) + 1.0


def rpe_coefficients(rpe_bias: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
    """C (heads, seqlen_q, seqlen_k) float64 with C[h, i, j] = exp(b[h, j - i + seqlen_q - 1]), 0 where causal hides j > i."""
    b = rpe_bias.to(torch.float64)
    i = torch.arange(seqlen_q, device=b.device)[:, None]
    j = torch.arange(seqlen_k, device=b.device)[None, :]
    c = torch.exp(b[:, j - i + seqlen_q - 1])
    if causal:
        c = c.masked_fill(j > i, 0.0)
    return c


def rpe_masked_rows(rpe_bias: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
    """(heads, seqlen_q) bool: True where query row i sees no key at all, i.e. every bias entry it reads
    (``r = j - i + seqlen_q - 1`` for its visible keys j: all j < seqlen_k, or j <= i when causal) is -inf.
    Such rows are fully masked: kernelized RPE attention returns 0 for them (as the fused attention ops do
    for rows with no visible key), not 0/0. NaN entries do not count as masked. O(heads * (seqlen_q + seqlen_k))."""
    live = (~torch.isneginf(rpe_bias.detach())).to(torch.int64)                       # (H, N + S - 1)
    csum = torch.cat([torch.zeros_like(live[:, :1]), live.cumsum(dim=1)], dim=1)      # prefix sums
    i = torch.arange(seqlen_q, dtype=torch.int64, device=rpe_bias.device)
    lo = seqlen_q - 1 - i                                                             # r of key j = 0
    last = torch.clamp(i, max=seqlen_k - 1) if causal else torch.full_like(i, seqlen_k - 1)
    hi = lo + last + 1                                                                # one past r of the last key
    return (csum[:, hi] - csum[:, lo]) == 0


def _expand_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def _masked_rows_zero(num: torch.Tensor, den: torch.Tensor, rpe_bias, n: int, s: int, causal: bool) -> torch.Tensor:
    """num / den with fully masked rows (``rpe_masked_rows``) set to 0 (a safe denominator there, so gradients of
    the other rows stay finite)."""
    dead = rpe_masked_rows(rpe_bias, n, s, causal)[None, :, :, None]
    return torch.where(dead, torch.zeros_like(num), num / torch.where(dead, torch.ones_like(den), den))


def kernelized_rpe_direct(q, k, v, rpe_bias, feature_map, causal: bool = False) -> torch.Tensor:
    """O(N S) evaluation of o_i = sum_j c_{j-i} (phi(q_i).phi(k_j)) v_j / sum_j c_{j-i} phi(q_i).phi(k_j), float64.

    q (B, H, N, d); k, v (B, H_kv, S, d / d_v) (GQA: head h reads kv head h // (H / H_kv));
    feature_map: callable x -> (..., m), applied in float64. A fully masked row (every bias entry it reads is
    -inf, see ``rpe_masked_rows``) gives 0.
    """
    num_heads, n, s = q.shape[1], q.shape[2], k.shape[2]
    fq = feature_map(q.to(torch.float64))
    fk = _expand_kv(feature_map(k.to(torch.float64)), num_heads)
    vv = _expand_kv(v.to(torch.float64), num_heads)
    w = (fq @ fk.transpose(-1, -2)) * rpe_coefficients(rpe_bias, n, s, causal)
    return _masked_rows_zero(w @ vv, w.sum(-1, keepdim=True), rpe_bias, n, s, causal)


def kernelized_rpe_fft(q, k, v, rpe_bias, feature_map, causal: bool = False,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same formula through Algorithm 1 of Luo et al.: Toeplitz products by a circulant FFT of length
    L >= N + S - 1, no chunking (materialises (B, H, L, m * d_v)). Computed in ``dtype`` (float64: the truth;
    float32: what plain torch.fft achieves in fp32, the second oracle of STYLE.md for an FFT kernel). A fully
    masked row (``rpe_masked_rows``) gives 0."""
    num_heads, n, s = q.shape[1], q.shape[2], k.shape[2]
    fq = feature_map(q.to(dtype)).to(dtype)
    fk = _expand_kv(feature_map(k.to(dtype)).to(dtype), num_heads)
    vv = _expand_kv(v.to(dtype), num_heads)
    c = torch.exp(rpe_bias.to(dtype))
    if causal:
        c = torch.cat([c[:, :n], torch.zeros_like(c[:, n:])], dim=1)
    length = n + s - 1
    # u_t = c_{-t} for lag t = i - j: t = 0..n-1 at 0..n-1, t = -1..-(s-1) at length-1..length-s+1
    u = torch.cat([c[:, :n].flip(-1), c[:, n:].flip(-1)], dim=1)  # (H, L)
    a1 = (fk[..., :, None] * vv[..., None, :]).flatten(-2)  # (B, H, S, m*d_v)
    a = torch.cat([a1, fk], dim=-1)
    fa = torch.fft.rfft(a, n=length, dim=-2)
    d = torch.fft.irfft(fa * torch.fft.rfft(u, n=length, dim=-1)[None, :, :, None], n=length, dim=-2)[..., :n, :]
    m, dv = fq.shape[-1], vv.shape[-1]
    num = torch.einsum("bhnf,bhnfe->bhne", fq, d[..., : m * dv].unflatten(-1, (m, dv)))
    den = (fq * d[..., m * dv:]).sum(-1, keepdim=True)
    return _masked_rows_zero(num, den, rpe_bias, n, s, causal)


def exact_rpe_attention(q, k, v, rpe_bias, causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """The target that kernelized RPE attention approximates: softmax(scale q k^T + b_{j-i}) v, float64. A row
    with no visible key (all its logits -inf) gives 0, as the fused attention ops do."""
    num_heads, n, s = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    logits = scale * (q.to(torch.float64) @ _expand_kv(k.to(torch.float64), num_heads).transpose(-1, -2))
    logits = logits + rpe_bias.to(torch.float64)[:, j - i + n - 1]
    if causal:
        logits = logits.masked_fill(j > i, float("-inf"))
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    p = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ _expand_kv(v.to(torch.float64), num_heads)

# ==== end section: kernelized attention with RPE ====

# ==== section: EcoFormer hash attention (docs/ALGORITHMS.md 4) ====
# EcoFormer (Liu, Pan, He, Cai, Zhuang, NeurIPS 2022, arXiv 2209.09004; code ziplab/EcoFormer).
# Codes h in {-1, +1}^b; packed words hold bit t of a code in word t // W, bit t % W (W = 32 for
# int32 words, 64 for int64), bit set <=> code +1; unused high bits of the last word are 0.
# Weight of key j for query i: w_ij = h_i . h_j + (b + 1) = (2b + 1) - 2 Ham(h_i, h_j) > 0.


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each element of an int32/int64 tensor (two's complement), as int64."""
    width = 32 if x.dtype == torch.int32 else 64
    x = x.to(torch.int64)
    if width == 32:
        x = x & 0xFFFFFFFF
    count = torch.zeros_like(x)
    for t in range(width):
        count += (x >> t) & 1
    return count


def pack_bits(codes: torch.Tensor, word_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Codes (..., num_bits) in {-1, +1} -> words (..., ceil(num_bits / W)) of ``word_dtype``."""
    width = 32 if word_dtype == torch.int32 else 64
    num_bits = codes.shape[-1]
    num_words = max(1, -(-num_bits // width))
    words = torch.zeros(*codes.shape[:-1], num_words, dtype=torch.int64, device=codes.device)
    for t in range(num_bits):
        bit = (codes[..., t] > 0).to(torch.int64)
        words[..., t // width] |= bit << (t % width)
    if width == 32:  # reinterpret the low 32 bits as a signed int32
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(word_dtype)


def unpack_bits(words: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Words (..., num_words) int32/int64 -> float64 codes (..., num_bits) in {-1, +1}."""
    width = 32 if words.dtype == torch.int32 else 64
    w = words.to(torch.int64)
    cols = [((w[..., t // width] >> (t % width)) & 1) for t in range(num_bits)]
    return torch.stack(cols, dim=-1).to(torch.float64) * 2 - 1


def _ecoformer_key_mask(batch, seqlen_k, key_padding_mask, device):
    keep = torch.ones(batch, seqlen_k, dtype=torch.float64, device=device)
    if key_padding_mask is not None:  # torch.nn.MultiheadAttention convention: True = padding
        keep = keep * (~key_padding_mask.to(torch.bool)).to(torch.float64)
    return keep


def ecoformer_pairwise(q_codes, k_codes, v, *, causal=False, key_padding_mask=None, form="consistent"):
    """EcoFormer attention from the N x N weight matrix, float64.

    q_codes (batch, heads, seqlen_q, b), k_codes (batch, heads_k, seqlen_k, b) in {-1, +1};
    v (batch, heads_k, seqlen_k, d_v); key_padding_mask (batch, seqlen_k) bool, True = padding.
    "consistent": out_i = sum_j w_ij v_j / sum_j w_ij over visible keys j, w_ij = h_i.h_j + b + 1.
    "reference-code" (ziplab/EcoFormer): out_i = [sum_j (h_i.h_j) v_j + (b+1) v_i] / sum_j w_ij.
    Causal: top-left, key j visible to query i iff j <= i. A row with no visible key gives 0.
    Returns out (batch, heads, seqlen_q, d_v) float64.
    """
    q = q_codes.to(torch.float64)
    k = k_codes.to(torch.float64)
    vv = v.to(torch.float64)
    B, H, M, nb = q.shape
    Hk, N = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=1)
    vv = vv.repeat_interleave(H // Hk, dim=1)
    dots = q @ k.transpose(-1, -2)                                   # (B, H, M, N) = h_i . h_j
    visible = _ecoformer_key_mask(B, N, key_padding_mask, q.device)[:, None, None, :].expand(B, H, M, N)
    if causal:
        visible = visible * torch.ones(M, N, dtype=torch.float64, device=q.device).tril()
    w = (dots + nb + 1) * visible
    den = w.sum(-1, keepdim=True)
    if form == "consistent":
        num = w @ vv
    else:  # the authors' code: the constant (b+1) multiplies v_i only
        num = (dots * visible) @ vv + (nb + 1) * vv[:, :, :M]
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def ecoformer_linear(q_codes, k_codes, v, *, causal=False, key_padding_mask=None, form="consistent"):
    """The same attention by its linear form (docs/ALGORITHMS.md 4a), float64; arguments as ecoformer_pairwise.

    S = sum_j h_j v_j^T (b, d_v), z = sum_j h_j, s = sum_j v_j, n = #visible keys (prefix sums over
    j <= i when causal); out_i = [h_i^T S + (b+1) s] / [h_i^T z + (b+1) n]  ("consistent"), or with
    (b+1) v_i in place of (b+1) s ("reference-code").
    """
    q = q_codes.to(torch.float64)
    k = k_codes.to(torch.float64)
    vv = v.to(torch.float64)
    B, H, M, nb = q.shape
    Hk, N = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=1)
    vv = vv.repeat_interleave(H // Hk, dim=1)
    keep = _ecoformer_key_mask(B, N, key_padding_mask, q.device)[:, None, :, None]   # (B, 1, N, 1)
    kv = (k * keep)[..., :, None] * vv[..., None, :]                 # (B, H, N, b, d_v)
    if causal:
        S, z = kv.cumsum(2), (k * keep).cumsum(2)
        s, n = (vv * keep).cumsum(2), keep.expand(B, H, N, 1).cumsum(2)
        if M <= N:
            S, z, s, n = S[:, :, :M], z[:, :, :M], s[:, :, :M], n[:, :, :M]
        else:  # queries past the last key see every key
            pad = lambda t: torch.cat([t, t[:, :, -1:].expand(*t.shape[:2], M - N, *t.shape[3:])], 2)
            S, z, s, n = pad(S), pad(z), pad(s), pad(n)
        qS = torch.einsum("bhmc,bhmcd->bhmd", q, S)
    else:
        S, z = kv.sum(2), (k * keep).sum(2, keepdim=True)
        s, n = (vv * keep).sum(2, keepdim=True), keep.expand(B, H, N, 1).sum(2, keepdim=True)
        qS = q @ S
    den = (q * z).sum(-1, keepdim=True) + (nb + 1) * n
    if form == "consistent":
        num = qS + (nb + 1) * s
    else:
        num = qS + (nb + 1) * vv[:, :, :M]
    return torch.where(n > 0, num / torch.where(n > 0, den, 1.0), 0.0)

# ==== end section: EcoFormer ====
