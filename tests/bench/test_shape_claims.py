"""The performance claims of spec §5, reproduced as COUNTS on the dirty_log_perf_test flow (never times).

* legacy marks every 4 KiB piece of a 2 MiB / 1 GiB folio dirty when zapping collapsible SPTEs on
  disabling dirty logging (claims 2, 3; "Mark folio dirty when creating SPTE, not when
  zapping/modifying"); the series marks none;
* legacy's KVM_CLEAR_DIRTY_LOG does struct-page work (``kvm_set_pfn_dirty`` per cleared D bit); the
  series none (claim 1);
* [6.13-other] disabling dirty logging flushes once per huge region when zapping collapsible SPTEs,
  once per slot when recovering huge pages in place (claim 7), and in-place recovery removes the
  faults that re-create the huge mappings (claim 8).
"""

import pytest

from kvmsim.bench.dirty_log_perf import Options, run_model

MB = 1 << 20


def run(policy, backing="anonymous_hugetlb_2mb", vcpus=2, per=16 * MB, **kw):
    return run_model(Options(vcpu_memory=per, vcpus=vcpus, backing=backing, run_while_disabling=True, **kw), policy)


@pytest.mark.parametrize("backing,per,folio_pages", [("anonymous_hugetlb_2mb", 16 * MB, 512),
                                                     ("anonymous_hugetlb_1gb", 1 << 30, 512 * 512)])
def test_disable_marks_every_4k_piece_dirty_under_legacy_only(backing, per, folio_pages):
    npages = per // 4096
    legacy = run("legacy", backing, vcpus=1, per=per).phase("disable").summary()
    series = run("series", backing, vcpus=1, per=per).phase("disable").summary()
    assert legacy["set_dirty"] == npages                  # 512 per 2M folio, 512*512 per 1G folio
    assert legacy["set_dirty"] % folio_pages == 0
    assert series["set_dirty"] == 0 and series["mark_accessed"] == 0


@pytest.mark.parametrize("manual", [True, False])
def test_clear_dirty_log_struct_page_work_is_legacy_only(manual):
    for it in (1, 2):
        phase = "clear" if manual else "get"
        legacy = run("legacy", "anonymous", manual_protect=manual).phase(phase, it).summary()
        series = run("series", "anonymous", manual_protect=manual).phase(phase, it).summary()
        assert legacy["set_dirty"] == 2 * 16 * MB // 4096     # every page was dirtied and re-armed
        assert series["set_dirty"] == series["mark_accessed"] == 0
        assert legacy["spte_write"] == series["spte_write"] > 0


def test_disable_flushes_once_per_huge_region_or_once_per_slot():
    regions = 2 * 16 * MB // (2 * MB)
    for policy in ("legacy", "series"):
        zap = run(policy).phase("disable").summary()
        assert zap["tlb_flush"] == regions
        rec = run(policy, v613_other=True, slots=2).phase("disable").summary()
        assert rec["tlb_flush"] == 2                          # one batched flush per memslot


def test_in_place_recovery_removes_the_refaults():
    regions = 2 * 16 * MB // (2 * MB)
    zap = run("series")
    rec = run("series", v613_other=True)
    assert zap.phase("after-disable", 4).summary()["page_fault"] == regions
    assert rec.phase("after-disable", 4).summary()["page_fault"] == 0
    assert zap.stats == rec.stats == {"pages_4k": 0, "pages_2m": regions, "pages_1g": 0}


def test_4k_backing_has_nothing_to_collapse():
    r = run("legacy", "anonymous")
    assert r.phase("disable").summary()["tlb_flush"] == 0
    assert r.stats["pages_2m"] == 0
