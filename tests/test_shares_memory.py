"""posattn._checks.shares_memory: exact "do two tensors share a byte" against a brute-force ground truth (the set
of byte addresses under each tensor's elements), on random as_strided views of small byte buffers (strides
including 0, storage offsets, different dtypes of one buffer, so misaligned pairs too), on the layouts that
matter (packed KV cache halves, transposes, x[::2] vs x[1::2]), and on a layout whose exact search runs past
its node budget (the marker fallback must still be exact). The search itself (no fallback) and the marker
method alone are each compared with the ground truth as well."""
import os
import random
import subprocess
import sys

import pytest
import torch

import posattn._checks as C
from posattn._checks import check_disjoint, shares_memory

DTYPES = (torch.uint8, torch.int16, torch.float16, torch.float32, torch.int32, torch.float64, torch.int64)


def _bytes(t):
    """Byte addresses under t's elements (brute force)."""
    if t.numel() == 0:
        return set()
    es = t.element_size()
    offs = [0]
    for n, st in zip(t.shape, t.stride()):
        offs = [o + i * st for o in offs for i in range(n)]
    base = t.data_ptr()
    return {base + o * es + k for o in offs for k in range(es)}


def _truth(a, b):
    return not _bytes(a).isdisjoint(_bytes(b))


def _random_view(ba, rng, like=None):
    """A random strided view (sizes 0..4, strides 0..12) in a random dtype of the bytearray ``ba``, starting at
    any byte: views of one buffer may be misaligned to each other (torch.frombuffer takes any byte offset).
    With ``like`` (a view), mostly the same dtype and strides with dims permuted and sizes cut: interleaved
    views of one buffer, as the halves of a packed KV cache are."""
    nbytes = len(ba)
    while True:
        if like is None:
            dt = rng.choice(DTYPES)
            nd = rng.randint(1, 4)
            shape = [0 if rng.random() < 0.01 else rng.randint(1, 4) for _ in range(nd)]
            strides = [rng.choice((0, 1, 2, 3, 4, 5, 6, 8, 12)) for _ in range(nd)]
        else:
            dt = like.dtype if rng.random() < 0.8 else rng.choice(DTYPES)
            perm = list(range(like.dim()))
            rng.shuffle(perm)
            shape = [rng.randint(min(1, like.shape[d]), like.shape[d]) for d in perm]
            strides = [like.stride(d) for d in perm]
        es = torch.empty(0, dtype=dt).element_size()
        if like is None:
            start = rng.randrange(0, nbytes // 4)
        else:   # near like's first byte
            here = like.data_ptr() - torch.frombuffer(ba, dtype=torch.uint8).data_ptr()
            start = min(max(0, here + rng.randint(-12, 12)), nbytes - 1)
        avail = (nbytes - start) // es
        if avail < 1:
            continue

        def extent():
            return 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 1
        while extent() > avail:   # shrink the widest dim (redrawing would favour empty and tiny views)
            d = max(range(len(shape)), key=lambda i: (shape[i] - 1) * strides[i])
            shape[d] -= 1
        off = rng.randrange(0, avail - extent() + 1) if like is None else 0
        return torch.frombuffer(ba, dtype=dt, offset=start, count=avail).as_strided(shape, strides, off)


def _interesting(a, b):
    """Non-empty with intersecting byte ranges: the cases the exact search decides."""
    if not (a.numel() and b.numel()):
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return not (a0 + C._extent(a) * a.element_size() <= b0 or b0 + C._extent(b) * b.element_size() <= a0)


def test_random_views_against_brute_force():
    rng = random.Random(1234)
    counts = dict.fromkeys(("true", "false_decided_by_search", "same_size_misaligned_false", "mixed_sizes_false"), 0)
    for case in range(3000):
        ba = bytearray(rng.choice((24, 48, 96)))
        a = _random_view(ba, rng)
        b = _random_view(ba, rng, like=a if rng.random() < 0.6 else None)
        want = _truth(a, b)
        assert shares_memory(a, b) == want, (case, a.dtype, a.shape, a.stride(), b.dtype, b.shape, b.stride())
        assert shares_memory(b, a) == want, case
        # the search alone (no fallback) and the marker method alone are each exact
        assert C._shares_memory(a, b, budget=10**9) == want, case
        if a.numel() and b.numel():
            assert C._marker_overlap(a, a.data_ptr(), b, b.data_ptr()) == want, case
        if want:
            counts["true"] += 1
        elif _interesting(a, b):
            counts["false_decided_by_search"] += 1
            es_a, es_b = a.element_size(), b.element_size()
            if es_a != es_b:
                counts["mixed_sizes_false"] += 1
            elif (b.data_ptr() - a.data_ptr()) % es_a:
                counts["same_size_misaligned_false"] += 1
    # every kind of answer is exercised
    assert counts["true"] > 1000 and counts["false_decided_by_search"] > 400, counts
    assert counts["mixed_sizes_false"] > 80 and counts["same_size_misaligned_false"] > 80, counts


def _pairs():
    kv = torch.empty(2, 5, 2, 3, 4)
    x = torch.empty(6, 8)
    y = torch.empty(20)
    kvh = torch.empty(3, 7, 2, 4, dtype=torch.float16).transpose(1, 2)   # (B, 2, S, D) memory seen per half
    return [
        ("packed k vs v", kv[:, :, 0], kv[:, :, 1], False),
        ("packed k vs k", kv[:, :, 0], kv[:, :, 0], True),
        ("packed k vs kv", kv[:, :, 0], kv, True),
        ("packed k vs v's last feature", kv[:, :, 0], kv[:, :, 1, :, -1], False),
        ("packed k vs one v head", kv[:, :, 0], kv[:, :, 1, 2], False),
        ("packed k vs a slot of v", kv[:, :, 0], kv[1, 3, 1], False),
        ("packed k vs a slot of k", kv[:, :, 0], kv[1, 3, 0, 2], True),
        ("packed halves, other layout", kvh[:, :, 0], kvh[:, :, 1], False),
        ("transpose", x, x.t(), True),
        ("transposed column vs row block", x.t()[:, 0], x[1:], False),
        ("even vs odd", y[::2], y[1::2], False),
        ("even vs even shifted", y[::2], y[2::2], True),
        ("thirds", y[::3], y[1::3], False),
        ("diagonal vs off-diagonal", x[:, :6].diagonal(), x[:, :6].diagonal(1), False),
        ("expand vs other row", x[0:1].expand(4, 8), x[1], False),
        ("expand vs own row", x[0:1].expand(4, 8), x[0, 3:5], True),
        ("fp16 halves of fp32", y[:4].view(torch.float16)[1::2], y[:4].view(torch.float16)[0::2], False),
        ("bytes vs fp32", y.view(torch.uint8)[5:6], y[1:2], True),
        ("bytes after fp32", y.view(torch.uint8)[8:9], y[1:2], False),
        ("empty", y[3:3], y, False),
        ("unfold windows", y.unfold(0, 4, 1)[::4], y.unfold(0, 4, 1)[2::4], True),
    ]


@pytest.mark.parametrize("name,a,b,want", _pairs(), ids=[p[0] for p in _pairs()])
def test_layouts(name, a, b, want):
    assert _truth(a, b) == want                     # the expectation itself is the brute-force answer
    assert shares_memory(a, b) == want and shares_memory(b, a) == want
    if name.startswith("packed k vs v"):
        assert torch._C._overlaps(a, b)             # torch's interval test cannot tell them apart


def _lattice(target):
    """A six-dim view with strides 1009..1033 elements (sums of them are sparse) and one element at ``target``."""
    buf = torch.zeros(70000)
    strides = (1009, 1013, 1019, 1021, 1031, 1033)
    return buf.as_strided((10,) * 6, strides), buf[target:target + 1], strides


@pytest.mark.parametrize("target,want", [(30000, False), (20800, False),
                                         (3 * 1009 + 5 * 1013 + 2 * 1019 + 7 * 1033, True)])
def test_node_budget_falls_back_exactly(target, want):
    a, b, strides = _lattice(target)
    # ground truth without enumerating 10**6 elements: representable sums of the strides
    sums = {0}
    for st in strides:
        sums = {s + i * st for s in sums for i in range(10)}
    assert (target in sums) == want
    terms = {st * 4: (0, 9) for st in strides}
    terms[1] = (-3, 3)
    if not want:
        assert C._solve(terms, target * 4, C.SHARES_MEMORY_NODE_BUDGET) is None   # the budget is hit
    assert C._solve(terms, target * 4, 10**9) is want
    assert shares_memory(a, b) is want and shares_memory(b, a) is want


def test_undecidable_is_conservative(monkeypatch):
    a, b, _ = _lattice(30000)
    monkeypatch.setattr(C, "SHARES_MEMORY_NODE_BUDGET", 10)
    monkeypatch.setattr(C, "SHARES_MEMORY_MARKER_BYTES", 1000)
    assert C._shares_memory(a, b, budget=10) is None
    assert C._shares_memory(a, b) is None and shares_memory(a, b) is True
    with pytest.raises(ValueError, match=r"^out: may share memory with k .*could not prove"):
        check_disjoint("out", a, {"k": b})


def test_devices_meta_and_fake_tensors():
    assert not shares_memory(torch.empty(4, device="meta"), torch.empty(4, device="meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        kv = torch.empty(2, 5, 2, 3, 4)
        other = torch.empty(2, 5, 3, 4)
        assert not shares_memory(kv[:, :, 0], kv[:, :, 1])
        assert shares_memory(kv[:, :, 0], kv[:, :, 0, 1])
        assert not shares_memory(kv[:, :, 0], other)


def test_check_disjoint_message_names_both():
    kv = torch.empty(2, 5, 2, 3, 4)
    q = torch.empty(2, 1, 3, 4)
    check_disjoint("k_cache", kv[:, :, 0], {"v_cache": kv[:, :, 1], "q": q, "k": None, "cache_seqlens": 3})
    with pytest.raises(ValueError, match=r"^k_cache: shares memory with q; the op writes k_cache, so it must not "
                                         r"alias any input: pass a separate tensor$"):
        check_disjoint("k_cache", kv[:, :, 0], {"v_cache": kv[:, :, 1], "q": kv[:, 1:2, 0]})


# ---- break-it pass on 8f6e06b: what the search and the marker got wrong or slow
def _strided_pair(n):
    """float32 buf[0::4] (n elements) and buf[1::6]: element-aligned, no common element (4 i - 6 j = 1 has no
    integer solution), byte ranges interleaved over 24 n bytes."""
    buf = torch.empty(6 * n + 8)
    return buf[0:4 * n:4], buf[1:6 * n + 1:6]


@pytest.mark.parametrize("n", [10, 100_000])
def test_element_size_slack_keeps_the_gcd_test(monkeypatch, n):
    """The element-size slack used to be a search term of coefficient 1: every suffix gcd became 1, the congruence
    pruning never fired, and buf[0::4] vs buf[1::6] ran past the node budget from n ~ 50,000 on; over 64 MiB
    (n = 3M) shares_memory then said True for two disjoint views (the op refused a legal call). The slack is now
    enumerated outside the search, so the gcd decides at once. The marker is switched off here (as if the span were
    over 64 MiB): the search alone must decide."""
    monkeypatch.setattr(C, "SHARES_MEMORY_MARKER_BYTES", 0)
    a, b = _strided_pair(n)
    assert C._shares_memory(a, b) is False and C._shares_memory(b, a) is False
    assert shares_memory(a, b) is False
    # mixed element sizes, misaligned: fp32 buf[0::4] (bytes 16 i .. 16 i + 3) vs fp16 halves at bytes 6 + 24 j
    # (.. 7 + 24 j): 24 j - 16 i would have to be in [-7, -3], and it is a multiple of 8
    h = a._base.view(torch.float16)[3:3 + 12 * n:12]
    assert C._shares_memory(a, h) is False and C._shares_memory(h, a) is False
    h2 = a._base.view(torch.float16)[8:8 + 12 * n:12]                 # bytes 16 + 24 j: element i = 1 of a at j = 0
    assert C._shares_memory(a, h2) is True and C._shares_memory(h2, a) is True
    if n < 100:   # the expectations are the brute-force answers
        assert not _truth(a, b) and not _truth(a, h) and _truth(a, h2)


def _subset_lattice():
    """A 40-dim view of a small buffer, every dim of size 2 with a prime stride in [1009, 1400): 2**40 elements
    over 182 KB. Offsets are subset sums of the primes; 3900 is none (3 primes sum to an odd number, 2 to at most
    2780, 4 to at least 4036), 1009 + 1013 + 1019 + 1021 is one."""
    primes = [p for p in range(1009, 1400) if all(p % d for d in range(2, 38))][:40]
    buf = torch.zeros(sum(primes) + 10)
    return buf.as_strided((2,) * 40, primes), buf, primes


_MARKER_SCRIPT = """
import torch
import posattn._checks as C
primes = [p for p in range(1009, 1400) if all(p % d for d in range(2, 38))][:40]
buf = torch.zeros(sum(primes) + 10)
a = buf.as_strided((2,) * 40, primes)
assert C._solve({p * 4: (0, 1) for p in primes}, 3900 * 4, C.SHARES_MEMORY_NODE_BUDGET) is None
print(C.shares_memory(a, buf[3900:3901]), C.shares_memory(buf[3900:3901], a),
      C.shares_memory(a, buf[sum(primes[:4]):][:1]))
"""


def test_marker_work_is_bounded_by_the_span_not_the_element_count():
    """A 40-dim view, every dim of size 2 with a prime stride in [1009, 1400): 2**40 elements over 182 KB. Its
    offsets are subset sums of the primes; 3900 is none (3 primes sum to an odd number, 2 to at most 2780, 4 to at
    least 4036), 1009 + 1013 + 1019 + 1021 is one. The search runs past its budget; the marker then filled one bool
    per element and byte (4.4e12 writes: hours, in C++ where no signal interrupts it). It now marks by doubling
    shifts, O(span log n): milliseconds. Run in a subprocess so that the old hang fails the test by timeout."""
    res = subprocess.run([sys.executable, "-c", _MARKER_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "False", "True"]


def test_marker_by_doubling_against_brute_force():
    """``_mark`` (the doubling marker) sets exactly the bytes under a view's elements, overlapping views too."""
    rng = random.Random(99)
    for case in range(400):
        ba = bytearray(96)
        t = _random_view(ba, rng)
        if not t.numel():
            continue
        base = torch.frombuffer(ba, dtype=torch.uint8).data_ptr()
        m = C._mark(C._marker_dims(t), t.data_ptr() - base, len(ba))
        assert {base + i for i in m.nonzero().flatten().tolist()} == _bytes(t), (case, t.dtype, t.shape, t.stride())


@pytest.mark.filterwarnings("ignore:Sparse:UserWarning")
def test_sparse_tensors_are_compared_through_their_parts():
    """A sparse tensor's memory is its index and value tensors: compared exactly (it used to be 'may share' for
    any sparse tensor, so e.g. a sparse alibi_slopes next to an ``out`` was refused)."""
    buf = torch.randn(16)
    idx = torch.tensor([[0, 2, 5, 7]])
    coo = torch.sparse_coo_tensor(idx, buf[:4], (8,))
    assert coo._values().data_ptr() == buf.data_ptr()      # the values are buf's memory
    assert shares_memory(buf, coo) and shares_memory(coo, buf[3:5]) and shares_memory(coo, idx)
    assert not shares_memory(buf[4:], coo) and not shares_memory(coo, buf[4:])
    csr = torch.sparse_csr_tensor(torch.tensor([0, 2, 4]), torch.tensor([0, 1, 0, 1]), buf[:4], (2, 2))
    assert shares_memory(buf[:1], csr) and not shares_memory(buf[4:], csr)
    check_disjoint("out", buf[4:], {"alibi_slopes": coo})
    with pytest.raises(ValueError, match=r"^out: shares memory with alibi_slopes; "):
        check_disjoint("out", buf[2:], {"alibi_slopes": coo})


def test_vmap_wrappers_are_compared_through_the_tensors_they_wrap():
    """Under torch.func.vmap a BatchedTensor has no data pointer; it used to count as 'may share' with anything."""
    base = torch.randn(3, 40)
    other, third = torch.randn(8), torch.randn(3)
    seen = []

    def f(row):
        seen.append([shares_memory(row, other), shares_memory(row, base[1, 5:9]), shares_memory(row, third)])
        return row * 2
    torch.func.vmap(f)(base)
    # f runs once on a batched row; its memory is all of base's (the wrapper unwraps to the whole batch: a write
    # by one instance must not reach another's read either)
    assert seen == [[False, True, False]]
