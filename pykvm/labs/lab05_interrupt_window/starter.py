"""Lab 5: The interrupt window. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder."""


class Controller:
    """A userspace interrupt controller for one vCPU (vcpu.irq_controller = Controller(vcpu))."""

    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        # TODO: the pending vectors

    def queue(self, vector: int) -> None:
        """Make vector pending (a vector already pending stays pending once)."""
        raise NotImplementedError("TODO: Controller.queue() (sheet.md, step 2)")

    def before_entry(self) -> None:
        """Called by vcpu.run() before every KVM_RUN: inject when ready, else ask for the window."""
        raise NotImplementedError("TODO: Controller.before_entry() (sheet.md, step 3)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(5, __file__)
