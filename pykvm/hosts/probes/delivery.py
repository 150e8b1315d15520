"""Probes of event delivery through the IVT / IDT in each CPU mode: triple_fault, delivery_<mode>,
int_n_<mode>, int3_<mode>, real_mode_ud2.

Why this exists: an injected vector, `int $n` and `int3` must reach their
handler and return from it in real, protected and long mode. A host that runs
some modes in KVM's instruction emulator (kvm_pvm) cannot execute every
instruction there, and shows it as a KVM_EXIT_INTERNAL_ERROR: the probe
reports whether the vector was delivered before that, with the exit as evidence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ...core.errors import GuestError
from ...core.exits import ShutdownExit
from ...guests import Command, GuestSession
from ...injection import Injector
from .base import Expectation, Observation, ProbeOutcome, measured, scenario
from .harness import PROBE_VECTOR, SOFTWARE_VECTOR, boot, internal_error


class TripleFault(ProbeOutcome):
    SHUTDOWN = "KVM_EXIT_SHUTDOWN"
    OTHER_EXIT = "other exit"


TRIPLE_FAULT = Expectation(
    "triple_fault", "triple fault (IDT limit 0, then #DE)", TripleFault.SHUTDOWN,
    "api.rst KVM_EXIT_SHUTDOWN; Intel SDM Vol. 3A 'Interrupt 8 - Double Fault Exception'",
    measured(TripleFault.SHUTDOWN, TripleFault.SHUTDOWN, TripleFault.SHUTDOWN))


@scenario(TRIPLE_FAULT)
def triple_fault(kvm) -> Observation:
    """An IDT limit of 0, then #DE: #DE -> #GP -> #DF -> shutdown."""
    vm, guest = boot(kvm)
    with vm:
        vcpu = guest.vcpu
        guest.command(Command.NOP)
        sregs = vcpu.sregs
        sregs.idt.limit = 0
        vcpu.sregs = sregs
        guest.send(Command.RAISE, 0)
        try:
            exit = guest.run().exit
        except GuestError as exc:
            return Observation(TripleFault.OTHER_EXIT, str(exc))
        return Observation(TripleFault.SHUTDOWN if isinstance(exit, ShutdownExit) else TripleFault.OTHER_EXIT,
                           repr(exit))


class Delivery(ProbeOutcome):
    RETURNED = "delivered and returned"
    RETURN_FAILS = "delivered, return fails"
    NOT_DELIVERED_EMULATION_ERROR = "not delivered (emulation error)"
    NOT_DELIVERED = "not delivered"


_TITLES = {"real": "real mode (IVT, IRET)", "protected": "32-bit protected mode (IDT, IRET)",
           "long": "long mode (IDT, IRETQ)"}


def _deliver(kvm, mode: str, trigger: Callable[[GuestSession], object]) -> Observation:
    """Boot ``mode``, run ``trigger``: was a vector logged, and did the guest get back to its sync point?"""
    vm, guest = boot(kvm, mode)
    with vm:
        try:
            trigger(guest)
        except GuestError as exc:
            if internal_error(exc) is None:
                raise
            return Observation(Delivery.RETURN_FAILS if guest.log() else Delivery.NOT_DELIVERED_EMULATION_ERROR,
                               str(exc).split(";")[0])
        log = guest.log()
        return Observation(Delivery.RETURNED if log else Delivery.NOT_DELIVERED,
                           f"{log[0]!r}" if log else "nothing logged")


def _inject(guest: GuestSession) -> None:
    guest.command(Command.STI)
    Injector(guest.vcpu).interrupt(PROBE_VECTOR)
    guest.command(Command.NOP)


def _int_n(guest: GuestSession) -> None:
    guest.command(Command.INT, SOFTWARE_VECTOR)


def _int3(guest: GuestSession) -> None:
    guest.command(Command.RAISE, 3)


def _mode(mode: str, pvm_delivery: Delivery, pvm_software: Delivery, pvm_note: str = "") -> None:
    """The rows of ``mode`` (an injected vector, INT n, INT3), each registered with its scenario."""
    title = _TITLES[mode]
    failing: dict[ProbeOutcome, str] = {
        Delivery.NOT_DELIVERED_EMULATION_ERROR: f"the host's instruction emulator cannot run the "
                                                f"software interrupt in {mode} mode",
        Delivery.RETURN_FAILS: f"the handler runs, but the host cannot emulate its IRET in {mode} mode"}
    software_source = "Intel SDM Vol. 2A 'INT n/INTO/INT3/INT1'"
    rows = [
        (Expectation(f"delivery_{mode}", f"injected vector, {title}", Delivery.RETURNED,
                     "Intel SDM Vol. 3A ch. 6 (IDT) and Vol. 3B 'Real-Address Mode Operation' (IVT); "
                     "api.rst KVM_INTERRUPT",
                     measured(pvm_delivery, Delivery.RETURNED, Delivery.RETURNED, pvm_note=pvm_note), failing,
                     "protected_mode_iret" if mode == "protected" else None), _inject),
        (Expectation(f"int_n_{mode}", f"INT n, {title}", Delivery.RETURNED, software_source,
                     measured(pvm_software, Delivery.RETURNED, Delivery.RETURNED, pvm_note=pvm_note), failing,
                     "software_interrupts" if mode == "long" else None), _int_n),
        (Expectation(f"int3_{mode}", f"INT3, {title}", Delivery.RETURNED, software_source,
                     measured(pvm_software, Delivery.RETURNED, Delivery.RETURNED, pvm_note=pvm_note),
                     failing), _int3),
    ]
    for row, trigger in rows:
        scenario(row)(functools.partial(_deliver, mode=mode, trigger=trigger))


_mode("real", Delivery.RETURNED, Delivery.RETURNED)


class Ud2(ProbeOutcome):
    DELIVERED = "#UD delivered"
    EMULATION_ERROR = "emulation error"
    NOT_DELIVERED = "not delivered"


REAL_MODE_UD2 = Expectation(
    "real_mode_ud2", "UD2 in real mode", Ud2.DELIVERED, "Intel SDM Vol. 2B 'UD'",
    measured(Ud2.EMULATION_ERROR, Ud2.DELIVERED, Ud2.DELIVERED),
    {Ud2.EMULATION_ERROR: "KVM's instruction emulator, which runs real mode on this host, "
                          "does not decode UD2"},
    "real_mode_ud2")


@scenario(REAL_MODE_UD2)
def real_mode_ud2(kvm) -> Observation:
    """`ud2` in real mode: is #UD (vector 6) delivered through the IVT?"""
    vm, guest = boot(kvm, "real")
    with vm:
        try:
            guest.command(Command.RAISE, 6)
        except GuestError as exc:
            if internal_error(exc) is None:
                raise
            return Observation(Ud2.EMULATION_ERROR, str(exc).split(";")[0])
        log = guest.log()
        return Observation(Ud2.DELIVERED if [r.vector for r in log] == [6] else Ud2.NOT_DELIVERED, repr(log))


_mode("protected", Delivery.RETURN_FAILS, Delivery.NOT_DELIVERED_EMULATION_ERROR,
      "PVM runs protected mode in KVM's emulator")
_mode("long", Delivery.RETURNED, Delivery.NOT_DELIVERED_EMULATION_ERROR)
