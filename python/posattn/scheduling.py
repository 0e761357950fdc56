"""Host-side work partition for KV-cache decode: LeanAttention stream-K, FlashDecoding split-KV,
and one block per head, all in one format so one kernel runs all three.

Source: LeanAttention (Sanovar et al., arXiv 2405.10480), docs/ALGORITHMS.md section 1; the split
heuristic follows the rule FlashAttention 2.x describes for ``num_splits=0`` (wave efficiency).
Pure Python, deterministic (same inputs -> same arrays), no torch needed except in
:meth:`Schedule.as_tensors`.

The tile space
--------------
An *output tile* ``u`` is one ``(batch b, kv head h_kv, m-block)``: ``BLOCK_M`` query rows (the
``seqlen_q x group`` query rows of one KV head packed together, so each K/V tile is read once for
the whole GQA group). Its *KV tiles* are the ``ceil(seqlen_k[b] / BLOCK_N)`` blocks of keys.
Global KV-tile ids run in the order (b, h_kv, m-block, n-tile), n fastest; output tiles with no
key (``seqlen_k[b] == 0``) are left out of the tile space (the caller writes out = 0,
lse = -inf for them). ``T`` is the number of KV tiles, ``U`` the number of output tiles.

Schedule arrays (the format the Triton and CUDA C++ kernels read; all int32, 1-D)
--------------------------------------------------------------------------------
=================  ==========  ==========================================================
name               length      meaning
=================  ==========  ==========================================================
tile_offsets       U + 1       output tile u owns global KV tiles
                               ``[tile_offsets[u], tile_offsets[u+1])``; tile_offsets[0] = 0,
                               tile_offsets[U] = T; strictly increasing.
tile_batch         U           batch index b of output tile u
tile_head          U           kv head h_kv of output tile u
tile_mblock        U           m-block of output tile u
cta_starts         G + 1       CTA c processes global KV tiles
                               ``[cta_starts[c], cta_starts[c+1])`` in increasing order;
                               cta_starts[0] = 0, cta_starts[G] = T; non-decreasing (a CTA
                               may be empty when G > T).
cta_first_tile     G           the output tile containing ``cta_starts[c]`` (U when empty)
host_cta           U           the CTA that processes tile_offsets[u] (the "host"): it
                               owns u's first KV tile; unique per u.
num_splits         U           how many CTAs touch u (>= 1); they are the consecutive
                               CTAs ``host_cta[u] .. host_cta[u] + num_splits[u] - 1``.
slot_offsets       U + 1       partial-state slots of u are
                               ``[slot_offsets[u], slot_offsets[u+1])``, one per CTA in
                               CTA order (slot ``slot_offsets[u] + (c - host_cta[u])``);
                               ``num_splits[u] == 1`` -> no slot (the CTA writes ``out``).
split_tiles        V           the output tiles with num_splits > 1, increasing
=================  ==========  ==========================================================

Kernel contract (both kernels): a CTA walks its range; the part of it inside output tile u
is one *segment*. A segment covering all of u writes ``out``/``lse`` directly. Otherwise it
writes its fp32 partial ``(m, l, acc)`` (``m`` in log2 units, ``acc`` unnormalised) to its
slot. The host (or a separate reduction pass) merges the slots of u *in slot order* with the
online-softmax merge and writes ``out``/``lse``; the fixed order makes the result deterministic
for a given schedule. Deadlock freedom of the in-kernel host wait (docs/ALGORITHMS.md 1a): a CTA can
be a non-host only in its first segment, so the peers a host waits for never wait themselves;
all G CTAs must be resident at once (G <= SMs x occupancy).

Example
-------
>>> s = lean_schedule([300, 0, 5], num_heads_k=2, block_n=128, num_ctas=4)
>>> s.num_tiles, s.num_output_tiles, s.loads()
(8, 4, [2, 2, 2, 2])
>>> s.tile_offsets, s.cta_starts, s.host_cta, s.num_splits
([0, 3, 6, 7, 8], [0, 2, 4, 6, 8], [0, 1, 3, 3], [2, 2, 1, 1])
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
from typing import Sequence

__all__ = ["Schedule", "lean_schedule", "split_schedule", "single_schedule", "make_schedule",
           "split_heuristic", "default_block_n", "MAX_SPLITS", "MAX_TILES", "MAX_CTAS"]

#: upper bound on the number of CTAs sharing one output tile (ORT's kMaxSplits); the lean
#: scheduler raises the grid's tiles-per-CTA when needed to keep every tile under it.
MAX_SPLITS = 128

#: upper bound on the KV tiles of one schedule (all sequences, heads and m-blocks): the host work and the
#: schedule arrays are linear in it, so a larger tile space raises ValueError instead of running for minutes
#: (2**26 tiles of 16 keys is 1G keys per head; of 128 keys, 8G).
MAX_TILES = 2 ** 26

#: upper bound on an explicit grid size ``num_ctas`` (the arrays are linear in it; a real grid is at most
#: SMs x CTAs per SM, a few thousand). CTAs beyond the number of tiles get no work (empty ranges).
MAX_CTAS = 2 ** 16


def default_block_n(head_dim: int) -> int:
    """KV tile length used by the decode kernels: 128 for head_dim <= 128, else 64 (docs/ALGORITHMS.md 1a,
    ORT's table; 256 for d <= 64 in ORT is not used here to keep the register tile small)."""
    return 128 if head_dim <= 128 else 64


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A partition of the decode tile space over ``num_ctas`` CTAs (see the module docstring)."""
    kind: str
    num_ctas: int
    tile_offsets: list
    tile_batch: list
    tile_head: list
    tile_mblock: list
    cta_starts: list
    cta_first_tile: list
    host_cta: list
    num_splits: list
    slot_offsets: list
    split_tiles: list

    @property
    def num_tiles(self) -> int:
        return self.tile_offsets[-1]

    @property
    def num_output_tiles(self) -> int:
        return len(self.tile_offsets) - 1

    @property
    def num_slots(self) -> int:
        return self.slot_offsets[-1]

    @property
    def max_splits(self) -> int:
        return max(self.num_splits, default=0)

    def loads(self) -> list:
        """KV tiles per CTA."""
        return [self.cta_starts[c + 1] - self.cta_starts[c] for c in range(self.num_ctas)]

    def as_tensors(self, device) -> dict:
        """The arrays as int32 tensors on ``device`` (names as in the module docstring)."""
        import torch
        names = ("tile_offsets", "tile_batch", "tile_head", "tile_mblock", "cta_starts", "cta_first_tile",
                 "host_cta", "num_splits", "slot_offsets", "split_tiles")
        return {n: torch.tensor(getattr(self, n), dtype=torch.int32, device=device) for n in names}


def _tile_space(seqlens_k: Sequence[int], num_heads_k: int, num_m_blocks: int, block_n: int):
    offsets, tb, th, tm = [0], [], [], []
    for b, L in enumerate(seqlens_k):
        n = -(-int(L) // block_n)
        if n == 0:
            continue
        for h in range(num_heads_k):
            for m in range(num_m_blocks):
                offsets.append(offsets[-1] + n)
                tb.append(b)
                th.append(h)
                tm.append(m)
    return offsets, tb, th, tm


def _from_cuts(kind, offsets, tb, th, tm, cta_starts) -> Schedule:
    """Derive every array from the tile space and the CTA cut points."""
    U, G = len(offsets) - 1, len(cta_starts) - 1
    first = [bisect.bisect_right(offsets, cta_starts[c]) - 1 if cta_starts[c] < cta_starts[c + 1] else U
             for c in range(G)]
    host, nsplit = [], []
    for u in range(U):
        # the CTA whose range contains the first tile of u, and the one containing its last tile
        h = bisect.bisect_right(cta_starts, offsets[u]) - 1
        while cta_starts[h] == cta_starts[h + 1]:  # skip empty CTAs sharing the cut point
            h += 1
        last = bisect.bisect_right(cta_starts, offsets[u + 1] - 1) - 1
        host.append(h)
        nsplit.append(last - h + 1)
    slots = [0]
    for n in nsplit:
        slots.append(slots[-1] + (n if n > 1 else 0))
    return Schedule(kind, G, list(offsets), tb, th, tm, list(cta_starts), first, host, nsplit, slots,
                    [u for u in range(U) if nsplit[u] > 1])


def _check_common(seqlens_k, num_heads_k, num_m_blocks, block_n):
    """Types and sizes; returns the lengths as a list of int. The tile space must stay within MAX_TILES."""
    try:
        lens = list(seqlens_k)
    except TypeError:
        raise TypeError(f"seqlens_k: expected a sequence of ints, got {type(seqlens_k).__name__}") from None
    for b, L in enumerate(lens):
        if isinstance(L, bool) or not isinstance(L, numbers.Integral):
            raise TypeError(f"seqlens_k: expected ints, got {type(L).__name__} {L!r} at index {b}")
    lens = [int(L) for L in lens]
    if any(L < 0 for L in lens):
        raise ValueError(f"seqlens_k: expected lengths >= 0, got {lens[:16]}")
    for name, val in (("num_heads_k", num_heads_k), ("num_m_blocks", num_m_blocks), ("block_n", block_n)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
    total = sum(-(-L // block_n) for L in lens) * num_heads_k * num_m_blocks
    if total > MAX_TILES:
        raise ValueError(f"seqlens_k: the tile space has {total} KV tiles (sum of ceil(seqlens_k / block_n={block_n}) "
                         f"x num_heads_k={num_heads_k} x num_m_blocks={num_m_blocks}), more than MAX_TILES={MAX_TILES}")
    return lens


def lean_schedule(seqlens_k: Sequence[int], *, num_heads_k: int, block_n: int, num_m_blocks: int = 1,
                  num_ctas: int | None = None, max_ctas: int = 264,
                  max_splits: int = MAX_SPLITS) -> Schedule:
    """LeanAttention stream-K partition: every CTA gets ``q`` or ``q - 1`` KV tiles.

    Parameters
    ----------
    seqlens_k : sequence of int, length batch_size
        Keys per sequence after any append (ragged; 0 allowed: that batch has no tile).
    num_heads_k : int
        KV heads (each query-head group is packed into the m-blocks of its KV head).
    block_n : int
        Keys per KV tile (``BLOCK_N`` of the kernel).
    num_m_blocks : int, default 1
        m-blocks per (batch, kv head): ``ceil(seqlen_q * group / BLOCK_M)``.
    num_ctas : int or None
        Grid size G. None: the smallest load ``q >= ceil(T / max_ctas)`` that keeps every output
        tile within ``max_splits`` CTAs, then the fewest CTAs with that load, ``G = ceil(T / q)``
        (loads differ by at most one; max load / mean load < G / (G - 1)). Explicit values above the
        number of tiles T are allowed: CTAs past T get no work (empty ranges). At most ``MAX_CTAS``
        (65536), else ValueError.
    max_ctas : int, default 264
        CTAs that can be resident at once (SMs x CTAs per SM; 264 = 2 x 132 on an H100 SXM).
    max_splits : int >= 2, default 128
        With ``num_ctas=None``, the load is raised until no output tile is shared by more than
        this many CTAs. An explicit ``num_ctas`` is kept as given (``max_splits`` is not enforced).

    Returns
    -------
    Schedule
        ``kind="lean"``. Even split (docs/ALGORITHMS.md 1a): ``q = ceil(T/G)``, ``hl = T - (q-1) G``;
        CTA c < hl gets q tiles, the others q - 1; ranges are consecutive.

    Raises
    ------
    TypeError
        A length that is not an int (e.g. 10.5), or ``seqlens_k`` not a sequence.
    ValueError
        A negative length, a size < 1, ``num_ctas`` < 1 or > ``MAX_CTAS``, ``max_ctas`` < 1,
        ``max_splits`` < 2, or a tile space of more than ``MAX_TILES`` (2**26) KV tiles.

    Examples
    --------
    >>> lean_schedule([1000], num_heads_k=1, block_n=128, num_ctas=3).loads()
    [3, 3, 2]
    """
    seqlens_k = _check_common(seqlens_k, num_heads_k, num_m_blocks, block_n)
    if num_ctas is None:
        if isinstance(max_ctas, bool) or not isinstance(max_ctas, int) or max_ctas < 1:
            raise ValueError(f"max_ctas: expected an int >= 1, got {max_ctas!r}")
        if isinstance(max_splits, bool) or not isinstance(max_splits, int) or max_splits < 2:
            raise ValueError(f"max_splits: expected an int >= 2, got {max_splits!r}")
    elif isinstance(num_ctas, bool) or not isinstance(num_ctas, int) or not 1 <= num_ctas <= MAX_CTAS:
        raise ValueError(f"num_ctas: expected an int in [1, MAX_CTAS={MAX_CTAS}], got {num_ctas!r}")
    offsets, tb, th, tm = _tile_space(seqlens_k, num_heads_k, num_m_blocks, block_n)
    T = offsets[-1]
    if num_ctas is None:
        longest = max((offsets[u + 1] - offsets[u] for u in range(len(offsets) - 1)), default=0)
        # smallest per-CTA load q that max_ctas slots allow and that keeps every output tile within
        # max_splits CTAs (a tile of n KV tiles spans at most 1 + ceil((n - 1) / (q - 1)) CTAs, which is
        # <= max_splits iff q >= 1 + ceil((n - 1) / (max_splits - 1))); then the fewest CTAs with that
        # load, so loads differ by at most one and balance stays tight
        q = -(-T // max_ctas) if T else 1
        if longest > max_splits:
            q = max(q, 1 + -(-(longest - 1) // (max_splits - 1)))
        G = max(1, -(-T // q)) if T else 1
    else:
        G = num_ctas
    q = -(-T // G) if T else 0
    hl = T - (q - 1) * G if T else 0
    starts = [c * q if c < hl else hl * q + (c - hl) * (q - 1) for c in range(G)] + [T] if T else [0] * (G + 1)
    return _from_cuts("lean", offsets, tb, th, tm, starts)


def split_heuristic(num_output_tiles: int, num_n_blocks: int, num_sms: int, max_splits: int = MAX_SPLITS) -> int:
    """FlashDecoding's ``num_splits=0`` rule as FlashAttention 2.x describes it: no split when the
    output tiles already fill 80% of the SMs; else the smallest split count whose wave efficiency
    (waves / ceil(waves)) is within 85% of the best, among counts that change the split length.

    >>> split_heuristic(1, 2048, 132)
    114
    >>> split_heuristic(200, 64, 132)
    1
    """
    if num_output_tiles >= 0.8 * num_sms or num_n_blocks <= 1:
        return 1
    top = min(max_splits, num_sms, num_n_blocks)

    def eligible(s):
        return s == 1 or -(-num_n_blocks // s) != -(-num_n_blocks // (s - 1))

    effs = []
    for s in range(1, top + 1):
        waves = num_output_tiles * s / num_sms
        effs.append(waves / math.ceil(waves) if eligible(s) else 0.0)
    best = max(effs)
    for s in range(1, top + 1):
        if eligible(s) and effs[s - 1] >= 0.85 * best:
            return s
    return 1


def split_schedule(seqlens_k: Sequence[int], *, num_heads_k: int, block_n: int, num_m_blocks: int = 1,
                   num_splits: int = 0, num_sms: int = 132) -> Schedule:
    """FlashDecoding-style fixed split-KV: each output tile's keys are cut into ``num_splits``
    chunks of ``ceil(n_max / num_splits)`` KV tiles (``n_max`` the longest sequence, as
    FlashAttention does), one CTA per non-empty chunk; short sequences get fewer CTAs.

    Parameters are those of :func:`lean_schedule`; ``num_splits`` 0 picks
    :func:`split_heuristic` on ``num_sms``; ``num_splits`` 1 is :func:`single_schedule`. Errors as
    :func:`lean_schedule` (TypeError for non-int lengths; ValueError past ``MAX_TILES``), and
    ValueError for ``num_splits`` < 0.

    >>> split_schedule([1000, 300], num_heads_k=1, block_n=128, num_splits=2).loads()
    [4, 4, 3]
    """
    seqlens_k = _check_common(seqlens_k, num_heads_k, num_m_blocks, block_n)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0 = heuristic), got {num_splits!r}")
    offsets, tb, th, tm = _tile_space(seqlens_k, num_heads_k, num_m_blocks, block_n)
    U = len(offsets) - 1
    n_max = max((offsets[u + 1] - offsets[u] for u in range(U)), default=0)
    s = num_splits or split_heuristic(U, n_max, num_sms)
    chunk = max(1, -(-n_max // s)) if n_max else 1
    starts = []
    for u in range(U):
        starts.extend(range(offsets[u], offsets[u + 1], chunk))
    starts.append(offsets[-1])
    kind = "split" if s > 1 else "single"
    return _from_cuts(kind, offsets, tb, th, tm, starts if U else [0, 0])


def single_schedule(seqlens_k: Sequence[int], *, num_heads_k: int, block_n: int, num_m_blocks: int = 1) -> Schedule:
    """One CTA per output tile (FlashAttention-2's decode grid without splits). Parameters and errors
    as :func:`lean_schedule`.

    >>> single_schedule([1000, 300], num_heads_k=1, block_n=128).loads()
    [8, 3]
    """
    seqlens_k = _check_common(seqlens_k, num_heads_k, num_m_blocks, block_n)
    offsets, tb, th, tm = _tile_space(seqlens_k, num_heads_k, num_m_blocks, block_n)
    starts = offsets if len(offsets) > 1 else [0, 0]
    return _from_cuts("single", offsets, tb, th, tm, list(starts))


def make_schedule(kind: str, seqlens_k: Sequence[int], *, num_heads_k: int, block_n: int, num_m_blocks: int = 1,
                  num_splits: int = 0, num_ctas: int | None = None, max_ctas: int = 264,
                  num_sms: int = 132) -> Schedule:
    """Dispatch on ``kind`` in ("lean", "split", "single"); ValueError otherwise.

    For "lean", ``num_ctas`` (if given) fixes the grid; ``num_splits`` is ignored.
    """
    if kind == "lean":
        return lean_schedule(seqlens_k, num_heads_k=num_heads_k, block_n=block_n, num_m_blocks=num_m_blocks,
                             num_ctas=num_ctas, max_ctas=max_ctas)
    if kind == "split":
        return split_schedule(seqlens_k, num_heads_k=num_heads_k, block_n=block_n, num_m_blocks=num_m_blocks,
                              num_splits=num_splits, num_sms=num_sms)
    if kind == "single":
        return single_schedule(seqlens_k, num_heads_k=num_heads_k, block_n=block_n, num_m_blocks=num_m_blocks)
    raise ValueError(f"schedule: expected one of 'lean', 'split', 'single', got {kind!r}")
