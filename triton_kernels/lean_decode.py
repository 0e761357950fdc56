"""LeanAttention decode kernel (stream-K over a KV cache) in Triton.

Source: LeanAttention, Sanovar et al., arXiv 2405.10480 (docs/ALGORITHMS.md section 1); the schedule
arrays are documented in ``posattn.scheduling`` (one format for "lean", "split" and "single").

What has run: everything here under the Triton interpreter on CPU (``TRITON_INTERPRET=1``) with
``reduce_in_kernel=False``; the in-kernel host reduction (``REDUCE_IN_KERNEL=True``, flag spin
waits) has been compiled for sm_80/sm_90 targets but **not yet run on a GPU**; it cannot run
under the interpreter, which executes programs one after another (a host waiting for a later
CTA would spin forever).

Kernels
-------
``_lean_decode_kernel`` (grid = G CTAs, one per schedule CTA): each CTA walks its range of
global KV tiles; the part inside one output tile (b, h_kv, m-block) is a segment. The query
rows of an m-block are the ``seqlen_q x group`` rows of one KV head (row r -> query
``i = r // group``, head ``h = h_kv * group + r % group``), so a K/V tile is read once for the
whole GQA group. A segment covering its whole output tile writes out/lse; otherwise it writes
the fp32 partial (m [log2 units], l, acc [unnormalised]) to its slot and then either

* ``REDUCE_IN_KERNEL=True`` (GPU): a non-host CTA raises ``FLAGS[slot] = epoch`` (release)
  after a barrier; the host spins (acquire) on each peer's flag, merges the peers in slot order
  and writes out. Epoch counters replace a per-call memset of the flags.
* ``REDUCE_IN_KERNEL=False``: every split segment (host included) writes its slot and
  ``_lean_reduce_kernel`` (grid = split tiles) merges the slots in slot order afterwards.

Both paths merge the same fp32 values in the same order with the same jit helper.

Shapes and strides (launcher arguments)
---------------------------------------
q, out: (batch, seqlen_q, num_heads, head_dim), unit stride in head_dim.
k_cache, v_cache: (batch_cache, seqlen_cache, num_heads_k, head_dim) or paged
(num_blocks, page_size, num_heads_k, head_dim); unit stride in head_dim.
lse: fp32 (batch, num_heads, seqlen_q). seqlens_k: int32 (batch,), keys per sequence.
cache_leftpad: int32 (batch,) or None (contiguous cache only): key j of sequence b is cache index
``j + cache_leftpad[b]``; seqlens_k then counts keys from the pad, so the schedule, the masks and
the ALiBi distances are unchanged (FlashAttention's ``cache_leftpad``).
rot_cos/rot_sin: fp32 (batch, seqlen_q, rotary_dim // 2): cos/sin at each query's position.
alibi_slopes: fp32 (batch, num_heads) (stride 0 over batch for (num_heads,)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["lean_decode_fwd", "pick_block_m"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _merge_state(m_a, l_a, acc_a, m_b, l_b, acc_b):
    # Online-softmax merge in log2 units; never evaluates exp2(-inf - (-inf)).
    m = tl.maximum(m_a, m_b)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    fa = tl.exp2(m_a - m_use)
    fb = tl.exp2(m_b - m_use)
    return m, l_a * fa + l_b * fb, acc_a * fa[:, None] + acc_b * fb[:, None]


@triton.jit
def _store_partial(MP, LP, OP, slot, m_i, l_i, acc, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = slot.to(tl.int64) * BLOCK_M
    tl.store(MP + base + offs_m, m_i)
    tl.store(LP + base + offs_m, l_i)
    tl.store(OP + (base + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _load_partial(MP, LP, OP, slot, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = slot.to(tl.int64) * BLOCK_M
    # .cg: read from L2, never a stale L1 line written by another CTA
    m = tl.load(MP + base + offs_m, cache_modifier=".cg")
    l = tl.load(LP + base + offs_m, cache_modifier=".cg")
    acc = tl.load(OP + (base + offs_m[:, None]) * BLOCK_D + offs_d[None, :], cache_modifier=".cg")
    return m, l, acc


@triton.jit
def _write_out(O, LSE, b, hkv, mb, m_i, l_i, acc,
               stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
               seqlen_q, group, head_dim,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < seqlen_q * group
    i = offs_r // group
    h = hkv * group + offs_r % group
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    o = tl.where(has[:, None], o, 0.0)
    ptr = O + b.to(tl.int64) * stride_ob + i.to(tl.int64)[:, None] * stride_om + h.to(tl.int64)[:, None] * stride_oh \
        + offs_d[None, :]
    tl.store(ptr, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + i, lse, mask=row_ok)


@triton.jit
def _lean_decode_kernel(
    Q, K, V, O, LSE, SEQLENS_K, BLOCK_TABLE, CACHE_BATCH, LEFTPAD, ROT_COS, ROT_SIN, ALIBI,
    TILE_OFFSETS, TILE_BATCH, TILE_HEAD, TILE_MBLOCK, CTA_STARTS, CTA_FIRST, HOST_CTA, NUM_SPLITS, SLOT_OFFSETS,
    MP, LP, OP, FLAGS,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_btb, stride_rb, stride_rm, stride_ab, stride_ah,
    seqlen_q, group, head_dim, softmax_scale, softcap, window_left, window_right, epoch,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROT_INTERLEAVED: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M must be >= 16 (tl.dot)")
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N must be >= 16 (tl.dot)")
    tl.static_assert(ROTARY_DIM % 2 == 0, "rotary_dim must be even")
    tl.static_assert(not (PAGED and HAS_LEFTPAD), "cache_leftpad is for a contiguous cache only")
    c = tl.program_id(0)
    start = tl.load(CTA_STARTS + c)
    end = tl.load(CTA_STARTS + c + 1)
    u = tl.load(CTA_FIRST + c)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    it = start
    while it < end:
        u_lo = tl.load(TILE_OFFSETS + u)
        u_hi = tl.load(TILE_OFFSETS + u + 1)
        seg_hi = tl.minimum(end, u_hi)
        b = tl.load(TILE_BATCH + u).to(tl.int64)
        hkv = tl.load(TILE_HEAD + u).to(tl.int64)
        mb = tl.load(TILE_MBLOCK + u)
        seqlen_k = tl.load(SEQLENS_K + b)
        # ---- the query tile: rows (i, head) of this kv head's group, RoPE applied in fp32
        offs_r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_r < seqlen_q * group
        i = offs_r // group
        h = hkv * group + offs_r % group
        q_row = Q + b * stride_qb + i.to(tl.int64)[:, None] * stride_qm + h[:, None] * stride_qh
        q = tl.load(q_row + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if ROTARY_DIM > 0:
            rot = offs_d < ROTARY_DIM
            if ROT_INTERLEAVED:   # pairs (2j, 2j+1)
                pair = offs_d ^ 1
                j = offs_d // 2
                sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
            else:                 # pairs (j, j + rotary_dim/2)
                half = ROTARY_DIM // 2
                pair = tl.where(offs_d < half, offs_d + half, offs_d - half)
                j = tl.where(offs_d < half, offs_d, offs_d - half)
                sign = tl.where(offs_d < half, -1.0, 1.0)
            rmask = row_ok[:, None] & rot[None, :]
            q_pair = tl.load(q_row + pair[None, :], mask=rmask, other=0.0).to(tl.float32)
            r_off = b * stride_rb + i.to(tl.int64)[:, None] * stride_rm + j[None, :]
            cos = tl.load(ROT_COS + r_off, mask=rmask, other=1.0)
            sin = tl.load(ROT_SIN + r_off, mask=rmask, other=0.0)
            q = q * cos + sign[None, :] * q_pair * sin
        q = q.to(K.dtype.element_ty)   # rotated q is rounded to the input dtype, like the rotated k in the cache
        if HAS_ALIBI:
            slope = tl.load(ALIBI + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0)
        qpos = i + seqlen_k - seqlen_q          # bottom-right aligned query position
        if HAS_BATCH_IDX:
            cb = tl.load(CACHE_BATCH + b).to(tl.int64)
        else:
            cb = b
        k_row0 = cb * stride_kb   # cache row of sequence b, shifted past its left pad
        v_row0 = cb * stride_vb
        if HAS_LEFTPAD:
            pad = tl.load(LEFTPAD + b).to(tl.int64)
            k_row0 += pad * stride_kn
            v_row0 += pad * stride_vn
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # a window bounds the visible keys of this m-block: skip KV tiles wholly outside it
        n_lo = it - u_lo
        n_hi = seg_hi - u_lo
        if window_left >= 0:
            i_first = (mb * BLOCK_M) // group
            n_lo = tl.maximum(n_lo, (i_first + seqlen_k - seqlen_q - window_left) // BLOCK_N)
        if window_right >= 0:
            i_last = (tl.minimum(seqlen_q * group, mb * BLOCK_M + BLOCK_M) - 1) // group
            # (C division truncates toward 0: a negative bound keeps one fully masked tile, harmless)
            n_hi = tl.minimum(n_hi, (i_last + seqlen_k - seqlen_q + window_right) // BLOCK_N + 1)
        for n in range(n_lo, n_hi):
            offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_ok = offs_n < seqlen_k
            if PAGED:
                blk = tl.load(BLOCK_TABLE + b * stride_btb + offs_n // PAGE_SIZE, mask=kv_ok, other=0).to(tl.int64)
                k_off = blk[:, None] * stride_kb + (offs_n % PAGE_SIZE).to(tl.int64)[:, None] * stride_kn
                v_off = blk[:, None] * stride_vb + (offs_n % PAGE_SIZE).to(tl.int64)[:, None] * stride_vn
            else:
                k_off = k_row0 + offs_n.to(tl.int64)[:, None] * stride_kn
                v_off = v_row0 + offs_n.to(tl.int64)[:, None] * stride_vn
            kv_mask = kv_ok[:, None] & d_ok[None, :]
            k = tl.load(K + k_off + hkv * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_FP32:   # interpreter workaround: its bf16 tl.dot is wrong; same products in fp32
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * softmax_scale
            else:
                s = tl.dot(q, tl.trans(k)) * softmax_scale          # natural units
            if HAS_SOFTCAP:
                # softcap * tanh(s / softcap), tanh via exp (saturates cleanly at +-1)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            rel = qpos[:, None] - offs_n[None, :]                  # query position - key position
            if HAS_ALIBI:
                s = s - slope[:, None] * tl.abs(rel).to(tl.float32)
            ok = kv_ok[None, :] & row_ok[:, None]
            if window_right >= 0:
                ok = ok & (rel >= -window_right)
            if window_left >= 0:
                ok = ok & (rel <= window_left)
            s = tl.where(ok, s * 1.4426950408889634, float("-inf"))   # log2 units from here on
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + v_off + hkv * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            p = p.to(V.dtype.element_ty)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        nsplit = tl.load(NUM_SPLITS + u)
        if nsplit == 1:
            _write_out(O, LSE, b, hkv, mb, m_i, l_i, acc, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                       seqlen_q, group, head_dim, BLOCK_M, BLOCK_D)
        else:
            host = tl.load(HOST_CTA + u)
            slot0 = tl.load(SLOT_OFFSETS + u)
            if REDUCE_IN_KERNEL:
                if it == u_lo:
                    # host: fold the peers in slot order once each has raised its flag (epoch)
                    for kk in range(1, nsplit):
                        flag = tl.atomic_add(FLAGS + slot0 + kk, 0, sem="acquire", scope="gpu")
                        while flag != epoch:
                            flag = tl.atomic_add(FLAGS + slot0 + kk, 0, sem="acquire", scope="gpu")
                        m_p, l_p, acc_p = _load_partial(MP, LP, OP, slot0 + kk, BLOCK_M, BLOCK_D)
                        m_i, l_i, acc = _merge_state(m_i, l_i, acc, m_p, l_p, acc_p)
                    _write_out(O, LSE, b, hkv, mb, m_i, l_i, acc, stride_ob, stride_om, stride_oh, stride_lb,
                               stride_lh, seqlen_q, group, head_dim, BLOCK_M, BLOCK_D)
                else:
                    _store_partial(MP, LP, OP, slot0 + (c - host), m_i, l_i, acc, BLOCK_M, BLOCK_D)
                    tl.debug_barrier()   # every thread's partial stores precede the flag
                    tl.atomic_xchg(FLAGS + slot0 + (c - host), epoch, sem="release", scope="gpu")
            else:
                _store_partial(MP, LP, OP, slot0 + (c - host), m_i, l_i, acc, BLOCK_M, BLOCK_D)
        it = seg_hi
        u += 1


@triton.jit
def _lean_reduce_kernel(
    O, LSE, MP, LP, OP, SPLIT_TILES, TILE_BATCH, TILE_HEAD, TILE_MBLOCK, NUM_SPLITS, SLOT_OFFSETS,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    seqlen_q, group, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per split output tile; merges its slots in slot order (same order as the host)
    u = tl.load(SPLIT_TILES + tl.program_id(0))
    slot0 = tl.load(SLOT_OFFSETS + u)
    nsplit = tl.load(NUM_SPLITS + u)
    m_i, l_i, acc = _load_partial(MP, LP, OP, slot0, BLOCK_M, BLOCK_D)
    for kk in range(1, nsplit):
        m_p, l_p, acc_p = _load_partial(MP, LP, OP, slot0 + kk, BLOCK_M, BLOCK_D)
        m_i, l_i, acc = _merge_state(m_i, l_i, acc, m_p, l_p, acc_p)
    b = tl.load(TILE_BATCH + u).to(tl.int64)
    hkv = tl.load(TILE_HEAD + u).to(tl.int64)
    mb = tl.load(TILE_MBLOCK + u)
    _write_out(O, LSE, b, hkv, mb, m_i, l_i, acc, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
               seqlen_q, group, head_dim, BLOCK_M, BLOCK_D)


def pick_block_m(rows: int) -> int:
    """BLOCK_M for ``rows = seqlen_q * group`` packed query rows: the next power of two, 16..64."""
    return max(16, min(64, triton.next_power_of_2(max(rows, 1))))


_FLAGS: dict = {}


def _flags(device: torch.device, n: int):
    """Per-device flag array and a fresh epoch. Flags are zeroed only when the array grows or the
    epoch wraps; otherwise each launch uses a new epoch value (no memset per call). Calls that
    run concurrently on different streams of one device must not share it (they would race)."""
    key = str(device)
    buf, epoch = _FLAGS.get(key, (None, 0))
    if buf is None or buf.numel() < n or epoch >= 2**31 - 2:
        buf, epoch = torch.zeros(max(n, 1024), dtype=torch.int32, device=device), 0
    epoch += 1
    _FLAGS[key] = (buf, epoch)
    return buf, epoch


def lean_decode_fwd(q, k_cache, v_cache, out, lse, *, seqlens_k, schedule, sched, block_table=None,
                    cache_batch_idx=None, cache_leftpad=None, rot_cos=None, rot_sin=None, rotary_dim=0,
                    rotary_interleaved=True,
                    alibi_slopes=None, softmax_scale, softcap=0.0, window_left=-1, window_right=-1,
                    block_m, block_n, reduce_in_kernel=False, num_warps=None, num_stages=None) -> None:
    """Launch the decode kernel (and the reduction kernel when ``reduce_in_kernel`` is False).

    Inputs are validated by the caller (``posattn.ops.decode``); ``schedule`` is a
    ``posattn.scheduling.Schedule`` built with the same ``block_n`` and ``block_m`` packing and
    ``sched`` its ``as_tensors(device)``. Writes ``out`` and ``lse`` for every output tile in the
    schedule (batches with no key are the caller's).
    """
    if schedule.num_tiles == 0:
        return
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    group = H // Hk
    block_d = max(16, triton.next_power_of_2(D))
    if num_warps is None:
        # from `python -m posattn report`: with 4 warps, d256 (a [BLOCK_N, 256] K tile and a [16, 256]
        # accumulator) spills, and so does the paged path on sm_80 (ptxas caps it at 128 registers)
        num_warps = 8 if (block_d >= 256 or block_table is not None) else 4
    if num_stages is None:
        num_stages = 2
    dev = q.device
    nslots = max(schedule.num_slots, 1)
    mp = torch.empty(nslots, block_m, dtype=torch.float32, device=dev)
    lp = torch.empty(nslots, block_m, dtype=torch.float32, device=dev)
    op = torch.empty(nslots, block_m, block_d, dtype=torch.float32, device=dev)
    if reduce_in_kernel:
        flags, epoch = _flags(dev, nslots)
    else:
        flags, epoch = mp, 0   # unused
    dummy = sched["tile_offsets"]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    stride_ab, stride_ah = (0, 0)
    if alibi_slopes is not None:
        stride_ab, stride_ah = (alibi_slopes.stride(0), alibi_slopes.stride(1)) if alibi_slopes.dim() == 2 \
            else (0, alibi_slopes.stride(0))
    _lean_decode_kernel[(schedule.num_ctas,)](
        q, k_cache, v_cache, out, lse, seqlens_k,
        block_table if paged else dummy, cache_batch_idx if cache_batch_idx is not None else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        rot_cos if rotary_dim else mp, rot_sin if rotary_dim else mp, alibi_slopes if alibi_slopes is not None else mp,
        sched["tile_offsets"], sched["tile_batch"], sched["tile_head"], sched["tile_mblock"], sched["cta_starts"],
        sched["cta_first_tile"], sched["host_cta"], sched["num_splits"], sched["slot_offsets"],
        mp, lp, op, flags,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        block_table.stride(0) if paged else 0,
        rot_cos.stride(0) if rotary_dim else 0, rot_cos.stride(1) if rotary_dim else 0, stride_ab, stride_ah,
        Sq, group, D, float(softmax_scale), float(softcap), int(window_left), int(window_right), epoch,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAGED=paged, PAGE_SIZE=page_size,
        HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFTPAD=cache_leftpad is not None, ROTARY_DIM=int(rotary_dim), ROT_INTERLEAVED=bool(rotary_interleaved),
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0, REDUCE_IN_KERNEL=bool(reduce_in_kernel),
        DOT_FP32=(q.device.type == "cpu" and q.dtype == torch.bfloat16),
        num_warps=num_warps, num_stages=num_stages,
    )
    if not reduce_in_kernel and schedule.split_tiles:
        _lean_reduce_kernel[(len(schedule.split_tiles),)](
            out, lse, mp, lp, op, sched["split_tiles"], sched["tile_batch"], sched["tile_head"], sched["tile_mblock"],
            sched["num_splits"], sched["slot_offsets"],
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            Sq, group, D, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )


def report_cases():
    """(label, thunk) pairs for ``python -m posattn report``: the launcher on small CPU tensors with
    the block sizes, warps and modes a GPU call would use (see posattn.report)."""
    from posattn.scheduling import default_block_n, lean_schedule

    def case(dtype, head_dim, group, *, paged=False, rotary=False, alibi=False, reduce_in_kernel=True, leftpad=False):
        def thunk():
            B, Hk, L = 2, 2, 300
            H = Hk * group
            bn = default_block_n(head_dim)
            bm = pick_block_m(group)
            q = torch.randn(B, 1, H, head_dim, dtype=dtype)
            if paged:
                kc = torch.randn(8, 64, Hk, head_dim, dtype=dtype)
                bt = torch.arange(8, dtype=torch.int32).reshape(2, 4)
            else:
                kc, bt = torch.randn(B, L, Hk, head_dim, dtype=dtype), None
            vc = torch.randn_like(kc)
            s = lean_schedule([200, 250], num_heads_k=Hk, block_n=bn, num_ctas=3)
            rc = torch.randn(B, 1, head_dim // 4) if rotary else None
            lean_decode_fwd(q, kc, vc, torch.empty_like(q), torch.empty(B, H, 1), seqlens_k=torch.tensor([200, 250],
                            dtype=torch.int32), schedule=s, sched=s.as_tensors("cpu"), block_table=bt,
                            rot_cos=rc, rot_sin=rc, rotary_dim=head_dim // 2 if rotary else 0,
                            alibi_slopes=torch.rand(H) if alibi else None, softmax_scale=head_dim ** -0.5,
                            block_m=bm, block_n=bn, reduce_in_kernel=reduce_in_kernel,
                            cache_leftpad=torch.tensor([30, 50], dtype=torch.int32) if leftpad else None)
        return thunk

    return [
        ("bf16 d128 gqa4 in-kernel reduce", case(torch.bfloat16, 128, 4)),
        ("bf16 d128 gqa4 separate reduce", case(torch.bfloat16, 128, 4, reduce_in_kernel=False)),
        ("fp16 d64 mha paged rope alibi", case(torch.float16, 64, 1, paged=True, rotary=True, alibi=True)),
        ("bf16 d256 gqa8", case(torch.bfloat16, 256, 8)),
        ("fp32 d128 gqa4", case(torch.float32, 128, 4)),
        ("bf16 d128 gqa4 leftpad rope", case(torch.bfloat16, 128, 4, rotary=True, leftpad=True)),
    ]
