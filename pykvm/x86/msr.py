"""Model-specific registers and the default APIC addresses pykvm's guests use.

Why this exists: the guest images, the irqchip models and the tests must agree
on these numbers; each is written once here (Intel SDM Vol. 4 for the MSRs,
Vol. 3A "Local APIC" for the base address).
"""

from __future__ import annotations

TSC_MSR = 0x10                  # IA32_TSC (time-stamp counter)
APIC_BASE_MSR = 0x1B            # IA32_APIC_BASE
TSC_DEADLINE_MSR = 0x6E0        # IA32_TSC_DEADLINE
XAPIC_BASE = 0xFEE00000         # the LAPIC's MMIO page in xAPIC mode (IA32_APIC_BASE's default)
