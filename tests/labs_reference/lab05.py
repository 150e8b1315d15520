"""Lab 5 reference solution."""


class Controller:
    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self.pending: set[int] = set()

    def queue(self, vector: int) -> None:
        self.pending.add(vector)

    def before_entry(self) -> None:
        run = self.vcpu.kvm_run
        if self.pending and run.ready_for_interrupt_injection:
            vector = max(self.pending)
            self.pending.discard(vector)
            self.vcpu.interrupt(vector)
        run.request_interrupt_window = bool(self.pending)
