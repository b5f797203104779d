"""Legacy pushes SPTE A/D bits to folios; the series marks dirty once at SPTE creation."""

import numpy as np

from kvmsim.kvm.dirty import kvm_get_dirty_log
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.reclaim import folio_referenced
from kvmsim.mm.vma import VmaKind
from kvmsim.trace import Src
from tests.helpers import make_vm
from tests.x86.conftest import LOG


def spte_facts(h, kind=None):
    return [f for f in h.journal.facts if f.source == Src.SPTE and (kind is None or f.kind == kind)]


def test_spte_sourced_struct_page_ops_only_under_legacy(policy):
    h, kvm, vma, v = make_vm(policy, size=1 << 20, kind=VmaKind.ANON, page_size=4096, arch="x86")
    for g in range(16):
        assert v.write(g << 12, g).ok
    kvm.set_user_memory_region(0, 0, 1 << 20, vma.start, LOG)           # clear D / wrprot
    kvm_get_dirty_log(kvm, 0)
    kvm.notifier.clear_flush_young(vma.start, vma.end)                  # aging
    assert v.read(0).ok                                                  # young again before the zap
    h.mm.munmap(vma.start, 1 << 20)                                      # zap
    facts = spte_facts(h)
    if policy == "legacy":
        assert {f.kind for f in facts} == {"set_dirty", "mark_accessed"}
        assert {f.caller for f in facts} >= {"kvm_unmap_gfn_range"}
    else:
        assert facts == []
        creations = [f for f in h.journal.facts if f.kind == "set_dirty" and f.caller == "kvm_release_faultin_page"]
        assert len(creations) == 16


def test_dirty_count_at_disable_2m(policy):
    h, kvm, vma, v = make_vm(policy, size=2 << 20, flags=LOG, arch="x86")
    kvm.arch.populate(v, 0, 512, True)
    assert kvm.arch.stats()["pages_4k"] == 512
    head = h.phys.folio(int(kvm.memslots[0].by_id[0].arch["x86"].pfn[0]))
    n0 = len(h.journal.facts)
    kvm.set_user_memory_region(0, 0, 2 << 20, vma.start, 0)
    dirt = [f for f in h.journal.facts[n0:] if f.kind == "set_dirty" and h.phys.folio(f.pfn) == head]
    assert len(dirt) == (512 if policy == "legacy" else 0)


def test_dirty_count_at_disable_1g(policy):
    h, kvm, vma, v = make_vm(policy, size=1 << 30, page_size=1 << 30, flags=LOG, recording=False, arch="x86")
    kvm.arch.populate(v, 0, 1 << 18, True)
    assert kvm.arch.stats() == {"pages_4k": 262144, "pages_2m": 0, "pages_1g": 0}
    before = kvm.journal.snapshot()
    kvm.set_user_memory_region(0, 0, 1 << 30, vma.start, 0)
    d = kvm.journal.since(before)
    sets = sum(c for k, c in d.items() if k.startswith("set_dirty:"))
    assert sets == (512 * 512 if policy == "legacy" else 0)
    assert h.phys.folio_test_dirty(int(vma.pte_pfn[0]))                  # series: dirtied at creation


def test_accessed_survives_zap_only_under_legacy(policy):
    h, kvm, vma, v = make_vm(policy, size=64 << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    assert v.write(0, 7).ok
    pfn = int(vma.pte_pfn[0])
    vma.pte[0] &= ~np.uint8(4)                                           # host young bit cleared (Pte.YOUNG)
    h.phys.folio_test_clear_referenced(pfn)
    slot = kvm.memslots[0].by_id[0]
    kvm.mmu_lock.write_lock()
    kvm.arch.unmap_gfn_range(slot, 0, 1)                                  # an invalidation zaps the SPTE
    kvm.mmu_lock.write_unlock()
    assert folio_referenced(h.mm, pfn) == (policy == "legacy")


def test_aging_reports_young_and_clears_a(policy):
    h, kvm, vma, v = make_vm(policy, size=64 << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    assert v.read(0).ok
    assert kvm.notifier.test_young(vma.start)
    assert kvm.notifier.clear_young(vma.start, vma.start + 4096)
    assert not kvm.notifier.test_young(vma.start)
    assert v.read(0).ok and kvm.notifier.test_young(vma.start)


def test_ad_disabled_aging_marks_dirty_only_under_legacy(policy):
    h, kvm, vma, v = make_vm(policy, size=64 << 12, kind=VmaKind.ANON, page_size=4096, ad_enabled=False, arch="x86")
    assert v.write(0, 1).ok
    n0 = len(h.journal.facts)
    assert kvm.notifier.clear_young(vma.start, vma.start + 4096)
    dirt = [f for f in h.journal.facts[n0:] if f.kind == "set_dirty" and f.source == Src.SPTE]
    assert len(dirt) == (1 if policy == "legacy" else 0)
    before = kvm.journal.snapshot()
    assert v.write(0, 2).ok                                               # access-tracked → fast fault
    assert kvm.journal.since(before).get("fast_page_fault") == 1


def test_flush_on_age_elided_with_613_other():
    for other, flushes in ((False, 1), (True, 0)):
        h, kvm, vma, v = make_vm("series", size=64 << 12, kind=VmaKind.ANON, page_size=4096, v613_other=other, arch="x86")
        assert v.read(0).ok
        before = kvm.journal.snapshot()
        assert kvm.notifier.clear_flush_young(vma.start, vma.end)
        assert kvm.journal.since(before).get("tlb_flush", 0) == flushes


def test_mmio_and_readonly():
    h, kvm, vma, v = make_vm("series", size=64 << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    assert v.read(1 << 30).exit == Exit.MMIO
    before = kvm.journal.snapshot()
    assert v.read(1 << 30).exit == Exit.MMIO
    assert kvm.journal.since(before).get("mmio") == 1
    assert kvm.arch.mmio_sptes                                            # cached with the generation
    vma2 = h.mm.mmap(64 << 12, VmaKind.ANON)
    kvm.set_user_memory_region(1, 1 << 30, 64 << 12, vma2.start, 2)       # READONLY slot
    assert kvm.arch.mmio_sptes[1 << 18] != kvm.memslots[0].generation    # generation changed → stale
    assert v.read(1 << 30).ok
    assert v.write(1 << 30, 1).exit == Exit.MMIO
