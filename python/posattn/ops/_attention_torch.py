"""Torch backend of fused attention: memory-bounded, chunked over queries, fp32 accumulation.

Layout and options are those of the Triton launchers (docs/INTERNALS.md, "Fused attention launchers"):
q (batch, seqlen_q, num_heads, head_dim), k (batch, seqlen_k, num_heads_k, head_dim),
v (batch, seqlen_k, num_heads_k, head_dim_v), any strides; out (batch, seqlen_q, num_heads, head_dim_v)
in q's dtype; lse fp32 (batch, num_heads, seqlen_q), natural log.

Memory: queries are processed in chunks of ``chunk`` rows so that one chunk's logits,
``batch * num_heads * chunk * seqlen_k * 4`` bytes, stay near ``CHUNK_BYTES`` (64 MB); the positional
bias, mask, probabilities and dropout mask only ever exist for one chunk. Besides that, k and v are
upcast to fp32 once (and expanded to num_heads for GQA): O(seqlen_k * head_dim) per head, never
O(seqlen_q * seqlen_k).

Backward recomputes each chunk's forward with autograd enabled and calls ``torch.autograd.grad`` with
the chunk's ``dout`` (and ``dlse``), so memory stays bounded and the gradients of every positional
table (RelativeBias/T5/URPE tables, ALiBi slopes, learned phases) and of a float ``attn_mask`` come
out of the same code as the forward. Saved ``out``/``lse`` are not needed by this backend.

Dropout: a keep-mask drawn per chunk from a ``torch.Generator`` seeded with ``(seed, chunk start)``;
backward regenerates it identically (the chunk size is a pure function of the shapes).

The positional-encoding math (rotation, ALiBi, relative/T5/URPE lookups, xPos decay) is evaluated per
chunk from the positions ``pq = i + offset`` (query i) and ``pk = j`` (key j); see ``_pe`` below.
"""
from __future__ import annotations

import contextlib

import torch

from .. import reference as _ref

# Target size of one chunk's fp32 logits block; tests lower it to force several chunks at small sizes.
CHUNK_BYTES = 64 << 20


def chunk_rows(batch_size: int, num_heads: int, seqlen_q: int, seqlen_k: int) -> int:
    """Rows of queries per chunk: batch*heads*chunk*seqlen_k*4 bytes ~<= CHUNK_BYTES, at least 1."""
    per_row = max(1, batch_size * num_heads * max(seqlen_k, 1) * 4)
    return max(1, min(max(seqlen_q, 1), CHUNK_BYTES // per_row))


@contextlib.contextmanager
def _autograd_enabled():
    """Autograd on inside a torch.library custom-op kernel, which runs below the Autograd dispatch key
    (local exclude set) with grad mode off: the backward recomputes each chunk with autograd."""
    DK = torch._C.DispatchKey
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (DK.AutogradFunctionality, DK.AutogradOther, DK.AutogradNestedTensor, DK.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Positional encodings, evaluated for one chunk. Names follow KernelPE (docs/INTERNALS.md).
# ---------------------------------------------------------------------------------------------

def _rotary_cos_sin(o, inv_freq, position_ids, phases, idx: torch.Tensor, acc, query: bool, xpos_centre: int):
    """cos, sin for rows at sequence indices ``idx`` (int64), broadcastable to (batch, heads, n, r/2).

    xPos folds its per-pair decay ``zeta_i ** (+-(p - c) / scale_base)`` into cos and sin (queries
    multiplied, keys divided), with one centre c shared by q and k so scores carry zeta^((pq-pk)/B).
    """
    mode = o["rotary_mode"]
    if mode == 3:  # learned phases (batch, num_heads, seqlen_k, r/2), already cumsummed
        ang = phases.to(acc).index_select(2, idx)
        return torch.cos(ang), torch.sin(ang)
    if position_ids is not None:
        pos = position_ids.to(torch.int64).index_select(1, idx)  # (P, n)
    else:
        pos = idx[None]                                           # (1, n)
    pos = pos[:, None, :]                                         # (P, 1, n)
    # angles in fp32 (fp64 for fp64 inputs) from integer positions, never in half precision
    cos, sin = _ref.rope_cos_sin(pos, inv_freq.to(acc))
    if o["rotary_scale"] != 1.0:  # YaRN attention factor on both q and k
        cos, sin = cos * o["rotary_scale"], sin * o["rotary_scale"]
    if mode == 2:
        sc = _ref.xpos_scale(pos.to(acc), o["rotary_dim"], o["xpos_scale_base"], float(xpos_centre))
        if not query:
            sc = 1.0 / sc
        cos, sin = cos * sc, sin * sc
    return cos.to(acc), sin.to(acc)


def _bias(o, alibi_slopes, bias_table, pq, pk, acc):
    """Additive positional bias for positions pq (1, n), pk (1, Sk) -> broadcastable to (B, H, n, Sk)."""
    mode = o["bias_mode"]
    if mode == 1:    # ALiBi: -slope * |pk - pq|, slopes (batch, heads)
        return _ref.alibi_bias(alibi_slopes.to(acc), pq, pk)
    if mode == 2:    # RelativeBias: table (heads, 2D+1)[h, clamp(pk - pq, -D, D) + D]
        return _ref.relative_bias(bias_table.to(acc), pq, pk, o["max_distance"])
    if mode == 3:    # T5: table (num_buckets, heads)[bucket(pk - pq), h]
        return _ref.t5_bias(bias_table.to(acc), pq, pk, o["num_buckets"], o["max_distance"], o["bidirectional"])
    return None


def _chunk_forward(i0, i1, qc, k_all, v_all, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                   bias_table, urpe_table, o):
    """Queries i0..i1-1. qc (batch, n, heads, D) and k_all/v_all (batch, seqlen_k, heads_k, D) in the
    accumulation dtype. Returns out (batch, n, heads, Dv) and lse (batch, heads, n), accumulation dtype.
    """
    acc = qc.dtype
    device = qc.device
    num_heads, seqlen_k, offset = qc.shape[2], k_all.shape[1], o["offset"]
    q = qc.permute(0, 2, 1, 3)                 # (B, H, n, D)
    k = k_all.permute(0, 2, 1, 3)              # (B, Hk, Sk, D)
    v = v_all.permute(0, 2, 1, 3)
    if k.shape[1] != num_heads:                # GQA/MQA: query head h reads kv head h // group
        head_map = torch.arange(num_heads, device=device) // (num_heads // k.shape[1])
        k, v = k.index_select(1, head_map), v.index_select(1, head_map)
    iq = torch.arange(i0, i1, device=device, dtype=torch.int64) + offset   # query rows' key index
    ik = torch.arange(seqlen_k, device=device, dtype=torch.int64)
    pq, pk = iq[None], ik[None]
    dead = _dead_keys(o, iq, ik, attn_mask, i0, i1)
    if dead is not None:  # never read a key no query of the chunk sees: NaN/inf there must not leak (0 * NaN)
        k = k.masked_fill(dead[..., None], 0)
        v = v.masked_fill(dead[..., None], 0)
    if o["rotary_mode"]:
        cq, sq = _rotary_cos_sin(o, inv_freq, position_ids, phases, iq, acc, True, i0 + offset)
        ck, sk = _rotary_cos_sin(o, inv_freq, position_ids, phases, ik, acc, False, i0 + offset)
        q = _ref.apply_rotary(q, cq, sq, o["interleaved"])
        k = _ref.apply_rotary(k, ck, sk, o["interleaved"])
    s = torch.matmul(q, k.transpose(-1, -2)) * o["softmax_scale"]   # (B, H, n, Sk)
    if o["softcap"] > 0:                       # FlashAttention order: cap the scaled logits, then add biases
        s = o["softcap"] * torch.tanh(s / o["softcap"])
    b = _bias(o, alibi_slopes, bias_table, pq, pk, acc)
    if b is not None:
        s = s + b
    if attn_mask is not None:                  # 4-D, broadcastable to (B, H, Sq, Sk)
        m = attn_mask[:, :, i0:i1] if attn_mask.shape[2] != 1 else attn_mask
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(acc)
    # causal / local window: key j visible to query i iff i + offset - left <= j <= i + offset + right
    rel = ik[None, :] - iq[:, None]            # (n, Sk): pk - pq
    right = 0 if o["causal"] else o["window_right"]
    allowed = None
    if right >= 0:
        allowed = rel <= right
    if o["window_left"] >= 0:
        allowed = (rel >= -o["window_left"]) if allowed is None else allowed & (rel >= -o["window_left"])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # guarded softmax: a row without a finite logit gives out 0 and lse -inf, no NaN forward or backward;
    # the row max is detached (softmax is shift-invariant, so gradients stay exact)
    mx = s.detach().amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    l = p.sum(dim=-1, keepdim=True)
    live = l > 0
    l_safe = torch.where(live, l, torch.ones_like(l))
    if urpe_table is not None:                 # URPE: probabilities times C[h, pk - pq]; normaliser unchanged
        p = p * _ref.urpe_coeff(urpe_table.to(acc), pq, pk, o["urpe_max_distance"])
    if o["dropout_p"] > 0:
        p = p * dropout_keep(o["dropout_p"], o["seed"], i0, p.shape, device, acc)
    out = torch.matmul(p, v) / l_safe
    lse = torch.where(live, mx + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)
    return out.permute(0, 2, 1, 3), lse


def _dead_keys(o, iq, ik, attn_mask, i0, i1):
    """(B|1, H|1, Sk) bool: keys hidden from every query row of the chunk by causal/window/mask, or None.

    Their k and v rows are zeroed before any product: a masked logit is -inf and its probability 0, but a
    matmul still forms 0 * NaN = NaN from a NaN/inf key or value (padding, stale cache slots), in the output
    and in dq/d tables. Zeroing keeps results and gradients independent of data the op never uses."""
    rel = ik[None, :] - iq[:, None]            # (n, Sk): pk - pq
    vis = torch.ones(rel.shape, dtype=torch.bool, device=rel.device)
    right = 0 if o["causal"] else o["window_right"]
    if right >= 0:
        vis &= rel <= right
    if o["window_left"] >= 0:
        vis &= rel >= -o["window_left"]
    vis = vis[None, None]
    if attn_mask is not None:
        m = attn_mask[:, :, i0:i1] if attn_mask.shape[2] != 1 else attn_mask
        vis = vis & (m if m.dtype == torch.bool else ~torch.isneginf(m.detach()))
    if vis.shape[2] == 0:
        return None
    dead = ~vis.any(dim=2)
    return dead if bool(dead.any()) else None


def dropout_keep(p: float, seed: int, i0: int, shape, device, acc) -> torch.Tensor:
    """Keep-mask scaled by 1/(1-p) for the chunk starting at query row i0; same (seed, i0) -> same mask."""
    if p >= 1.0:
        return torch.zeros(shape, device=device, dtype=acc)
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1000003 + i0 * 7919 + 1) % (2 ** 63 - 1))
    u = torch.rand(shape, generator=g, device=device, dtype=torch.float32)
    return (u >= p).to(acc) / (1.0 - p)


def attention_torch_fwd(q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
                        urpe_table, o: dict):
    """Forward. Returns (out (batch, seqlen_q, heads, head_dim_v) q.dtype, lse fp32 (batch, heads, seqlen_q))."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    Dv = v.shape[3]
    acc = _acc_dtype(q.dtype)
    k32, v32 = k.detach().to(acc), v.detach().to(acc)
    out = torch.empty((B, Sq, H, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if Sk == 0:  # no keys: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    C = chunk_rows(B, H, Sq, Sk)
    with torch.no_grad():
        for i0 in range(0, Sq, C):
            i1 = min(Sq, i0 + C)
            oc, lc = _chunk_forward(i0, i1, q[:, i0:i1].to(acc), k32, v32, attn_mask, inv_freq, position_ids,
                                    phases, alibi_slopes, bias_table, urpe_table, o)
            out[:, i0:i1] = oc.to(q.dtype)
            lse[:, :, i0:i1] = lc.to(torch.float32)
    return out, lse


def attention_torch_bwd(dout, dlse, q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                        bias_table, urpe_table, o: dict, need: dict):
    """Backward by per-chunk recomputation.

    ``need`` says which gradients to compute: keys "q", "k", "v", "attn_mask", "phases", "alibi_slopes",
    "bias_table", "urpe_table". Returns a dict name -> gradient (same dtype/shape as the input) or None.
    """
    with _autograd_enabled():
        return _bwd(dout, dlse, q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
                    urpe_table, o, need)


def _bwd(dout, dlse, q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, urpe_table,
         o, need):
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    acc = _acc_dtype(q.dtype)
    k32 = k.detach().to(acc).requires_grad_(need["k"])
    v32 = v.detach().to(acc).requires_grad_(need["v"])

    def leaf(t, name):
        if t is None:
            return None
        if need.get(name) and t.is_floating_point():
            return t.detach().to(acc).requires_grad_(True)
        return t.detach()

    mask_l = leaf(attn_mask, "attn_mask") if attn_mask is not None and attn_mask.dtype != torch.bool else attn_mask
    phases_l, slopes_l = leaf(phases, "phases"), leaf(alibi_slopes, "alibi_slopes")
    table_l, urpe_l = leaf(bias_table, "bias_table"), leaf(urpe_table, "urpe_table")
    names = ["k", "v", "attn_mask", "phases", "alibi_slopes", "bias_table", "urpe_table"]
    tensors = [k32, v32, mask_l, phases_l, slopes_l, table_l, urpe_l]
    wrt = [(n, t) for n, t in zip(names, tensors) if t is not None and t.requires_grad]
    grads = {n: torch.zeros_like(t) for n, t in wrt}
    dq = torch.zeros_like(q) if need["q"] else None
    C = chunk_rows(B, H, Sq, Sk)
    for i0 in range(0, Sq if Sk > 0 else 0, C):
        i1 = min(Sq, i0 + C)
        qc = q[:, i0:i1].detach().to(acc).requires_grad_(need["q"])
        oc, lc = _chunk_forward(i0, i1, qc, k32, v32, mask_l, inv_freq, position_ids, phases_l, slopes_l,
                                table_l, urpe_l, o)
        inputs = ([qc] if need["q"] else []) + [t for _, t in wrt]
        if not inputs:
            continue
        outs, gouts = [oc], [dout[:, i0:i1].to(acc)]
        if dlse is not None:
            outs.append(lc)
            gouts.append(dlse[:, :, i0:i1].to(acc))
        g = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
        g = list(g)
        if need["q"]:
            gq = g.pop(0)
            dq[:, i0:i1] = 0 if gq is None else gq.to(q.dtype)
        for (n, _), gi in zip(wrt, g):
            if gi is not None:
                grads[n] += gi
    res = {"q": dq}
    src = {"k": k, "v": v, "attn_mask": attn_mask, "phases": phases, "alibi_slopes": alibi_slopes,
           "bias_table": bias_table, "urpe_table": urpe_table}
    for n in names:
        res[n] = grads[n].to(src[n].dtype) if n in grads else None
    return res
