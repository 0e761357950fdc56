"""Flag validation shared by the nn modules (the functional ops take only real bools, too)."""
from __future__ import annotations

from .._checks import _np_bool


def check_flag(arg: str, value) -> bool:
    """``value`` as a Python bool; it must be a bool or a ``numpy.bool_`` (TypeError naming ``arg`` otherwise,
    so that e.g. ``causal="no"`` or ``causal=0`` is not silently read as truthy/falsy)."""
    if not isinstance(value, (bool, _np_bool())):
        raise TypeError(f"{arg}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)
