"""guest_memfd private faults on x86 (kvmsim.x86.private_mem, kvmsim.kvm.gmem, kvmsim.kvm.memory_attributes):
the private/shared mismatch exit, the max-order rule and mixed huge pages, punch-hole invalidation,
and what v6.12 and v6.13 do differently with the guest_memfd folio (patches 41, 46, 47, 48, 8, 82)."""

from __future__ import annotations

import errno

import pytest

from kvmsim.kvm import fault as fault_mod
from kvmsim.kvm import gmem as gmem_mod
from kvmsim.kvm.gmem import GuestMemfd, kvm_gmem_punch_hole
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memory_attributes import kvm_mem_is_private, kvm_vm_ioctl_set_mem_attributes
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind
from kvmsim.uapi import KVM_MEM, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, Exit
from kvmsim.x86.private_mem import kvm_max_level_for_order, kvm_max_private_mapping_level
from kvmsim.x86.spte import tables

PAGE = 4096
MB2 = 2 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


def gmem_vm(policy: str = "series", size: int = 4 * PAGE, thp: bool = False):
    """An x86 VM with one guest_memfd memslot (id 1, gpa 0) whose shared half is an anon VMA."""
    host = Host(recording=True)
    kvm = Kvm(host, policy=policy, arch="x86")
    vma = host.mm.mmap(size, VmaKind.ANON, **({"thp": True} if thp else {}))
    g = GuestMemfd(kvm, size)
    kvm.set_user_memory_region(1, 0, size, vma.start, KVM_MEM.GUEST_MEMFD, guest_memfd=g)
    return host, kvm, g, kvm.create_vcpu()


def level_of(kvm, gfn: int) -> int:
    slot = kvm.gfn_to_memslot(gfn)
    return int(tables(slot).level[gfn - slot.base_gfn])


def present(kvm, gfn: int) -> bool:
    from kvmsim.x86.spte import P
    slot = kvm.gfn_to_memslot(gfn)
    return bool(tables(slot).bits[gfn - slot.base_gfn] & P)


def facts(host, kind: str, caller: str | None = None):
    return [f for f in host.journal.facts if f.kind == kind and (caller is None or f.caller == caller)]


# ---- the private fault ---------------------------------------------------------------------------------

def test_a_private_fault_takes_the_folio_from_guest_memfd_through_the_one_template(monkeypatch):
    host, kvm, g, vcpu = gmem_vm()
    calls = []
    real = fault_mod.kvm_stage2_fault.steps

    def spy(mmu, fault):
        calls.append(fault.is_private)
        return real(mmu, fault)
    monkeypatch.setattr(fault_mod.kvm_stage2_fault, "steps", spy)
    assert vcpu.write(0, 3).ok                               # shared: the VMA's page
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    before = host.journal.counters["hva_to_pfn"]
    acc = vcpu.write(0, 5)
    assert acc.ok and calls == [False, True]
    assert host.journal.counters["hva_to_pfn"] == before     # no GUP for the private fault
    assert host.journal.counters["kvm_gmem_get_pfn"] == 1
    slot = kvm.gfn_to_memslot(0)
    assert int(tables(slot).pfn[0]) == int(g.pages[0])       # the SPTE maps guest_memfd's folio
    assert vcpu.read(0).value == 5


def test_the_private_write_does_not_touch_the_shared_page():
    host, kvm, g, vcpu = gmem_vm()
    vcpu.write(0, 3)
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    vcpu.write(0, 5)
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, 0)
    assert vcpu.read(0).value == 3                           # shared again: the VMA's page, unchanged


# ---- the mismatch exit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_private_access_to_a_shared_gfn_is_a_memory_fault_exit(policy):
    host, kvm, g, vcpu = gmem_vm(policy)
    vcpu.pferr_private = True
    acc = vcpu.access(2 * PAGE + 8, True, 1)
    assert acc.exit is Exit.MEMORY_FAULT and acc.errno == errno.EFAULT
    mf = vcpu.memory_fault
    assert (mf.gpa, mf.size, mf.flags) == (2 * PAGE, PAGE, KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert host.journal.counters["kvm_gmem_get_pfn"] == 0 and not present(kvm, 2)


def test_a_shared_access_to_a_private_gfn_exits_without_the_private_flag_even_over_a_present_spte():
    host, kvm, g, vcpu = gmem_vm()
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    assert vcpu.write(0, 9).ok and present(kvm, 0)           # SW-protected: derived private
    vcpu.pferr_private = False                               # the guest's shared bit
    acc = vcpu.read(0)
    assert acc.exit is Exit.MEMORY_FAULT and vcpu.memory_fault.flags == 0
    vcpu.pferr_private = None
    assert vcpu.read(0).value == 9                           # the mapping is still there


def test_a_private_gfn_in_a_memslot_without_guest_memfd_exits():
    host = Host(recording=True)
    kvm = Kvm(host, arch="x86")
    vma = host.mm.mmap(PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, PAGE, vma.start)
    vcpu = kvm.create_vcpu()
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    acc = vcpu.read(0)
    assert acc.exit is Exit.MEMORY_FAULT and vcpu.memory_fault.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE


def test_a_poisoned_guest_memfd_page_is_a_memory_fault_with_ehwpoison():
    from kvmsim.errors import EHWPOISON
    host, kvm, g, vcpu = gmem_vm()
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    g.hwpoison.add(0)
    acc = vcpu.read(0)
    assert acc.exit is Exit.MEMORY_FAULT and acc.errno == EHWPOISON


# ---- the max-order rule and mixed huge pages -------------------------------------------------------

def test_kvm_max_level_for_order_and_the_private_cap():
    assert [kvm_max_level_for_order(o) for o in (0, 8, 9, 17, 18, 20)] == [1, 1, 2, 2, 3, 3]
    assert kvm_max_private_mapping_level(None, 0, 3, 9) == 2
    assert kvm_max_private_mapping_level(None, 0, 1, 18) == 1
    assert kvm_max_private_mapping_level(None, 0, 2, 18) == 2


def test_a_private_fault_maps_4k_inside_a_uniformly_private_huge_page():
    host, kvm, g, vcpu = gmem_vm(size=2 * MB2, thp=True)
    assert vcpu.write(MB2, 1).ok and level_of(kvm, MB2 >> 12) == 2      # shared THP: 2M
    kvm_vm_ioctl_set_mem_attributes(kvm, MB2, MB2, PRIVATE)
    assert not present(kvm, MB2 >> 12)                                 # the conversion zapped it
    assert vcpu.write(MB2, 1).ok and level_of(kvm, MB2 >> 12) == 1     # max_order 0: 4K


def test_one_private_gfn_makes_its_huge_page_mixed_and_converting_back_clears_it():
    host, kvm, g, vcpu = gmem_vm(size=2 * MB2, thp=True)
    assert vcpu.write(0, 1).ok and level_of(kvm, 0) == 2
    kvm_vm_ioctl_set_mem_attributes(kvm, 5 * PAGE, PAGE, PRIVATE)
    assert vcpu.write(0, 1).ok and level_of(kvm, 0) == 1
    kvm_vm_ioctl_set_mem_attributes(kvm, 5 * PAGE, PAGE, 0)
    kvm.arch.unmap_gfn_range(kvm.gfn_to_memslot(0), 0, 512)
    assert vcpu.write(0, 1).ok and level_of(kvm, 0) == 2


# ---- punch-hole invalidation ------------------------------------------------------------------------

def test_punch_hole_zaps_the_private_spte_and_frees_the_folio_without_the_mmu_notifier():
    host, kvm, g, vcpu = gmem_vm()
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, 2 * PAGE, PRIVATE)
    vcpu.write(0, 1)
    vcpu.write(PAGE, 1)
    pfn = int(g.pages[0])
    seq, notif = kvm.mmu_invalidate_seq, host.journal.counters["mmu_notifier_invalidate"]
    kvm_gmem_punch_hole(kvm, g, 0, 1)
    assert not present(kvm, 0) and present(kvm, 1)
    assert int(g.pages[0]) == -1 and host.phys.page_count(pfn) == 0
    assert kvm.mmu_invalidate_seq == seq + 1 and kvm.mmu_invalidate_in_progress == 0
    assert host.journal.counters["mmu_notifier_invalidate"] == notif
    from kvmsim.check import check_all
    assert not [v for v in check_all(kvm) if v.invariant == "INV-5"]


def test_punch_hole_of_an_unbound_range_invalidates_nothing():
    host, kvm, g, vcpu = gmem_vm()
    g2 = GuestMemfd(kvm, PAGE)                  # no memslot bound
    seq = kvm.mmu_invalidate_seq
    kvm_gmem_punch_hole(kvm, g2, 0, 1)
    kvm_gmem_punch_hole(kvm, g, 8, 4)           # past the binding
    assert kvm.mmu_invalidate_seq == seq


def test_without_the_zap_the_freed_folio_stays_mapped(monkeypatch):
    """The invalidation is what keeps INV-5: skip it and the checker finds the freed folio mapped."""
    from kvmsim.check import check_all
    host, kvm, g, vcpu = gmem_vm()
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    vcpu.write(0, 1)
    assert not [v for v in check_all(kvm) if v.invariant == "INV-5"]
    monkeypatch.setattr(kvm.arch, "unmap_gfn_range", lambda *a, **k: False)     # the zap skipped
    kvm_gmem_punch_hole(kvm, g, 0, 1)
    assert [v for v in check_all(kvm) if v.invariant == "INV-5"]


# ---- legacy vs series -----------------------------------------------------------------------------------

def _private_fault(policy: str, write: bool):
    host, kvm, g, vcpu = gmem_vm(policy)
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    assert vcpu.access(0, write, 1 if write else None).ok
    return host, kvm, g, vcpu, int(g.pages[0])


@pytest.mark.parametrize("write", [False, True])
def test_patch_41_the_series_dirties_the_folio_at_fault_finish_legacy_does_not(write):
    host, _, _, _, pfn = _private_fault("series", write)
    assert host.phys.folio_test_dirty(pfn)                 # map_writable, even for a read
    assert [f.locked for f in facts(host, "set_dirty", "kvm_release_faultin_page")] == [True]
    host, _, _, _, pfn = _private_fault("legacy", write)
    assert not host.phys.folio_test_dirty(pfn)
    assert not facts(host, "set_dirty")


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_patches_8_82_legacy_dirties_and_ages_at_the_zap_series_never(policy):
    host, kvm, g, vcpu, pfn = _private_fault(policy, True)
    n_dirty, n_acc = len(facts(host, "set_dirty")), len(facts(host, "mark_accessed"))
    kvm_gmem_punch_hole(kvm, g, 0, 1)
    zap_dirty = facts(host, "set_dirty")[n_dirty:]
    zap_acc = facts(host, "mark_accessed")[n_acc:]
    if policy == "legacy":
        assert [f.caller for f in zap_dirty] == ["kvm_unmap_gfn_range"]
        assert [f.caller for f in zap_acc] == ["kvm_unmap_gfn_range"]
    else:
        assert zap_dirty == [] and zap_acc == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_patches_46_47_the_series_releases_the_page_gmem_reported_legacy_guesses(policy):
    host, kvm, g, vcpu, pfn = _private_fault(policy, False)
    puts = [f for f in facts(host, "put") if f.kvm]
    assert len(puts) == 1 and puts[0].pfn == pfn
    caller = {"legacy": "kvm_release_pfn_clean", "series": "kvm_release_faultin_page"}[policy]
    assert puts[0].caller == caller
    assert str(puts[0].source).lower().endswith({"legacy": "guess", "series": "held"}[policy])
    assert kvm.host_refs.get((pfn, gmem_mod.Hold.GET), 0) == 0        # the reference went back


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_patch_48_a_private_fault_retried_by_a_conversion_is_put_only_in_the_series(policy):
    host, kvm, g, vcpu = gmem_vm(policy)
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    from kvmsim.x86.mmu import kvm_mmu_page_fault
    gen = kvm_mmu_page_fault.steps(kvm.arch, vcpu, 0, True)
    labels = [next(gen) for _ in range(3)]                # fast path, mmu_seq snapshot, pfn resolved
    assert labels[-1].endswith("pfn resolved")
    kvm_vm_ioctl_set_mem_attributes(kvm, PAGE, PAGE, PRIVATE)          # another gfn: seq moves on
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert int(stop.value.value) == fault_mod.FaultRet.RETRY and not present(kvm, 0)
    unused_aged = [f for f in facts(host, "mark_accessed") if f.extra.get("unused")]
    assert bool(unused_aged) == (policy == "legacy")


def test_a_conversion_of_the_faulting_gfn_retries_and_maps_nothing_private():
    host, kvm, g, vcpu = gmem_vm()
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, PRIVATE)
    from kvmsim.x86.mmu import kvm_mmu_page_fault
    gen = kvm_mmu_page_fault.steps(kvm.arch, vcpu, 0, True)
    for _ in range(3):
        next(gen)
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, 0)                  # converted back to shared
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert int(stop.value.value) == fault_mod.FaultRet.RETRY
    assert not present(kvm, 0) and not kvm_mem_is_private(kvm, 0)


# ---- the race, explored ------------------------------------------------------------------------------

def test_explore_finds_the_legacy_unused_folio_aged_by_a_punch_hole_race_and_the_series_clean():
    from kvmsim.explore import SCENARIOS, Mutations, explore
    sc = SCENARIOS["private-fault-vs-punch-hole"]
    res = explore(sc, "legacy", Mutations(), bound=2)
    assert res.violating is not None
    v = res.violating.violation
    assert v.invariant == "INV-7" and "RETRY" in v.detail
    threads = [s.thread for s in res.violating.steps]
    assert "host" in threads and threads.index("host") > 0     # the hole lands inside the fault
    assert explore(sc, "series", Mutations(), bound=2).violating is None
