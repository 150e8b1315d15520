"""The APIC requests: TPR access reports, EOIs for a userspace IOAPIC, IOAPIC scans, APICv."""

from __future__ import annotations

from collections.abc import Callable

from .common import Outcome, request

REQUESTS = (
    request(
        "REPORT_TPR_ACCESS",
        "LAPIC TPR access with KVM_TPR_ACCESS_REPORTING",
        "KVM_EXIT_TPR_ACCESS",
        "split irqchip, TPR reporting on; guest reads then writes the TPR",
        "KVM_EXIT_TPR_ACCESS (rip, is_write)",
        "Reports guest accesses to the xAPIC TPR so a VMM can patch them (QEMU's kvmvapic for old Windows).",
    ),
    request(
        "IOAPIC_EOI_EXIT",
        "EOI of a level vector routed through a userspace IOAPIC",
        "KVM_EXIT_IOAPIC_EOI",
        "split irqchip, level MSI route on a GSI < 24, guest EOIs",
        "KVM_EXIT_IOAPIC_EOI with the vector",
        "With the IOAPIC in userspace, KVM must tell it when a level-triggered interrupt was EOI'd so it can "
        "re-check the line.",
    ),
    request(
        "SCAN_IOAPIC",
        "KVM_SET_GSI_ROUTING, IOAPIC redirection changes",
        "vcpu_scan_ioapic()",
        "KVM_SET_GSI_ROUTING",
        "indirect: the EOI exit appears only after the rescan",
        "Recomputes which vectors need an EOI exit (the EOI exit bitmap) from the routing table.",
    ),
    request(
        "LOAD_EOI_EXITMAP",
        "SCAN_IOAPIC result with APICv",
        "vcpu_load_eoi_exitmap()",
        "APICv",
        "",
        "Loads the EOI exit bitmap into the hardware.",
        needs="APICv",
    ),
    request(
        "APICV_UPDATE",
        "APICv inhibit changes",
        "kvm_vcpu_update_apicv()",
        "APICv",
        "",
        "Turns hardware APIC virtualization on or off.",
        needs="APICv",
    ),
    request(
        "APIC_PAGE_RELOAD",
        "APIC-access page moved",
        "kvm_vcpu_reload_apic_access_page()",
        "Intel VMX",
        "",
        "Reloads the APIC-access page address.",
        needs="Intel VMX (APIC-access page)",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {}
