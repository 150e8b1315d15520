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
``bench``) sit on top.
"""

# First: importing it guards the imports below (a Ctrl-C ends `python -m pykvm.boot` with 130, no traceback).
from . import startup  # noqa: F401

# isort: split
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

__version__ = "0.1.0"

__all__ = [
    "guests",
    "hosts",
    "irqchip",
    "runtime",
    "x86",
    "Cap",
    "ExitReason",
    "IoDirection",
    "MpState",
    "AssemblerError",
    "CapabilityMissing",
    "ClosedError",
    "GuestError",
    "GuestMemoryError",
    "HostLimitation",
    "InvalidVector",
    "KvmError",
    "KvmUnavailableError",
    "MemorySlotOverlap",
    "NotReadyForInjection",
    "PyKvmError",
    "StaleExitError",
    "DebugExit",
    "Exit",
    "FailEntryExit",
    "HltExit",
    "HypercallExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "IrqWindowOpenExit",
    "MmioExit",
    "MsrExit",
    "ShutdownExit",
    "SystemEventExit",
    "UnknownExit",
    "Regs",
    "Segment",
    "Sregs",
    "VcpuEvents",
    "Kvm",
    "Vcpu",
    "Vm",
    "HostInfo",
    "VendorModule",
    "detect_host",
    "Assembled",
    "Mode",
    "assemble",
]
