"""pykvm's pytest plugin and assertion helpers, for authors of KVM hardware tests.

Why this exists: a hardware test of a KVM host should be ten lines, not a copy
of someone's conftest. Installing pykvm registers the plugin
(:mod:`pykvm.testing.plugin`, a ``pytest11`` entry point), which gives the
fixtures ``kvm``, ``vm``, ``vcpu``, ``guest``, ``host`` (and the factories
``boot`` and ``machine``), the markers ``requires_cap``, ``host_limit``,
``guest`` and ``deadline``, and the ``PYKVM_REQUIRE_KVM=1`` switch that turns
every hardware skip into a failure. The helpers here assert what the guest
recorded::

    from pykvm.testing import assert_delivered

    def test_msi_reaches_cpu0(machine):
        [guest] = machine(irqchip="kernel")
        ...
        assert_delivered(guest, [(0x45, 0)])
"""

from .helpers import assert_delivered, popen_interruptible, run_until_vector, scenario_and_control
from .stalls import HostStalls

__all__ = ["HostStalls", "assert_delivered", "popen_interruptible", "run_until_vector", "scenario_and_control"]
