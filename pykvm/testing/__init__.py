"""pykvm's pytest plugin and assertion helpers, for authors of KVM hardware tests.

Why this exists: a hardware test of a KVM host should be ten lines, not a copy
of someone's conftest. Installing pykvm registers the plugin
(:mod:`pykvm.testing.plugin`, a ``pytest11`` entry point), which gives the
fixtures ``kvm``, ``vm``, ``vcpu``, ``guest``, ``host`` (and the factories
``boot`` and ``machine``), the markers ``requires_cap``, ``host_limit``,
``guest`` and ``deadline``, and the ``PYKVM_REQUIRE_KVM=1`` switch that turns
every hardware skip into a failure (but :func:`skip_missing_input`'s). The
helpers here assert what the guest recorded::

    from pykvm.testing import assert_delivered

    def test_msi_reaches_cpu0(machine):
        [guest] = machine(irqchip="kernel")
        ...
        assert_delivered(guest, [(0x45, 0)])

Importing the package loads neither helper: each name is imported on first use
(PEP 562), so pytest loading the plugin in every run imports no KVM code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .helpers import assert_delivered, popen_interruptible, run_until_vector, scenario_and_control
    from .plugin import skip_missing_input
    from .stalls import HostStalls

_WHERE = {"assert_delivered": ".helpers", "popen_interruptible": ".helpers", "run_until_vector": ".helpers",
          "scenario_and_control": ".helpers", "HostStalls": ".stalls", "skip_missing_input": ".plugin"}

__all__ = ["HostStalls", "assert_delivered", "popen_interruptible", "run_until_vector", "scenario_and_control",
           "skip_missing_input"]


def __getattr__(name: str) -> Any:
    """``pykvm.testing.NAME`` on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
