"""Every validator fires when model state is broken on purpose, and not otherwise.

Event invariants are broken through model paths (a legacy fault on a TTM page, a fault racing an
invalidation, a zap of a reserved pfn with ``kvm_is_ad_tracked_page()`` switched off, an explorer
mutation), each asserting the clean case first (the same workload under the series, or without the
mutation).  State invariants are broken by corrupting the state a validator reads (a host PTE
remapped behind KVM's back, an SPTE bit cleared), as drgn's tests corrupt real lists.
"""

import numpy as np
import pytest

from kvmsim.check import INVARIANTS, STATE_ONLY, VALIDATORS, Checker, check_all, check_fact, validator
from kvmsim.explore import SCENARIOS, Mutations, execute, explore
from kvmsim.kvm.host_map import KvmHostMap
from kvmsim.kvm.pfn import Hold, gfn_to_page
from kvmsim.kvm.stage2 import S2
from kvmsim.mm.vma import VmaKind
from kvmsim.trace import Fact, FactKind, Journal, Src

from tests.helpers import make_vm


def _vm(policy="series", kind=VmaKind.ANON_SHARED):
    """An 8-page memslot with page 1 written by the guest."""
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


def _ttm_vm(policy):
    """amdgpu/TTM: order-2 allocations without __GFP_COMP behind VM_PFNMAP|VM_IO (tails have refcount 0)."""
    host, kvm, _, _ = make_vm(policy)
    drv = host.add_driver("ttm", 4, "driver_refcounted", order=2, compound=False)
    vma = host.mm.mmap(4 * 4096, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    return host, kvm, kvm.create_vcpu()


def test_inv1_remapped_reference():
    _, kvm, vcpu = _ttm_vm("series")
    assert [vcpu.write(i * 4096, 1).ok for i in range(4)] == [True] * 4
    assert not _fires(kvm, "INV-1")
    _, kvm, vcpu = _ttm_vm("legacy")                       # kvm_try_get_pfn(): get_page_unless_zero()
    assert [vcpu.write(i * 4096, 1).ok for i in range(4)] == [True, False, False, False]
    found = _fires(kvm, "INV-1")
    assert found and all("VM_PFNMAP/VM_IO" in v.detail and v.objects["source"] == "remapped" for v in found)


def test_inv1_leak():
    host, kvm, vma, _ = _vm()
    kvm.host_refs[(_pfn(host, vma), Hold.GET)] = 1
    assert any("leak" in v.detail for v in _fires(kvm, "INV-1"))


def _zap_after_write(policy):
    """A write fault maps a page, then the host zaps it (the mmu_notifier unmaps the SPTE)."""
    host, kvm, vma, _ = _vm(policy)
    host.mm.madvise(vma.start, 8 * 4096, "DONTNEED")
    return kvm


def test_inv2_mark_from_spte():
    assert not _fires(_zap_after_write("series"), "INV-2")
    found = _fires(_zap_after_write("legacy"), "INV-2")   # kvm_set_pfn_accessed(spte_to_pfn(old_spte))
    assert found and all(v.objects["source"] == "spte" for v in found)


def test_inv3_mark_after_unlock():
    host, kvm, vma, _ = _vm("series")                     # kvm_release_faultin_page() under mmu_lock
    assert not _fires(kvm, "INV-3")
    assert [f for f in host.journal.facts if f.kind == "mark_accessed" and f.by_fault_release]
    host, kvm, vma, _ = _vm("legacy")                     # kvm_release_pfn_clean() after write_unlock()
    found = _fires(kvm, "INV-3")
    assert found and all(v.detail.endswith("after dropping mmu_lock") for v in found)


def test_inv3_is_judged_by_the_fault_release_marker_not_the_caller():
    j = Journal()
    with j.fault_release():
        j.fact("mark_accessed", pfn=5, caller="some_new_release_fn", kvm=True, source=Src.HELD, locked=False)
    j.fact("mark_accessed", pfn=5, caller="kvm_release_faultin_page", kvm=True, source=Src.HELD, locked=False,
           fault_release=False)
    marked, unmarked = j.facts
    assert marked.by_fault_release and [v.invariant for v in check_fact(marked)] == ["INV-3"]
    assert not unmarked.by_fault_release and check_fact(unmarked) == []


def test_inv4_clean_file_folio_under_writable_spte():
    host, kvm, vma, vcpu = _vm(kind=VmaKind.FILE)
    assert not _fires(kvm, "INV-4")
    host.phys.folio_clear_dirty(_pfn(host, vma))          # writeback without the mmu_notifier
    assert _fires(kvm, "INV-4")


def test_inv4_nonatomic_zap_loses_the_dirty_bit():
    assert explore(SCENARIOS["lost-dirty-bit"], "legacy", Mutations(), bound=2).violating is None
    res = explore(SCENARIOS["lost-dirty-bit"], "legacy", Mutations(nonatomic_spte=True), bound=2)
    assert res.violating is not None and res.violating.violation.invariant == "INV-4"


def _fault_racing_munmap(policy, mutations):
    """The vCPU snapshots mmu_invalidate_seq and resolves the pfn; munmap runs; then the vCPU maps."""
    from kvmsim.sched import run_interleaved
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    from kvmsim.explore.mutations import install
    install(kvm, mutations)
    run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0x1000, True),
                     "host": host.mm.munmap.steps(vma.start, 4 * 4096)},
                    ["vcpu", "vcpu", "host", "host", "host", "host"], sched=kvm.sched)
    return kvm


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_inv5_fault_racing_munmap_without_the_retry(policy):
    # munmap's invalidate_range_start holds mmu_lock; the vCPU snapshots mmu_invalidate_seq and resolves
    # the old pfn meanwhile, then maps it after munmap finished (explore's fault-vs-munmap race)
    schedule = ["host", "vcpu0", "vcpu0"]
    clean = execute(SCENARIOS["fault-vs-munmap"], policy, Mutations(), schedule, strict=True)
    assert clean.violation is None
    broken = execute(SCENARIOS["fault-vs-munmap"], policy, Mutations(skip_retry=True), schedule, strict=True)
    assert broken.violation is not None and broken.violation.invariant == "INV-5"
    assert "SPTE" in broken.violation.detail


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
    assert not _fires(_fault_racing_munmap("series", None), "INV-7")   # kvm_release_faultin_page(unused)
    found = _fires(_fault_racing_munmap("legacy", None), "INV-7")       # kvm_release_pfn_clean(): accessed
    assert found and all("released unused" in v.detail for v in found)


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


def _reserved_ram_zapped():
    """Legacy: a fault maps reserved RAM behind VM_PFNMAP, then munmap zaps the SPTE."""
    host, kvm, _, _ = make_vm("legacy")
    drv = host.add_driver("ram", 4, "reserved")
    vma = host.mm.mmap(4 * 4096, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    assert kvm.create_vcpu().write(0, 1).ok
    host.mm.munmap(vma.start, 4 * 4096)
    return kvm


def test_inv9_reserved_page_dirtied(monkeypatch):
    assert not _fires(_reserved_ram_zapped(), "INV-9")
    import kvmsim.kvm.pfn as pfn_mod                       # switch off kvm_is_ad_tracked_page()
    monkeypatch.setattr(pfn_mod, "kvm_is_ad_tracked_page", lambda phys, pfn: phys.pfn_valid(pfn))
    found = _fires(_reserved_ram_zapped(), "INV-9")
    assert found and all("PG_reserved" in v.detail for v in found)


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
    assert not _fires(_zap_after_write("series"), "INV-12")
    found = _fires(_zap_after_write("legacy"), "INV-12")
    assert found and all("from a stage-2 PTE" in v.detail for v in found)


def test_every_invariant_has_a_negative_test():
    names = {n for n in globals() if n.startswith("test_inv")}
    for inv in INVARIANTS:
        assert any(n.startswith(f"test_{inv.lower().replace('-', '')}_") for n in names), inv


def test_checker_reports_once_with_step():
    host, kvm, vma, _ = _vm("legacy")
    ck = Checker(kvm)
    ck.run()
    host.journal.step = 7
    host.mm.madvise(vma.start + 4096, 4096, "DONTNEED")   # legacy: A/D from the zapped SPTE
    first = ck.run()
    assert first and {v.step for v in first} == {7}
    assert ck.run() == []


def test_registry_has_one_validator_per_event_invariant():
    assert set(VALIDATORS) | STATE_ONLY == set(INVARIANTS) and STATE_ONLY == {"INV-10"}
    assert all(fn.__name__ == "validate_inv_" + inv.split("-")[1] for inv, fn in VALIDATORS.items())
    with pytest.raises(ValueError, match="already has a validator"):
        validator("INV-1")(lambda f: [])
    with pytest.raises(ValueError, match="unknown invariant"):
        validator("INV-99")


def test_journal_rejects_an_unknown_fact_kind():
    j = Journal()
    j.fact("spte_set", pfn=1)                              # a FactKind value, as a str
    assert j.facts[0].kind is FactKind.SPTE_SET
    with pytest.raises(ValueError, match="unknown fact kind 'spte_sett'"):
        j.fact("spte_sett", pfn=1)
