"""Lab 12, Timers: the in-kernel LAPIC timer (periodic, one-shot, TSC-deadline) and the PIT through the 8259.

Why this exists: a guest's clock interrupts come from timers KVM emulates in
the kernel; the student programs each one from inside the guest (or the PIT
from the host) and the checker reads the guest's TSC-stamped vector log and
KVM's view of the timer registers (``KVM_GET_LAPIC``, the TSC-deadline MSR,
``KVM_GET_PIT2``), never what the student's functions return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator

from ...core.constants import Cap, IrqchipId
from ...core.errors import CommandTimeout
from ...core.system import Kvm
from ...core.vm import Vm
from ...guests import Command, GuestSession, LogRecord, boot_cpus
from ...hosts import explain_exit
from ...irqchip import lapic, pic, pit
from ...irqchip.lapic import ApicReg, TimerMode
from ...x86.msr import TSC_DEADLINE_MSR, TSC_MSR
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..verdict import Verdict, delivered

DIVIDES = (1, 2, 4, 8)       # written raw instead of encoded, each gives 4x the period (2x shorter for 4)
# Periods in units of 128 us (so that every divide gives a whole count). They are long because the
# guest must take each tick before the next: under QEMU TCG one delivery to a halted guest took up to
# 8 ms (gaps 0.6, 20.2, 9.4, 7.7, 8.3, 2.3 ms for a 2.56 ms periodic timer).
PERIODS = (250, 500)         # periodic: 32-64 ms
ONE_SHOTS = (80, 320)        # one-shot: 10-41 ms
PIT_PERIODS_MS = (20, 51)    # the PIT: 20-50 ms (a count fits 16 bits up to 54.9 ms)
PIT_TICKS = 8
TICKS = 7                    # periodic ticks judged: 6 gaps
WAIT = 10.0                  # seconds the guest may wait for the ticks asked of it
LVT_MASKED = 1 << 16


@dataclasses.dataclass
class TimerTask:
    guest: GuestSession
    vector: int
    period_ns: int = 0           # periodic / one-shot: the interval asked for
    divide: int = 1              # the divide configuration the student must use
    delay_tsc: int = 0           # TSC-deadline: ticks of the guest TSC from "now"
    tsc_khz: int = 0
    pit_count: int = 0           # PIT: the reload value for the period
    vm: Vm | None = None

    def __repr__(self) -> str:
        fields = [f"vector={self.vector:#x}"]
        if self.period_ns:
            fields += [f"period_ns={self.period_ns}", f"divide={self.divide}"]
        if self.delay_tsc:
            fields += [f"delay_tsc={self.delay_tsc}", f"tsc_khz={self.tsc_khz}"]
        if self.pit_count:
            fields += [f"pit_count={self.pit_count}"]
        return f"TimerTask({', '.join(fields)})"


@contextlib.contextmanager
def _lapic_guest() -> Iterator[GuestSession]:
    with Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
        [guest] = boot_cpus(vm, "long", 1, explain=explain_exit)
        guest.apic_enable()
        yield guest


def _guest_tsc(guest: GuestSession) -> int:
    return guest.vcpu.get_msrs([TSC_MSR])[TSC_MSR]


def _wait(guest: GuestSession, count: int) -> bool:
    """Let the guest halt with IF=1 until its log holds ``count`` records; False if WAIT seconds passed.

    After False the session is cancelled (the guest is still waiting): send it nothing more.
    """
    try:
        guest.command(Command.WAIT_LOG, count, timeout=WAIT)
    except CommandTimeout:
        return False
    return True


def _gaps_ns(log: list[LogRecord], tsc_khz: int) -> list[float]:
    return [(b.tsc - a.tsc) * 1e6 / tsc_khz for a, b in zip(log, log[1:], strict=False)]


def _can_fire(state: lapic.LapicState) -> bool:
    """Whether the LAPIC timer as KVM holds it can raise anything: unmasked and started (or TSC-deadline)."""
    timer = state.lvt["timer"]
    return not timer.masked and (state.timer_initial != 0 or timer.timer_mode == TimerMode.TSC_DEADLINE)


def _silence(state: lapic.LapicState, vector: int) -> str:
    """Why no tick came: the guest waited WAIT seconds, or, for a timer that cannot fire, did not wait at all."""
    if _can_fire(state):
        return f"the guest waited {WAIT:g} s with IF=1 and took no interrupt: {_no_ticks(state, vector)}"
    return f"no interrupt can come (the guest was not made to wait for one): {_no_ticks(state, vector)}"


def _mode(state: lapic.LapicState) -> str:
    mode = state.lvt["timer"].timer_mode
    return mode.name if isinstance(mode, TimerMode) else str(mode)


def _no_ticks(state: lapic.LapicState, vector: int) -> str:
    timer = state.lvt["timer"]
    if timer.masked:
        return "the timer's LVT entry is masked (bit 16 set): the timer counts but never interrupts"
    if timer.vector != vector:
        return f"the timer's LVT entry holds vector {timer.vector:#x}, not task.vector={vector:#x}"
    if state.timer_initial == 0 and timer.timer_mode != TimerMode.TSC_DEADLINE:
        return "the initial count is 0: writing TIMER_INITIAL is what starts the timer"
    return f"LVT timer {timer}, initial count {state.timer_initial}"


# -- periodic ------------------------------------------------------------------------

def _periodic(ctx: Context) -> dict:
    rng = ctx.random("periodic")
    ctx.load()
    with _lapic_guest() as guest:
        divide = rng.choice(DIVIDES)
        task = TimerTask(guest, rng.randrange(0x40, 0xF0), period_ns=rng.randrange(*PERIODS) * 128_000, divide=divide)
        ctx.call("periodic", task)
        ticked = _can_fire(lapic.read(guest.vcpu)) and _wait(guest, TICKS)
        state = lapic.read(guest.vcpu)
        if ticked:
            guest.apic_write(ApicReg.LVT_TIMER, LVT_MASKED)      # stop it before the log is read
        return {"task": task, "log": guest.log()[:TICKS], "lapic": state, "tsc_khz": guest.vcpu.tsc_khz}


def check_periodic_vector(ctx: Context) -> str:
    run = ctx.once("periodic", _periodic)
    task, log = run["task"], run["log"]
    if not log:
        raise Fail(_silence(run["lapic"], task.vector))
    wrong = sorted({r.vector for r in log if r.vector != task.vector})
    if wrong:
        raise Fail(f"the guest took {[hex(v) for v in wrong]}; the timer was to raise task.vector={task.vector:#x}")
    if len(log) < TICKS:
        raise Fail(f"only {len(log)} tick(s) in {WAIT:g} s: a periodic timer keeps firing "
                   f"(LVT mode {_mode(run['lapic'])})")
    return f"{len(log)} ticks of vector {task.vector:#x}"


def check_periodic_period(ctx: Context) -> str:
    run = ctx.once("periodic", _periodic)
    task, log, state = run["task"], run["log"], run["lapic"]
    if len(log) < TICKS:
        raise Fail("not enough ticks to measure (step 1)")
    gaps = _gaps_ns(log, run["tsc_khz"])
    median, period = statistics.median(gaps), task.period_ns
    programmed = state.timer_initial * state.timer_divide
    shown = ", ".join(f"{g / 1e6:.2f}" for g in gaps)
    if not 0.75 * period < median < 1.5 * period:
        raise Fail(f"the median gap between ticks is {median / 1e6:.3f} ms (gaps {shown} ms), "
                   f"{median / period:.2f} x task.period_ns={period / 1e6:.3f} ms; KVM holds initial count "
                   f"{state.timer_initial} and divide {state.timer_divide}: {programmed / 1e6:.3f} ms per tick")
    if sum(gaps) < 0.6 * (len(gaps)) * period:
        raise Fail(f"{len(gaps)} gaps took {sum(gaps) / 1e6:.3f} ms, less than the period allows")
    if programmed != period or state.timer_divide != task.divide:
        raise Fail(f"the ticks are on time, but KVM holds initial count {state.timer_initial} with divide "
                   f"{state.timer_divide}; the task asked divide {task.divide}")
    return (f"median gap {median / 1e6:.3f} ms for {period / 1e6:.3f} ms asked (gaps {shown} ms); "
            f"KVM: {state.timer_initial} x {state.timer_divide} ns")


# -- one-shot ------------------------------------------------------------------------

def _one_shot(ctx: Context) -> dict:
    rng = ctx.random("one_shot")
    ctx.load()
    with _lapic_guest() as guest:
        task = TimerTask(guest, rng.randrange(0x40, 0xF0), period_ns=rng.randrange(*ONE_SHOTS) * 128_000,
                    divide=rng.choice(DIVIDES))
        before = _guest_tsc(guest)
        ctx.call("one_shot", task)
        armed = lapic.read(guest.vcpu)
        if not (_can_fire(armed) and _wait(guest, 1)):
            return {"task": task, "first": [], "armed": armed}
        first = guest.log()
        guest.command(Command.STI)                 # long enough for a periodic timer to fire again
        time.sleep(4 * task.period_ns / 1e9)
        guest.command(Command.NOP)
        guest.command(Command.CLI)
        after = lapic.read(guest.vcpu)
        guest.apic_write(ApicReg.LVT_TIMER, LVT_MASKED)
        return {"task": task, "before": before, "first": first, "log": guest.log(), "armed": armed,
                "after": after, "tsc_khz": guest.vcpu.tsc_khz}


def check_one_shot(ctx: Context) -> str:
    run = ctx.once("one_shot", _one_shot)
    task, log, armed, after = run["task"], run["log"], run["armed"], run["after"]
    if not run["first"]:
        raise Fail(_silence(armed, task.vector))
    if [r.vector for r in log] != [task.vector]:
        raise Fail(f"the guest took {[hex(r.vector) for r in log]} over {4 * task.period_ns / 1e6:.1f} ms more "
                   f"with IF=1; a one-shot timer raises task.vector={task.vector:#x} once"
                   + (f" (LVT mode {_mode(armed)})" if len(log) > 1 else ""))
    waited = (log[0].tsc - run["before"]) * 1e6 / run["tsc_khz"]
    if waited < 0.9 * task.period_ns:
        raise Fail(f"it fired {waited / 1e6:.3f} ms after your code was called, before the "
                   f"{task.period_ns / 1e6:.3f} ms asked: KVM holds initial count {armed.timer_initial} "
                   f"with divide {armed.timer_divide}")
    if armed.timer_initial * armed.timer_divide != task.period_ns or armed.timer_divide != task.divide:
        raise Fail(f"KVM holds initial count {armed.timer_initial} with divide {armed.timer_divide}: "
                   f"{armed.timer_initial * armed.timer_divide} ns, not {task.period_ns} ns with divide {task.divide}")
    if after.timer_current != 0:
        raise Fail(f"after it fired, the current count is {after.timer_current}, not 0: the timer restarted")
    return (f"one tick {waited / 1e6:.3f} ms after the call ({task.period_ns / 1e6:.3f} ms asked), none in the "
            f"next {4 * task.period_ns / 1e6:.1f} ms; current count 0 afterwards")


# -- TSC deadline ----------------------------------------------------------------------

def _tsc_deadline(ctx: Context) -> dict:
    rng = ctx.random("tsc_deadline")
    ctx.load()
    with _lapic_guest() as guest:
        vcpu = guest.vcpu
        offered = any(leaf.function == 1 and leaf.ecx >> 24 & 1 for leaf in vcpu.cpuid)
        if not offered:
            return {"offered": False}
        tsc_khz = vcpu.tsc_khz
        task = TimerTask(guest, rng.randrange(0x40, 0xF0), delay_tsc=rng.randrange(2000, 8000) * tsc_khz // 1000,
                    tsc_khz=tsc_khz)
        before = _guest_tsc(guest)
        ctx.call("tsc_deadline", task)
        armed = lapic.read(vcpu)
        deadline = vcpu.get_msrs([TSC_DEADLINE_MSR])[TSC_DEADLINE_MSR]
        _wait(guest, 1)                            # the VM is closed next: a timeout needs no clean-up
        after = vcpu.get_msrs([TSC_DEADLINE_MSR])[TSC_DEADLINE_MSR]
        return {"offered": True, "task": task, "before": before, "log": guest.log(), "armed": armed,
                "deadline": deadline, "after": after}


def check_tsc_deadline(ctx: Context) -> str:
    run = ctx.once("tsc_deadline", _tsc_deadline)
    if not run["offered"]:
        return "not offered here (CPUID.1:ECX bit 24 is 0, KVM_CAP_TSC_DEADLINE_TIMER absent): nothing to check"
    task, log, armed = run["task"], run["log"], run["armed"]
    mode = armed.lvt["timer"].timer_mode
    if not log:
        why = _no_ticks(armed, task.vector)
        if mode != TimerMode.TSC_DEADLINE:
            why = f"the LVT timer entry is in {_mode(armed)} mode: in any other mode the deadline MSR is ignored"
        elif run["deadline"] == 0:
            why = "IA32_TSC_DEADLINE read back 0 after your code: no deadline was written"
        raise Fail(f"no interrupt within {WAIT:g} s: {why}")
    if [r.vector for r in log] != [task.vector]:
        raise Fail(f"the guest took {[hex(r.vector) for r in log]}, not task.vector={task.vector:#x} once")
    early = run["before"] + task.delay_tsc - log[0].tsc
    if early > task.tsc_khz // 10:                 # 100 us: KVM may fire a little early and spin
        raise Fail(f"it fired {early * 1000 // task.tsc_khz} us before the guest TSC reached "
                   f"rdtsc + task.delay_tsc: the deadline is an absolute TSC value")
    if run["after"] != 0:
        raise Fail(f"IA32_TSC_DEADLINE still holds {run['after']:#x} after the timer fired")
    late_us = (log[0].tsc - run["before"] - task.delay_tsc) * 1000 // task.tsc_khz
    return (f"fired at TSC {log[0].tsc:#x}, {late_us} us after the earliest possible deadline; "
            f"IA32_TSC_DEADLINE read back {run['deadline']:#x} while armed, 0 after")


# -- the PIT --------------------------------------------------------------------------

def _pit(ctx: Context) -> dict:
    rng = ctx.random("pit")
    ctx.load()
    with Kvm() as kvm, kvm.create_vm(irqchip="kernel", pit=True) as vm:
        [guest] = boot_cpus(vm, "long", 1, explain=explain_exit)
        guest.apic_enable()                   # the 8259 reaches the CPU through LINT0 (ExtINT)
        base = rng.randrange(4, 15) * 8
        task = TimerTask(guest, base, pit_count=round(rng.randrange(*PIT_PERIODS_MS) / 1000 * pit.PIT_HZ), vm=vm)
        tsc_before = guest.vcpu.get_msrs([TSC_MSR])[TSC_MSR]       # the guest's TSC before the PIT is programmed
        ctx.call("pit", task)
        # The image's handlers EOI only the LAPIC: put the 8259 in automatic-EOI mode (ICW4 bit 1)
        # from the host, so that the guest can take tick after tick in `hlt` without an exit.
        master = pic.read(vm)
        vm.set_irqchip(IrqchipId.PIC_MASTER, dataclasses.replace(master, auto_eoi=1).to_bytes())
        _wait(guest, PIT_TICKS)                # the VM is closed next: a timeout needs no clean-up
        return {"task": task, "log": guest.log()[:PIT_TICKS], "channel": pit.channels(vm)[0],
                "pic": master, "tsc_khz": guest.vcpu.tsc_khz, "tsc_before": tsc_before}


def check_pit(ctx: Context) -> str:
    run = ctx.once("pit", _pit)
    task, log, channel, master = run["task"], run["log"], run["channel"], run["pic"]
    wrong = sorted({r.vector for r in log if r.vector != task.vector})
    if wrong:
        raise Fail(f"the guest took {[hex(v) for v in wrong]}; IRQ0 of a master 8259 based at "
                   f"{task.vector:#x} is vector {task.vector:#x} (the 8259 reports base {master.irq_base:#x})")
    if len(log) < PIT_TICKS:
        raise Fail(f"the guest halted with IF=1 for {WAIT:g} s and took {len(log)} of {PIT_TICKS} ticks: PIT "
                   f"channel 0 mode {channel.mode:#x} count {channel.count}; master 8259 base "
                   f"{master.irq_base:#x}, mask {master.imr_bits:#04x} (bit 0 masks IRQ 0)")
    if channel.count != task.pit_count & 0xFFFF or channel.mode not in (2, 3):
        raise Fail(f"KVM's PIT channel 0 holds count {channel.count} in mode {channel.mode}; "
                   f"the task asked count {task.pit_count} in a periodic mode (2 or 3)")
    # KVM's PIT re-injects the ticks the guest missed (its default policy), one after another as
    # each is taken: while the guest is not running (the host busy, or before it waits) ticks
    # queue up and then come back to back. So ticks are never ahead of the period grid counted
    # from before the programming, and they catch up with it: judged that way, not by the gaps
    # between a few ticks, which a loaded host shortened to 7.7 ms for a 31 ms count (measured).
    period = pit.period(channel)
    grid = [(record.tsc - run["tsc_before"]) / (run["tsc_khz"] * 1000) / period for record in log]
    ahead = [k for k, at in enumerate(grid, 1) if at < 0.9 * k]
    if ahead or grid[-1] > 1.5 * len(log):
        raise Fail(f"tick k came at {', '.join(f'{at:.2f}' for at in grid)} periods after the programming "
                   f"(each must be at k or later, the last by {1.5 * len(log):g}); count {channel.count} is "
                   f"{period * 1e3:.2f} ms at {pit.PIT_HZ} Hz")
    return (f"{len(log)} ticks of vector {task.vector:#x}; tick k at {', '.join(f'{at:.2f}' for at in grid)} "
            f"periods of {period * 1e3:.2f} ms after the programming (count {channel.count}, mode {channel.mode})")


def _support(host) -> Support:
    if host.lapic_delivers_when_unblocked:
        return Support(True, "a timer that fires while the guest runs interrupts it at once; the TSC-deadline "
                             "step checks only where KVM offers that mode")
    return Support(True, "in-kernel LAPIC vectors are delivered only at VM entries here: a tick can come "
                         "late, and the periodic check judges the median gap for that reason")

def fired(key: str, at_least: int) -> Callable[[Verdict], str]:
    """A step's rule: KVM injected at least ``at_least`` interrupts in scenario ``key`` (only the timers do)."""
    def rule(verdict: Verdict) -> str:
        return f"KVM's irq_injections: {delivered(verdict, key, at_least)}"
    return rule


LAB = Lab(
    number=12, title="Timers: LAPIC timer, TSC-deadline and the PIT", minutes=60, folder=lab_folder(__file__),
    teaches="the LAPIC timer (LVT, divide configuration, initial count at KVM's 1 GHz bus; periodic and "
            "one-shot), the TSC-deadline MSR, the 8254 PIT through the 8259, and judging timer periods "
            "from TSC stamps",
    requires=(Cap.IRQCHIP, Cap.PIT2),
    support=_support,
    steps=(
        Step("the periodic LAPIC timer raises task.vector, again and again", check_periodic_vector,
             "the LVT timer entry holds the vector, the mode (bits 18:17) and the mask (bit 16); writing the "
             "initial count starts the timer", fired("periodic", TICKS)),
        Step("the ticks come every task.period_ns (median gap)", check_periodic_period,
             "KVM's APIC timer counts at 1 GHz: one count lasts `divide` ns. The divide configuration "
             "register is an encoding (bits 0, 1 and 3), not the divisor itself (sheet.md)", fired("periodic", TICKS)),
        Step("a one-shot timer fires once, after task.period_ns", check_one_shot,
             "one-shot is mode 0 in the LVT; the count runs down once and stops at 0", fired("one_shot", 1)),
        Step("the TSC-deadline timer fires when the guest TSC passes the deadline", check_tsc_deadline,
             "TSC-deadline is mode 2 in the LVT; then the initial count is ignored and the guest writes an "
             "absolute TSC value to IA32_TSC_DEADLINE (Command.TSC_DEADLINE adds rdtsc for you)",
             fired("tsc_deadline", 1)),
        Step("the PIT ticks through the 8259 at task.pit_count", check_pit,
             "the 8259 turns IRQ0 into its base vector + 0 (guest.pic_init); pykvm.irqchip.pit.program "
             "loads channel 0 (mode 2 is a rate generator)", fired("pit", PIT_TICKS)),
    ),
)
