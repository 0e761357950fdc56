"""Input checks shared by every op: one place that binds dimension names to sizes and reports the
first conflict with the argument's name, what was expected and what came.

Example message::

    k: expected (batch_size=2, seqlen_k, num_heads_k, head_dim=128), got (2, 77, 4, 64)

Everything raises ``ValueError`` (wrong value/shape) or ``TypeError`` (wrong type/dtype);
never ``assert``.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch


def _np_bool():
    """numpy.bool_ (a bool that is not a Python bool), or bool when numpy is absent."""
    try:
        import numpy
        return numpy.bool_
    except ImportError:
        return bool


def _type_name(value) -> str:
    """``float`` / ``numpy.float32`` / ``torch.Tensor``: the module is named unless it is builtins."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__name__}"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64", torch.int32: "int32", torch.int64: "int64", torch.bool: "bool"}


def dtype_name(dt: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


class Dims:
    """Binds named dimensions to sizes across several tensors.

    >>> d = Dims()
    >>> d.check("q", torch.empty(2, 5, 4, 8), ("batch_size", "seqlen_q", "num_heads", "head_dim"))
    >>> d.check("k", torch.empty(2, 7, 4, 8), ("batch_size", "seqlen_k", "num_heads_k", "head_dim"))
    >>> d["seqlen_k"]
    7

    A spec entry may be a name (bound on first sight), an int (fixed size) or None (anything).
    """

    def __init__(self, **known: int):
        self.sizes: dict[str, int] = dict(known)

    def __getitem__(self, name: str) -> int:
        return self.sizes[name]

    def get(self, name: str, default=None):
        return self.sizes.get(name, default)

    def bind(self, name: str, size: int) -> None:
        self.sizes[name] = int(size)

    def _fmt(self, spec: Sequence) -> str:
        parts = []
        for s in spec:
            if s is None:
                parts.append("*")
            elif isinstance(s, int):
                parts.append(str(s))
            elif s in self.sizes:
                parts.append(f"{s}={self.sizes[s]}")
            else:
                parts.append(s)
        return "(" + ", ".join(parts) + ")"

    def check(self, arg: str, t: torch.Tensor, spec: Sequence) -> None:
        """Check ``t.shape`` against ``spec`` and bind unknown names. Raises ValueError."""
        shape = tuple(t.shape)
        if len(shape) != len(spec):
            raise ValueError(f"{arg}: expected a {len(spec)}-D tensor {self._fmt(spec)}, "
                             f"got {len(shape)}-D with shape {shape}")
        expected = self._fmt(spec)
        pending = {}
        for size, s in zip(shape, spec):
            if s is None:
                continue
            if isinstance(s, int):
                if size != s:
                    raise ValueError(f"{arg}: expected {expected}, got {shape}")
                continue
            want = self.sizes.get(s, pending.get(s))
            if want is None:
                pending[s] = size
            elif want != size:
                raise ValueError(f"{arg}: expected {expected}, got {shape}")
        self.sizes.update(pending)


def check_tensor(arg: str, t, *, dtypes: Iterable[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None, device: torch.device | None = None,
                 allow_none: bool = False):
    """Type, dtype, rank and device check for one argument. Returns ``t``."""
    if t is None:
        if allow_none:
            return None
        raise TypeError(f"{arg}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        # the ops index and launch kernels on strided memory: a sparse alibi_slopes gave a wrong attention
        # silently (torch backend), sparse / nested tensors elsewhere crashed deep inside torch or Triton
        if t.is_nested:
            got, fix = "a nested tensor", ".to_padded_tensor(0) (and lengths where the op takes them)"
        else:
            got, fix = f"layout {str(t.layout).replace('torch.', '')}", ".to_dense()"
        raise TypeError(f"{arg}: expected a dense (strided) tensor, got {got}; pass {fix}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{arg}: expected dtype in ({', '.join(dtype_name(d) for d in dtypes)}), "
                            f"got {dtype_name(t.dtype)}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ndims:
            want = " or ".join(f"{n}-D" for n in ndims)
            raise ValueError(f"{arg}: expected a {want} tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{arg}: expected a tensor on {device} (the device of the other inputs), got {t.device}")
    return t


def check_same(arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor, *, dtype: bool = True,
               device: bool = True) -> None:
    """``t`` must share ``ref``'s dtype and/or device."""
    if device and t.device != ref.device:
        raise ValueError(f"{arg}: expected device {ref.device} (same as {ref_arg}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{arg}: expected dtype {dtype_name(ref.dtype)} (same as {ref_arg}), "
                        f"got {dtype_name(t.dtype)}")


def check_last_dim_contiguous(arg: str, t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides but a unit stride in the last dim; copy once otherwise (documented)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def may_overlap(t: torch.Tensor) -> bool:
    """True unless ``t``'s strides prove that no two elements share memory: the dims of size > 1, sorted
    by stride, must each step past the whole extent of the smaller ones (stride 0 on a dim of size > 1, as
    from ``expand``, and overlapping windows, as from ``unfold`` or ``as_strided``, fail it). Conservative:
    a layout it cannot prove free of overlap counts as overlapping."""
    if t.numel() <= 1:                  # nothing to share (an empty tensor may carry any strides)
        return False
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    extent = 1
    for st, sz in dims:
        if st < extent:
            return True
        extent = st * sz
    return False


def check_no_overlap(arg: str, t: torch.Tensor) -> None:
    """A tensor the op writes in place must not alias itself (expanded / overlapping views)."""
    if may_overlap(t):
        raise ValueError(f"{arg}: is written in place, so its elements must not share memory; got strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)} (an expanded or overlapping view): "
                         f"pass a tensor of its own (e.g. .contiguous())")


def dense_for_reading(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when elements may share memory: some of torch's fused CPU kernels read
    such views wrongly (an ``unfold``-ed q gave wrong attention and gradients, no error)."""
    return t.contiguous() if may_overlap(t) else t


# ------------------------------------------------------------------------------------------------
# memory shared between two tensors (an op that writes one of them must not read the other)
# ------------------------------------------------------------------------------------------------
# Nodes the exact search of ``_solve`` may visit before ``shares_memory`` falls back to marking bytes, the
# largest byte span that fallback allocates a marker buffer for (64 MiB of bools), and the most bool element
# operations it may spend marking and reading (a self-overlapping view can have far more elements than bytes).
SHARES_MEMORY_NODE_BUDGET = 20_000
SHARES_MEMORY_MARKER_BYTES = 1 << 26
SHARES_MEMORY_MARKER_WORK = 1 << 28


class _OverBudget(Exception):
    pass


def _solve(terms: dict[int, tuple[int, int]], target: int, budget: int, nodes: list | None = None) -> bool | None:
    """Is there an integer ``x_c`` in ``[lo_c, hi_c]`` for every coefficient ``c > 0`` of ``terms`` (``{c: (lo,
    hi)}``) with ``sum c * x_c == target``? Exact; None when the search visited more than ``budget`` values
    (``nodes``: a one-element list counting visited values, shared by several calls under one budget).

    Depth-first over the coefficients in decreasing order. At each level only values are tried that leave a
    residual (1) inside the interval the remaining terms can reach (suffix min / max) and (2) divisible by the
    gcd of the remaining coefficients (a linear congruence: one residue class, stepped through)."""
    coefs = sorted(terms, reverse=True)
    los = [terms[c][0] for c in coefs]
    his = [terms[c][1] for c in coefs]
    n = len(coefs)
    smin, smax, sg = [0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        smin[k] = smin[k + 1] + coefs[k] * los[k]
        smax[k] = smax[k + 1] + coefs[k] * his[k]
        sg[k] = math.gcd(sg[k + 1], coefs[k])
    if not smin[0] <= target <= smax[0] or (n and target % sg[0]):
        return False
    if nodes is None:
        nodes = [0]

    def search(k: int, r: int) -> bool:   # precondition: smin[k] <= r <= smax[k] and sg[k] | r
        if k == n:
            return r == 0
        c = coefs[k]
        # r - c x must lie in [smin[k+1], smax[k+1]]
        xlo = max(los[k], -((smax[k + 1] - r) // c))        # ceil((r - smax) / c)
        xhi = min(his[k], (r - smin[k + 1]) // c)           # floor((r - smin) / c)
        g_rest = sg[k + 1]
        if g_rest == 0:                                     # last term: c x == r exactly
            if r % c:
                return False
            x = r // c
            nodes[0] += 1
            if nodes[0] > budget:
                raise _OverBudget
            return xlo <= x <= xhi
        g = math.gcd(c, g_rest)                             # == sg[k], divides r
        m = g_rest // g                                     # c x == r (mod g_rest)  <=>  x == x0 (mod m)
        if m == 1:
            first, step = xlo, 1
        else:
            x0 = (r // g) * pow(c // g, -1, m) % m
            first, step = xlo + (x0 - xlo) % m, m
        for x in range(first, xhi + 1, step):
            nodes[0] += 1
            if nodes[0] > budget:
                raise _OverBudget
            if search(k + 1, r - c * x):
                return True
        return False

    try:
        return search(0, target)
    except _OverBudget:
        return None


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (tracing: no data pointer). Plain tensors answer without the (slower) private test."""
    if type(t) in _PLAIN_TENSOR_TYPES:
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
        return bool(is_fake(t))
    except Exception:   # pragma: no cover - private API moved
        return False


def _unwrap_functorch(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding t's memory under ``torch.func`` transforms: a vmap BatchedTensor or a grad wrapper has
    no data pointer of its own; its innermost unwrapped tensor holds the elements of every vmap instance (so two
    of them share memory iff some instance's write could reach another's read). Plain tensors come back as is."""
    try:
        F = torch._C._functorch
        while F.is_functorch_wrapped_tensor(t):
            t = F.get_unwrapped(t)
    except Exception:   # pragma: no cover - private API moved
        pass
    return t


def _parts(t: torch.Tensor):
    """Strided tensors holding all of t's memory: t itself (strided), the index and value tensors of a sparse
    tensor; None for a layout whose memory cannot be located (nested, mkldnn, ...)."""
    lay = t.layout
    if getattr(t, "is_nested", False):
        return None
    if lay == torch.strided:
        return [t]
    try:
        if lay == torch.sparse_coo:
            return [t._indices(), t._values()]
        if lay in (torch.sparse_csr, torch.sparse_bsr):
            return [t.crow_indices(), t.col_indices(), t.values()]
        if lay in (torch.sparse_csc, torch.sparse_bsc):
            return [t.ccol_indices(), t.row_indices(), t.values()]
    except Exception:   # pragma: no cover
        return None
    return None


def _marker_dims(t: torch.Tensor):
    """t's dims as (count, byte stride), stride-0 and size-1 dims dropped, plus (element size, 1) for the bytes
    of one element: the byte offsets under t's elements are the sums ``sum i_d stride_d``, ``0 <= i_d < count_d``."""
    es = t.element_size()
    return [(n, st * es) for n, st in zip(t.shape, t.stride()) if n > 1 and st > 0] + [(es, 1)]


def _marker_costs(dims, length: int) -> tuple[int, int]:
    """(bool operations to mark t's bytes element by element, to mark them by doubling shifts) in a buffer of
    ``length`` bytes. Element by element costs t's element count times its element size, which for a
    self-overlapping view (windows, ``as_strided``) can exceed the span by any factor; doubling costs one pass over
    the buffer per doubling step, ceil(log2 count) steps per dim, whatever the element count."""
    direct = math.prod(n for n, _ in dims)
    doubling = length * (1 + sum((n - 1).bit_length() for n, _ in dims))
    return direct, doubling


def _mark(dims, start: int, length: int) -> torch.Tensor:
    """Bool mask of ``length`` bytes, True under the bytes ``start + sum i_d stride_d`` (``_marker_dims``), built by
    doubling: the offsets reached by the first ``have`` values of a dim, shifted by ``k`` strides, reach ``have + k``.
    Exact whatever the element count (overlapping views included)."""
    m = torch.zeros(length, dtype=torch.bool)
    m[start] = True
    for n, st in dims:
        have = 1
        while have < n:
            k = min(have, n - have)
            sh = k * st
            if sh < length:
                m[sh:] |= m[:length - sh].clone()
            have += k
    return m


def _marker_overlap(a, a0, b, b0) -> bool | None:
    """Exact by marking: a bool per byte of the union span, set under a's elements, read under b's (element by
    element, or by doubling shifts for a view with many more elements than bytes: ``_marker_costs``). None when
    the span is over ``SHARES_MEMORY_MARKER_BYTES`` or the cheaper way still takes more than
    ``SHARES_MEMORY_MARKER_WORK`` bool operations."""
    lo = min(a0, b0)
    hi = max(a0 + _extent(a) * a.element_size(), b0 + _extent(b) * b.element_size())
    length = hi - lo
    if length > SHARES_MEMORY_MARKER_BYTES:
        return None
    da, db = _marker_dims(a), _marker_dims(b)
    (a_direct, a_dbl), (b_direct, b_dbl) = _marker_costs(da, length), _marker_costs(db, length)
    if length + min(a_direct, a_dbl) + min(b_direct, b_dbl) > SHARES_MEMORY_MARKER_WORK:
        return None

    def view(dims, start, buf):
        return buf.as_strided([n for n, _ in dims], [st for _, st in dims], start)
    if a_direct <= a_dbl:
        buf = torch.zeros(length, dtype=torch.bool)
        view(da, a0 - lo, buf).fill_(True)
    else:
        buf = _mark(da, a0 - lo, length)
    if b_direct <= b_dbl:
        return bool(view(db, b0 - lo, buf).any())
    return bool((_mark(db, b0 - lo, length) & buf).any())


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to one past the last element of a non-empty strided tensor."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


_UNKNOWN = "unknown"   # _byte_span of a tensor whose memory cannot be located (sparse and other layouts)
_UNSET = object()


def _byte_span(t: torch.Tensor):
    """(address space, first byte, one past the last byte) of t's elements; None when t holds no memory (empty,
    meta); ``_UNKNOWN`` for sparse and other layouts. The address space is the device (data pointers), or
    the storage while tracing (fake tensors have no data pointer: offsets within their storage). ``torch.func``
    wrappers (vmap, grad) are located through the tensor they wrap."""
    t = _unwrap_functorch(t)
    if t.numel() == 0 or t.device.type == "meta":
        return None
    if t.layout != torch.strided or getattr(t, "is_nested", False):
        return _UNKNOWN
    es = t.element_size()
    try:
        if _is_fake(t):
            raise RuntimeError("no data pointer")
        space, lo = t.device, t.data_ptr()
    except RuntimeError:   # fake (or other data-less) tensors: positions within their storage
        try:
            space, lo = ("storage", t.untyped_storage()._cdata), t.storage_offset() * es
        except Exception:
            return _UNKNOWN
    return space, lo, lo + _extent(t) * es


def _shares_memory(a: torch.Tensor, b: torch.Tensor, *, budget: int | None = None, span_a=_UNSET,
                   span_b=_UNSET) -> bool | None:
    """``shares_memory`` with None for "could not decide" (span too large for the fallback, or a layout whose
    memory cannot be located). ``span_a`` / ``span_b``: ``_byte_span`` of a / b when the caller has it."""
    a, b = _unwrap_functorch(a), _unwrap_functorch(b)
    sa = _byte_span(a) if span_a is _UNSET else span_a
    sb = _byte_span(b) if span_b is _UNSET else span_b
    if sa is None or sb is None or a.device != b.device:
        return False
    if sa is _UNKNOWN or sb is _UNKNOWN:
        # sparse tensors: their index and value tensors (strided) hold their memory
        pa = _parts(a) if a.layout != torch.strided else ([a] if sa is not _UNKNOWN else None)
        pb = _parts(b) if b.layout != torch.strided else ([b] if sb is not _UNKNOWN else None)
        if pa is None or pb is None:
            return None
        res = [_shares_memory(x, y, budget=budget) for x in pa for y in pb]
        return True if True in res else (None if None in res else False)
    (space_a, a0, a1), (space_b, b0, b1) = sa, sb
    if space_a != space_b or a1 <= b0 or b1 <= a0:
        return False
    ea, eb = a.element_size(), b.element_size()
    # Element i of a covers bytes [A, A + ea), element j of b [B, B + eb); they share one iff
    # A - B in [-(ea - 1), eb - 1], i.e. sum_d i_d sa_d ea - sum_e j_e sb_e eb = b0 - a0 - y for some
    # y = B - A in [-(eb - 1), ea - 1]. Terms with equal coefficients merge into one variable (a sum of integer
    # intervals is an integer interval), so two views of one buffer with the same strides stay small.
    terms: dict[int, tuple[int, int]] = {}

    def add(c, lo, hi):
        plo, phi = terms.get(c, (0, 0))
        terms[c] = (plo + lo, phi + hi)
    for n, st in zip(a.shape, a.stride()):
        if n > 1 and st > 0:
            add(st * ea, 0, n - 1)
    for n, st in zip(b.shape, b.stride()):
        if n > 1 and st > 0:
            add(st * eb, -(n - 1), 0)
    # One search per value of y (at most ea + eb - 1, and only those the gcd of the strides allows: one for two
    # aligned views of one dtype) rather than y as a term of coefficient 1: that term would make every suffix
    # gcd 1 and switch the congruence pruning off (x[0::4] vs x[1::6] of a float32 buffer: millions of nodes).
    g = 0
    for c in terms:
        g = math.gcd(g, c)
    limit = SHARES_MEMORY_NODE_BUDGET if budget is None else budget
    nodes = [0]
    found = False
    for y in range(-(eb - 1), ea):
        rest = b0 - a0 - y
        if (rest % g) if g else rest:
            continue
        found = _solve(terms, rest, limit, nodes)
        if found is not False:
            break
    if found is None:
        found = _marker_overlap(a, a0, b, b0)
    return found


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Does some element of ``a`` occupy a byte that some element of ``b`` occupies? Exact for strided tensors.

    Unlike ``torch._C._overlaps`` (a test of the two byte intervals), interleaved views of one buffer are told
    apart: ``kv[:, :, 0]`` and ``kv[:, :, 1]`` of a packed ``kv`` share no memory, ``x[::2]`` and ``x[1::2]``
    neither. Empty tensors, tensors on different devices and meta tensors share nothing; different dtypes
    (element sizes) and misaligned views are handled byte by byte.

    Method: disjoint byte ranges answer at once; otherwise the question is whether ``sum c_k x_k == delta``
    has integer solutions with each ``x_k`` in a range (one term per stride in bytes, the strides of ``b``
    negated, terms of equal stride merged), once per value of a slack for the element sizes (enumerated outside
    the search, so that the congruence pruning keeps working; one value for two aligned views of one dtype). A
    gcd test, then a depth-first search over the terms in decreasing order that tries only values keeping the
    residual reachable by the remaining terms (interval bounds and a congruence): a handful of values per level
    for ordinary (nested-stride) layouts. Past ``SHARES_MEMORY_NODE_BUDGET``
    visited values it marks a's bytes in a bool buffer over the union span and reads b's (exact; element by
    element, or by doubling shifts, O(span log count), for self-overlapping views with many more elements than
    bytes); when that span exceeds ``SHARES_MEMORY_MARKER_BYTES`` (64 MiB) or the marking would take more than
    ``SHARES_MEMORY_MARKER_WORK`` bool operations it cannot decide and returns True (conservative: "could not
    prove them disjoint"). Sparse tensors are compared through their index and value tensors; layouts whose
    memory cannot be located (nested, ...) return True. ``torch.func`` wrappers (vmap, grad) are compared
    through the tensors they wrap. While tracing (fake tensors, no data pointers) tensors of different storages
    share nothing and offsets within one storage are compared.
    Cost: about 2 us for two tensors in different allocations, 10-20 us for the two halves of a packed
    buffer (CPU, Python); at most about 0.2 s when the search runs out of budget and marks a 64 MiB span.
    """
    return _shares_memory(a, b) is not False


def check_disjoint(written_name: str, written, others: dict, *, spans: dict | None = None) -> None:
    """An op writes ``written`` in place and reads ``others`` ({name: tensor}): raise ValueError naming both
    arguments when ``written`` shares memory with one of them (``shares_memory``). ``None`` and non-tensors
    are skipped. ``spans``: a dict the caller keeps across several calls on the same live tensors (byte spans
    by ``id``, computed once).

    Skipped while ``torch.compile`` (Dynamo) traces: it has neither data pointers nor storage offsets to give
    (the check broke ``fullgraph=True`` compiles that worked before it); FakeTensor tracing (``make_fx``,
    ``FakeTensorMode``) is checked through storage offsets."""
    if not isinstance(written, torch.Tensor):
        return
    if torch.compiler.is_compiling():
        return
    if spans is None:
        spans = {}

    def span(t):
        key = id(t)
        if key not in spans:
            spans[key] = _byte_span(t)
        return spans[key]
    sa = span(written)
    if sa is None:
        return
    for name, t in others.items():
        if not isinstance(t, torch.Tensor):
            continue
        res = _shares_memory(written, t, span_a=sa, span_b=span(t))
        if res is False:
            continue
        how = "shares memory with" if res else "may share memory with"
        why = "" if res else (" (shares_memory could not prove them disjoint: a layout whose memory cannot be "
                              "located, or irregular strides over more than 64 MiB)")
        raise ValueError(f"{written_name}: {how} {name}{why}; the op writes {written_name}, so it must not "
                         f"alias any input: pass a separate tensor")


def check_cu_seqlens(arg: str, cu: torch.Tensor, *, batch_size: int | None = None,
                     total: int | None = None, device=None) -> None:
    """cu_seqlens: int32, 1-D, length batch_size+1, starts at 0, non-decreasing, last <= total."""
    check_tensor(arg, cu, dtypes=(torch.int32,), ndim=1, device=device)
    if batch_size is not None and cu.numel() != batch_size + 1:
        raise ValueError(f"{arg}: expected length batch_size+1={batch_size + 1}, got {cu.numel()}")
    if cu.numel() < 1:
        raise ValueError(f"{arg}: expected at least one entry (0), got an empty tensor")
    c = cu.detach().to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{arg}: expected cu_seqlens[0] == 0, got {int(c[0])}")
    if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{arg}: expected non-decreasing values, got {c.tolist()[:16]}")
    if total is not None and int(c[-1]) > total:
        raise ValueError(f"{arg}: last entry {int(c[-1])} exceeds the {total} tokens given")


def check_int(arg: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, (bool, _np_bool())) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value)
        else:
            raise TypeError(f"{arg}: expected an int, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{arg}: expected >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{arg}: expected <= {maximum}, got {value}")
    return int(value)


def check_float(arg: str, value, *, minimum: float | None = None, maximum: float | None = None,
                finite: bool = True, allow_none: bool = False):
    import math
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0 and \
            not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()                        # a 0-d tensor, as torch's own ops take
    if isinstance(value, (bool, _np_bool())) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg}: expected a float, got {_type_name(value)}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{arg}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{arg}: expected >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{arg}: expected <= {maximum}, got {value}")
    return value


def check_bool(arg: str, value) -> bool:
    """A Python bool or a numpy bool (as torch's ops take); returns a Python bool. Raises TypeError otherwise
    (ints, 0-d tensors and None are not bools here)."""
    if not isinstance(value, (bool, _np_bool())):
        raise TypeError(f"{arg}: expected a bool, got {_type_name(value)}")
    return bool(value)


def check_choice(arg: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{arg}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_window(arg: str, window_size) -> tuple[int, int]:
    """window_size=(left, right), -1 = unbounded; each an int >= -1."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"{arg}: expected a pair (left, right) of ints >= -1, got {window_size!r}")
    left = check_int(f"{arg}[0]", window_size[0], minimum=-1)
    right = check_int(f"{arg}[1]", window_size[1], minimum=-1)
    return left, right
