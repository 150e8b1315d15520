"""What a vCPU that did not come back in time was waiting for: the words of a timeout's message.

Why this exists: when a guest waits in ``hlt`` for an interrupt and the
deadline passes, "timed out" alone does not say whose fault it is. Read once
the vCPU is out of ``KVM_RUN`` (kicked), KVM's own state separates the cases:

* the vCPU is halted and no interrupt is pending: the event has not come (a
  timer never armed, an interrupt never sent, a masked line);
* the vCPU is halted, IF=1, and a vector the guest can take sits in the LAPIC's
  IRR or in KVM's injection slot: the event came and KVM's wake-up of the
  halted vCPU was lost (the host kernel's fault, not the guest's);
* the vCPU is halted with IF=0 and a vector pending: the guest made itself
  deaf (``cli; hlt``);
* the vCPU is runnable: the guest was busy, not waiting.

:meth:`WaitState.describe` says which, with the registers that show it.

A halted vCPU gets one more chance: KVM_RUN again, for :func:`grace` seconds.
Re-entering a halted vCPU injects nothing; KVM blocks it again unless an event
is pending. So a guest that then reaches its goal proves the event had come and
the host had not woken the vCPU for it. pykvm goes on, and warns
:class:`LostWakeup` with what was pending (``-W error::pykvm.irqchip.waiting.LostWakeup``
makes that an error; the pytest plugin counts them in its summary line).
"""

from __future__ import annotations

import dataclasses
import warnings

from ..core.constants import MpState
from ..core.errors import PyKvmError
from ..core.vcpu import Vcpu
from ..x86.msr import TSC_DEADLINE_MSR, TSC_MSR
from . import lapic

RFLAGS_IF = 1 << 9
GRACE = 5.0          # seconds a halted vCPU gets, after its deadline, to show that its event was pending


class LostWakeup(RuntimeWarning):
    """A halted vCPU reached its goal only when re-entered after its deadline: its event had come, unnoticed."""


def grace(deadline: float) -> float:
    """How long to re-run a vCPU still halted at ``deadline`` seconds: as long again, at most :data:`GRACE`."""
    return min(deadline, GRACE)


def warn_lost_wakeup(what: str, deadline: float, state: WaitState) -> None:
    """Warn :class:`LostWakeup`: ``what`` stayed halted ``deadline`` seconds, then went on once re-entered."""
    warnings.warn(LostWakeup(f"{what}: the vCPU stayed halted for {deadline:g} s, then went on as soon as it "
                             f"entered KVM_RUN again, so its event had been pending and the host had not woken it "
                             f"(a lost wake-up). At the deadline: {state.registers()}"), stacklevel=3)


@dataclasses.dataclass(frozen=True)
class WaitState:
    """A stopped vCPU's wait: its MP state, IF, and what KVM holds for it (a queued vector, the LAPIC)."""

    mp_state: MpState | None
    interrupts_enabled: bool
    injected_vector: int | None         # KVM_GET_VCPU_EVENTS: an interrupt already queued for injection
    irr: frozenset[int]                 # the in-kernel LAPIC's requests (empty without one)
    ppr: int
    lapic: str                          # the LAPIC's registers in words (timer count too), or why they are unknown

    @property
    def deliverable(self) -> int | None:
        """The vector KVM should already have delivered: queued, or the highest IRR vector above the PPR's class."""
        if self.injected_vector is not None:
            return self.injected_vector
        highest = max(self.irr, default=None)
        return highest if highest is not None and highest >> 4 > self.ppr >> 4 else None

    @property
    def lost_wakeup(self) -> bool:
        """Halted with IF=1 and a deliverable vector: the event came, the halted vCPU was not woken for it."""
        return self.mp_state == MpState.HALTED and self.interrupts_enabled and self.deliverable is not None

    def registers(self) -> str:
        """The state read, without a verdict."""
        state = self.mp_state.name if self.mp_state is not None else "unknown"
        words = f"mp_state {state}, IF={int(self.interrupts_enabled)}"
        if self.injected_vector is not None:
            words += f", vector {self.injected_vector:#x} queued for injection"
        return f"{words}; {self.lapic}"

    def describe(self) -> str:
        """The state and what it means for a wait that missed its deadline."""
        words = self.registers()
        if self.lost_wakeup:
            return (f"{words}. Vector {self.deliverable:#x} was deliverable while the vCPU stayed halted: the "
                    f"interrupt came and the host did not wake the vCPU for it (a lost wake-up)")
        if self.mp_state == MpState.HALTED and self.deliverable is not None:
            return (f"{words}. Vector {self.deliverable:#x} was pending but the guest halted with IF=0: only an "
                    f"NMI, SMI or INIT wakes it")
        if self.mp_state == MpState.HALTED:
            return f"{words}. Nothing deliverable was pending in the LAPIC: the awaited interrupt had not come"
        return f"{words}. The vCPU was not halted: the guest was busy, not waiting"


def read(vcpu: Vcpu) -> WaitState:
    """The wait of ``vcpu``, which must be out of ``KVM_RUN`` (after a kick, say)."""
    try:
        mp_state: MpState | None = vcpu.mp_state
    except PyKvmError:
        mp_state = None
    events = vcpu.events
    injected = events.interrupt.nr if events.interrupt.injected else None
    interrupts_enabled = bool(vcpu.regs.rflags & RFLAGS_IF)
    if not vcpu.vm.irqchip.lapic_in_kernel:
        return WaitState(mp_state, interrupts_enabled, injected, frozenset(), 0, "no in-kernel LAPIC")
    chip = lapic.read(vcpu)
    words = chip.describe()
    if chip.lvt["timer"].timer_mode == lapic.TimerMode.TSC_DEADLINE:
        words += f"; {_tsc_deadline(vcpu)}"
    return WaitState(mp_state, interrupts_enabled, injected, chip.irr, chip.ppr, words)


def _tsc_deadline(vcpu: Vcpu) -> str:
    """The armed TSC deadline against the guest's TSC now, in words (KVM reads 0 once it fired or was disarmed)."""
    try:
        msrs = vcpu.get_msrs([TSC_DEADLINE_MSR, TSC_MSR])
    except PyKvmError as exc:
        return f"IA32_TSC_DEADLINE unreadable ({exc})"
    deadline, now = msrs[TSC_DEADLINE_MSR], msrs[TSC_MSR]
    if deadline == 0:
        return "IA32_TSC_DEADLINE=0 (fired or never armed)"
    when = f"due in {deadline - now} TSC ticks" if deadline > now else f"{now - deadline} TSC ticks past due"
    return f"IA32_TSC_DEADLINE={deadline:#x}, TSC={now:#x}: {when}"


def read_halted(vcpu: Vcpu) -> tuple[WaitState | None, str]:
    """After a deadline: the wait if the vCPU is halted (else None, as for one whose state cannot be read),
    and the wait in words. Never raises."""
    try:
        state = read(vcpu)
    except PyKvmError as exc:
        return None, f"its state could not be read ({exc})"
    return (state if state.mp_state == MpState.HALTED else None), state.describe()
