"""``Machine``: a small PC that boots a Multiboot kernel on KVM, one thread per vCPU.

Why this exists: ``python -m pykvm.boot`` and tests that boot a kernel and
assert its serial output share this. The machine is KVM's in-kernel irqchip
(PIC, IOAPIC, LAPICs) and PIT plus the userspace devices of this package on
the IO bus: COM1 (:mod:`.serial`), the debug-exit port (:mod:`.debug_exit`),
fw_cfg (:mod:`.fw_cfg`), CMOS/RTC (:mod:`.cmos`), pc-testdev's IRQ lines, echo
and flush-page ports and MMIO scratch window (:mod:`.testdev`), the VMware
backdoor port (:mod:`.vmware_backdoor`), PCI bus 0 with its host bridge
(:mod:`.pci`; ``devices=("pci-testdev",)`` adds :mod:`.pci_testdev`, ``"edu"``
:mod:`.edu`, and on ``chipset="q35"`` ``"intel-iommu"`` the VT-d unit of
:mod:`.vtd` in front of them), the ACPI
tables (:mod:`.acpi`), PM1 block and PM timer (:mod:`.pm1`, :mod:`.pm_timer`),
the reset ports (:mod:`.reset`), the HPET on the MMIO bus (:mod:`.hpet`), and
ports 0x61 and 0x80 tolerated. Users add devices
for more ports or MMIO ranges with :meth:`Machine.add_io` and
:meth:`Machine.add_mmio` (an object with ``read(offset, size)`` and
``write(offset, size, value)``). No firmware: the Multiboot loader
(:mod:`.multiboot`) writes the kernel and its information, the machine the
ACPI tables that describe it (:mod:`.acpi`), and the BSP starts
at the entry point in 32-bit protected mode (EAX=0x2BADB002, EBX=info, flat
segments, paging and interrupts off). Every vCPU is created before the guest
starts; the APs wait in the in-kernel LAPIC for INIT and SIPI.

:meth:`Machine.run` returns a :class:`BootResult`: the exit status (the
guest's own through the debug-exit port, or one of the ``STATUS_*`` below),
how the run ended and why, the serial transcript, the accesses no device
claimed, the exits to userspace per port and MMIO address
(:class:`~pykvm.vmm.bus.ExitSite`), and timings. Whatever ends it (the
guest, a triple fault, a timeout, Ctrl-C), every vCPU thread is kicked out of
``KVM_RUN`` and joined before the VM is closed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import select
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from ..core.errors import ClosedError, InvalidArgument, InvalidMsi, KvmBusy
from ..core.exits import (
    FailEntryExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
)
from ..core.interrupts import MsiMessage
from ..core.state import Regs, Segment
from ..core.system import Kvm
from ..runtime.threads import VcpuThread
from . import (
    acpi,
    cmos,
    cpu_model,
    debug_exit,
    fw_cfg,
    hpet,
    multiboot,
    pci,
    pci_testdev,
    pm1,
    pm_timer,
    reset,
    serial,
    testdev,
    vmware_backdoor,
)
from .bus import Device, ExitSite, IoBus, MmioBus, UnknownAccess

if TYPE_CHECKING:
    from . import edu, vtd  # imported when a machine has the device: the boot command starts without them

STATUS_POWER_OFF = 0        # KVM_EXIT_SYSTEM_EVENT, ACPI S5, or a reset (QEMU -no-reboot exits 0 too)
STATUS_TRIPLE_FAULT = 4     # KVM_EXIT_SHUTDOWN
STATUS_INTERNAL_ERROR = 6   # KVM_EXIT_INTERNAL_ERROR, FAIL_ENTRY, an unexpected exit, a device that raised
STATUS_STRICT_IO = 8        # --strict-io: the guest touched a port or MMIO address no device claims
STATUS_TIMEOUT = 124        # as timeout(1)
DEFAULT_MEMORY_MIB = 128
TOLERATED_PORTS = ((0x61, 1, "port 0x61 (system control B)"), (0x80, 1, "port 0x80 (POST code)"))
CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
OPTIONAL_DEVICES = ("pci-testdev", "edu", "intel-iommu")     # Machine(devices=...), python -m pykvm.boot --device
CHIPSETS = ("i440fx", "q35")
# The first PCI device number QEMU gives a -device: the i440FX PC's ISA bridge is at 00:01.0, the
# q35's at 00:1f.0. Optional devices take the next numbers in the order given (pci-testdev, edu).
FIRST_FREE_DEVICE = {"i440fx": pci_testdev.DEVICE, "q35": 1}
EDU_INTX_GSI = 11           # the IOAPIC pin the machine (as firmware) routes edu's INTA to
STDIN_POLL = 0.05


class Ending(enum.Enum):
    """How a run ended."""

    EXIT_PORT = "debug-exit port"
    POWER_OFF = "power off"
    RESET = "reset"
    TRIPLE_FAULT = "triple fault"
    INTERNAL_ERROR = "internal error"
    STRICT_IO = "unknown IO (--strict-io)"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclasses.dataclass
class BootResult:
    """What a run gave: ``status`` (the process exit status), how it ended, the serial transcript."""

    status: int
    ending: Ending
    message: str
    exit_code: int | None               # the value written to the debug-exit port
    serial: bytes
    unknown: list[UnknownAccess]
    exits: dict[int, int]               # exits to userspace per vCPU id
    first_byte: float | None            # seconds from run() to the first serial byte
    elapsed: float                      # seconds from run() to the end of the guest
    error: BaseException | None = dataclasses.field(default=None, repr=False)
    in_kvm_run: dict[int, float] = dataclasses.field(default_factory=dict)    # seconds inside KVM_RUN per vCPU id
    asleep: float = 0.0                 # seconds the machine slept in ACPI S3, waiting for its wake event
    exit_sites: dict[ExitSite, int] = dataclasses.field(default_factory=dict)   # IO/MMIO exits per site, all vCPUs

    @property
    def guest_seconds(self) -> float:
        """The boot processor's (vCPU 0's) seconds inside ``KVM_RUN`` plus the machine's in S3: the guest's own time.

        The rest of ``elapsed`` is this process's: handling exits in Python,
        starting and joining the vCPU threads. Any VMM pays the guest's own time
        to run the same kernel on the same KVM; a run ends when vCPU 0 writes
        the debug-exit port, so the other vCPUs' time runs beside it.
        """
        return self.in_kvm_run.get(0, 0.0) + self.asleep

    @property
    def text(self) -> str:
        """The serial transcript as text (undecodable bytes replaced)."""
        return self.serial.decode(errors="replace")

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


class _Tolerated:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class Machine:
    """A PC for one Multiboot kernel: ``Machine("kernel.elf", cpus=2).run(timeout=10)``.

    ``kernel`` is a path or the image's bytes; ``memory`` is in MiB; ``cmdline``
    is what QEMU's ``-append`` gives: the kernel's Multiboot command line is
    ``"KERNEL CMDLINE"`` (:func:`~pykvm.vmm.multiboot.command_line`), KERNEL
    being the path as given (``"kernel"`` for an image given as bytes), which
    kvm-unit-tests and other Multiboot kernels take as argv[0]; fw_cfg's
    command-line item holds ``cmdline`` alone. ``modules`` are boot modules
    (paths or bytes, e.g. an initrd). A kernel or module path must be a
    regular file no larger than the guest's RAM (never a FIFO or a device).
    ``serial_output`` is a binary stream that gets every byte the guest
    transmits as it comes (the transcript is kept either way); ``stdin=True``
    feeds this process's standard input to COM1 (a terminal is put in cbreak
    mode meanwhile); ``strict_io`` makes the first access no device claims end
    the run; ``trace`` is a text stream that gets one line per exit.
    ``devices`` names optional devices to add, as QEMU's ``-device``:
    ``"pci-testdev"`` (:mod:`.pci_testdev`), ``"edu"`` (:mod:`.edu`) and, on
    ``chipset="q35"`` only, ``"intel-iommu"`` (:mod:`.vtd`; ``intremap=True``
    adds interrupt remapping). ``chipset`` is QEMU's ``-machine``: ``"i440fx"``
    (``pc``, the default) or ``"q35"`` (its host bridge's IDs). The PCI
    devices take device numbers in the order given, from 2 on i440fx and 1 on
    q35, as QEMU numbers them (``("pci-testdev", "edu")`` on q35: 00:01.0 and
    00:02.0). ``pit=False`` leaves the PIT out
    (QEMU's ``-machine pit=off``); ``pit_reinject=False`` drops the ticks a
    guest was late to take instead of re-injecting them (``KVM_REINJECT_CONTROL``;
    QEMU's ``-global kvm-pit.lost_tick_policy=discard``). ``overcommit=True``
    allows more RAM than the host has available, mapped lazily as QEMU maps
    ``-m`` (a test kernel touches little of it); without it such a machine is
    refused before it starts. ``cpu`` is a QEMU ``-cpu`` string
    (default ``qemu64``, QEMU's; see :mod:`.cpu_model`): each feature KVM lacks
    is dropped with a :class:`~pykvm.vmm.cpu_model.CpuFeatureWarning` when the
    run starts. The kernel, modules and ``cpu`` are read and parsed here, so a
    bad one fails at once with an :class:`~pykvm.core.errors.InvalidArgument` (a
    file that is not one), a :class:`~pykvm.vmm.multiboot.MultibootError` (an
    image that is not one) or a :class:`~pykvm.vmm.cpu_model.CpuModelError`.
    """

    def __init__(self, kernel: str | os.PathLike | bytes, cpus: int = 1, memory: int = DEFAULT_MEMORY_MIB,
                 cmdline: str = "", modules: Sequence[str | os.PathLike | bytes] = (), *,
                 serial_output: IO[bytes] | None = None, stdin: bool = False, strict_io: bool = False,
                 trace: IO[str] | None = None, kvm: Kvm | None = None, devices: Sequence[str] = (),
                 cpu: str | cpu_model.CpuSpec | None = None, pit: bool = True, pit_reinject: bool = True,
                 overcommit: bool = False, chipset: str = "i440fx", intremap: bool = False) -> None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 255:
            raise InvalidArgument(f"cpus={cpus!r}: expected 1 to 255 vCPUs")
        for name, value in (("pit", pit), ("pit_reinject", pit_reinject), ("overcommit", overcommit),
                            ("intremap", intremap)):
            if not isinstance(value, bool):
                raise InvalidArgument(f"{name}={value!r}: expected True or False")
        self.pit, self.pit_reinject, self.overcommit = pit, pit_reinject, overcommit
        if isinstance(memory, bool) or not isinstance(memory, int) or not 2 <= memory <= 1 << 20:
            raise InvalidArgument(f"memory={memory!r}: expected MiB of RAM, 2 to 1048576")
        _check_cmdline(cmdline)
        self.cpus = cpus
        self.memory = memory << 20
        name, data = _read(kernel, "kernel", self.memory)
        self.kernel_name = name
        self.image = multiboot.parse(data, name)
        self.cmdline = cmdline
        self.boot_cmdline = multiboot.command_line(name, cmdline)      # what the kernel reads
        self.modules = []
        for index, module in enumerate(modules):
            module_name, module_data = _read(module, f"module {index}", self.memory)
            self.modules.append(multiboot.Module(module_data, module_name))
        self.layout = multiboot.place(self.image, self.memory, self.boot_cmdline, self.modules, name)
        self.cpu = cpu_model.parse(cpu)
        self.strict_io = strict_io
        self._serial_output = serial_output
        self._stdin = stdin
        self._trace = trace
        self._kvm = kvm
        self.io = IoBus()
        self.mmio = MmioBus()
        self._lock = threading.RLock()          # devices are called from every vCPU thread
        self._vm: Any = None
        self._used = False
        self.fw_cfg = fw_cfg.FwCfg.for_machine(self.memory, cpus, cpus, cmdline, self.layout.e820)
        self.uart = serial.Uart16550(self._transmit, functools.partial(self._irq, serial.COM1_IRQ))
        self.irq_lines = testdev.IrqLines(self._irq)
        ranges = multiboot.ram_ranges(self.memory)
        self.cmos = cmos.Cmos(ranges[0][1], sum(size for _, size in ranges[1:]))
        self.add_io(serial.COM1, serial.PORTS, self.uart, "COM1 (16550A)")
        self.add_io(debug_exit.PORT, debug_exit.PORTS, debug_exit.DebugExit(self._guest_exit), "debug exit")
        self.add_io(fw_cfg.SELECTOR_PORT, fw_cfg.PORTS, self.fw_cfg, "fw_cfg")
        self.add_io(cmos.INDEX_PORT, cmos.PORTS, self.cmos, "CMOS/RTC")
        self.add_io(testdev.IRQ_BASE, testdev.IRQ_LINES, self.irq_lines, "test IRQ lines")
        self.add_io(testdev.ECHO_PORT, testdev.ECHO_PORTS, testdev.Scratch(testdev.ECHO_PORTS), "test echo port")
        self.add_io(testdev.FLUSH_PORT, testdev.FLUSH_PORTS, testdev.FlushPage(self._memory), "test flush page")
        self.add_mmio(testdev.IORAM_BASE, testdev.IORAM_SIZE, testdev.Scratch(testdev.IORAM_SIZE), "test MMIO")
        self._add_platform()
        for port, length, what in TOLERATED_PORTS:
            self.add_io(port, length, _Tolerated(), what)
        self._current = threading.local()       # .vcpu: the vCPU of this thread
        self.add_io(vmware_backdoor.PORT, vmware_backdoor.PORTS, vmware_backdoor.VmwareBackdoor(self._current_vcpu),
                    "VMware backdoor")
        self._add_pci(_check_devices(devices), _check_chipset(chipset, devices, intremap), intremap)
        for claim in self.pci.claims():
            (self.add_io if claim.io else self.add_mmio)(claim.base, claim.length, claim.device, claim.name)
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._serial = bytearray()
        self._first_byte: float | None = None
        self._start = 0.0
        self._unknown: dict[tuple[str, int], UnknownAccess] = {}
        self._done = threading.Event()
        self._ending: tuple[Ending, int, str, int | None, BaseException | None] | None = None
        self._end_time = 0.0
        self._exits: dict[int, int] = {}
        self._in_kvm_run: dict[int, float] = {}
        self._asleep = 0.0
        self._sites: dict[tuple[str, int, bool], int] = {}

    # -- devices ------------------------------------------------------------------
    def _add_platform(self) -> None:
        """The ACPI devices, the reset ports, and the ACPI tables describing them (``self.acpi``)."""
        self.pm1 = pm1.Pm1(self._sleep)
        self.pm_timer = pm_timer.PmTimer()
        self.hpet = hpet.Hpet()
        self.add_io(pm1.EVENT_PORT, pm1.PORTS, self.pm1, "ACPI PM1a event/control")
        self.add_io(pm_timer.PORT, pm_timer.PORTS, self.pm_timer, "ACPI PM timer")
        self.add_io(reset.PORT_92, 1, reset.SystemControlA(self._reset), "port 0x92 (system control A)")
        self.add_io(reset.RESET_CONTROL_PORT, 1, reset.ResetControl(self._reset), "reset control (0xcf9)")
        self.add_io(reset.KBC_COMMAND_PORT, 1, reset.KeyboardController(self._reset), "8042 command/status")
        self.add_mmio(hpet.BASE, hpet.SIZE, self.hpet, "HPET")
        self.acpi = acpi.build(acpi.Platform(
            apic_ids=tuple(range(self.cpus)),       # vCPU ids 0..n-1, and KVM's APIC ID is the vCPU id
            pm1_event_port=pm1.EVENT_PORT, pm1_control_port=pm1.CONTROL_PORT, pm_timer_port=pm_timer.PORT,
            pm_timer_bits=self.pm_timer.bits, reset_port=reset.RESET_CONTROL_PORT, reset_value=reset.ACPI_VALUE,
            sleep_states=((3, pm1.SleepType.S3), (5, pm1.SleepType.S5)),
            hpet_address=hpet.BASE, hpet_block_id=self.hpet.capabilities & 0xFFFFFFFF))

    def _add_pci(self, devices: tuple[str, ...], chipset: str, intremap: bool) -> None:
        """PCI bus 0 with the ``devices`` asked for, and the IOMMU (``self.iommu``) in front of them."""
        self.pci = pci.PciHost(pci.Q35_HOST_BRIDGE if chipset == "q35" else pci.HOST_BRIDGE)
        self.iommu: vtd.Vtd | None = None
        if "intel-iommu" in devices:
            from . import vtd
            self.iommu = vtd.Vtd(self._memory, self._signal_msi, intremap)
            self.add_mmio(vtd.BASE, vtd.SIZE, self.iommu, "Intel VT-d (intel-iommu)")
        number = FIRST_FREE_DEVICE[chipset]
        for name in (name for name in devices if name != "intel-iommu"):
            self.pci.add(number, pci_testdev.PciTestdev(lambda: self._vm) if name == "pci-testdev" else
                         self._edu(source=number << 3))     # bus 0, the device, function 0: its requester ID
            number += 1

    def _edu(self, source: int) -> edu.Edu:
        """QEMU's edu device with requester ID ``source``, its DMA through the IOMMU if there is one."""
        from .edu import Edu
        return Edu(self._memory, functools.partial(self._dma, source), self._pci_intx,
                   functools.partial(self._device_msi, source), EDU_INTX_GSI)

    def _dma(self, source: int, address: int, size: int, write: bool) -> list[tuple[int, int]]:
        return [(address, size)] if self.iommu is None else self.iommu.dma(source, address, size, write)

    def _device_msi(self, source: int, address: int, data: int) -> None:
        """A PCI device's MSI, remapped by the IOMMU if there is one."""
        if self.iommu is not None:
            message = self.iommu.remap_msi(source, address, data)
        else:
            try:
                message = MsiMessage(address & 0xFFFFFFFF, address >> 32, data)
            except InvalidMsi:          # not an interrupt message: a write nothing decodes
                message = None
        if message is not None:
            self._signal_msi(message)

    def _signal_msi(self, message: MsiMessage) -> None:
        vm = self._vm
        if vm is not None:
            vm.signal_msi(message)

    def _pci_intx(self, gsi: int, level: int) -> None:
        """A PCI device's INTx line: KVM's IOAPIC pin, unless the pin's entry is in the IOMMU's remappable format.

        KVM's IOAPIC reads such an entry (bit 48 set) in compatibility format, so
        with interrupt remapping on, the machine plays the remapping IOAPIC of
        QEMU's split irqchip: on the rising edge of an unmasked pin, the IOMMU
        turns the entry's handle into the message sent (an edge; no remote IRR).
        """
        vm = self._vm
        if vm is None:
            return
        if self.iommu is None or not self._remapped_intx(vm, gsi, level):
            vm.irq_line(gsi, level)

    def _remapped_intx(self, vm: Any, gsi: int, level: int) -> bool:
        """Send pin ``gsi``'s edge through the IOMMU if its entry is remappable (True), else False."""
        from .vtd import Global  # loaded with the IOMMU
        assert self.iommu is not None
        if not self.iommu.status & Global.IRE:
            return False
        from ..irqchip import ioapic  # here: only remapping reads the IOAPIC (boot stays light)
        entry = ioapic.read(vm).entry_bits(gsi)
        if not entry >> 48 & 1:
            return False
        message = self.iommu.remap_ioapic(entry) if level and not entry >> 16 & 1 else None
        if message is not None:
            vm.signal_msi(message)
        return True

    def add_io(self, base: int, length: int, device: Device, name: str = "") -> None:
        """Put ``device`` on IO ports ``base .. base + length - 1`` (before :meth:`run`)."""
        _check_device(device)
        self.io.register(base, length, device, name)

    def add_mmio(self, base: int, length: int, device: Device, name: str = "") -> None:
        """Put ``device`` on guest-physical ``base .. base + length - 1``, outside RAM (before :meth:`run`)."""
        _check_device(device)
        for start, size in multiboot.ram_ranges(self.memory):
            if base < start + size and start < base + length:
                raise InvalidArgument(f"MMIO range {base:#x}+{length:#x} overlaps RAM at {start:#x}-"
                                      f"{start + size:#x}; choose an address outside RAM (e.g. 0xd0000000)")
        self.mmio.register(base, length, device, name)

    def _current_vcpu(self) -> Any:
        return self._current.vcpu

    def _memory(self) -> Any:
        vm = self._vm
        return None if vm is None else vm.memory

    def _transmit(self, data: bytes) -> None:
        if self._first_byte is None:
            self._first_byte = time.perf_counter() - self._start
        self._serial += data
        stream = self._serial_output
        if stream is not None:
            stream.write(data)
            stream.flush()

    def _irq(self, gsi: int, level: int) -> None:
        vm = self._vm
        if vm is not None:
            vm.irq_line(gsi, level)

    def _guest_exit(self, value: int) -> None:
        self._finish(Ending.EXIT_PORT, debug_exit.status_of(value),
                     f"the guest wrote {value:#x} to the debug-exit port", value)

    def _reset(self, reason: str) -> None:
        self._finish(Ending.RESET, STATUS_POWER_OFF, f"the guest reset the machine through {reason}; there is "
                                                     f"no firmware to reboot through (as QEMU's -no-reboot)")

    def _sleep(self, state: pm1.SleepType) -> None:
        if state == pm1.SleepType.S5:
            self._finish(Ending.POWER_OFF, STATUS_POWER_OFF, "the guest entered ACPI S5 (soft off)")
        else:
            self._done.set()            # S3: run() stops every vCPU and sleeps until the wake event

    # -- running ------------------------------------------------------------------
    def run(self, timeout: float | None = None, *, begun: float | None = None) -> BootResult:
        """Boot the kernel and run until it exits, faults, or ``timeout`` seconds pass; once per Machine.

        ``timeout`` counts from ``begun`` (a ``time.perf_counter()`` value; default: this call), so a
        caller can count the loading in, as ``python -m pykvm.boot --timeout`` does; setting up the
        VM and writing the kernel into it count either way.
        """
        if self._used:
            raise InvalidArgument("this Machine has already run; make a new one for another boot")
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise InvalidArgument(f"timeout={timeout!r}: expected a finite number of seconds > 0, or None "
                                  f"for no limit")
        self._used = True
        self._start = time.perf_counter()
        deadline = None if timeout is None else (self._start if begun is None else begun) + timeout
        own_kvm = self._kvm is None
        kvm = Kvm() if own_kvm else self._kvm
        assert kvm is not None
        threads: list[VcpuThread] = []
        terminal = None
        try:
            ranges = multiboot.ram_ranges(self.memory)
            with kvm.create_vm(memory_size=ranges[0][1], irqchip="kernel", pit=self.pit,
                               allow_overcommit=self.overcommit) as vm:
                if self.pit and not self.pit_reinject:
                    vm.reinject_control(pit_reinject=False)
                for address, size in ranges[1:]:
                    vm.memory.add_slot(address, size, allow_overcommit=self.overcommit)
                for address, data in self.layout.writes + self.acpi.writes:
                    vm.memory.write(address, data)
                guest_cpu = self.cpu.resolve(cpu_model.HostCpu.probe(kvm), self.cpus)
                for message in guest_cpu.warnings:
                    warnings.warn(message, cpu_model.CpuFeatureWarning, stacklevel=2)
                vcpus = [vm.create_vcpu(cpuid=False) for _ in range(self.cpus)]
                for vcpu in vcpus:
                    guest_cpu.apply(vcpu)
                _enter_multiboot(vcpus[0], self.layout)
                self._vm = vm
                threads += self._start_vcpus(vcpus)
                if self._stdin:
                    terminal = _cbreak(sys.stdin.fileno())
                    threading.Thread(target=self._read_stdin, daemon=True, name="pykvm-boot-stdin").start()
                try:
                    while not self._wait(deadline, timeout):      # False: the guest suspended to S3
                        self._stop(threads)
                        threads[:] = self._suspend(vcpus, deadline, timeout)
                finally:
                    self._stop(threads)
                    self._vm = None
        finally:
            if terminal is not None:
                terminal()
            if own_kvm:
                kvm.close()
        assert self._ending is not None
        ending, status, message, code, error = self._ending
        return BootResult(status, ending, message, code, bytes(self._serial), list(self._unknown.values()),
                          dict(self._exits), self._first_byte, self._end_time - self._start, error,
                          dict(self._in_kvm_run), self._asleep,
                          {ExitSite(*site): count for site, count in sorted(self._sites.items())})

    def _start_vcpus(self, vcpus: list) -> list[VcpuThread]:
        return [VcpuThread(vcpu, functools.partial(self._vcpu_thread, vcpu), name=f"pykvm-boot-vcpu{vcpu.id}")
                for vcpu in vcpus]

    def _wait(self, deadline: float | None, timeout: float | None) -> bool:
        """Wait for the end of the run (True) or a suspend to S3 (False: ``_done`` set, no ending)."""
        if not self._done.wait(None if deadline is None else max(0.0, deadline - time.perf_counter())):
            self._finish(Ending.TIMEOUT, STATUS_TIMEOUT, f"the guest was still running after {timeout:g} s; stopped")
        return self._ending is not None

    def _suspend(self, vcpus: list, deadline: float | None, timeout: float | None) -> list[VcpuThread]:
        """S3 with every vCPU stopped: sleep until the RTC alarm wakes the machine (RTC_EN), then resume
        at the FACS waking vector with new vCPU threads; [] when the run ends instead."""
        if self._ending is not None:     # another vCPU ended the run meanwhile
            return []
        asleep = time.perf_counter()
        try:
            woken = self._sleep_until_woken(vcpus, deadline, timeout)
        finally:
            # The sleep ends where the run ended (no wake event in time), else here: before the vCPUs run again,
            # whose time is theirs (counting it here made asleep outlast elapsed when the guest then ended at once).
            self._asleep += (self._end_time if self._ending is not None else time.perf_counter()) - asleep
        return self._start_vcpus(vcpus) if woken else []

    def _sleep_until_woken(self, vcpus: list, deadline: float | None, timeout: float | None) -> bool:
        alarm = self.cmos.next_alarm() if self.pm1.rtc_wake else None
        wake = None if alarm is None else time.perf_counter() + alarm - time.monotonic()
        if wake is None or (deadline is not None and deadline < wake):
            threading.Event().wait(None if deadline is None else max(0.0, deadline - time.perf_counter()))
            self._finish(Ending.TIMEOUT, STATUS_TIMEOUT, f"the guest was asleep in ACPI S3 and no wake event "
                                                         f"came within {timeout:g} s; stopped")
            return False
        time.sleep(max(0.0, wake - time.perf_counter()))
        vector, x_vector = acpi.waking_vectors(self._vm.memory.read(acpi.FACS_ADDRESS, acpi.FACS_SIZE))
        problem = pm1.waking_problem(vector, x_vector)
        if problem is not None:
            self._finish(Ending.ERROR, STATUS_INTERNAL_ERROR, f"the guest woke from ACPI S3, but {problem}")
            return False
        pm1.resume_cpus(vcpus, vector)
        self.pm1.wake(rtc=True)
        self._done.clear()
        return True

    def _stop(self, threads: list[VcpuThread]) -> None:
        self._done.set()
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.cancel()

    def _finish(self, ending: Ending, status: int, message: str, code: int | None = None,
                error: BaseException | None = None) -> None:
        with self._lock:
            if self._ending is None:
                self._end_time = time.perf_counter()
                self._ending = (ending, status, message, code, error)
            self._done.set()

    def _vcpu_thread(self, vcpu, stopping: threading.Event) -> None:
        self._current.vcpu = vcpu
        self._vcpu_loop(vcpu, stopping)

    def _vcpu_loop(self, vcpu, stopping: threading.Event) -> None:
        run, done, clock = vcpu.run, self._done, time.perf_counter
        exits = 0
        in_kvm_run = 0.0
        sites: dict[tuple[str, int, bool], int] = {}      # merged into self._sites when the thread ends
        try:
            while not done.is_set():
                entered = clock()
                try:
                    exit = run()
                except KvmBusy:
                    # EAGAIN: an AP left MP_STATE_UNINITIALIZED (INIT/SIPI arrived); run it again
                    continue
                finally:
                    in_kvm_run += clock() - entered
                exits += 1
                if type(exit) is IoExit:
                    site = ("io", exit[0], exit.is_out)
                    sites[site] = sites.get(site, 0) + 1
                    self._port_io(vcpu, exit)
                elif type(exit) is MmioExit:
                    site = ("mmio", exit.phys_addr, exit.is_write)
                    sites[site] = sites.get(site, 0) + 1
                    self._mmio(vcpu, exit)
                elif type(exit) is IntrExit:
                    continue
                else:
                    self._stopping_exit(vcpu, exit)
                    return
        except ClosedError:
            pass                            # the VM is being closed under us: the run is over
        except BaseException as exc:        # a device or handler raised: end the run, report it
            self._finish(Ending.ERROR, STATUS_INTERNAL_ERROR,
                         f"vCPU {vcpu.id}: {type(exc).__name__}: {exc}", error=exc)
        finally:
            self._exits[vcpu.id] = self._exits.get(vcpu.id, 0) + exits
            self._in_kvm_run[vcpu.id] = self._in_kvm_run.get(vcpu.id, 0.0) + in_kvm_run
            with self._lock:
                for site, count in sites.items():
                    self._sites[site] = self._sites.get(site, 0) + count

    def _port_io(self, vcpu, exit: IoExit) -> None:
        """One device access per element, in order: string IO (``rep ins``/``rep outs``) has ``count`` > 1."""
        if self._trace is not None:
            self._trace_io(vcpu, exit)
        port, is_out, size, count = exit[0], exit.is_out, exit[2], exit[3]
        entry = self.io._ports.get(port)
        if entry is None:
            self._unknown_access(vcpu, "io", port, is_out, size, count)
            if not is_out:
                exit.reply(b"\xff" * (size * count))
            return
        base, device, _ = entry
        offset = port - base
        with self._lock:
            if is_out:
                data = exit[4]
                for start in range(0, size * count, size):
                    device.write(offset, size, int.from_bytes(data[start:start + size], "little"))
            else:
                mask = (1 << 8 * size) - 1
                exit.reply(b"".join((device.read(offset, size) & mask).to_bytes(size, "little")
                                    for _ in range(count)))

    def _mmio(self, vcpu, exit: MmioExit) -> None:
        if self._trace is not None:
            value = int.from_bytes(exit.data, "little")
            self._trace.write(f"vcpu {vcpu.id}: mmio {'write' if exit.is_write else 'read'} {exit.phys_addr:#x} "
                              f"size {exit.length}{f' value {value:#x}' if exit.is_write else ''}\n")
        entry = self.mmio.lookup(exit.phys_addr)
        if entry is None:
            self._unknown_access(vcpu, "mmio", exit.phys_addr, exit.is_write, exit.length)
            if not exit.is_write:
                exit.reply(b"\xff" * exit.length)
            return
        base, device, _ = entry
        with self._lock:
            if exit.is_write:
                device.write(exit.phys_addr - base, exit.length, int.from_bytes(exit.data, "little"))
            else:
                value = device.read(exit.phys_addr - base, exit.length) & ((1 << 8 * exit.length) - 1)
                exit.reply(value.to_bytes(exit.length, "little"))

    def _trace_io(self, vcpu, exit: IoExit) -> None:
        assert self._trace is not None
        if not exit.is_out:
            value = ""
        elif exit.count > 1:
            value = f" data {exit.data.hex()}"
        else:
            value = f" value {exit.value:#x}"
        self._trace.write(f"vcpu {vcpu.id}: {'out' if exit.is_out else 'in'} port {exit.port:#x} "
                          f"size {exit.size}{f' count {exit.count}' if exit.count > 1 else ''}{value}\n")

    def _unknown_access(self, vcpu, space: str, address: int, write: bool, size: int, count: int = 1) -> None:
        """Count ``count`` accesses (the elements of a string IO) to an address no device claims."""
        with self._lock:
            record = self._unknown.get((space, address))
            if record is not None:
                record.count += count
                return
            record = UnknownAccess(space, address, count, vcpu.regs.rip, vcpu.id, write, size)
            self._unknown[(space, address)] = record
        if self.strict_io:
            self._finish(Ending.STRICT_IO, STATUS_STRICT_IO, record.describe())

    def _stopping_exit(self, vcpu, exit) -> None:
        if isinstance(exit, (InternalErrorExit, FailEntryExit)):
            from ..hosts import explain_exit  # only for these rare exits: `pykvm.boot` starts without it
            explain_exit(vcpu, exit)
        where = f"vCPU {vcpu.id}"
        try:
            where += f" at RIP {vcpu.regs.rip:#x}"
        except Exception:          # noqa: BLE001 - the message is still worth giving
            pass
        if isinstance(exit, ShutdownExit):
            self._finish(Ending.TRIPLE_FAULT, STATUS_TRIPLE_FAULT,
                         f"triple fault (KVM_EXIT_SHUTDOWN) on {where}")
        elif isinstance(exit, SystemEventExit):
            kind = getattr(exit.type, "name", exit.type)
            self._finish(Ending.POWER_OFF, STATUS_POWER_OFF, f"the guest requested {kind} on {where}")
        elif isinstance(exit, InternalErrorExit):
            self._finish(Ending.INTERNAL_ERROR, STATUS_INTERNAL_ERROR,
                         f"KVM internal error (suberror {exit.suberror}) on {where}: "
                         f"{exit.explanation or 'no explanation'}")
        elif isinstance(exit, FailEntryExit):
            self._finish(Ending.INTERNAL_ERROR, STATUS_INTERNAL_ERROR,
                         f"KVM could not enter the guest on {where}: "
                         f"{exit.explanation or hex(exit.hardware_entry_failure_reason)}")
        else:
            self._finish(Ending.INTERNAL_ERROR, STATUS_INTERNAL_ERROR, f"unexpected exit {exit} on {where}")

    def _read_stdin(self) -> None:
        fd = sys.stdin.fileno()
        while not self._done.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], STDIN_POLL)
                if not ready:
                    continue
                with self._lock:
                    room = self.uart.rx_room
                if not room:
                    time.sleep(STDIN_POLL)
                    continue
                data = os.read(fd, room)
            except (OSError, ValueError):
                return
            if not data:
                return
            with self._lock:
                self.uart.receive(data)


def _check_devices(devices: Sequence[str]) -> tuple[str, ...]:
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)) or \
            not all(isinstance(name, str) for name in devices):
        raise InvalidArgument(f"devices={devices!r}: expected a list of device names, e.g. ['pci-testdev']")
    for name in devices:
        if name not in OPTIONAL_DEVICES or devices.count(name) > 1:
            problem = "is named twice" if name in OPTIONAL_DEVICES else "is not a device pykvm has"
            raise InvalidArgument(f"devices: {name!r} {problem}; choose from {', '.join(OPTIONAL_DEVICES)}")
    return tuple(devices)


def _check_chipset(chipset: object, devices: Sequence[str], intremap: bool) -> str:
    if chipset not in CHIPSETS:
        raise InvalidArgument(f"chipset={chipset!r}: choose one of {', '.join(CHIPSETS)}")
    if "intel-iommu" in devices and chipset != "q35":
        raise InvalidArgument("devices: 'intel-iommu' needs chipset='q35' (pykvm.boot: --machine q35): the "
                              "remapping unit is the Q35 chipset's, as in QEMU")
    if intremap and "intel-iommu" not in devices:
        raise InvalidArgument("intremap=True: interrupt remapping is the IOMMU's; add 'intel-iommu' to devices")
    return str(chipset)


def _check_device(device: object) -> None:
    if not (callable(getattr(device, "read", None)) and callable(getattr(device, "write", None))):
        raise InvalidArgument(f"device={device!r}: expected an object with read(offset, size) -> int and "
                              f"write(offset, size, value)")


def _check_cmdline(cmdline: object) -> None:
    if not isinstance(cmdline, str):
        raise InvalidArgument(f"cmdline={cmdline!r}: expected a string")
    try:
        cmdline.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"cmdline={cmdline!r}: not encodable as UTF-8 (a lone surrogate, e.g. from "
                              f"undecodable bytes); pass text") from None


_NOT_A_FILE = ((stat.S_ISFIFO, "a FIFO (named pipe): reading it would block or never end"),
               (stat.S_ISCHR, "a character device: reading it could never end"),
               (stat.S_ISBLK, "a block device"),
               (stat.S_ISDIR, "a directory"),
               (stat.S_ISSOCK, "a socket"))


def _read(source: str | os.PathLike | bytes, what: str, limit: int) -> tuple[str, bytes]:
    """(the path as given, the bytes) of a kernel or module: a regular file of at most ``limit`` bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limit:
            raise InvalidArgument(f"{what}: {len(data)} bytes, more than the guest's RAM ({limit >> 20} MiB); "
                                  f"pass the right image or give the machine more memory")
        return what, data
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgument(f"{what}={source!r}: expected a path or the image's bytes")
    name = os.fspath(source)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    try:
        _check_file(name, what, os.stat(name), limit)
        # O_NONBLOCK: if the path became a FIFO since the stat, opening it must not wait for a writer.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            status = os.fstat(fd)
            _check_file(name, what, status, limit)
            # Read what the file holds and one byte more (to see it grow), never limit + 1 bytes:
            # read(n) allocates n bytes first, 4 GiB for a 4 GiB guest (a MemoryError in a 2 GiB host).
            data = file.read(status.st_size + 1)
    except OSError as exc:
        raise InvalidArgument(f"{what} {name!r}: cannot read it: {exc.strerror}") from None
    if len(data) != status.st_size:
        raise InvalidArgument(f"{what} {name!r}: changed size while read ({status.st_size} bytes, then "
                              f"{len(data)}{' or more' if len(data) > status.st_size else ''}); pass a file "
                              f"nothing is writing")
    return name, data


def _check_file(name: str, what: str, status: os.stat_result, limit: int) -> None:
    for test, kind in _NOT_A_FILE:
        if test(status.st_mode):
            raise InvalidArgument(f"{what} {name!r}: is {kind}; pass a regular file (copy a stream to a "
                                  f"file first)")
    if status.st_size > limit:
        raise InvalidArgument(f"{what} {name!r}: {status.st_size} bytes, more than the guest's RAM "
                              f"({limit >> 20} MiB); pass the right file or give the machine more memory")


def _enter_multiboot(vcpu, layout: multiboot.BootLayout) -> None:
    """The Multiboot entry state: 32-bit protected mode, flat 4 GiB segments, paging and interrupts off."""
    sregs = vcpu.sregs
    sregs.cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=0xB, present=1, dpl=0, db=1, s=1, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, db=1, s=1,
                                     g=1))
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.sregs = sregs
    vcpu.regs = Regs(rax=multiboot.LOADER_MAGIC, rbx=layout.info_address, rip=layout.entry, rflags=0x2)


def _cbreak(fd: int) -> Callable[[], None] | None:
    """Put terminal ``fd`` in cbreak mode (keys arrive at once, Ctrl-C still interrupts); the undo."""
    try:
        import termios
        import tty
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    except (ImportError, OSError):
        return None
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)
