"""Every bad input gets a typed error that names the argument, and the process stays healthy.

Each case calls one public API with one bad argument and asserts the exception
type, that the message names the argument (or the field), and, after all, that
this process still creates and runs a VM.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pykvm
from pykvm import Regs, VcpuEvents, guests, x86
from pykvm.core.constants import IrqchipId
from pykvm.core.errors import (
    ArgumentTypeError,
    GuestError,
    GuestMemoryError,
    InvalidArgument,
    InvalidMsi,
    InvalidRouting,
    InvalidVector,
    IrqchipModeError,
    KvmError,
    KvmUnavailableError,
    MemorySlotOverlap,
    PyKvmError,
)
from pykvm.core.interrupts import IrqchipRoute, MsiMessage, MsiRoute
from pykvm.guests import Command
from pykvm.irqchip import ioapic, lapic, pit
from pykvm.runtime import VcpuThread, run_vcpus
from pykvm.vmm import Machine, MultibootError, testkernels


@dataclass
class World:
    """What a case may misuse: a Kvm, a VM with the in-kernel irqchip and PIT, a plain VM, vCPUs, a guest."""

    kvm: pykvm.Kvm
    vm: pykvm.Vm              # irqchip="kernel", pit=True
    plain: pykvm.Vm           # irqchip="none"
    vcpu: pykvm.Vcpu          # of vm
    plain_vcpu: pykvm.Vcpu    # of plain
    session: guests.GuestSession   # long-mode image on a second vCPU of plain
    files: Path               # "fifo" (a named pipe) and "3mib" (3 MiB, sparse)


def _sregs_with(**changes: Any) -> Callable[[World], None]:
    def apply(w: World) -> None:
        sregs = w.plain_vcpu.sregs
        for name, value in changes.items():
            target, _, field = name.rpartition(".")
            setattr(getattr(sregs, target) if target else sregs, field, value)
        w.plain_vcpu.sregs = sregs
    return apply


def _hello() -> Path:
    return testkernels.path("hello")


# A Multiboot image (header address fields) of 64 bytes whose bss reaches 3 GiB: memsz 0xbff00000 at 1 MiB.
_BIG_BSS = struct.pack("<8I", 0x1BADB002, 0x10000, -(0x1BADB002 + 0x10000) & 0xFFFFFFFF, 0x100000, 0x100000, 0,
                       0xC0000000, 0x100020) + b"\xf4" * 32


def _set(attribute: str, value: Any) -> Callable[[World], None]:
    return lambda w: setattr(w.plain_vcpu, attribute, value)


# (id, call, expected exception type, text the message must contain)
CASES: list[tuple[str, Callable[[World], Any], type[BaseException], str]] = [
    # -- Kvm -------------------------------------------------------------------------------
    ("kvm-path-type", lambda w: pykvm.Kvm(123), TypeError, "path=123"),
    ("kvm-path-missing", lambda w: pykvm.Kvm("/nonexistent/kvm"), KvmUnavailableError, "/nonexistent/kvm"),
    ("check-extension-str", lambda w: w.kvm.check_extension("IRQCHIP"), TypeError, "cap="),
    ("check-extension-negative", lambda w: w.kvm.check_extension(-1), ValueError, "cap=-1"),
    # -- create_vm ---------------------------------------------------------------------------
    ("memory-size-negative", lambda w: w.kvm.create_vm(memory_size=-1), ValueError, "memory_size=-1"),
    ("memory-size-str", lambda w: w.kvm.create_vm(memory_size="16M"), TypeError, "memory_size="),
    ("memory-size-unaligned", lambda w: w.kvm.create_vm(memory_size=1000), ValueError, "size=0x3e8"),
    ("memory-size-4tib", lambda w: w.kvm.create_vm(memory_size=4 << 40), ValueError, "allow_overcommit"),
    ("irqchip-unknown", lambda w: w.kvm.create_vm(irqchip="bogus"), ValueError, "irqchip='bogus'"),
    ("irqchip-int", lambda w: w.kvm.create_vm(irqchip=3), ValueError, "irqchip=3"),
    ("pit-without-irqchip", lambda w: w.kvm.create_vm(pit=True), IrqchipModeError, "pit=True"),
    ("tss-addr-negative", lambda w: w.kvm.create_vm(tss_addr=-5), ValueError, "tss_addr=-5"),
    # -- vCPUs -----------------------------------------------------------------------------
    ("vcpu-id-negative", lambda w: w.plain.create_vcpu(-1), ValueError, "vcpu_id=-1"),
    ("vcpu-id-str", lambda w: w.plain.create_vcpu("0"), TypeError, "vcpu_id='0'"),
    ("vcpu-id-too-large", lambda w: w.plain.create_vcpu(1 << 20), ValueError, "KVM_CAP_MAX_VCPU_ID"),
    ("vcpu-id-taken", lambda w: w.plain.create_vcpu(0), ValueError, "already has a vCPU with that id"),
    # -- memory ----------------------------------------------------------------------------
    ("slot-address-str", lambda w: w.plain.memory.add_slot("0x100000", 4096), TypeError,
     "guest_phys_addr='0x100000'"),
    ("slot-size-unaligned", lambda w: w.plain.memory.add_slot(0x2000000, 100), ValueError, "size=0x64"),
    ("slot-address-unaligned", lambda w: w.plain.memory.add_slot(0x2000001, 4096), ValueError,
     "guest_phys_addr=0x2000001"),
    ("slot-overlap", lambda w: w.plain.memory.add_slot(0x1000, 4096), MemorySlotOverlap, "overlaps"),
    ("read-negative-address", lambda w: w.plain.memory.read(-1, 4), ValueError, "gpa=-1"),
    ("read-negative-size", lambda w: w.plain.memory.read(0, -4), ValueError, "size=-4"),
    ("read-outside-slots", lambda w: w.plain.memory.read(1 << 40, 4), GuestMemoryError, "not inside"),
    ("write-str", lambda w: w.plain.memory.write(0, "text"), TypeError, "data='text'"),
    ("write-u32-too-big", lambda w: w.plain.memory.write_u32(0, 1 << 40), ValueError, "value="),
    ("fill-byte-too-big", lambda w: w.plain.memory.fill(0, 4, 256), ValueError, "byte=256"),
    # -- interrupt lines and routes ---------------------------------------------------------
    ("irq-line-str", lambda w: w.vm.irq_line("3", 1), TypeError, "gsi='3'"),
    ("irq-line-gsi-huge", lambda w: w.vm.irq_line(5000, 1), ValueError, "gsi=0x1388"),
    ("irq-line-level", lambda w: w.vm.irq_line(3, 7), ValueError, "level=7"),
    ("irq-line-unrouted", lambda w: w.vm.irq_line(100, 1), InvalidRouting, "GSI 100 has no route"),
    ("routing-not-routes", lambda w: w.vm.set_gsi_routing([1, 2, 3]), InvalidRouting, "routes[0]=1"),
    ("routing-not-a-list", lambda w: w.vm.set_gsi_routing(5), TypeError, "routes=5"),
    ("routing-too-many", lambda w: w.vm.set_gsi_routing(
        [IrqchipRoute(i % 24, IrqchipId.IOAPIC, i % 24) for i in range(5000)]), InvalidRouting, "5000 entries"),
    ("route-chip-unknown", lambda w: w.vm.set_gsi_routing([IrqchipRoute(3, 7, 3)]), InvalidRouting, "chip=7"),
    ("route-pin-too-big", lambda w: w.vm.set_gsi_routing([IrqchipRoute(3, IrqchipId.IOAPIC, 99)]),
     InvalidRouting, "not 99"),
    ("route-gsi-negative", lambda w: w.vm.set_gsi_routing(
        [MsiRoute(-1, MsiMessage.compose(destination=0, vector=0x40))]), InvalidRouting, "GSI -1"),
    ("route-message-not-msi", lambda w: w.vm.set_gsi_routing([MsiRoute(40, "junk")]), InvalidRouting,
     "message='junk'"),
    ("msi-destination", lambda w: w.vm.signal_msi(destination=300, vector=0x40), InvalidMsi,
     "destination=300"),
    ("msi-vector", lambda w: w.vm.signal_msi(destination=0, vector=300), InvalidVector, "vector 300"),
    ("msi-not-a-message", lambda w: w.vm.signal_msi("junk"), TypeError, "message='junk'"),
    ("msi-reserved-bits", lambda w: MsiMessage(0xFEE00003, 0, 0x40), InvalidMsi, "bits 1:0"),
    ("msi-address-range", lambda w: MsiMessage(0x12345000, 0, 0x40), InvalidMsi, "0xFEE"),
    ("set-irqchip-junk", lambda w: w.vm.set_irqchip(IrqchipId.IOAPIC, "junk"), TypeError, "raw='junk'"),
    ("set-irqchip-chip", lambda w: w.vm.set_irqchip(99, b""), ValueError, "chip=99"),
    ("get-irqchip-chip", lambda w: w.vm.get_irqchip(7), ValueError, "chip=7"),
    ("irqfd-gsi-str", lambda w: w.vm.irqfd("x"), TypeError, "gsi='x'"),
    ("irqfd-unrouted", lambda w: w.vm.irqfd(100), InvalidRouting, "GSI 100 has no route"),
    ("irqfd-eventfd-negative", lambda w: w.vm.irqfd(4, eventfd=-1), ValueError, "eventfd=-1"),
    ("ioeventfd-length", lambda w: w.vm.ioeventfd(0x10, length=3, pio=True), ValueError, "length"),
    ("ioeventfd-address", lambda w: w.vm.ioeventfd(-1), ValueError, "address=-1"),
    ("enable-cap-str", lambda w: w.vm.enable_cap("x"), TypeError, "cap='x'"),
    ("set-pit2-junk", lambda w: w.vm.set_pit2("x"), TypeError, "state='x'"),
    ("pit-count-zero", lambda w: pit.program(w.vm, 0), ValueError, "count=0"),
    ("pit-channel", lambda w: pit.program(w.vm, 100, channel=3), ValueError, "channel=3"),
    ("irqchip-on-plain-vm", lambda w: ioapic.read(w.plain), IrqchipModeError, "irqchip='kernel'"),
    ("lapic-on-plain-vm", lambda w: w.plain_vcpu.get_lapic(), IrqchipModeError, "KVM_GET_LAPIC"),
    ("set-lapic-short", lambda w: w.vcpu.set_lapic(b"short"), ValueError, "registers="),
    ("icr-vector", lambda w: lapic.icr(300), InvalidVector, "300"),
    ("redirection-vector", lambda w: ioapic.RedirectionEntry(vector=300), InvalidVector, "300"),
    ("compose-destination", lambda w: MsiMessage.compose(destination=-1, vector=0x40), InvalidMsi,
     "destination=-1"),
    # -- vCPU state and injection ------------------------------------------------------------
    ("interrupt-bool", lambda w: w.plain_vcpu.interrupt(True), InvalidVector, "True"),
    ("interrupt-too-big", lambda w: w.plain_vcpu.interrupt(256), InvalidVector, "256"),
    ("interrupt-negative", lambda w: w.plain_vcpu.interrupt(-1), InvalidVector, "-1"),
    ("interrupt-str", lambda w: w.plain_vcpu.interrupt("0x20"), InvalidVector, "'0x20'"),
    ("interrupt-kernel-pic", lambda w: w.vcpu.interrupt(0x40), IrqchipModeError, "in-kernel PIC"),
    ("regs-not-regs", _set("regs", "x"), TypeError, "regs='x'"),
    ("regs-negative-rip", _set("regs", Regs(rip=-1)), ValueError, "Regs.rip=-1"),
    ("regs-rax-too-big", _set("regs", Regs(rax=1 << 64)), ValueError, "Regs.rax="),
    ("sregs-not-sregs", _set("sregs", Regs()), TypeError, "sregs=Regs("),
    ("sregs-selector-too-big", _sregs_with(**{"cs.selector": 1 << 20}), ValueError, "Sregs.cs.selector="),
    ("sregs-paging-without-pe", _sregs_with(cr0=1 << 31), KvmError, "KVM_SET_SREGS"),
    ("events-not-events", _set("events", 5), TypeError, "events=5"),
    ("events-bad-flags", _set("events", VcpuEvents(flags=1 << 30)), KvmError, "KVM_SET_VCPU_EVENTS"),
    ("mp-state-unknown", _set("mp_state", 99), ValueError, "mp_state=99"),
    ("mp-state-str", _set("mp_state", "RUNNABLE"), ValueError, "mp_state='RUNNABLE'"),
    ("cpuid-not-entries", lambda w: w.plain_vcpu.set_cpuid([1, 2, 3]), TypeError, "entries[0]=1"),
    ("msrs-str-index", lambda w: w.plain_vcpu.set_msrs({"x": 1}), TypeError, "index='x'"),
    ("msrs-index-too-big", lambda w: w.plain_vcpu.get_msrs([1 << 40]), ValueError, "index="),
    ("cr8-negative", lambda w: setattr(w.plain_vcpu.kvm_run, "cr8", -1), ValueError, "cr8=-1"),
    ("exception-vector-external", lambda w: w.plain_vcpu.inject_exception(0x40), InvalidVector, "vector"),
    ("exception-error-code-on-de", lambda w: w.plain_vcpu.inject_exception(0, error_code=1), ValueError,
     "error_code"),
    # -- guests, x86, runtime -------------------------------------------------------------------
    ("guest-mode-unknown", lambda w: guests.load("vm86"), ValueError, "vm86"),
    ("guest-real-smp", lambda w: guests.boot_cpus(w.plain, "real", cpus=2), GuestError, "long-mode image"),
    ("guest-cpus-zero", lambda w: guests.boot_cpus(w.plain, "long", cpus=0), ValueError, "cpus=0"),
    ("command-unknown", lambda w: w.session.command(999), ValueError, "999"),
    ("command-arg-negative", lambda w: w.session.command(Command.NOP, arg=-1), ValueError, "arg=-1"),
    ("enter-long-mode-rip", lambda w: x86.enter_long_mode(w.plain_vcpu, -1), ValueError, "Regs.rip=-1"),
    ("enter-real-mode-ip-above-16-bits", lambda w: x86.enter_real_mode(w.plain_vcpu, ip=0x36000, cs=0),
     ValueError, "ip=0x36000: out of range 0..0xffff; real-mode CS and IP are 16-bit"),
    ("enter-real-mode-cs-above-16-bits", lambda w: x86.enter_real_mode(w.plain_vcpu, ip=0, cs=0x36000),
     ValueError, "put the high part in CS"),
    ("assemble-not-text", lambda w: pykvm.assemble(123, "long"), TypeError, "source=123"),
    ("assemble-mode", lambda w: pykvm.assemble("nop", "vm86"), ValueError, "vm86"),
    ("run-vcpus-handler", lambda w: run_vcpus([w.plain_vcpu], None), TypeError, "handler=None"),
    ("vcpu-thread-target", lambda w: VcpuThread(w.plain_vcpu, None), TypeError, "target=None"),
    # -- the Machine's kernel, modules and run ----------------------------------------------------
    ("machine-kernel-fifo", lambda w: Machine(w.files / "fifo"), InvalidArgument, "fifo': is a FIFO"),
    ("machine-kernel-device", lambda w: Machine("/dev/zero"), InvalidArgument,
     "kernel '/dev/zero': is a character device"),
    ("machine-kernel-directory", lambda w: Machine(w.files), InvalidArgument, "is a directory"),
    ("machine-module-fifo", lambda w: Machine(_hello(), modules=[w.files / "fifo"]), InvalidArgument,
     "module 0 '"),
    ("machine-kernel-above-ram", lambda w: Machine(w.files / "3mib", memory=2), InvalidArgument,
     "3145728 bytes, more than the guest's RAM (2 MiB)"),
    ("machine-module-above-ram", lambda w: Machine(_hello(), memory=2, modules=[w.files / "3mib"]),
     InvalidArgument, "module 0 '"),
    ("machine-kernel-bytes-above-ram", lambda w: Machine(bytes(3 << 20), memory=2), InvalidArgument,
     "more than the guest's RAM"),
    ("machine-bss-above-ram", lambda w: Machine(_BIG_BSS), MultibootError, "0x100000-0xc0000000) is outside memory"),
    ("machine-cmdline-not-utf8", lambda w: Machine(_hello(), cmdline="quiet \udcff"), InvalidArgument,
     "cmdline='quiet \\udcff': not encodable as UTF-8"),
    ("machine-timeout-inf", lambda w: Machine(_hello(), kvm=w.kvm).run(timeout=math.inf), InvalidArgument,
     "timeout=inf"),
    ("machine-timeout-nan", lambda w: Machine(_hello(), kvm=w.kvm).run(timeout=math.nan), InvalidArgument,
     "timeout=nan"),
    ("machine-timeout-zero", lambda w: Machine(_hello(), kvm=w.kvm).run(timeout=0), InvalidArgument,
     "timeout=0"),
]


@pytest.fixture
def world(kvm, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with open(tmp_path / "3mib", "wb") as sparse:
        sparse.truncate(3 << 20)
    with kvm.create_vm(irqchip="kernel", pit=True) as vm, kvm.create_vm() as plain:
        vcpu = vm.create_vcpu()
        plain_vcpu = plain.create_vcpu()
        session = guests.load("long").boot(plain.create_vcpu())
        yield World(kvm, vm, plain, vcpu, plain_vcpu, session, tmp_path)


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("call, kind, text", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_typed_and_named(world, call, kind, text):
    with pytest.raises(kind) as info:
        call(world)
    assert isinstance(info.value, PyKvmError), f"{type(info.value).__name__} is not a pykvm error"
    message = str(info.value)
    assert text in message, message
    assert len(message) < 1000, f"message of {len(message)} characters"


def test_the_process_still_runs_a_vm_after_every_case(world):
    for _, call, kind, _ in CASES:
        with pytest.raises(kind):
            call(world)
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, "mov $0x2a, %eax\n out %eax, $0x10\n")
        exit = vcpu.run()
        assert isinstance(exit, pykvm.IoExit) and exit.value == 0x2a


def test_argument_errors_are_value_and_type_errors_too():
    assert issubclass(InvalidArgument, ValueError) and issubclass(ArgumentTypeError, TypeError)
