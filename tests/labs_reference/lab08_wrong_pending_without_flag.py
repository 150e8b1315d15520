"""Lab 8, wrong: a pending exception without KVM_VCPUEVENT_VALID_PAYLOAD in flags."""

from pykvm import Cap
from pykvm.core.state import ExceptionEvent

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(4, 'KVM held no exception')]


def inject(vcpu, task) -> None:
    events = vcpu.events
    events.exception = ExceptionEvent(injected=int(not task.pending), pending=int(task.pending), nr=task.vector,
                                      has_error_code=int(task.error_code is not None),
                                      error_code=task.error_code or 0)
    events.flags = 0
    if task.pending:
        vcpu.vm.enable_cap(Cap.EXCEPTION_PAYLOAD, 1)      # per VM; enabling it again is harmless
        events.exception_has_payload = int(task.cr2 is not None)
        events.exception_payload = task.cr2 or 0
    elif task.cr2 is not None:
        sregs = vcpu.sregs
        sregs.cr2 = task.cr2
        vcpu.sregs = sregs
    vcpu.events = events
