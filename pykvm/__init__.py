"""pykvm: drive Linux KVM on x86-64 from Python, through ioctls on ``/dev/kvm``.

``Kvm`` -> ``Vm`` -> ``Vcpu`` own one file descriptor each; ``Vcpu.run()``
returns typed exits; ``pykvm.guests`` boots assembled guests that log every
vector they receive, so interrupt delivery is checked inside the guest.

The layers, each importing only those before it: :mod:`pykvm.core` (the
binding and the fd objects, one method per ioctl), :mod:`pykvm.injection`
(the rules for injecting: an interrupt only when ready, the exception
sequence), :mod:`pykvm.x86` (modes, descriptors, the assembler),
:mod:`pykvm.irqchip` (chip models, the userspace controller),
:mod:`pykvm.runtime` (vCPU threads, deadlines), :mod:`pykvm.guests` (the
images and their protocol), :mod:`pykvm.hosts` (detection, conformance,
probes, other hosts); the tools (``python -m pykvm.demo``, ``doctor``,
``bench``; ``pykvm --help`` lists them) sit on top.

Importing ``pykvm`` loads none of that: every name below is imported on its
first use (PEP 562's module ``__getattr__``), so a tool, ``pykvm --help`` or
a program that needs one layer pays only for what it uses (about 260 ms for
everything, measured on kvm_pvm, most of it assembling the guests' symbol
tables and compiling the exits' decoders).
"""
# ruff: noqa: F401  (the names are exported through __all__, which ruff cannot read: it is computed)

from __future__ import annotations

import importlib

# First: importing it guards a tool's imports (a Ctrl-C ends `python -m pykvm.boot` with 130, no traceback).
from . import startup

TYPE_CHECKING = False    # typing.TYPE_CHECKING, without importing typing (2.5 ms); mypy knows the name

__version__ = "0.1.0"

# Each public name and the module that defines it: the one list of what `from pykvm import NAME` offers.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".core.constants": ("Cap", "ExitReason", "IoDirection", "MpState"),
    ".core.errors": ("AssemblerError", "CapabilityMissing", "ClosedError", "GuestError", "GuestMemoryError",
                     "HostLimitation", "InvalidVector", "KvmError", "KvmUnavailableError", "MemorySlotOverlap",
                     "NotReadyForInjection", "PyKvmError", "StaleExitError"),
    ".core.exits": ("DebugExit", "Exit", "FailEntryExit", "HltExit", "HypercallExit", "InternalErrorExit",
                    "IntrExit", "IoExit", "IrqWindowOpenExit", "MmioExit", "MsrExit", "ShutdownExit",
                    "SystemEventExit", "UnknownExit"),
    ".core.state": ("Regs", "Segment", "Sregs", "VcpuEvents"),
    ".core.system": ("Kvm",),
    ".core.vcpu": ("Vcpu",),
    ".core.vm": ("Vm",),
    ".hosts": ("HostInfo", "VendorModule"),
    ".x86.asm": ("Assembled", "Mode", "assemble"),
}
_RENAMED = {"detect_host": (".hosts", "detect")}
_SUBPACKAGES = ("guests", "hosts", "injection", "irqchip", "runtime", "x86")
_WHERE = {name: (module, name) for module, names in _EXPORTS.items() for name in names} | _RENAMED

__all__ = [*_SUBPACKAGES, *_WHERE]


def __getattr__(name: str) -> Any:
    """``pykvm.NAME`` on first use: a name of :data:`__all__` from its module, or a submodule ``pykvm.NAME``."""
    if name in _WHERE:
        module, attribute = _WHERE[name]
        value = getattr(importlib.import_module(module, __name__), attribute)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise                           # the submodule exists; something it imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value                     # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:       # what type checkers and IDEs see: the same names, imported eagerly
    from typing import Any

    from . import guests, hosts, injection, irqchip, runtime, x86
    from .core.constants import Cap, ExitReason, IoDirection, MpState
    from .core.errors import (
        AssemblerError,
        CapabilityMissing,
        ClosedError,
        GuestError,
        GuestMemoryError,
        HostLimitation,
        InvalidVector,
        KvmError,
        KvmUnavailableError,
        MemorySlotOverlap,
        NotReadyForInjection,
        PyKvmError,
        StaleExitError,
    )
    from .core.exits import (
        DebugExit,
        Exit,
        FailEntryExit,
        HltExit,
        HypercallExit,
        InternalErrorExit,
        IntrExit,
        IoExit,
        IrqWindowOpenExit,
        MmioExit,
        MsrExit,
        ShutdownExit,
        SystemEventExit,
        UnknownExit,
    )
    from .core.state import Regs, Segment, Sregs, VcpuEvents
    from .core.system import Kvm
    from .core.vcpu import Vcpu
    from .core.vm import Vm
    from .hosts import HostInfo, VendorModule
    from .hosts import detect as detect_host
    from .x86.asm import Assembled, Mode, assemble
