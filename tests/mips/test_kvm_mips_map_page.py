"""MIPS ``kvm_mips_map_page()`` / ``_kvm_mips_map_page_fast()`` (arch/mips/kvm/mmu.c) under v6.12 and v6.13.

Each test names the kernel line it checks.  v6.12 lines are the "-" side of the v13 series patches
69 "KVM: MIPS: Mark "struct page" pfns dirty only in "slow" page fault path", 70 "KVM: MIPS: Mark
"struct page" pfns accessed only in "slow" page fault path", 71 "KVM: MIPS: Mark "struct page" pfns
accessed prior to dropping mmu_lock"; v6.13 lines the "+" side of 72 "KVM: MIPS: Use kvm_faultin_pfn()
to map pfns into the guest".
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from kvmsim.check import check_all
from kvmsim.errors import UsageError
from kvmsim.kvm.arch import make_arch
from kvmsim.kvm.fault import FaultRet, release_faultin_page_locked
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.vcpu import Exit
from kvmsim.mips import MipsMmu
from kvmsim.mips.mmu import kvm_mips_map_page_v612_after_unlock, kvm_mips_map_page_v612_dirty_before_map
from kvmsim.mm.vma import VmaKind
from kvmsim.policies import resolve
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.policies.series import SeriesPolicy
from kvmsim.sched import run_interleaved
from kvmsim.trace import Src

from tests.helpers import PAGE, make_vm


def _facts(kvm, kind, caller=None):
    return [f for f in kvm.journal.facts if f.kind == kind and (caller is None or f.caller == caller)]


def _invs(kvm):
    return sorted({v.invariant for v in check_all(kvm)})


def _leaf(kvm, gfn=0):
    return {lf.gfn: lf for lf in kvm.arch.leaves()}.get(gfn)


def _marks(kvm):
    return {k: v for k, v in kvm.journal.counters.items() if v
            and k.startswith(("set_dirty:kvm", "set_dirty:_kvm", "mark_accessed:kvm", "mark_accessed:_kvm",
                              "put_page:kvm", "get_page:kvm"))}


def _vm(policy, **kw):
    host, kvm, vma, vcpu = make_vm(policy, arch="mips", **kw)
    host.mm.host_access(vma.start, True, 1)
    return host, kvm, vma, vcpu


def _reset(kvm):
    for k in list(kvm.journal.counters):
        kvm.journal.counters[k] = 0
    del kvm.journal.facts[:]


def test_mips_is_an_arch_and_listed_in_the_error():
    _, kvm, _, _ = make_vm("series", arch="mips")
    assert isinstance(kvm.arch, MipsMmu) and kvm.arch.family == "mips"
    with pytest.raises(UsageError, match="mips"):
        make_arch(kvm, "sparc")


def test_legacy_resolves_the_v612_mips_release_and_the_series_the_common_one():
    legacy, series = resolve(LegacyPolicy(), "mips"), resolve(SeriesPolicy(), "mips")
    assert legacy.fault_release_unlocked is kvm_mips_map_page_v612_after_unlock
    assert legacy.fault_dirty_before_map is kvm_mips_map_page_v612_dirty_before_map
    assert legacy.fault_release_locked is None
    assert series.fault_release_locked is release_faultin_page_locked
    assert series.fault_release_unlocked is None and series.fault_dirty_before_map is None


# ---- slow path (patches 69, 71, 72) ---------------------------------------------------------------------------

def test_legacy_write_fault_dirties_before_set_pte_and_marks_accessed_after_its_put():
    """v6.12: ``mark_page_dirty(); kvm_set_pfn_dirty(pfn);`` before ``set_pte()``, then ``spin_unlock();
    kvm_release_pfn_clean(pfn); kvm_set_pfn_accessed(pfn);``"""
    _, kvm, _, vcpu = _vm("legacy")
    assert vcpu.write(0, 7).ok
    assert _marks(kvm) == {"set_dirty:kvm_mips_map_page": 1, "mark_accessed:kvm_release_pfn_clean": 1,
                           "put_page:kvm_release_pfn_clean": 1, "mark_accessed:kvm_mips_map_page": 1}
    facts = kvm.journal.facts
    (dirty,) = _facts(kvm, "set_dirty", "kvm_mips_map_page")
    (pte,) = _facts(kvm, "spte_set", "set_pte")
    (put,) = _facts(kvm, "put", "kvm_release_pfn_clean")
    (late,) = _facts(kvm, "mark_accessed", "kvm_mips_map_page")
    assert dirty.locked and dirty.source == Src.HELD and facts.index(dirty) < facts.index(pte)
    assert facts.index(put) < facts.index(late)                 # the mark after KVM's own put
    assert not late.locked and late.source == Src.GUESS and late.by_fault_release
    assert kvm.host_refs == {}
    inv3 = sorted(v.detail for v in check_all(kvm) if v.invariant == "INV-3")
    assert inv3 == ["kvm_mips_map_page: mark_page_accessed after dropping mmu_lock",
                    "kvm_release_pfn_clean: mark_page_accessed after dropping mmu_lock"]


def test_series_write_fault_releases_once_under_the_lock_after_set_pte():
    """v6.13: ``set_pte(); kvm_release_faultin_page(kvm, page, false, writeable); spin_unlock();``"""
    _, kvm, _, vcpu = _vm("series")
    assert vcpu.write(0, 7).ok
    assert _marks(kvm) == {"set_dirty:kvm_release_faultin_page": 1, "mark_accessed:kvm_release_faultin_page": 1,
                           "put_page:kvm_release_faultin_page": 1}
    facts = kvm.journal.facts
    (dirty,) = _facts(kvm, "set_dirty", "kvm_release_faultin_page")
    (pte,) = _facts(kvm, "spte_set", "set_pte")
    assert dirty.locked and facts.index(pte) < facts.index(dirty)
    assert _invs(kvm) == []
    lf = _leaf(kvm)
    assert lf.writable and lf.dirty and lf.accessed             # __READABLE | __WRITEABLE


@pytest.mark.parametrize("policy,dirtied", [("legacy", 0), ("series", 1)])
def test_a_read_fault_on_a_writeable_page_dirties_only_in_the_series(policy, dirtied):
    """v6.12 dirtied inside ``if (write_fault)``; patch 69 made it ``if (writeable)``."""
    host, kvm, vma, vcpu = _vm(policy)
    pfn = host.mm.pte_of(vma.start)[1]
    host.phys.folio_clear_dirty(pfn)
    assert vcpu.read(0).value == 1
    assert kvm.journal.counters.get("set_dirty:kvm_release_faultin_page", 0) == dirtied
    assert kvm.journal.counters.get("set_dirty:kvm_mips_map_page", 0) == 0
    assert host.phys.folio_test_dirty(pfn) == bool(dirtied)
    lf = _leaf(kvm)
    assert lf.host_writable and not lf.dirty


def _fault_vs_munmap(policy, order):
    host, kvm, vma, vcpu = make_vm(policy, arch="mips", kind=VmaKind.ANON)
    host.mm.host_access(vma.start, True, 1)
    res = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, True),
                           "host": host.mm.munmap.steps(vma.start, PAGE)}, order, sched=kvm.sched)
    return kvm, res


def test_legacy_accessed_after_put_lands_on_the_page_munmap_freed():
    """v6.12: munmap runs after ``spin_unlock()``: KVM's ``kvm_release_pfn_clean()`` drops the last
    reference and frees the page, then ``kvm_set_pfn_accessed(pfn)`` marks a freed page (INV-3)."""
    kvm, res = _fault_vs_munmap("legacy", ["vcpu"] * 6 + ["host"] * 7)
    assert res["vcpu"] == FaultRet.FIXED
    (uaf,) = _facts(kvm, "uaf")
    assert uaf.caller == "kvm_mips_map_page" and uaf.detail == "mark_page_accessed on a freed page"
    assert uaf.source == Src.GUESS and not uaf.locked and uaf.kvm
    (put,) = _facts(kvm, "put", "kvm_release_pfn_clean")
    assert kvm.journal.facts.index(put) < kvm.journal.facts.index(uaf)
    assert any(v.invariant == "INV-3" and v.detail == "kvm_mips_map_page: mark_page_accessed on a freed page"
               for v in check_all(kvm))


def test_series_releases_before_munmap_can_run():
    """v6.13: the release is under ``mmu_lock``, which the notifier needs: nothing is marked after."""
    kvm, res = _fault_vs_munmap("series", ["vcpu"] * 6 + ["host"] * 7)
    assert res["vcpu"] == FaultRet.FIXED
    assert _facts(kvm, "uaf") == [] and _invs(kvm) == []


def test_legacy_retry_marks_the_unused_page_accessed_but_not_again():
    """v6.12: ``spin_unlock(); kvm_release_pfn_clean(pfn); goto retry;`` (no second mark on this path)."""
    kvm, res = _fault_vs_munmap("legacy", ["vcpu"] * 4 + ["host"] * 7)
    assert res["vcpu"] == FaultRet.RETRY
    assert _marks(kvm) == {"mark_accessed:kvm_release_pfn_clean": 1, "put_page:kvm_release_pfn_clean": 1}
    assert _invs(kvm) == ["INV-7"]


def test_series_retry_is_put_only():
    """v6.13: ``kvm_release_page_unused(page)`` (patch 72)."""
    kvm, res = _fault_vs_munmap("series", ["vcpu"] * 4 + ["host"] * 7)
    assert res["vcpu"] == FaultRet.RETRY
    assert _marks(kvm) == {"put_page:kvm_release_faultin_page": 1} and _invs(kvm) == []


def test_an_error_pfn_is_emulated_as_mmio():
    host, kvm, vma, vcpu = make_vm("legacy", arch="mips", kind=VmaKind.ANON)
    host.mm.mprotect(vma.start, PAGE, "none")
    assert vcpu.write(0, 1).exit == Exit.MMIO and _leaf(kvm) is None


# ---- fast path (patches 69, 70) ---------------------------------------------------------------------------

def _logged_clean_leaf(policy):
    """A written page, then LOG_DIRTY_PAGES turned on: ``kvm_mips_mkclean_gpa_pt()`` clears the dirty bit."""
    host, kvm, vma, vcpu = _vm(policy)
    assert vcpu.write(0, 1).ok
    kvm.set_user_memory_region(0, 0, PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    lf = _leaf(kvm)
    assert lf.writable and not lf.dirty
    _reset(kvm)
    return host, kvm, vma, vcpu


def test_legacy_fast_store_dirties_the_pte_pfn_under_the_lock_without_a_reference():
    """v6.12: ``set_pte(ptep, pte_mkdirty(*ptep)); mark_page_dirty(kvm, gfn); kvm_set_pfn_dirty(pfn);``"""
    host, kvm, vma, vcpu = _logged_clean_leaf("legacy")
    assert vcpu.write(0, 2).ok
    assert _marks(kvm) == {"set_dirty:_kvm_mips_map_page_fast": 1}
    (dirty,) = _facts(kvm, "set_dirty", "_kvm_mips_map_page_fast")
    assert dirty.locked and dirty.source == Src.SPTE and kvm.host_refs == {}
    assert kvm.journal.counters["pte_mkdirty"] == 1 and kvm.memslots[0].by_id[0].dirty_bitmap[0]
    assert _invs(kvm) == ["INV-2"]


def test_series_fast_store_only_marks_the_dirty_log():
    host, kvm, vma, vcpu = _logged_clean_leaf("series")
    assert vcpu.write(0, 2).ok
    assert _marks(kvm) == {} and kvm.journal.counters["pte_mkdirty"] == 1
    assert kvm.memslots[0].by_id[0].dirty_bitmap[0] and _invs(kvm) == []


def _old_leaf(policy, kind=VmaKind.FILE):
    host, kvm, vma, vcpu = make_vm(policy, arch="mips", kind=kind)
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.read(0).ok
    assert host.mm.clear_young(vma.start, vma.start + PAGE)
    assert not _leaf(kvm).accessed
    _reset(kvm)
    return host, kvm, vma, vcpu


@pytest.mark.parametrize("policy,marks", [("legacy", {"mark_accessed:_kvm_mips_map_page_fast": 1}), ("series", {})])
def test_a_load_through_an_old_pte_takes_the_fast_path(policy, marks):
    """``pte_mkold()`` clears the valid bit: the load faults; ``set_pte(ptep, pte_mkyoung(*ptep))``; v6.12
    then ``kvm_set_pfn_accessed(pfn)`` after ``spin_unlock()`` with no reference (patch 70)."""
    host, kvm, vma, vcpu = _old_leaf(policy)
    assert vcpu.read(0).value == 1
    assert kvm.journal.counters["pte_mkyoung"] == 1 and _leaf(kvm).accessed
    assert _marks(kvm) == marks
    if marks:
        (acc,) = _facts(kvm, "mark_accessed", "_kvm_mips_map_page_fast")
        assert not acc.locked and acc.source == Src.SPTE and kvm.host_refs == {}
        assert _invs(kvm) == ["INV-12", "INV-2"]
    else:
        assert _invs(kvm) == []


def test_legacy_fast_marks_accessed_even_when_the_store_check_fails():
    """``if (!pte_young()) { set_pte(pte_mkyoung()); pfn_valid = true; }`` precedes ``if (!pte_write())
    { ret = -EFAULT; goto out; }``, and ``out:`` still calls ``kvm_set_pfn_accessed()``."""
    host, kvm, vma, vcpu = make_vm("legacy", arch="mips")
    host.mm.host_access(vma.start, False)
    assert vcpu.read(0).ok and not _leaf(kvm).host_writable
    host.mm.clear_young(vma.start, vma.start + PAGE)
    _reset(kvm)
    assert kvm.arch._kvm_mips_map_page_fast(vcpu, 0, True) == -errno.EFAULT
    assert _marks(kvm) == {"mark_accessed:_kvm_mips_map_page_fast": 1}


def test_legacy_fast_accessed_after_unlock_lands_on_a_page_munmap_freed():
    """No reference is held across the unlock: munmap frees the anon page, then the mark (INV-3)."""
    host, kvm, vma, vcpu = _old_leaf("legacy", VmaKind.ANON)
    res = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, False),
                           "host": host.mm.munmap.steps(vma.start, PAGE)},
                          ["vcpu", "vcpu"] + ["host"] * 7, sched=kvm.sched)
    assert res["vcpu"] == FaultRet.FIXED
    (uaf,) = _facts(kvm, "uaf")
    assert uaf.caller == "_kvm_mips_map_page_fast" and uaf.source == Src.SPTE and not uaf.locked
    assert "INV-3" in _invs(kvm)


# ---- memslots, aging -------------------------------------------------------------------------------------

def test_prepare_refuses_nothing_and_commit_has_no_initially_set_exception():
    """``kvm_arch_prepare_memory_region()`` returns 0; ``kvm_arch_commit_memory_region()`` cleans on
    FLAGS_ONLY turning logging on, even with manual protect + INITIALLY_SET."""
    host, kvm, vma, vcpu = _vm("series", manual_protect=3)
    assert vcpu.write(0, 1).ok and _leaf(kvm).dirty
    kvm.set_user_memory_region(0, 0, PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    assert not _leaf(kvm).dirty


def test_enable_log_dirty_pt_masked_cleans_from_first_to_last_bit():
    """``kvm_mips_mkclean_gpa_pt(kvm, base + __ffs(mask), base + __fls(mask))``: pages in between too."""
    host, kvm, vma, vcpu = make_vm("series", arch="mips", pages=4)
    for i in range(4):
        host.mm.host_access(vma.start + i * PAGE, True, 1)
        assert vcpu.write(i * PAGE, 1).ok
    kvm.arch.enable_log_dirty_pt_masked(kvm.memslots[0].by_id[0], 0, np.array([True, False, True, False]))
    assert [_leaf(kvm, g).dirty for g in range(4)] == [False, False, False, True]


def test_unmap_always_asks_for_a_flush_and_marks_nothing():
    for policy in ("legacy", "series"):
        host, kvm, vma, vcpu = _vm(policy)
        slot = kvm.memslots[0].by_id[0]
        assert kvm.arch.unmap_gfn_range(slot, 0, 1) is True      # nothing mapped yet: still true
        assert vcpu.write(0, 1).ok
        before = _marks(kvm)
        host.mm.munmap(vma.start, PAGE)
        assert _leaf(kvm) is None and _marks(kvm) == before


@pytest.mark.parametrize("arch", ["loongarch", "mips"])
def test_every_resolved_hook_cites_its_patch(arch):
    """Each release the seam resolves for LoongArch / MIPS cites a series patch by number and exact title."""
    from tests.core.test_policy_seam import _titles, citations
    titles = _titles()
    for policy in (LegacyPolicy(), SeriesPolicy()):
        ops = resolve(policy, arch)
        for hook in (ops.fault_release_locked, ops.fault_release_unlocked, ops.fault_dirty_before_map,
                     ops.fast_path_get_page, ops.spte_ad_lost):
            if hook is None:
                continue
            cited = citations(hook.__doc__ or "")
            assert cited and all(titles.get(n) == t for n, t in cited), (policy.name, arch, hook)
            assert any(65 <= n <= 72 or n in (40, 41, 48, 49, 56, 59) for n, _ in cited), (policy.name, arch, hook)
