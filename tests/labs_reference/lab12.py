"""Lab 12 reference solution."""

from pykvm.guests import Command
from pykvm.irqchip import pit as pit8254
from pykvm.irqchip.lapic import ApicReg, TimerMode

# TIMER_DIVIDE encodes the divisor in bits 0, 1 and 3 (Intel SDM, "Divide Configuration Register").
DIVIDE_ENCODING = {1: 0b1011, 2: 0b0000, 4: 0b0001, 8: 0b0010, 16: 0b0011, 32: 0b1000, 64: 0b1001, 128: 0b1010}


def start_lapic_timer(task, mode: TimerMode) -> None:
    guest = task.guest
    guest.apic_write(ApicReg.TIMER_DIVIDE, DIVIDE_ENCODING[task.divide])
    guest.apic_write(ApicReg.LVT_TIMER, task.vector | int(mode) << 17)
    guest.apic_write(ApicReg.TIMER_INITIAL, task.period_ns // task.divide)


def periodic(task) -> None:
    start_lapic_timer(task, TimerMode.PERIODIC)


def one_shot(task) -> None:
    start_lapic_timer(task, TimerMode.ONE_SHOT)


def tsc_deadline(task) -> None:
    task.guest.apic_write(ApicReg.LVT_TIMER, task.vector | int(TimerMode.TSC_DEADLINE) << 17)
    task.guest.command(Command.TSC_DEADLINE, task.delay_tsc)


def pit(task) -> None:
    task.guest.pic_init(master_base=task.vector, slave_base=task.vector + 8, masks=0xFFFE)
    pit8254.program(task.vm, task.pit_count)
