"""arm64 ``user_mem_abort()`` / ``handle_access_fault()`` (arch/arm64/kvm/mmu.c) under v6.12 and v6.13.

Each test states the kernel line it checks; v6.12 lines are the "-" side of the v13 series patches
55 "KVM: arm64: Mark "struct page" pfns accessed/dirty before dropping mmu_lock", 56 "KVM: arm64:
Use __kvm_faultin_pfn() to handle memory aborts" and 83 "KVM: arm64: Don't mark "struct page"
accessed when making SPTE young".
"""

from __future__ import annotations

import pytest

from kvmsim.arm64 import Arm64Mmu
from kvmsim.check import check_all
from kvmsim.errors import UsageError
from kvmsim.kvm.arch import make_arch
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.stage2 import RET_PF
from kvmsim.kvm.vcpu import Exit
from kvmsim.sched import run_interleaved
from kvmsim.trace import Src

from tests.helpers import PAGE, make_vm


def _facts(kvm, kind, caller):
    return [f for f in kvm.journal.facts if f.kind == kind and f.caller == caller]


def _inv(kvm, inv):
    return [v for v in check_all(kvm) if v.invariant == inv]


def _leaf(kvm, gfn=0):
    return {lf.gfn: lf for lf in kvm.arch.leaves()}.get(gfn)


def test_arm64_is_an_arch_and_listed_in_the_error():
    host, kvm, _, _ = make_vm("series", arch="arm64")
    assert isinstance(kvm.arch, Arm64Mmu) and kvm.arch.name == "arm64"
    with pytest.raises(UsageError, match="arm64"):
        make_arch(kvm, "sparc")


# ---- out_unlock: where the page is dirtied, aged and put -----------------------------------------------

def test_legacy_write_fault_dirties_and_releases_after_read_unlock():
    """v6.12: ``read_unlock(); if (writable && !ret) kvm_set_pfn_dirty(pfn); kvm_release_pfn_clean(pfn);``"""
    host, kvm, vma, vcpu = make_vm("legacy", arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 7).ok
    c = kvm.journal.counters
    assert c["set_dirty:user_mem_abort"] == 1 and c["set_dirty:kvm_release_faultin_page"] == 0
    assert c["mark_accessed:kvm_release_pfn_clean"] == 1 and c["put_page:kvm_release_pfn_clean"] == 1
    (dirty,) = _facts(kvm, "set_dirty", "user_mem_abort")
    (acc,) = _facts(kvm, "mark_accessed", "kvm_release_pfn_clean")
    assert not dirty.locked and not acc.locked
    assert dirty.source == Src.HELD
    assert _leaf(kvm).writable


def test_series_write_fault_releases_dirty_under_the_read_lock():
    """v6.13: ``kvm_release_faultin_page(kvm, page, !!ret, writable); read_unlock();``"""
    host, kvm, vma, vcpu = make_vm("series", arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 7).ok
    c = kvm.journal.counters
    assert c["set_dirty:user_mem_abort"] == 0 and c["set_dirty:kvm_release_faultin_page"] == 1
    assert c["mark_accessed:kvm_release_faultin_page"] == 1 and c["put_page:kvm_release_faultin_page"] == 1
    assert c["mark_accessed:kvm_release_pfn_clean"] == 0
    assert all(f.locked for f in _facts(kvm, "set_dirty", "kvm_release_faultin_page"))
    assert all(f.locked for f in _facts(kvm, "mark_accessed", "kvm_release_faultin_page"))


def test_inv3_checker_flags_legacy_dirty_after_unlock_and_not_series():
    found = {}
    for policy in ("legacy", "series"):
        host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
        host.mm.host_access(vma.start, True, 1)
        assert vcpu.write(0, 7).ok
        found[policy] = [v.detail for v in _inv(kvm, "INV-3")]
    assert "user_mem_abort: SetPageDirty after dropping mmu_lock" in found["legacy"]
    assert "kvm_release_pfn_clean: mark_page_accessed after dropping mmu_lock" in found["legacy"]
    assert found["series"] == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_read_fault_on_a_writable_page_maps_writable_and_dirties(policy):
    """``__kvm_faultin_pfn(..., write_fault ? FOLL_WRITE : 0, &writable, &page)``: a read fault still asks
    for a writable mapping; ``writable`` then decides the dirty mark (both versions)."""
    host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.read(0).value == 1
    assert _leaf(kvm).writable
    caller = "kvm_release_faultin_page" if policy == "series" else "user_mem_abort"
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 1


# ---- retries: mmu_invalidate_retry() and the -EAGAIN of an already-present leaf ----------------------

def _fault_vs_munmap(policy):
    host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    res = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, True),
                           "host": host.mm.munmap.steps(vma.start, PAGE)},
                          ["vcpu", "vcpu", "host", "host", "host", "host"], sched=kvm.sched)
    return kvm, res


def test_legacy_retry_still_marks_accessed_and_puts():
    """v6.12: ``ret = -EAGAIN; goto out_unlock;`` … ``kvm_release_pfn_clean(pfn)`` on every path."""
    kvm, res = _fault_vs_munmap("legacy")
    assert res["vcpu"] == RET_PF.RETRY and kvm.journal.counters["fault_retry"] == 1
    c = kvm.journal.counters
    assert c["mark_accessed:kvm_release_pfn_clean"] == 1 and c["put_page:kvm_release_pfn_clean"] == 1
    assert c["set_dirty:user_mem_abort"] == 0                     # writable && !ret is false
    assert _leaf(kvm) is None and kvm.host_refs == {}
    assert _inv(kvm, "INV-7")


def test_series_retry_releases_the_page_unused():
    """v6.13: ``kvm_release_faultin_page(kvm, page, !!ret, writable)`` with ret = -EAGAIN: put only."""
    kvm, res = _fault_vs_munmap("series")
    assert res["vcpu"] == RET_PF.RETRY
    c = kvm.journal.counters
    assert c["put_page:kvm_release_faultin_page"] == 1
    assert c["mark_accessed:kvm_release_faultin_page"] == 0 and c["set_dirty:kvm_release_faultin_page"] == 0
    assert _leaf(kvm) is None and kvm.host_refs == {}
    assert not _inv(kvm, "INV-7") and not _inv(kvm, "INV-3")


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_translation_fault_on_a_present_leaf_is_eagain(policy):
    """``stage2_pte_needs_update()`` false → -EAGAIN: unused in v6.13, accessed + put in v6.12."""
    host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert kvm.arch.page_fault(vcpu, 0, False) == RET_PF.FIXED
    before = kvm.journal.snapshot()
    assert kvm.arch.page_fault(vcpu, 0, False) == RET_PF.SPURIOUS
    d = kvm.journal.since(before)
    assert d.get("spte_write", 0) == 0
    if policy == "series":
        assert d.get("put_page:kvm_release_faultin_page") == 1
        assert "mark_accessed:kvm_release_faultin_page" not in d and "set_dirty:kvm_release_faultin_page" not in d
    else:
        assert d.get("mark_accessed:kvm_release_pfn_clean") == 1 and "set_dirty:user_mem_abort" not in d


# ---- handle_access_fault ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_access_flag_fault_after_aging(policy):
    """``kvm_age_gfn()`` clears AF (no page marking in either); the next access takes an Access-flag fault:
    v6.12 ``kvm_set_pfn_accessed(kvm_pte_to_pfn(pte))`` after ``read_unlock()``, v6.13 nothing (patch 83)."""
    host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.read(0).ok
    before = kvm.journal.snapshot()
    assert kvm.notifier.clear_flush_young(vma.start, vma.start + PAGE) is True
    d = kvm.journal.since(before)
    assert not any(k.startswith(("mark_accessed:", "set_dirty:")) for k in d)
    assert d["tlb_flush:clear_flush_young"] == 1                   # arm64 keeps the flush in v6.13
    assert not _leaf(kvm).accessed
    before = kvm.journal.snapshot()
    assert vcpu.read(0).value == 1
    d = kvm.journal.since(before)
    assert d["access_flag_fault"] == 1 and "hva_to_pfn" not in d   # no user_mem_abort
    assert _leaf(kvm).accessed
    marks = _facts(kvm, "mark_accessed", "handle_access_fault")
    if policy == "legacy":
        assert d["mark_accessed:handle_access_fault"] == 1
        (f,) = marks
        assert f.source == Src.SPTE and not f.locked
        assert {v.invariant for v in check_all(kvm) if v.objects.get("caller") == "handle_access_fault"} \
            == {"INV-2", "INV-12"}
    else:
        assert marks == [] and "mark_accessed:handle_access_fault" not in d


# ---- dirty logging -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_logging_read_fault_maps_read_only_then_write_relaxes(policy):
    """``else if (logging_active && !write_fault) writable = false;`` then a permission fault
    (``kvm_pgtable_stage2_relax_perms()``) makes it writable and logs the gfn."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    slot = kvm.gfn_to_memslot(0)
    assert vcpu.read(0).ok
    assert not _leaf(kvm).writable
    assert not slot.dirty_bitmap[0]
    assert not any(k.startswith("set_dirty:") and "folio_mark_dirty" not in k for k in kvm.journal.counters)
    assert vcpu.write(0, 9).ok
    assert _leaf(kvm).writable and slot.dirty_bitmap[0]
    assert kvm.journal.counters["spte_relax_perms"] == 1 and kvm.journal.counters["spte_write"] == 1
    caller = "kvm_release_faultin_page" if policy == "series" else "user_mem_abort"
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 1


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_memslot_dirty_is_marked_after_read_unlock(policy):
    """``mark_page_dirty_in_slot()`` follows ``read_unlock()`` in both versions."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    slot = kvm.gfn_to_memslot(0)
    gen = kvm.arch.page_fault.steps(vcpu, 0, True)
    labels = []
    while not labels or "read_unlock(mmu_lock)" not in labels[-1]:
        labels.append(next(gen))
    assert not kvm.mmu_lock.held() and _leaf(kvm).writable
    assert not slot.dirty_bitmap[0]
    with pytest.raises(StopIteration):
        next(gen)
    assert slot.dirty_bitmap[0]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_dirty_ring_without_bitmap_is_not_logging_for_user_mem_abort(policy):
    """``memslot_is_logging()`` is ``dirty_bitmap && !READONLY``: a ring-only slot maps read faults writable."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES, ring=4096, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert kvm.gfn_to_memslot(0).dirty_bitmap is None
    assert vcpu.read(0).ok and _leaf(kvm).writable
    assert [off for _, off in vcpu.dirty_ring] == [0]              # writable && !ret → logged


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_enabling_logging_write_protects_unless_initially_set(policy):
    """``kvm_arch_commit_memory_region()``: ``kvm_mmu_wp_memory_region()`` unless
    ``kvm_dirty_log_manual_protect_and_init_set()``."""
    from kvmsim.kvm.dirty import enable_manual_protect
    for init_set in (False, True):
        host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
        if init_set:
            enable_manual_protect(kvm, 3)
        host.mm.host_access(vma.start, True, 1)
        assert vcpu.write(0, 2).ok and _leaf(kvm).writable
        kvm.set_user_memory_region(0, 0, PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
        assert _leaf(kvm).writable is init_set
        assert kvm.journal.counters["tlb_flush:kvm_mmu_wp_memory_region"] == (0 if init_set else 1)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_readonly_memslot_write_is_an_mmio_exit(policy):
    """``kvm_handle_guest_abort()``: ``write_fault && !writable`` → ``io_mem_abort()``, no GUP."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.READONLY, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    acc = vcpu.write(0, 3)
    assert acc.exit == Exit.MMIO and kvm.journal.counters["io_mem_abort"] == 1
    assert kvm.journal.counters["hva_to_pfn"] == 0
    assert vcpu.read(0).value == 1 and not _leaf(kvm).writable


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_unmap_marks_no_page(policy):
    """``stage2_unmap_walker()`` pushes no A/D to the page, in v6.12 either (unlike legacy x86)."""
    host, kvm, vma, vcpu = make_vm(policy, arch="arm64")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 5).ok
    before = kvm.journal.snapshot()
    host.mm.munmap(vma.start, PAGE)
    d = kvm.journal.since(before)
    assert d["spte_zap"] == 1
    assert not any(k.startswith(("set_dirty:kvm_", "mark_accessed:kvm_")) for k in d)
    assert _leaf(kvm) is None
