"""KVM_PRE_FAULT_MEMORY (kvmsim.x86.prefault): errnos, range accounting, its SPTEs and folios, patch 5;
and patch 4 (a huge leaf over a TDP MMU page table) through mmu_set_spte()."""

import dataclasses
import errno

import pytest

from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.mm.reclaim import thp_collapse, thp_split
from kvmsim.mm.vma import VmaKind
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.policies.series import SeriesPolicy
from kvmsim.trace import FactKind, Src
from kvmsim.x86.prefault import KvmPreFaultMemory, kvm_vcpu_pre_fault_memory
from kvmsim.x86.spte import A, D, HW, MW, P, W, tables
from kvmsim.x86 import versions as x86_versions

PAGE = 4096


def _vm(policy="series", *, size=16 * PAGE, thp=False, **opts):
    host = Host()
    kvm = Kvm(host, policy=policy, arch="x86", **opts)
    vma = host.mm.mmap(size, VmaKind.ANON, thp=thp)
    kvm.set_user_memory_region(0, 0, size, vma.start, 0)
    return host, kvm, vma, kvm.create_vcpu()


def _prefault(v, gpa, size, flags=0):
    rng = KvmPreFaultMemory(gpa, size, flags)
    return kvm_vcpu_pre_fault_memory(v, rng), rng


def _bits(kvm, gfn):
    slot = kvm.gfn_to_memslot(gfn)
    return int(tables(slot).bits[gfn - slot.base_gfn])


@pytest.mark.parametrize("gpa,size,flags", [(0, PAGE, 1), (1, PAGE, 0), (0, PAGE + 1, 0), (0, 0, 0),
                                            ((1 << 64) - PAGE, 2 * PAGE, 0)])
def test_bad_ranges_are_einval(gpa, size, flags):
    host, kvm, vma, v = _vm()
    r, rng = _prefault(v, gpa, size, flags)
    assert r == -errno.EINVAL and rng.size == size


def test_no_memslot_is_enoent_and_nothing_mapped():
    host, kvm, vma, v = _vm()
    r, rng = _prefault(v, 1 << 30, PAGE)
    assert r == -errno.ENOENT and rng.size == PAGE


def test_a_range_running_off_the_memslot_maps_what_it_can_and_returns_0():
    """"Return success if at least one page was mapped successfully": range says how far it got."""
    host, kvm, vma, v = _vm()
    r, rng = _prefault(v, 14 * PAGE, 4 * PAGE)
    assert r == 0 and rng.gpa == 16 * PAGE and rng.size == 2 * PAGE
    assert _bits(kvm, 14) & P and _bits(kvm, 15) & P


def test_shadow_paging_is_eopnotsupp_direct_shadow_is_not():
    host, kvm, vma, v = _vm(mmu="shadow", paging="indirect")
    assert _prefault(v, 0, PAGE)[0] == -errno.EOPNOTSUPP
    host, kvm, vma, v = _vm(mmu="shadow")
    assert _prefault(v, 0, PAGE)[0] == 0 and _bits(kvm, 0) & P


def test_emulated_execution_has_no_tdp_so_eopnotsupp():
    """kvm_pvm on the development machines: KVM_CAP_PRE_FAULT_MEMORY is 0 (kvm-on-these-machines.md)."""
    host, kvm, vma, v = _vm(execution="emulated")
    assert _prefault(v, 0, PAGE)[0] == -errno.EOPNOTSUPP


def test_a_pending_signal_is_eintr():
    host, kvm, vma, v = _vm()
    host.mm.signal_pending = True
    r, rng = _prefault(v, 0, 2 * PAGE)
    assert r == -errno.EINTR and rng.size == 2 * PAGE and not _bits(kvm, 0) & P


def test_a_huge_mapping_covers_the_range_in_one_chunk():
    host, kvm, vma, v = _vm(size=2 << 20, thp=True)
    host.mm.host_access(vma.start, True, 1)
    c0 = kvm.journal.counters["page_fault"]
    r, rng = _prefault(v, 8 * PAGE, 64 * PAGE)
    assert r == 0 and rng.size == 0 and int(tables(kvm.gfn_to_memslot(8)).level[8]) == 2
    assert kvm.journal.counters["page_fault"] - c0 == 0      # no vCPU fault: the ioctl's own prefetch fault


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_prefault_over_nothing_maps_writable_not_accessed(policy):
    """A prefetch SPTE: Host-writable, W|D (x86 maps reads writable), no A -- so not young."""
    host, kvm, vma, v = _vm(policy)
    host.mm.host_access(vma.start, True, 1)
    assert _prefault(v, 0, PAGE)[0] == 0
    b = _bits(kvm, 0)
    assert b & (P | W | HW | MW | D) == P | W | HW | MW | D and not b & A
    assert not kvm.arch.test_age_gfn(kvm.gfn_to_memslot(0), 0, 1)


# ---- patch 5 -------------------------------------------------------------------------------------------

def _over_present(policy, **opts):
    host, kvm, vma, v = _vm(policy, **opts)
    assert v.write(0, 7).ok
    before = _bits(kvm, 0)
    n0 = len(kvm.journal.facts)
    c0 = dict(kvm.journal.counters)
    r, rng = _prefault(v, 0, PAGE)
    facts = [f for f in kvm.journal.facts[n0:] if f.source == Src.SPTE]
    diff = {k: n - c0.get(k, 0) for k, n in kvm.journal.counters.items() if n - c0.get(k, 0)}
    return kvm, before, _bits(kvm, 0), r, facts, diff


@pytest.mark.parametrize("mmu,caller", [("tdp", "kvm_tdp_mmu_map"), ("shadow", "mmu_set_spte")])
def test_a_prefault_over_a_present_spte_rewrites_it_only_under_legacy(mmu, caller):
    """patch 5: v6.12 rebuilt the SPTE prefetch-style -- A lost and, the old SPTE being a writable leaf,
    D too -- and the zap-style A/D capture marked the folio from the SPTE's pfn; v6.13 RET_PF_SPURIOUS."""
    kvm, before, after, r, facts, diff = _over_present("legacy", mmu=mmu)
    assert before & (A | D | W) == A | D | W
    assert r == 0 and after & (P | W) == P | W and not after & (A | D)
    assert sorted(f.kind for f in facts) == sorted([FactKind.SET_DIRTY, FactKind.MARK_ACCESSED])
    assert {f.caller for f in facts} == {caller} and {f.locked for f in facts} == {True}
    assert "prefetch_present_spurious" not in diff
    kvm, before, after, r, facts, diff = _over_present("series", mmu=mmu)
    assert r == 0 and after == before and facts == []
    assert diff["prefetch_present_spurious"] == 1 and diff["spurious"] == 1


def test_prefault_over_present_takes_the_resolved_hook():
    """A legacy VM given the series' hook returns SPURIOUS; a series VM given legacy's overwrites."""
    host, kvm, vma, v = _vm("legacy")
    v.write(0, 7)
    kvm.ops = dataclasses.replace(
        kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, prefetch_present_spte=x86_versions.prefetch_present_spte_v613))
    b = _bits(kvm, 0)
    _prefault(v, 0, PAGE)
    assert _bits(kvm, 0) == b
    host, kvm, vma, v = _vm("series")
    v.write(0, 7)
    kvm.ops = dataclasses.replace(
        kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, prefetch_present_spte=x86_versions.prefetch_present_spte_v612))
    _prefault(v, 0, PAGE)
    assert not _bits(kvm, 0) & A


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_prefault_release_matches_a_fault_of_the_same_policy(policy):
    """The ioctl's fault finishes like any fault: v6.12 kvm_release_pfn_clean() after the unlock (accessed,
    never dirty), v6.13 kvm_release_faultin_page() under mmu_lock (dirty: map_writable)."""
    host, kvm, vma, v = _vm(policy)
    host.mm.host_access(vma.start, True, 1)
    n0 = len(kvm.journal.facts)
    _prefault(v, 0, PAGE)
    rel = [f for f in kvm.journal.facts[n0:] if f.kind in (FactKind.SET_DIRTY, FactKind.MARK_ACCESSED)]
    if policy == "legacy":
        assert [(f.kind, f.caller, f.locked) for f in rel] == [(FactKind.MARK_ACCESSED, "kvm_release_pfn_clean", False)]
    else:
        assert sorted((str(f.kind), f.caller, f.locked) for f in rel) == sorted(
            [(str(FactKind.SET_DIRTY), "kvm_release_faultin_page", True),
             (str(FactKind.MARK_ACCESSED), "kvm_release_faultin_page", True)])


# ---- patch 4 -------------------------------------------------------------------------------------------

def _huge_over_pt(policy):
    host, kvm, vma, v = _vm(policy, size=2 << 20, thp=True)
    host.mm.host_access(vma.start, True, 1)
    thp_split(host.mm, vma.start)
    assert kvm.arch.page_fault(v, 0, True) == 5 and int(tables(kvm.gfn_to_memslot(0)).level[0]) == 1
    thp_collapse(host.mm, vma.start)
    assert not _bits(kvm, 0) & P                      # the leaf is gone, the page table stays
    c0 = dict(kvm.journal.counters)
    assert kvm.arch.page_fault(v, 0, True) == 5
    diff = {k: n - c0.get(k, 0) for k, n in kvm.journal.counters.items() if n - c0.get(k, 0)}
    return kvm, diff


def test_a_huge_leaf_over_a_page_table_gets_d_only_under_the_series():
    """patch 4: the old SPTE is a page table (always W): v6.12 "goto out" -- no mmu_try_to_unsync_pages(),
    no D; v6.13 skips only for a writable leaf."""
    kvm, diff = _huge_over_pt("legacy")
    b = _bits(kvm, 0)
    assert int(tables(kvm.gfn_to_memslot(0)).level[0]) == 2 and b & W and not b & D
    assert diff["make_spte:skip_unsync"] == 1
    kvm, diff = _huge_over_pt("series")
    b = _bits(kvm, 0)
    assert int(tables(kvm.gfn_to_memslot(0)).level[0]) == 2 and b & (W | D) == W | D
    assert "make_spte:skip_unsync" not in diff


def test_no_page_table_no_difference():
    """Without a page table in the way (a first huge fault), both run the check and set D."""
    for policy in ("legacy", "series"):
        host, kvm, vma, v = _vm(policy, size=2 << 20, thp=True)
        host.mm.host_access(vma.start, True, 1)
        kvm.arch.page_fault(v, 0, True)
        assert _bits(kvm, 0) & (W | D) == W | D
        assert kvm.journal.counters["make_spte:skip_unsync"] == 0


def test_the_skip_is_the_resolved_hook():
    host, kvm, vma, v = _vm("series", size=2 << 20, thp=True)
    kvm.ops = dataclasses.replace(
        kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, make_spte_skip_unsync=x86_versions.make_spte_skip_unsync_v612))
    host.mm.host_access(vma.start, True, 1)
    thp_split(host.mm, vma.start)
    kvm.arch.page_fault(v, 0, True)
    thp_collapse(host.mm, vma.start)
    kvm.arch.page_fault(v, 0, True)
    assert not _bits(kvm, 0) & D


def test_a_second_legacy_prefault_drops_d_of_a_writable_spte_but_not_of_a_read_only_one():
    """v6.12 make_spte(): a writable old SPTE "goto out" skips D, so re-prefaulting a writable prefetch SPTE
    rebuilds it without D and the capture marks the folio dirty from the SPTE; a read-only one (a read-only
    VMA) comes out identical: "if (new_spte == iter->old_spte) ret = RET_PF_SPURIOUS", nothing marked."""
    host, kvm, vma, v = _vm("legacy")
    host.mm.host_access(vma.start, True, 1)
    _prefault(v, 0, PAGE)
    assert _bits(kvm, 0) & (W | D) == W | D
    n0 = len(kvm.journal.facts)
    assert _prefault(v, 0, PAGE)[0] == 0
    assert _bits(kvm, 0) & W and not _bits(kvm, 0) & D
    assert [f.kind for f in kvm.journal.facts[n0:] if f.source == Src.SPTE] == [FactKind.SET_DIRTY]
    host = Host()
    kvm = Kvm(host, policy="legacy", arch="x86")
    vma = host.mm.mmap(4 * PAGE, VmaKind.ANON)
    host.mm.host_access(vma.start, True, 1)
    host.mm.mprotect(vma.start, 4 * PAGE, "r")
    kvm.set_user_memory_region(0, 0, 4 * PAGE, vma.start, 0)
    v = kvm.create_vcpu()
    _prefault(v, 0, PAGE)
    b = _bits(kvm, 0)
    assert b & P and not b & W
    n0 = len(kvm.journal.facts)
    s0 = kvm.journal.counters["spurious"]
    assert _prefault(v, 0, PAGE)[0] == 0
    assert _bits(kvm, 0) == b and kvm.journal.counters["spurious"] == s0 + 1
    assert not [f for f in kvm.journal.facts[n0:] if f.source == Src.SPTE]
