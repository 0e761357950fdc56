"""Property-based fuzzing of posattn.flash_attn_with_kvcache (torch backend, Triton interpreter) against
reference.kvcache_attention in float64: contiguous caches in several memory layouts (packed kv halves, permuted,
storage offset, last-dim stride 2 with NaN gaps; with cache_batch_idx over a larger cache, with
cache_leftpad) and paged caches (shuffled block_table, page sizes that do and do not divide the lengths),
cache_seqlens from 0 to full (int or tensor, None for the whole cache), appended k/v (0-3 new tokens) or none,
rotary tables (any float dtype, interleaved or not, rotary_dim <= head_dim) or a RoPE object, ALiBi slopes
(per head, per batch and head, or an ALiBi object), GQA/MQA, causal, windows, softcap, softmax_scale, the three
schedules with num_splits / num_ctas (stream-K splits inside a sequence need > 128 keys: drawn), an out= buffer,
dtypes and value regimes. Decode is inference only (no gradients).

Checked: out (and lse when returned) vs the reference; the cache update is exact (the new k, rotated in fp32
by the shared formula and rounded to the cache dtype, and v, at indices cache_seqlens[b] + t of the cache row /
pages of sequence b) and nothing else in either cache changes, bit for bit; cache slots that are not valid keys
(past cache_seqlens + new, before cache_leftpad, unused pages, other cache rows) hold NaN/inf and must not change
the result; q, k, v, tables, slopes and the index tensors are bit-identical afterwards. The CUDA backend is
fuzzed on a GPU by tests/test_fuzz_cuda.py with this file's case builder (``_decode_case(..., device,
cuda=True)``); not yet run on a GPU.

Profiles: tests/hypothesis_profiles.py (``--hypothesis-profile=deep`` for >= 5000 examples per test)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import posattn
from posattn import reference as R
from fuzz_helpers import (CPU, DTYPES, HALF_DTYPES, SEEDS, VALUE_KINDS, _bits, assert_unchanged, check_close,
                          cuda_probe, heads, logit_cond, lse_floor, on_device, poisoned_allocations, same_layout_copy,
                          snapshot, to_device, values, with_layout)
from hypothesis_profiles import examples

TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _decode_case(data, backend, device=CPU, cuda=False):
    """One decode case, built on CPU from the drawn seed and run on ``device`` (tensors copied with their layout,
    NaN/inf in the invalid cache slots included). ``cuda``: only what the CUDA kernel (csrc/lean_decode.cu,
    ops/decode.py ``_check_cuda_args``) accepts: fp16/bf16, head_dim 64/128/256, no softcap, no window but the
    causal one, no cache_leftpad; rotary_dim = head_dim drawn more often; on a backend other than "cuda" the case
    also goes through backend="cuda"'s host-side checks (``cuda_probe``)."""
    device = on_device(device)
    triton = backend == "triton"
    draw = data.draw
    seed = draw(SEEDS, label="seed")
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(HALF_DTYPES if cuda else DTYPES), label="dtype")
    B = draw(st.integers(1, 3), label="batch")
    Sq = draw(st.sampled_from([1, 1, 2, 3, 5]), label="seqlen_q")
    H, Hk = draw(heads(4 if triton else 6), label="heads")
    D = draw(st.sampled_from([16, 32, 24] if triton else [64, 128, 256] if cuda else [4, 8, 16, 40, 64]),
             label="head_dim")
    kind = draw(st.sampled_from(VALUE_KINDS), label="values")
    s_new = draw(st.sampled_from([None, None, 0, 1, 1, 2, 3]), label="seqlen_new")
    sn = s_new or 0
    long = draw(st.sampled_from([False, False, False, True]), label="long_cache")  # > 128 keys: tiles split
    paged = draw(st.booleans(), label="paged")
    fill = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="invalid_fill")

    # ---- cache geometry and lengths
    if paged:
        page = draw(st.sampled_from([1, 3, 16, 64] if long else [1, 2, 3, 5, 16]), label="page_block_size")
        max_blocks = draw(st.integers(1, (300 // page + 1) if long else max(1, 24 // page + 1)), label="max_blocks")
        max_blocks = max(max_blocks, -(-sn // page))          # room for the appended tokens
        capacity = page * max_blocks
        extra_blocks = draw(st.integers(0, 3), label="unused_blocks")
        num_blocks = B * max_blocks + extra_blocks
    else:
        capacity = draw(st.integers(140, 300) if long else st.integers(1, 24), label="seqlen_cache")
    capacity = max(capacity, sn)
    lens_kind = draw(st.sampled_from(["tensor", "tensor", "int", "none"]) if s_new is None else
                     st.sampled_from(["tensor", "tensor", "int"]), label="cache_seqlens_kind")
    if lens_kind == "none":
        lens = [capacity] * B
    elif lens_kind == "int":
        lens = [draw(st.sampled_from([0, capacity - sn, (capacity - sn) // 2]), label="cache_seqlens")] * B
    else:
        lens = [draw(st.one_of(st.sampled_from([0, capacity - sn]), st.integers(0, capacity - sn)))
                for _ in range(B)]
    use_leftpad = (not paged) and draw(st.just(False) if cuda else st.booleans(), label="cache_leftpad")
    pads = [draw(st.integers(0, L)) if draw(st.booleans()) else 0 for L in lens] if use_leftpad else [0] * B
    use_bidx = (not paged) and draw(st.booleans(), label="cache_batch_idx")

    # ---- options
    causal = draw(st.booleans(), label="causal")
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (-1, 0)] if cuda else
                                  [(-1, -1), (-1, -1), (0, -1), (3, -1), (2, 0), (-1, 2), (40, 1)]), label="window")
    softcap = draw(st.sampled_from([0.0] if cuda else [0.0, 0.0, 1.5]), label="softcap")
    scale = draw(st.sampled_from([None, 0.3]), label="softmax_scale")
    rot = draw(st.sampled_from(["none", "none", "tables", "rope"]), label="rotary")
    alibi = draw(st.sampled_from(["none", "none", "heads", "batch_heads", "object"]), label="alibi")
    schedule = draw(st.sampled_from(["lean", "split", "single"]), label="schedule")
    num_splits = draw(st.sampled_from([0, 1, 2, 3, 7]), label="num_splits")
    num_ctas = draw(st.sampled_from([None, None, 1, 2, 3, 5]), label="num_ctas")
    ret_lse = draw(st.booleans(), label="return_softmax_lse")
    out_kind = draw(st.sampled_from(["none", "none", "buffer", "strided"]), label="out")

    # ---- tensors
    q = values((B, Sq, H, D), dtype, kind, gen)
    if draw(st.booleans(), label="q_noncontiguous"):
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    if paged:
        k_cache = values((num_blocks, page, Hk, D), dtype, kind, gen)
        v_cache = values((num_blocks, page, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)
        block_table = torch.randperm(num_blocks, generator=gen)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
        bidx = None
    else:
        Bc = B + (draw(st.integers(0, 2), label="extra_cache_rows") if use_bidx else 0)
        k_cache = values((Bc, capacity, Hk, D), dtype, kind, gen)
        v_cache = values((Bc, capacity, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)
        block_table = None
        bidx = torch.randperm(Bc, generator=gen)[:B].to(torch.int32) if use_bidx else None
    k_new = v_new = None
    if s_new is not None:
        k_new = values((B, sn, Hk, D), dtype, kind, gen)
        v_new = values((B, sn, Hk, D), dtype, "unit" if kind == "tiny" else kind, gen)

    # invalid slots: everything that is not a valid cached key, nor an append target, holds NaN/inf
    valid = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b in range(B):
        for j in range(pads[b], lens[b] + sn):
            if paged:
                valid[int(block_table[b, j // page]), j % page] = True
            else:
                valid[b if bidx is None else int(bidx[b]), j] = True
    k_cache[~valid] = fill
    v_cache[~valid] = -fill if draw(st.booleans()) else fill
    # the caches' memory layout (the values stay): contiguous; the two halves of one packed kv buffer; with_layout's
    # permuted (dims 0, 1 swapped in memory) / storage offset / last-dim stride 2 with NaN gaps. The Triton kernel
    # read a last-dim-strided cache as unit-stride rows (test_regressions_breakit_ops.py::
    # test_kvcache_triton_cache_with_strided_head_dim_matches_reference). cuda: unit last-dim stride and aligned
    cache_layout = draw(st.sampled_from(["contiguous", "contiguous", "packed", "permuted"] if cuda else
                                        ["contiguous", "contiguous", "packed", "permuted", "offset", "strided"]),
                        label="cache_layout")
    if cache_layout == "packed":
        k_cache, v_cache = torch.stack([k_cache, v_cache], dim=2).unbind(2)
    elif cache_layout != "contiguous":
        k_cache, v_cache = with_layout(k_cache, cache_layout), with_layout(v_cache, cache_layout)

    cache_seqlens = None
    if lens_kind == "tensor":
        cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    elif lens_kind == "int":
        cache_seqlens = lens[0]
    leftpad = torch.tensor(pads, dtype=torch.int32) if use_leftpad else None

    # rotary: positions up to max(lens - pads) + sn + Sq
    rot_kw, ref_rot = {}, {}
    need = max(L - P for L, P in zip(lens, pads)) + sn + Sq + 1
    if rot != "none":
        half = draw(st.one_of(st.just(D // 2), st.integers(1, D // 2)) if cuda else st.integers(1, D // 2),
                    label="rotary_dim_half")
        interleaved = draw(st.booleans(), label="rotary_interleaved")
        if rot == "tables":
            tdtype = draw(st.sampled_from(TABLE_DTYPES), label="table_dtype")
            base = draw(st.sampled_from([10000.0, 500.0] if cuda else [10000.0, 100.0]))
            inv = R.rope_inv_freq(2 * half, base, dtype=torch.float64)
            cos, sin = (t.to(tdtype) for t in R.rope_cos_sin(torch.arange(need + draw(st.integers(0, 3))), inv))
            rot_kw = dict(rotary_cos=to_device(cos, device), rotary_sin=to_device(sin, device),
                          rotary_interleaved=interleaved)
        else:
            rope = posattn.RoPE(draw(st.sampled_from([10000.0, 500.0])), rotary_dim=2 * half, interleaved=interleaved)
            # the op's fp32 angles, computed on the op's device by the op's functions (cos/sin of a GPU may
            # differ from the CPU's in the last bit; the appended k must match bit for bit)
            inv = rope.inv_freq(D, device, seqlen=max(L - P for L, P in zip(lens, pads)) + sn)
            cos, sin = (t.cpu() for t in R.rope_cos_sin(torch.arange(need, device=device), inv))
            rot_kw = dict(position=rope)
        ref_rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    slopes = slopes_d = None
    if alibi != "none":
        slopes = 0.02 + torch.rand((B, H) if alibi == "batch_heads" else (H,), generator=gen)
        slopes_d = to_device(slopes, device)
        if alibi == "object":
            obj = posattn.ALiBi(slopes_d)
            rot_kw["position"] = [rot_kw["position"], obj] if "position" in rot_kw else obj
        else:
            rot_kw["alibi_slopes"] = slopes_d

    out_buf = None
    if out_kind == "buffer":
        out_buf = torch.full((B, Sq, H, D), float("nan"), dtype=dtype)
    elif out_kind == "strided":
        out_buf = torch.full((B, Sq, H, 2 * D), float("nan"), dtype=dtype)[..., ::2]

    # ---- reference (on copies of the caches before the append)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    ro, rl = R.kvcache_attention(q, kc0, vc0, torch.tensor(lens), k=k_new, v=v_new, cache_batch_idx=bidx,
                                 block_table=block_table, softmax_scale=scale, causal=causal, window_size=window,
                                 softcap=softcap, alibi_slopes=slopes, cache_leftpad=leftpad, **ref_rot)
    k_all = torch.cat([kc0.reshape(-1, Hk, D)[valid.reshape(-1)], k_new.reshape(-1, Hk, D)]) if k_new is not None \
        else kc0.reshape(-1, Hk, D)[valid.reshape(-1)]
    cond = logit_cond(q, k_all, scale, softcap=softcap)
    # the cache update: exactly the new k (rotated in fp32 by the shared formula, rounded) and v at
    # cache_seqlens[b] + t, nothing else
    ek, ev = kc0.clone(), vc0.clone()
    if k_new is not None and sn:
        kn = k_new
        if rot != "none":
            c32, s32 = cos.to(torch.float32), sin.to(torch.float32)
            kpos = torch.tensor([L - P for L, P in zip(lens, pads)])[:, None] + torch.arange(sn)[None, :]
            kn = R.apply_rotary(k_new.float(), c32[kpos][:, :, None, :], s32[kpos][:, :, None, :],
                                interleaved).to(dtype)
        for b in range(B):
            for t in range(sn):
                j = lens[b] + t
                if paged:
                    blk, col = int(block_table[b, j // page]), j % page
                else:
                    blk, col = (b if bidx is None else int(bidx[b])), j
                ek[blk, col], ev[blk, col] = kn[b, t], v_new[b, t]

    # the index tensors' layout: contiguous, or every other entry of a wider buffer whose gaps hold 2**30 (the
    # Triton kernel indexed block_table's columns and cache_batch_idx with unit stride: test_regressions_breakit_
    # ops.py::test_kvcache_triton_index_tensors_read_through_their_strides)
    if draw(st.sampled_from(["contiguous", "contiguous", "strided"]), label="index_layout") == "strided":
        bidx, leftpad, block_table = (None if t is None else with_layout(t, "strided")
                                      for t in (bidx, leftpad, block_table))
        if isinstance(cache_seqlens, torch.Tensor):
            cache_seqlens = with_layout(cache_seqlens, "strided")
    q, k_cache, v_cache, k_new, v_new, bidx, leftpad, block_table, out_buf = (
        to_device(t, device) for t in (q, k_cache, v_cache, k_new, v_new, bidx, leftpad, block_table, out_buf))
    if isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = to_device(cache_seqlens, device)

    def call(backend, k_cache, v_cache, out):
        return posattn.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, cache_batch_idx=bidx,
            cache_leftpad=leftpad, block_table=block_table, softmax_scale=scale, causal=causal, window_size=window,
            softcap=softcap, num_splits=num_splits, return_softmax_lse=ret_lse, schedule=schedule, backend=backend,
            num_ctas=num_ctas, out=out, **rot_kw)

    if cuda and backend != "cuda":
        cuda_probe(lambda: call("cuda", *(same_layout_copy(t) for t in (k_cache, v_cache, out_buf))))
    named = dict(q=q, k=k_new, v=v_new, cache_seqlens=cache_seqlens if isinstance(cache_seqlens, torch.Tensor)
                 else None, bidx=bidx, leftpad=leftpad, block_table=block_table, slopes=slopes_d,
                 cos=rot_kw.get("rotary_cos"), sin=rot_kw.get("rotary_sin"))
    snap = snapshot(**named)
    with poisoned_allocations():
        res = call(backend, k_cache, v_cache, out_buf)
    out, lse = res if ret_lse else (res, None)
    if out_buf is not None:
        assert out is out_buf, "out= is returned"
    assert out.dtype == dtype and out.shape == (B, Sq, H, D) and out.device == device
    check_close(out, ro, dtype, name="out", cond=cond)
    if ret_lse:
        assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
        check_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, name="lse", cond=cond,
                    scale=lse_floor(rl))
    assert_unchanged(snap, **named)
    assert torch.equal(_bits(k_cache.cpu()), _bits(ek)), "k_cache: the append wrote the wrong values or other slots"
    assert torch.equal(_bits(v_cache.cpu()), _bits(ev)), "v_cache: the append wrote the wrong values or other slots"


@given(data=st.data())
@examples(30)
def test_fuzz_kvcache_torch(data):
    _decode_case(data, "torch")


@pytest.mark.interp
@given(data=st.data())
@examples(8)
def test_fuzz_kvcache_triton(data):
    _decode_case(data, "triton")
