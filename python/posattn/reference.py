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
def _kv_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x (T, H, D)`` by ``cos/sin (T, r/2)``.

    interleaved (GPT-J) pairs ``(2i, 2i+1)``; otherwise (GPT-NeoX) pairs ``(i, i + r/2)``. Float64.
    """
    x = x.to(torch.float64)
    r2 = cos.shape[-1]
    c = cos.to(torch.float64)[:, None, :]
    s = sin.to(torch.float64)[:, None, :]
    out = x.clone()
    if interleaved:
        a, b = x[..., 0:2 * r2:2], x[..., 1:2 * r2:2]
        out[..., 0:2 * r2:2] = a * c - b * s
        out[..., 1:2 * r2:2] = a * s + b * c
    else:
        a, b = x[..., :r2], x[..., r2:2 * r2]
        out[..., :r2] = a * c - b * s
        out[..., r2:2 * r2] = a * s + b * c
    return out


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, rotary_cos=None,
                      rotary_sin=None, rotary_interleaved=True, cache_batch_idx=None, block_table=None,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                      alibi_slopes=None):
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
    before the bias. Returns ``(out (B, Sq, H, Dv), lse (B, H, Sq))`` float64; rows with no
    visible key give out 0, lse -inf.
    """
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    g = H // Hk
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    seqlens = [int(x) for x in torch.as_tensor(cache_seqlens).reshape(-1).expand(B).tolist()]
    s_new = 0 if k is None else k.shape[1]
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(B, Sq, H, v_cache.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Sq), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = seqlens[b]
        if block_table is not None:
            page = k_cache.shape[1]
            idx = torch.arange(L)
            blocks = block_table[b].cpu().long()[idx // page]
            kb, vb = k_cache.cpu()[blocks, idx % page], v_cache.cpu()[blocks, idx % page]
        else:
            cb = b if cache_batch_idx is None else int(cache_batch_idx[b])
            kb, vb = k_cache.cpu()[cb, :L], v_cache.cpu()[cb, :L]
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
    """Merge attention partials over disjoint key sets (ALGORITHMS.md "Conventions", split form).

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

# ==== section: kernelized attention with RPE (ALGORITHMS.md 3) ====
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


def _expand_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def kernelized_rpe_direct(q, k, v, rpe_bias, feature_map, causal: bool = False) -> torch.Tensor:
    """O(N S) evaluation of o_i = sum_j c_{j-i} (phi(q_i).phi(k_j)) v_j / sum_j c_{j-i} phi(q_i).phi(k_j), float64.

    q (B, H, N, d); k, v (B, H_kv, S, d / d_v) (GQA: head h reads kv head h // (H / H_kv));
    feature_map: callable x -> (..., m), applied in float64.
    """
    num_heads, n, s = q.shape[1], q.shape[2], k.shape[2]
    fq = feature_map(q.to(torch.float64))
    fk = _expand_kv(feature_map(k.to(torch.float64)), num_heads)
    vv = _expand_kv(v.to(torch.float64), num_heads)
    w = (fq @ fk.transpose(-1, -2)) * rpe_coefficients(rpe_bias, n, s, causal)
    return (w @ vv) / w.sum(-1, keepdim=True)


def kernelized_rpe_fft(q, k, v, rpe_bias, feature_map, causal: bool = False) -> torch.Tensor:
    """The same formula through Algorithm 1 of Luo et al.: Toeplitz products by a circulant FFT of length
    L >= N + S - 1, float64, no chunking (materialises (B, H, L, m * d_v))."""
    num_heads, n, s = q.shape[1], q.shape[2], k.shape[2]
    fq = feature_map(q.to(torch.float64))
    fk = _expand_kv(feature_map(k.to(torch.float64)), num_heads)
    vv = _expand_kv(v.to(torch.float64), num_heads)
    c = torch.exp(rpe_bias.to(torch.float64))
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
    return num / den


def exact_rpe_attention(q, k, v, rpe_bias, causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """The target that kernelized RPE attention approximates: softmax(scale q k^T + b_{j-i}) v, float64."""
    num_heads, n, s = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    logits = scale * (q.to(torch.float64) @ _expand_kv(k.to(torch.float64), num_heads).transpose(-1, -2))
    logits = logits + rpe_bias.to(torch.float64)[:, j - i + n - 1]
    if causal:
        logits = logits.masked_fill(j > i, float("-inf"))
    return torch.softmax(logits, dim=-1) @ _expand_kv(v.to(torch.float64), num_heads)

# ==== end section: kernelized attention with RPE ====

# ==== section: EcoFormer hash attention (ALGORITHMS.md 4) ====
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
    """The same attention by its linear form (ALGORITHMS.md 4a), float64; arguments as ecoformer_pairwise.

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
