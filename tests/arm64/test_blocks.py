"""arm64 stage-2 block mappings (arch/arm64/kvm/mmu.c ``user_mem_abort()``, ``get_vma_page_shift()``,
``fault_supports_stage2_huge_mapping()``, ``transparent_hugepage_adjust()``; v6.12 and v6.13).

The THP tests check the legacy / series difference of patch 56 "KVM: arm64: Use __kvm_faultin_pfn()
to handle memory aborts" (v6.12 moves the fault's reference to the head page under the lock and
releases by the head pfn after the unlock) together with patch 55 "KVM: arm64: Mark "struct page"
pfns accessed/dirty before dropping mmu_lock"."""

from __future__ import annotations

import pytest

from kvmsim.arm64.mmu import (fault_supports_stage2_huge_mapping, get_vma_page_shift,
                              transparent_hugepage_adjust_v612_transfer)
from kvmsim.check import check_all
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.vma import VM, Vma, VmaKind
from kvmsim.types import PAGE_SHIFT, PMD_SHIFT, PMD_SIZE, PUD_SHIFT, PUD_SIZE

from tests.helpers import PAGE, make_vm


def _thp_vm(policy, *, flags=0, size=4 << 20):
    """A THP-backed anonymous VMA (VM_HUGEPAGE) as memslot 0 at gpa 0; the VMM touches page 5 first, so
    the host maps a THP with a PMD."""
    host, kvm, _, _ = make_vm(policy, arch="arm64", size=0)
    vma = host.mm.mmap(size, VmaKind.ANON, thp=True)
    kvm.set_user_memory_region(0, 0, size, vma.start, flags)
    vcpu = kvm.create_vcpu()
    host.mm.host_access(vma.start + 5 * PAGE, True, 1)
    return host, kvm, vma, vcpu


def _leaves(kvm):
    return {lf.gfn: lf for lf in kvm.arch.leaves()}


def _facts(kvm, kind, caller):
    return [f for f in kvm.journal.facts if f.kind == kind and f.caller == caller]


# ---- THP: transparent_hugepage_adjust() -----------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_thp_is_mapped_by_one_pmd_block_at_the_folio_head(policy):
    host, kvm, vma, vcpu = _thp_vm(policy)
    head = int(vma.pte_pfn[0])
    assert int(vma.pte_level[5]) == 2 and host.phys.folio(int(vma.pte_pfn[5])) == head
    assert vcpu.write(5 * PAGE, 7).ok
    (leaf,) = _leaves(kvm).values()
    assert (leaf.gfn, leaf.pfn, leaf.level, leaf.writable) == (0, head, 2, True)
    assert kvm.journal.counters["thp_adjust"] == 1 and kvm.journal.counters["stage2_block_pmd"] == 1
    faults = kvm.journal.counters["page_fault"]
    assert vcpu.read(511 * PAGE).ok and vcpu.read(PAGE).ok           # every subpage through the block
    assert kvm.journal.counters["page_fault"] == faults
    assert host.mm.host_access(vma.start + 5 * PAGE, False) == 7    # the guest wrote the host's page
    assert kvm.host_refs == {}


def test_legacy_transfers_the_reference_to_the_head_under_the_lock_and_releases_the_head_after_unlock():
    """v6.12: ``kvm_release_pfn_clean(pfn); pfn &= ~(PTRS_PER_PMD - 1); get_page(pfn_to_page(pfn));`` under
    the read lock, then after ``read_unlock()`` ``kvm_set_pfn_dirty(pfn)`` and ``kvm_release_pfn_clean(pfn)``
    of the head."""
    host, kvm, vma, vcpu = _thp_vm("legacy")
    head, tail = int(vma.pte_pfn[0]), int(vma.pte_pfn[5])
    refs = host.phys.page_count(head)
    assert vcpu.write(5 * PAGE, 7).ok
    (acc,) = _facts(kvm, "mark_accessed", "transparent_hugepage_adjust")
    (put,) = _facts(kvm, "put", "transparent_hugepage_adjust")
    (get,) = _facts(kvm, "get", "transparent_hugepage_adjust")
    assert (acc.pfn, acc.locked, put.pfn, get.pfn) == (tail, True, tail, head)
    (dirty,) = _facts(kvm, "set_dirty", "user_mem_abort")
    (rel,) = _facts(kvm, "mark_accessed", "kvm_release_pfn_clean")
    assert (dirty.pfn, dirty.locked, rel.pfn, rel.locked) == (head, False, head, False)
    assert _facts(kvm, "set_dirty", "kvm_release_faultin_page") == []
    assert host.phys.page_count(head) == refs and kvm.host_refs == {}
    inv3 = {v.detail for v in check_all(kvm) if v.invariant == "INV-3"}
    assert inv3 == {"user_mem_abort: SetPageDirty after dropping mmu_lock",
                    "kvm_release_pfn_clean: mark_page_accessed after dropping mmu_lock"}


def test_series_releases_the_faulted_in_page_under_the_lock_without_a_transfer():
    """v6.13: ``fault->pfn &= ~(PTRS_PER_PMD - 1)`` only; ``kvm_release_faultin_page(kvm, page, !!ret,
    writable)`` of the page ``__kvm_faultin_pfn()`` returned (the tail: the same folio) before unlocking."""
    host, kvm, vma, vcpu = _thp_vm("series")
    head, tail = int(vma.pte_pfn[0]), int(vma.pte_pfn[5])
    assert vcpu.write(5 * PAGE, 7).ok
    assert kvm.journal.counters["get_page:transparent_hugepage_adjust"] == 0
    assert kvm.journal.counters["mark_accessed:transparent_hugepage_adjust"] == 0
    (dirty,) = _facts(kvm, "set_dirty", "kvm_release_faultin_page")
    (acc,) = _facts(kvm, "mark_accessed", "kvm_release_faultin_page")
    (put,) = _facts(kvm, "put", "kvm_release_faultin_page")
    assert (dirty.pfn, dirty.locked, acc.locked, put.pfn) == (tail, True, True, tail)
    assert _leaves(kvm)[0].pfn == head
    assert _facts(kvm, "set_dirty", "user_mem_abort") == [] and check_all(kvm) == []


def test_the_thp_transfer_is_the_resolved_v612_hook_and_absent_in_v613():
    """A guard against an arch silently taking the other policy's path."""
    assert make_vm("legacy", arch="arm64", size=0).kvm.ops.thp_adjust_refcount is \
        transparent_hugepage_adjust_v612_transfer
    assert make_vm("series", arch="arm64", size=0).kvm.ops.thp_adjust_refcount is None


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_thp_vma_the_host_maps_with_ptes_gets_page_leaves(policy):
    """``get_user_mapping_size()`` < PMD_SIZE: ``transparent_hugepage_adjust()`` returns PAGE_SIZE."""
    host, kvm, _, _ = make_vm(policy, arch="arm64", size=0)
    vma = host.mm.mmap(2 << 20, VmaKind.ANON)                       # no VM_HUGEPAGE: 4 KiB host PTEs
    kvm.set_user_memory_region(0, 0, 2 << 20, vma.start, 0)
    vcpu = kvm.create_vcpu()
    host.mm.host_access(vma.start + 5 * PAGE, True, 1)
    assert vcpu.write(5 * PAGE, 7).ok
    assert [(lf.gfn, lf.level) for lf in kvm.arch.leaves()] == [(5, 1)]
    assert kvm.journal.counters["thp_adjust"] == 0


# ---- dirty logging: no blocks, write-protect and split -------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_no_block_while_logging(policy):
    """``memslot_is_logging()``: ``force_pte = true; vma_shift = PAGE_SHIFT``."""
    host, kvm, vma, vcpu = _thp_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES)
    assert vcpu.write(5 * PAGE, 7).ok
    assert [(lf.gfn, lf.level, lf.writable) for lf in kvm.arch.leaves()] == [(5, 1, True)]
    assert kvm.journal.counters["thp_adjust"] == 0 and kvm.journal.counters["stage2_block_pmd"] == 0


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_logging_write_protects_the_block_and_a_write_fault_splits_it(policy):
    """``kvm_mmu_wp_memory_region()`` write-protects the block; the write permission fault maps PAGE_SIZE
    (``force_pte``, ``vma_pagesize != fault_granule``) and ``kvm_pgtable_stage2_map()`` replaces the block
    with a table holding the one new leaf; the rest faults in lazily, read-only on reads."""
    host, kvm, vma, vcpu = _thp_vm(policy)
    assert vcpu.write(5 * PAGE, 7).ok
    kvm.set_user_memory_region(0, 0, 4 << 20, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    (blk,) = kvm.arch.leaves()
    assert (blk.level, blk.writable) == (2, False)
    faults = kvm.journal.counters["page_fault"]
    assert vcpu.read(7 * PAGE).ok                                    # reads still go through the block
    assert kvm.journal.counters["page_fault"] == faults
    assert vcpu.write(6 * PAGE, 8).ok
    assert [(lf.gfn, lf.level, lf.writable) for lf in kvm.arch.leaves()] == [(6, 1, True)]
    assert kvm.journal.counters["spte_zap"] == 1
    assert vcpu.read(7 * PAGE).ok
    assert [(lf.gfn, lf.level, lf.writable) for lf in kvm.arch.leaves()] == [(6, 1, True), (7, 1, False)]
    slot = kvm.gfn_to_memslot(6)
    assert list(slot.dirty_bitmap.nonzero()[0]) == [6]
    assert not [v for v in check_all(kvm) if v.invariant in ("INV-5", "INV-11")]


# ---- hugetlb and the memslot alignment -----------------------------------------------------------------

@pytest.mark.parametrize("gpa, level", [(1 << 30, 3), ((1 << 30) + (2 << 20), 2), ((1 << 30) + PAGE, 1)])
def test_hugetlb_1g_maps_a_pud_block_only_where_ipa_and_hva_align(gpa, level):
    """``vma_shift = huge_page_shift()``, then the ``switch`` cuts PUD → PMD → PAGE until
    ``fault_supports_stage2_huge_mapping()`` accepts (IPA and hva aligned alike within the block, the
    block inside the memslot)."""
    host, kvm, _, _ = make_vm("series", arch="arm64", size=0)
    vma = host.mm.mmap(2 << 30, VmaKind.HUGETLB, page_size=1 << 30)
    kvm.set_user_memory_region(0, gpa, 1 << 30, vma.start, 0)
    vcpu = kvm.create_vcpu()
    off = 3 << 21
    assert vcpu.write(gpa + off, 1).ok
    (leaf,) = kvm.arch.leaves()
    assert leaf.level == level
    n = {3: 1 << 18, 2: 1 << 9, 1: 1}[level]
    assert leaf.gfn == (gpa + off) >> PAGE_SHIFT & ~(n - 1)
    assert check_all(kvm) == []


def test_fault_supports_stage2_huge_mapping_edges():
    class Slot:
        base_gfn, npages, userspace_addr = 0, 1024, 0x40000000
    assert fault_supports_stage2_huge_mapping(Slot, 0x40000000 + 5 * PAGE, PMD_SIZE)
    assert not fault_supports_stage2_huge_mapping(Slot, 0x40000000 + 5 * PAGE, PUD_SIZE)   # block past the slot
    Slot.base_gfn = 1                                                                     # IPA 4K off the hva
    assert not fault_supports_stage2_huge_mapping(Slot, 0x40000000 + 5 * PAGE, PMD_SIZE)
    assert fault_supports_stage2_huge_mapping(Slot, 0x40000000 + 5 * PAGE, PAGE)


# ---- VM_PFNMAP geometry: get_vma_page_shift() -----------------------------------------------------------

@pytest.mark.parametrize("start, end, pgoff, hva, shift", [
    (1 << 30, 2 << 30, 0, (1 << 30) + 5 * PAGE, PUD_SHIFT),            # pa and hva aligned alike, PUD inside
    (1 << 30, (1 << 30) + (4 << 20), 0, (1 << 30) + 5 * PAGE, PMD_SHIFT),  # the VMA is smaller than a PUD
    (1 << 30, (1 << 30) + (4 << 20), 1, (1 << 30) + 5 * PAGE, PAGE_SHIFT),  # pa one page off the hva
    ((1 << 30) + PAGE, (1 << 30) + (4 << 20), 1, (1 << 30) + (2 << 20), PMD_SHIFT),
    ((1 << 30) + PAGE, (1 << 30) + (2 << 20), 1, (1 << 30) + 5 * PAGE, PAGE_SHIFT),  # block starts before vm_start
])
def test_get_vma_page_shift_of_a_pfnmap(start, end, pgoff, hva, shift):
    vma = Vma(start, end, VM.READ | VM.WRITE | VM.PFNMAP | VM.IO, VmaKind.PFNMAP, pgoff=pgoff)
    assert get_vma_page_shift(vma, hva) == shift


def test_get_vma_page_shift_of_hugetlb_and_normal_vmas():
    assert get_vma_page_shift(Vma(0, 1 << 30, VM.HUGETLB, VmaKind.HUGETLB, page_size=1 << 30), PAGE) == PUD_SHIFT
    assert get_vma_page_shift(Vma(0, 2 << 20, VM.HUGETLB, VmaKind.HUGETLB, page_size=2 << 20), PAGE) == PMD_SHIFT
    assert get_vma_page_shift(Vma(0, 2 << 20, VM.HUGEPAGE, VmaKind.ANON), PAGE) == PAGE_SHIFT   # THP: later


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_device_pfnmap_is_mapped_with_the_block_its_geometry_allows(policy):
    """An MMIO BAR (no struct page, ``kvm_is_device_pfn()``) behind a 2 MiB-aligned VM_PFNMAP VMA: one
    PMD block, no page touched."""
    host, kvm, _, _ = make_vm(policy, arch="arm64", size=0)
    drv = host.add_driver("bar", 512, "no_page")
    vma = host.mm.mmap(2 << 20, VmaKind.PFNMAP, addr=1 << 30, driver=drv)
    kvm.set_user_memory_region(0, 0, 2 << 20, vma.start, 0)
    vcpu = kvm.create_vcpu()
    assert vcpu.read(5 * PAGE).exit == Exit.OK
    (leaf,) = kvm.arch.leaves()
    assert (leaf.gfn, leaf.level, leaf.pfn) == (0, 2, int(drv.pfns[0]))
    assert kvm.journal.counters["stage2_block_pmd"] == 1 and kvm.journal.counters["thp_adjust"] == 0
    assert kvm.host_refs == {} and check_all(kvm) == []


# ---- zap and aging act on whole blocks ------------------------------------------------------------------

def test_an_invalidation_inside_a_block_unmaps_the_whole_block():
    """``stage2_unmap_walker()`` clears the block leaf the range touches; the next access refaults."""
    host, kvm, vma, vcpu = _thp_vm("series")
    assert vcpu.write(5 * PAGE, 7).ok
    slot = kvm.gfn_to_memslot(0)
    kvm.arch.unmap_gfn_range(slot, 5, 6)
    assert list(kvm.arch.leaves()) == []
    assert kvm.arch.age_gfn(slot, 0, 1) is False


def test_aging_a_page_of_a_block_clears_the_access_flag_of_the_whole_block():
    host, kvm, vma, vcpu = _thp_vm("series")
    assert vcpu.write(5 * PAGE, 7).ok
    slot = kvm.gfn_to_memslot(0)
    assert kvm.arch.age_gfn(slot, 300, 301) is True
    assert not kvm.arch.test_age_gfn(slot, 5, 6)
    assert vcpu.read(5 * PAGE).ok                                      # an Access-flag fault makes it young
    assert kvm.journal.counters["access_flag_fault"] == 1 and kvm.arch.test_age_gfn(slot, 511, 512)
