"""Thin wrappers over the CUDA C++ launchers of ``posattn._C`` (csrc/), for the ops' CUDA backend.

Each wrapper takes torch tensors, fills the op's params struct (pointers from ``data_ptr()``,
sizes, int64 strides in elements) and launches on the current CUDA stream of the tensors' device.
They only compute: the public ops (``posattn.ops.*``) validate shapes and dtypes first, with
``_checks``; here we check only what would make a kernel read or write out of bounds (device,
dtype, rank, unit last-dim stride) and raise.

Errors
------
RuntimeError
    ``posattn._C`` is not built, no CUDA device is present ("no CUDA device"), a tensor is not on
    CUDA, or a launch failed (the message names the kernel; unsupported dtype/head_dim messages
    list what is compiled).

Not yet run on a GPU: these wrappers and kernels compile for sm_80/sm_90a and their host-side
logic is tested here, but their numerics are checked only by tests/test_cuda_kernels.py on a GPU.
"""
from __future__ import annotations

import math
import threading
from typing import Mapping

import torch

__all__ = ["apply_rotary_cuda", "unpad_index_cuda", "gather_rows_cuda", "scatter_rows_cuda",
           "varlen_attention_fwd_cuda", "lean_decode_cuda", "lean_decode_tile_sizes", "LeanWorkspace",
           "ecoformer_pairwise_cuda", "ecoformer_linear_cuda", "pack_sign_bits"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _C():
    from ._backends import load_C
    mod = load_C()
    if mod is None:
        raise RuntimeError("posattn._C is not built: install with nvcc available (pip install -e .), "
                           "or on a GPU machine with nvcc it is built on first use")
    return mod


def _prepare(op: str, **tensors):
    """The module, after checking that a device exists and every given tensor is on CUDA."""
    C = _C()
    if not torch.cuda.is_available() or C.device_count() == 0:
        raise RuntimeError(f"{op}: no CUDA device; the posattn._C kernels need a GPU")
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.device.type != "cuda"):
            where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"{op}: {name} must be a CUDA tensor, got {where}")
    return C


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _dtype(op: str, name: str, t: torch.Tensor, allowed=tuple(_DTYPES)) -> str:
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} dtype {t.dtype} not supported; compiled: "
                        f"{', '.join(_DTYPES[d] for d in allowed)}")
    return _DTYPES[t.dtype]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_unit_last(op: str, name: str, t) -> None:
    """A tensor the kernel writes (out, lse): given strides for every dim but the last, which must be 1."""
    if t is not None and t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{op}: {name} must have a unit stride in its last dim (the kernel writes rows), got "
                         f"strides {tuple(t.stride())}")


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _params(cls, **fields):
    p = cls()
    for k, v in fields.items():
        setattr(p, k, v)
    return p


# ---- apply_rotary -------------------------------------------------------------------------------

def apply_rotary_cuda(x, cos, sin, *, interleaved=False, conj=False, position_ids=None, seqlen_offsets=None,
                      out=None):
    """Rotate the first ``rotary_dim`` dims of every head (RoPE, Su et al. arXiv 2104.09864).

    Parameters
    ----------
    x : Tensor (batch, seqlen, num_heads, head_dim), float16/bfloat16/float32, CUDA
        Any strides with a unit last-dim stride (else copied once).
    cos, sin : Tensor (seqlen_ro, rotary_dim // 2)
        Tables indexed by position; converted once to float32 when given in another dtype
        (angles are never evaluated in half precision in the kernel).
    interleaved : bool, default False
        True: pairs (2i, 2i+1) (GPT-J); False: (i, i + rotary_dim/2) (GPT-NeoX/Llama).
    conj : bool, default False
        Rotate by minus the angle: the backward of the forward rotation.
    position_ids : int Tensor (batch or 1, seqlen) or None
        Row of cos/sin per token. None: ``s + seqlen_offsets[b]``. Positions outside
        [0, seqlen_ro) are left unrotated (FlashAttention's kernel does the same).
    seqlen_offsets : int Tensor (batch,) or None (0)
        Per-sequence offset (decode: the cache length), used when position_ids is None.
    out : Tensor like x or None
        Output buffer; may be ``x`` itself (in place). None: a new tensor.

    Returns
    -------
    Tensor: ``out`` (same shape and dtype as x); dims [rotary_dim, head_dim) are copied unchanged.

    Raises
    ------
    RuntimeError: no GPU / not built / launch error. TypeError: unsupported dtype.

    Examples
    --------
    >>> x = torch.randn(1, 4, 2, 8, device="cuda")                    # doctest: +SKIP
    >>> ang = torch.arange(4.)[:, None] * torch.ones(4)              # doctest: +SKIP
    >>> y = apply_rotary_cuda(x, ang.cos().cuda(), ang.sin().cuda())  # doctest: +SKIP
    """
    C = _prepare("apply_rotary_cuda", x=x, cos=cos, sin=sin, position_ids=position_ids,
                 seqlen_offsets=seqlen_offsets, out=out)
    if x.dim() != 4:
        raise ValueError(f"apply_rotary_cuda: x must be (batch, seqlen, num_heads, head_dim), got {tuple(x.shape)}")
    dt = _dtype("apply_rotary_cuda", "x", x)
    in_place = out is not None and out.data_ptr() == x.data_ptr()
    if x.stride(-1) != 1:
        if in_place:
            raise ValueError("apply_rotary_cuda: in-place rotation needs a unit last-dim stride")
        x = x.contiguous()
    cos = _unit_last(cos.to(torch.float32))
    sin = _unit_last(sin.to(torch.float32))
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError(f"apply_rotary_cuda: cos/sin must both be (seqlen_ro, rotary_dim // 2), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError("apply_rotary_cuda: out must have x's shape and dtype and a unit last-dim stride")
    B, S, H, D = x.shape
    pos_b = pos_s = 0
    if position_ids is not None:
        position_ids = position_ids.to(torch.int32)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.shape[-1] != S or position_ids.shape[0] not in (1, B):
            raise ValueError(f"apply_rotary_cuda: position_ids must be (batch or 1, seqlen={S}), got "
                             f"{tuple(position_ids.shape)}")
        pos_b = position_ids.stride(0) if position_ids.shape[0] == B else 0
        pos_s = position_ids.stride(1)
    if seqlen_offsets is not None:
        seqlen_offsets = seqlen_offsets.to(torch.int32).contiguous()
    p = _params(C.RotaryParams, x=x.data_ptr(), out=out.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
                position_ids=_ptr(position_ids), seqlen_offsets=_ptr(seqlen_offsets),
                x_stride_b=x.stride(0), x_stride_s=x.stride(1), x_stride_h=x.stride(2),
                out_stride_b=out.stride(0), out_stride_s=out.stride(1), out_stride_h=out.stride(2),
                cos_stride_s=cos.stride(0), sin_stride_s=sin.stride(0), pos_stride_b=pos_b, pos_stride_s=pos_s,
                batch_size=B, seqlen=S, num_heads=H, head_dim=D, rotary_dim=2 * cos.shape[1],
                seqlen_ro=cos.shape[0], interleaved=bool(interleaved), conj=bool(conj), dtype=dt)
    C.rotary(p, _stream(x))
    return out


# ---- unpad / pad --------------------------------------------------------------------------------

def unpad_index_cuda(mask):
    """Packed-row indices and cu_seqlens of a (batch, seqlen) validity mask, in one kernel
    (ByteTransformer's index build, arXiv 2210.03052; docs/ALGORITHMS.md 2).

    Parameters
    ----------
    mask : Tensor (batch, seqlen), bool or integer (nonzero = valid), CUDA. Holes are allowed:
        the indices are exactly the positions where the mask is true, row-major.

    Returns
    -------
    indices : int64 (total,) flat positions ``b * seqlen + s`` of the valid tokens
    cu_seqlens : int32 (batch + 1,) exclusive prefix sum of the per-sequence counts
    seqlens : int32 (batch,)
    max_seqlen : int (host)
    total : int (host)  -- reading it synchronises with the device once (like flash_attn's unpad)
    """
    C = _prepare("unpad_index_cuda", mask=mask)
    if mask.dim() != 2:
        raise ValueError(f"unpad_index_cuda: mask must be (batch, seqlen), got {tuple(mask.shape)}")
    m = (mask != 0).to(torch.uint8)
    B, S = m.shape
    seqlens = torch.empty(B, dtype=torch.int32, device=mask.device)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    idx = torch.empty(max(B * S, 1), dtype=torch.int64, device=mask.device)
    p = _params(C.UnpadIndexParams, mask=m.data_ptr(), seqlens=seqlens.data_ptr(), cu_seqlens=cu.data_ptr(),
                indices=idx.data_ptr(), mask_stride_b=m.stride(0), mask_stride_s=m.stride(1), batch_size=B, seqlen=S)
    C.unpad_index(p, _stream(m))
    total = int(cu[-1]) if B else 0
    max_seqlen = int(seqlens.max()) if B else 0
    return idx[:total], cu, seqlens, max_seqlen, total


def _rows(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """t viewed as (rows, *inner) with a dense inner part (copied once otherwise)."""
    if t.dim() < 1:
        raise ValueError(f"{op}: {name} must have a leading row dimension")
    inner = t[0] if t.shape[0] > 0 else t.new_empty(t.shape[1:])
    if not inner.is_contiguous():
        t = t.contiguous()
    return t


def gather_rows_cuda(x, indices, *, out=None):
    """Pack: ``out[t] = x[indices[t]]`` for whole rows (unpad forward, pad backward).

    Parameters
    ----------
    x : Tensor (rows, *inner), any dtype, CUDA; inner dims dense (else copied once).
        For (batch, seqlen, ...) inputs pass ``x.flatten(0, 1)``.
    indices : int64 Tensor (total,) in [0, rows) (not checked on the device: out-of-range reads fault)
    out : Tensor (total, *inner) or None

    Returns
    -------
    Tensor (total, *inner). 16-byte copies when pointers and row sizes allow.
    """
    C = _prepare("gather_rows_cuda", x=x, indices=indices, out=out)
    x = _rows("gather_rows_cuda", "x", x)
    indices = indices.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty((indices.numel(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    row_bytes = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
    p = _params(C.RowCopyParams, src=x.data_ptr(), dst=out.data_ptr(), indices=indices.data_ptr(),
                src_row_stride_bytes=x.stride(0) * x.element_size(), dst_row_stride_bytes=out.stride(0) * out.element_size(),
                row_bytes=row_bytes, num_rows=indices.numel(), scatter=False)
    C.row_copy(p, _stream(x))
    return out


def scatter_rows_cuda(src, indices, *, num_rows=None, out=None):
    """Pad / unpad backward: ``out[indices[t]] = src[t]``; rows not indexed keep their value
    (zeros when ``out`` is None).

    Parameters
    ----------
    src : Tensor (total, *inner), CUDA; inner dims dense (else copied once)
    indices : int64 Tensor (total,), distinct values in [0, num_rows)
    num_rows : int, needed when out is None (``batch * seqlen`` for a pad)
    out : Tensor (num_rows, *inner) or None

    Returns
    -------
    Tensor (num_rows, *inner)
    """
    C = _prepare("scatter_rows_cuda", src=src, indices=indices, out=out)
    src = _rows("scatter_rows_cuda", "src", src)
    indices = indices.to(torch.int64).contiguous()
    if out is None:
        if num_rows is None:
            raise ValueError("scatter_rows_cuda: give num_rows or out")
        out = torch.zeros((num_rows, *src.shape[1:]), dtype=src.dtype, device=src.device)
    row_bytes = src[0].numel() * src.element_size() if src.dim() > 1 and src.shape[0] else src.element_size()
    p = _params(C.RowCopyParams, src=src.data_ptr(), dst=out.data_ptr(), indices=indices.data_ptr(),
                src_row_stride_bytes=src.stride(0) * src.element_size(),
                dst_row_stride_bytes=out.stride(0) * out.element_size(),
                row_bytes=row_bytes, num_rows=indices.numel(), scatter=True)
    C.row_copy(p, _stream(src))
    return out


# ---- short-sequence varlen attention ----------------------------------------------------------------

BIAS_MODES = {"none": 0, "alibi": 1, "relative": 2, "t5": 3}


def varlen_attention_fwd_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                              softmax_scale=None, causal=False, alibi_slopes=None, bias_mode=0, bias_table=None,
                              max_distance=0, num_buckets=32, bidirectional=True, out=None, lse=None):
    """Padding-free attention forward for short sequences (whole K/V of a sequence in shared memory;
    ByteTransformer's fused "long" variant, arXiv 2210.03052, simplified to CUDA-core math).

    Parameters
    ----------
    q : (total_q, num_heads, head_dim) float16/bfloat16, CUDA; head_dim 64 or 128; unit last stride
    k, v : (total_k, num_heads_k, head_dim); num_heads % num_heads_k == 0 (GQA: head h reads h // group)
    cu_seqlens_q, cu_seqlens_k : int32 (batch + 1,)
    max_seqlen_q, max_seqlen_k : host ints, at least every sequence's length (shared memory is sized
        by max_seqlen_k: about max_seqlen_k * head_dim * 4 bytes; too long -> RuntimeError naming the
        limit; a sequence longer than max_seqlen_k gets NaN output, never a silent read past the buffer)
    softmax_scale : float, default head_dim ** -0.5
    causal : bool -- bottom-right aligned (FlashAttention): key j visible to query i iff j <= i + len_k - len_q
    alibi_slopes, bias_mode, bias_table, max_distance, num_buckets, bidirectional :
        the additive bias of ``positional.kernel_args`` (bias_mode 0 none, 1 ALiBi with
        alibi_slopes fp32 (num_heads,) or (batch, num_heads), 2 RelativeBias table (num_heads, 2D+1),
        3 T5 table (num_buckets, num_heads)); positions restart at 0 in every sequence, query i at
        ``i + len_k - len_q``.
    out : (total_q, num_heads, head_dim) or None;  lse : fp32 (num_heads, total_q) or None

    Returns
    -------
    (out, lse): lse natural log; fully masked rows give out 0, lse -inf.
    """
    C = _prepare("varlen_attention_fwd_cuda", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 alibi_slopes=alibi_slopes, bias_table=bias_table, out=out, lse=lse)
    dt = _dtype("varlen_attention_fwd_cuda", "q", q, (torch.float16, torch.bfloat16))
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    # read by pointer with unit stride (a strided view made the Triton path read past the tensor: f4736b3)
    cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_seqlens_k = cu_seqlens_k.to(torch.int32).contiguous()
    _check_unit_last("varlen_attention_fwd_cuda", "out", out)
    _check_unit_last("varlen_attention_fwd_cuda", "lse", lse)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(0) % 2 or t.stride(1) % 2 or t.data_ptr() % 4:
            t = t.contiguous()  # the kernel moves 32-bit words (2 elements)
        if name == "q": q = t
        elif name == "k": k = t
        else: v = t
    total_q, H, D = q.shape
    Hk = k.shape[1]
    B = cu_seqlens_q.numel() - 1
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    if isinstance(bias_mode, str):
        bias_mode = BIAS_MODES[bias_mode]
    a_stride = 0
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32)
        if alibi_slopes.dim() == 1:
            alibi_slopes = alibi_slopes[None]
        alibi_slopes = alibi_slopes.contiguous()
        a_stride = alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0
    if bias_table is not None:
        bias_table = bias_table.to(torch.float32)
    p = _params(C.VarlenAttnParams, q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
                lse=lse.data_ptr(), cu_seqlens_q=cu_seqlens_q.data_ptr(), cu_seqlens_k=cu_seqlens_k.data_ptr(),
                alibi_slopes=_ptr(alibi_slopes), bias_table=_ptr(bias_table),
                q_stride_t=q.stride(0), q_stride_h=q.stride(1), k_stride_t=k.stride(0), k_stride_h=k.stride(1),
                v_stride_t=v.stride(0), v_stride_h=v.stride(1), out_stride_t=out.stride(0), out_stride_h=out.stride(1),
                lse_stride_h=lse.stride(0), alibi_stride_b=a_stride,
                bias_stride_0=bias_table.stride(0) if bias_table is not None else 0,
                bias_stride_1=bias_table.stride(1) if bias_table is not None else 0,
                batch_size=B, num_heads=H, num_heads_k=Hk, head_dim=D, max_seqlen_q=int(max_seqlen_q),
                max_seqlen_k=int(max_seqlen_k),
                softmax_scale=float(softmax_scale if softmax_scale is not None else D ** -0.5),
                causal=bool(causal), bias_mode=int(bias_mode), max_distance=int(max_distance),
                num_buckets=int(num_buckets), bidirectional=bool(bidirectional), dtype=dt)
    C.varlen_attention_fwd(p, _stream(q))
    return out, lse


# ---- LeanAttention decode ----------------------------------------------------------------------

def lean_decode_tile_sizes(head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) of the CUDA decode kernel: 16 packed query rows, and 128 keys for
    head_dim <= 128 else 64 (= ``posattn.scheduling.default_block_n``). Needs no GPU."""
    return tuple(_C().lean_decode_tile_sizes(int(head_dim)))


class LeanWorkspace:
    """fp32 partial-state buffers and epoch flags of the decode kernel, reused across calls.

    The flags are zeroed once at allocation; each call bumps ``epoch`` (never 0), and a partial is
    ready when its flag equals the call's epoch, so no memset per call. One workspace per stream:
    two kernels in flight on different streams must not share one.
    """

    def __init__(self, device, num_ctas: int, head_dim: int, block_m: int = 16):
        self.device = torch.device(device)
        self.num_ctas, self.head_dim, self.block_m = num_ctas, head_dim, block_m
        self.m = torch.empty((num_ctas, block_m), dtype=torch.float32, device=self.device)
        self.l = torch.empty_like(self.m)
        self.o = torch.empty((num_ctas, block_m, head_dim), dtype=torch.float32, device=self.device)
        self.flags = torch.zeros(num_ctas, dtype=torch.int32, device=self.device)
        self.epoch = 0

    def fits(self, num_ctas: int, head_dim: int) -> bool:
        return num_ctas <= self.num_ctas and head_dim <= self.head_dim

    def next_epoch(self) -> int:
        self.epoch = self.epoch % 0xFFFFFFFF + 1  # 1 .. 2^32 - 1, wraps without hitting 0
        return self.epoch


_workspaces: dict = {}
_ws_lock = threading.Lock()


def _workspace(device, stream: int, num_ctas: int, head_dim: int) -> LeanWorkspace:
    key = (str(device), stream)
    with _ws_lock:
        ws = _workspaces.get(key)
        if ws is None or not ws.fits(num_ctas, head_dim):
            # a new buffer's flags are zero; reuse after a grow is safe because epochs keep rising
            ws = LeanWorkspace(device, max(num_ctas, ws.num_ctas if ws else 0), max(head_dim, ws.head_dim if ws else 0))
            _workspaces[key] = ws
        return ws


_SCHEDULE_FIELDS = ("cta_starts", "tile_offsets", "tile_batch", "tile_head", "tile_mblock", "host_cta", "num_splits")


def _schedule_tensors(schedule, device) -> dict:
    if hasattr(schedule, "as_tensors"):
        arrays = schedule.as_tensors(device)
    elif isinstance(schedule, Mapping):
        arrays = dict(schedule)
    else:
        raise TypeError(f"schedule: expected a posattn.scheduling.Schedule or a mapping of int32 tensors, "
                        f"got {type(schedule).__name__}")
    missing = [n for n in _SCHEDULE_FIELDS if n not in arrays]
    if missing:
        raise ValueError(f"schedule: missing arrays {missing}")
    return {n: torch.as_tensor(arrays[n]).to(device=device, dtype=torch.int32).contiguous() for n in _SCHEDULE_FIELDS}


def lean_decode_cuda(q, k_cache, v_cache, seqlens_k, schedule, *, softmax_scale=None, causal=False, block_table=None,
                     alibi_slopes=None, inv_freq=None, rotary_interleaved=False, out=None, lse=None, workspace=None):
    """LeanAttention stream-K decode (Sanovar et al., arXiv 2405.10480; docs/ALGORITHMS.md 1).

    Parameters
    ----------
    q : (batch, seqlen_q, num_heads, head_dim) float16/bfloat16, CUDA; head_dim 64, 128 or 256
    k_cache, v_cache : (batch, seqlen_cache, num_heads_k, head_dim), or with ``block_table`` paged
        (num_blocks, page_block_size, num_heads_k, head_dim); 16-byte aligned, strides multiples of 8
        elements (else RuntimeError). Keys are already rotated (RoPE) when a rotary encoding is used.
    seqlens_k : int32 (batch,) keys attended per sequence, after any append; query row i of sequence b
        sits at position ``seqlens_k[b] - seqlen_q + i`` (bottom-right; for one new token appended at
        ``cache_seqlens[b]``, that is its position ``cache_seqlens[b]``).
    schedule : ``posattn.scheduling.Schedule`` (built with ``block_n = lean_decode_tile_sizes(head_dim)[1]``
        and ``num_m_blocks = ceil(seqlen_q * num_heads // num_heads_k / 16)``) or a mapping of int32
        tensors with its array names (cta_starts, tile_offsets, tile_batch, tile_head, tile_mblock,
        host_cta, num_splits). ``num_ctas`` must not exceed ``_C.lean_decode_max_ctas(head_dim, dtype)``
        (the launch is cooperative and fails cleanly otherwise).
    softmax_scale : float, default head_dim ** -0.5
    causal : bool -- only matters for seqlen_q > 1 (key j visible iff j <= position of the query)
    block_table : int32 (batch, max_blocks) or None
    alibi_slopes : fp32 (num_heads,) or (batch, num_heads) or None -- bias -slope * |pk - pq|
    inv_freq : fp32 (rotary_dim // 2,) or None -- RoPE applied to q at its position, angle
        ``float(pos) * inv_freq`` in fp32; ``rotary_interleaved`` picks the layout.
    out : like q or None; lse : fp32 (batch, num_heads, seqlen_q) or None
    workspace : LeanWorkspace or None (one cached per device and stream)

    Returns
    -------
    (out, lse): natural-log lse; a sequence with no key gives out 0 and lse -inf.
    """
    C = _prepare("lean_decode_cuda", q=q, k_cache=k_cache, v_cache=v_cache, seqlens_k=seqlens_k,
                 block_table=block_table, alibi_slopes=alibi_slopes, inv_freq=inv_freq, out=out, lse=lse)
    dt = _dtype("lean_decode_cuda", "q", q, (torch.float16, torch.bfloat16))
    # the kernel takes strides for every dim but the last (head_dim: unit stride); a cache sliced in head_dim
    # is read through a contiguous copy (posattn's Triton decode got such a cache wrong: 63a01cc)
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    _check_unit_last("lean_decode_cuda", "out", out)
    _check_unit_last("lean_decode_cuda", "lse", lse)
    B, N, H, D = q.shape
    Hk = k_cache.shape[2]
    sched = _schedule_tensors(schedule, q.device)
    G = sched["cta_starts"].numel() - 1
    U = sched["tile_offsets"].numel() - 1
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    stream = _stream(q)
    ws = workspace if workspace is not None else _workspace(q.device, stream, G, D)
    if not ws.fits(G, D):
        raise ValueError(f"lean_decode_cuda: workspace holds {ws.num_ctas} CTAs x head_dim {ws.head_dim}, "
                         f"need {G} x {D}")
    seqlens_k = seqlens_k.to(torch.int32).contiguous()
    a_stride = 0
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32)
        alibi_slopes = (alibi_slopes[None] if alibi_slopes.dim() == 1 else alibi_slopes).contiguous()
        a_stride = alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0
    rotary_dim = 0
    if inv_freq is not None:
        inv_freq = inv_freq.to(torch.float32).contiguous()
        rotary_dim = 2 * inv_freq.numel()
    bt_stride, page = 0, 0
    if block_table is not None:
        block_table = _unit_last(block_table.to(torch.int32))   # row stride given, entries contiguous
        bt_stride, page = block_table.stride(0), k_cache.shape[1]
    p = _params(C.DecodeParams, q=q.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
                out=out.data_ptr(), lse=lse.data_ptr(), seqlens_k=seqlens_k.data_ptr(), block_table=_ptr(block_table),
                alibi_slopes=_ptr(alibi_slopes), inv_freq=_ptr(inv_freq),
                **{n: sched[n].data_ptr() for n in _SCHEDULE_FIELDS},
                ws_m=ws.m.data_ptr(), ws_l=ws.l.data_ptr(), ws_o=ws.o.data_ptr(), flags=ws.flags.data_ptr(),
                epoch=ws.next_epoch(),
                q_stride_b=q.stride(0), q_stride_s=q.stride(1), q_stride_h=q.stride(2),
                k_stride_b=k_cache.stride(0), k_stride_s=k_cache.stride(1), k_stride_h=k_cache.stride(2),
                v_stride_b=v_cache.stride(0), v_stride_s=v_cache.stride(1), v_stride_h=v_cache.stride(2),
                out_stride_b=out.stride(0), out_stride_s=out.stride(1), out_stride_h=out.stride(2),
                lse_stride_b=lse.stride(0), lse_stride_h=lse.stride(1), block_table_stride_b=bt_stride,
                alibi_stride_b=a_stride, batch_size=B, seqlen_q=N, num_heads=H, num_heads_k=Hk, head_dim=D,
                page_block_size=page, num_ctas=G, num_out_tiles=U, rotary_dim=rotary_dim,
                rotary_interleaved=bool(rotary_interleaved),
                softmax_scale=float(softmax_scale if softmax_scale is not None else D ** -0.5),
                causal=bool(causal), dtype=dt)
    C.lean_decode(p, stream)
    return out, lse


# ---- EcoFormer ------------------------------------------------------------------------------------

def pack_sign_bits(h: torch.Tensor) -> torch.Tensor:
    """Pack +-1 codes (..., nbits) into int32 words (..., ceil(nbits / 32)), LSB first:
    bit k of word w is set iff ``h[..., 32 w + k] > 0`` (a 0 code entry packs as -1).

    >>> pack_sign_bits(torch.tensor([[1., -1., 1.]]))
    tensor([[5]], dtype=torch.int32)
    """
    nbits = h.shape[-1]
    words = (nbits + 31) // 32
    bits = (h > 0).to(torch.int64)
    pad = words * 32 - nbits
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*h.shape[:-1], words, 32)
    weights = torch.tensor([1 << k for k in range(32)], dtype=torch.int64, device=h.device)
    packed = (bits * weights).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def _eco(op, q_codes, k_codes, v, nbits, kv_lens, out, repo_form, linear):
    C = _prepare(op, q_codes=q_codes, k_codes=k_codes, v=v, kv_lens=kv_lens, out=out)
    dt = _dtype(op, "v", v)
    if q_codes.dtype != torch.int32 or k_codes.dtype != torch.int32:
        raise TypeError(f"{op}: q_codes/k_codes must be int32 packed words (see pack_sign_bits)")
    B, H, Nq, W = q_codes.shape
    Nk, Dv = v.shape[2], v.shape[3]
    if not 1 <= nbits <= 64 or W != (nbits + 31) // 32 or k_codes.shape[-1] != W:
        raise ValueError(f"{op}: nbits must be in [1, 64] with ceil(nbits/32)={W} words per code, got nbits={nbits}")
    qc = q_codes.reshape(B * H, Nq, W)
    kc = k_codes.reshape(B * H, Nk, W)
    qc, kc = _unit_last(qc), _unit_last(kc)
    vv = _unit_last(v.reshape(B * H, Nk, Dv))
    if out is None:
        out = torch.empty((B, H, Nq, Dv), dtype=v.dtype, device=v.device)
    _check_unit_last(op, "out", out)
    o = out.view(B * H, Nq, Dv)
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32).contiguous()
    ws_m = ws_s = None
    if linear:
        ws_m = torch.empty((B * H, nbits, Dv + 1), dtype=torch.float32, device=v.device)
        ws_s = torch.empty((B * H, Dv + 1), dtype=torch.float32, device=v.device)
    p = _params(C.EcoParams, q_codes=qc.data_ptr(), k_codes=kc.data_ptr(), v=vv.data_ptr(), out=o.data_ptr(),
                kv_lens=_ptr(kv_lens), ws_m=_ptr(ws_m), ws_s=_ptr(ws_s),
                q_stride_bh=qc.stride(0), q_stride_s=qc.stride(1), k_stride_bh=kc.stride(0), k_stride_s=kc.stride(1),
                v_stride_bh=vv.stride(0), v_stride_s=vv.stride(1), out_stride_bh=o.stride(0), out_stride_s=o.stride(1),
                batch_heads=B * H, num_heads=H, seqlen_q=Nq, seqlen_k=Nk, head_dim_v=Dv, nbits=int(nbits),
                repo_form=bool(repo_form), dtype=dt)
    (C.ecoformer_linear if linear else C.ecoformer_pairwise)(p, _stream(v))
    return out


def ecoformer_pairwise_cuda(q_codes, k_codes, v, *, nbits, kv_lens=None, out=None):
    """EcoFormer attention, quadratic form on packed bits (Liu et al., arXiv 2209.09004; docs/ALGORITHMS.md 4):
    ``out_i = sum_j w_ij v_j / sum_j w_ij`` with ``w_ij = (nbits - 2 popc(h_i ^ h_j)) + nbits + 1``.

    Parameters
    ----------
    q_codes : int32 (batch, heads, seqlen_q, ceil(nbits/32)) packed codes (``pack_sign_bits``), CUDA
    k_codes : int32 (batch, heads, seqlen_k, ceil(nbits/32))
    v : (batch, heads, seqlen_k, head_dim_v) float16/bfloat16/float32, head_dim_v <= 256
    nbits : int in [1, 64]
    kv_lens : int32 (batch,) or None -- keys j >= kv_lens[b] are padding (excluded from sums)
    out : (batch, heads, seqlen_q, head_dim_v) contiguous, or None

    Returns
    -------
    Tensor (batch, heads, seqlen_q, head_dim_v), v's dtype; fp32 accumulation.
    """
    return _eco("ecoformer_pairwise_cuda", q_codes, k_codes, v, nbits, kv_lens, out, False, False)


def ecoformer_linear_cuda(q_codes, k_codes, v, *, nbits, kv_lens=None, repo_form=False, out=None):
    """EcoFormer attention, linear form by sign-selected accumulation (docs/ALGORITHMS.md 4):
    ``M = sum_j h_j v_j^T = 2 sum_{bit=1} v_j - sum_j v_j``, ``z = sum_j h_j``,
    ``out_i = [h_i^T M + (b+1) S] / [h_i^T z + N (b+1)]`` with ``S = sum_j v_j`` (consistent form,
    equal to the pairwise form) or ``S = v_i`` when ``repo_form=True`` (ziplab/EcoFormer's code;
    needs seqlen_q == seqlen_k). Arguments as :func:`ecoformer_pairwise_cuda`.
    """
    return _eco("ecoformer_linear_cuda", q_codes, k_codes, v, nbits, kv_lens, out, repo_form, True)
