"""x86 vectors: exception names, which push an error code, vector sets from bitmaps.

Why this exists: the log, the doctor and the tests print ``#GP (13)`` rather than
13, and several chips report vectors as 256-bit bitmaps (ISR, IRR, TMR).
Exception facts from the Intel SDM Vol. 3A table "Protected-Mode Exceptions and
Interrupts".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from ..core.interrupts import ERROR_CODE_VECTORS as ERROR_CODE_VECTORS  # re-exported: one name for the fact


class Vector(enum.IntEnum):
    """Architectural exception vectors (mnemonics as in the Intel SDM)."""

    DE = 0    # divide error
    DB = 1    # debug
    NMI = 2   # non-maskable interrupt
    BP = 3    # breakpoint (INT3)
    OF = 4    # overflow (INTO)
    BR = 5    # BOUND range exceeded
    UD = 6    # invalid opcode
    NM = 7    # device not available
    DF = 8    # double fault
    TS = 10   # invalid TSS
    NP = 11   # segment not present
    SS = 12   # stack-segment fault
    GP = 13   # general protection
    PF = 14   # page fault
    MF = 16   # x87 floating-point error
    AC = 17   # alignment check
    MC = 18   # machine check
    XM = 19   # SIMD floating-point
    VE = 20   # virtualization exception
    CP = 21   # control protection


# ERROR_CODE_VECTORS (imported from pykvm.core.interrupts; pykvm.injection.Injector.exception
# checks it): the exceptions that push an error code in protected and
# long mode (never in real mode).
FIRST_EXTERNAL_VECTOR = 32


def vector_name(vector: int) -> str:
    """``#GP (13)`` for exceptions, ``NMI (2)``, ``vector 0x30`` for the rest."""
    if vector == Vector.NMI:
        return "NMI (2)"
    try:
        return f"#{Vector(vector).name} ({vector})"
    except ValueError:
        return f"vector {vector:#04x}"


def vector_set(bitmap_words: Iterable[int]) -> frozenset[int]:
    """The vectors whose bits are set in 32-bit ``bitmap_words`` (word 0 holds vectors 0..31)."""
    return frozenset(32 * word + bit for word, value in enumerate(bitmap_words)
                     for bit in range(32) if value >> bit & 1)
