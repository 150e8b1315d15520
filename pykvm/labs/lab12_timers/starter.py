"""Lab 12: Timers. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder."""

from pykvm.guests import Command  # noqa: F401
from pykvm.irqchip import pit as pit8254  # noqa: F401
from pykvm.irqchip.lapic import ApicReg, TimerMode  # noqa: F401


def periodic(task) -> None:
    """Make task.guest's LAPIC timer raise task.vector every task.period_ns, using divide task.divide."""
    print("periodic:", task)
    # TODO: task.guest.apic_write() the divide configuration (its encoding: sheet.md), the LVT timer
    #       entry (vector, mode, not masked) and last the initial count (KVM counts at 1 GHz).
    raise NotImplementedError("TODO in periodic() (sheet.md, step 1)")


def one_shot(task) -> None:
    """Make the LAPIC timer raise task.vector once, task.period_ns from now, using divide task.divide."""
    print("one_shot:", task)
    # TODO: as periodic(), in the other mode.
    raise NotImplementedError("TODO in one_shot() (sheet.md, step 2)")


def tsc_deadline(task) -> None:
    """Make the LAPIC timer raise task.vector when the guest TSC passes rdtsc + task.delay_tsc."""
    print("tsc_deadline:", task)
    # TODO: the LVT timer entry in TSC-deadline mode, then Command.TSC_DEADLINE with the delay.
    raise NotImplementedError("TODO in tsc_deadline() (sheet.md, step 3)")


def pit(task) -> None:
    """Make the PIT's channel 0 tick every task.pit_count / 1.193182 MHz as vector task.vector."""
    print("pit:", task)
    # TODO: task.guest.pic_init(...) so that IRQ0 becomes task.vector (and stays unmasked), then
    #       pit8254.program(task.vm, ...).
    raise NotImplementedError("TODO in pit() (sheet.md, step 4)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(12, __file__)
