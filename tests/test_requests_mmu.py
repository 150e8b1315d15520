"""The MMU request scenarios, each against its control, with the figures they measured.

The generic table test (tests/test_requests.py) checks each verdict; here the
evidence itself is asserted: counter deltas, trace events, what the guest read
through its tables, and for unreachable rows the module parameter that makes
them so, read again here.
"""

from __future__ import annotations

import pytest

from pykvm.requests import NO_EFFECT, OBSERVED, UNREACHABLE
from pykvm.requests.scenarios import mmu


def _traced(outcome):
    if outcome.evidence.get("traced") is False:
        pytest.skip(f"needs trace events: {outcome.why}")
    return outcome.evidence


# ---- reading the paging mode ----------------------------------------------------

def _parameter(root, module, name, value):
    directory = root / module / "parameters"
    directory.mkdir(parents=True)
    (directory / name).write_text(value + "\n")


def test_two_dimensional_paging_reads_the_vendor_parameter(tmp_path):
    assert mmu.two_dimensional_paging(tmp_path) == ""              # kvm_pvm: neither module
    _parameter(tmp_path, "kvm_amd", "npt", "N")
    assert mmu.two_dimensional_paging(tmp_path) == ""              # kvm_amd npt=0: shadow paging
    (tmp_path / "kvm_amd" / "parameters" / "npt").write_text("Y\n")
    assert mmu.two_dimensional_paging(tmp_path) == "kvm_amd npt=Y"
    assert mmu.module_parameter("kvm_intel", "ept", tmp_path) is None


# ---- TLB_FLUSH_CURRENT ----------------------------------------------------------

def test_setting_smep_flushes_the_current_tlb_and_rewriting_cr4_does_not(kvm):
    outcome = mmu.tlb_flush_current()
    if outcome.verdict == UNREACHABLE:
        pytest.skip(outcome.why)
    control = mmu.tlb_flush_current(control=True)
    assert outcome.verdict == OBSERVED and control.verdict == "absent", (outcome.steps, control.steps)
    evidence, quiet = outcome.evidence, control.evidence
    assert not evidence["cr4_before"] & mmu.CR4_SMEP and evidence["cr4_after"] & mmu.CR4_SMEP
    assert evidence["tlb_flush"] >= 1
    assert quiet["cr4_before"] & mmu.CR4_SMEP and quiet["cr4_after"] == quiet["cr4_before"]
    assert quiet["tlb_flush"] == 0


# ---- MMU_SYNC -------------------------------------------------------------------

def test_mmu_sync_resyncs_the_unsync_table_only_after_mov_cr3(kvm):
    outcome = mmu.mmu_sync()
    control = mmu.mmu_sync(control=True)
    if outcome.verdict == UNREACHABLE:
        tdp = mmu.two_dimensional_paging()
        assert tdp and tdp in outcome.why and control.verdict == UNREACHABLE
        return
    evidence, quiet = _traced(outcome), _traced(control)
    assert control.verdict == "absent" and quiet["sync_pages"] == 0
    assert evidence["reads"][0] == mmu.OLD_VALUE and evidence["reads"][2] == mmu.NEW_VALUE
    assert evidence["tlb_flush"] >= 1                     # the MOV CR3 exited and flushed (TLB_FLUSH_CURRENT)
    if outcome.verdict == OBSERVED:                       # shadow pages in hardware (kvm_amd npt=0)
        assert evidence["unsync_pages"] >= 1 and evidence["sync_pages"] >= 1
        assert quiet["unsync_pages"] >= 1 and quiet["mmu_unsync"] == 1        # still unsync without the flush
        assert quiet["reads"] == [mmu.OLD_VALUE] * 3      # the stale translation stays until the guest flushes
    else:                                                 # kvm_pvm: the emulator wrote the PTE, nothing unsync
        assert outcome.verdict == NO_EFFECT
        assert evidence["sync_pages"] == evidence["unsync_pages"] == 0 and evidence["mmu_pte_write"] >= 1
        assert evidence["reads"] == [mmu.OLD_VALUE, mmu.NEW_VALUE, mmu.NEW_VALUE]
        assert quiet["tlb_flush"] == 0


# ---- LOAD_MMU_PGD ---------------------------------------------------------------

def test_cached_roots_are_loaded_without_a_lookup_and_uncached_ones_are_looked_up(kvm):
    outcome = mmu.load_mmu_pgd()
    control = mmu.load_mmu_pgd(control=True)
    if outcome.verdict == UNREACHABLE:
        tdp = mmu.two_dimensional_paging()
        assert tdp and tdp in outcome.why and control.verdict == UNREACHABLE
        return
    evidence, quiet = _traced(outcome), _traced(control)
    assert outcome.verdict == OBSERVED and control.verdict == "absent"
    assert evidence["reads"] == list(mmu.CACHED_SEQUENCE)            # each switch translated through its root
    assert quiet["reads"] == list(mmu.UNCACHED_SEQUENCE)
    assert evidence["root_lookups"] == 1 and evidence["cached_loads"] == mmu.SWITCHES - 1
    assert quiet["root_lookups"] == mmu.SWITCHES and quiet["cached_loads"] == 0


# ---- UPDATE_CPU_DIRTY_LOGGING ---------------------------------------------------

def test_update_cpu_dirty_logging_turns_pml_on_where_kvm_intel_has_it(kvm):
    outcome = mmu.update_cpu_dirty_logging()
    control = mmu.update_cpu_dirty_logging(control=True)
    pml = mmu.module_parameter(*mmu.PML_PARAMETER)
    if pml not in ("Y", "1"):                             # kvm_amd, kvm_pvm, kvm_intel pml=N
        for result in (outcome, control):
            assert result.verdict == UNREACHABLE and "kvm_intel" in result.why and "pml" in result.why
        return
    evidence, quiet = _traced(outcome), _traced(control)
    assert outcome.verdict == OBSERVED and control.verdict == "absent"
    assert evidence["pml_full"] >= 1 and quiet["pml_full"] == 0
    assert evidence["dirty_pages"] == mmu.PML_PAGES      # logged by PML, without a write fault per page
    assert evidence.get("pf_taken", 0) < mmu.PML_PAGES // 2
