"""RISC-V ``kvm_riscv_gstage_map()`` / ``gstage_page_fault()`` (arch/riscv/kvm/mmu.c, vcpu_exit.c) under
v6.12 and v6.13.

Each test states the kernel line it checks.  v6.12 lines are the "-" side of the v13 series patches
57 "KVM: RISC-V: Mark "struct page" pfns dirty iff a stage-2 PTE is installed" and 58 "KVM: RISC-V:
Mark "struct page" pfns accessed before dropping mmu_lock"; v6.13 lines the "+" side of patch 59
"KVM: RISC-V: Use kvm_faultin_pfn() when mapping pfns into the guest".
"""

from __future__ import annotations

import errno

import pytest

from kvmsim.check import check_all, check_fact
from kvmsim.errors import UsageError
from kvmsim.kvm.arch import make_arch
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.fault import FaultRet as RET_PF
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.vma import VmaKind
from kvmsim.riscv import RiscvMmu
from kvmsim.sched import run_interleaved
from kvmsim.trace import Fact, Src

from tests.helpers import PAGE, make_vm


def _facts(kvm, kind, caller):
    return [f for f in kvm.journal.facts if f.kind == kind and f.caller == caller]


def _inv(kvm, inv):
    return [v for v in check_all(kvm) if v.invariant == inv]


def _leaf(kvm, gfn=0):
    return {lf.gfn: lf for lf in kvm.arch.leaves()}.get(gfn)


def _marks(d):
    return {k: v for k, v in d.items() if k.startswith(("set_dirty:kvm", "mark_accessed:kvm", "put_page:kvm"))}


def test_riscv_is_an_arch_and_listed_in_the_error():
    _, kvm, _, _ = make_vm("series", arch="riscv")
    assert isinstance(kvm.arch, RiscvMmu) and kvm.arch.name == "riscv"
    with pytest.raises(UsageError, match="riscv"):
        make_arch(kvm, "sparc")


# ---- where the page is dirtied, aged and put ------------------------------------------------------------

def test_legacy_dirties_under_the_lock_before_mapping_and_ages_after_unlock():
    """v6.12: ``if (writable) { kvm_set_pfn_dirty(hfn); mark_page_dirty(); ret = gstage_map_page(); }`` …
    ``spin_unlock(); kvm_set_pfn_accessed(hfn); kvm_release_pfn_clean(hfn);``"""
    host, kvm, vma, vcpu = make_vm("legacy", arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 7).ok
    c = kvm.journal.counters
    assert _marks(c) == {"set_dirty:kvm_riscv_gstage_map": 1, "mark_accessed:kvm_riscv_gstage_map": 1,
                         "mark_accessed:kvm_release_pfn_clean": 1, "put_page:kvm_release_pfn_clean": 1}
    (dirty,) = _facts(kvm, "set_dirty", "kvm_riscv_gstage_map")
    (acc,) = _facts(kvm, "mark_accessed", "kvm_riscv_gstage_map")
    (spte,) = _facts(kvm, "spte_set", "gstage_set_pte")
    assert dirty.locked and not acc.locked and dirty.source == Src.HELD
    facts = kvm.journal.facts
    assert facts.index(dirty) < facts.index(spte) < facts.index(acc)
    assert _leaf(kvm).writable and _leaf(kvm).accessed and _leaf(kvm).dirty


def test_series_releases_dirty_under_the_lock_after_mapping():
    """v6.13: ``kvm_release_faultin_page(kvm, page, ret && ret != -EEXIST, writable); spin_unlock();``"""
    host, kvm, vma, vcpu = make_vm("series", arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 7).ok
    c = kvm.journal.counters
    assert _marks(c) == {"set_dirty:kvm_release_faultin_page": 1, "mark_accessed:kvm_release_faultin_page": 1,
                         "put_page:kvm_release_faultin_page": 1}
    (dirty,) = _facts(kvm, "set_dirty", "kvm_release_faultin_page")
    (spte,) = _facts(kvm, "spte_set", "gstage_set_pte")
    assert dirty.locked and all(f.locked for f in _facts(kvm, "mark_accessed", "kvm_release_faultin_page"))
    assert kvm.journal.facts.index(spte) < kvm.journal.facts.index(dirty)
    assert kvm.host_refs == {}


def test_inv3_checker_flags_legacy_accessed_after_unlock_not_its_locked_dirty_nor_series():
    found = {}
    for policy in ("legacy", "series"):
        host, kvm, vma, vcpu = make_vm(policy, arch="riscv")
        host.mm.host_access(vma.start, True, 1)
        assert vcpu.write(0, 7).ok
        if policy == "legacy":                 # kvm_riscv_gstage_map()'s own marking is a fault release
            assert all(f.by_fault_release for f in _facts(kvm, "mark_accessed", "kvm_riscv_gstage_map"))
        found[policy] = sorted(v.detail for v in _inv(kvm, "INV-3"))
    assert found["legacy"] == ["kvm_release_pfn_clean: mark_page_accessed after dropping mmu_lock",
                               "kvm_riscv_gstage_map: mark_page_accessed after dropping mmu_lock"]
    assert found["series"] == []


@pytest.mark.parametrize("locked,flagged", [(False, True), (True, False)])
def test_the_riscv_caller_is_judged_by_the_lock(locked, flagged):
    """INV-3 judges a fault release's mark by whether mmu_lock was held, whoever the caller is (the
    release records inside ``journal.fault_release()``, which sets the flag)."""
    f = Fact(kind="mark_accessed", pfn=5, caller="kvm_riscv_gstage_map", kvm=True, source=Src.HELD, locked=locked,
             fault_release=True)
    assert f.by_fault_release
    assert bool([v for v in check_fact(f) if v.invariant == "INV-3"]) is flagged


# ---- a failed map: gstage_set_pte() errors (injected; see RiscvMmu.inject_set_pte_error) ----------------

@pytest.mark.parametrize("err", [-errno.ENOMEM, -errno.EEXIST])
def test_legacy_dirties_even_when_the_map_fails(err):
    """v6.12 ``kvm_set_pfn_dirty(hfn)`` precedes ``gstage_map_page()`` (patch 57: "Don't mark pages dirty if
    KVM bails from the page fault handler without installing a stage-2 mapping")."""
    host, kvm, vma, vcpu = make_vm("legacy", flags=KVM_MEM.LOG_DIRTY_PAGES, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    kvm.arch.inject_set_pte_error = err
    assert kvm.arch.page_fault(vcpu, 0, True) == err               # forwarded by gstage_page_fault()
    assert _leaf(kvm) is None and kvm.journal.counters["kvm_err:Failed to map in G-stage"] == 1
    assert _marks(kvm.journal.counters) == {
        "set_dirty:kvm_riscv_gstage_map": 1, "mark_accessed:kvm_riscv_gstage_map": 1,
        "mark_accessed:kvm_release_pfn_clean": 1, "put_page:kvm_release_pfn_clean": 1}
    assert kvm.gfn_to_memslot(0).dirty_bitmap[0]                   # mark_page_dirty() also precedes the map
    assert bool(_inv(kvm, "INV-7")) is (err == -errno.ENOMEM)      # -EEXIST: a block leaf maps the page


@pytest.mark.parametrize("err,used", [(-errno.ENOMEM, False), (-errno.EEXIST, True)])
def test_series_releases_a_failed_map_unused_except_eexist(err, used):
    """v6.13: ``unused = ret && ret != -EEXIST``: -ENOMEM → put only; -EEXIST → dirty + accessed."""
    host, kvm, vma, vcpu = make_vm("series", arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    kvm.arch.inject_set_pte_error = err
    acc = vcpu.write(0, 7)
    assert acc.exit == Exit.EFAULT and acc.errno == -err
    expect = {"put_page:kvm_release_faultin_page": 1}
    if used:
        expect |= {"set_dirty:kvm_release_faultin_page": 1, "mark_accessed:kvm_release_faultin_page": 1}
    assert _marks(kvm.journal.counters) == expect
    assert _leaf(kvm) is None and kvm.host_refs == {} and check_all(kvm) == []


# ---- mmu_invalidate_retry(): ret stays 0 ----------------------------------------------------------------

def _fault_vs_munmap(policy, write=True, flags=KVM_MEM(0)):
    host, kvm, vma, vcpu = make_vm(policy, kind=VmaKind.ANON, flags=flags, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    res = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, write),
                           "host": host.mm.munmap.steps(vma.start, PAGE)},
                          ["vcpu", "vcpu", "host", "host", "host", "host"], sched=kvm.sched)
    assert res["vcpu"] == RET_PF.RETRY and kvm.journal.counters["fault_retry"] == 1
    assert _leaf(kvm) is None and kvm.host_refs == {}
    return kvm


def test_legacy_retry_ages_the_unused_page_twice_after_unlock_without_dirtying():
    """v6.12: ``goto out_unlock`` skips ``kvm_set_pfn_dirty()``; the accessed marks and put still run."""
    kvm = _fault_vs_munmap("legacy")
    assert _marks(kvm.journal.counters) == {"mark_accessed:kvm_riscv_gstage_map": 1,
                                            "mark_accessed:kvm_release_pfn_clean": 1,
                                            "put_page:kvm_release_pfn_clean": 1}
    assert len(_inv(kvm, "INV-7")) == 2


def test_series_retry_counts_as_used_dirty_and_accessed_under_the_lock():
    """v6.13: ret == 0 at out_unlock, so ``kvm_release_faultin_page(kvm, page, false, writable)``: the page
    nothing maps is released dirty (kvm-semantics.md §3, INV-7's RISC-V exception)."""
    kvm = _fault_vs_munmap("series")
    assert _marks(kvm.journal.counters) == {"set_dirty:kvm_release_faultin_page": 1,
                                            "mark_accessed:kvm_release_faultin_page": 1,
                                            "put_page:kvm_release_faultin_page": 1}
    assert all(f.locked for f in _facts(kvm, "set_dirty", "kvm_release_faultin_page"))
    assert not _inv(kvm, "INV-7") and not _inv(kvm, "INV-3")         # the kernel declares it used


def test_series_retry_of_a_logging_read_fault_is_accessed_but_not_dirty():
    """``if (logging && !is_write) writable = false;`` happens before the lock, so the retry's release is clean."""
    kvm = _fault_vs_munmap("series", write=False, flags=KVM_MEM.LOG_DIRTY_PAGES)
    assert _marks(kvm.journal.counters) == {"mark_accessed:kvm_release_faultin_page": 1,
                                            "put_page:kvm_release_faultin_page": 1}


# ---- dirty logging ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_logging_read_fault_maps_read_only_then_a_store_fault_maps_again(policy):
    """A read fault under logging maps read-only and dirties nothing; the store then takes a guest page
    fault that runs the whole ``kvm_riscv_gstage_map()`` again (no permission-relax path)."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    slot = kvm.gfn_to_memslot(0)
    caller = "kvm_release_faultin_page" if policy == "series" else "kvm_riscv_gstage_map"
    assert vcpu.read(0).value == 1
    assert not _leaf(kvm).writable and not slot.dirty_bitmap[0]
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 0
    assert kvm.journal.counters[f"mark_accessed:{caller}"] == 1
    assert vcpu.write(0, 9).ok
    assert _leaf(kvm).writable and slot.dirty_bitmap[0]
    c = kvm.journal.counters
    assert c["spte_write"] == 2 and c["hva_to_pfn"] == 2 and c[f"set_dirty:{caller}"] == 1


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_read_fault_without_logging_maps_writable_and_dirties(policy):
    """``gfn_to_pfn_prot()`` / ``kvm_faultin_pfn()`` hand back ``writable`` for a read fault too."""
    host, kvm, vma, vcpu = make_vm(policy, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.read(0).value == 1 and _leaf(kvm).writable
    caller = "kvm_release_faultin_page" if policy == "series" else "kvm_riscv_gstage_map"
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 1


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_mark_page_dirty_happens_under_the_lock_before_unlock(policy):
    """``mark_page_dirty(kvm, gfn)`` sits inside ``if (writable)`` under ``spin_lock()`` in both versions
    (arm64 logs after ``read_unlock()``)."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    gen = kvm.arch.page_fault.steps(vcpu, 0, True)
    label = ""
    while "spin_unlock" not in label:
        label = next(gen)
        if "write_lock(mmu_lock) acquired" in label:
            assert not kvm.gfn_to_memslot(0).dirty_bitmap[0]
    assert kvm.gfn_to_memslot(0).dirty_bitmap[0]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_enabling_logging_write_protects_even_with_initially_set(policy):
    """``kvm_arch_commit_memory_region()``: ``gstage_wp_memory_region()`` whenever the new slot logs; RISC-V
    has no ``kvm_dirty_log_manual_protect_and_init_set()`` exception."""
    for manual in (0, 3):
        host, kvm, vma, vcpu = make_vm(policy, manual_protect=manual, arch="riscv")
        host.mm.host_access(vma.start, True, 1)
        assert vcpu.write(0, 2).ok and _leaf(kvm).writable
        kvm.set_user_memory_region(0, 0, PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
        assert not _leaf(kvm).writable
        assert kvm.journal.counters["tlb_flush:gstage_wp_memory_region"] == 1


def test_clear_dirty_log_write_protects_from_first_to_last_set_bit():
    """``kvm_arch_mmu_enable_log_dirty_pt_masked()``: ``gstage_wp_range(__ffs(mask), __fls(mask) + 1)``."""
    import numpy as np
    host, kvm, vma, vcpu = make_vm("series", pages=4, arch="riscv")
    for g in range(4):
        host.mm.host_access(vma.start + g * PAGE, True, g)
        assert vcpu.write(g * PAGE, g).ok
    kvm.arch.enable_log_dirty_pt_masked(kvm.gfn_to_memslot(0), 0, np.array([1, 0, 1, 0], dtype=bool))
    assert [_leaf(kvm, g).writable for g in range(4)] == [False, False, False, True]


# ---- zapping and aging -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_unmap_marks_no_page_and_flushes_per_leaf(policy):
    """``gstage_op_pte(GSTAGE_OP_CLEAR)``: PTE cleared, ``gstage_remote_tlb_flush()``; ``kvm_unmap_gfn_range()``
    returns false, so the notifier does not flush again."""
    host, kvm, vma, vcpu = make_vm(policy, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 5).ok
    before = kvm.journal.snapshot()
    host.mm.munmap(vma.start, PAGE)
    d = kvm.journal.since(before)
    assert d["spte_zap"] == 1 and d["tlb_flush:gstage_remote_tlb_flush"] == 1
    assert "tlb_flush:invalidate_range_start" not in d and _marks(d) == {}
    assert _leaf(kvm) is None


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_aging_clears_a_and_the_next_access_faults_through_gstage_map(policy):
    """``kvm_age_gfn()``: ``ptep_test_and_clear_young()``, no page marking; without hardware A updates the
    next access is a guest page fault, which maps and marks the page again (v6.12 after the unlock)."""
    host, kvm, vma, vcpu = make_vm(policy, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.read(0).ok
    before = kvm.journal.snapshot()
    assert kvm.notifier.clear_flush_young(vma.start, vma.start + PAGE) is True
    d = kvm.journal.since(before)
    assert _marks(d) == {} and d["tlb_flush:clear_flush_young"] == 1
    assert not _leaf(kvm).accessed
    assert kvm.notifier.test_young(vma.start) is False
    before = kvm.journal.snapshot()
    assert vcpu.read(0).value == 1
    d = kvm.journal.since(before)
    assert d["page_fault"] == 1 and d["hva_to_pfn"] == 1 and _leaf(kvm).accessed
    acc = [f for f in kvm.journal.facts if f.kind == "mark_accessed" and f.caller in
           ("kvm_riscv_gstage_map", "kvm_release_faultin_page")][-1]
    assert acc.locked is (policy == "series")


def test_age_gfn_ages_only_the_leaf_at_range_start_and_warns():
    """``WARN_ON(size != PAGE_SIZE && size != PMD_SIZE && size != PUD_SIZE)``, then one leaf."""
    host, kvm, vma, vcpu = make_vm("series", pages=2, arch="riscv")
    for g in range(2):
        host.mm.host_access(vma.start + g * PAGE, True, 1)
        assert vcpu.read(g * PAGE).ok
    assert kvm.notifier.clear_young(vma.start, vma.start + 2 * PAGE) is True
    assert kvm.journal.counters["WARN_ON:kvm_age_gfn"] == 1
    assert [_leaf(kvm, g).accessed for g in range(2)] == [False, True]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_readonly_memslot_store_is_mmio_without_gup(policy):
    """``gstage_page_fault()``: ``EXC_STORE_GUEST_PAGE_FAULT && !writable`` → ``kvm_riscv_vcpu_mmio_store()``."""
    host, kvm, vma, vcpu = make_vm(policy, flags=KVM_MEM.READONLY, arch="riscv")
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 3).exit == Exit.MMIO
    assert kvm.journal.counters["kvm_riscv_vcpu_mmio_store"] == 1 and kvm.journal.counters["hva_to_pfn"] == 0
    assert vcpu.read(0).value == 1 and not _leaf(kvm).writable
    assert not _inv(kvm, "INV-10")
