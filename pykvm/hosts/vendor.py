"""Which vendor module is behind ``/dev/kvm``.

Why this exists: pykvm runs on kvm_pvm, kvm_amd and kvm_intel, which do not
behave alike; everything host-specific starts from knowing which one this is.
The loaded module shows in ``/sys/module``.
"""

from __future__ import annotations

import enum
import os


class VendorModule(str, enum.Enum):
    """The vendor module behind ``/dev/kvm``."""

    INTEL = "kvm_intel"
    AMD = "kvm_amd"
    PVM = "kvm_pvm"
    UNKNOWN = "unknown"


def detect_vendor(sys_module: str = "/sys/module") -> VendorModule:
    """The loaded vendor module, from ``/sys/module/{kvm_intel,kvm_amd,kvm_pvm}``."""
    for vendor in (VendorModule.PVM, VendorModule.AMD, VendorModule.INTEL):
        if os.path.isdir(os.path.join(sys_module, vendor.value)):
            return vendor
    return VendorModule.UNKNOWN
