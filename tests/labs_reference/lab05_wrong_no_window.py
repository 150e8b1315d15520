"""Lab 5, wrong: never asks for the interrupt window (and never clears it)."""


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
