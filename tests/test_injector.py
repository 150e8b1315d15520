"""The injection layer (``pykvm.injection.Injector``): each refusal beside its control, in what KVM and the
guest report.

The core's ``vcpu.interrupt()`` is the bare ``KVM_INTERRUPT``; the controls show
what KVM does with it where the injector refuses (queues a vector while IF=0,
silently replaces a queued one), so each refusal is shown to prevent something
real. The exception sequence's refusals (an exception already pending, an error
code in real mode, none in protected mode, a #DB payload without the
capability) and their successful controls are in ``tests/test_exceptions.py``.
"""

import re
import textwrap

import pytest

from pykvm import NotReadyForInjection, guests
from pykvm.guests import Command
from pykvm.injection import Injector
from pykvm.irqchip import UserspaceIrqController

pytestmark = pytest.mark.injection


def test_the_docstring_example_runs(kvm_available):
    (example,) = re.findall(r"::\n\n((?: {8}.*\n|\n)+)", Injector.__doc__ or "")
    exec(compile(textwrap.dedent(example), "Injector.__doc__", "exec"), {})


@pytest.mark.parametrize("mode", ["real", "long"])
def test_not_ready_is_refused_where_the_bare_ioctl_queues(boot, mode):
    guest = boot(mode)
    vcpu = guest.vcpu
    injector = Injector(vcpu)
    stop = guest.command(Command.CLI)
    assert (stop.if_flag, stop.ready_for_interrupt_injection) == (0, 0)
    assert not injector.can_interrupt
    with pytest.raises(NotReadyForInjection, match=r"ready_for_interrupt_injection=0, if_flag=0") as refused:
        injector.interrupt(0x40)
    assert "request_interrupt_window" in str(refused.value)               # ... and the fix
    assert vcpu.events.interrupt.injected == 0                           # KVM holds nothing
    # The control: the bare KVM_INTERRUPT in the same state, which KVM takes.
    vcpu.interrupt(0x40)
    assert (vcpu.events.interrupt.injected, vcpu.events.interrupt.nr) == (1, 0x40)


@pytest.mark.parametrize("mode", ["real", "long"])
def test_ready_is_injected_and_taken_with_interrupts_enabled(boot, mode):
    guest = boot(mode)
    injector = Injector(guest.vcpu)
    guest.command(Command.STI)
    assert injector.can_interrupt and injector.interrupt_refusal() is None
    injector.interrupt(0x40)
    guest.command(Command.NOP)
    (record,) = guest.log()
    assert record.vector == 0x40 and record.interrupts_were_enabled
    assert record.rip == guest.address("sync_done")


def test_a_second_interrupt_before_the_run_is_refused_not_replaced(boot):
    guest = boot("long")
    injector = Injector(guest.vcpu)
    guest.command(Command.STI)
    injector.interrupt(0x40)
    assert not injector.can_interrupt
    with pytest.raises(NotReadyForInjection, match="0x40 is already queued.*replace it with 0x41"):
        injector.interrupt(0x41)
    assert guest.vcpu.events.interrupt.nr == 0x40                        # KVM still holds the first
    guest.command(Command.NOP)
    injector.interrupt(0x41)                                             # after the run: accepted
    guest.command(Command.NOP)
    assert [record.vector for record in guest.log()] == [0x40, 0x41]


def test_control_the_bare_ioctl_twice_loses_the_first_vector(boot):
    guest = boot("long")
    guest.command(Command.STI)
    guest.vcpu.interrupt(0x40)
    guest.vcpu.interrupt(0x41)                   # KVM replaces the queued vector, without an error
    guest.command(Command.NOP)
    assert [record.vector for record in guest.log()] == [0x41]


@pytest.mark.parametrize("shared", [True, False], ids=["one-injector", "control-two-injectors"])
def test_the_controller_sees_what_the_injector_it_was_given_queued(boot, shared):
    guest = boot("long")
    vcpu = guest.vcpu
    injector = Injector(vcpu)
    controller = UserspaceIrqController(vcpu, injector=injector if shared else None)
    assert (controller.injector is injector) == shared
    guest.command(Command.STI)
    injector.interrupt(0x40)
    controller.queue(0x50)                       # its before_entry runs before the next KVM_RUN
    guest.command(Command.NOP)
    guest.command(Command.NOP)
    vectors = [record.vector for record in guest.log()]
    # One injector: the controller waits for the run that delivers 0x40. Two: it replaces 0x40.
    assert vectors == ([0x40, 0x50] if shared else [0x50])
    assert [injection.vector for injection in controller.injections] == [0x50]


def test_an_injector_per_vcpu_of_one_vm(kvm):
    with kvm.create_vm() as vm:
        first, second = guests.boot_cpus(vm, "long", cpus=2)
        injectors = [Injector(first.vcpu), Injector(second.vcpu)]
        for guest in (first, second):
            guest.command(Command.STI)
        injectors[0].interrupt(0x40)
        injectors[1].interrupt(0x41)             # another vCPU: nothing queued there
        first.command(Command.NOP)
        second.command(Command.NOP)
        assert [(r.vector, r.cpu) for r in first.log()] == [(0x40, 0)]
        assert [(r.vector, r.cpu) for r in second.log()] == [(0x41, 1)]
