"""KV-cache decode: ``flash_attn_with_kvcache`` with LeanAttention stream-K, split-KV or one block per
head, RoPE and ALiBi fused.

Semantics copied from FlashAttention 2.x ``flash_attn_with_kvcache``; schedule from LeanAttention
(Sanovar et al., arXiv 2405.10480; docs/ALGORITHMS.md section 1); partition in ``posattn.scheduling``;
kernels in ``posattn.triton_kernels.lean_decode`` (backend "triton") and ``csrc/lean_decode.cu`` through
``posattn._cuda.lean_decode_cuda`` (backend "cuda", explicit only; not yet run on a GPU).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import _backends
from .. import reference as _ref
from .._checks import (FLOAT_DTYPES, Dims, check_choice, check_disjoint, check_float, check_int,
                       check_last_dim_contiguous, check_no_overlap, check_same, check_tensor, check_window, dtype_name)
from ..ops_registry import register
from ..scheduling import MAX_CTAS

__all__ = ["flash_attn_with_kvcache"]

_SCHEDULES = ("lean", "split", "single")
# "cuda" is never picked by backend="auto": the CUDA C++ kernel has not yet run on a GPU, and only a
# GPU benchmark may promote it; an explicit backend="cuda" uses it.
_AUTO_BACKENDS = ("triton", "torch")
_BACKENDS = ("triton", "torch", "cuda")
_CUDA_HEAD_DIMS = (64, 128, 256)
_CHUNK = 4096   # keys per step of the torch backend (bounds its memory to O(chunk x heads x seqlen_q))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132   # modelled H100 SXM when there is no GPU (interpreter runs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, position=None, schedule="lean", backend="auto", num_ctas=None, reduce="separate",
                            out=None):
    """Attention of a few new query tokens against a KV cache, appending new keys/values in place.

    FlashAttention 2.x semantics (``flash_attn_with_kvcache``), with LeanAttention's stream-K
    schedule (arXiv 2405.10480) as the default GPU partition. Inference only: the outputs carry no
    gradient.

    Parameters
    ----------
    q : Tensor (batch_size, seqlen_q, num_heads, head_dim), fp16/bf16/fp32
        New queries; unit stride in head_dim needed by the Triton kernel (copied once otherwise).
        1 <= head_dim <= 256 (else ValueError). float64 is refused (TypeError) on every backend, the torch
        one included (it accumulates in fp32), unlike ``flash_attn_func`` whose torch backend takes float64.
    k_cache, v_cache : Tensor, same dtype and device as q
        Contiguous cache (batch_size_cache, seqlen_cache, num_heads_k, head_dim), or, with
        ``block_table``, a paged cache (num_blocks, page_block_size, num_heads_k, head_dim).
        **Written in place** when ``k``/``v`` are given (as FlashAttention does). num_heads must
        be a multiple of num_heads_k (GQA/MQA: query head h reads kv head h // (num_heads // num_heads_k)).
        A cache that is written (k/v given, seqlen_new > 0) must not alias itself (no ``expand``-ed or
        overlapping view, e.g. a stride-0 shared prefix: ValueError naming it) and must not require
        grad (ValueError: the write bypasses autograd). Nor may a written cache share memory with the
        other cache or with q, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, block_table or the ALiBi slopes (ValueError naming both arguments; the test is
        exact, ``posattn._checks.shares_memory``): the two halves of one packed buffer, ``kv =
        torch.empty(B, S, 2, H, D); k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]``, share no element and
        are fine. Reading an expanded cache without appending is fine, and so are a k_cache and
        v_cache that alias each other (even one tensor passed twice) when nothing is appended.
    k, v : Tensor (batch_size, seqlen_new, num_heads_k, head_dim) or None
        New keys/values, appended at cache index ``cache_seqlens[b]`` (k after rotary when rotary is
        on). Both or neither.
    rotary_cos, rotary_sin : Tensor (seqlen_ro, rotary_dim // 2) or None
        Rotary tables (any float dtype; used in fp32). With ``L = cache_seqlens - cache_leftpad``
        (``cache_leftpad`` 0 when None): the new k is rotated at positions ``L + t``; q at ``L + i``
        when ``causal`` or a window is set, else at ``L`` (FlashAttention's rule, which assumes
        seqlen_q == 1 then). Unlike
        FlashAttention, rotary without ``k`` is allowed: it rotates q only. rotary_dim even,
        <= head_dim. seqlen_ro must cover every position used.
    cache_seqlens : int, Tensor (batch_size,) int32, or None
        Valid cache length of each sequence before the append. None: the whole cache
        (seqlen_cache, or max_blocks_per_seq * page_block_size when paged). Read on the host
        (one device-to-host copy per call: the schedule is built on the host).
    cache_batch_idx : Tensor (batch_size,) int32 or None
        Cache row of each sequence (None: row b). Not with ``block_table``. Distinct values are
        required when k/v are appended.
    cache_leftpad : Tensor (batch_size,) int32 or None
        FlashAttention's left padding: the cache of sequence b starts at index ``cache_leftpad[b]``
        (entries before it are never read), so its valid keys are cache indices
        ``[cache_leftpad[b], cache_seqlens[b])`` plus the new k/v appended at ``cache_seqlens[b]``.
        Every position (RoPE of q and the new k, causal/window alignment, ALiBi distances) counts
        from the pad: cache index t is position ``t - cache_leftpad[b]``, i.e. the sequence behaves
        as one of ``cache_seqlens[b] - cache_leftpad[b]`` cached keys. None = no padding. Needs
        ``0 <= cache_leftpad[b] <= cache_seqlens[b]`` (equality: no cached key), same device as q.
        Not with ``block_table`` (as in FlashAttention) nor with backend "cuda" (ValueError).
    block_table : Tensor (batch_size, max_blocks_per_seq) int32 or None
        Paged cache: key j of sequence b is at ``k_cache[block_table[b, j // page_block_size],
        j % page_block_size]``. Entries that are read or written must be in [0, num_blocks). Sequences
        may share pages they only read (e.g. a common prefix), but no cache slot may be written by
        the appends of two sequences (checked on the host: ValueError naming ``block_table``).
    softmax_scale : float or None
        Scale of q k^T; None = head_dim ** -0.5.
    causal : bool, default False
        Bottom-right aligned mask: query i of sequence b (seqlen_k = cache_seqlens[b] -
        cache_leftpad[b] + seqlen_new keys, key j at cache index j + cache_leftpad[b])
        sees key j iff ``j <= i + seqlen_k - seqlen_q``::

            seqlen_q = 2, seqlen_k = 5:   1 1 1 1 0
                                          1 1 1 1 1
    window_size : (left, right), default (-1, -1)
        Local attention: key j is visible iff ``i + seqlen_k - seqlen_q - left <= j <=
        i + seqlen_k - seqlen_q + right``; -1 = unbounded. ``causal`` sets right = 0.
    softcap : float, default 0.0
        > 0: logits become ``softcap * tanh(logits / softcap)`` (before the ALiBi bias); 0 = off.
    rotary_interleaved : bool, default True
        True: GPT-J pairs (2i, 2i+1); False: GPT-NeoX pairs (i, i + rotary_dim/2).
    alibi_slopes : Tensor (num_heads,) or (batch_size, num_heads), fp32, or None
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scaled logits (FlashAttention-2).
    num_splits : int, default 0
        ``schedule="split"`` only: number of KV splits per output tile; 0 = FlashDecoding's
        wave-efficiency heuristic (``posattn.scheduling.split_heuristic``). Ignored by "lean" and
        "single".
    return_softmax_lse : bool, default False
        Also return lse (batch_size, num_heads, seqlen_q) fp32, natural log; -inf for a row with no
        visible key.
    position : RoPE, ALiBi, a list of both, or None (keyword)
        ``posattn.positional`` objects instead of the tables/slopes above (not both for one kind).
        RoPE: cos/sin from ``RoPE.inv_freq`` with fp32 angles at the positions above, times YaRN's
        attention factor; its ``interleaved`` flag replaces ``rotary_interleaved``; ``position_ids``
        is not supported here (positions are implied by cache_seqlens). ALiBi: its slopes.
    schedule : {"lean", "split", "single"}, default "lean" (keyword)
        GPU partition: stream-K over (batch x kv head x KV tile) (``lean``), FlashDecoding's fixed
        splits (``split``), one CTA per (batch, kv head) (``single``). All run the same kernel. The
        torch backend ignores it (exact chunked attention).
    backend : {"auto", "triton", "torch", "cuda"}, default "auto" (keyword)
        "auto": Triton on CUDA tensors, torch on CPU; never "cuda". "triton" on CPU needs
        TRITON_INTERPRET=1. "cuda": the CUDA C++ LeanAttention kernel (``csrc/lean_decode.cu`` via
        ``posattn._cuda.lean_decode_cuda``; **not yet run on a GPU**, so only an explicit request
        uses it), CUDA tensors only. It supports fp16/bf16, head_dim 64/128/256, contiguous or paged
        caches and ``cache_batch_idx`` (run as a one-page-per-row paged cache), GQA/MQA, ``causal``,
        RoPE and ALiBi, all three schedules. It does not support ``softcap`` > 0 or a window other
        than the causal one (ValueError naming the argument); the caches must have a unit last-dim
        stride, 16-byte aligned data and other strides that are multiples of 8 elements (ValueError
        naming ``k_cache``/``v_cache``). q is rotated inside the kernel when ``position`` is a RoPE
        without YaRN attention factor and q's rotary positions equal its attention positions
        (``cache_seqlens + seqlen_new - seqlen_q + i``, e.g. ``causal`` with seqlen_new ==
        seqlen_q); otherwise q is rotated on the host in fp32 (rounded to q's dtype) first.
    num_ctas : int or None (keyword)
        ``schedule="lean"``: grid size G (None: ``scheduling.lean_schedule``'s choice for
        2 CTAs per SM; with backend "cuda", for ``_C.lean_decode_max_ctas(head_dim, dtype)``
        co-resident CTAs). The result does not depend on G beyond fp32 rounding. 1 <= G <=
        ``scheduling.MAX_CTAS`` (65536) on every backend (CTAs past the KV tiles get no work), else
        ValueError. Backend "cuda": at most ``_C.lean_decode_max_ctas(head_dim, dtype)``, else ValueError.
    reduce : {"separate", "kernel"}, default "separate" (keyword)
        Where split tiles are merged: a second deterministic kernel ("separate"), or the host CTA
        inside the decode kernel with epoch flags ("kernel"; GPU only, **not yet run on a GPU**).
        Backend "cuda" always merges inside its kernel (host CTA, epoch flags, cooperative
        launch) and ignores this option; a "split"/"single" grid larger than the co-resident CTAs
        raises ValueError naming ``schedule``.
    out : Tensor (batch_size, seqlen_q, num_heads, head_dim) or None (keyword)
        Output buffer (q's dtype and device), written in place and returned. Must not alias itself
        (no ``expand``-ed / overlapping view), must not require grad (ValueError naming ``out``) and must
        share no memory with any other tensor argument (q, k_cache, v_cache, k, v, the rotary tables,
        cache_seqlens, cache_batch_idx, cache_leftpad, block_table, the ALiBi slopes: ValueError naming
        ``out`` and that argument).

    Returns
    -------
    out : Tensor (batch_size, seqlen_q, num_heads, head_dim), q's dtype
    lse : Tensor (batch_size, num_heads, seqlen_q) fp32, only if ``return_softmax_lse``

    Raises
    ------
    TypeError
        Wrong types or dtypes (e.g. cache_seqlens not int32; q not fp16/bf16 with backend "cuda").
    ValueError
        Shape conflicts, head counts that do not divide, cache_seqlens (plus seqlen_new) beyond the
        cache, cache_leftpad outside [0, cache_seqlens] (or with block_table or backend "cuda"),
        block_table entries out of range or a cache slot written by two sequences' appends, a
        written ``k_cache``/``v_cache`` or an ``out`` that aliases itself (expanded / overlapping
        view) or requires grad, an ``out`` that shares memory with another tensor argument, a
        written ``k_cache``/``v_cache`` that shares memory with the other cache or with a tensor
        argument the op reads (the message names both), rotary tables too short, bad options, what backend
        "cuda" does not support (head_dim, softcap, window_size, cache layout, num_ctas or a
        schedule grid over the co-resident CTAs). Every check runs before any write: the cache
        is never written out of bounds.
    RuntimeError
        An explicit backend that cannot run here (e.g. backend="cuda" with CPU tensors or without
        ``posattn._C``).

    Examples
    --------
    >>> import torch, posattn
    >>> q = torch.randn(2, 1, 4, 16)
    >>> k_cache, v_cache = torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    >>> k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    >>> out, lse = posattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v,
    ...     cache_seqlens=torch.tensor([3, 7], dtype=torch.int32), return_softmax_lse=True)
    >>> out.shape, lse.shape, bool(torch.equal(k_cache[1, 7], k[1, 0]))
    (torch.Size([2, 1, 4, 16]), torch.Size([2, 4, 1]), True)
    """
    a = _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                  num_splits, return_softmax_lse, position, schedule, backend, num_ctas, reduce, out)
    with torch.no_grad():
        if k is not None:
            _append(a, k_cache, v_cache, k, v, block_table, cache_batch_idx)
        if a["backend"] == "triton":
            _run_triton(a, q, k_cache, v_cache, block_table, cache_batch_idx)
        elif a["backend"] == "cuda":
            _run_cuda(a, q, k_cache, v_cache, block_table, cache_batch_idx)
        else:
            _run_torch(a, q, k_cache, v_cache, block_table, cache_batch_idx)
    return (a["out"], a["lse"]) if return_softmax_lse else a["out"]


# ------------------------------------------------------------------------------------------------
# validation: everything is checked before any write
# ------------------------------------------------------------------------------------------------
def _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
              num_splits, return_softmax_lse, position, schedule, backend, num_ctas, reduce, out):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=4)
        check_same(name, t, "q", q)
    d = Dims()
    d.check("q", q, ("batch_size", "seqlen_q", "num_heads", "head_dim"))
    B, Sq, H, D = q.shape
    paged = block_table is not None
    if paged:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=dev)
        d.check("block_table", block_table, ("batch_size", "max_blocks_per_seq"))
        d.check("k_cache", k_cache, ("num_blocks", "page_block_size", "num_heads_k", "head_dim"))
        d.check("v_cache", v_cache, ("num_blocks", "page_block_size", "num_heads_k", "head_dim"))
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        d.check("k_cache", k_cache, ("batch_size_cache", "seqlen_cache", "num_heads_k", "head_dim"))
        d.check("v_cache", v_cache, ("batch_size_cache", "seqlen_cache", "num_heads_k", "head_dim"))
        capacity = k_cache.shape[1]
    Hk = k_cache.shape[2]
    if H % Hk != 0:
        raise ValueError(f"k_cache: num_heads={H} (q) must be a multiple of num_heads_k={Hk} (k_cache)")
    if D > 256 or D < 1:   # head_dim 0 raised ZeroDivisionError from the default scale (as varlen: refused)
        raise ValueError(f"q: expected 1 <= head_dim <= 256, got {D}")
    if cache_leftpad is not None:
        if paged:
            raise ValueError("cache_leftpad: not supported together with block_table (paged cache), as in "
                             "FlashAttention; pass None")
        if backend == "cuda":
            raise ValueError("cache_leftpad: backend='cuda' does not support it (the CUDA kernel has no such "
                             "input); use backend='triton' or 'torch'")
        check_tensor("cache_leftpad", cache_leftpad, dtypes=(torch.int32,), ndim=1, device=dev)
        d.check("cache_leftpad", cache_leftpad, ("batch_size",))
    if cache_batch_idx is not None:
        if paged:
            raise ValueError("cache_batch_idx: not supported together with block_table (paged cache); pass None")
        check_tensor("cache_batch_idx", cache_batch_idx, dtypes=(torch.int32,), ndim=1, device=dev)
        d.check("cache_batch_idx", cache_batch_idx, ("batch_size",))
        idx = cache_batch_idx.cpu()
        if B and (int(idx.min()) < 0 or int(idx.max()) >= k_cache.shape[0]):
            raise ValueError(f"cache_batch_idx: expected values in [0, batch_size_cache={k_cache.shape[0]}), "
                             f"got min {int(idx.min())}, max {int(idx.max())}")
        if k is not None and idx.unique().numel() != idx.numel():
            raise ValueError("cache_batch_idx: expected distinct rows when k/v are appended, got repeated values")
    elif not paged and k_cache.shape[0] != B:
        raise ValueError(f"k_cache: expected batch_size_cache == batch_size={B} without cache_batch_idx, "
                         f"got {k_cache.shape[0]}")
    # new keys/values
    if (k is None) != (v is None):
        raise ValueError(f"k, v: give both or neither, got k={'None' if k is None else 'Tensor'}, "
                         f"v={'None' if v is None else 'Tensor'}")
    s_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4)
            check_same(name, t, "q", q)
            d.check(name, t, ("batch_size", "seqlen_new", "num_heads_k", "head_dim"))
        s_new = k.shape[1]
    # cache lengths (host copy: the schedule is built on the host)
    if cache_seqlens is None:
        lens = [capacity if k is None else None] * B
        if k is not None:
            raise ValueError(f"cache_seqlens: needed when k/v are appended (the cache has no room past "
                             f"seqlen {capacity})")
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lens = [cache_seqlens] * B
    else:
        check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=dev)
        d.check("cache_seqlens", cache_seqlens, ("batch_size",))
        lens = [int(x) for x in cache_seqlens.cpu().tolist()]
    for b, L in enumerate(lens):
        if L < 0 or L + s_new > capacity:
            what = f"cache_seqlens[{b}] + seqlen_new = {L} + {s_new}" if s_new else f"cache_seqlens[{b}] = {L}"
            raise ValueError(f"cache_seqlens: expected 0 <= {what} <= cache capacity {capacity}"
                             f"{' (max_blocks_per_seq x page_block_size)' if paged else ' (seqlen_cache)'}")
    pads = [0] * B
    if cache_leftpad is not None:
        pads = [int(x) for x in cache_leftpad.cpu().tolist()]
        for b, (P, L) in enumerate(zip(pads, lens)):
            if P < 0 or P > L:
                raise ValueError(f"cache_leftpad: expected 0 <= cache_leftpad[{b}] <= cache_seqlens[{b}] = {L}, "
                                 f"got {P}")
    # positions count from the left pad: sequence b has cache_seqlens[b] - cache_leftpad[b] cached keys
    eff = [L - P for L, P in zip(lens, pads)]
    seqlens_k = [L + s_new for L in eff]
    if paged and B:
        page = k_cache.shape[1]
        bt = block_table.cpu()
        used = torch.arange(bt.shape[1], dtype=torch.int64)[None, :] < \
            torch.tensor([-(-L // page) for L in seqlens_k], dtype=torch.int64)[:, None]
        vals = bt[used]
        if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_table: entries used by cache_seqlens must be in [0, num_blocks={k_cache.shape[0]}), "
                             f"got min {int(vals.min())}, max {int(vals.max())}")
        if s_new:
            # slots the appends write: two sequences must not write the same one (the later write would win
            # silently); pages only read may be shared
            pos = torch.tensor(lens, dtype=torch.int64)[:, None] + torch.arange(s_new, dtype=torch.int64)[None, :]
            slots = bt.to(torch.int64).gather(1, pos // page) * page + pos % page
            uniq, counts = slots.flatten().unique(return_counts=True)
            if bool((counts > 1).any()):
                slot = int(uniq[counts > 1][0])
                seqs = (slots == slot).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(f"block_table: sequences {seqs} append into the same cache slot (page {slot // page}, "
                                 f"offset {slot % page}); pages written by an append must not be shared")
    if s_new and B:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_writable(name, t)
    # options
    scale = check_float("softmax_scale", softmax_scale, allow_none=True)
    scale = D ** -0.5 if scale is None else scale
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    left, right = check_window("window_size", window_size)
    local = (left, right) != (-1, -1)
    if causal:
        right = 0
    softcap = check_float("softcap", softcap, minimum=0.0)
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved: expected a bool, got {type(rotary_interleaved).__name__}")
    check_int("num_splits", num_splits, minimum=0)
    check_choice("schedule", schedule, _SCHEDULES)
    check_choice("reduce", reduce, ("separate", "kernel"))
    if num_ctas is not None:
        check_int("num_ctas", num_ctas, minimum=1, maximum=MAX_CTAS)
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse: expected a bool, got {type(return_softmax_lse).__name__}")
    # positional encodings
    rope = alibi_obj = None
    if position is not None:
        from ..positional import ALiBi, RoPE, parse_position
        spec = parse_position(position)
        if spec.urpe is not None or (spec.rotary is not None and not isinstance(spec.rotary, RoPE)) or \
                (spec.bias is not None and not isinstance(spec.bias, ALiBi)):
            raise ValueError(f"position: decode supports RoPE and ALiBi, got {position!r}")
        rope, alibi_obj = spec.rotary, spec.bias
        if rope is not None and rotary_cos is not None:
            raise ValueError("position: a RoPE was given together with rotary_cos/rotary_sin; give one")
        if alibi_obj is not None and alibi_slopes is not None:
            raise ValueError("position: an ALiBi was given together with alibi_slopes; give one")
        if rope is not None and rope.position_ids is not None:
            raise ValueError("position: RoPE.position_ids is not supported by decode (positions are cache_seqlens + i)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: give both or neither")
    interleaved = rotary_interleaved
    rot_q = rot_k = None      # fp32 (B, Sq, r/2) and (B, s_new, r/2) pairs of (cos, sin)
    rope_inv = None           # fp32 inv_freq of a RoPE without attention factor (backend "cuda" rotates q in-kernel)
    qpos = torch.tensor(eff, dtype=torch.int64)[:, None] + (
        torch.arange(Sq, dtype=torch.int64)[None, :] if (causal or local) else torch.zeros(1, Sq, dtype=torch.int64))
    kpos = torch.tensor(eff, dtype=torch.int64)[:, None] + torch.arange(s_new, dtype=torch.int64)[None, :]
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2, device=dev)
            d.check(name, t, ("seqlen_ro", "rotary_dim_half"))
        r2 = rotary_cos.shape[1]
        if 2 * r2 > D:
            raise ValueError(f"rotary_cos: rotary_dim = 2 x {r2} exceeds head_dim={D}")
        need = max(int(qpos.max()) if qpos.numel() else -1, int(kpos.max()) if kpos.numel() else -1) + 1
        if need > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos: expected seqlen_ro >= {need} (largest rotary position + 1), "
                             f"got {rotary_cos.shape[0]}")
        cos32, sin32 = rotary_cos.to(torch.float32), rotary_sin.to(torch.float32)
        rot_q = (cos32[qpos.to(dev)], sin32[qpos.to(dev)])
        rot_k = (cos32[kpos.to(dev)], sin32[kpos.to(dev)])
        rotary_dim = 2 * r2
    elif rope is not None:
        rotary_dim = rope.get_rotary_dim(D)
        inv = rope.inv_freq(D, dev, seqlen=max(seqlens_k, default=0))
        fac = rope.attention_factor
        cq, sq = _ref.rope_cos_sin(qpos.to(dev), inv)
        ck, sk = _ref.rope_cos_sin(kpos.to(dev), inv)
        rot_q = ((cq * fac).float(), (sq * fac).float())
        rot_k = ((ck * fac).float(), (sk * fac).float())
        interleaved = rope.interleaved
        rope_inv = inv.float() if float(fac) == 1.0 else None
    else:
        rotary_dim = 0
    alibi_read = ("alibi_slopes", alibi_slopes)   # what the aliasing checks compare (the caller's tensor)
    if alibi_obj is not None:
        alibi_read = ("position (ALiBi slopes)", alibi_obj.slopes)
        alibi_slopes = alibi_obj.get_slopes(B, H, dev)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2), device=dev)
        d.check("alibi_slopes", alibi_slopes, ("num_heads",) if alibi_slopes.dim() == 1 else ("batch_size", "num_heads"))
    if out is not None:
        check_tensor("out", out, ndim=4)
        check_same("out", out, "q", q)
        d.check("out", out, ("batch_size", "seqlen_q", "num_heads", "head_dim"))
        _check_writable("out", out)
    # what the op writes must share no memory with what it reads (an exact test: the two halves of a packed
    # kv buffer share none); a k_cache that is only read may alias v_cache
    reads = {"q": q, "k": k, "v": v, "rotary_cos": rotary_cos, "rotary_sin": rotary_sin,
             "cache_seqlens": cache_seqlens, "cache_batch_idx": cache_batch_idx, "cache_leftpad": cache_leftpad,
             "block_table": block_table, alibi_read[0]: alibi_read[1]}
    _check_aliasing(out, k_cache, v_cache, reads, bool(s_new and B))
    if out is None:
        out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=dev)
    if backend == "cuda":   # argument checks first: they need no device
        _check_cuda_args(q, k_cache, v_cache, softcap, window_size, left, right)
    be = _backends.resolve(backend, dev, supported=_AUTO_BACKENDS if backend == "auto" else _BACKENDS,
                           op="flash_attn_with_kvcache")
    cuda_schedule = _cuda_schedule(q, Hk, seqlens_k, schedule, num_splits, num_ctas) if be == "cuda" else None
    if reduce == "kernel" and be == "triton":
        # the host CTA spins on flags of later CTAs: every CTA must be resident at once
        if dev.type != "cuda":
            raise ValueError("reduce: 'kernel' needs a GPU (under the Triton interpreter programs run one after "
                             "another and a waiting host would never see its peers); use 'separate'")
        if num_ctas is not None and num_ctas > _num_sms(dev):
            raise ValueError(f"num_ctas: expected <= {_num_sms(dev)} (one resident CTA per SM) with reduce='kernel', "
                             f"got {num_ctas}")
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=dev)
    return dict(B=B, Sq=Sq, H=H, Hk=Hk, D=D, lens=lens, pads=pads, seqlens_k=seqlens_k, s_new=s_new, scale=scale,
                left=left, right=right, softcap=softcap, rotary_dim=rotary_dim, interleaved=interleaved,
                rot_q=rot_q, rot_k=rot_k, alibi=alibi_slopes, schedule=schedule, num_splits=num_splits,
                num_ctas=num_ctas, reduce=reduce, out=out, lse=lse, backend=be, paged=paged, qpos=qpos,
                rope_inv=rope_inv, cuda_schedule=cuda_schedule)


@torch.compiler.disable
def _check_aliasing(out, k_cache, v_cache, reads, appending):
    """out, and the caches when appending, must share no memory with what the op reads (``check_disjoint``).
    Run eagerly under ``torch.compile`` (a graph break; decode breaks the graph anyway to read cache_seqlens on
    the host): Dynamo has no data pointers, so traced, ``check_disjoint`` would skip the test."""
    spans = {}   # byte spans of the arguments, computed once for the checks below
    if out is not None:
        check_disjoint("out", out, {"k_cache": k_cache, "v_cache": v_cache, **reads}, spans=spans)
    if appending:   # the append writes both caches
        check_disjoint("k_cache", k_cache, {"v_cache": v_cache, **reads}, spans=spans)
        check_disjoint("v_cache", v_cache, reads, spans=spans)


def _resolved(t):
    """t with its negative bit applied (``z.conj().imag`` is such a lazily negated view): the kernels read
    memory, not torch's view of it. A copy only when the bit is set; None stays None."""
    return None if t is None else t.resolve_neg()


def _check_writable(name, t):
    """A tensor the op writes in place: no self-aliasing (expanded / overlapping views), no autograd."""
    check_no_overlap(name, t)
    if t.requires_grad:
        raise ValueError(f"{name}: is written in place, but it requires grad (the write would bypass autograd; torch "
                         f"refuses in-place writes to leaves that require grad); pass a tensor without requires_grad "
                         f"(e.g. .detach() it, or create it under torch.no_grad())")


# ------------------------------------------------------------------------------------------------
# append (in place) and the two backends
# ------------------------------------------------------------------------------------------------
def _rotate(x32: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x32 (B, T, heads, D) fp32 with cos/sin (B, T, r/2): the shared reference formula, in fp32."""
    return _ref.apply_rotary(x32, cos[:, :, None, :], sin[:, :, None, :], interleaved)


def _append(a, k_cache, v_cache, k, v, block_table, cache_batch_idx):
    B, s_new = a["B"], a["s_new"]
    if s_new == 0 or B == 0:
        return
    dev = k_cache.device
    if a["rotary_dim"]:
        k = _rotate(k.float(), a["rot_k"][0], a["rot_k"][1], a["interleaved"]).to(k_cache.dtype)
    pos = torch.tensor(a["lens"], dtype=torch.int64, device=dev)[:, None] + torch.arange(s_new, dtype=torch.int64, device=dev)[None, :]
    if a["paged"]:
        page = k_cache.shape[1]
        rows = block_table.long().gather(1, pos // page)
        cols = pos % page
    else:
        rows = (torch.arange(B, dtype=torch.int64, device=dev) if cache_batch_idx is None else cache_batch_idx.long())[:, None].expand(B, s_new)
        cols = pos
    k_cache[rows, cols] = k.to(k_cache.dtype)
    v_cache[rows, cols] = v.to(v_cache.dtype)


def _empty_rows(a):
    """Batches with no key: out 0, lse -inf (not in the kernel's tile space)."""
    empty = [b for b, L in enumerate(a["seqlens_k"]) if L == 0]
    if empty:
        idx = torch.tensor(empty, dtype=torch.int64, device=a["out"].device)
        a["out"][idx] = 0
        a["lse"][idx] = -math.inf


def _run_triton(a, q, k_cache, v_cache, block_table, cache_batch_idx):
    from ..scheduling import default_block_n, make_schedule
    from ..triton_kernels.lean_decode import lean_decode_fwd, pick_block_m

    dev = q.device
    # negated views read through a copy with the sign applied (the append already went into the caches)
    q, k_cache, v_cache = _resolved(q), _resolved(k_cache), _resolved(v_cache)
    block_table, cache_batch_idx = _resolved(block_table), _resolved(cache_batch_idx)
    # the kernel indexes block_table's columns and cache_batch_idx with unit stride (a transposed or sliced
    # block_table gave wrong pages, or read past the tensor): small, so copied when needed
    block_table = None if block_table is None else block_table.contiguous()
    cache_batch_idx = None if cache_batch_idx is None else cache_batch_idx.contiguous()
    # the kernel reads head_dim with unit stride (triton_kernels/lean_decode.py): a cache with another last-dim
    # stride (a slice [..., ::2] of a wider buffer) was read as unit-stride rows (garbage out, lse inf); such a
    # cache is read through a copy (the append already went into the caller's cache)
    q, k_cache, v_cache = (check_last_dim_contiguous(n, t) for n, t in (("q", q), ("k_cache", k_cache),
                                                                        ("v_cache", v_cache)))
    group = a["H"] // a["Hk"]
    block_m = pick_block_m(a["Sq"] * group)
    block_n = default_block_n(a["D"])
    n_m = -(-(a["Sq"] * group) // block_m)
    sms = _num_sms(dev)
    sched = make_schedule(a["schedule"], a["seqlens_k"], num_heads_k=a["Hk"], block_n=block_n, num_m_blocks=n_m,
                          num_splits=a["num_splits"], num_ctas=a["num_ctas"],
                          max_ctas=sms if a["reduce"] == "kernel" else 2 * sms, num_sms=sms)
    if a["reduce"] == "kernel" and sched.num_ctas > sms:   # split/single grids can exceed the resident CTAs
        raise ValueError(f"reduce: 'kernel' needs at most {sms} CTAs (one per SM); schedule {a['schedule']!r} "
                         f"has {sched.num_ctas}; use reduce='separate'")
    out = a["out"]
    # the kernel writes memory: a negated out is written through a buffer and copy_ (which applies the sign)
    target = out if out.stride(-1) == 1 and not out.is_neg() else torch.empty(out.shape, dtype=out.dtype, device=dev)
    _empty_rows(dict(a, out=target))
    rot_q = a["rot_q"]
    lean_decode_fwd(q, k_cache, v_cache, target, a["lse"],
                    seqlens_k=torch.tensor(a["seqlens_k"], dtype=torch.int32, device=dev), schedule=sched,
                    sched=sched.as_tensors(dev), block_table=block_table, cache_batch_idx=cache_batch_idx,
                    cache_leftpad=torch.tensor(a["pads"], dtype=torch.int32, device=dev) if any(a["pads"]) else None,
                    rot_cos=None if rot_q is None else rot_q[0].contiguous(),
                    rot_sin=None if rot_q is None else rot_q[1].contiguous(),
                    rotary_dim=a["rotary_dim"], rotary_interleaved=a["interleaved"],
                    alibi_slopes=_resolved(a["alibi"]), softmax_scale=a["scale"], softcap=a["softcap"],
                    window_left=a["left"], window_right=a["right"], block_m=block_m, block_n=block_n,
                    reduce_in_kernel=(a["reduce"] == "kernel"))
    if target is not out:
        out.copy_(target)


def _run_torch(a, q, k_cache, v_cache, block_table, cache_batch_idx):
    """Exact attention per sequence in fp32, over chunks of ``_CHUNK`` keys merged online."""
    B, Sq, H, Hk, D = a["B"], a["Sq"], a["H"], a["Hk"], a["D"]
    g = H // Hk
    dev = q.device
    q32 = q.float()
    if a["rotary_dim"]:
        # rounded to the input dtype like the Triton kernel (and like the rotated k in the cache)
        q32 = _rotate(q32, a["rot_q"][0], a["rot_q"][1], a["interleaved"]).to(q.dtype).float()
    for b in range(B):
        Lk = a["seqlens_k"][b]
        m = torch.full((H, Sq), -math.inf, dtype=torch.float32, device=dev)
        l = torch.zeros(H, Sq, dtype=torch.float32, device=dev)
        acc = torch.zeros(H, Sq, D, dtype=torch.float32, device=dev)
        qpos = torch.arange(Sq, dtype=torch.int64, device=dev)[:, None] + Lk - Sq
        slopes = None
        if a["alibi"] is not None:
            s_ = a["alibi"]
            slopes = (s_[b] if s_.dim() == 2 else s_).float()
        # keys a window leaves visible to some query row: [j_lo, j_hi)
        j_lo = max(0, Lk - Sq - a["left"]) if a["left"] >= 0 else 0
        j_hi = min(Lk, Lk - 1 + a["right"] + 1) if a["right"] >= 0 else Lk
        for j0 in range(j_lo, j_hi, _CHUNK):
            j = torch.arange(j0, min(j_hi, j0 + _CHUNK), dtype=torch.int64, device=dev)   # positions (cache index - left pad)
            if a["paged"]:
                page = k_cache.shape[1]
                blk = block_table[b].long()[j // page]
                kc, vc = k_cache[blk, j % page], v_cache[blk, j % page]
            else:
                cb = b if cache_batch_idx is None else int(cache_batch_idx[b])
                kc, vc = k_cache[cb, j + a["pads"][b]], v_cache[cb, j + a["pads"][b]]
            kc = kc.float().repeat_interleave(g, dim=1)       # (C, H, D)
            vc = vc.float().repeat_interleave(g, dim=1)
            s = torch.einsum("ihd,jhd->hij", q32[b], kc) * a["scale"]
            if a["softcap"] > 0:
                s = a["softcap"] * torch.tanh(s / a["softcap"])
            rel = qpos - j[None, :]
            if slopes is not None:
                s = s - slopes[:, None, None] * rel.abs().float()
            ok = torch.ones_like(rel, dtype=torch.bool)
            if a["right"] >= 0:
                ok &= rel >= -a["right"]
            if a["left"] >= 0:
                ok &= rel <= a["left"]
            s = s.masked_fill(~ok, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m - m_use)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("hij,jhd->hid", p, vc)
            m = m_new
        has = l > 0
        o = torch.where(has[..., None], acc / torch.where(has, l, torch.ones_like(l))[..., None], torch.zeros_like(acc))
        a["out"][b] = o.permute(1, 0, 2).to(a["out"].dtype)
        a["lse"][b] = torch.where(has, m + torch.log(torch.where(has, l, torch.ones_like(l))),
                                  torch.full_like(l, -math.inf))


# ------------------------------------------------------------------------------------------------
# backend "cuda": csrc/lean_decode.cu through posattn._cuda (not yet run on a GPU)
# ------------------------------------------------------------------------------------------------
def _check_cuda_args(q, k_cache, v_cache, softcap, window_size, left, right):
    """What the CUDA C++ kernel cannot do; raised before any write and before any device query."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q: backend='cuda' takes float16 or bfloat16, got {dtype_name(q.dtype)}")
    D = q.shape[-1]
    if D not in _CUDA_HEAD_DIMS:
        raise ValueError(f"q: backend='cuda' supports head_dim 64, 128 or 256, got {D}")
    if softcap > 0:
        raise ValueError(f"softcap: backend='cuda' does not support softcap > 0, got {softcap}; "
                         f"use backend='triton' or 'torch'")
    if left != -1 or right not in (-1, 0):
        raise ValueError(f"window_size: backend='cuda' supports no window (-1, -1) or the causal one (-1, 0), got "
                         f"{tuple(window_size)} (({left}, {right}) with causal); use backend='triton' or 'torch'")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:3]):
            raise ValueError(f"{name}: backend='cuda' needs a unit last-dim stride, 16-byte aligned data and other "
                             f"strides that are multiples of 8 elements, got strides {tuple(t.stride())} and data "
                             f"{t.data_ptr() % 16} bytes past a 16-byte boundary")


def _on_device(dev: torch.device):
    """Make ``dev`` current (the kernel's occupancy query and cooperative launch use the current device)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _cuda_schedule(q, Hk, seqlens_k, schedule, num_splits, num_ctas):
    """The schedule of the CUDA kernel (its tile sizes; grid <= co-resident CTAs), or None if nothing to run."""
    from .. import _cuda
    from ..scheduling import make_schedule

    B, Sq, H, D = q.shape
    if B == 0 or Sq == 0 or H == 0:
        return None
    dt = "float16" if q.dtype == torch.float16 else "bfloat16"
    with _on_device(q.device):
        max_ctas = int(_backends.load_C().lean_decode_max_ctas(D, dt))
    if num_ctas is not None and num_ctas > max_ctas:
        raise ValueError(f"num_ctas: backend='cuda' launches cooperatively, at most {max_ctas} co-resident CTAs "
                         f"(_C.lean_decode_max_ctas({D}, {dt!r})), got {num_ctas}")
    block_m, block_n = _cuda.lean_decode_tile_sizes(D)
    n_m = -(-(Sq * (H // Hk)) // block_m)
    sched = make_schedule(schedule, seqlens_k, num_heads_k=Hk, block_n=block_n, num_m_blocks=n_m,
                          num_splits=num_splits, num_ctas=num_ctas, max_ctas=max_ctas, num_sms=_num_sms(q.device))
    if sched.num_ctas > max_ctas:
        raise ValueError(f"schedule: {schedule!r} needs {sched.num_ctas} CTAs, more than the {max_ctas} that "
                         f"backend='cuda' keeps co-resident; use schedule='lean' (or a smaller num_splits)")
    return sched


def _run_cuda(a, q, k_cache, v_cache, block_table, cache_batch_idx):
    """One launch of ``_cuda.lean_decode_cuda`` (in-kernel reduction); the append already happened."""
    from .. import _cuda

    B, Sq = a["B"], a["Sq"]
    if a["cuda_schedule"] is None:
        return
    dev = q.device
    q, k_cache, v_cache = _resolved(q), _resolved(k_cache), _resolved(v_cache)   # as in _run_triton
    block_table, cache_batch_idx = _resolved(block_table), _resolved(cache_batch_idx)
    seqlens = torch.tensor(a["seqlens_k"], dtype=torch.int64)
    inv_freq = None
    if a["rotary_dim"]:
        # the kernel rotates q at its attention position seqlens_k - seqlen_q + i from inv_freq; FlashAttention's
        # rule may put q elsewhere (and tables/YaRN factors are not inv_freq): then rotate on the host
        kernel_pos = seqlens[:, None] - Sq + torch.arange(Sq, dtype=torch.int64)[None, :]
        if a["rope_inv"] is not None and torch.equal(a["qpos"].expand(B, Sq).to(torch.int64), kernel_pos):
            inv_freq = a["rope_inv"]
        else:
            q = _rotate(q.float(), a["rot_q"][0], a["rot_q"][1], a["interleaved"]).to(q.dtype)
    if cache_batch_idx is not None:
        # cache row cache_batch_idx[b] as the single page (page_block_size = seqlen_cache) of sequence b
        block_table = cache_batch_idx.reshape(B, 1)
    if block_table is not None:
        block_table = block_table.to(torch.int32).contiguous()
    out = a["out"]
    target = out if out.stride(-1) == 1 and not out.is_neg() else torch.empty(out.shape, dtype=out.dtype, device=dev)
    with _on_device(dev):
        _cuda.lean_decode_cuda(q, k_cache, v_cache, seqlens.to(device=dev, dtype=torch.int32), a["cuda_schedule"],
                               softmax_scale=a["scale"], causal=a["right"] == 0, block_table=block_table,
                               alibi_slopes=_resolved(a["alibi"]), inv_freq=inv_freq,
                               rotary_interleaved=a["interleaved"],
                               out=target, lse=a["lse"])
    if target is not out:
        out.copy_(target)


register("kvcache_decode", "posattn.ops.decode", _BACKENDS)   # "cuda" last and never chosen by "auto"
