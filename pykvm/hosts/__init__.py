"""The hosts layer: which KVM this is, what it is known to do, live probes, and other hosts to run on.

Why this exists: kvm_pvm, kvm_amd and kvm_intel do not behave alike, and pykvm
never assumes which one it runs on. :mod:`~pykvm.hosts.vendor` detects the
module; :mod:`~pykvm.hosts.conformance` is the record of expected and
measured behaviour per vendor module, gathered from the probe families of
:mod:`~pykvm.hosts.probes`, where each probe's row sits beside its scenario
(:func:`~pykvm.hosts.probes.run_probes` runs them); :mod:`~pykvm.hosts.measurement`
runs them on this host once per kernel, module and module parameters and caches
the outcomes, from which :mod:`~pykvm.hosts.facts` derives the named facts tests
and tools branch on (:func:`detect`); :mod:`~pykvm.hosts.limits` explains
exits that are host limits (:func:`explain_exit`, which the tools pass to what
reports exits: guest sessions, the VMM); :mod:`~pykvm.hosts.delivery_latency` times one
vector through each delivery path to a vCPU in each state (the demo, the bench
and lab 11 measure with it) and :mod:`~pykvm.hosts.latency_plot` draws those
latencies (matplotlib, the ``plot`` extra); :mod:`~pykvm.hosts.runner` runs a command on
another host: kvm_amd under QEMU (``python -m pykvm.hosts tcg-amd -- CMD``) or
kvm_intel under Bochs (``python -m pykvm.hosts bochs-intel -- CMD``).
"""

from .facts import Behaviour, HostInfo, detect, host_info, measured_info
from .limits import explain_exit
from .vendor import VendorModule, detect_vendor

__all__ = ["Behaviour", "HostInfo", "detect", "explain_exit", "host_info", "measured_info", "VendorModule",
           "detect_vendor"]
