"""Lab 8: exceptions from the host. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.

The checker calls inject(vcpu, task) four times, each with a fresh long-mode
guest stopped between two instructions; then it runs the guest and reads what
its handler logged. The vCPU belongs to the checker (do not close it).
"""

from pykvm import Cap  # noqa: F401  (Cap.EXCEPTION_PAYLOAD)
from pykvm.core.binding import lib  # noqa: F401  (lib.KVM_VCPUEVENT_VALID_PAYLOAD)
from pykvm.core.state import ExceptionEvent  # noqa: F401


def inject(vcpu, task) -> None:
    """Make task's exception the vCPU's next event with KVM_SET_VCPU_EVENTS.

    task.vector: 0..31; task.error_code: the code to push, or None for a vector that pushes none;
    task.cr2: for #PF the address the handler must find in CR2, else None;
    task.pending: False -> set it as injected; True -> as pending, with CR2 as its payload.
    """
    print("task:", task)
    # TODO 1: events = vcpu.events (KVM_GET_VCPU_EVENTS); build events.exception, an ExceptionEvent
    #         (nr, injected or pending, has_error_code, error_code); events.flags = 0.
    # TODO 2: an injected #PF: CR2 is yours to write (vcpu.sregs: read, change .cr2, assign).
    # TODO 3: a pending one: enable KVM_CAP_EXCEPTION_PAYLOAD on the VM (once; vcpu.vm.enable_cap),
    #         set lib.KVM_VCPUEVENT_VALID_PAYLOAD in events.flags and the payload fields.
    # TODO 4: vcpu.events = events (KVM_SET_VCPU_EVENTS).
    raise NotImplementedError("TODO 1-4 in inject(): build the exception event and set it (sheet.md)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(8, __file__)
