"""Bad input to the irqchip, routing, MSI, irqfd and SMP APIs: typed errors, no leaks, no hangs."""

import os
import time

import psutil
import pytest

from pykvm import guests
from pykvm.core.constants import IrqchipId
from pykvm.core.errors import (
    CommandTimeout,
    InvalidMsi,
    InvalidRouting,
    InvalidVector,
    IrqchipModeError,
    VcpuThreadError,
)
from pykvm.core.exits import IoExit
from pykvm.guests import Command
from pykvm.injection import Injector
from pykvm.irqchip import IrqchipRoute, MsiMessage, MsiRoute, pit
from pykvm.runtime import VcpuThread, run_vcpus


def test_irqchip_after_the_first_vcpu_is_refused(vm):
    vm.create_vcpu()
    with pytest.raises(IrqchipModeError, match="before the first vCPU"):
        vm.create_irqchip()


def test_a_second_irqchip_is_refused(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        with pytest.raises(IrqchipModeError, match="already has the 'kernel' irqchip"):
            vm.create_irqchip()


def test_unknown_irqchip_mode(kvm):
    with pytest.raises(ValueError, match="choose one of 'none', 'kernel', 'split'"):
        kvm.create_vm(irqchip="ioapic")


def test_kvm_interrupt_with_the_kernel_pic_explains_enxio(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(IrqchipModeError, match="in-kernel PIC/IOAPIC") as info:
            vcpu.interrupt(0x40)
        assert "No such device or address" in str(info.value)     # KVM's own ENXIO, explained
        with pytest.raises(IrqchipModeError, match="No such device or address"):
            Injector(vcpu).interrupt(0x40)      # the injector leaves the answer to KVM, not "not ready"


@pytest.mark.parametrize("call", ["irq_line", "signal_msi", "irqfd", "get_lapic", "get_irqchip"])
def test_kernel_paths_refused_without_an_in_kernel_irqchip(vm, call):
    vcpu = vm.create_vcpu()
    actions = {"irq_line": lambda: vm.irq_line(4, 1),
               "signal_msi": lambda: vm.signal_msi(destination=0, vector=0x40),
               "irqfd": lambda: vm.irqfd(4), "get_lapic": lambda: vcpu.get_lapic(),
               "get_irqchip": lambda: vm.get_irqchip(IrqchipId.IOAPIC)}
    with pytest.raises(IrqchipModeError, match="irqchip is 'none'; create the VM with irqchip="):
        actions[call]()


def test_pit_needs_the_kernel_irqchip(kvm):
    with kvm.create_vm(irqchip="split") as vm:
        with pytest.raises(IrqchipModeError, match="needs irqchip='kernel'"):
            vm.create_pit2()
    with kvm.create_vm(irqchip="kernel", pit=True) as vm:
        assert vm.irqchip.ioapic_in_kernel


def test_gsi_out_of_range(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        with pytest.raises(InvalidRouting, match="GSI 24 has no route .*GSIs 0..23"):
            vm.irq_line(24, 1)
        with pytest.raises(InvalidRouting, match="GSI 5000 is out of range"):
            vm.set_gsi_routing([IrqchipRoute(5000, IrqchipId.IOAPIC, 1)])


def test_invalid_routing_entries(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        with pytest.raises(InvalidRouting, match="IOAPIC has pins 0..23, not 30"):
            vm.set_gsi_routing([IrqchipRoute(3, IrqchipId.IOAPIC, 30)])
        with pytest.raises(InvalidRouting, match="not a routing entry"):
            vm.set_gsi_routing([(3, 3)])
        msi = MsiMessage.compose(destination=0, vector=0x40)
        with pytest.raises(InvalidRouting, match="KVM refused the routing table"):
            vm.set_gsi_routing([MsiRoute(40, msi), MsiRoute(40, msi)])     # KVM's own EINVAL
        assert vm.routes[0] == IrqchipRoute(0, IrqchipId.PIC_MASTER, 0)   # table unchanged


def test_irqfd_on_a_closed_eventfd(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        fd = os.eventfd(0)
        os.close(fd)
        with pytest.raises(InvalidRouting, match="closed eventfd"):
            vm.irqfd(4, eventfd=fd)


def test_msi_with_reserved_bits(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        good = MsiMessage.compose(destination=0, vector=0x40)
        with pytest.raises(InvalidMsi):
            vm.signal_msi(MsiMessage(good.address_lo | 0x3, good.address_hi, good.data))
        with pytest.raises(InvalidMsi):
            vm.signal_msi(MsiMessage(good.address_lo, good.address_hi, good.data | 0x10000))
        with pytest.raises(InvalidVector):
            vm.signal_msi(destination=0, vector=0x140)


def test_a_dying_vcpu_thread_is_reported(vcpu):
    def target(stopping):
        raise RuntimeError("device model crashed")
    with pytest.raises(VcpuThreadError, match="thread of vCPU 0 died: RuntimeError: device model crashed"):
        VcpuThread(vcpu, target).result(timeout=5)


def test_run_vcpus_stops_a_vcpu_that_never_finishes(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        bsp, ap = guests.boot_cpus(vm, "long", cpus=2)
        bsp.send(Command.DONE)
        ap.send(Command.SPIN, 2**32 - 1)              # no exits for minutes
        start = time.monotonic()
        with pytest.raises(VcpuThreadError, match="vCPU 1 did not finish within [0-9.]+ s and was stopped"):
            run_vcpus(vm.vcpus, lambda vcpu, exit: isinstance(exit, IoExit), timeout=0.5)
        assert time.monotonic() - start < 3


def test_irqchip_objects_leak_no_fds(kvm):
    process = psutil.Process()
    before = process.num_fds()
    for _ in range(3):
        with kvm.create_vm(irqchip="kernel") as vm:
            vcpu = vm.create_vcpu()
            vm.irqfd(4)
            vm.irqfd(5, resample=True)
            vm.ioeventfd(0x600, 2, pio=True)
            vm.stats.read()
            vcpu.stats.read()
    assert process.num_fds() == before


def test_pit_state_needs_a_pit_and_valid_values(kvm):
    with kvm.create_vm(irqchip="kernel") as vm:
        with pytest.raises(IrqchipModeError, match="no in-kernel PIT.*pit=True"):
            pit.program(vm, 1000)
        vm.create_pit2()
        for bad, match in [(dict(count=0), "outside 1..65536"), (dict(count=10, mode=6), "modes 0-5"),
                           (dict(count=10, channel=3), "channels 0, 1, 2")]:
            with pytest.raises(ValueError, match=match):
                pit.program(vm, **bad)
        assert pit.channels(vm)[0].mode == 0xFF                 # nothing was loaded


def test_a_command_that_never_returns_times_out_instead_of_hanging(kvm):
    # cli; hlt with the in-kernel irqchip: the vCPU sleeps inside KVM_RUN and nothing can wake it.
    with kvm.create_vm(irqchip="kernel") as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        guest.command(Command.CLI)
        start = time.monotonic()
        with pytest.raises(CommandTimeout, match=r"Command.HLT did not reach a sync point within 0.3 s"):
            guest.command(Command.HLT, timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 5
        assert guest.vcpu.regs.rip == guest.address("hlt_end")   # kicked out of the halt


def test_watchdog_calls_only_expired_guards():
    from pykvm.runtime.watchdog import Watchdog
    watchdog, fired = Watchdog(), []
    with watchdog.guard(0.05, lambda: fired.append("slow")):
        time.sleep(0.2)
    with watchdog.guard(5, lambda: fired.append("fast")):
        pass
    time.sleep(0.1)
    assert fired == ["slow"]
