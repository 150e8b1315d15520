"""Lab 5, wrong: never asks for the interrupt window (and never clears it)."""

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, 'request_interrupt_window was 0')]


class Controller:
    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self.pending: set[int] = set()

    def queue(self, vector: int) -> None:
        self.pending.add(vector)

    def before_entry(self) -> None:
        if self.pending and self.vcpu.kvm_run.ready_for_interrupt_injection:
            vector = max(self.pending)
            self.pending.discard(vector)
            self.vcpu.interrupt(vector)
