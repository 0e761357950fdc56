"""Self-attention layer with kernelized attention and a learnable relative position bias (Luo et al.,
NeurIPS 2021, arXiv 2106.12566), built on :func:`posattn.kernelized_rpe_attention`."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_bool, check_int, check_tensor
from ..ops.kernelized_rpe import FEATURE_MAPS, default_num_features, draw_projection, kernelized_rpe_attention

__all__ = ["KernelizedRPEAttention"]


class KernelizedRPEAttention(nn.Module):
    """Multi-head self-attention: q/k/v/out projections, a per-head Toeplitz bias table, kernelized attention.

    Parameters
    ----------
    embed_dim : int
        Model width; input and output are (batch_size, seqlen, embed_dim).
    num_heads : int
        Query heads; head_dim = embed_dim // num_heads (embed_dim must divide).
    max_seqlen : int
        Longest sequence the bias table covers: ``rpe_bias`` is (num_heads, 2 * max_seqlen - 1), entry
        ``max_seqlen - 1 + (j - i)`` for query i and key j; shorter sequences use its centre.
    num_heads_k : int, optional
        Key/value heads (GQA/MQA), a divisor of num_heads; default num_heads.
    feature_map : {"prf", "relu", "elu+1"} or callable, default "prf"
        See :func:`posattn.kernelized_rpe_attention`.
    num_features : int, optional
        PRF features m; default :func:`posattn.default_num_features` (head_dim * ln head_dim).
    causal : bool, default False
        Query i attends to keys j <= i. A bool or numpy.bool_ (TypeError otherwise, as the functional op).
    normalize_qk : bool, default False
        L2-normalise q and k per token (the "stable" variant; PRF then estimates exp(q_hat . k_hat)).
        A bool or numpy.bool_ (TypeError otherwise).
    redraw_interval : int or None, default 1000
        Feature redraw policy for "prf": in training mode, draw a new projection every ``redraw_interval``
        forward calls (performer-pytorch's ``feature_redraw_interval``, default 1000). None or 0: never redraw
        automatically (call :meth:`redraw_features`). The projection is a buffer: saved in the state dict, and
        fixed in eval mode.
    orthogonal : bool, default True
        Orthogonal random features (see :func:`posattn.draw_projection`).
    bias : bool, default True
        Bias terms in the linear projections.
    backend : str, default "auto"
        Passed to the op.
    device, dtype
        Factory arguments (``torch.nn`` convention) for every parameter and floating-point buffer: the
        projections, ``rpe_bias`` and the PRF ``projection``; None = CPU / ``torch.get_default_dtype()``.
        The internal call counter is int64 on ``device``.

    Shapes
    ------
    forward(x): x (batch_size, seqlen, embed_dim) with 1 <= seqlen <= max_seqlen -> same shape, x's dtype.

    Raises
    ------
    ValueError, TypeError
        Bad constructor arguments (TypeError naming ``causal`` / ``normalize_qk`` for a non-bool flag); in
        forward, x not 3-D, a wrong embed_dim, or seqlen > max_seqlen.

    Examples
    --------
    >>> import torch
    >>> from posattn.nn import KernelizedRPEAttention
    >>> torch.manual_seed(0) and None
    >>> layer = KernelizedRPEAttention(32, 4, max_seqlen=64, causal=True)
    >>> x = torch.randn(2, 50, 32)
    >>> tuple(layer(x).shape)
    (2, 50, 32)
    >>> tuple(layer.rpe_bias.shape)
    (4, 127)
    """

    def __init__(self, embed_dim: int, num_heads: int, max_seqlen: int, *, num_heads_k: int | None = None,
                 feature_map="prf", num_features: int | None = None, causal: bool = False,
                 normalize_qk: bool = False, redraw_interval: int | None = 1000, orthogonal: bool = True,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        self.max_seqlen = check_int("max_seqlen", max_seqlen, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
        num_heads_k = num_heads if num_heads_k is None else check_int("num_heads_k", num_heads_k, minimum=1)
        if num_heads % num_heads_k:
            raise ValueError(f"num_heads_k: expected a divisor of num_heads={num_heads}, got {num_heads_k}")
        if not (callable(feature_map) or feature_map in FEATURE_MAPS):
            raise ValueError(f"feature_map: expected one of {', '.join(map(repr, FEATURE_MAPS))} or a callable, "
                             f"got {feature_map!r}")
        if feature_map != "prf" and num_features is not None:
            raise ValueError(f"num_features: only used with feature_map='prf', got {num_features}")
        if redraw_interval is not None:
            redraw_interval = check_int("redraw_interval", redraw_interval, minimum=0)
        self.embed_dim, self.num_heads, self.num_heads_k = embed_dim, num_heads, num_heads_k
        self.head_dim = embed_dim // num_heads
        causal, normalize_qk = check_bool("causal", causal), check_bool("normalize_qk", normalize_qk)
        self.feature_map, self.causal, self.normalize_qk = feature_map, causal, normalize_qk
        self.redraw_interval, self.orthogonal, self.backend = redraw_interval, orthogonal, backend
        fk = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, num_heads_k * self.head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, num_heads_k * self.head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        # zeros: the layer starts as plain kernelized (linear) attention
        self.rpe_bias = nn.Parameter(torch.zeros(num_heads, 2 * self.max_seqlen - 1, **fk))
        if feature_map == "prf":
            m = num_features if num_features is not None else default_num_features(self.head_dim)
            self.num_features = check_int("num_features", m, minimum=1)
            self.register_buffer("projection", draw_projection(
                self.num_features, self.head_dim, orthogonal=orthogonal, device=device,
                dtype=dtype if dtype is not None else torch.get_default_dtype()))
        else:
            self.num_features = None
            self.register_buffer("projection", None)
        self.register_buffer("_calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new PRF projection in place (no-op for deterministic feature maps)."""
        if self.projection is not None:
            self.projection.copy_(draw_projection(self.num_features, self.head_dim, orthogonal=self.orthogonal,
                                                  generator=generator, device=self.projection.device,
                                                  dtype=self.projection.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        batch, seqlen, width = x.shape
        if width != self.embed_dim:
            raise ValueError(f"x: expected (batch_size, seqlen, embed_dim={self.embed_dim}), got {tuple(x.shape)}")
        if not 1 <= seqlen <= self.max_seqlen:
            raise ValueError(f"x: expected 1 <= seqlen <= max_seqlen={self.max_seqlen}, got seqlen={seqlen}")
        if self.training and self.projection is not None and self.redraw_interval:
            if int(self._calls) > 0 and int(self._calls) % self.redraw_interval == 0:
                self.redraw_features()
            self._calls += 1
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seqlen, self.num_heads_k, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seqlen, self.num_heads_k, self.head_dim).transpose(1, 2)
        centre = self.max_seqlen - 1
        bias = self.rpe_bias[:, centre - (seqlen - 1): centre + seqlen]
        kw = dict(projection=self.projection) if self.feature_map == "prf" else {}
        out = kernelized_rpe_attention(q, k, v, bias, feature_map=self.feature_map, causal=self.causal,
                                       normalize_qk=self.normalize_qk, backend=self.backend, **kw)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seqlen, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_heads_k={self.num_heads_k}, "
                f"max_seqlen={self.max_seqlen}, feature_map={self.feature_map!r}, num_features={self.num_features}, "
                f"causal={self.causal}, normalize_qk={self.normalize_qk}, redraw_interval={self.redraw_interval}")
