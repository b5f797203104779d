"""Every validator fires when the state or the journal is broken on purpose (and not otherwise)."""

import numpy as np
import pytest

from kvmsim.check import INVARIANTS, Checker, check_all
from kvmsim.kvm.host_map import KvmHostMap
from kvmsim.kvm.pfn import Hold, gfn_to_page
from kvmsim.kvm.stage2 import S2
from kvmsim.mm.vma import VmaKind
from kvmsim.trace import Src

from tests.helpers import make_vm


def _vm(policy="series", kind=VmaKind.ANON_SHARED):
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(8 * 4096, kind)
    kvm.set_user_memory_region(0, 0, 8 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    assert vcpu.write(0x1000, 1).ok
    return host, kvm, vma, vcpu


def _fires(kvm, inv):
    return [v for v in check_all(kvm) if v.invariant == inv]


def test_clean_series_workload_has_no_violations():
    host, kvm, vma, vcpu = _vm()
    for i in range(8):
        assert vcpu.write(i * 4096, i).ok
    host.mm.madvise(vma.start, 4 * 4096, "DONTNEED")
    for i in range(8):
        assert vcpu.read(i * 4096).ok
    assert check_all(kvm) == []


def _pfn(host, vma, i=1):
    return host.mm.pte_of(vma.start + i * 4096)[1]


def test_inv1_remapped_reference():
    host, kvm, vma, _ = _vm()
    host.phys.get_page(_pfn(host, vma), "kvm_try_get_pfn", kvm=True, source=Src.REMAPPED)
    assert _fires(kvm, "INV-1")


def test_inv1_leak():
    host, kvm, vma, _ = _vm()
    kvm.host_refs[(_pfn(host, vma), Hold.GET)] = 1
    assert any("leak" in v.detail for v in _fires(kvm, "INV-1"))


def test_inv2_mark_from_spte():
    host, kvm, vma, _ = _vm()
    host.phys.SetPageDirty(_pfn(host, vma), "handle_changed_spte", kvm=True, source=Src.SPTE)
    assert _fires(kvm, "INV-2")


def test_inv3_mark_after_unlock():
    host, kvm, vma, _ = _vm()
    host.phys.mark_page_accessed(_pfn(host, vma), "kvm_release_faultin_page", kvm=True, source=Src.HELD,
                                 locked=False)
    assert _fires(kvm, "INV-3")


def test_inv4_clean_file_folio_under_writable_spte():
    host, kvm, vma, vcpu = _vm(kind=VmaKind.FILE)
    assert not _fires(kvm, "INV-4")
    host.phys.folio_clear_dirty(_pfn(host, vma))          # writeback without the mmu_notifier
    assert _fires(kvm, "INV-4")


def test_inv5_stale_spte():
    host, kvm, vma, _ = _vm()
    vma.pte_pfn[1] = host.phys.alloc()                    # host remaps without notifying KVM
    assert _fires(kvm, "INV-5")


def test_inv5_spte_in_open_invalidation():
    host, kvm, vma, _ = _vm()
    kvm.mmu_invalidate_begin()
    kvm.mmu_invalidate_range_add(0, 8)
    assert _fires(kvm, "INV-5")


def test_inv6_unpinned_map_outlives_mapping():
    host, kvm, vma, vcpu = _vm()
    pfn = _pfn(host, vma)
    kvm.host_maps.append(KvmHostMap(vcpu, 1, pfn, vma.start + 4096, True, None, pfn, Hold.GET, False))
    assert not _fires(kvm, "INV-6")
    vma.pte[1] = 0
    assert _fires(kvm, "INV-6")


def test_inv7_unused_page_aged():
    host, kvm, vma, _ = _vm()
    host.phys.mark_page_accessed(_pfn(host, vma), "kvm_faultin_pfn", kvm=True, source=Src.GUESS, unused=True)
    assert _fires(kvm, "INV-7")


def test_inv8_gfn_to_page_pfnmap_under_legacy():
    host, kvm, _, _ = make_vm("legacy")
    drv = host.add_driver("d", 2, "driver_refcounted")
    vma = host.mm.mmap(2 * 4096, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(0, 0, 2 * 4096, vma.start)
    assert gfn_to_page(kvm, 0) is not None
    assert _fires(kvm, "INV-8")
    host2, kvm2, _, _ = make_vm("series")
    drv2 = host2.add_driver("d", 2, "driver_refcounted")
    vma2 = host2.mm.mmap(2 * 4096, VmaKind.PFNMAP, driver=drv2)
    kvm2.set_user_memory_region(0, 0, 2 * 4096, vma2.start)
    assert gfn_to_page(kvm2, 0) is None
    assert not _fires(kvm2, "INV-8")


def test_inv9_reserved_page_dirtied():
    host, kvm, vma, _ = _vm()
    host.phys.SetPageDirty(host.phys.zero_pfn, "kvm_release_page_dirty", kvm=True, source=Src.HELD, locked=True)
    assert _fires(kvm, "INV-9")


def test_inv10_writable_spte_in_readonly_slot():
    host, kvm, vma, _ = _vm()
    kvm.gfn_to_memslot(1).flags |= 2                       # KVM_MEM_READONLY behind KVM's back
    assert _fires(kvm, "INV-10")


def test_inv11_malformed_spte():
    host, kvm, vma, _ = _vm()
    slot = kvm.gfn_to_memslot(1)
    slot.arch["s2"][1] &= ~np.uint8(int(S2.HOST_W))
    assert _fires(kvm, "INV-11")


def test_inv12_accessed_from_spte():
    host, kvm, vma, _ = _vm()
    host.phys.mark_page_accessed(_pfn(host, vma), "kvm_unmap_gfn_range", kvm=True, source=Src.SPTE)
    assert _fires(kvm, "INV-12")


def test_every_invariant_has_a_negative_test():
    names = {n for n in globals() if n.startswith("test_inv")}
    for inv in INVARIANTS:
        assert any(n.startswith(f"test_{inv.lower().replace('-', '')}_") for n in names), inv


def test_checker_reports_once_with_step():
    host, kvm, vma, _ = _vm()
    ck = Checker(kvm)
    host.journal.step = 7
    host.phys.SetPageDirty(_pfn(host, vma), "handle_changed_spte", kvm=True, source=Src.SPTE)
    first = ck.run()
    assert [v.step for v in first] == [7]
    assert ck.run() == []
