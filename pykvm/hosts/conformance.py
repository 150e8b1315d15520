"""What each host is expected to do: the one table behind the doctor, the host facts and the tests.

Why this exists: "what does this host do" must be defined once. Each row
names a probe (:mod:`pykvm.hosts.probes`), the outcome the architecture or KVM's
documentation calls for, where that comes from, and what pykvm has measured
(or, for VT-x, expects) on each vendor module. ``python -m pykvm.doctor``
compares a live run against it; :mod:`pykvm.hosts.facts` derives its facts
(``host.sends_irq_window_exits`` ...) from it, and the tests branch on those.
"""

from __future__ import annotations

import dataclasses

from .vendor import VendorModule

INTEL_EXPECTED = "expected from the Intel SDM and KVM's vmx code, unverified: not measured on kvm_intel"

PVM_MEASURED = "measured on kvm_pvm by python -m pykvm.doctor (Linux 6.18, nested under KVM)"
AMD_MEASURED = ("measured on kvm_amd (Debian Linux 6.12.117, under QEMU TCG -cpu max) by "
                "python -m pykvm.hosts tcg-amd -- python -m pykvm.doctor")


@dataclasses.dataclass(frozen=True)
class Known:
    """What pykvm recorded for one vendor module: the outcome, and how it is known."""

    outcome: str
    source: str
    verified: bool


@dataclasses.dataclass(frozen=True)
class Expectation:
    """One probe: the architectural / documented outcome, its source, and what each host does."""

    probe: str
    title: str
    expected: str
    source: str
    hosts: dict[VendorModule, Known]
    explanations: dict[str, str] = dataclasses.field(default_factory=dict)
    fact: str | None = None        # the HostInfo attribute this row defines

    def known(self, vendor: VendorModule) -> Known:
        """The recorded outcome for ``vendor``; the expectation itself (unverified) when none is recorded."""
        if vendor in self.hosts:
            return self.hosts[vendor]
        if vendor == VendorModule.INTEL:
            return Known(self.expected, INTEL_EXPECTED, False)
        return Known(self.expected, "architectural expectation, not measured on this vendor module",
                     False)

    def explain(self, outcome: str) -> str:
        return self.explanations.get(outcome, f"observed '{outcome}', expected '{self.expected}'")


def _pvm(outcome: str, note: str = "") -> dict[VendorModule, Known]:
    return {VendorModule.PVM: Known(outcome, PVM_MEASURED + (f"; {note}" if note else ""), True)}


def _measured_everywhere(pvm: str, amd: str, intel: str | None = None, pvm_note: str = ""
                         ) -> dict[VendorModule, Known]:
    hosts = {**_pvm(pvm, pvm_note), VendorModule.AMD: Known(amd, AMD_MEASURED, True)}
    if intel is not None:
        hosts[VendorModule.INTEL] = Known(intel, INTEL_EXPECTED, False)
    return hosts


def _mode_rows(mode: str, pvm_delivery: str, pvm_software: str, pvm_note: str) -> list[Expectation]:
    title = {"real": "real mode (IVT, IRET)", "protected": "32-bit protected mode (IDT, IRET)",
             "long": "long mode (IDT, IRETQ)"}[mode]
    failing = {"not delivered (emulation error)": f"the host's instruction emulator cannot run "
                                                  f"the software interrupt in {mode} mode",
               "delivered, return fails": f"the handler runs, but the host cannot emulate its "
                                          f"IRET in {mode} mode"}
    return [
        Expectation(f"delivery_{mode}", f"injected vector, {title}", "delivered and returned",
                    "Intel SDM Vol. 3A ch. 6 (IDT) and Vol. 3B 'Real-Address Mode Operation' (IVT); "
                    "api.rst KVM_INTERRUPT", _measured_everywhere(pvm_delivery, "delivered and returned",
                                                                  pvm_note=pvm_note),
                    failing, "protected_mode_iret" if mode == "protected" else None),
        Expectation(f"int_n_{mode}", f"INT n, {title}", "delivered and returned",
                    "Intel SDM Vol. 2A 'INT n/INTO/INT3/INT1'",
                    _measured_everywhere(pvm_software, "delivered and returned", pvm_note=pvm_note),
                    failing, "software_interrupts" if mode == "long" else None),
        Expectation(f"int3_{mode}", f"INT3, {title}", "delivered and returned",
                    "Intel SDM Vol. 2A 'INT n/INTO/INT3/INT1'",
                    _measured_everywhere(pvm_software, "delivered and returned", pvm_note=pvm_note),
                    failing),
    ]


EXPECTATIONS: dict[str, Expectation] = {row.probe: row for row in [
    Expectation(
        "irq_window", "IRQ window exit after `sti; nop` (userspace irqchip)", "exit after sti; nop",
        "api.rst request_interrupt_window / KVM_EXIT_IRQ_WINDOW_OPEN; Intel SDM Vol. 3C "
        "'interrupt-window exiting'; AMD APM Vol. 2 'virtual interrupt intercept (VINTR)'",
        _measured_everywhere("no window exit", "exit after sti; nop"),
        {"no window exit": "the host never sends KVM_EXIT_IRQ_WINDOW_OPEN; inject at the next exit "
                           "that reports ready_for_interrupt_injection=1",
         "exit right after sti": "the window opened inside the STI shadow"},
        "sends_irq_window_exits"),
    Expectation(
        "sti_shadow", "STI shadow (single-stepped, in-kernel LAPIC vector pending)",
        "held for one instruction", "Intel SDM Vol. 2B 'STI' (interrupts recognised after the next "
        "instruction); KVM_GET_VCPU_EVENTS interrupt.shadow",
        _measured_everywhere("held for one instruction", "held for one instruction",
                             pvm_note="PVM's spec says native long mode has no shadow; under "
                                      "single-step the shadow is honoured and reported"),
        {"taken at once (no shadow)": "the interrupt was taken inside the STI shadow"},
        "long_mode_interrupt_shadow"),
    Expectation(
        "mov_ss_shadow", "MOV SS shadow (single-stepped, in-kernel LAPIC vector pending)",
        "held for one instruction", "Intel SDM Vol. 3A 6.8.3 'Masking Exceptions and Interrupts "
        "When Switching Stacks'",
        _measured_everywhere("held for one instruction", "held for one instruction"),
        {"taken at once (no shadow)": "the interrupt was taken inside the MOV SS shadow"}),
    Expectation(
        "interrupt_not_ready", "KVM_INTERRUPT while the guest has IF=0", "held while IF=0",
        "Intel SDM Vol. 3A 6.8.1 (IF masks external interrupts); api.rst: inject only when "
        "ready_for_interrupt_injection=1",
        _measured_everywhere("delivered although IF=0", "delivered although IF=0", "VM entry fails"),
        {"delivered although IF=0": "KVM injects the event regardless of IF; userspace must wait for "
                                    "ready_for_interrupt_injection=1 (pykvm refuses otherwise)",
         "VM entry fails": "VT-x's VM-entry checks reject an external interrupt with RFLAGS.IF=0"}),
    Expectation(
        "io_exit_rip", "RIP reported at a KVM_EXIT_IO for `out`", "at the out",
        "api.rst 'kvm_run': an IO exit's instruction completes only on the next KVM_RUN; "
        "x86.c kvm_fast_pio / complete_fast_pio_out",
        _measured_everywhere("past the out", "at the out"),
        {"past the out": "the host reports RIP after the `out`; the instruction is already complete"},
        "io_exit_rip_at_out"),
    Expectation(
        "nmi_blocking", "a second NMI while the first NMI's handler runs", "held until IRET",
        "Intel SDM Vol. 3A 6.7.1 'Handling Multiple NMIs'",
        _measured_everywhere("held until IRET", "held until IRET")),
    Expectation(
        "nmi_window", "when a held NMI is taken after the handler's IRET", "delivered right after IRET",
        "x86.c inject_pending_event / enable_nmi_window (NMI-window exiting, or IRET interception "
        "on SVM)",
        _measured_everywhere("held until the next VM entry", "delivered right after IRET"),
        {"held until the next VM entry": "no NMI-window exit: the NMI waits (unmasked) until the "
                                         "next KVM_RUN"},
        "nmi_delivered_at_iret"),
    Expectation(
        "lapic_after_sti", "in-kernel LAPIC: a vector pending while IF=0, then `sti; nop; out`",
        "after the STI shadow", "x86.c inject_pending_event / enable_irq_window: KVM asks for the "
        "interrupt window and injects as soon as it opens",
        _measured_everywhere("at the next VM entry", "after the STI shadow"),
        {"at the next VM entry": "the host injects pending LAPIC vectors only at a VM entry, so the "
                                 "vector waits for the guest's next exit"},
        "lapic_delivers_when_unblocked"),
    Expectation(
        "lapic_isr", "in-kernel LAPIC: ISR bit while the handler has not EOId", "in service until EOI",
        "Intel SDM Vol. 3A, local APIC 'Interrupt Acceptance for Fixed Interrupts'; lapic.c "
        "kvm_get_apic_interrupt",
        _measured_everywhere("not in service", "in service until EOI"),
        {"not in service": "the host's LAPIC does not track delivered vectors in the ISR, so level-"
                           "triggered lines re-deliver without an EOI"},
        "lapic_tracks_in_service"),
    Expectation(
        "single_step", "KVM_SET_GUEST_DEBUG single-step", "one exit per instruction",
        "api.rst KVM_SET_GUEST_DEBUG, KVM_GUESTDBG_SINGLESTEP",
        _measured_everywhere("one exit per instruction", "one exit per instruction")),
    Expectation(
        "step_sti_shadow", "single-step over `sti`: where the next debug exit comes",
        "stops in the shadow", "Intel SDM Vol. 3A 6.8.3 holds debug exceptions only after MOV SS / "
        "POP SS; STI delays interrupts, not the single-step trap",
        _measured_everywhere("stops in the shadow", "trap held past the shadowed instruction"),
        {"trap held past the shadowed instruction": "the host treats the STI shadow like MOV SS's "
                                                    "and holds the single-step trap over the next "
                                                    "instruction"},
        "single_step_stops_in_sti_shadow"),
    Expectation(
        "hlt_single_step", "HLT executed under single-step", "halts",
        "Intel SDM Vol. 2A 'HLT' (the processor halts until an interrupt, NMI, SMI or INIT; the "
        "single-step trap follows the completed instruction); api.rst KVM_EXIT_HLT",
        _measured_everywhere("debug exit past the hlt", "halts"),
        {"debug exit past the hlt": "KVM skips the hlt and reports the single-step first "
                                    "(x86.c kvm_emulate_halt -> kvm_skip_emulated_instruction); "
                                    "the vCPU never halts"}),
    Expectation(
        "triple_fault", "triple fault (IDT limit 0, then #DE)", "KVM_EXIT_SHUTDOWN",
        "api.rst KVM_EXIT_SHUTDOWN; Intel SDM Vol. 3A 'Interrupt 8 - Double Fault Exception'",
        _measured_everywhere("KVM_EXIT_SHUTDOWN", "KVM_EXIT_SHUTDOWN")),
    Expectation(
        "real_mode_ud2", "UD2 in real mode", "#UD delivered", "Intel SDM Vol. 2B 'UD'",
        _measured_everywhere("emulation error", "#UD delivered"),
        {"emulation error": "KVM's instruction emulator, which runs real mode on this host, "
                            "does not decode UD2"},
        "real_mode_ud2"),
    *_mode_rows("real", "delivered and returned", "delivered and returned", ""),
    *_mode_rows("protected", "delivered, return fails", "not delivered (emulation error)",
                "PVM runs protected mode in KVM's emulator"),
    *_mode_rows("long", "delivered and returned", "not delivered (emulation error)", ""),
]}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One probe's live result against the table."""

    probe: str
    title: str
    expected: str
    observed: str | None
    verdict: str             # conforms / differs / unsupported / probe failed
    explanation: str
    recorded: str            # what the table holds for this host
    matches_record: bool
    detail: str = ""         # what the probe saw


def judge(probe: str, observed: str | None, detail: str, vendor: VendorModule) -> Verdict:
    """Compare one observation with the architectural expectation and with pykvm's record."""
    row = EXPECTATIONS[probe]
    known = row.known(vendor)
    if observed is None:
        verdict, explanation = "unsupported", detail
    elif observed == "probe failed":
        verdict, explanation = "probe failed", detail
    elif observed == row.expected:
        verdict, explanation = "conforms", ""
    else:
        verdict, explanation = "differs", row.explain(observed)
    return Verdict(probe, row.title, row.expected, observed, verdict, explanation, known.outcome,
                   observed == known.outcome, detail)
