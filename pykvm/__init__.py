"""pykvm: drive Linux KVM on x86-64 from Python, through ioctls on ``/dev/kvm``.

``Kvm`` -> ``Vm`` -> ``Vcpu`` own one file descriptor each; ``Vcpu.run()``
returns typed exits; ``pykvm.guests`` boots assembled guests that log every
vector they receive, so interrupt delivery is checked inside the guest.
"""

from .asm import Assembled, Mode, assemble
from .constants import Cap, ExitReason, IoDirection, MpState
from .errors import (AssemblerError, CapabilityMissing, ClosedError, GuestError,
                     GuestMemoryError, HostLimitation, InvalidVector, KvmError,
                     KvmUnavailableError, MemorySlotOverlap, NotReadyForInjection, PyKvmError,
                     StaleExitError)
from .exits import (DebugExit, Exit, FailEntryExit, HltExit, HypercallExit, InternalErrorExit,
                    IntrExit, IoExit, IrqWindowOpenExit, MmioExit, MsrExit, ShutdownExit,
                    SystemEventExit, UnknownExit)
from .host import HostInfo, VendorModule
from .host import detect as detect_host
from .kvm import Kvm
from .state import Regs, Segment, Sregs, VcpuEvents
from .vcpu import Vcpu
from .vm import Vm

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
