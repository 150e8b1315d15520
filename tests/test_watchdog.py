"""The command watchdog: one thread keeps every deadline, a callback that raises cannot stop it, and a timeout
says what the halted vCPU was waiting for."""

from __future__ import annotations

import threading
import time

import pytest

from pykvm import guests
from pykvm.core.constants import MpState
from pykvm.core.errors import ClosedError, CommandTimeout
from pykvm.guests import Command
from pykvm.irqchip import lapic, waiting
from pykvm.irqchip.lapic import ApicReg
from pykvm.runtime.watchdog import Watchdog


def test_a_raising_callback_is_reported_and_later_deadlines_still_fire():
    watchdog, fired = Watchdog(), []

    def broken() -> None:
        raise ClosedError("Vcpu 0 is closed; there is nothing to kick")
    with pytest.warns(RuntimeWarning, match="deadline callback raised ClosedError"):
        with watchdog.guard(0.02, broken):
            time.sleep(0.2)
    with watchdog.guard(0.02, lambda: fired.append("after")):     # the same (only) thread goes on
        time.sleep(0.2)
    assert fired == ["after"]
    assert [type(exc) for exc in watchdog.failures] == [ClosedError]


def test_control_a_guard_left_in_time_never_fires():
    watchdog, fired = Watchdog(), []
    with watchdog.guard(5, lambda: fired.append("late")):
        pass
    time.sleep(0.05)
    assert fired == [] and list(watchdog.failures) == []


def test_command_timeouts_still_work_after_a_callback_raised(kvm):
    # The reproducer: a deadline whose kick() met a closed vCPU killed the shared watchdog thread,
    # and every later CommandTimeout silently never fired.
    from pykvm.runtime.watchdog import WATCHDOG

    def broken() -> None:
        raise ClosedError("Vcpu 0 is closed; there is nothing to kick")
    with pytest.warns(RuntimeWarning):
        with WATCHDOG.guard(0.01, broken):
            time.sleep(0.1)
    with kvm.create_vm(irqchip="kernel") as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            guest.command(Command.HLT, timeout=0.3)      # cli; hlt: only the deadline ends it
        assert time.monotonic() - start < 5


def test_a_timeout_says_the_awaited_interrupt_had_not_come(kvm):
    # cli; hlt and nothing sent: the vCPU is halted with nothing pending.
    with kvm.create_vm(irqchip="kernel") as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        guest.apic_enable()
        with pytest.raises(CommandTimeout, match=r"At the deadline: mp_state HALTED, IF=0; LAPIC .*irr=\[\]"
                                                 r".*Nothing deliverable was pending in the LAPIC: the awaited "
                                                 r"interrupt had not come"):
            guest.command(Command.HLT, timeout=0.3)


def test_a_timeout_names_the_vector_a_deaf_guest_left_pending(kvm):
    # The same halt with an MSI sent meanwhile: the vector waits in the IRR, and IF=0 is why.
    with kvm.create_vm(irqchip="kernel") as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        guest.apic_enable()
        threading.Timer(0.1, lambda: vm.signal_msi(destination=0, vector=0x41)).start()
        with pytest.raises(CommandTimeout, match=r"irr=\[0x41\].*Vector 0x41 was pending but the guest halted "
                                                 r"with IF=0"):
            guest.command(Command.HLT, timeout=0.5)
        assert waiting.read(guest.vcpu).irr == {0x41}


@pytest.mark.parametrize("mp_state, interrupts_enabled, injected, irr, ppr, lost", [
    (MpState.HALTED, True, None, {0x41}, 0x00, True),       # deliverable, IF=1, still halted: lost
    (MpState.HALTED, True, 0x41, set(), 0x00, True),        # queued for injection, still halted: lost
    (MpState.HALTED, True, None, {0x41}, 0x40, False),      # the PPR's class blocks 0x41: rightly asleep
    (MpState.HALTED, False, None, {0x41}, 0x00, False),     # IF=0: rightly asleep
    (MpState.HALTED, True, None, set(), 0x00, False),       # nothing came
    (MpState.RUNNABLE, True, None, {0x41}, 0x00, False),    # not halted at all
])
def test_a_lost_wakeup_is_a_halted_vcpu_with_a_deliverable_vector_and_if_set(
        mp_state, interrupts_enabled, injected, irr, ppr, lost):
    state = waiting.WaitState(mp_state, interrupts_enabled, injected, frozenset(irr), ppr, "LAPIC")
    assert state.lost_wakeup is lost
    assert ("lost wake-up" in state.describe()) is lost
    assert "lost wake-up" not in state.registers()


def _interrupt_without_a_wakeup(monkeypatch, vector: int) -> None:
    """Make the vector pending (KVM_SET_LAPIC, the vCPU outside KVM_RUN) just as the deadline reads the wait:
    an interrupt that came while nothing woke the halted vCPU, the defect the grace run exists for."""
    read = waiting.read

    def arrived_unnoticed(vcpu):
        chip = lapic.read(vcpu)
        word = ApicReg.IRR + 0x10 * (vector // 32)
        vcpu.set_lapic(chip.with_register(word, lapic.read_register(chip.raw, word) | 1 << vector % 32))
        return read(vcpu)
    monkeypatch.setattr(waiting, "read", arrived_unnoticed)


def test_a_halted_vcpu_whose_interrupt_came_unnoticed_goes_on_with_a_lost_wakeup_warning(kvm, monkeypatch):
    with kvm.create_vm(irqchip="kernel") as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        guest.apic_enable()
        _interrupt_without_a_wakeup(monkeypatch, 0x41)
        with pytest.warns(waiting.LostWakeup, match=r"Command.WAIT_LOG on vCPU 0: the vCPU stayed halted for "
                                                    r"0.3 s, then went on .*a lost wake-up.*mp_state HALTED, "
                                                    r"IF=1; LAPIC .*irr=\[0x41\]"):
            guest.command(Command.WAIT_LOG, 1, timeout=0.3)
        assert [record.vector for record in guest.log()] == [0x41]        # the guest took it, once re-entered


def test_a_halted_vcpu_with_nothing_pending_still_times_out_without_a_warning(kvm, recwarn):
    # The control: the same wait, no interrupt: the grace run ends in CommandTimeout, and nothing is excused.
    with kvm.create_vm(irqchip="kernel") as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        guest.apic_enable()
        with pytest.raises(CommandTimeout, match=r"Command.WAIT_LOG did not reach a sync point within 0.3 s, nor "
                                                 r"in 0.3 s more .*mp_state HALTED, IF=1"):
            guest.command(Command.WAIT_LOG, 1, timeout=0.3)
        assert guest.log() == []
    assert not [w for w in recwarn if issubclass(w.category, waiting.LostWakeup)]


@pytest.mark.host_independent
def test_a_guard_left_while_its_callback_runs_waits_for_it_and_says_it_fired():
    # Issue 22: the watchdog took the deadline out, then ran the callback outside its lock; a block that
    # ended meanwhile returned while the callback was still to come, and the callback's effect came after.
    watchdog, events = Watchdog(), []
    started = threading.Event()

    def slow_expire() -> None:
        started.set()
        time.sleep(0.2)
        events.append("expired")
    guard = watchdog.guard(0.01, slow_expire)
    with guard:
        assert started.wait(5)              # the deadline passed and its callback is running
    events.append("left")
    assert events == ["expired", "left"]
    assert guard.fired


@pytest.mark.host_independent
def test_the_control_a_guard_left_in_time_did_not_fire():
    watchdog = Watchdog()
    guard = watchdog.guard(5, lambda: None)
    with guard:
        pass
    assert not guard.fired


def test_a_command_finishing_at_its_deadline_leaves_no_cancel_for_the_next(kvm, monkeypatch):
    # The same race through a guest session: the command reaches its sync point just as the deadline's
    # cancel() runs. The next command must not see that cancel (it raised GuestCancelled).
    with kvm.create_vm() as vm:
        [guest] = guests.boot_cpus(vm, "long", 1)
        cancel, run_until = guest.cancel, guest.run_until
        cancelling = threading.Event()

        def late_cancel() -> None:          # the watchdog's expire, slowed down after the deadline passed
            cancelling.set()
            time.sleep(0.1)
            cancel()

        def reaches_sync_at_the_deadline(*kinds, **options):
            stop = run_until(*kinds, **options)
            assert cancelling.wait(5)
            return stop
        monkeypatch.setattr(guest, "cancel", late_cancel)
        monkeypatch.setattr(guest, "run_until", reaches_sync_at_the_deadline)
        guest.command(Command.NOP, timeout=0.05)
        monkeypatch.undo()
        time.sleep(0.2)                     # the unfixed watchdog's cancel lands here
        guest.command(Command.NOP, timeout=5)
        assert guest.cancelled is False
