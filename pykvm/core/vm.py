"""``Vm``: one KVM virtual machine (the fd returned by ``KVM_CREATE_VM``).

Why this exists: it owns the guest memory, the vCPUs and the VM-wide
interrupt machinery (in-kernel irqchip, GSI routing, MSI, irqfds), sets the
x86 bits some vendor modules need before the first run (TSS and identity-map
pages for real mode on VT-x), and closes everything it owns when it is closed.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import functools
import gc
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import checks
from .binding import ffi, lib
from .constants import (
    IOAPIC_NUM_PINS,
    PMU_EVENT_FILTER_MAX_EVENTS,
    Cap,
    IrqchipId,
    MsrExitReason,
    MsrFilterDefault,
    PmuEventAction,
)
from .cpuid import cpuid_for_vcpu
from .errors import (
    ArgumentTypeError,
    ClosedError,
    InvalidArgument,
    InvalidRouting,
    IrqchipModeError,
    KvmError,
    PyKvmError,
    VcpuThreadError,
)
from .eventfds import IOEVENTFD_LENGTHS, Ioeventfd, Irqfd
from .fdobject import FdObject
from .interrupts import (
    MAX_IRQ_ROUTES,
    IrqchipMode,
    IrqchipRoute,
    MsiMessage,
    MsiRoute,
    PitChannel,
    PitState,
    Route,
    default_routes,
)
from .ioctls import Ioctl
from .memory import MAX_GPA, GuestMemory
from .state import ClockData, MsrFilterRange, from_c

if TYPE_CHECKING:
    from .stats import Stats
    from .system import Kvm
    from .vcpu import Vcpu

DEFAULT_MEMORY_SIZE = 16 << 20
VM_FD_LINK = "anon_inode:kvm-vm"        # what /proc/self/fd shows for the fd KVM_CREATE_VM returns


def fd_links(pid: int | str = "self") -> dict[int, str]:
    """What each fd of process ``pid`` links to in ``/proc/PID/fd`` ({} once the process is gone).

    Each fd is read on its own: one closed while we look (the listing's own, or any the process closes
    meanwhile) is left out, not taken for the whole process.
    """
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    links = {}
    for name in names:
        with contextlib.suppress(OSError):
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return links


def open_vm_fds() -> frozenset[int]:
    """The fds of this process that are KVM VMs: those whose ``/proc/self/fd`` link is ``anon_inode:kvm-vm``."""
    return frozenset(fd for fd, link in fd_links().items() if link == VM_FD_LINK)


def open_vms(fds: frozenset[int] | None = None) -> list[Vm]:
    """The open :class:`Vm` objects of this process: those owning ``fds`` (default: every VM fd open now).

    pykvm keeps no registry of its VMs. They are found from :func:`open_vm_fds`, then among
    the objects the garbage collector tracks, a walk made only when a VM fd is open.
    """
    fds = open_vm_fds() if fds is None else fds
    if not fds:
        return []
    return [obj for obj in gc.get_objects() if isinstance(obj, Vm) and getattr(obj, "_fd", -1) in fds]


@atexit.register
def _close_open_vms() -> None:
    """At interpreter exit, close every VM still open while vCPU threads can still be kicked.

    After the atexit handlers, Python's finalisation freezes daemon threads: a vCPU thread
    frozen after an exit it had not yet read keeps its run guard, and closing its VM then
    (a finaliser) would wait out the vCPU's ``CLOSE_GRACE`` and leave kvm_run mapped.
    """
    for vm in open_vms():
        try:
            vm.close()
        except Exception:       # noqa: BLE001 - exit must go on; the error was the VM's own
            pass


class Vm(FdObject):
    """A VM. Made by :meth:`pykvm.Kvm.create_vm`; ``memory_size`` bytes at GPA 0 by default.

    ``irqchip`` is ``"none"`` (userspace: ``vcpu.interrupt()``), ``"kernel"``
    (PICs, IOAPIC and LAPICs in KVM) or ``"split"`` (LAPICs in KVM only); ``pit``
    adds the in-kernel 8254 timer (``KVM_CREATE_PIT2``, needs ``"kernel"``).
    """

    def __init__(self, kvm: Kvm, memory_size: int | None = None,
                 tss_addr: int | None = None,
                 identity_map_addr: int | None = None,
                 irqchip: IrqchipMode | str = IrqchipMode.NONE, pit: bool = False,
                 allow_overcommit: bool = False) -> None:
        try:
            mode = IrqchipMode(irqchip)
        except ValueError:
            raise InvalidArgument(f"irqchip={checks.shown(irqchip)}: choose one of "
                                  f"{', '.join(repr(m.value) for m in IrqchipMode)}") from None
        if memory_size is not None:
            checks.integer("memory_size", memory_size, 0, MAX_GPA + 1,
                           "bytes of RAM at guest-physical 0, a multiple of 4096 (0: none)")
        for name, address in (("tss_addr", tss_addr), ("identity_map_addr", identity_map_addr)):
            if address is not None:
                checks.integer(name, address, 0, 0xFFFFFFFF - 0x3000, "a 32-bit guest-physical address "
                               "outside guest RAM, or None")
        if pit and mode != IrqchipMode.KERNEL:
            raise IrqchipModeError(f"pit=True needs irqchip='kernel' (the PIT drives the in-kernel PIC "
                                   f"and IOAPIC), but irqchip={mode.value!r}")
        self.kvm = kvm                 # what _release reads exists before the fd does
        self.vcpus: list[Vcpu] = []
        self._eventfds: list[Irqfd | Ioeventfd] = []
        self.memory = GuestMemory(self)
        result = kvm._ioctl_value(Ioctl.CREATE_VM, 0,
                                  hint="the host may be out of memory or limit the number of VMs")
        super().__init__(result)
        self.irqchip = IrqchipMode.NONE
        self.has_pit = False
        self.routes: tuple[Route, ...] = ()
        self.enabled_caps: set[int] = set()   # what enable_cap() turned on for this VM
        try:
            if identity_map_addr is not None:
                self.set_identity_map_addr(identity_map_addr)
            if tss_addr is not None:
                self.set_tss_addr(tss_addr)
            if mode == IrqchipMode.KERNEL:
                self.create_irqchip()
            elif mode == IrqchipMode.SPLIT:
                self.enable_split_irqchip()
            if pit:
                self.create_pit2()
            size = DEFAULT_MEMORY_SIZE if memory_size is None else memory_size
            if size:
                self.memory.add_slot(0, size, allow_overcommit=allow_overcommit)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return f"Vm (fd {self._fd})"

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: 3 pages VT-x uses to run real mode without unrestricted guest.

        Example::

            import pykvm
            from pykvm import HltExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm(tss_addr=None) as vm:
                vm.set_tss_addr(0xFFFBD000)          # three pages below 4 GiB, outside guest RAM
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "hlt", mode="real")
                assert isinstance(vcpu.run(), HltExit)
        """
        self._ioctl_value(Ioctl.SET_TSS_ADDR, checks.integer("addr", addr, 0, 0xFFFFFFFF - 0x3000,
                                                             "a 32-bit guest-physical address"))

    def set_identity_map_addr(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: 1 page VT-x uses for the EPT identity map.

        Example::

            import pykvm
            from pykvm import HltExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm(identity_map_addr=None, tss_addr=None) as vm:
                vm.set_identity_map_addr(0xFFFBC000)  # before the TSS pages and the first vCPU
                vm.set_tss_addr(0xFFFBD000)
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "hlt", mode="real")
                assert isinstance(vcpu.run(), HltExit)
        """
        checks.integer("addr", addr, 0, 0xFFFFFFFF - 0x1000, "a 32-bit guest-physical address")
        self._ioctl(Ioctl.SET_IDENTITY_MAP_ADDR, ffi.new("__u64 *", addr))

    def create_vcpu(self, vcpu_id: int | None = None, cpuid: bool = True) -> Vcpu:
        """``KVM_CREATE_VCPU``; ``vcpu_id`` defaults to the next free one.

        With ``cpuid=True`` the vCPU gets every CPUID leaf KVM supports (needed
        for long mode: KVM refuses EFER.LME when the guest's CPUID lacks LM).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                first, second = vm.create_vcpu(), vm.create_vcpu()
                assert (first.id, second.id) == (0, 1)
                assert any(entry.function == 0x80000001 for entry in second.cpuid)   # long mode offered
        """
        from .vcpu import Vcpu
        self._check_open()
        if self.kvm.closed:
            raise ClosedError("vm.create_vcpu(): the Kvm this VM was created from is closed, and a new vCPU "
                              "needs it (KVM_CAP_MAX_VCPU_ID, the supported CPUID, the kvm_run size); close the "
                              "Kvm only after its VMs, e.g. `with Kvm() as kvm, kvm.create_vm() as vm:`")
        if vcpu_id is None:
            taken = {vcpu.id for vcpu in self.vcpus}
            vcpu_id = next(i for i in range(len(self.vcpus) + 1) if i not in taken)
        limit = self._max_vcpu_id
        checks.integer("vcpu_id", vcpu_id, 0, limit - 1, f"this host's KVM_CAP_MAX_VCPU_ID is {limit}")
        if any(vcpu.id == vcpu_id for vcpu in self.vcpus):
            raise InvalidArgument(f"vcpu_id={vcpu_id}: this VM already has a vCPU with that id; ids are "
                                  f"unique per VM (omit vcpu_id for the next free one)")
        if len(self.vcpus) >= self._max_vcpus:     # closed ones count too: KVM keeps them until the VM goes
            raise InvalidArgument(f"this VM already has {len(self.vcpus)} vCPUs, the most this host's KVM "
                                  f"allows (KVM_CAP_MAX_VCPUS = {self._max_vcpus}); use another VM")
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        if cpuid:
            try:
                vcpu.set_cpuid(cpuid_for_vcpu(self.kvm.supported_cpuid, vcpu_id,
                                              bool(self.kvm.check_extension(Cap.TSC_DEADLINE_TIMER))))
            except BaseException:
                vcpu.close()
                raise
        return vcpu

    @functools.cached_property
    def _max_vcpu_id(self) -> int:
        return self.kvm.check_extension(Cap.MAX_VCPU_ID) or self._max_vcpus

    @functools.cached_property
    def _max_vcpus(self) -> int:
        return self.kvm.check_extension(Cap.MAX_VCPUS) or self.kvm.check_extension(Cap.NR_VCPUS) or 1

    # -- irqchip ----------------------------------------------------------------
    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: PICs, IOAPIC and a LAPIC per vCPU in the kernel (before any vCPU).

        Example::

            import pykvm
            from pykvm.irqchip import ioapic
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vm.create_irqchip()
                vcpu = vm.create_vcpu()
                assert ioapic.read(vm).base_address == 0xFEC00000
                assert len(vcpu.get_lapic()) == 1024
        """
        self.kvm.require(Cap.IRQCHIP, "an in-kernel irqchip")
        try:
            self._ioctl(Ioctl.CREATE_IRQCHIP)
        except KvmError as exc:
            raise self._irqchip_creation_error("KVM_CREATE_IRQCHIP", exc) from exc
        self.irqchip = IrqchipMode.KERNEL
        self.routes = default_routes(IrqchipMode.KERNEL)

    def enable_split_irqchip(self, ioapic_routes: int = IOAPIC_NUM_PINS) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)``: LAPICs in the kernel, the PIC and IOAPIC left to userspace.

        ``ioapic_routes`` GSIs are reserved for a userspace IOAPIC; before the first vCPU.

        Example::

            import pykvm
            from pykvm.irqchip import lapic
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vm.enable_split_irqchip()
                assert lapic.read(vm.create_vcpu()).version & 0xFF == 0x14   # KVM's LAPIC answers
        """
        self.kvm.require(Cap.SPLIT_IRQCHIP, "a split irqchip")
        try:
            self.enable_cap(Cap.SPLIT_IRQCHIP, ioapic_routes)
        except KvmError as exc:
            raise self._irqchip_creation_error("KVM_CAP_SPLIT_IRQCHIP", exc) from exc
        self.irqchip = IrqchipMode.SPLIT

    def _irqchip_creation_error(self, what: str, exc: KvmError) -> PyKvmError:
        if self.vcpus:
            return IrqchipModeError(f"{what} failed ({exc.strerror}): the irqchip must be created "
                                    f"before the first vCPU, and this VM already has "
                                    f"{len(self.vcpus)}; pass irqchip= to create_vm() instead")
        if self.irqchip != IrqchipMode.NONE:
            return IrqchipModeError(f"{what} failed ({exc.strerror}): this VM already has the "
                                    f"{self.irqchip.value!r} irqchip; a VM gets one irqchip, once")
        return exc

    def enable_cap(self, cap: Cap, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM: KVM turns on a VM-wide capability (recorded in ``enabled_caps``).

        Example::

            import pykvm
            from pykvm import Cap, MsrExit, x86
            from pykvm.core.constants import MsrExitReason
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.X86_USER_SPACE_MSR):
                    vm.enable_cap(Cap.X86_USER_SPACE_MSR, MsrExitReason.UNKNOWN)
                    vcpu = vm.create_vcpu()
                    x86.load_code(vcpu, "mov $0x4b5a0001, %ecx\\nrdmsr", mode="real")
                    msr = vcpu.run()                 # an MSR KVM does not know: an exit, not a #GP
                    assert isinstance(msr, MsrExit) and msr.index == 0x4B5A0001
        """
        self._enable_cap(cap, args, flags)
        self.enabled_caps.add(cap)

    def create_pit2(self) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel 8254 timer, wired to GSI 0 (needs irqchip='kernel').

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                vm.create_pit2()
                assert len(vm.get_pit2().channels) == 3
        """
        self._require_irqchip(IrqchipMode.KERNEL, "the in-kernel PIT")
        self.kvm.require(Cap.PIT2, "the in-kernel PIT")
        self._ioctl(Ioctl.CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY}),
                    hint="a VM has at most one PIT")
        self.has_pit = True

    def reinject_control(self, pit_reinject: bool) -> None:
        """``KVM_REINJECT_CONTROL``: whether the in-kernel PIT re-injects the ticks a guest was late to take.

        KVM's default is to re-inject them (each tick is delivered, late ones back to back after the
        guest acks the previous). ``pit_reinject=False`` drops a tick that comes while the previous one
        is still pending, as QEMU's ``-global kvm-pit.lost_tick_policy=discard`` (which kvm-unit-tests'
        ``x86/run`` always passes). KVM reports nothing back but success.

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel", pit=True) as vm:
                if kvm.check_extension(Cap.REINJECT_CONTROL):
                    vm.reinject_control(pit_reinject=False)   # KVM reports nothing back but success
                    assert len(vm.get_pit2().channels) == 3
        """
        if not isinstance(pit_reinject, bool):
            raise ArgumentTypeError(f"reinject_control(pit_reinject={pit_reinject!r}): pass True or False")
        self.kvm.require(Cap.REINJECT_CONTROL, "choosing whether the PIT re-injects lost ticks")
        self._pit_state2()          # refuses a VM without the in-kernel PIT, naming the fix
        control = ffi.new("struct kvm_reinject_control *", {"pit_reinject": int(pit_reinject)})
        self._ioctl(Ioctl.REINJECT_CONTROL, control)

    def get_pit2(self) -> PitState:
        """``KVM_GET_PIT2``: the three 8254 channels (see :mod:`pykvm.irqchip.pit`).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel", pit=True) as vm:
                gates = [channel.gate for channel in vm.get_pit2().channels]
                assert gates == [1, 1, 0]            # after reset only channel 2's gate is low
        """
        state = self._pit_state2()
        fields = [f.name for f in dataclasses.fields(PitChannel)]
        return PitState(tuple(PitChannel(**{name: getattr(channel, name) for name in fields})
                              for channel in state.channels), state.flags)

    def set_pit2(self, state: PitState) -> None:
        """``KVM_SET_PIT2``: load the 8254's state.

        Example::

            import dataclasses
            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel", pit=True) as vm:
                state = vm.get_pit2()
                channel0 = dataclasses.replace(state.channels[0], count=1193)   # 1 kHz
                vm.set_pit2(dataclasses.replace(state, channels=(channel0, *state.channels[1:])))
                assert vm.get_pit2().channels[0].count == 1193
        """
        if not isinstance(state, PitState) or len(state.channels) != 3:
            raise ArgumentTypeError(f"set_pit2(state={state!r}): pass a PitState with three channels, "
                            f"e.g. dataclasses.replace() of vm.get_pit2()")
        cdata = self._pit_state2()
        for target, channel in zip(cdata.channels, state.channels, strict=True):
            for name, value in dataclasses.asdict(channel).items():
                setattr(target, name, value)
        cdata.flags = state.flags
        self._ioctl(Ioctl.SET_PIT2, cdata)

    def _pit_state2(self):
        if not self.has_pit:
            raise IrqchipModeError("this VM has no in-kernel PIT; create it with "
                                   "kvm.create_vm(irqchip='kernel', pit=True) or vm.create_pit2()")
        state = ffi.new("struct kvm_pit_state2 *")
        self._ioctl(Ioctl.GET_PIT2, state)
        return state

    def _require_irqchip(self, needed: IrqchipMode, what: str) -> None:
        ok = self.irqchip.ioapic_in_kernel if needed == IrqchipMode.KERNEL else self.irqchip.lapic_in_kernel
        if not ok:
            choices = "irqchip='kernel'" if needed == IrqchipMode.KERNEL else "irqchip='kernel' or 'split'"
            raise IrqchipModeError(f"{what} needs {choices}, but this VM's irqchip is "
                                   f"{self.irqchip.value!r}; create the VM with {choices}")

    # -- interrupt sources ------------------------------------------------------
    def irq_line(self, gsi: int, level: int | bool) -> int | None:
        """``KVM_IRQ_LINE``: set GSI ``gsi`` to ``level``.

        Returns KVM's status where ``KVM_CAP_IRQ_INJECT_STATUS`` exists: > 0 the
        number of CPUs it was delivered to, 0 coalesced (already pending), < 0
        masked or ignored; ``None`` on hosts without the capability.

        Example::

            import pykvm
            from pykvm.irqchip import ioapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                vm.create_vcpu()
                vm.irq_line(16, 1)                   # a level-triggered PCI line, still masked
                assert 16 in ioapic.read(vm).irr
                vm.irq_line(16, 0)
                assert 16 not in ioapic.read(vm).irr
        """
        checks.integer("gsi", gsi, 0, MAX_IRQ_ROUTES - 1, "a GSI number")
        checks.integer("level", level, 0, 1, "0 (low) or 1 (high)") if not isinstance(level, bool) else None
        self._require_irqchip(IrqchipMode.SPLIT, "vm.irq_line()")
        if not any(route.gsi == gsi for route in self.routes):
            routed = sorted({route.gsi for route in self.routes})
            span = f"GSIs {routed[0]}..{routed[-1]}" if routed else "no GSIs"
            if self.irqchip.ioapic_in_kernel:
                fix = "vm.set_gsi_routing(vm.routes + (IrqchipRoute(...) or MsiRoute(...),))"
            else:                   # split: the PIC and IOAPIC a GSI would reach are in userspace
                fix = ("vm.set_gsi_routing(vm.routes + (MsiRoute(...),)); with irqchip='split' "
                       "the PIC and IOAPIC are userspace's, so a GSI can only be routed to an MSI")
            raise InvalidRouting(f"GSI {gsi} has no route (this VM routes {span}); add one with {fix}")
        with_status = self._has_inject_status
        arg = ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": int(bool(level))})
        self._ioctl(Ioctl.IRQ_LINE_STATUS if with_status else Ioctl.IRQ_LINE, arg)
        return arg.status if with_status else None

    @functools.cached_property
    def _has_inject_status(self) -> bool:
        return bool(self.kvm.check_extension(Cap.IRQ_INJECT_STATUS))

    def set_gsi_routing(self, routes: Iterable[Route]) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole GSI routing table (see ``Vm.routes``).

        Example::

            import pykvm
            from pykvm.core.interrupts import MsiMessage, MsiRoute
            from pykvm.irqchip import lapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vcpu = vm.create_vcpu()
                vcpu.set_lapic(lapic.with_register(vcpu.get_lapic(), lapic.ApicReg.SVR, 0x1FF))  # enabled
                vm.set_gsi_routing([MsiRoute(24, MsiMessage.compose(destination=0, vector=0x40))])
                vm.irq_line(24, 1)
                assert 0x40 in lapic.read(vcpu).irr
        """
        self._require_irqchip(IrqchipMode.SPLIT, "GSI routing")
        self.kvm.require(Cap.IRQ_ROUTING, "GSI routing")
        checks.instance("routes", routes, (list, tuple), "a list of IrqchipRoute / MsiRoute, e.g. "
                        "vm.routes + (MsiRoute(...),)")
        routes = tuple(routes)
        if len(routes) > MAX_IRQ_ROUTES:
            raise InvalidRouting(f"routes: {len(routes)} entries, more than KVM's {MAX_IRQ_ROUTES} "
                                 f"(KVM_MAX_IRQ_ROUTES); route fewer GSIs")
        for index, route in enumerate(routes):
            if not isinstance(route, (IrqchipRoute, MsiRoute)):
                raise InvalidRouting(f"routes[{index}]={checks.shown(route)} is not a routing entry; "
                                     f"use IrqchipRoute or MsiRoute")
            route.validate(self.irqchip)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for entry, route in zip(table.entries, routes, strict=True):
            route.to_c(entry)
        try:
            self._ioctl(Ioctl.SET_GSI_ROUTING, table)
        except KvmError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidRouting(f"KVM refused the routing table of {len(routes)} entries (EINVAL): "
                                     f"a GSI may have two routes to the same chip, or an entry this "
                                     f"host does not support; table: {checks.shown(routes)}") from exc
            raise
        self.routes = routes

    def signal_msi(self, message: MsiMessage | None = None, **fields) -> int:
        """``KVM_SIGNAL_MSI``: send one MSI, given as a message or as :meth:`MsiMessage.compose` fields.

        Returns > 0 if delivered, 0 if the guest blocked it (e.g. LAPIC disabled).

        Example::

            import pykvm
            from pykvm.irqchip import lapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vcpu = vm.create_vcpu()
                assert vm.signal_msi(destination=0, vector=0x41) == 0       # LAPIC still disabled
                vcpu.set_lapic(lapic.with_register(vcpu.get_lapic(), lapic.ApicReg.SVR, 0x1FF))
                assert vm.signal_msi(destination=0, vector=0x41) == 1
                assert 0x41 in lapic.read(vcpu).irr
        """
        self._require_irqchip(IrqchipMode.SPLIT, "vm.signal_msi()")
        self.kvm.require(Cap.SIGNAL_MSI, "vm.signal_msi()")
        if message is None:
            message = MsiMessage.compose(**fields)
        elif fields:
            raise ArgumentTypeError("vm.signal_msi(): pass either an MsiMessage or compose() fields, not both")
        elif not isinstance(message, MsiMessage):
            raise ArgumentTypeError(f"vm.signal_msi(message={message!r}): expected an MsiMessage, "
                            f"e.g. MsiMessage.compose(destination=0, vector=0x40)")
        return self._ioctl(Ioctl.SIGNAL_MSI, ffi.new("struct kvm_msi *", {
            "address_lo": message.address_lo, "address_hi": message.address_hi, "data": message.data}))

    def irqfd(self, gsi: int, resample: bool = False, eventfd: int | None = None) -> Irqfd:
        """``KVM_IRQFD``: an eventfd that raises ``gsi``; closed with the VM (or ``with``).

        Example::

            import time
            import pykvm
            from pykvm.core.interrupts import MsiMessage, MsiRoute
            from pykvm.irqchip import lapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vcpu = vm.create_vcpu()
                vcpu.set_lapic(lapic.with_register(vcpu.get_lapic(), lapic.ApicReg.SVR, 0x1FF))  # enabled
                vm.set_gsi_routing([MsiRoute(24, MsiMessage.compose(destination=0, vector=0x42))])
                with vm.irqfd(24) as irqfd:
                    irqfd.trigger()
                    deadline = time.monotonic() + 2
                    while 0x42 not in lapic.read(vcpu).irr:   # delivered with no vCPU exit
                        assert time.monotonic() < deadline
        """
        checks.integer("gsi", gsi, 0, MAX_IRQ_ROUTES - 1, "a routed GSI number")
        if eventfd is not None:
            checks.integer("eventfd", eventfd, 0, 0x7FFFFFFF, "an open eventfd's number, or None")
        self._require_irqchip(IrqchipMode.SPLIT, "vm.irqfd()")
        self.kvm.require(Cap.IRQFD, "vm.irqfd()")
        if resample:
            self.kvm.require(Cap.IRQFD_RESAMPLE, "a resampling irqfd")
            self._require_irqchip(IrqchipMode.KERNEL, "a resampling irqfd (level-triggered line)")
        if not any(route.gsi == gsi for route in self.routes):
            raise InvalidRouting(f"GSI {gsi} has no route; an irqfd on it would never deliver. "
                                 f"Route it first with vm.set_gsi_routing()")
        for existing in self._eventfds:
            if isinstance(existing, Irqfd) and not existing.closed and existing.fd == eventfd:
                raise InvalidRouting(f"eventfd={eventfd}: already an irqfd of this VM ({existing!r}); KVM takes "
                                     f"an eventfd once per VM (EBUSY); close that irqfd first, or pass another "
                                     f"eventfd (os.eventfd(0)), or none for a new one")
        return self._own(Irqfd(self, gsi, resample, eventfd))

    def ioeventfd(self, address: int, length: int = 4, pio: bool = False,
                  datamatch: int | None = None) -> Ioeventfd:
        """``KVM_IOEVENTFD``: guest writes to ``address`` signal an eventfd with no userspace exit.

        Example::

            import pykvm
            from pykvm import HltExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                with vm.ioeventfd(0x510, length=2, pio=True) as doorbell:
                    x86.load_code(vcpu, "mov $0x510, %dx\\nout %ax, %dx\\nout %ax, %dx\\nhlt", mode="real")
                    assert isinstance(vcpu.run(), HltExit)   # no IoExit: KVM took both writes
                    assert doorbell.wait(timeout=0) == 2
        """
        checks.integer("address", address, 0, 0xFFFF if pio else MAX_GPA,
                       "a port (pio=True) or a guest-physical address")
        if isinstance(length, bool) or length not in IOEVENTFD_LENGTHS:
            raise InvalidArgument(f"length={checks.shown(length)}: an ioeventfd matches writes of 1, 2, 4 or 8 "
                                  f"bytes, or 0 for a write of any size (without datamatch)")
        if datamatch is not None:
            if not length:
                raise InvalidArgument(f"datamatch={checks.shown(datamatch)} with length=0: KVM compares "
                                      f"datamatch with the written value only for a fixed length; pass "
                                      f"length=1, 2, 4 or 8, or drop datamatch")
            checks.unsigned("datamatch", datamatch, 8 * length,
                            f"a write of length={length} byte(s) can never carry it; pass a longer length "
                            f"or a value of {8 * length} bits")
        if not pio:
            self._refuse_ram_doorbell(address, length)
        self.kvm.require(Cap.IOEVENTFD, "vm.ioeventfd()")
        return self._own(Ioeventfd(self, address, length, pio, datamatch))

    def _refuse_ram_doorbell(self, address: int, length: int) -> None:
        """An MMIO ioeventfd inside a memory slot never fires: the guest's writes there go to RAM, no exit."""
        end = address + max(length, 1)
        for slot in self.memory.slots:
            if slot.address_space == 0 and address < slot.end and slot.guest_phys_addr < end:
                raise InvalidArgument(f"address={address:#x}: an MMIO ioeventfd inside {slot!r} would never "
                                      f"fire (guest writes there go to RAM, with no exit for KVM to match); "
                                      f"choose an address outside every memory slot, or pio=True for a port")

    def _own(self, eventfd):
        self._eventfds.append(eventfd)
        return eventfd

    # -- irqchip state -------------------------------------------------------------
    def _get_chip(self, chip: IrqchipId):
        self._require_irqchip(IrqchipMode.KERNEL, "KVM_GET_IRQCHIP")
        cdata = ffi.new("struct kvm_irqchip *", {"chip_id": int(chip)})
        self._ioctl(Ioctl.GET_IRQCHIP, cdata)
        return cdata

    def get_irqchip(self, chip: IrqchipId) -> bytes:
        """``KVM_GET_IRQCHIP``: one in-kernel chip's raw state (decode with :mod:`pykvm.irqchip`).

        Example::

            import pykvm
            from pykvm.core.constants import IrqchipId
            from pykvm.irqchip import ioapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                state = ioapic.IoapicState.from_bytes(vm.get_irqchip(IrqchipId.IOAPIC))
                assert state.base_address == 0xFEC00000
                assert all(entry.masked for entry in state.redirection)   # every pin masked at reset
        """
        chip = _irqchip_id(chip)
        cdata = self._get_chip(chip)
        return bytes(ffi.buffer(ffi.addressof(cdata.chip, _chip_field(chip))))

    def set_irqchip(self, chip: IrqchipId, raw: bytes) -> None:
        """``KVM_SET_IRQCHIP``: load one chip's raw state (e.g. ``IoapicState.with_entry(...).raw``).

        Example::

            import pykvm
            from pykvm.core.constants import IrqchipId
            from pykvm.irqchip import ioapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                entry = ioapic.RedirectionEntry(vector=0x40)
                vm.set_irqchip(IrqchipId.IOAPIC, ioapic.read(vm).with_entry(5, entry).raw)
                assert ioapic.read(vm).redirection[5].vector == 0x40
                assert not ioapic.read(vm).redirection[5].masked
        """
        chip = _irqchip_id(chip)
        cdata = self._get_chip(chip)
        target = ffi.buffer(ffi.addressof(cdata.chip, _chip_field(chip)))
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > len(target):
            raise ArgumentTypeError(f"set_irqchip(raw={raw!r:.40}): pass the chip's state as at most "
                            f"{len(target)} bytes, e.g. pykvm.irqchip.ioapic.read(vm).raw")
        target[:len(raw)] = bytes(raw)
        self._ioctl(Ioctl.SET_IRQCHIP, cdata)

    # -- kvmclock, MSR filter, PMU event filter, dirty log -------------------------
    def get_clock(self) -> ClockData:
        """``KVM_GET_CLOCK``: the VM's kvmclock (ns), and whether it is TSC-stable (master clock).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.ADJUST_CLOCK):
                    before = vm.get_clock().clock
                    assert vm.get_clock().clock > before     # kvmclock runs, in ns
        """
        self.kvm.require(Cap.ADJUST_CLOCK, "vm.get_clock()")
        cdata = ffi.new("struct kvm_clock_data *")
        self._ioctl(Ioctl.GET_CLOCK, cdata)
        return from_c(ClockData, cdata)

    def set_clock(self, clock: int) -> None:
        """``KVM_SET_CLOCK``: set the VM's kvmclock to ``clock`` ns (every vCPU's kvmclock page follows
        at its next entry: KVM raises KVM_REQ_CLOCK_UPDATE on each).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.ADJUST_CLOCK):
                    vm.set_clock(3_600 * 10**9)            # one hour of guest time
                    assert 3_600 * 10**9 <= vm.get_clock().clock < 3_601 * 10**9
        """
        checks.unsigned("clock", clock, 64, "nanoseconds of guest kvmclock time")
        self.kvm.require(Cap.ADJUST_CLOCK, "vm.set_clock()")
        self._ioctl(Ioctl.SET_CLOCK, ffi.new("struct kvm_clock_data *", {"clock": clock}))

    def enable_user_space_msr(self, reasons: int = MsrExitReason.FILTER) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)``: RDMSR/WRMSR that fail for ``reasons`` exit to
        userspace (``MsrExit``) instead of injecting #GP; the default is accesses denied by the MSR filter.

        Example::

            import pykvm
            from pykvm import Cap, MsrExit, x86
            from pykvm.core.constants import MsrExitReason
            from pykvm.core.state import MsrFilterRange
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.X86_USER_SPACE_MSR) and kvm.check_extension(Cap.X86_MSR_FILTER):
                    vm.enable_user_space_msr()           # accesses the filter denies exit
                    vm.set_msr_filter([MsrFilterRange.deny(0x10)])
                    vcpu = vm.create_vcpu()
                    x86.load_code(vcpu, "mov $0x10, %ecx\\nrdmsr", mode="real")
                    msr = vcpu.run()
                    assert isinstance(msr, MsrExit) and msr.msr_reason == MsrExitReason.FILTER
        """
        checks.unsigned("reasons", reasons, 32, "pykvm.core.constants.MsrExitReason bits")
        self.kvm.require(Cap.X86_USER_SPACE_MSR, "vm.enable_user_space_msr()")
        self.enable_cap(Cap.X86_USER_SPACE_MSR, reasons)

    def set_msr_filter(self, ranges: Iterable[MsrFilterRange] = (), default_allow: bool = True) -> None:
        """``KVM_X86_SET_MSR_FILTER``: which guest MSR accesses KVM handles (bit set: allowed).

        A denied access becomes an ``MsrExit`` (reason filter) after
        :meth:`enable_user_space_msr`, a #GP in the guest otherwise. No ranges and
        ``default_allow`` removes the filter. KVM raises KVM_REQ_MSR_FILTER_CHANGED
        on every vCPU, which reloads its MSR intercepts before the next entry.

        Example::

            import pykvm
            from pykvm import Cap, MsrExit, x86
            from pykvm.core.constants import MsrFilterAccess
            from pykvm.core.state import MsrFilterRange
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.X86_USER_SPACE_MSR) and kvm.check_extension(Cap.X86_MSR_FILTER):
                    vm.enable_user_space_msr()
                    vm.set_msr_filter([MsrFilterRange.deny(0x10, MsrFilterAccess.READ)])   # TSC: reads only
                    vcpu = vm.create_vcpu()
                    x86.load_code(vcpu, "mov $0x10, %ecx\\nwrmsr\\nrdmsr", mode="real")
                    msr = vcpu.run()                     # the WRMSR went through, the RDMSR exits
                    assert isinstance(msr, MsrExit) and (msr.index, msr.is_write) == (0x10, False)
        """
        self.kvm.require(Cap.X86_MSR_FILTER, "vm.set_msr_filter()")
        ranges = list(ranges)
        limit = lib.KVM_MSR_FILTER_MAX_RANGES
        if len(ranges) > limit:
            raise InvalidArgument(f"ranges: {len(ranges)}, but KVM takes at most {limit}")
        cdata = ffi.new("struct kvm_msr_filter *", {
            "flags": MsrFilterDefault.ALLOW if default_allow else MsrFilterDefault.DENY})
        bitmaps = []                      # kept alive until the ioctl has copied them
        for index, (entry, target) in enumerate(zip(ranges, cdata.ranges, strict=False)):
            checks.instance(f"ranges[{index}]", entry, MsrFilterRange, "pykvm.core.state.MsrFilterRange")
            bitmaps.append(ffi.new("__u8[]", entry.padded_bitmap()))
            target.flags, target.nmsrs, target.base, target.bitmap = entry.flags, entry.nmsrs, entry.base, bitmaps[-1]
        self._ioctl(Ioctl.X86_SET_MSR_FILTER, cdata, hint="each range needs flags READ and/or WRITE and "
                                                          "1..0x10000 MSRs")

    def set_pmu_event_filter(self, events: Iterable[int] = (), deny: bool = True,
                             fixed_counter_bitmap: int = 0) -> None:
        """``KVM_SET_PMU_EVENT_FILTER``: which hardware events the guest's vPMU counters may count.

        ``events`` are event-select codes (event | unit mask << 8, as programmed
        in a counter's event-select MSR); ``deny=True`` forbids them, ``False``
        allows only them. KVM raises KVM_REQ_PMU on every vCPU, which reprograms
        every counter against the new filter before the next entry.

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.PMU_EVENT_FILTER):
                    vm.set_pmu_event_filter([0x00C0], deny=True)   # no "instructions retired"
        """
        self.kvm.require(Cap.PMU_EVENT_FILTER, "vm.set_pmu_event_filter()")
        codes = [checks.unsigned(f"events[{index}]", event, 64, "an event-select code")
                 for index, event in enumerate(events)]
        if len(codes) > PMU_EVENT_FILTER_MAX_EVENTS:
            raise InvalidArgument(f"events: {len(codes)}, but KVM takes at most {PMU_EVENT_FILTER_MAX_EVENTS}")
        checks.unsigned("fixed_counter_bitmap", fixed_counter_bitmap, 32, "a bit per fixed counter")
        self._ioctl(Ioctl.SET_PMU_EVENT_FILTER, ffi.new("struct kvm_pmu_event_filter *", {
            "action": PmuEventAction.DENY if deny else PmuEventAction.ALLOW, "nevents": len(codes),
            "fixed_counter_bitmap": fixed_counter_bitmap, "events": codes}))

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the bitmap (bit per page) of pages written since the last call.

        The slot must log dirty pages (``vm.memory.set_dirty_logging(slot, True)``);
        fetching the log write-protects the pages again and flushes the TLBs
        (KVM_REQ_TLB_FLUSH on each vCPU).

        Example::

            import pykvm
            from pykvm import x86
            with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=1 << 20) as vm:
                vm.memory.set_dirty_logging(0, True)
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "movb $1, (0x5000)\\nhlt", mode="real")
                vcpu.run()
                dirty = int.from_bytes(vm.get_dirty_log(0), "little")
                assert dirty >> 0x5 & 1                  # page 5 (0x5000) was written
                assert int.from_bytes(vm.get_dirty_log(0), "little") == 0   # and the log was reset
        """
        for candidate in self.memory.slots:
            if candidate.slot == slot:
                size = (candidate.size // 4096 + 63) // 64 * 8
                break
        else:
            raise InvalidArgument(f"slot={slot!r}: this VM has no such memory slot ({self.memory.slots})")
        bitmap = ffi.new("char[]", size)
        self._ioctl(Ioctl.GET_DIRTY_LOG, ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap}),
                    hint="the slot must have dirty logging on: vm.memory.set_dirty_logging(slot, True)")
        return ffi.buffer(bitmap, size)[:]

    # -- statistics --------------------------------------------------------------
    @functools.cached_property
    def stats(self) -> Stats:
        """``KVM_GET_STATS_FD``: the VM's binary statistics (a :class:`~pykvm.core.stats.Stats`, opened on first use).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                assert "remote_tlb_flush" in vm.stats.names()
                assert vm.stats["remote_tlb_flush"] >= 0
        """
        from .stats import Stats  # here: a VM that never reads its statistics skips the import

        return Stats.open(self)

    def _release(self) -> None:
        for eventfd in self._eventfds:
            eventfd.close()
        if "stats" in self.__dict__:
            self.stats.close()
        stuck: list[VcpuThreadError] = []
        for vcpu in self.vcpus:         # each kicks its running thread out and waits for it
            try:
                vcpu.close()
            except VcpuThreadError as exc:
                stuck.append(exc)
        if stuck:                       # a thread still in KVM_RUN: leave guest memory mapped too
            raise stuck[0]
        self.memory._release()



def _irqchip_id(chip: IrqchipId | int) -> IrqchipId:
    try:
        return IrqchipId(chip)
    except ValueError:
        raise InvalidArgument(f"chip={chip!r} is not an in-kernel chip; use IrqchipId.PIC_MASTER, "
                         f"PIC_SLAVE or IOAPIC") from None


def _chip_field(chip: IrqchipId) -> str:
    return "ioapic" if chip == IrqchipId.IOAPIC else "pic"
