"""MSR_FILTER_CHANGED: userspace MSR filters reach a running vCPU's intercepts."""

from __future__ import annotations

from collections.abc import Callable

from pykvm import x86
from pykvm.core.constants import MsrExitReason, MsrFilterAccess
from pykvm.core.exits import MsrExit
from pykvm.core.state import MsrFilterRange

from .common import OBSERVED, PORT_READY, ScenarioRecorder, ScenarioResult, is_port, machine, request, run_until

# ---- MSR_FILTER_CHANGED ----------------------------------------------------------

MSR_GUEST = """
loop:   mov $0x10, %ecx          # IA32_TIME_STAMP_COUNTER
        rdmsr
        out %al, $0x10
        jmp loop
"""


def msr_filter_changed(control: bool = False) -> ScenarioResult:
    """KVM_X86_SET_MSR_FILTER raises KVM_REQ_MSR_FILTER_CHANGED: intercepts reload, the next RDMSR exits."""
    t = ScenarioRecorder("MSR_FILTER_CHANGED", control)
    with machine() as (vm, vcpu):
        vm.enable_user_space_msr(MsrExitReason.FILTER)
        t.host("KVM_ENABLE_CAP KVM_CAP_X86_USER_SPACE_MSR (reason: filter)")
        x86.load_code(vcpu, MSR_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        if not control:
            t.host("KVM_X86_SET_MSR_FILTER: deny reads of MSR 0x10 (KVM raises KVM_REQ_MSR_FILTER_CHANGED)")
            vm.set_msr_filter([MsrFilterRange.deny(0x10, MsrFilterAccess.READ)])
        else:
            t.host("nothing (control)")
        exits = []
        for _ in range(3):
            exit = t.exit(vcpu.run())
            exits.append(exit)
            if isinstance(exit, MsrExit):
                break
        msr = next((e for e in exits if isinstance(e, MsrExit)), None)
        late = msr is not None and exits.index(msr) > 0
        t.outcome.evidence.update(
            msr_exit=msr is not None,
            reason=msr.msr_reason if msr else None,
            exits_before=exits.index(msr) if msr else None,
        )
        if msr is not None:
            t.guest(
                f"RDMSR 0x10 ended in KVM_EXIT_X86_RDMSR, reason {msr.msr_reason:#x} (filter)"
                + (" one exit late" if late else "")
            )
        return t.verdict(
            msr is not None and msr.msr_reason == MsrExitReason.FILTER,
            "the guest's RDMSR became KVM_EXIT_X86_RDMSR with reason filter"
            + (" (one exit late: this host runs guest code in batches)" if late else ""),
        )


REQUESTS = (
    request(
        "MSR_FILTER_CHANGED",
        "KVM_X86_SET_MSR_FILTER",
        "kvm_x86_ops.recalc_msr_intercepts",
        "USER_SPACE_MSR + a filter denying RDMSR 0x10 while the guest loops on it",
        "KVM_EXIT_X86_RDMSR, reason filter",
        "MSRs the hardware lets the guest access directly must become intercepted when userspace denies "
        "them: KVM_REQ_MSR_FILTER_CHANGED recomputes each vCPU's MSR intercept bitmap before it enters again, "
        "so the very next RDMSR is filtered.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {"MSR_FILTER_CHANGED": msr_filter_changed}
