"""Book3S PR ``kvmppc_mmu_map_page()`` (arch/powerpc/kvm/book3s_64_mmu_host.c, book3s_32_mmu_host.c) and
``kvmppc_gpa_to_pfn()`` (book3s.c) under v6.12 and v6.13: patch 63 "KVM: PPC: Book3S: Mark "struct
page" pfns dirty/accessed after installing PTE" and patch 64 "KVM: PPC: Use kvm_faultin_pfn() to
handle page faults on Book3s PR".
"""

from __future__ import annotations

import pytest

from kvmsim.check import check_all
from kvmsim.errors import UsageError
from kvmsim.kvm import fault as template
from kvmsim.kvm.fault import FaultRet
from kvmsim.kvm.vcpu import Exit
from kvmsim.ppc import Book3sPrMmu
from kvmsim.ppc.book3s_pr import HPTEG_CACHE_NUM, kvmppc_mmu_map_page_v612_marks
from kvmsim.sched import run_interleaved
from kvmsim.trace import FactKind

from tests.helpers import PAGE, make_vm


def _facts(kvm, kind, caller=None):
    return [f for f in kvm.journal.facts if f.kind == kind and (caller is None or f.caller == caller)]


def _inv(kvm, inv):
    return [v for v in check_all(kvm) if v.invariant == inv]


def _lock_taken(kvm):
    """The index of the first spte_set fact: the PTE install happens under the lock, after the marks."""
    return next(i for i, f in enumerate(kvm.journal.facts) if f.kind == FactKind.SPTE_SET)


# ---- 64-bit host: where the marks are ------------------------------------------------------------------

def test_legacy_marks_accessed_and_dirty_before_the_lock_and_accessed_again_after_it():
    """v6.12: ``kvm_set_pfn_accessed(pfn)``; ``kvm_set_pfn_dirty(pfn)`` (writable HPTE); both before
    ``spin_lock()``; then ``kvm_release_pfn_clean(pfn)`` after ``spin_unlock()``: three INV-3 marks."""
    host, kvm, vma, vcpu = make_vm("legacy", arch="ppc-book3s-pr")
    assert vcpu.write(0, 1).exit == Exit.OK
    early = _facts(kvm, FactKind.MARK_ACCESSED, "kvmppc_mmu_map_page") + \
        _facts(kvm, FactKind.SET_DIRTY, "kvmppc_mmu_map_page")
    assert len(early) == 2 and all(not f.locked and f.by_fault_release for f in early)
    assert all(kvm.journal.facts.index(f) < _lock_taken(kvm) for f in early)
    late = _facts(kvm, FactKind.MARK_ACCESSED, "kvm_release_pfn_clean")
    assert len(late) == 1 and not late[0].locked
    assert _facts(kvm, FactKind.SET_DIRTY, "kvm_release_faultin_page") == []
    assert len(_inv(kvm, "INV-3")) == 3


def test_series_marks_once_under_the_lock_after_the_pte_is_installed():
    """v6.13: ``kvm_release_faultin_page(kvm, page, false, orig_pte->may_write && writable)`` before
    ``spin_unlock()``: dirty and accessed once each, locked, after the install."""
    host, kvm, vma, vcpu = make_vm("series", arch="ppc-book3s-pr")
    assert vcpu.write(0, 1).exit == Exit.OK
    assert _facts(kvm, FactKind.MARK_ACCESSED, "kvmppc_mmu_map_page") == []
    assert _facts(kvm, FactKind.SET_DIRTY, "kvmppc_mmu_map_page") == []
    marks = _facts(kvm, FactKind.SET_DIRTY, "kvm_release_faultin_page") + \
        _facts(kvm, FactKind.MARK_ACCESSED, "kvm_release_faultin_page")
    assert len(marks) == 2 and all(f.locked for f in marks)
    assert all(kvm.journal.facts.index(f) > _lock_taken(kvm) for f in marks)
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_readonly_guest_pte_is_never_dirtied(policy):
    """``orig_pte->may_write`` false: PP_RXRX, no ``mark_page_dirty()``, no dirty mark in either version."""
    host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr")
    host.mm.host_access(vma.start, True, 1)
    kvm.arch.guest_pte_ro.add(0)
    assert kvm.arch.page_fault(vcpu, 0, False) == FaultRet.FIXED
    assert [f for f in _facts(kvm, FactKind.SET_DIRTY) if f.kvm] == []
    leaf = next(iter(kvm.arch.leaves()))
    assert not leaf.writable


def test_series_minus_eagain_is_still_marked_used_the_fixme():
    """v6.13 passes ``unused = false`` ("FIXME"): the -EAGAIN of an empty HPTE cache still marks the page
    accessed (and dirty), under the lock; v6.12 marked it before the lock and again after it."""
    for policy, locked in (("series", True), ("legacy", False)):
        host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr")
        host.mm.host_access(vma.start, True, 1)
        kvm.arch.hpte_cache_alloc_failures = 1
        assert kvm.arch.page_fault(vcpu, 0, True) == FaultRet.RETRY
        assert kvm.journal.counters["hpte_cache_alloc_failed"] == 1
        assert list(kvm.arch.leaves()) == []
        acc = [f for f in _facts(kvm, FactKind.MARK_ACCESSED) if f.kvm]
        assert acc and all(f.locked is locked for f in acc), policy
        assert kvm.host_refs == {}


def test_legacy_marks_before_the_retry_check_on_an_invalidated_page():
    """The race patch 63 closes: the invalidation lands between the faultin and ``spin_lock()``; v6.12 has
    already marked the page (before the retry check), v6.13 marks nothing until the lock, then (FIXME)
    releases it as used under the lock."""
    res = {}
    for policy in ("legacy", "series"):
        host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr")
        host.mm.host_access(vma.start, True, 1)
        out = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, True),
                               "host": host.mm.munmap.steps(vma.start, PAGE)},
                              ["vcpu", "vcpu", "host", "host", "host", "host"], sched=kvm.sched)
        assert out["vcpu"] == FaultRet.RETRY and kvm.journal.counters["fault_retry"] == 1
        res[policy] = [(f.caller, f.locked) for f in kvm.journal.facts if f.kind == FactKind.SET_DIRTY and f.kvm]
    assert res["legacy"] == [("kvmppc_mmu_map_page", False)]
    assert res["series"] == [("kvm_release_faultin_page", True)]


def test_the_policy_resolves_pr_releases_once():
    """Legacy: the v6.12 marks before the lock and ``kvm_release_pfn_clean()`` after the unlock; series:
    ``kvm_release_faultin_page()`` under the lock, nothing before it."""
    _, legacy, _, _ = make_vm("legacy", arch="ppc-book3s-pr")
    _, series, _, _ = make_vm("series", arch="ppc-book3s-pr")
    assert legacy.ops.fault_dirty_before_map is kvmppc_mmu_map_page_v612_marks
    assert legacy.ops.fault_release_unlocked is template.release_pfn_clean_after_unlock
    assert legacy.ops.fault_release_locked is None
    assert series.ops.fault_dirty_before_map is None and series.ops.fault_release_unlocked is None
    assert series.ops.fault_release_locked is template.release_faultin_page_locked


# ---- the magic page --------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_the_magic_page_is_the_shared_page_with_its_own_get_page_released_once(policy):
    """``kvmppc_gpa_to_pfn()``: the magic gpa is ``vcpu->arch.shared`` with ``get_page()`` and writable;
    both versions release that reference (legacy by pfn guess after the unlock, series under the lock)."""
    host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr")
    shared = kvm.arch.kvmppc_map_magic_page(vcpu, 1 << 20)
    before = host.phys.page_count(shared)
    assert vcpu.write(1 << 20, 0x55).exit == Exit.OK
    assert host.phys.read(shared, "test") == 0x55
    assert vcpu.read(1 << 20).value == 0x55              # through the shadow HPTE, no second fault
    assert len(_facts(kvm, FactKind.GET, "kvmppc_gpa_to_pfn")) == 1
    assert host.phys.page_count(shared) == before and kvm.host_refs == {}
    dirty = [f for f in _facts(kvm, FactKind.SET_DIRTY) if f.kvm]
    assert [f.pfn for f in dirty] == [shared] and dirty[0].locked is (policy == "series")


# ---- the HPTE cache ------------------------------------------------------------------------------------

def test_a_full_hpte_cache_is_flushed_before_allocating():
    """``kvmppc_mmu_hpte_cache_next()``: ``hpte_cache_count == HPTEG_CACHE_NUM`` → flush all first."""
    host, kvm, vma, vcpu = make_vm("series", arch="ppc-book3s-pr", pages=2)
    assert vcpu.read(0).exit == Exit.OK and kvm.arch.hpte_cache_count == 1
    kvm.arch.hpte_cache_count = HPTEG_CACHE_NUM
    assert vcpu.read(PAGE).exit == Exit.OK
    assert kvm.journal.counters["kvmppc_mmu_pte_flush_all"] == 1
    assert [lf.gfn for lf in kvm.arch.leaves()] == [1] and kvm.arch.hpte_cache_count == 1


# ---- 32-bit host -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,accessed", [("legacy", 2), ("series", 1)])
def test_32bit_eagain_is_accessed_and_put_in_v612_put_only_in_v613(policy, accessed):
    """book3s_32_mmu_host.c: no HPTE cache entry → v6.12 ``kvm_release_pfn_clean()`` (accessed + put),
    v6.13 ``kvm_release_page_unused()`` (put); the success path is clean in both, never dirty."""
    host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr", host_bits=32)
    kvm.arch.hpte_cache_alloc_failures = 1
    assert vcpu.write(0, 3).exit == Exit.OK
    assert len(_facts(kvm, FactKind.MARK_ACCESSED, "kvmppc_mmu_map_page")) == accessed
    assert len(_facts(kvm, FactKind.PUT, "kvmppc_mmu_map_page")) == 2
    assert [f for f in _facts(kvm, FactKind.SET_DIRTY) if f.kvm] == []
    assert bool(_inv(kvm, "INV-7")) is (policy == "legacy")
    assert kvm.host_refs == {}


def test_32bit_takes_no_mmu_lock_and_checks_no_sequence():
    """The 32-bit host has no ``mmu_invalidate_retry()``: an invalidation after the faultin does not stop
    the map (the stale leaf INV-5 sees), in both versions."""
    for policy in ("legacy", "series"):
        host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr", host_bits=32)
        host.mm.host_access(vma.start, True, 1)
        out = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, False),
                               "host": host.mm.munmap.steps(vma.start, PAGE)},
                              ["vcpu", "host", "host", "host", "host", "vcpu"], sched=kvm.sched)
        assert out["vcpu"] == FaultRet.FIXED and kvm.journal.counters["fault_retry"] == 0
        assert any(v.invariant == "INV-5" for v in check_all(kvm)), policy
        assert not any(f.locked for f in kvm.journal.facts if f.kind == FactKind.SPTE_SET)


def test_host_bits_is_checked():
    with pytest.raises(UsageError, match="host_bits"):
        make_vm("series", arch="ppc-book3s-pr", host_bits=16)
    _, kvm, _, _ = make_vm("series", arch="ppc-book3s-pr", size=0)
    assert isinstance(kvm.arch, Book3sPrMmu) and kvm.arch.host_bits == 64


def test_an_error_pfn_is_einval_with_nothing_released():
    host, kvm, vma, vcpu = make_vm("legacy", arch="ppc-book3s-pr")
    host.mm.mprotect(vma.start, PAGE, "")
    assert kvm.arch.page_fault(vcpu, 0, False) == -22
    assert [f for f in kvm.journal.facts if f.kind in (FactKind.PUT, FactKind.MARK_ACCESSED) and f.kvm] == []
