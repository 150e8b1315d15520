"""The guest images built at install time (no KVM needed)."""

import pytest

from pykvm import guests
from pykvm.guests import images, layout
from pykvm.x86 import Mode

LABELS = ["entry", "sync_out", "sync_done", "sti_nop_sti", "sti_nop_nop", "sti_nop_end",
          "mov_ss_mov", "mov_ss_nop", "mov_ss_end", "hlt_hlt", "hlt_end", "sti_hlt_sti",
          "sti_hlt_hlt", "sti_hlt_end", "spin_loop", "spin_end", "raise_0", "raise_0_end",
          "raise_3", "raise_6", "int_table", "done_out", "vector_stubs", "handler_common",
          "handler_notify_out", "handler_iret"]


@pytest.mark.parametrize("mode", guests.MODES)
def test_image_is_packaged_with_its_source(mode):
    image = guests.load(mode)
    assert image.mode == Mode(mode)
    assert image.source.exists() and image.source.read_text().startswith("/*")
    assert (images.IMAGES_DIR / "common.inc").exists()
    # the code must not run into the vector log
    assert layout.CODE + len(image.code) <= layout.LOG


@pytest.mark.parametrize("mode", guests.MODES)
def test_image_exports_the_labels_tests_use(mode):
    image = guests.load(mode)
    missing = [label for label in LABELS if label not in image.symbols]
    assert not missing
    assert image.address("entry") == image.origin
    assert image.address("sync_done") > image.address("sync_out")
    assert image.address("sti_nop_end") == image.address("sti_nop_nop") + 1


def test_mode_specific_exceptions():
    assert "raise_13" in guests.load("protected").symbols
    assert "raise_14" in guests.load("long").symbols
    assert "raise_14" not in guests.load("real").symbols


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="real, protected, long"):
        guests.load("smm")


@pytest.mark.parametrize("where", ["before_the_hlt", "control_after_the_hlt"])
def test_an_interrupt_taken_at_wait_logs_hlt_resumes_past_it(machine, where):
    """A host that loses the STI shadow (kvm_amd under QEMU 7.2's TCG, after an exit between the `sti` and the
    `hlt`) delivers WAIT_LOG's interrupt before its `hlt`. The handler resumes it past the `hlt`, so the wait ends
    at once, where it would have halted with nothing left to wake it; the record keeps the RIP it interrupted.
    Made here by putting RIP back on the `hlt` before injecting; the control injects after the `hlt`, as usual."""
    [guest] = machine(irqchip="none")
    hlt = guest.address("wait_log_hlt")
    guest.send(guests.Command.WAIT_LOG, 1)
    stop = guest.run()                                   # the hlt: an exit with the userspace irqchip
    assert stop.kind == guests.StopKind.HLT and guest.vcpu.regs.rip == hlt + 1, stop
    taken_at = hlt if where == "before_the_hlt" else hlt + 1
    regs = guest.vcpu.regs
    regs.rip = taken_at
    guest.vcpu.regs = regs
    guest.vcpu.interrupt(0x40)
    stop = guest.run()
    assert stop.kind == guests.StopKind.SYNC, stop       # no second hlt: the wait saw its record
    [record] = guest.log()
    assert record.vector == 0x40 and record.rip == taken_at
