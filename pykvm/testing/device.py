"""Which KVM device the pytest plugin's fixtures and the kvm-unit-tests items open.

Why this exists: one fact, read in one place by both :mod:`pykvm.testing.plugin`
and :mod:`pykvm.testing.kut`, so neither imports the other.
"""

from __future__ import annotations

import os


def device() -> str:
    """The KVM device the fixtures open: ``PYKVM_DEVICE``, else ``/dev/kvm``."""
    return os.environ.get("PYKVM_DEVICE", "/dev/kvm")
