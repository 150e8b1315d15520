"""The PMU and PMI rows: KVM_SET_PMU_EVENT_FILTER (pykvm API and header check) and the vPMU measured live.

Neither request has visible evidence on a host without a vPMU; the tests
check that the scenarios' verdicts follow from what the host offers, read
again here (the kvm module parameter, KVM_CAP_PMU_CAPABILITY, CPUID 0xA).
"""

from __future__ import annotations

import subprocess

import pytest

from pykvm import Cap
from pykvm.core.binding import ffi
from pykvm.core.constants import PmuEventAction
from pykvm.core.errors import InvalidArgument
from pykvm.core.ioctls import Ioctl
from pykvm.requests import NO_EFFECT, NOT_IMPLEMENTED, UNREACHABLE
from pykvm.requests.scenarios import pmu

HEADER_PROGRAM = r"""
#include <stdio.h>
#include <linux/kvm.h>
int main(void) {
    printf("%lu %lu %d %d\n", (unsigned long)KVM_SET_PMU_EVENT_FILTER,
           (unsigned long)sizeof(struct kvm_pmu_event_filter), KVM_PMU_EVENT_ALLOW, KVM_PMU_EVENT_DENY);
    return 0;
}
"""


def test_pmu_event_filter_layout_matches_the_header(tmp_path):
    source = tmp_path / "pmu.c"
    source.write_text(HEADER_PROGRAM)
    try:
        subprocess.run(["cc", "-o", str(tmp_path / "pmu"), str(source)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler with <linux/kvm.h>: {exc}")
    numbers = subprocess.run([str(tmp_path / "pmu")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(n) for n in numbers] == [int(Ioctl.SET_PMU_EVENT_FILTER), ffi.sizeof("struct kvm_pmu_event_filter"),
                                         PmuEventAction.ALLOW, PmuEventAction.DENY]


@pytest.mark.requires_cap(Cap.PMU_EVENT_FILTER)
def test_set_pmu_event_filter_accepts_and_refuses(vm):
    vm.create_vcpu()
    vm.set_pmu_event_filter([pmu.INSTRUCTIONS_RETIRED], deny=True)
    vm.set_pmu_event_filter([pmu.INSTRUCTIONS_RETIRED, 0x3C], deny=False)
    vm.set_pmu_event_filter()                           # an empty deny list: everything counts again
    with pytest.raises(InvalidArgument, match="at most 300"):
        vm.set_pmu_event_filter(range(301))
    with pytest.raises(InvalidArgument, match=r"events\[0\]"):
        vm.set_pmu_event_filter([-1])


def test_the_pmu_rows_follow_the_vpmu_read_now(kvm):
    found = pmu.vpmu(kvm)
    enable_pmu = pmu.ENABLE_PMU.read_text().strip() if pmu.ENABLE_PMU.exists() else ""
    assert found.enable_pmu == enable_pmu and found.capability == kvm.check_extension(Cap.PMU_CAPABILITY)
    request, control = pmu.pmu(), pmu.pmu(control=True)
    interrupt, interrupt_control = pmu.pmi(), pmu.pmi(control=True)
    if found.present:
        assert request.verdict == interrupt.verdict == NOT_IMPLEMENTED and "vPMU" in request.why
        return
    assert found.capability == 0 and found.gp_counters == 0
    assert request.verdict == NO_EFFECT and request.evidence["filter_set"] and not control.evidence["filter_set"]
    assert "enable_pmu" in request.why and control.verdict == "absent"
    assert interrupt.verdict == interrupt_control.verdict == UNREACHABLE and "needs a vPMU" in interrupt.why
