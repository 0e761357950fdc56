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

Forward fast path (``fast_path_ok``: CPU, no softcap/URPE/dropout, head_dim_v == head_dim): each chunk
runs torch's fused CPU attention kernel with the positional bias, causal mask and window passed as one
Toeplitz vector viewed with strides (memory O(seqlen) for the bias without a user ``attn_mask``); see
"Forward fast path" below. The other cases use the general path described here.

Backward (``attention_torch_bwd``, see "Backward" below) uses the saved ``out`` and ``lse``:

* ``_aten_bwd``: torch's fused CPU attention backward on the forward fast path's inputs (rotated q/k,
  Toeplitz bias view, visible key range), for fp32 inputs when no gradient of lse, of a float mask or of a
  positional parameter (ALiBi slopes, tables, learned phases) is needed;
* ``_flash_bwd``: every other case (all positional encodings incl. URPE, softcap, dropout, dlse, float64,
  fp16/bf16), the FlashAttention-2 backward (arXiv 2307.08691, Algorithm 2): per block of query rows,
  recompute the logits, P = exp(S - lse) from the saved lse, dS = P * (dP - rowsum(dO * out) + dlse), and
  the parameters' gradients as per-distance sums of dS (deterministic);
* ``_recompute_bwd`` (``BWD_IMPL = "recompute"``): the previous per-chunk recomputation under autograd,
  kept as a cross-check (tests, bench/bench_torch_backward.py).

Both fast backwards hold O(chunk x seqlen_k) like the forward. Measured (bench/bench_torch_backward.py
--threads 1: fp32, B=1, H=8, N=2048, d=64, causal, medians of 5 on a shared, loaded 2-core machine), backward /
forward time: no PE 2.45 (recompute: 10.1), RoPE 2.54 (11.8), ALiBi 2.66 (14.0), learned RelativeBias 2.53
(14.5); non-causal no PE 2.50 (6.0), RelativeBias 3.65 (9.1).

Dropout: a keep-mask drawn per chunk from a ``torch.Generator`` seeded with ``(seed, chunk start)``;
backward regenerates it identically (the chunk size is a pure function of the shapes).

The positional-encoding math (rotation, ALiBi, relative/T5/URPE lookups, xPos decay) is evaluated per
chunk from the positions ``pq = i + offset`` (query i) and ``pk = j`` (key j); see ``_pe`` below.
"""
from __future__ import annotations

import contextlib

import torch

from .. import reference as _ref
from .._checks import dense_for_reading

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
    # scale folded into q: O(n * D) instead of a pass over the (n, Sk) logits (forward and backward)
    s = torch.matmul(q * o["softmax_scale"], k.transpose(-1, -2))   # (B, H, n, Sk)
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
    p = (s - mx).exp_()                        # in place on the temporary: one (n, Sk) buffer fewer
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


# ---------------------------------------------------------------------------------------------
# Forward fast path: torch's fused CPU attention kernel per query chunk
# ---------------------------------------------------------------------------------------------
# Where a chunk's logits are ``softmax_scale * q.k + additive bias`` (no softcap, URPE or dropout), the
# forward calls ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel behind torch's CPU SDPA:
# blocked online softmax, one pass over the keys, returns (out, lse)) with the chunk's bias as its float
# ``attn_mask``. Rotary encodings are applied to q/k first (O(seqlen * head_dim)). Inputs are upcast to
# fp32 (fp64 stays fp64): for fp16/bf16 that kernel would round the probabilities to the input dtype
# before the P @ V product. Measured (1 thread, fp32, N=2048, H=8, d=64, ALiBi): 1159 ms for the
# unfused per-chunk path (~60% of it elementwise passes over the logits), 290 ms for SDPA with the bias
# materialised (bench/README.md).
#
# Every positional bias, causal mask and local window is a function of ``pk - pq`` alone, so without a
# user ``attn_mask`` the chunk's (n, seqlen_k) bias is a Toeplitz matrix: it is built as one vector
# ``w[t]`` over the n + seqlen_k - 1 distances and handed to the kernel as an overlapping strided view
# (no copy; the kernel reads masks through their strides). A Toeplitz matrix indexes ``w[j - i + c]``,
# i.e. row stride -1, which a view cannot have; the chunk's query rows are therefore fed in reverse
# order (row r is query n-1-r, bias ``w[j + r]``, strides (.., 1, 1)) and out/lse flipped back
# (O(n * head_dim) copies). With a user ``attn_mask`` the chunk's bias is materialised (natural order),
# O(chunk * seqlen_k) like the logits block of the general path.
#
# Keys outside the chunk's visible key range (causal/window) are never passed to the kernel; keys inside
# it hidden from every query row of the chunk (by attn_mask or a -inf table entry) are zeroed first, so
# NaN/inf stored there cannot reach the output (NaN + -inf is NaN inside the kernel). The kernel returns
# lse 0 and out 0 for a row without a visible key; such rows get lse -inf here (and out 0 explicitly).

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fast_path_ok(q, k, v, o: dict, urpe_table) -> bool:
    """True when the forward can run on torch's fused CPU kernel (see the comment above)."""
    return (_FLASH_CPU is not None and q.device.type == "cpu" and o["softcap"] == 0 and o["dropout_p"] == 0
            and urpe_table is None and q.shape[3] == v.shape[3]
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[1] * q.shape[3] > 0)


def _key_range(o, pq0: int, n: int, seqlen_k: int) -> tuple[int, int]:
    """Keys [lo, hi) that some query of positions pq0..pq0+n-1 may see under causal/window."""
    right = 0 if o["causal"] else o["window_right"]
    lo = 0 if o["window_left"] < 0 else max(0, pq0 - o["window_left"])
    hi = seqlen_k if right < 0 else min(seqlen_k, max(0, pq0 + n - 1 + right + 1))
    return lo, hi


def _window_count(flag: torch.Tensor, width: int, starts: int) -> torch.Tensor:
    """sum(flag[..., s:s+width]) for s = 0..starts-1, by a prefix sum (flag bool (..., T))."""
    c = torch.nn.functional.pad(flag.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    return c[..., width:width + starts] - c[..., :starts]


def _distance_bias(o, alibi_slopes, bias_table, rel: torch.Tensor, acc):
    """Positional bias + causal/window (-inf) at distances ``rel = pk - pq`` (T,) -> (B|1, H|1, T) or None."""
    zero = torch.zeros((1, 1), dtype=torch.int64, device=rel.device)
    b = _bias(o, alibi_slopes, bias_table, zero, rel[None], acc)          # (B|1, H, 1, T)
    right = 0 if o["causal"] else o["window_right"]
    hidden = None
    if right >= 0:
        hidden = rel > right
    if o["window_left"] >= 0:
        far = rel < -o["window_left"]
        hidden = far if hidden is None else hidden | far
    if b is None and hidden is None:
        return None
    w = torch.zeros((1, 1, rel.numel()), dtype=acc, device=rel.device) if b is None else \
        b.reshape(b.shape[0], b.shape[1], rel.numel()).to(acc).contiguous()
    if hidden is not None and bool(hidden.any()):
        w.masked_fill_(hidden, float("-inf"))
    return w


def _mask_chunk(attn_mask, i0, i1, lo, hi):
    m = attn_mask[:, :, i0:i1] if attn_mask.shape[2] != 1 else attn_mask
    return m[..., lo:hi] if m.shape[3] != 1 else m


def _zero_dead_keys(kc, vc, dead):
    """Zero the rows of kc/vc (B, Hk, n_k, D) hidden from every query: dead (B|1, H|1, n_k) bool."""
    if dead is None or not bool(dead.any()):
        return kc, vc
    Hk = kc.shape[1]
    if dead.shape[1] not in (1, Hk):     # per query head -> a kv head is dead iff dead for its whole group
        dead = dead.reshape(dead.shape[0], Hk, dead.shape[1] // Hk, dead.shape[2]).all(2)
    return kc.masked_fill(dead[..., None], 0), vc.masked_fill(dead[..., None], 0)


def _fast_prep(i0, i1, qc, kr, vr, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, o):
    """Inputs of the fused kernel for queries i0..i1-1 (shared by the forward and the aten backward).

    qc (B, H, n, D) and kr, vr (B, Hk, Sk, D) in the accumulation dtype, k already rotated for RoPE/learned
    phases (xPos rotates here: its scale is centred per chunk). Returns None when no key is visible to any row
    of the chunk, else a dict: q (rotated, rows reversed when ``rev``), k, v (the visible key range [lo, hi),
    dead keys zeroed), mask (the kernel's attn_mask or None), rev, live ((B|1, H|1, n) bool, natural order, or
    None = all rows live), lo, hi, rq = (cos, sin) of the query rotation (natural order) or None, rk = (cos,
    sin) of the xPos key rotation of this chunk or None."""
    acc, device = qc.dtype, qc.device
    B, H, n, D = qc.shape
    Sk, offset = kr.shape[2], o["offset"]
    pq0 = i0 + offset
    lo, hi = _key_range(o, pq0, n, Sk)
    if hi <= lo:                                     # no key visible to any row of the chunk
        return None
    iq = torch.arange(i0, i1, device=device, dtype=torch.int64) + offset
    ks, vs = kr[:, :, lo:hi], vr[:, :, lo:hi]
    rq = rk = None
    if o["rotary_mode"]:
        rq = _rotary_cos_sin(o, inv_freq, position_ids, phases, iq, acc, True, pq0)
        qc = _ref.apply_rotary(qc, rq[0], rq[1], o["interleaved"])
        if o["rotary_mode"] == 2:
            ik = torch.arange(lo, hi, device=device, dtype=torch.int64)
            rk = _rotary_cos_sin(o, inv_freq, position_ids, phases, ik, acc, False, pq0)
            ks = _ref.apply_rotary(ks, rk[0], rk[1], o["interleaved"])
    nk = hi - lo
    # distances pk - pq of the chunk, smallest first: (lo - (pq0 + n - 1)) .. (hi - 1 - pq0)
    rel = torch.arange(n + nk - 1, device=device, dtype=torch.int64) + (lo - pq0 - n + 1)
    w = _distance_bias(o, alibi_slopes, bias_table, rel, acc)         # (B|1, H|1, n + nk - 1) or None
    live = None
    if attn_mask is None:
        if w is None:
            mask, rev = None, False
        else:
            # row r of the reversed chunk (query n-1-r) and key lo+j: distance rel[r + j] -> w[..., r + j]
            T = w.shape[-1]
            mask = w.as_strided((w.shape[0], w.shape[1], n, nk), (w.shape[1] * T, T, 1, 1))
            rev = True
            vis = ~torch.isneginf(w)
            live = (_window_count(vis, nk, n) > 0).flip(-1)           # (B|1, H|1, n), natural order
            ks, vs = _zero_dead_keys(ks, vs, _window_count(vis, n, nk) == 0)
    else:
        rev = False
        m = _mask_chunk(attn_mask, i0, i1, lo, hi)
        if w is not None:
            T = w.shape[-1]
            dense = w.as_strided((w.shape[0], w.shape[1], n, nk), (w.shape[1] * T, T, 1, 1)).flip(2)
        else:
            dense = torch.zeros((1, 1, 1, nk), dtype=acc, device=device)
        if m.dtype == torch.bool:
            dense = dense.masked_fill(~m, float("-inf"))
        else:
            dense = dense + m.to(acc)
        if dense.shape[3] != nk:
            dense = dense.expand(*dense.shape[:3], nk)
        mask = dense.contiguous()
        vis = ~torch.isneginf(mask)
        live = vis.any(-1)                                            # (B|1, H|1, n|1)
        ks, vs = _zero_dead_keys(ks, vs, ~vis.any(2))
    q_in = qc.flip(2) if rev else qc
    q_in, ks, vs = (_kernel_operand(t) for t in (q_in, ks, vs))
    return dict(q=q_in, k=ks, v=vs, mask=mask, rev=rev, live=live, lo=lo, hi=hi, rq=rq, rk=rk)


def _kernel_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as torch's fused CPU attention kernels read it correctly: a unit stride in head_dim (other strides are
    silently misread: tests/test_regressions.py::test_torch_fast_path_last_dim_strided) and no two elements
    sharing memory (an ``unfold``-ed or ``as_strided`` view with overlapping rows, or a stride-0 dim, is misread
    too: tests/test_regressions_breakit_attention.py). Copies only in those cases; views pass through."""
    t = dense_for_reading(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def _fast_chunk(i0, i1, qc, kr, vr, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, o):
    """Queries i0..i1-1 on the fused kernel (inputs as ``_fast_prep``).
    Returns out (B, H, n, D) and lse (B, H, n) in the accumulation dtype."""
    B, H, n, D = qc.shape
    P = _fast_prep(i0, i1, qc, kr, vr, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, o)
    if P is None:
        return qc.new_zeros((B, H, n, D)), qc.new_full((B, H, n), float("-inf"))
    out, lse = _FLASH_CPU(P["q"], P["k"], P["v"], 0.0, False, attn_mask=P["mask"], scale=o["softmax_scale"])
    if P["rev"]:
        out, lse = out.flip(2), lse.flip(2)
    live = P["live"]
    if live is not None and not bool(live.all()):
        dead_rows = ~live.expand(B, H, n)
        lse = lse.masked_fill(dead_rows, float("-inf"))
        out = out.masked_fill(dead_rows[..., None], 0)
    return out, lse


def _fast_forward(q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, o, out, lse):
    acc = _acc_dtype(q.dtype)
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    # (B, Hk, Sk, D) views where possible; a copy, once, of a k/v whose elements share memory (expanded heads,
    # overlapping windows), which the kernel misreads (``_kernel_operand``)
    kr = dense_for_reading(k.detach().permute(0, 2, 1, 3).to(acc))
    vr = dense_for_reading(v.detach().permute(0, 2, 1, 3).to(acc))
    if o["rotary_mode"] == 3 and kr.shape[1] != H:   # learned phases are per query head: expand GQA k/v
        head_map = torch.arange(H, device=q.device) // (H // kr.shape[1])
        kr, vr = kr.index_select(1, head_map), vr.index_select(1, head_map)
    if o["rotary_mode"] in (1, 3):                   # rotation of k does not depend on the chunk: once
        ik = torch.arange(Sk, device=q.device, dtype=torch.int64)
        ck, sk = _rotary_cos_sin(o, inv_freq, position_ids, phases, ik, acc, False, 0)
        kr = _ref.apply_rotary(kr, ck, sk, o["interleaved"])
    C = chunk_rows(B, H, Sq, Sk)
    for i0 in range(0, Sq, C):
        i1 = min(Sq, i0 + C)
        qc = q[:, i0:i1].detach().permute(0, 2, 1, 3).to(acc)
        oc, lc = _fast_chunk(i0, i1, qc, kr, vr, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                             bias_table, o)
        out[:, i0:i1] = oc.permute(0, 2, 1, 3)
        lse[:, :, i0:i1] = lc
    return out, lse


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
    if fast_path_ok(q, k, v, o, urpe_table):
        with torch.no_grad():
            return _fast_forward(q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
                                 o, out, lse)
    C = chunk_rows(B, H, Sq, Sk)
    with torch.no_grad():
        for i0 in range(0, Sq, C):
            i1 = min(Sq, i0 + C)
            oc, lc = _chunk_forward(i0, i1, q[:, i0:i1].to(acc), k32, v32, attn_mask, inv_freq, position_ids,
                                    phases, alibi_slopes, bias_table, urpe_table, o)
            out[:, i0:i1] = oc.to(q.dtype)
            lse[:, :, i0:i1] = lc.to(torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
# Which implementation ``attention_torch_bwd`` runs: "auto" (the fast paths below) or "recompute" (the
# autograd recomputation ``_recompute_bwd``, kept as a cross-check and for bench/bench_torch_backward.py).
BWD_IMPL = "auto"
# Elements of one row block's logits in the flash-style backward (causal/window skip the keys a block does not
# see, so blocks are kept small enough to make that pay); never more rows than ``chunk_rows``.
BLOCK_ELEMS = 1 << 22
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_PARAM_GRADS = ("attn_mask", "phases", "alibi_slopes", "bias_table", "urpe_table")


def attention_torch_bwd(dout, dlse, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                        bias_table, urpe_table, o: dict, need: dict):
    """Backward of ``attention_torch_fwd``.

    ``out``/``lse`` are the forward's results (lse fp32, natural log; either may be None: then they are
    recomputed). ``need`` says which gradients to compute: keys "q", "k", "v", "attn_mask", "phases",
    "alibi_slopes", "bias_table", "urpe_table". Returns a dict name -> gradient (same dtype/shape as the input)
    or None.

    Paths: ``_aten_bwd`` (torch's fused CPU attention backward) where the forward fast path's conditions hold,
    the inputs are fp32 and neither dlse nor a positional/mask gradient is needed; else ``_flash_bwd``
    (FlashAttention-2's backward, arXiv 2307.08691 Algorithm 2, on the saved statistics). ``BWD_IMPL =
    "recompute"`` selects the autograd recomputation instead.
    """
    if BWD_IMPL == "recompute":
        with _autograd_enabled():
            return _recompute_bwd(dout, dlse, q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                                  bias_table, urpe_table, o, need)
    B, _, H, _ = q.shape
    if B == 0 or H == 0:                     # no query row at all (0 batch or 0 heads): zero-size gradients
        return _zero_grads(q, k, v, attn_mask, phases, alibi_slopes, bias_table, urpe_table, need)
    with torch.no_grad():
        if _aten_bwd_ok(q, k, v, out, lse, dlse, o, urpe_table, need):
            return _aten_bwd(dout, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                             bias_table, o, need)
        return _flash_bwd(dout, dlse, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes,
                          bias_table, urpe_table, o, need)


def _zero_grads(q, k, v, attn_mask, phases, alibi_slopes, bias_table, urpe_table, need):
    """Gradients of an attention without query rows (batch 0 or heads 0): zeros shaped like each input."""
    src = dict(q=q, k=k, v=v, attn_mask=attn_mask, phases=phases, alibi_slopes=alibi_slopes, bias_table=bias_table,
               urpe_table=urpe_table)
    return {n: torch.zeros_like(t) if need.get(n) and t is not None and t.is_floating_point() else None
            for n, t in src.items()}


def _rotate_t(x, cs, interleaved):
    """Transpose of the rotation ``apply_rotary(., cos, sin)`` (with xPos/YaRN scales folded into cos, sin it is
    not the inverse): maps a gradient in rotated space back to the unrotated input."""
    return _ref.apply_rotary(x, cs[0], -cs[1], interleaved)


def _phase_grad(g, xr, half: int, interleaved: bool):
    """d loss / d angle of each rotated pair: g = d loss / d (rotated x), xr = rotated x -> (..., half).
    A pair (a, b) -> (a cos - b sin, a sin + b cos) = (ra, rb) has d/dangle = (-rb, ra)."""
    r = 2 * half
    if interleaved:
        ga, gb, ra, rb = g[..., 0:r:2], g[..., 1:r:2], xr[..., 0:r:2], xr[..., 1:r:2]
    else:
        ga, gb, ra, rb = g[..., :half], g[..., half:r], xr[..., :half], xr[..., half:r]
    return gb * ra - ga * rb


def _finish_kv(dk_acc, dv_acc, k, v, kr_rot, ck_all, o, expanded: bool, dph):
    """dk/dv accumulators (B, Hkv, Sk, D) -> gradients in k/v's layout and dtype. ``ck_all`` is the key
    rotation applied once (RoPE/learned phases, dk_acc in rotated space), else None; learned-phase gradients
    of the keys go to ``dph``; ``expanded``: k/v were expanded to the query heads (GQA + learned phases)."""
    if ck_all is not None:
        if dph is not None:                          # keys no query saw have dk 0 and may hold NaN/inf: skip them
            kz = kr_rot.masked_fill((dk_acc == 0).all(-1, keepdim=True), 0)
            dph += _phase_grad(dk_acc, kz, o["rotary_dim"] // 2, o["interleaved"])
        dk_acc = _rotate_t(dk_acc, ck_all, o["interleaved"])
    if expanded:                                     # sum over each kv head's group of query heads
        Hk = k.shape[2]
        g = dk_acc.shape[1] // Hk                    # explicit: -1 is ambiguous with seqlen_k = 0
        dk_acc = dk_acc.reshape(dk_acc.shape[0], Hk, g, *dk_acc.shape[2:]).sum(2)
        dv_acc = dv_acc.reshape(dv_acc.shape[0], Hk, g, *dv_acc.shape[2:]).sum(2)
    dk = torch.empty_like(k).copy_(dk_acc.permute(0, 2, 1, 3))
    dv = torch.empty_like(v).copy_(dv_acc.permute(0, 2, 1, 3))
    return dk, dv


def _prepare_kv(q, k, v, inv_freq, position_ids, phases, o, acc):
    """k, v as (B, Hkv, Sk, D) in acc; expanded to the query heads for learned phases with GQA (per query head);
    rotated once for RoPE / learned phases. Returns kr, vr, ck_all (cos, sin) or None, expanded."""
    H, Sk = q.shape[2], k.shape[1]
    # contiguous (B, Hkv, Sk, D) copies: the per-block products read them many times
    kr = k.detach().permute(0, 2, 1, 3).to(acc).contiguous()
    vr = v.detach().permute(0, 2, 1, 3).to(acc).contiguous()
    expanded = o["rotary_mode"] == 3 and kr.shape[1] != H
    if expanded:
        head_map = torch.arange(H, device=q.device) // (H // kr.shape[1])
        kr, vr = kr.index_select(1, head_map), vr.index_select(1, head_map)
    ck_all = None
    if o["rotary_mode"] in (1, 3):
        ik = torch.arange(Sk, device=q.device, dtype=torch.int64)
        ck_all = _rotary_cos_sin(o, inv_freq, position_ids, phases, ik, acc, False, 0)
        kr = _ref.apply_rotary(kr, ck_all[0], ck_all[1], o["interleaved"])
    return kr, vr, ck_all, expanded


# --- torch's fused CPU backward ------------------------------------------------------------------

def _aten_bwd_ok(q, k, v, out, lse, dlse, o, urpe_table, need) -> bool:
    """The fused CPU backward computes exactly this op's dq/dk/dv: fp32, the forward fast path's cases, no dlse
    and no gradient of a mask or positional parameter (it returns none)."""
    return (_FLASH_CPU_BWD is not None and q.dtype == torch.float32 and out is not None and lse is not None
            and dlse is None and fast_path_ok(q, k, v, o, urpe_table)
            and not any(need.get(n) for n in _PARAM_GRADS))


def _aten_bwd(dout, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, o,
              need):
    """Per query chunk: the same kernel inputs as the forward fast path (``_fast_prep``: rotated q/k, Toeplitz
    bias view with reversed rows, visible key range), ``aten._scaled_dot_product_flash_attention_for_cpu_backward``
    with the saved out/lse, then the rotations' transposes on dq/dk. GQA: the kernel sums dk/dv over the group."""
    acc = torch.float32
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    kr, vr, ck_all, expanded = _prepare_kv(q, k, v, inv_freq, position_ids, phases, o, acc)
    dk_acc, dv_acc = torch.zeros_like(kr), torch.zeros_like(vr)
    dq = torch.zeros_like(q) if need["q"] else None
    C = chunk_rows(B, H, Sq, Sk)
    for i0 in range(0, Sq, C):
        i1 = min(Sq, i0 + C)
        qc = q[:, i0:i1].detach().permute(0, 2, 1, 3).to(acc)
        do = dout[:, i0:i1].permute(0, 2, 1, 3).to(acc)
        oc = out[:, i0:i1].permute(0, 2, 1, 3).to(acc)
        lc = lse[:, :, i0:i1]
        dead = torch.isneginf(lc)
        if bool(dead.any()):                         # fully masked rows: p = exp(-inf - 0) = 0, no NaN from q/dout
            lc = lc.masked_fill(dead, 0.0)
            qc = qc.masked_fill(dead[..., None], 0)
            do = do.masked_fill(dead[..., None], 0)
        P = _fast_prep(i0, i1, qc, kr, vr, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table, o)
        if P is None:                                # no visible key: zero gradients for these rows
            continue
        if P["rev"]:
            do, oc, lc = do.flip(2), oc.flip(2), lc.flip(2)
        do, oc = (_kernel_operand(t) for t in (do, oc))   # dout may be an expanded (stride 0) view
        gq, gk, gv = _FLASH_CPU_BWD(do, P["q"], P["k"], P["v"], oc, lc.contiguous(), 0.0, False,
                                    attn_mask=P["mask"], scale=o["softmax_scale"])
        lo, hi = P["lo"], P["hi"]
        if dq is not None:
            if P["rev"]:
                gq = gq.flip(2)
            if P["rq"] is not None:
                gq = _rotate_t(gq, P["rq"], o["interleaved"])
            dq[:, i0:i1] = gq.permute(0, 2, 1, 3)
        if P["rk"] is not None:                      # xPos: keys rotated per chunk
            gk = _rotate_t(gk, P["rk"], o["interleaved"])
        dk_acc[:, :, lo:hi] += gk
        dv_acc[:, :, lo:hi] += gv
    dk, dv = _finish_kv(dk_acc, dv_acc, k, v, kr, ck_all, o, expanded, None)
    return dict(q=dq, k=dk if need["k"] else None, v=dv if need["v"] else None, attn_mask=None, phases=None,
                alibi_slopes=None, bias_table=None, urpe_table=None)


# --- FlashAttention-2 backward ---------------------------------------------------------------------

def _diag_sums(g: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
    """Anti-diagonal sums of g (X, n, m): out[x, t] = sum_{r + j = t} g[x, r, j], t = 0..n+m-2.

    For a block whose rows are queries in reverse order (row r = query n-1-r) the anti-diagonals are the
    distances pk - pq, so this turns dS into per-distance sums for the Toeplitz parameters. Rows are copied into a
    buffer of row length m + r whose last r columns are zero, and read back with row stride m + r - 1 (each row
    shifted by one more element: a skew), in pieces of r <= max(m, 64) rows so the buffer stays O(rows x m).
    ``scratch`` (a dict) keeps the buffer between calls (fresh pages cost as much as the copy)."""
    X, n, m = g.shape
    res = g.new_zeros((X, n + m - 1))
    step = max(m, 64)
    for a in range(0, n, step):
        b = min(n, a + step)
        r = b - a
        W = m + r
        size = X * r * W
        flat = None if scratch is None else scratch.get("diag")
        if flat is None or flat.numel() < size or flat.dtype != g.dtype:
            # once, at the largest size the call will need (causal blocks grow): fresh pages are slow
            flat = g.new_empty(max(size, 0 if scratch is None else scratch.get("size", 0)))
            if scratch is not None:
                scratch["diag"] = flat
        buf = flat[:size].view(X, r, W)
        buf[:, :, m:].zero_()
        buf[:, :, :m].copy_(g[:, a:b])
        res[:, a:a + r + m - 1] += buf.as_strided((X, r, W - 1), (r * W, W - 1, 1)).sum(1)
    return res


def _flash_bwd(dout, dlse, q, k, v, out, lse, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
               urpe_table, o, need):
    """FlashAttention-2 backward (arXiv 2307.08691, Algorithm 2) in blocks of query rows, every mode.

    Per block of n query rows (processed in reverse order, so every Toeplitz term is a strided view of one
    vector over the distances pk - pq, as in the forward fast path) and its visible key range [lo, hi):
    S = scale * rot(q) rot(k)^T [softcap] + bias + mask, Pn = exp(S - lse) with the saved lse (recomputed for
    float64 inputs: the saved lse is fp32), A = Pn * urpe * dropout (what multiplies V), dV += A^T dO,
    dA = dO V^T, dPn = dA * urpe * dropout, delta = rowsum(dO * out) (= rowsum(Pn * dPn), used instead for
    fp16/bf16 inputs whose saved out is rounded), dS = Pn * (dPn - delta + dlse), then the additive terms' grads
    (mask, ALiBi slopes, tables: per-distance sums of dS) and through softcap, dq = dS K scale, dK += dS^T Q scale,
    rotations transposed. The dropout keep-mask is regenerated per forward chunk (same chunks as the forward).
    """
    acc = _acc_dtype(q.dtype)
    dev = q.device
    B, Sq, H, D = q.shape
    Sk, Dv = k.shape[1], v.shape[3]
    scale, cap, offset, mode = o["softmax_scale"], o["softcap"], o["offset"], o["rotary_mode"]
    half = o["rotary_dim"] // 2
    il = o["interleaved"]
    kr, vr, ck_all, expanded = _prepare_kv(q, k, v, inv_freq, position_ids, phases, o, acc)
    Hkv = kr.shape[1]
    group = H // Hkv
    dk_acc = torch.zeros((B, Hkv, Sk, D), dtype=acc, device=dev)
    dv_acc = torch.zeros((B, Hkv, Sk, Dv), dtype=acc, device=dev)
    dq = torch.zeros_like(q) if need["q"] else None
    float_mask = attn_mask is not None and attn_mask.dtype != torch.bool
    dmask = torch.zeros(attn_mask.shape, dtype=acc, device=dev) if float_mask and need["attn_mask"] else None
    dph = torch.zeros(phases.shape, dtype=acc, device=dev) if need["phases"] and mode == 3 else None
    dslope = torch.zeros(alibi_slopes.shape, dtype=acc, device=dev) \
        if need["alibi_slopes"] and o["bias_mode"] == 1 else None
    dtab = torch.zeros(bias_table.shape, dtype=acc, device=dev) \
        if need["bias_table"] and o["bias_mode"] in (2, 3) else None
    durpe = torch.zeros(urpe_table.shape, dtype=acc, device=dev) if need["urpe_table"] else None
    exact_lse = lse is None or acc == torch.float64
    delta_from_out = out is not None and q.dtype in (torch.float32, torch.float64)
    C = chunk_rows(B, H, Sq, Sk)
    R = min(C, max(16, BLOCK_ELEMS // max(1, B * H * Sk)))
    if o["causal"] or o["window_left"] >= 0 or o["window_right"] >= 0:   # >= ~8 blocks: skip hidden keys
        R = min(R, max(64, -(-min(C, Sq) // 8)))
    piece = min(R, max(Sk, 64))
    scratch: dict = {"size": B * H * piece * (Sk + piece) if (need["alibi_slopes"] or need["bias_table"]
                                                             or need["urpe_table"]) else 0}
    for i0 in range(0, Sq if Sk > 0 else 0, C):
        i1 = min(Sq, i0 + C)
        keep = None
        if o["dropout_p"] > 0:                       # the forward's keep-mask of this chunk, (B, H, n, Sk)
            keep = dropout_keep(o["dropout_p"], o["seed"], i0, (B, H, i1 - i0, Sk), dev, acc)
        for r0 in range(i0, i1, R):
            r1 = min(i1, r0 + R)
            n, pq0 = r1 - r0, r0 + offset
            lo, hi = _key_range(o, pq0, n, Sk)
            if hi <= lo:                             # no key visible to any row of the block
                continue
            nk = hi - lo
            # rows in reverse order: row r is query r1-1-r
            iq = torch.arange(r1 - 1, r0 - 1, -1, device=dev, dtype=torch.int64) + offset
            rel = torch.arange(n + nk - 1, device=dev, dtype=torch.int64) + (lo - pq0 - n + 1)

            def toeplitz(w):                         # (B|1, H|1, n + nk - 1) -> view (B|1, H|1, n, nk)
                T = w.shape[-1]
                return w.as_strided((w.shape[0], w.shape[1], n, nk), (w.shape[1] * T, T, 1, 1))

            w = _distance_bias(o, alibi_slopes, bias_table, rel, acc)
            m = None
            if attn_mask is not None:
                m = _mask_chunk(attn_mask, r0, r1, lo, hi)
                m = m.flip(2) if m.shape[2] != 1 else m
                if m.dtype != torch.bool:
                    m = m.to(acc)
            # the saved statistics of the block's rows (reversed); rows without a visible key have lse -inf
            lse_b = None if lse is None else lse[:, :, r0:r1].flip(2).to(acc)
            if lse_b is not None:
                dead_rows = torch.isneginf(lse_b)
            else:
                vis = torch.ones((1, 1, n, nk), dtype=torch.bool, device=dev) if w is None else \
                    ~torch.isneginf(toeplitz(w))
                if m is not None:
                    vis = vis & (m if m.dtype == torch.bool else ~torch.isneginf(m))
                dead_rows = ~vis.any(-1).expand(B, H, n)
            any_dead = bool(dead_rows.any())
            # (B, H, n, D) copies, contiguous: the GQA views below need it
            qb = q[:, r0:r1].detach().permute(0, 2, 1, 3).flip(2).to(acc).contiguous()
            do = dout[:, r0:r1].permute(0, 2, 1, 3).flip(2).to(acc).contiguous()
            if any_dead:                             # their q/dout never matter: no NaN/inf from them
                qb.masked_fill_(dead_rows[..., None], 0)
                do.masked_fill_(dead_rows[..., None], 0)
            ks, vs = kr[:, :, lo:hi], vr[:, :, lo:hi]
            cq = ckb = None
            if mode:
                cq = _rotary_cos_sin(o, inv_freq, position_ids, phases, iq, acc, True, pq0)
                qb = _ref.apply_rotary(qb, cq[0], cq[1], il)
                if mode == 2:                        # xPos: scale centred on the block (any centre is exact)
                    ik = torch.arange(lo, hi, device=dev, dtype=torch.int64)
                    ckb = _rotary_cos_sin(o, inv_freq, position_ids, phases, ik, acc, False, pq0)
                    ks = _ref.apply_rotary(ks, ckb[0], ckb[1], il)
            # keys hidden from every row of the block: zeroed, as in the forward (0 * NaN in the products)
            if w is not None or m is not None:
                if m is None:
                    dead_k = _window_count(~torch.isneginf(w), n, nk) == 0
                else:
                    vis = torch.ones((1, 1, n, nk), dtype=torch.bool, device=dev) if w is None else \
                        ~torch.isneginf(toeplitz(w))
                    vis = vis & (m if m.dtype == torch.bool else ~torch.isneginf(m))
                    dead_k = ~vis.any(2)
                ks, vs = _zero_dead_keys(ks, vs, dead_k)
            qb = qb.contiguous()                     # (rotation keeps it so; a no-op then)
            qs = qb * scale
            # logits, GQA without expanding k: (B, Hkv, group * n, .) is (B, H, n, .) in memory
            s = torch.matmul(qs.view(B, Hkv, group * n, D), ks.transpose(-1, -2)).view(B, H, n, nk)
            th = None
            if cap > 0:
                th = s.div_(cap).tanh_()             # tanh(s / cap), kept for the chain rule
                s = th * cap
            if w is not None:
                s.add_(toeplitz(w))
            if m is not None:
                if m.dtype == torch.bool:
                    s.masked_fill_(~m, float("-inf"))
                else:
                    s.add_(m)
            if exact_lse:
                mx = s.amax(dim=-1, keepdim=True)
                mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
                lse_b = (mx + torch.log(torch.exp(s - mx).sum(-1, keepdim=True))).squeeze(-1)
            lse_safe = lse_b.masked_fill(dead_rows, 0.0) if any_dead else lse_b
            p = s.sub_(lse_safe[..., None]).exp_()   # normalised probabilities Pn, in place
            cu = None
            if urpe_table is not None:
                cu = toeplitz(_ref.urpe_coeff(urpe_table.to(acc), rel[None, :1] * 0, rel[None],
                                              o["urpe_max_distance"]).reshape(1, H, n + nk - 1))
            z = None
            if keep is not None:
                z = keep[:, :, r0 - i0:r1 - i0, lo:hi].flip(2)
            a = p
            if cu is not None:
                a = a * cu
            if z is not None:
                a = a * z
            # dV += A^T dO (group reduced inside the product)
            dv_acc[:, :, lo:hi] += torch.matmul(a.view(B, Hkv, group * n, nk).transpose(-1, -2),
                                                do.view(B, Hkv, group * n, Dv))
            del a
            da = torch.matmul(do.view(B, Hkv, group * n, Dv), vs.transpose(-1, -2)).view(B, H, n, nk)
            if durpe is not None:                    # d urpe coefficient = dA * Pn * dropout, per distance
                gc = da * p
                if z is not None:
                    gc.mul_(z)
                _table_grad(durpe, gc, rel, 2, o["urpe_max_distance"], o, scratch)
                del gc
            if cu is not None:
                da.mul_(cu)
            if z is not None:
                da.mul_(z)
            if delta_from_out:
                ob = out[:, r0:r1].permute(0, 2, 1, 3).flip(2).to(acc)
                if any_dead:
                    ob = ob.masked_fill(dead_rows[..., None], 0)
                delta = (do * ob).sum(-1)                                      # (B, H, n)
            else:
                delta = (p * da).sum(-1)
            if dlse is not None:
                dl = dlse[:, :, r0:r1].flip(2).to(acc)
                delta = delta - (dl.masked_fill(dead_rows, 0) if any_dead else dl)
            ds = da.sub_(delta[..., None]).mul_(p)                            # dS, in place
            del p, s
            if dmask is not None:
                _mask_grad(dmask, ds, r0, r1, lo, hi)
            if dslope is not None:                   # bias = -slope * |pk - pq|
                dsum = _diag_sums(ds.reshape(B * H, n, nk), scratch).view(B, H, -1)
                dslope -= (dsum * rel.abs().to(acc)).sum(-1).reshape(dslope.shape)
            if dtab is not None:
                _table_grad(dtab, ds, rel, o["bias_mode"], o["max_distance"], o, scratch)
            if th is not None:                       # softcap: d(cap tanh(x / cap)) = 1 - tanh^2
                ds.mul_(th.mul_(th).neg_().add_(1))
                del th
            ds4 = ds.view(B, Hkv, group * n, nk)
            dk_b = torch.matmul(ds4.transpose(-1, -2), qs.view(B, Hkv, group * n, D))   # rotated space
            if ckb is not None:
                dk_b = _rotate_t(dk_b, ckb, il)
            dk_acc[:, :, lo:hi] += dk_b
            if dq is not None or dph is not None:
                gq = torch.matmul(ds4, ks).view(B, H, n, D).mul_(scale)      # d loss / d rot(q)
                if dph is not None:                  # queries read the phases at positions i + offset
                    dph[:, :, pq0:pq0 + n] += _phase_grad(gq, qb, half, il).flip(2)
                if dq is not None:
                    if cq is not None:
                        gq = _rotate_t(gq, cq, il)
                    dq[:, r0:r1] = gq.flip(2).permute(0, 2, 1, 3)
    dk, dv = _finish_kv(dk_acc, dv_acc, k, v, kr, ck_all, o, expanded, dph)
    res = dict(q=dq, k=dk if need["k"] else None, v=dv if need["v"] else None, attn_mask=None, phases=None,
               alibi_slopes=None, bias_table=None, urpe_table=None)
    for name, g, src in (("attn_mask", dmask, attn_mask), ("phases", dph, phases),
                         ("alibi_slopes", dslope, alibi_slopes), ("bias_table", dtab, bias_table),
                         ("urpe_table", durpe, urpe_table)):
        if g is not None:
            res[name] = g.to(src.dtype)
    return res


def _table_grad(dtab, g, rel, bias_mode: int, max_distance: int, o, scratch=None):
    """Scatter dS-like g (B, H, n, nk) (rows reversed, distances rel (n + nk - 1,)) into a table's gradient:
    RelativeBias/URPE (H, 2D+1) at clamp(rel, -D, D) + D, T5 (num_buckets, H) at bucket(rel). Deterministic:
    per-distance sums, then index_add_ over the n + nk - 1 distances."""
    B, H, n, nk = g.shape
    gs = g.sum(0) if B > 1 else g[0]
    dsum = _diag_sums(gs.contiguous(), scratch)                          # (H, n + nk - 1)
    if bias_mode == 3:
        idx = _ref.t5_bucket(rel, o["num_buckets"], max_distance, o["bidirectional"])
        dtab.index_add_(0, idx, dsum.transpose(0, 1))
    else:
        idx = rel.clamp(-max_distance, max_distance) + max_distance
        dtab.index_add_(1, idx, dsum)


def _mask_grad(dmask, ds, r0, r1, lo, hi):
    """Add the block's dS (B, H, n, nk), rows reversed, into dmask (the float attn_mask's shape, broadcast dims
    of size 1 summed)."""
    g = ds
    if dmask.shape[0] == 1 and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    if dmask.shape[1] == 1 and g.shape[1] != 1:
        g = g.sum(1, keepdim=True)
    cols = slice(lo, hi)
    if dmask.shape[3] == 1:
        g, cols = g.sum(3, keepdim=True), slice(None)
    if dmask.shape[2] == 1:
        dmask[:, :, :, cols] += g.sum(2, keepdim=True)
    else:
        dmask[:, :, r0:r1, cols] += g.flip(2)


def _recompute_bwd(dout, dlse, q, k, v, attn_mask, inv_freq, position_ids, phases, alibi_slopes, bias_table,
                   urpe_table, o, need):
    """Backward by per-chunk recomputation under autograd (the previous implementation; ``BWD_IMPL``)."""
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
