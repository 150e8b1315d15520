"""In-kernel irqchip paths, checked in the guest's own vector log.

Each test boots the long-mode image (real mode for the 8259) on a VM with an
in-kernel irqchip, makes an interrupt arrive through one path (KVM_IRQ_LINE
through the IOAPIC or PIC, KVM_SIGNAL_MSI, an irqfd written from another
thread, an IPI from another vCPU, the LAPIC timer) and asserts what the
guest's handler logged: vector, CPU, order and interrupted RIP, plus the
LAPIC / IOAPIC state KVM reports (ISR, IRR, remote IRR).

kvm_pvm note (pykvm.hosts.conformance, lapic_after_sti): with the in-kernel LAPIC this host injects a
pending vector only at a VM entry, so a vector raised while the guest sits at a
sync exit is taken at the instruction after the `out` (label `sync_done`).

IOAPIC tests use pins 16-23: GSIs 0-15 also reach the 8259s, whose ExtINT
would arrive through LINT0 as well (the BSP's LVT0 is ExtINT after reset).
"""

import signal
import threading
import time

import pytest

from pykvm import guests
from pykvm.core.constants import Cap, ExitReason, IrqchipId
from pykvm.core.errors import CommandTimeout
from pykvm.core.vcpu import KICK_SIGNAL, install_kick_handler
from pykvm.guests import Command, StopKind
from pykvm.hosts.vendor import VendorModule
from pykvm.irqchip import (
    DeliveryMode,
    IrqchipRoute,
    MsiMessage,
    MsiRoute,
    UserspaceIrqController,
    ioapic,
    lapic,
    pic,
    pit,
)
from pykvm.irqchip.ioapic import RedirectionEntry
from pykvm.irqchip.lapic import ApicReg, DestinationShorthand, TimerMode
from pykvm.runtime import command_in_thread
from pykvm.testing import HostStalls, assert_delivered
from pykvm.x86.msr import TSC_MSR

VECTOR = 0x41


def vectors(session):
    return [record.vector for record in session.log()]


def route_pin(guest, pin, vector, *, level=False, masked=False, destination=0):
    guest.ioapic_route(pin, RedirectionEntry(vector=vector, level_triggered=level, masked=masked,
                                             destination=destination))


def test_irq_line_through_the_ioapic(machine):
    [guest] = machine()
    guest.apic_enable()
    route_pin(guest, 16, VECTOR)
    guest.command(Command.STI)
    status = guest.vcpu.vm.irq_line(16, 1)
    guest.vcpu.vm.irq_line(16, 0)
    assert status is None or status >= 1          # delivered to one LAPIC
    guest.command(Command.NOP)
    [record] = guest.log()
    assert (record.vector, record.cpu, record.rip) == (VECTOR, 0, guest.address("sync_done"))
    assert lapic.read(guest.vcpu).isr == frozenset()     # the handler EOId


def test_signal_msi_and_eoi_clears_isr(machine, host):
    [guest] = machine()
    guest.apic_enable(auto_eoi=False)
    guest.command(Command.STI)
    assert guest.vcpu.vm.signal_msi(destination=0, vector=0x51) == 1
    assert 0x51 in lapic.read(guest.vcpu).irr                       # accepted, not yet delivered
    guest.command(Command.NOP)
    assert vectors(guest) == [0x51]
    state = lapic.read(guest.vcpu)
    assert 0x51 not in state.irr
    if host.lapic_tracks_in_service:
        assert state.isr == {0x51} and state.highest_isr == 0x51
        assert guest.apic_read(ApicReg.PPR) & 0xF0 == 0x50    # in service: PPR = its class
    else:
        # kvm_pvm (measured): nothing shows as in service, to KVM_GET_LAPIC or to the guest.
        assert state.isr == frozenset() and guest.apic_read(ApicReg.PPR) == 0
    guest.eoi()
    assert lapic.read(guest.vcpu).isr == frozenset()
    assert guest.apic_read(ApicReg.PPR) == 0


def test_two_pending_vectors_are_taken_highest_first(machine, host):
    [guest] = machine()
    guest.apic_enable()
    guest.command(Command.CLI)
    for vector in (0x41, 0x81):
        guest.vcpu.vm.signal_msi(destination=0, vector=vector)
    guest.command(Command.NOP)
    assert vectors(guest) == []                               # IF=0: both wait in the IRR
    assert lapic.read(guest.vcpu).irr >= {0x41, 0x81}
    guest.command(Command.STI)
    guest.command(Command.NOP)
    early = False
    if not host.lapic_delivers_when_unblocked:
        # kvm_pvm: 0x41 becomes deliverable at 0x81's IRETQ, but is injected only at the next
        # VM entry. That is usually the one after the guest's next sync exit; an in-kernel exit in
        # between (a host interrupt: seen once in CI with four pytest workers on two CPUs) makes an
        # earlier entry, and 0x41 is taken there, still after 0x81.
        early = vectors(guest) == [0x81, 0x41]
        if not early:
            assert vectors(guest) == [0x81]
            guest.command(Command.NOP)
    assert vectors(guest) == [0x81, 0x41]
    # Architecturally both are taken after the instruction in the STI shadow (`jmp next_step`);
    # kvm_pvm takes them at VM entries, i.e. after the sync `out` (0x41 earlier only as above).
    taken_at = guest.address("next_step" if host.lapic_delivers_when_unblocked else "sync_done")
    first, second = guest.log()
    assert first.rip == taken_at and (early or second.rip == taken_at), guest.log()


def test_tpr_holds_back_lower_classes(machine, host):
    [guest] = machine()
    guest.apic_enable()
    guest.apic_write(ApicReg.TPR, 0x50)
    guest.command(Command.STI)
    guest.vcpu.vm.signal_msi(destination=0, vector=0x45)      # class 4 <= TPR class 5
    guest.vcpu.vm.signal_msi(destination=0, vector=0x61)      # class 6 > 5
    guest.command(Command.NOP)
    guest.command(Command.NOP)
    assert vectors(guest) == [0x61]
    assert 0x45 in lapic.read(guest.vcpu).irr
    guest.apic_write(ApicReg.TPR, 0)
    if not host.lapic_delivers_when_unblocked:
        assert vectors(guest) == [0x61]     # kvm_pvm: injected at the next entry, not at the TPR write
        guest.command(Command.NOP)
    assert vectors(guest) == [0x61, 0x45]


def test_masked_ioapic_pin_waits_until_unmasked(machine, host):
    [guest] = machine()
    guest.apic_enable(auto_eoi=False)
    route_pin(guest, 17, 0x59, level=True, masked=True)
    guest.command(Command.STI)
    vm = guest.vcpu.vm
    vm.irq_line(17, 1)
    guest.command(Command.NOP)
    assert vectors(guest) == []
    state = ioapic.read(vm)
    assert state.redirection[17].masked and 17 in state.irr
    route_pin(guest, 17, 0x59, level=True, masked=False)
    guest.command(Command.NOP)
    if host.lapic_tracks_in_service:
        assert vectors(guest) == [0x59]
    else:
        # kvm_pvm (measured): nothing stays in service, so the asserted level vector is taken again
        # at every entry until the EOI; an asynchronous host exit (a busy host) adds entries.
        assert vectors(guest)[:1] == [0x59] and set(vectors(guest)) == {0x59}
    assert ioapic.read(vm).redirection[17].remote_irr     # level: waits for the EOI
    vm.irq_line(17, 0)
    guest.eoi()
    assert not ioapic.read(vm).redirection[17].remote_irr
    guest.command(Command.NOP)
    if host.lapic_tracks_in_service:
        assert vectors(guest) == [0x59]                             # line low: no second delivery
    else:
        # kvm_pvm (measured): the level vector stayed in the LAPIC IRR after its delivery and
        # was delivered once more at the next entry (the one that ran the EOI).
        assert len(vectors(guest)) >= 2 and set(vectors(guest)) == {0x59}


def test_level_irqfd_reasserts_after_eoi_through_resample(machine, host):
    [guest] = machine()
    guest.apic_enable(auto_eoi=False)
    route_pin(guest, 18, 0x5A, level=True)
    guest.command(Command.STI)
    with guest.vcpu.vm.irqfd(18, resample=True) as irqfd:
        irqfd.trigger()                                  # KVM raises the line from a work item
        guest.wait_log(1)
        assert vectors(guest) == [0x5A]
        if host.lapic_tracks_in_service:
            assert not irqfd.wait_resample(timeout=0.05)     # not EOId yet: line stays asserted
            guest.eoi()
        # else kvm_pvm (measured): the resample comes without a guest EOI, as if the LAPIC
        # had EOId the vector at delivery (its ISR stays empty, see lapic_tracks_in_service).
        assert irqfd.wait_resample(timeout=2.0)          # KVM de-asserted the line and told us
        settled = len(guest.log())
        guest.command(Command.STI)
        guest.command(Command.NOP)
        assert len(guest.log()) == settled               # de-asserted: no redelivery by itself
        irqfd.trigger()                                  # the device still needs service
        guest.wait_log(settled + 1)
        assert vectors(guest)[-1] == 0x5A


def test_irqfd_from_another_thread_wakes_a_halted_vcpu(machine):
    [guest] = machine()
    guest.apic_enable()
    vm = guest.vcpu.vm
    vm.set_gsi_routing(vm.routes + (MsiRoute(100, MsiMessage.compose(destination=0, vector=0x64)),))
    with vm.irqfd(100) as irqfd:
        waiter = command_in_thread(guest, Command.WAIT_LOG, 1)    # sti; hlt in the kernel
        time.sleep(0.05)
        assert waiter.running                                     # halted, no exit
        threading.Thread(target=irqfd.trigger).start()
        waiter.result(timeout=5)
    [record] = guest.log()
    assert record.vector == 0x64 and record.cpu == 0
    assert record.rip in (guest.address("wait_log_hlt"), guest.address("wait_log_hlt") + 1)


def test_ipi_between_two_vcpus(machine):
    bsp, ap = machine(cpus=2)
    for cpu in (bsp, ap):
        cpu.apic_enable()
    waiter = command_in_thread(ap, Command.WAIT_LOG, 1)
    bsp.send_ipi(0x71, destination=1)
    waiter.result(timeout=5)
    assert [(r.vector, r.cpu) for r in ap.log()] == [(0x71, 1)]
    assert bsp.log() == []


@pytest.mark.parametrize("x2apic", [False, True], ids=["xapic", "x2apic"])
def test_ipi_destinations(machine, x2apic):
    cpus = machine(cpus=3)
    for cpu in cpus:
        cpu.apic_enable(x2apic=x2apic)
    if not x2apic:                       # flat logical model: one bit per CPU
        for cpu in cpus:
            cpu.apic_write(ApicReg.DFR, 0xFFFFFFFF)
            cpu.apic_write(ApicReg.LDR, 1 << (24 + cpu.vcpu.id))
    bsp = cpus[0]

    def deliver(expected_cpus, **ipi):
        counts = [cpu.log_count() for cpu in cpus]
        waiters = [command_in_thread(cpus[i], Command.WAIT_LOG, counts[i] + 1)
                   for i in expected_cpus if i != 0]
        bsp.send_ipi(**ipi)
        if 0 in expected_cpus:
            bsp.command(Command.STI)
            bsp.command(Command.CLI)
        for waiter in waiters:
            waiter.result(timeout=5)
        return [[r.vector for r in cpu.records_since(count)] for cpu, count in zip(cpus, counts, strict=True)]

    assert deliver([2], vector=0x72, destination=2) == [[], [], [0x72]]          # physical
    logical_mask = 0b110 if not x2apic else 0b110     # x2APIC cluster 0: bit = APIC ID
    assert deliver([1, 2], vector=0x73, destination=logical_mask, logical=True) == [[], [0x73], [0x73]]
    assert deliver([1, 2], vector=0x74, shorthand=DestinationShorthand.ALL_EXCLUDING_SELF) \
        == [[], [0x74], [0x74]]
    assert deliver([0, 1, 2], vector=0x75, shorthand=DestinationShorthand.ALL_INCLUDING_SELF) \
        == [[0x75], [0x75], [0x75]]


def test_nmi_ipi(machine):
    bsp, ap = machine(cpus=2)
    for cpu in (bsp, ap):
        cpu.apic_enable()
    ap.command(Command.CLI)
    # 200k iterations: with IF=0 under an in-kernel irqchip, kvm_pvm runs this loop at ~1 us
    # per iteration (measured), elsewhere it takes well under a millisecond; either way the
    # NMI IPI lands inside it.
    waiter = command_in_thread(ap, Command.SPIN, 200_000)
    bsp.send_ipi(0, destination=1, delivery_mode=DeliveryMode.NMI)
    waiter.result(timeout=10)
    [record] = ap.log()
    assert record.vector == 2 and record.cpu == 1
    assert not record.interrupts_were_enabled           # an NMI ignores IF


@pytest.mark.parametrize("mode", [TimerMode.PERIODIC, TimerMode.ONE_SHOT])
def test_lapic_timer(machine, mode):
    [guest] = machine()
    guest.apic_enable()
    ticks = 9 if mode == TimerMode.PERIODIC else 1
    period_ns = 2_000_000                  # KVM's APIC timer counts at 1 GHz: count * divide ns
    guest.apic_write(ApicReg.TIMER_DIVIDE, 0b1011)          # divide by 1
    guest.apic_write(ApicReg.LVT_TIMER, 0x90 | int(mode) << 17)
    tsc_before = guest.vcpu.get_msrs([TSC_MSR])[TSC_MSR]     # the guest's TSC before the timer is armed
    with HostStalls(threshold=period_ns / 2e9) as stalls:
        start = time.perf_counter()
        guest.apic_write(ApicReg.TIMER_INITIAL, period_ns)
        armed_by = time.perf_counter()                      # the guest wrote it in [start, armed_by]
        guest.wait_log(ticks)
        elapsed = time.perf_counter() - start
    guest.apic_write(ApicReg.LVT_TIMER, 0x90 | 1 << 16)     # masked
    log = guest.log()[:ticks]
    assert [r.vector for r in log] == [0x90] * ticks
    assert elapsed >= ticks * period_ns / 1e9 * 0.9           # by the host's clock
    # By the guest's TSC: tick k is due one period after tick k-1's deadline, not
    # after its delivery, so a tick taken late (the host busy, or delivery waiting
    # for the next VM entry) shortens the gap after it. What must hold: no tick
    # ahead of the period grid counted from before the arming (10% slack, as by
    # the host's clock: KVM may fire its hrtimer a little early, and an emulated
    # host's TSC rate is calibrated).
    tsc_per_period = guest.vcpu.tsc_khz * period_ns / 1e6
    due = [tsc_before + 0.9 * k * tsc_per_period for k in range(1, ticks + 1)]
    assert all(record.tsc >= at for record, at in zip(log, due, strict=True)), \
        [round((record.tsc - tsc_before) / tsc_per_period, 2) for record in log]
    if mode == TimerMode.PERIODIC:
        # And no tick lost but where the host ran nothing: KVM keeps one tick pending and
        # drops the ones that expire meanwhile, so a host that stops the guest for periods
        # (QEMU TCG under load: 2.83 periods a tick, measured in CI) loses ticks that are
        # its own. Grid points that fell in a stall this process measured are excused;
        # one more is allowed for a late last tick. A timer 30% slow loses 2 of 10.
        grid = [(log[0].tsc - tsc_before) / tsc_per_period, (log[-1].tsc - tsc_before) / tsc_per_period]
        lost = round(grid[1] - grid[0]) - (ticks - 1)
        moments = [start + k * period_ns / 1e9 for k in range(1, round(grid[1]) + 1)]
        excused = stalls.covering(moments, margin=period_ns / 4e9 + (armed_by - start))
        assert lost <= excused + 1, (f"{lost} periodic ticks lost, {excused} grid points in host stalls "
                                     f"{stalls.intervals}; ticks at periods "
                                     f"{[round((r.tsc - tsc_before) / tsc_per_period, 2) for r in log]}")
    else:
        guest.command(Command.STI)
        time.sleep(0.01)
        guest.command(Command.NOP)
        assert_delivered(guest, [(0x90, 0)])                 # one-shot: fired once (kvm_amd's re-delivery excused)


def test_lapic_timer_tsc_deadline(machine, kvm):
    [guest] = machine()
    offered = any(leaf.function == 1 and leaf.ecx >> 24 & 1 for leaf in guest.vcpu.cpuid)
    # pykvm offers the TSC-deadline timer in CPUID exactly when KVM says it emulates it.
    assert offered == bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER))
    if not offered:
        return                                  # nothing to program on this host
    guest.apic_enable()
    guest.apic_write(ApicReg.LVT_TIMER, 0x91 | int(TimerMode.TSC_DEADLINE) << 17)
    guest.command(Command.TSC_DEADLINE, guest.vcpu.tsc_khz * 2)   # 2 ms from now
    guest.wait_log(1)
    assert vectors(guest) == [0x91]


@pytest.mark.requires_cap(Cap.TSC_DEADLINE_TIMER)
def test_a_wait_for_a_tsc_deadline_that_never_comes_names_the_deadline_and_the_tsc(machine):
    [guest] = machine()
    guest.apic_enable()
    guest.apic_write(ApicReg.LVT_TIMER, 0x91 | int(TimerMode.TSC_DEADLINE) << 17)
    guest.command(Command.TSC_DEADLINE, 1 << 50)                      # armed, and far away
    with pytest.raises(CommandTimeout, match=r"IA32_TSC_DEADLINE=0x[0-9a-f]+, TSC=0x[0-9a-f]+: due in \d+ TSC ticks"):
        guest.command(Command.WAIT_LOG, 1, timeout=0.2)


def test_kick_interrupts_a_guest_spinning_without_exits(machine, kvm):
    [guest] = machine(irqchip="none")
    vcpu = guest.vcpu
    guest.send(Command.SPIN, 2**32 - 1)
    exits = []
    runner = threading.Thread(target=lambda: exits.append(vcpu.run()))
    with vcpu.stats.delta() as delta:
        runner.start()
        time.sleep(0.1)
        assert runner.is_alive()                     # spinning inside KVM_RUN, no exit
        vcpu.kick()
        runner.join(5)
    assert not runner.is_alive()
    assert type(exits[0]).__name__ == "IntrExit"
    spin = guest.address("spin_loop")
    assert spin <= vcpu.regs.rip <= spin + 4         # stopped in the middle of the loop
    assert delta["signal_exits"] >= 1


@pytest.mark.parametrize("immediate_exit", [True, False], ids=["immediate_exit", "signal_only"])
def test_hand_made_kick_before_kvm_run(machine, immediate_exit):
    # A kick by hand (install_kick_handler, immediate_exit, pthread_kill) that reaches the vCPU's
    # thread before it enters KVM_RUN: with immediate_exit KVM_RUN returns at once without entering
    # (no signal exit); the control without it loses the kick, and the guest spins on.
    [guest] = machine(irqchip="none")
    vcpu = guest.vcpu
    guest.send(Command.SPIN, 2**32 - 1)
    install_kick_handler()
    go, exits = threading.Event(), []
    runner = threading.Thread(target=lambda: (go.wait(5), exits.append(vcpu.run())))
    with vcpu.stats.delta("signal_exits") as delta:
        runner.start()
        if immediate_exit:
            vcpu.kvm_run.immediate_exit = 1
        signal.pthread_kill(runner.ident, KICK_SIGNAL)     # the thread is still waiting for go
        go.set()
        runner.join(0.5)
        lost = runner.is_alive()
        if lost:
            vcpu.kick()
            runner.join(5)
    assert not runner.is_alive() and type(exits[0]).__name__ == "IntrExit"
    assert lost == (not immediate_exit)
    assert delta["signal_exits"] == (0 if immediate_exit else 1)    # the control's exit is pykvm's kick


def test_userspace_kick_then_interrupt(machine):
    # The userspace path: kick the vCPU out of KVM_RUN (EINTR), KVM_INTERRUPT at that exit
    # (it reports ready: IF=1, no shadow), re-enter. The guest spins with no exits of its own.
    [guest] = machine(irqchip="none")
    controller = UserspaceIrqController(guest.vcpu)
    guest.command(Command.STI)
    spinner = command_in_thread(guest, Command.SPIN, 2**32 - 1)
    time.sleep(0.05)
    controller.raise_irq(VECTOR)
    deadline = time.monotonic() + 5
    while guest.log_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    spinner.cancel()
    [record] = guest.log()
    assert record.vector == VECTOR and record.interrupts_were_enabled
    spin = guest.address("spin_loop")
    assert spin <= record.rip <= spin + 4                 # taken in the middle of the loop
    [injection] = controller.injections
    assert injection.after_exit == ExitReason.INTR


def test_real_mode_8259_through_irq_line(machine):
    [guest] = machine(mode="real")
    guest.pic_init(master_base=0x20, slave_base=0x28)
    vm = guest.vcpu.vm
    guest.command(Command.STI)
    for gsi in (1, 12):
        vm.irq_line(gsi, 1)
        vm.irq_line(gsi, 0)
        guest.command(Command.NOP)
    assert vectors(guest) == [0x21, 0x2C]
    master, slave = pic.read(vm, IrqchipId.PIC_MASTER), pic.read(vm, IrqchipId.PIC_SLAVE)
    assert master.irq_base == 0x20 and slave.irq_base == 0x28
    assert master.isr == frozenset() and slave.isr == frozenset()   # EOId


def test_pic_routing_entry_refused_in_split_mode(machine):
    [guest] = machine(irqchip="split")
    with pytest.raises(Exception, match="irqchip route needs the in-kernel PIC/IOAPIC"):
        guest.vcpu.vm.set_gsi_routing([IrqchipRoute(3, IrqchipId.IOAPIC, 3)])


def test_split_irqchip_takes_msis_and_userspace_pic_interrupts(machine):
    # Split: the LAPIC is in the kernel (MSIs reach it), the PIC/IOAPIC are userspace's, whose
    # interrupts come in with KVM_INTERRUPT when the last exit reported ready.
    [guest] = machine(irqchip="split")
    guest.apic_enable()
    vm = guest.vcpu.vm
    guest.command(Command.STI)
    vm.signal_msi(destination=0, vector=0x45)
    guest.command(Command.NOP)
    assert guest.vcpu.kvm_run.ready_for_interrupt_injection
    guest.vcpu.interrupt(0x46)
    guest.command(Command.NOP)
    assert [(r.vector, r.cpu, r.rip) for r in guest.log()] == [(0x45, 0, guest.address("sync_done")),
                                                               (0x46, 0, guest.address("sync_done"))]
    with pytest.raises(Exception, match="can only be routed to an MSI"):
        vm.irq_line(16, 1)
    vm.set_gsi_routing(vm.routes + (MsiRoute(16, MsiMessage.compose(destination=0, vector=0x47)),))
    vm.irq_line(16, 1)
    vm.irq_line(16, 0)
    guest.command(Command.NOP)
    assert guest.log()[-1].vector == 0x47


def test_pit_ticks_through_the_8259_at_the_programmed_period(kvm):
    # KVM_CREATE_PIT2 + KVM_SET_PIT2: channel 0 in mode 2 drives IRQ0 of the master 8259,
    # which the real-mode guest set to vector 0x20. Each tick wakes the guest from `sti; hlt`.
    vm = kvm.create_vm(irqchip="kernel", pit=True)
    with vm:
        [guest] = guests.boot_cpus(vm, "real", 1)
        assert pit.channels(vm)[0].mode == 0xFF                 # never programmed
        guest.pic_init(master_base=0x20, slave_base=0x28)
        count = 11932                                          # 10 ms at 1.193182 MHz
        started = time.monotonic()
        pit.program(vm, count)
        channel = pit.channels(vm)[0]
        assert (channel.count, channel.mode) == (count, 2)
        for _ in range(5):
            guest.command(Command.STI_HLT)
            guest.command(Command.CLI)
        loop = time.monotonic() - started                      # from the programming on
        # Each `sti; hlt` wakes on one tick. KVM's PIT re-injects ticks the guest was late to
        # take (seen under QEMU TCG), and such a tick may also arrive at the sync point between
        # STI_HLT and CLI, where IF is still set; never anywhere else.
        log = guest.log()
        assert {r.vector for r in log} == {0x20}
        woken = [r for r in log if r.rip == guest.address("sti_hlt_end")]
        assert len(woken) == 5
        assert {r.rip for r in log} <= {guest.address("sti_hlt_end"), guest.address("sync_done")}, log
        # The guest waits for a tick only after the host's two commands: each wake-up comes on the
        # first tick after both, so the mean gap is about the period or the host's time per round,
        # whichever is longer (a kvm_amd run under a loaded QEMU TCG took 40 ms a round for this
        # 10 ms PIT). And over the loop the guest took no more ticks than the PIT made.
        period = pit.period(channel)
        mean_gap = (woken[-1].tsc - woken[0].tsc) / (len(woken) - 1) / (guest.vcpu.tsc_khz * 1000)
        assert 0.5 * period < mean_gap < 3 * max(period, loop / 5), (mean_gap, loop)     # 5 rounds
        assert len(log) <= loop / period + 2, (len(log), loop)
        assert pic.read(vm).isr == frozenset()  # the handler EOId


@pytest.mark.requires_cap(Cap.REINJECT_CONTROL)
@pytest.mark.parametrize("reinject", [True, False], ids=["reinject", "discard"])
def test_pit_reinjects_late_ticks_back_to_back_or_drops_them(kvm, reinject):
    # KVM_REINJECT_CONTROL. The guest keeps IF=0 while twenty 50 ms ticks come, then runs with IF=1
    # until it has taken ten. Re-injected (KVM's default), the missed ticks come back to back, each
    # once the guest acked the one before and KVM's PIT worker ran: ten in well under eight periods,
    # however loaded the host (a fixed short spin took too few in CI's suite). Discarded (QEMU's
    # lost_tick_policy=discard): the one left pending, then one a period, so ten take nine periods.
    with kvm.create_vm(irqchip="kernel", pit=True) as vm:
        [guest] = guests.boot_cpus(vm, "real", 1)
        guest.pic_init(master_base=0x20, slave_base=0x28)
        if not reinject:
            vm.reinject_control(pit_reinject=False)
        guest.command(Command.CLI)
        pit.program(vm, 59659)                                  # 50 ms at 1.193182 MHz
        period = pit.period(pit.channels(vm)[0])
        time.sleep(20 * period)
        started = time.monotonic()
        guest.command(Command.STI)
        while len(guest.log()) < 10 and time.monotonic() - started < 15 * period:
            guest.command(Command.NOP)
        periods = (time.monotonic() - started) / period
        guest.command(Command.CLI)
        assert len(guest.log()) >= 10 or not reinject, guest.log()
        assert (periods < 8) == reinject, (periods, len(guest.log()))


@pytest.mark.parametrize("x2apic", [False, True], ids=["xapic", "x2apic"])
def test_self_ipi(machine, host, x2apic):
    [guest] = machine()
    guest.apic_enable(x2apic=x2apic)
    guest.command(Command.CLI)
    guest.send_ipi(0x66, shorthand=DestinationShorthand.SELF)
    assert 0x66 in lapic.read(guest.vcpu).irr                   # pending on itself while IF=0
    guest.command(Command.STI)
    guest.command(Command.NOP)
    logged = [(r.vector, r.cpu) for r in guest.log()]
    # kvm_amd under QEMU TCG took the one IPI twice in one CI run of many. KVM re-injects an
    # event the CPU reports as not delivered at a VM exit (pykvm.interrupt_path once traced a
    # second kvm_inj_virq with reinjected=1 there), and pykvm.hosts.delivery_latency counts such duplicates
    # under TCG too. Everywhere else: exactly once.
    assert logged == [(0x66, 0)] or (host.vendor == VendorModule.AMD and logged == [(0x66, 0)] * 2), logged


def test_ioeventfd_takes_a_guest_write_without_an_exit(machine):
    # With no in-kernel IOAPIC its MMIO page is nobody's: a guest write there would exit to
    # userspace. An ioeventfd on the index register swallows that write inside KVM; the
    # write to the data register that follows still exits, and proves the first one did not.
    from pykvm.core.constants import IOAPIC_DEFAULT_BASE as IOAPIC_BASE
    from pykvm.core.exits import MmioExit
    [guest] = machine(irqchip="none")
    vm = guest.vcpu.vm
    with vm.ioeventfd(IOAPIC_BASE, 4) as doorbell:
        guest.send(Command.IOAPIC_WRITE, 0x1234, 0x10)
        exit = guest.vcpu.run()
        assert isinstance(exit, MmioExit) and exit.is_write
        assert exit.phys_addr == IOAPIC_BASE + 0x10 and int.from_bytes(exit.data, "little") == 0x1234
        assert doorbell.wait(timeout=1.0) == 1               # the index write, signalled in KVM
        guest.run_until(StopKind.SYNC)
