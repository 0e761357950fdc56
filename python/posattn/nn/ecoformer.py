"""EcoFormer modules: the kernelized binary hash (KSH) and the attention layer built on it.

EcoFormer (Liu, Pan, He, Cai, Zhuang, NeurIPS 2022, arXiv 2209.09004; code ziplab/EcoFormer,
``pvt/hashing/ksh.py`` and ``pvt/performer.py``); the hash learning follows kernel-based supervised
hashing (KSH, Liu, Wang, Ji, Jiang, Chang, CVPR 2012). Math: docs/ALGORITHMS.md section 4.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import Dims, check_bool, check_choice, check_float, check_int, check_tensor
from ..ops.ecoformer import FORMS, ecoformer_attention, ecoformer_pack_bits

__all__ = ["KernelizedHash", "EcoFormerAttention"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; backward: straight-through, zero where |y| >= 1 (the paper's code)."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return torch.where(y >= 0, torch.ones_like(y), -torch.ones_like(y))

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (y.abs() < 1).to(grad.dtype)


def _sign(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y >= 0, torch.ones_like(y), -torch.ones_like(y))


class KernelizedHash(nn.Module):
    """Kernelized binary hash of EcoFormer: ``h(x) = sign(A (kappa(x) - mu))`` in {-1, +1}^num_bits.

    Per head: ``num_anchors`` anchors ``a_j`` (unit vectors), RBF features
    ``kappa_j(x) = exp(-||x_hat - a_j||^2 / (2 sigma))`` of the L2-normalised token ``x_hat = x/||x||``
    with the bandwidth rule of the authors' code: ``sigma`` = mean of all squared token-anchor
    distances, recomputed per (batch, head) at every call, over the tokens ``key_padding_mask`` keeps; a stored feature mean ``mu``; a projection
    ``A`` (num_bits x num_anchors). The projection is learned by :meth:`fit` (KSH), not by backprop.

    Parameters
    ----------
    head_dim : int, size of the last dim of the tokens.
    num_bits : int, default 16 (b, bits per code; the paper's configs).
    num_anchors : int, default 25 (m; the paper's configs).
    heads : int, keyword-only, default 1: independent hashes, one per head.

    Buffers (saved in the state dict)
    ---------------------------------
    anchors : fp32 (heads, num_anchors, head_dim), unit vectors; random until :meth:`fit`.
    feature_mean : fp32 (heads, num_anchors), mu; zeros until :meth:`fit`.
    projection : fp32 (heads, num_bits, num_anchors), A; N(0, 1) until :meth:`fit`.
    fitted : bool scalar, True once :meth:`fit` ran.

    Before :meth:`fit` the hash is a random kernel hash (random anchors and A).

    Examples
    --------
    >>> import torch, posattn
    >>> _ = torch.manual_seed(0)
    >>> hasher = posattn.nn.KernelizedHash(8, num_bits=12, num_anchors=6, heads=2)
    >>> x = torch.randn(1, 2, 40, 8)
    >>> _ = hasher.fit(x, topk=5, iterations=10)
    >>> codes = hasher(x)
    >>> codes.shape, sorted(codes.unique().tolist())
    (torch.Size([1, 2, 40, 12]), [-1.0, 1.0])
    >>> hasher.pack(codes).shape          # 12 bits fit in one int64 word
    torch.Size([1, 2, 40, 1])
    """

    def __init__(self, head_dim: int, num_bits: int = 16, num_anchors: int = 25, *, heads: int = 1):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.num_bits = check_int("num_bits", num_bits, minimum=1)
        self.num_anchors = check_int("num_anchors", num_anchors, minimum=1)
        self.heads = check_int("heads", heads, minimum=1)
        anchors = torch.randn(heads, num_anchors, head_dim)
        self.register_buffer("anchors", anchors / anchors.norm(dim=-1, keepdim=True))
        self.register_buffer("feature_mean", torch.zeros(heads, num_anchors))
        self.register_buffer("projection", torch.randn(heads, num_bits, num_anchors))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.fit_history: list[list[dict]] = []

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_bits={self.num_bits}, num_anchors={self.num_anchors}, "
                f"heads={self.heads}, fitted={bool(self.fitted)}")

    def _check_x(self, x: torch.Tensor, arg: str = "x") -> None:
        check_tensor(arg, x, dtypes=_FLOATS, ndim=4)
        Dims(heads=self.heads, head_dim=self.head_dim).check(arg, x, ("batch_size", "heads", "seqlen", "head_dim"))

    def _keep(self, x: torch.Tensor, key_padding_mask):
        if key_padding_mask is None:
            return None
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), ndim=2, device=x.device)
        Dims(batch_size=x.shape[0], seqlen=x.shape[2]).check("key_padding_mask", key_padding_mask,
                                                              ("batch_size", "seqlen"))
        return ~key_padding_mask

    def features(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Centred RBF features ``kappa(x) - mu``: x (batch, heads, seqlen, head_dim) -> (batch, heads,
        seqlen, num_anchors), computed in fp32 (fp64 for fp64 x). Differentiable in x.
        ``key_padding_mask`` (batch, seqlen) bool, True = padding: those tokens do not enter sigma (their
        features are computed but meaningless; NaN / inf there changes no other token's)."""
        self._check_x(x)
        return self._features(x, self.anchors, self.feature_mean, self._keep(x, key_padding_mask))

    @staticmethod
    def _features(x, anchors, mean, keep=None):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xh = x.to(cdt)
        xh = xh / xh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a = anchors.to(cdt)
        # ||x_hat - a||^2 by expansion: never a (seqlen, anchors, head_dim) tensor.
        d2 = ((xh * xh).sum(-1, keepdim=True) + (a * a).sum(-1)[None, :, None, :]
              - 2 * torch.einsum("bhnd,hmd->bhnm", xh, a)).clamp_min(0)
        if keep is None:
            sigma = d2.mean(dim=(-2, -1), keepdim=True)                 # per (batch, head)
        else:  # kept tokens only; a select, not a product, so NaN in padding stays out
            k = keep[:, None, :, None]
            count = (k.sum(dim=(-2, -1), keepdim=True) * d2.shape[-1]).clamp_min(1)
            sigma = torch.where(k, d2, torch.zeros_like(d2)).sum(dim=(-2, -1), keepdim=True) / count
        sigma = sigma.clamp_min(1e-12)
        return torch.exp(-d2 / (2 * sigma)) - mean.to(cdt)[None, :, None, :]

    def project(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-sign projections ``A (kappa(x) - mu)``: (batch, heads, seqlen, num_bits), fp32/fp64
        (``key_padding_mask``: see :meth:`features`)."""
        f = self.features(x, key_padding_mask)
        return torch.einsum("bhnm,hkm->bhnk", f, self.projection.to(f.dtype))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of x.

        Parameters
        ----------
        x : Tensor (batch, heads, seqlen, head_dim), fp16/bf16/fp32/fp64.
        key_padding_mask : bool Tensor (batch, seqlen) or None, True = padding: excluded from the
            bandwidth sigma, so the codes of real tokens do not depend on what padding holds.

        Returns
        -------
        codes : Tensor (batch, heads, seqlen, num_bits) of x's dtype, values in {-1, +1}; a
            projection of exactly 0 maps to +1. Backward: straight-through estimator, the gradient
            of a code passes to its projection where |projection| < 1 and is zero elsewhere.

        Raises
        ------
        TypeError / ValueError: x not a float tensor of that shape.
        """
        return _SignSTE.apply(self.project(x, key_padding_mask)).to(x.dtype)

    def pack(self, codes: torch.Tensor, *, word_dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Bit-pack codes: (..., num_bits) in {-1, +1} -> (..., ceil(num_bits / 64)) int64 (or int32 words,
        32 bits each); see ``posattn.ecoformer_pack_bits``. Raises ValueError for other values or a
        last dim other than num_bits."""
        check_tensor("codes", codes)
        if codes.dim() < 1 or codes.shape[-1] != self.num_bits:
            raise ValueError(f"codes: expected (..., num_bits={self.num_bits}), got {tuple(codes.shape)}")
        return ecoformer_pack_bits(codes, word_dtype=word_dtype)

    @staticmethod
    def targets(similarity: torch.Tensor, topk: int) -> torch.Tensor:
        """KSH targets from a (n, n) similarity: each row +1 at its topk largest entries, -1 at its
        topk smallest, 0 elsewhere (float32)."""
        n = similarity.shape[-1]
        t = torch.zeros(similarity.shape, dtype=torch.float32, device=similarity.device)
        t.scatter_(-1, similarity.topk(topk, dim=-1, largest=True).indices, 1.0)
        t.scatter_(-1, similarity.topk(topk, dim=-1, largest=False).indices, -1.0)
        return t

    @staticmethod
    def binary_loss(codes: torch.Tensor, residual: torch.Tensor, num_bits: int) -> float:
        """KSH binary loss of one bit, ``-(y^T S_r y) / (n num_bits)`` with y (n,) in {-1, +1}."""
        y = codes.to(torch.float64)
        return -float(y @ (residual.to(torch.float64) @ y)) / (y.numel() * num_bits)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, attn_similarity: torch.Tensor | None = None, topk: int = 10, *,
            key_padding_mask: torch.Tensor | None = None, lr: float = 5e-4, momentum: float = 0.9,
            iterations: int = 100, max_tokens: int = 1024, generator: torch.Generator | None = None
            ) -> "KernelizedHash":
        """Learn anchors, feature mean and the projection A from tokens, greedily bit by bit (KSH).

        Per head, on the tokens of the first batch element (at most ``max_tokens``, sampled):

        1. anchors: ``num_anchors`` distinct tokens (normalised), sampled at random;
        2. mu: mean RBF feature over every unpadded token of every batch element;
        3. targets S (n x n): row i is +1 at its topk most similar tokens, -1 at its topk least
           similar, 0 elsewhere; similarity = cosine of the tokens, or ``attn_similarity``;
        4. S_1 = num_bits * S; for bit r: draw a ~ N(0, I); minimise the relaxed loss
           ``-(1/(n b)) y^T S_r y`` with ``y = 2 sigmoid(K a) - 1`` by Nesterov SGD (``lr``,
           ``momentum``, ``iterations``); keep the optimised a only if its *binary* loss (y = sign(K a))
           is lower than the initial a's, else keep the initial a; then deflate
           ``S_{r+1} = S_r - y_r y_r^T`` with the binary y_r.

        ``self.fit_history[h]`` lists per bit: ``initial`` and ``optimized`` binary losses, ``accepted``
        (the optimised a was kept) and ``loss`` (the binary loss of the kept a, <= initial).

        Parameters
        ----------
        x : Tensor (batch, heads, seqlen, head_dim), float; detached (no gradient flows).
        attn_similarity : Tensor (heads, seqlen, seqlen) or (batch, heads, seqlen, seqlen), or None
            (cosine similarity of x). Only the first batch element is used.
        topk : int, default 10; 1 <= topk and 2 * topk <= the number of training tokens.
        key_padding_mask : bool (batch, seqlen), True = padding (excluded), or None.
        lr, momentum, iterations : the SGD of step 4; defaults 5e-4, 0.9, 100 (the authors' code).
        max_tokens : int, default 1024: training tokens per head (S is max_tokens^2).
        generator : torch.Generator or None (global RNG) for anchors, token sample and initial a.

        Returns
        -------
        self (fitted).

        Raises
        ------
        ValueError: bad shapes; an empty batch (batch 0: x names it); fewer training tokens than
        num_anchors or than 2 * topk.
        """
        self._check_x(x)
        dims = Dims(heads=self.heads)
        dims.check("x", x, ("batch_size", "heads", "seqlen", None))
        topk = check_int("topk", topk, minimum=1)
        iterations = check_int("iterations", iterations, minimum=0)
        max_tokens = check_int("max_tokens", max_tokens, minimum=2)
        lr = check_float("lr", lr, minimum=0.0)
        momentum = check_float("momentum", momentum, minimum=0.0)
        B, H, N, _ = x.shape
        if B == 0:
            raise ValueError(f"x: fit needs at least one batch element (its tokens train the hash), got batch 0 "
                             f"(shape {tuple(x.shape)})")
        keep = self._keep(x, key_padding_mask)
        if keep is None:
            keep = torch.ones(B, N, dtype=torch.bool, device=x.device)
        if attn_similarity is not None:
            check_tensor("attn_similarity", attn_similarity, dtypes=_FLOATS, ndim=(3, 4), device=x.device)
            if attn_similarity.dim() == 4:
                dims.check("attn_similarity", attn_similarity, ("batch_size", "heads", "seqlen", "seqlen"))
                attn_similarity = attn_similarity[0]
            dims.check("attn_similarity", attn_similarity, ("heads", "seqlen", "seqlen"))
        gen_dev = generator.device if generator is not None else x.device

        idx = keep[0].nonzero().flatten()
        if idx.numel() > max_tokens:
            idx = idx[torch.randperm(idx.numel(), generator=generator, device=gen_dev).to(x.device)[:max_tokens]]
        n = idx.numel()
        if n < self.num_anchors:
            raise ValueError(f"x: fit needs at least num_anchors={self.num_anchors} unpadded tokens in the first "
                             f"batch element, got {n}")
        if 2 * topk > n:
            raise ValueError(f"topk: expected 2 * topk <= {n} (training tokens), got topk={topk}")

        xf = x.detach().to(torch.float32)
        xh = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        anchors = torch.empty_like(self.anchors)
        mean = torch.empty_like(self.feature_mean)
        proj = torch.empty_like(self.projection)
        history = []
        b = self.num_bits
        for h in range(H):
            tok = xh[0, h, idx]                                               # (n, head_dim)
            pick = torch.randperm(n, generator=generator, device=gen_dev).to(x.device)[:self.num_anchors]
            anchors[h] = tok[pick]
            feats = self._features(xf[:, h:h + 1], anchors[h:h + 1], torch.zeros_like(mean[h:h + 1]), keep)
            w = keep[:, None, :, None]
            mean[h] = torch.where(w, feats, torch.zeros_like(feats)).sum(dim=(0, 1, 2)) / w.sum()
            kbar = (self._features(xf[:1, h:h + 1, idx], anchors[h:h + 1], mean[h:h + 1]))[0, 0]   # (n, m)
            sim = tok @ tok.T if attn_similarity is None else attn_similarity[h][idx][:, idx].to(torch.float32)
            residual = b * self.targets(sim, topk)
            head_hist = []
            for r in range(b):
                a0 = torch.randn(self.num_anchors, generator=generator, dtype=kbar.dtype, device=gen_dev).to(x.device)
                a = self._relaxed_sgd(kbar, residual, a0, b, lr, momentum, iterations)
                y0, y1 = _sign(kbar @ a0), _sign(kbar @ a)
                l0, l1 = self.binary_loss(y0, residual, b), self.binary_loss(y1, residual, b)
                accepted = l1 < l0
                a_r, y_r = (a, y1) if accepted else (a0, y0)
                proj[h, r] = a_r
                head_hist.append({"bit": r, "initial": l0, "optimized": l1, "accepted": accepted,
                                  "loss": l1 if accepted else l0})
                residual = residual - torch.outer(y_r, y_r)
            history.append(head_hist)
        self.anchors.copy_(anchors)
        self.feature_mean.copy_(mean)
        self.projection.copy_(proj)
        self.fitted.fill_(True)
        self.fit_history = history
        return self

    @staticmethod
    def _relaxed_sgd(kbar, residual, a0, num_bits, lr, momentum, iterations):
        n = kbar.shape[0]
        a = a0.clone().requires_grad_(True)
        opt = torch.optim.SGD([a], lr=lr, momentum=momentum, nesterov=momentum > 0)
        with torch.enable_grad():
            for _ in range(iterations):
                opt.zero_grad()
                y = 2 * torch.sigmoid(kbar @ a) - 1
                loss = -(y @ (residual @ y)) / (n * num_bits)
                loss.backward()
                opt.step()
        return a.detach()


class EcoFormerAttention(nn.Module):
    """Self-attention layer of EcoFormer: a shared query/key projection hashed to binary codes,
    a value projection, ``posattn.ecoformer_attention`` and an output projection.

    Parameters
    ----------
    embed_dim : int; num_heads : int dividing embed_dim (head_dim = embed_dim // num_heads).
    num_bits : int, default 16; num_anchors : int, default 25 (see :class:`KernelizedHash`).
    causal : bool, default False (top-left causal mask, see ``ecoformer_attention``); a bool or
        numpy.bool_, TypeError naming ``causal`` otherwise (as the functional op).
    form : "consistent" (default) or "reference-code" (the authors' code; see ``ecoformer_attention``).
    topk : int, default 10, for the hash's KSH targets.
    bias : bool, default True, for the three linear layers.
    backend : "auto" | "triton" | "torch", passed to ``ecoformer_attention``.

    The hash is learned by :meth:`KernelizedHash.fit` on the detached query/key projections of the
    first forward pass while ``hash.fitted`` is False (a fresh layer), and refit on the next forward
    after :meth:`retrain_hash` (the paper retrains once per k = 300 epochs; call :meth:`retrain_hash`
    on that schedule). Nothing else refits it: a layer whose state dict (with ``hash.fitted`` True)
    is loaded keeps the loaded hash, in train and eval mode, and loading such a state dict also
    cancels a pending :meth:`retrain_hash`. Gradients reach the projections through the
    straight-through estimator and the values; A is not trained by backprop.

    Examples
    --------
    >>> import torch, posattn
    >>> _ = torch.manual_seed(0)
    >>> layer = posattn.nn.EcoFormerAttention(32, 4, num_bits=8, num_anchors=6, topk=3)
    >>> x = torch.randn(2, 20, 32)
    >>> y = layer(x)                        # the first call also fits the hash
    >>> y.shape, bool(layer.hash.fitted)
    (torch.Size([2, 20, 32]), True)
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_bits: int = 16, num_anchors: int = 25,
                 causal: bool = False, form: str = "consistent", topk: int = 10, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal = check_bool("causal", causal)
        self.form = check_choice("form", form, FORMS)
        self.topk = check_int("topk", topk, minimum=1)
        self.backend = backend
        self.qk_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.hash = KernelizedHash(self.head_dim, num_bits, num_anchors, heads=num_heads)
        # an explicit retrain_hash() request; a fresh (unfitted) hash is fitted on its own (forward)
        self._retrain_pending = False
        self.register_load_state_dict_post_hook(EcoFormerAttention._loaded)

    @staticmethod
    def _loaded(module, incompatible_keys) -> None:
        # runs after the hash's buffers are loaded: a loaded fitted hash is the model; keep it
        if bool(module.hash.fitted):
            module._retrain_pending = False

    def retrain_hash(self) -> None:
        """Refit the hash on the next forward pass (in train or eval mode)."""
        self._retrain_pending = True

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, seqlen, embed_dim) -> (batch, seqlen, embed_dim); key_padding_mask (batch, seqlen)
        bool, True = padding (torch.nn.MultiheadAttention convention), or None."""
        check_tensor("x", x, dtypes=_FLOATS, ndim=3)
        Dims(embed_dim=self.embed_dim).check("x", x, ("batch_size", "seqlen", "embed_dim"))
        B, N, _ = x.shape
        qk = self.qk_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self._retrain_pending or not bool(self.hash.fitted):
            self.hash.fit(qk.detach(), topk=min(self.topk, max(1, N // 2)), key_padding_mask=key_padding_mask)
            self._retrain_pending = False
        codes = self.hash(qk, key_padding_mask=key_padding_mask).to(v.dtype)
        out = ecoformer_attention(codes, codes, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                  form=self.form, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, self.embed_dim))
