"""The async page fault request scenarios (APF_READY, APF_HALT), each against its control, with their figures.

The generic table test (tests/test_requests.py) checks each verdict; here the
evidence itself is asserted: what the guest's #PF and page-ready handlers
recorded, which thread took the userfault, how long KVM_RUN stayed in the
kernel, and the async-PF trace events.
"""

from __future__ import annotations

import pytest

from pykvm.requests import OBSERVED, UNREACHABLE
from pykvm.requests.scenarios import apf


def _count(evidence, event):
    return evidence.get(event, 0) if evidence["traced"] else None


def test_enabling_async_pf_raises_apf_ready_and_the_guest_gets_page_ready(kvm):
    outcome, control = apf.apf_ready(), apf.apf_ready(control=True)
    e, quiet = outcome.evidence, control.evidence
    assert outcome.verdict == OBSERVED and control.verdict == "absent", (outcome.verdict, e, control.verdict, quiet)
    assert e["wake_all"] >= 1 and e["ready"] >= e["wake_all"]           # token 0xffffffff seen by the guest
    assert e["value"] == apf.VALUE and e["ordinary_pf"] == 0
    assert _count(e, "kvm_async_pf_ready") in (None,) or e["kvm_async_pf_ready"] >= 1
    if e["async"]:                                                       # the page too came asynchronously
        assert e["not_present"] == 1 and e["ready_token"] == e["not_present_token"] != apf.WAKE_ALL_TOKEN
        assert all(f["thread"] != "the vCPU thread" for f in e["faults"])
    else:
        assert e["not_present"] == 0 and [f["thread"] for f in e["faults"]] == ["the vCPU thread"]
    assert quiet["ready"] == quiet["wake_all"] == quiet["not_present"] == 0 and quiet["faults"] == []
    assert quiet["value"] == apf.VALUE
    assert _count(quiet, "kvm_async_pf_ready") in (None, 0)


def test_retrying_a_page_still_on_its_way_raises_apf_halt(kvm):
    outcome, control = apf.apf_halt(), apf.apf_halt(control=True)
    e = outcome.evidence
    if outcome.verdict == UNREACHABLE:           # the fault was resolved in the vCPU thread: no async PF here
        assert control.verdict == UNREACHABLE and "synchronously" in outcome.why
        assert [f["thread"] for f in e["faults"]] == ["the vCPU thread"] and e["not_present"] == 0
        assert _count(e, "kvm_try_async_get_page") in (None, 0)
        assert e["run_ms"] >= apf.DELAY * 1000 * 0.8 and e["value"] == apf.VALUE
        return
    if not e["traced"]:
        pytest.skip(f"needs trace events: {outcome.why}")
    assert outcome.verdict == OBSERVED and control.verdict == "absent", (outcome.steps, control.steps)
    quiet = control.evidence
    assert e["kvm_async_pf_not_present"] == 1 and e["kvm_async_pf_repeated_fault"] >= 1
    assert e["not_present"] == 1 and e["value"] == apf.VALUE and e["ordinary_pf"] == 0
    assert e["run_ms"] >= apf.DELAY * 1000 * 0.8                          # blocked in the kernel for the page
    assert all(f["thread"] != "the vCPU thread" for f in e["faults"])
    assert quiet["kvm_async_pf_repeated_fault"] == quiet["kvm_async_pf_not_present"] == 0
    assert quiet["not_present"] == 0 and quiet["faults"] == [] and quiet["value"] == apf.VALUE
