"""The command watchdog: one thread keeps every deadline, and a callback that raises cannot stop it."""

from __future__ import annotations

import time

import pytest

from pykvm.core.errors import ClosedError, CommandTimeout
from pykvm.guests import Command
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
    from pykvm import guests
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
