"""Argument checks at the API boundary: every bad input gets a typed error naming it and the fix.

Why this exists: a bad argument that reaches cffi or an ioctl comes back as
"int too big to convert" or a bare EINVAL, with no word of which argument was
wrong. The public methods check their arguments with these helpers first, so
the message says ``vector=300: ...; use 0..255`` instead. Messages quote
values with a bounded repr, so a huge table never makes a huge message.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from .errors import ArgumentTypeError, InvalidArgument

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def shown(value: Any) -> str:
    """A repr of ``value`` at most about 80 characters long."""
    return _REPR.repr(value)


def integer(name: str, value: Any, low: int, high: int, fix: str = "") -> int:
    """``value`` as an int in ``[low, high]``, else a typed error naming ``name``; bool is refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name}={shown(value)}: expected an integer, got "
                                f"{type(value).__name__}{'; ' + fix if fix else ''}")
    if not low <= value <= high:
        raise InvalidArgument(f"{name}={_number(value)}: out of range {_number(low)}..{_number(high)}"
                              f"{'; ' + fix if fix else ''}")
    return int(value)


def unsigned(name: str, value: Any, bits: int, fix: str = "") -> int:
    """``value`` as an int that fits ``bits`` unsigned bits."""
    return integer(name, value, 0, (1 << bits) - 1, fix or f"it is a {bits}-bit unsigned field")


def data(name: str, value: Any) -> bytes:
    """``value`` as bytes (bytes, bytearray or memoryview), else a typed error naming ``name``."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"{name}={shown(value)}: expected bytes (or bytearray / memoryview), "
                                f"got {type(value).__name__}")
    return bytes(value)


def instance(name: str, value: Any, kind: type | tuple[type, ...], fix: str = "") -> Any:
    """``value`` if it is a ``kind``, else a typed error naming ``name`` and what was expected."""
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ArgumentTypeError(f"{name}={shown(value)}: expected {expected}, got "
                                f"{type(value).__name__}{'; ' + fix if fix else ''}")
    return value


def seconds(name: str, value: Any, fix: str = "") -> float:
    """``value`` as a finite number of seconds > 0, else a typed error naming ``name``; bool is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name}={shown(value)}: expected a number of seconds, got {type(value).__name__}"
                                f"{'; ' + fix if fix else ''}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name}={shown(value)}: expected a finite number of seconds > 0"
                              f"{'; ' + fix if fix else ''}")
    return float(value)


def function(name: str, value: Any, signature: str) -> Any:
    """``value`` if it is callable, else a typed error naming ``name`` and the call expected."""
    if not callable(value):
        raise ArgumentTypeError(f"{name}={shown(value)}: expected a callable {signature}, got "
                                f"{type(value).__name__}")
    return value


def _number(value: int) -> str:
    return f"{value:#x}" if abs(value) >= 4096 else str(value)
