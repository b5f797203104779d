"""Each row of the model-counter → kernel-function table (docs/oracle.md, model_side.py), on the model
alone: a model action whose kernel counterpart is known (and measured by the oracle) gives the count."""

from __future__ import annotations

import pytest

from kvmsim.uapi import KVM_MEM
from kvmsim.backend.base import Madv, MappingKind, page_gpas, update_memory_region_flags
from kvmsim.backend.oracle.cases import GPA
from kvmsim.backend.oracle.model_side import ModelKprobes, ModelSide


def _side(policy: str, kind=MappingKind.ANON_SHARED, npages: int = 32, flags=KVM_MEM(0)):
    s = ModelSide(policy)
    s.begin()
    with s.phase("map"):
        m = s.map(kind, npages * 4096)
        assert s.slot(m, flags=flags) == 0
    return s, m, page_gpas(GPA, npages)


def _calls(s, name):
    return s.phases[-1].counts[name]


def test_legacy_first_write_releases_by_pfn_clean():
    s, m, gpas = _side("legacy")
    with s.phase("write"):
        s.write(gpas, 1)
    c = s.phases[-1].counts
    assert (c["kvm_release_pfn_clean"], c["kvm_release_page_clean"], c["kvm_release_page_dirty"]) == (32, 32, 0)
    assert c["mark_page_accessed"] == 64             # kvm_release_page_clean + follow_page_pte FOLL_TOUCH
    assert (c["pages_4k"], c["pf_taken"]) == (32, 32)
    s.end()


def test_series_first_write_releases_dirty_and_the_clean_call_is_inlined():
    s, m, gpas = _side("series")
    with s.phase("write"):
        s.write(gpas, 1)
    c = s.phases[-1].counts
    assert (c["kvm_release_page_dirty"], c["kvm_release_page_clean"]) == (32, 0)
    assert c["kvm_release_page_unused"] is None      # a static inline since the series: not probeable
    assert c["kvm_release_pfn_clean"] == 0 and c["kvm_set_pfn_dirty"] == 0
    assert c["mark_page_accessed"] == 32             # KVM's only: v6.13 GUP calls folio_mark_accessed
    s.end()


def test_series_read_of_the_zero_page_is_a_clean_release():
    s, m, gpas = _side("series", MappingKind.ANON_PRIVATE)
    with s.phase("read"):
        s.read(gpas)
    c = s.phases[-1].counts
    assert (c["kvm_release_page_clean"], c["kvm_release_page_dirty"]) == (32, 0)
    s.end()


@pytest.mark.parametrize("policy, dirty, accessed", [("legacy", 32, 32), ("series", 0, 0)])
def test_zap_marks_kvm_set_pfn_dirty_and_accessed_only_under_legacy(policy, dirty, accessed):
    s, m, gpas = _side(policy, MappingKind.ANON_PRIVATE)
    with s.phase("write"):
        s.write(gpas, 1)
    with s.phase("MADV_DONTNEED"):
        assert s.b.host_madvise(m, Madv.MADV_DONTNEED).errno == 0
    c = s.phases[-1].counts
    assert (c["kvm_set_pfn_dirty"], c["kvm_set_pfn_accessed"], c["pages_4k"]) == (dirty, accessed, -32)
    s.end()


@pytest.mark.parametrize("policy, dirty", [("legacy", 32), ("series", 0)])
def test_get_dirty_log_write_protection_marks_dirty_only_under_legacy(policy, dirty):
    s, m, gpas = _side(policy, flags=KVM_MEM.LOG_DIRTY_PAGES)
    with s.phase("write"):
        s.write(gpas, 1)
    with s.phase("GET"):
        assert len(s.b.get_dirty_log(1).dirty) == 32
    assert _calls(s, "kvm_set_pfn_dirty") == dirty
    with s.phase("write again"):
        s.write(gpas, 2)
    c = s.phases[-1].counts
    assert (c["pf_taken"], c["pf_fast"]) == (32, 32)          # write-protected: fast path fixes each
    s.end()


def test_pre_fault_does_not_count_pf_taken():
    s, m, gpas = _side("series")
    with s.phase("pre-fault"):
        assert s.pre_fault(GPA, 32 * 4096) == 0
    c = s.phases[-1].counts
    assert (c["pf_taken"], c["pages_4k"]) == (0, 32)
    assert s.pre_fault(3 * GPA, 4096) == 2                     # ENOENT outside every memslot
    s.end()


def test_v613_model_recovers_huge_pages_in_place():
    got = {}
    for policy in ("legacy", "series"):
        s, m, _ = _side(policy, MappingKind.HUGETLB_2M, npages=512)
        with s.phase("touch"):
            s.write([GPA], 1)
        with s.phase("log on"):
            update_memory_region_flags(s.b, 1, KVM_MEM.LOG_DIRTY_PAGES)
        with s.phase("log off"):
            update_memory_region_flags(s.b, 1, KVM_MEM(0))
        got[policy] = s.phases[-1].counts["pages_2m"]
        s.end()
    assert got == {"legacy": 0, "series": 1}


def test_model_kprobes_are_removed_after_the_case():
    import kvmsim.kvm.pfn as pfn
    import kvmsim.policies.series as series
    before = (pfn.kvm_release_page_dirty, series.kvm_release_page_dirty)
    with ModelKprobes("series") as kp:
        assert pfn.kvm_release_page_dirty is not before[0]
        assert series.kvm_release_page_dirty.__wrapped__ is before[1]
    assert (pfn.kvm_release_page_dirty, series.kvm_release_page_dirty) == before
    assert kp.calls == {}
