"""RISC-V G-stage block leaves (arch/riscv/kvm/mmu.c ``kvm_riscv_gstage_map()``, ``gstage_set_pte()``,
``gstage_wp_range()``, ``gstage_unmap_range()``, ``kvm_age_gfn()``; v6.12 and v6.13).

The dirty-logging test checks the legacy / series difference at a block's ``-EEXIST``: patch 57
"KVM: RISC-V: Mark "struct page" pfns dirty iff a stage-2 PTE is installed", patch 58 "KVM: RISC-V:
Mark "struct page" pfns accessed before dropping mmu_lock" and patch 59 "KVM: RISC-V: Use
kvm_faultin_pfn() when mapping pfns into the guest"."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from kvmsim.check import check_all
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.vma import VmaKind

from tests.helpers import PAGE, make_vm


def _hugetlb_vm(policy, *, page_size=2 << 20, size=4 << 20, flags=0):
    return make_vm(policy, arch="riscv", size=size, kind=VmaKind.HUGETLB, page_size=page_size, flags=flags)


def _leaves(kvm):
    return [(lf.gfn, lf.level, lf.writable) for lf in kvm.arch.leaves()]


def _facts(kvm, kind, caller):
    return [f for f in kvm.journal.facts if f.kind == kind and f.caller == caller]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_hugetlb_2m_page_is_one_pmd_leaf(policy):
    """``vma_pageshift = huge_page_shift(hstate_vma(vma))``; ``gfn`` aligned down to the huge page; the
    leaf's pfn is that of the aligned gfn (the folio head)."""
    host, kvm, vma, vcpu = _hugetlb_vm(policy)
    assert vcpu.write((512 + 5) * PAGE, 7).ok
    (leaf,) = kvm.arch.leaves()
    assert (leaf.gfn, leaf.level, leaf.writable) == (512, 2, True)
    assert leaf.pfn == host.phys.folio(int(vma.pte_pfn[512 + 5]))
    faults = kvm.journal.counters["page_fault"]
    assert vcpu.read(1023 * PAGE).ok and kvm.journal.counters["page_fault"] == faults
    assert kvm.host_refs == {} and not [v for v in check_all(kvm) if v.invariant != "INV-3"]


def test_a_hugetlb_1g_page_is_one_pud_leaf():
    host, kvm, vma, vcpu = _hugetlb_vm("series", page_size=1 << 30, size=1 << 30)
    assert vcpu.write(300 * PAGE, 7).ok
    assert _leaves(kvm) == [(0, 3, True)] and kvm.journal.counters["gstage_block_pud"] == 1
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_no_thp_blocks_on_riscv(policy):
    """v6.12 / v6.13 ``kvm_riscv_gstage_map()`` has no ``transparent_hugepage_adjust()``: a THP the host maps
    with a PMD is mapped 4 KiB at a time."""
    host, kvm, _, _ = make_vm(policy, arch="riscv", size=0)
    vma = host.mm.mmap(2 << 20, VmaKind.ANON, thp=True)
    kvm.set_user_memory_region(0, 0, 2 << 20, vma.start, 0)
    vcpu = kvm.create_vcpu()
    host.mm.host_access(vma.start + 5 * PAGE, True, 1)
    assert int(vma.pte_level[5]) == 2
    assert vcpu.write(5 * PAGE, 7).ok and vcpu.read(6 * PAGE).ok
    assert _leaves(kvm) == [(5, 1, True), (6, 1, True)]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_logging_forces_page_size(policy):
    """``if (logging || (vma->vm_flags & VM_PFNMAP)) vma_pagesize = PAGE_SIZE;``"""
    host, kvm, vma, vcpu = _hugetlb_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES)
    assert vcpu.write(5 * PAGE, 7).ok and vcpu.read(6 * PAGE).ok
    assert _leaves(kvm) == [(5, 1, True), (6, 1, False)]


def _block_then_logging(policy):
    host, kvm, vma, vcpu = _hugetlb_vm(policy)
    assert vcpu.write(5 * PAGE, 7).ok
    kvm.set_user_memory_region(0, 0, 4 << 20, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    assert _leaves(kvm) == [(0, 2, False)]                    # gstage_wp_memory_region(): the block whole
    before = len(kvm.journal.facts)
    acc = vcpu.write(6 * PAGE, 8)
    return kvm, acc, kvm.journal.facts[before:]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_store_to_a_write_protected_block_under_logging_is_eexist_to_kvm_run(policy):
    """Logging maps PAGE_SIZE; ``gstage_set_pte()`` meets the block leaf above level 0: ``-EEXIST``, which
    ``gstage_page_fault()`` returns to KVM_RUN.  Nothing splits the block in either version."""
    kvm, acc, _ = _block_then_logging(policy)
    assert (acc.exit, acc.errno) == (Exit.EFAULT, errno.EEXIST)
    assert _leaves(kvm) == [(0, 2, False)]
    assert kvm.journal.counters["kvm_err:Failed to map in G-stage"] == 1
    assert kvm.gfn_to_memslot(6).dirty_bitmap[6]               # mark_page_dirty() came before the map
    assert kvm.host_refs == {}


def test_legacy_dirties_before_the_failed_map_and_marks_accessed_after_the_unlock():
    """v6.12: ``kvm_set_pfn_dirty(hfn)`` under the lock before ``gstage_map_page()`` returns -EEXIST, then
    ``kvm_set_pfn_accessed(hfn)`` and ``kvm_release_pfn_clean(hfn)`` after ``spin_unlock()``."""
    kvm, acc, facts = _block_then_logging("legacy")
    dirty = [f for f in facts if f.kind == "set_dirty"]
    acc_ = [f for f in facts if f.kind == "mark_accessed"]
    assert [(f.caller, f.locked) for f in dirty] == [("kvm_riscv_gstage_map", True)]
    assert [(f.caller, f.locked) for f in acc_] == [("kvm_riscv_gstage_map", False), ("kvm_release_pfn_clean", False)]
    assert not [f for f in facts if f.caller == "kvm_release_faultin_page"]


def test_series_counts_the_eexist_as_used_and_releases_dirty_under_the_lock():
    """v6.13: ``kvm_release_faultin_page(kvm, page, ret && ret != -EEXIST, writable)`` before unlocking."""
    kvm, acc, facts = _block_then_logging("series")
    marks = [(f.kind, f.caller, f.locked) for f in facts if f.kind in ("set_dirty", "mark_accessed")]
    assert marks == [("set_dirty", "kvm_release_faultin_page", True),
                     ("mark_accessed", "kvm_release_faultin_page", True)]
    assert not [f for f in facts if f.caller in ("kvm_riscv_gstage_map", "kvm_release_pfn_clean")]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_read_under_logging_still_goes_through_the_block(policy):
    kvm, _, _ = _block_then_logging(policy)
    faults = kvm.journal.counters["page_fault"]
    host_vcpu = kvm.vcpus[0]
    assert host_vcpu.read(300 * PAGE).ok and kvm.journal.counters["page_fault"] == faults


# ---- ranges inside a block -------------------------------------------------------------------------------

def test_gstage_wp_range_and_unmap_range_skip_a_block_the_range_does_not_cover():
    """``if (!(addr & (page_size - 1)) && ((end - addr) >= page_size)) gstage_op_pte(...)``: a 64-page
    dirty-log mask or a 4 KiB invalidation inside a block leaves it as it is; the whole block is acted on."""
    host, kvm, vma, vcpu = _hugetlb_vm("series")
    assert vcpu.write(5 * PAGE, 7).ok
    slot = kvm.gfn_to_memslot(0)
    kvm.arch.enable_log_dirty_pt_masked(slot, 0, np.ones(64, dtype=bool))
    assert _leaves(kvm) == [(0, 2, True)]
    kvm.arch.unmap_gfn_range(slot, 5, 6)
    assert _leaves(kvm) == [(0, 2, True)]
    kvm.arch.unmap_gfn_range(slot, 0, 512)
    assert _leaves(kvm) == []


def test_kvm_age_gfn_ages_the_block_at_range_start():
    host, kvm, vma, vcpu = _hugetlb_vm("series")
    assert vcpu.write(5 * PAGE, 7).ok
    slot = kvm.gfn_to_memslot(0)
    assert kvm.arch.age_gfn(slot, 0, 512) is True
    assert kvm.arch.test_age_gfn(slot, 511, 512) is False
    assert kvm.journal.counters["WARN_ON:kvm_age_gfn"] == 0
