"""The packaged guest images: load one, boot it on a vCPU, or boot a whole VM.

Why this exists: a test author wants "a long-mode guest that logs every vector"
in one line. The images (``guests/{real,protected,long}.S``, assembled at
install time) install handlers for all 256 vectors; this module finds them,
loads one into a VM and starts a :class:`~pykvm.guests.session.GuestSession`
on each vCPU::

    with pykvm.guests.boot("long") as guest:
        guest.command(Command.STI)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import checks
from ..core.errors import GuestError, InvalidArgument, PyKvmError
from ..core.exits import ExitExplainer
from ..core.vm import Vm
from ..x86.asm import Mode, label_address, mode_of
from .session import GuestSession

if TYPE_CHECKING:
    from ..core.system import Kvm

IMAGES_DIR = Path(__file__).resolve().parent / "images"
MODES = tuple(mode.value for mode in Mode)


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """An assembled guest: flat code, label addresses and the mode it runs in."""

    mode: Mode
    code: bytes
    origin: int
    symbols: dict[str, int]

    @property
    def source(self) -> Path:
        """The GNU-assembler source the image was built from (shipped beside it)."""
        return IMAGES_DIR / f"{self.mode.value}.S"

    def address(self, symbol: str) -> int:
        """A label's address: what RIP (IP in real mode) holds there."""
        return label_address(self.symbols, symbol, f"the {self.mode.value}-mode guest image")

    def boot(self, vcpu, notify: bool = False, explain: ExitExplainer | None = None) -> GuestSession:
        """Load the image into the vCPU's VM, enter its mode and run to the first sync point.

        ``explain``: see :class:`~pykvm.guests.session.GuestSession` (e.g. :func:`pykvm.hosts.explain_exit`).
        """
        session = GuestSession(self, vcpu, notify, explain)
        session.start()
        return session


def load(mode: Mode | str) -> GuestImage:
    """The packaged image for ``"real"``, ``"protected"`` or ``"long"`` mode."""
    return _load(mode_of(mode))


@functools.cache
def _load(mode: Mode) -> GuestImage:
    binary, meta = IMAGES_DIR / f"{mode.value}.bin", IMAGES_DIR / f"{mode.value}.json"
    if not binary.exists() or not meta.exists():
        raise PyKvmError(f"guest image {binary} is missing: the images are assembled at install "
                         f"time; reinstall pykvm (`pip install -e .`) with binutils present")
    info = json.loads(meta.read_text())
    return GuestImage(mode, binary.read_bytes(), info["origin"], info["symbols"])


@dataclasses.dataclass
class BootedGuest:
    """``boot()``'s result: one guest session per vCPU, owning their Kvm and Vm (closed together).

    ``with boot("long") as guest:`` gives the session of the only vCPU;
    ``with boot("long", cpus=2) as (bsp, ap):`` gives every vCPU's session.
    """

    cpus: list[GuestSession]
    kvm: Kvm
    vm: Vm

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()

    def __enter__(self) -> Any:
        return self.cpus[0] if len(self.cpus) == 1 else tuple(self.cpus)

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def boot_cpus(vm: Vm, mode: Mode | str = Mode.LONG, cpus: int = 1, notify: bool = False,
              explain: ExitExplainer | None = None) -> list[GuestSession]:
    """Create ``cpus`` vCPUs on ``vm`` and boot the ``mode`` image on each (SMP: long mode only).

    ``explain``: see :class:`~pykvm.guests.session.GuestSession` (e.g. :func:`pykvm.hosts.explain_exit`).
    """
    checks.instance("vm", vm, Vm, "the VM to create the vCPUs in, e.g. kvm.create_vm()")
    image = load(mode)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise InvalidArgument(f"cpus={cpus!r}: boot at least one vCPU (an integer >= 1)")
    if cpus > 1 and image.mode != Mode.LONG:
        raise GuestError(f"only the long-mode image is SMP-aware; boot {cpus} vCPUs with mode='long'")
    return [image.boot(vm.create_vcpu(), notify=notify, explain=explain) for _ in range(cpus)]


def boot(mode: Mode | str = Mode.LONG, notify: bool = False, memory_size: int | None = None,
         irqchip: str = "none", cpus: int = 1, explain: ExitExplainer | None = None) -> BootedGuest:
    """Open ``/dev/kvm``, create a VM with ``cpus`` vCPUs and boot the ``mode`` image on each.

    ``with boot("long") as guest:`` (one vCPU) or ``with boot(cpus=2) as (bsp, ap):``;
    ``explain``: see :class:`~pykvm.guests.session.GuestSession` (e.g. :func:`pykvm.hosts.explain_exit`).
    """
    from ..core.system import Kvm
    kvm = Kvm()
    vm = None
    try:
        vm = kvm.create_vm(memory_size=memory_size, irqchip=irqchip)
        return BootedGuest(boot_cpus(vm, mode, cpus, notify, explain), kvm, vm)
    except BaseException:
        if vm is not None:
            vm.close()
        kvm.close()
        raise
