"""pykvm: drive Linux KVM on x86-64 from Python, through ioctls on ``/dev/kvm``.

``Kvm`` -> ``Vm`` -> ``Vcpu`` own one file descriptor each; ``Vcpu.run()``
returns typed exits; ``pykvm.guests`` boots assembled guests that log every
vector they receive, so interrupt delivery is checked inside the guest.

The layers, each importing only those before it: :mod:`pykvm.core` (the
binding and the fd objects), :mod:`pykvm.x86` (modes, descriptors, the
assembler), :mod:`pykvm.irqchip` (chip models, the userspace controller),
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
import sys

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
_SUBPACKAGES = ("guests", "hosts", "irqchip", "runtime", "x86")
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


def _explain_with_hosts(vcpu: object, exit: object) -> None:
    """The first FAIL_ENTRY or INTERNAL_ERROR exit's explainer: import :mod:`pykvm.hosts`, no more.

    Importing it registers :func:`pykvm.hosts.limits.explain_exit` with the core, after this one in the
    list the core is iterating, so it explains this exit too and every later one.
    """
    importlib.import_module(".hosts", __name__)


class _WireExitExplainers:
    """Registers :func:`_explain_with_hosts` with :mod:`pykvm.core.exits` as that module is imported.

    The core never imports the hosts layer, which knows what an entry failure means on each host; the
    eager package imported it for everyone. Now this finder, left on ``sys.meta_path`` until the core's
    exits module loads, wires the two without importing either before a program needs them: it finds the
    module as the other finders do and wraps that spec's loader (never changing the loader itself, which
    may serve other modules: pytest's assertion rewriter does).
    """

    MODULE = f"{__name__}.core.exits"

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        if name != self.MODULE:
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenWire(spec.loader)       # type: ignore[assignment]  # a loader by its two methods
        return spec


class _ThenWire:
    """A loader that runs ``loader`` and then registers the explainer; the module keeps ``loader`` as its own."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        module.add_explainer(_explain_with_hosts)


if f"{__name__}.core.exits" not in sys.modules:
    sys.meta_path.insert(0, _WireExitExplainers())


if TYPE_CHECKING:       # what type checkers and IDEs see: the same names, imported eagerly
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

    from . import guests, hosts, irqchip, runtime, x86
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
