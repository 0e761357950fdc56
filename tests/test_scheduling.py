"""Host-side decode schedules (posattn.scheduling) and the float64 state merge (reference.merge_states).

The kernel's walk over a schedule is replayed in Python here (``_walk``), so the properties the
kernels rely on are checked on the arrays themselves: every KV tile exactly once, hosts unique and
owning the first tile, a CTA a non-host only in its first segment (no deadlock), slots unique.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posattn import reference as R
from posattn.scheduling import (MAX_SPLITS, lean_schedule, make_schedule, single_schedule, split_heuristic,
                                split_schedule)


def _walk(s):
    """Replay the kernel loop; return {tile: cta}, the segments and the slots written."""
    seen, segments, slots = {}, [], []
    for c in range(s.num_ctas):
        it, end, u = s.cta_starts[c], s.cta_starts[c + 1], s.cta_first_tile[c]
        first = True
        while it < end:
            lo, hi = s.tile_offsets[u], s.tile_offsets[u + 1]
            assert lo <= it < hi, "cta_first_tile / tile_offsets inconsistent"
            seg_hi = min(end, hi)
            for t in range(it, seg_hi):
                assert t not in seen, f"tile {t} processed twice"
                seen[t] = c
            is_host = it == lo
            if not is_host:
                assert first, f"CTA {c} is a non-host after its first segment (could deadlock)"
            if is_host:
                assert s.host_cta[u] == c
            if s.num_splits[u] > 1:
                slots.append(s.slot_offsets[u] + c - s.host_cta[u])
            else:
                assert is_host and seg_hi == hi
            segments.append((c, u, it, seg_hi))
            it, u, first = seg_hi, u + 1, False
    return seen, segments, slots


def _check_schedule(s):
    T, U = s.num_tiles, s.num_output_tiles
    assert s.cta_starts[0] == 0 and s.cta_starts[-1] == T and len(s.cta_starts) == s.num_ctas + 1
    assert all(a <= b for a, b in zip(s.cta_starts, s.cta_starts[1:]))
    assert all(a < b for a, b in zip(s.tile_offsets, s.tile_offsets[1:]))
    seen, segments, slots = _walk(s)
    assert sorted(seen) == list(range(T)), "every tile exactly once"
    assert sorted(slots) == list(range(s.num_slots)), "slots unique and dense"
    per_tile = {}
    for c, u, _, _ in segments:
        per_tile.setdefault(u, []).append(c)
    for u in range(U):
        cs = per_tile[u]
        assert cs == list(range(s.host_cta[u], s.host_cta[u] + s.num_splits[u]))
    assert s.split_tiles == [u for u in range(U) if s.num_splits[u] > 1]
    t = s.as_tensors("cpu")
    assert t["cta_starts"].dtype == torch.int32 and t["cta_starts"].tolist() == s.cta_starts


lengths = st.lists(st.integers(0, 3000), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(lengths, st.integers(1, 4), st.integers(1, 3), st.sampled_from([16, 64, 128]), st.integers(1, 400))
def test_lean_properties(lens, hk, n_m, bn, G):
    s = lean_schedule(lens, num_heads_k=hk, block_n=bn, num_m_blocks=n_m, num_ctas=G)
    _check_schedule(s)
    loads = s.loads()
    assert max(loads) - min(loads) <= 1, "stream-K loads differ by at most one tile"
    assert s.num_tiles == sum(-(-L // bn) for L in lens) * hk * n_m
    if s.num_tiles:
        q = -(-s.num_tiles // G)
        for u in range(s.num_output_tiles):
            n = s.tile_offsets[u + 1] - s.tile_offsets[u]
            # a tile of n KV tiles touches at most 1 + ceil((n - 1) / (q - 1)) CTAs
            bound = n if q == 1 else 1 + -(-(n - 1) // (q - 1))
            assert s.num_splits[u] <= bound


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(1, 8), st.integers(1, 600))
def test_lean_default_grid(lens, hk, max_ctas):
    s = lean_schedule(lens, num_heads_k=hk, block_n=64, max_ctas=max_ctas)
    _check_schedule(s)
    assert s.num_ctas <= max(max_ctas, 1)
    assert s.max_splits <= MAX_SPLITS
    if s.num_tiles:
        loads = s.loads()
        # the grid reaches the minimal makespan for max_ctas slots
        longest = max(b - a for a, b in zip(s.tile_offsets, s.tile_offsets[1:]))
        assert max(loads) == -(-s.num_tiles // min(max_ctas, s.num_tiles)) or longest > MAX_SPLITS
        assert min(loads) >= 1


def test_lean_long_context_balance():
    # batch 1, one kv head, 512k keys: one output tile of 4096 KV tiles split over many CTAs
    s = lean_schedule([512 * 1024], num_heads_k=1, block_n=128, max_ctas=264)
    _check_schedule(s)
    assert s.max_splits <= MAX_SPLITS
    assert max(s.loads()) / (s.num_tiles / s.num_ctas) <= 1.05


@settings(max_examples=80, deadline=None)
@given(lengths, st.integers(1, 4), st.integers(0, 9))
def test_split_and_single(lens, hk, ns):
    s = split_schedule(lens, num_heads_k=hk, block_n=64, num_splits=ns, num_sms=16)
    _check_schedule(s)
    if ns:
        assert s.max_splits <= ns
    one = single_schedule(lens, num_heads_k=hk, block_n=64)
    _check_schedule(one)
    assert one.num_ctas == max(1, one.num_output_tiles) and set(one.num_splits) <= {1} and one.num_slots == 0


def test_examples_and_heuristic():
    s = lean_schedule([300, 0, 5], num_heads_k=2, block_n=128, num_ctas=4)
    assert s.tile_offsets == [0, 3, 6, 7, 8] and s.tile_batch == [0, 0, 2, 2] and s.tile_head == [0, 1, 0, 1]
    assert s.cta_starts == [0, 2, 4, 6, 8] and s.host_cta == [0, 1, 3, 3] and s.slot_offsets == [0, 2, 4, 4, 4]
    # more CTAs than tiles: the extra CTAs are empty
    big = lean_schedule([100], num_heads_k=1, block_n=64, num_ctas=5)
    assert big.loads() == [1, 1, 0, 0, 0] and big.cta_first_tile[2:] == [1, 1, 1]
    assert split_heuristic(200, 64, 132) == 1          # enough output tiles: no split
    assert 1 < split_heuristic(4, 1024, 132) <= 128
    empty = make_schedule("lean", [0, 0], num_heads_k=3, block_n=64)
    assert empty.num_tiles == 0 and empty.num_output_tiles == 0


def test_schedule_errors():
    with pytest.raises(ValueError, match="seqlens_k"):
        lean_schedule([-1], num_heads_k=1, block_n=64)
    with pytest.raises(ValueError, match="num_heads_k"):
        lean_schedule([5], num_heads_k=0, block_n=64)
    with pytest.raises(ValueError, match="num_ctas"):
        lean_schedule([5], num_heads_k=1, block_n=64, num_ctas=0)
    with pytest.raises(ValueError, match="num_splits"):
        split_schedule([5], num_heads_k=1, block_n=64, num_splits=-1)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("stream", [5], num_heads_k=1, block_n=64)


# ---- the merge (ALGORITHMS.md "Conventions"): float64, random partitions and orders ----
def _partials(s, v, cuts):
    outs, lses = [], []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            outs.append(torch.zeros(s.shape[0], v.shape[-1], dtype=torch.float64))
            lses.append(torch.full((s.shape[0],), -math.inf, dtype=torch.float64))
            continue
        lse = torch.logsumexp(s[:, a:b], -1)
        outs.append(torch.softmax(s[:, a:b], -1) @ v[a:b])
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_merge_partitions_and_orders_agree(n, parts, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, n, generator=g, dtype=torch.float64) * 4
    v = torch.randn(n, 5, generator=g, dtype=torch.float64)
    full_o = torch.softmax(s, -1) @ v
    full_l = torch.logsumexp(s, -1)
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=g).tolist())
    outs, lses = _partials(s, v, [0] + cuts + [n])
    perm = torch.randperm(outs.shape[0], generator=g)
    o1, l1 = R.merge_states(outs, lses)
    o2, l2 = R.merge_states(outs[perm], lses[perm])
    # pairwise, left to right (the kernels' order) after shuffling
    o3, l3 = outs[perm][0], lses[perm][0]
    for i in perm.tolist()[1:]:
        o3, l3 = R.merge_states(torch.stack([o3, outs[i]]), torch.stack([l3, lses[i]]))
    for o, l in ((o1, l1), (o2, l2), (o3, l3)):
        assert (o - full_o).abs().max().item() < 1e-12
        assert (l - full_l).abs().max().item() < 1e-12


def test_merge_all_empty():
    outs = torch.randn(3, 2, 4, dtype=torch.float64)
    lses = torch.full((3, 2), -math.inf, dtype=torch.float64)
    lses[1, 0] = 0.5
    o, l = R.merge_states(outs, lses)
    assert l[1].item() == -math.inf and torch.equal(o[1], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(o[0], outs[1, 0]) and l[0].item() == 0.5
