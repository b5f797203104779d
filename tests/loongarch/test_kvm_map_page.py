"""LoongArch ``kvm_map_page()`` / ``kvm_map_page_fast()`` (arch/loongarch/kvm/mmu.c) under v6.12 and v6.13.

Each test names the kernel line it checks.  v6.12 lines are the "-" side of the v13 series patches
65 "KVM: LoongArch: Mark "struct page" pfns dirty only in "slow" page fault path", 66 "KVM: LoongArch:
Mark "struct page" pfns accessed only in "slow" page fault path", 67 "KVM: LoongArch: Mark "struct page"
pfn accessed before dropping mmu_lock"; v6.13 lines the "+" side of 68 "KVM: LoongArch: Use
kvm_faultin_pfn() to map pfns into the guest".
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from kvmsim.check import check_all
from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.dirty import KVM_DIRTY_LOG_INITIALLY_SET
from kvmsim.kvm.arch import make_arch
from kvmsim.kvm.fault import FaultRet, release_faultin_page_locked
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.vcpu import Exit
from kvmsim.loongarch import LoongArchMmu
from kvmsim.loongarch.mmu import KVM_MEM_HUGEPAGE, kvm_map_page_v612_after_unlock
from kvmsim.mm.vma import VmaKind
from kvmsim.policies import resolve
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.policies.series import SeriesPolicy
from kvmsim.sched import run_interleaved
from kvmsim.trace import Src

from tests.helpers import PAGE, make_vm


def _facts(kvm, kind, caller):
    return [f for f in kvm.journal.facts if f.kind == kind and f.caller == caller]


def _invs(kvm):
    return sorted({v.invariant for v in check_all(kvm)})


def _leaf(kvm, gfn=0):
    return {lf.gfn: lf for lf in kvm.arch.leaves()}.get(gfn)


def _marks(kvm):
    return {k: v for k, v in kvm.journal.counters.items() if v
            and k.startswith(("set_dirty:kvm", "mark_accessed:kvm", "put_page:kvm", "get_page:kvm"))}


def _vm(policy, **kw):
    """A LoongArch VM over one file page the host has written (its host PTE is writable)."""
    host, kvm, vma, vcpu = make_vm(policy, arch="loongarch", **kw)
    host.mm.host_access(vma.start, True, 1)
    return host, kvm, vma, vcpu


def _fast_until_unlock(kvm, vcpu, write):
    """Run ``kvm_map_page_fast()`` up to its ``spin_unlock()``; return the rest as a generator."""
    gen = kvm.arch.kvm_map_page_fast.steps(vcpu, 0, write)
    while next(gen) != "kvm_map_page_fast: spin_unlock(mmu_lock)":
        pass
    return gen


def _finish(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_loongarch_is_an_arch_and_listed_in_the_error():
    _, kvm, _, _ = make_vm("series", arch="loongarch")
    assert isinstance(kvm.arch, LoongArchMmu) and kvm.arch.family == "loongarch"
    with pytest.raises(UsageError, match="loongarch"):
        make_arch(kvm, "sparc")


# ---- the resolved seam: each policy takes its own path ----------------------------------------------------

def test_legacy_resolves_the_v612_loongarch_release_and_the_series_the_common_one():
    legacy, series = resolve(LegacyPolicy(), "loongarch"), resolve(SeriesPolicy(), "loongarch")
    assert legacy.fault_release_unlocked is kvm_map_page_v612_after_unlock and legacy.fault_release_locked is None
    assert series.fault_release_locked is release_faultin_page_locked and series.fault_release_unlocked is None
    assert legacy.fault_dirty_before_map is None and series.fault_dirty_before_map is None
    _, kvm, _, _ = make_vm("series", arch="loongarch")
    assert series.fast_path_get_page(kvm, 1, "x") is None
    assert LegacyPolicy.fast_path_get_page.__doc__ and "kvm_map_page_fast" in LegacyPolicy.fast_path_get_page.__doc__


# ---- slow path (patches 65, 67, 68) --------------------------------------------------------------------------

def test_legacy_write_fault_dirties_and_releases_after_unlock():
    """v6.12: ``spin_unlock(); if (prot_bits & _PAGE_DIRTY) { mark_page_dirty_in_slot(); kvm_set_pfn_dirty(pfn); }
    kvm_release_pfn_clean(pfn);``"""
    _, kvm, _, vcpu = _vm("legacy")
    assert vcpu.write(0, 7).ok
    assert _marks(kvm) == {"set_dirty:kvm_map_page": 1, "mark_accessed:kvm_release_pfn_clean": 1,
                           "put_page:kvm_release_pfn_clean": 1}
    (dirty,) = _facts(kvm, "set_dirty", "kvm_map_page")
    (acc,) = _facts(kvm, "mark_accessed", "kvm_release_pfn_clean")
    (pte,) = _facts(kvm, "spte_set", "kvm_set_pte")
    assert not dirty.locked and not acc.locked and pte.locked and dirty.source == Src.HELD
    assert dirty.by_fault_release and acc.by_fault_release
    assert kvm.journal.facts.index(pte) < kvm.journal.facts.index(dirty)
    inv3 = sorted(v.detail for v in check_all(kvm) if v.invariant == "INV-3")
    assert inv3 == ["kvm_map_page: SetPageDirty after dropping mmu_lock",
                    "kvm_release_pfn_clean: mark_page_accessed after dropping mmu_lock"]
    lf = _leaf(kvm)
    assert lf.writable and lf.dirty and not lf.accessed       # prot_bits has no _PAGE_ACCESSED


def test_series_write_fault_releases_dirty_under_the_lock():
    """v6.13: ``kvm_release_faultin_page(kvm, page, false, writeable); spin_unlock();``"""
    _, kvm, _, vcpu = _vm("series")
    assert vcpu.write(0, 7).ok
    assert _marks(kvm) == {"set_dirty:kvm_release_faultin_page": 1, "mark_accessed:kvm_release_faultin_page": 1,
                           "put_page:kvm_release_faultin_page": 1}
    assert all(f.locked for k in ("set_dirty", "mark_accessed") for f in _facts(kvm, k, "kvm_release_faultin_page"))
    assert _invs(kvm) == [] and kvm.host_refs == {}


@pytest.mark.parametrize("policy,dirtied", [("legacy", 0), ("series", 1)])
def test_a_read_fault_on_a_host_writable_page_dirties_the_folio_only_in_the_series(policy, dirtied):
    """v6.12 dirtied only ``if (prot_bits & _PAGE_DIRTY)``, i.e. on a write fault; v6.13 passes
    ``writeable`` as ``dirty`` (patch 68), so a read fault on a host-writable page dirties the folio.
    The leaf is the same: ``_PAGE_WRITE`` without ``_PAGE_DIRTY``."""
    host, kvm, vma, vcpu = _vm(policy)
    pfn = host.mm.pte_of(vma.start)[1]
    host.phys.folio_clear_dirty(pfn)
    assert vcpu.read(0).value == 1
    assert kvm.journal.counters.get("set_dirty:kvm_release_faultin_page", 0) == dirtied
    assert kvm.journal.counters.get("set_dirty:kvm_map_page", 0) == 0
    assert host.phys.folio_test_dirty(pfn) == bool(dirtied)
    lf = _leaf(kvm)
    assert lf.host_writable and not lf.dirty


def _retry(policy):
    """The vCPU resolves the pfn, munmap runs, then ``mmu_invalidate_retry_gfn()`` fires under the lock."""
    host, kvm, vma, vcpu = make_vm(policy, arch="loongarch", kind=VmaKind.ANON)
    host.mm.host_access(vma.start, True, 1)
    res = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, True),
                           "host": host.mm.munmap.steps(vma.start, PAGE)},
                          ["vcpu"] * 3 + ["host"] * 7, sched=kvm.sched)
    assert res["vcpu"] == FaultRet.RETRY and kvm.journal.counters["fault_retry"] == 1
    assert _leaf(kvm) is None and kvm.host_refs == {}
    return kvm


def test_legacy_retry_marks_the_unused_page_accessed():
    """v6.12: ``spin_unlock(); kvm_release_pfn_clean(pfn); goto retry;`` (INV-7)."""
    kvm = _retry("legacy")
    assert _marks(kvm) == {"mark_accessed:kvm_release_pfn_clean": 1, "put_page:kvm_release_pfn_clean": 1}
    assert _invs(kvm) == ["INV-7"]


def test_series_retry_is_put_only():
    """v6.13: ``kvm_release_page_unused(page)`` (patch 68)."""
    kvm = _retry("series")
    assert _marks(kvm) == {"put_page:kvm_release_faultin_page": 1}
    assert _invs(kvm) == []


def test_an_error_pfn_is_emulated_as_mmio():
    """``kvm_map_page()`` returns -EFAULT for any error pfn; ``kvm_handle_rdwr_fault()`` treats it as MMIO."""
    host, kvm, vma, vcpu = make_vm("series", arch="loongarch", kind=VmaKind.ANON)
    host.mm.mprotect(vma.start, PAGE, "none")
    assert vcpu.read(0).exit == Exit.MMIO
    assert _leaf(kvm) is None


def test_a_store_to_a_readonly_slot_is_mmio():
    _, kvm, _, vcpu = _vm("series", flags=KVM_MEM.READONLY)
    assert vcpu.write(0, 1).exit == Exit.MMIO and kvm.journal.counters["kvm_emu_mmio_write"] == 1
    assert vcpu.read(0).ok and not _leaf(kvm).host_writable


# ---- fast path (patches 65, 66) ----------------------------------------------------------------------------

def _clean_leaf(policy):
    """A read fault maps ``_PAGE_WRITE`` without ``_PAGE_DIRTY``; logging on the memslot."""
    host, kvm, vma, vcpu = _vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES)
    assert vcpu.read(0).ok
    for k in [k for k in kvm.journal.counters if k.startswith(("set_dirty:", "mark_accessed:", "put_page:",
                                                               "get_page:", "mark_page_dirty"))]:
        kvm.journal.counters[k] = 0
    del kvm.journal.facts[:]
    return host, kvm, vma, vcpu


def test_legacy_fast_store_holds_a_transient_ref_and_dirties_after_unlock():
    """v6.12: ``kvm_set_pte(ptep, new); page = kvm_pfn_to_refcounted_page(pfn); get_page(page);
    spin_unlock(); kvm_set_pfn_accessed(pfn); mark_page_dirty(); kvm_set_pfn_dirty(pfn); put_page(page);``"""
    host, kvm, vma, vcpu = _clean_leaf("legacy")
    gen = _fast_until_unlock(kvm, vcpu, True)
    c = kvm.journal.counters
    assert c["get_page:kvm_map_page_fast"] == 1 and c.get("set_dirty:kvm_map_page_fast", 0) == 0
    assert kvm.host_refs and not kvm.mmu_lock.held()
    assert _finish(gen) == 0
    assert c["set_dirty:kvm_map_page_fast"] == 1 and c["mark_accessed:kvm_map_page_fast"] == 1
    assert c["put_page:kvm_map_page_fast"] == 1 and kvm.host_refs == {}
    (dirty,) = _facts(kvm, "set_dirty", "kvm_map_page_fast")
    assert dirty.source == Src.SPTE and not dirty.locked
    assert c["mark_page_dirty_in_slot"] == 1 and kvm.memslots[0].by_id[0].dirty_bitmap[0]
    assert _invs(kvm) == ["INV-12", "INV-2"]
    lf = _leaf(kvm)
    assert lf.dirty and lf.accessed


def test_series_fast_store_only_marks_the_dirty_log():
    """v6.13: ``spin_unlock(); if (kvm_pte_dirty(changed)) mark_page_dirty(kvm, gfn);`` (patches 65, 66)."""
    host, kvm, vma, vcpu = _clean_leaf("series")
    assert vcpu.write(0, 5).ok
    assert _marks(kvm) == {} and kvm.host_refs == {}
    assert kvm.journal.counters["kvm_map_page_fast"] == 1 and kvm.journal.counters["mark_page_dirty_in_slot"] == 1
    assert _invs(kvm) == []
    assert _leaf(kvm).dirty


@pytest.mark.parametrize("policy,marks", [
    ("legacy", {"get_page:kvm_map_page_fast": 1, "mark_accessed:kvm_map_page_fast": 1, "put_page:kvm_map_page_fast": 1}),
    ("series", {})])
def test_fast_read_fault_on_an_old_pte_makes_it_young(policy, marks):
    """A load that faults while the PTE is present (a second vCPU raced the first): ``kvm_pte_mkyoung()``
    changes it; v6.12 ``get_page()`` / ``kvm_set_pfn_accessed()`` / ``put_page()``, v6.13 nothing (patch 66)."""
    host, kvm, vma, vcpu = _clean_leaf(policy)
    assert not _leaf(kvm).accessed
    assert kvm.arch.page_fault(vcpu, 0, False) == FaultRet.FIXED
    assert _marks(kvm) == marks and _leaf(kvm).accessed
    assert kvm.journal.counters.get("page_fault") and kvm.journal.counters.get("fault_retry", 0) == 0
    again = dict(_marks(kvm))
    assert kvm.arch.page_fault(vcpu, 0, False) == FaultRet.FIXED      # nothing changed: no marks, no ref
    assert _marks(kvm) == again


def test_fast_store_to_a_pte_without_page_write_takes_the_slow_path():
    """``if (!kvm_pte_write(new)) { ret = -EFAULT; goto out; }``: the slow path maps it (a read-only host
    PTE gives no ``_PAGE_WRITE``; a host store since makes it writable)."""
    host, kvm, vma, vcpu = make_vm("series", arch="loongarch")
    host.mm.host_access(vma.start, False)
    assert vcpu.read(0).ok and not _leaf(kvm).host_writable
    assert kvm.arch.kvm_map_page_fast(vcpu, 0, True) == -errno.EFAULT
    assert vcpu.write(0, 3).ok and _leaf(kvm).dirty


def test_the_legacy_transient_ref_keeps_the_page_alive_across_truncate():
    """The v6.12 fast path's ``get_page()`` means a truncate in the unlock window cannot free the page,
    but the ``kvm_set_pfn_dirty()`` lands on a folio the page cache no longer has (INV-3)."""
    host, kvm, vma, vcpu = _clean_leaf("legacy")
    from kvmsim.mm.reclaim import truncate_page
    res = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, True),
                           "host": truncate_page.steps(host.mm, vma, vma.pgoff)},
                          ["vcpu", "vcpu"] + ["host"] * 8, sched=kvm.sched)
    assert res["vcpu"] == FaultRet.FIXED
    assert [f.kind for f in kvm.journal.facts if f.kind in ("uaf", "dirty_after_truncate")] == ["dirty_after_truncate"]
    assert any(v.invariant == "INV-3" and "truncated" in v.detail for v in check_all(kvm))
    assert kvm.host_refs == {}


# ---- memslots: kvm_arch_prepare_memory_region / kvm_arch_commit_memory_region ----------------------------------

def test_a_slot_past_the_gpa_size_is_enomem():
    """``if ((new->base_gfn + new->npages) > (kvm->arch.gpa_size >> PAGE_SHIFT)) return -ENOMEM;``"""
    host, kvm, _, _ = make_vm("series", arch="loongarch", size=0, cpu_vabits=40)
    vma = host.mm.mmap(PAGE, VmaKind.ANON)
    assert kvm.arch.gpa_size == 1 << 39
    with pytest.raises(ModelError) as e:
        kvm.set_user_memory_region(0, (1 << 39) - PAGE, 2 * PAGE, vma.start)
    assert e.value.errno == errno.ENOMEM
    kvm.set_user_memory_region(0, (1 << 39) - PAGE, PAGE, vma.start)


def test_cpu_vabits_is_checked():
    with pytest.raises(UsageError, match="cpu_vabits"):
        make_vm("series", arch="loongarch", cpu_vabits=64)


@pytest.mark.parametrize("gpa,hva_off,size,flags", [
    (0, 0, 2 << 20, KVM_MEM_HUGEPAGE.CAPABLE),
    (0, PAGE, 4 << 20, KVM_MEM_HUGEPAGE.INCAPABLE),            # gpa and hva differ within a PMD
    (PAGE, PAGE, 2 << 20, KVM_MEM_HUGEPAGE.INCAPABLE),         # aligned alike, but no whole PMD inside
    (PAGE, PAGE, 4 << 20, KVM_MEM_HUGEPAGE(0)),                # aligned alike, with a whole PMD inside
])
def test_prepare_sets_the_hugepage_arch_flags(gpa, hva_off, size, flags):
    host, kvm, _, _ = make_vm("series", arch="loongarch", size=0)
    vma = host.mm.mmap(8 << 20, VmaKind.ANON)
    base = (vma.start + (2 << 20) - 1) & ~((2 << 20) - 1)
    kvm.set_user_memory_region(0, gpa, size, base + hva_off)
    assert kvm.memslots[0].by_id[0].arch["flags"] == flags


def _mapped_dirty_leaf(manual=0):
    host, kvm, vma, vcpu = _vm("series", manual_protect=manual)
    assert vcpu.write(0, 2).ok and _leaf(kvm).dirty
    return host, kvm, vma, vcpu


def test_enabling_dirty_logging_cleans_the_pte_and_keeps_page_write():
    """``kvm_arch_commit_memory_region()``: FLAGS_ONLY turning LOG_DIRTY_PAGES on → ``kvm_mkclean_gpa_pt()``
    (clears ``_PAGE_DIRTY``), so the next store takes the fast path and marks the dirty log."""
    host, kvm, vma, vcpu = _mapped_dirty_leaf()
    kvm.set_user_memory_region(0, 0, PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    lf = _leaf(kvm)
    assert not lf.dirty and lf.writable
    assert vcpu.write(0, 3).ok
    assert kvm.journal.counters["kvm_map_page_fast"] == 1 and kvm.memslots[0].by_id[0].dirty_bitmap[0]


def test_initially_set_skips_the_clean():
    """``if (kvm_dirty_log_manual_protect_and_init_set(kvm)) return;``"""
    host, kvm, vma, vcpu = _mapped_dirty_leaf(manual=3)
    kvm.set_user_memory_region(0, 0, PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    assert kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET and _leaf(kvm).dirty


def test_enable_log_dirty_pt_masked_cleans_only_the_masked_pages():
    """``kvm_mkclean_pte()`` with ``_KVM_HAS_PGMASK``: ``if (!(BIT(offset) & ctx->mask)) return 0;``"""
    host, kvm, vma, vcpu = make_vm("series", arch="loongarch", pages=3)
    for i in range(3):
        host.mm.host_access(vma.start + i * PAGE, True, 1)
        assert vcpu.write(i * PAGE, 1).ok
    slot = kvm.memslots[0].by_id[0]
    kvm.arch.enable_log_dirty_pt_masked(slot, 0, np.array([True, False, True]))
    assert [_leaf(kvm, g).dirty for g in range(3)] == [False, True, False]


def test_aging_clears_only_the_software_young_bit():
    """``kvm_age_gfn()`` → ``kvm_mkold_pte()``; ``kvm_test_age_gfn()`` reads ``kvm_pte_young()``; a load
    through the old leaf does not fault (``_PAGE_ACCESSED`` is software)."""
    host, kvm, vma, vcpu = _clean_leaf("series")
    slot = kvm.memslots[0].by_id[0]
    assert not kvm.arch.test_age_gfn(slot, 0, 1)
    kvm.arch.page_fault(vcpu, 0, False)
    assert kvm.arch.test_age_gfn(slot, 0, 1)
    assert kvm.arch.age_gfn(slot, 0, 1) and not kvm.arch.test_age_gfn(slot, 0, 1)
    faults = kvm.journal.counters["page_fault"]
    assert vcpu.read(0).ok and kvm.journal.counters["page_fault"] == faults


def test_unmap_marks_no_page_in_either_version():
    for policy in ("legacy", "series"):
        host, kvm, vma, vcpu = _vm(policy)
        assert vcpu.write(0, 1).ok
        before = _marks(kvm)
        host.mm.munmap(vma.start, PAGE)
        assert _leaf(kvm) is None and _marks(kvm) == before
