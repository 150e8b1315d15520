"""Lab 5, wrong: injects whenever something is pending, ready or not."""

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
# kvm_intel (measured under Bochs): the VM entry itself fails, KVM_EXIT_FAIL_ENTRY 0x80000021,
# which pykvm explains; the run stops there.
EXPECTED_FAILURES = [(1, 'while IF=0'), (1, 'VM entry failed (0x80000021): invalid guest state')]


class Controller:
    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self.pending: list[int] = []

    def queue(self, vector: int) -> None:
        if vector not in self.pending:
            self.pending.append(vector)

    def before_entry(self) -> None:
        if self.pending:
            self.vcpu.interrupt(self.pending.pop(0))      # the bare KVM_INTERRUPT, ready or not
        self.vcpu.kvm_run.request_interrupt_window = bool(self.pending)
