"""Input checks shared by every op: one place that binds dimension names to sizes and reports the
first conflict with the argument's name, what was expected and what came.

Example message::

    k: expected (batch_size=2, seqlen_k, num_heads_k, head_dim=128), got (2, 77, 4, 64)

Everything raises ``ValueError`` (wrong value/shape) or ``TypeError`` (wrong type/dtype);
never ``assert``.
"""
from __future__ import annotations

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
