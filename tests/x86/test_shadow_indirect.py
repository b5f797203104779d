"""Indirect shadow paging (kvmsim.x86.paging_tmpl): guest page tables, unsync and write tracking,
FNAME(sync_spte) (patch 7), FNAME(prefetch_gpte) (patches 10, 11, 41) and patch 4 through make_spte()."""

import dataclasses

import pytest

from kvmsim.explore import SCENARIOS, Mutations, explore
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.policies.series import SeriesPolicy
from kvmsim.trace import FactKind, Src
from kvmsim.x86.paging_tmpl import PT, guest_pte_write, kvm_mmu_invalidate_addr, kvm_mmu_sync_roots
from kvmsim.x86.shadow_mmu import IndirectShadowMmu
from kvmsim.x86.spte import AT, A, D, MW, P, W, tables
from kvmsim.x86 import versions as x86_versions

GVA = 0x200000
PT_GPA = 0x1000
RW = PT.PRESENT | PT.WRITABLE | PT.ACCESSED | PT.DIRTY
RO = PT.PRESENT | PT.ACCESSED | PT.DIRTY


def _vm(policy, *, thp=False):
    host = Host()
    kvm = Kvm(host, policy=policy, arch="x86", mmu="shadow", paging="indirect")
    vma = host.mm.mmap(4 << 20, VmaKind.ANON, thp=thp)
    kvm.set_user_memory_region(0, 0, 4 << 20, vma.start, 0)
    return host, kvm, vma, kvm.create_vcpu()


def _bits(kvm, gfn: int) -> int:
    slot = kvm.gfn_to_memslot(gfn)
    return int(tables(slot).bits[gfn - slot.base_gfn])


def _cow(policy):
    """gva → gpa 0x5000 writable, written; then made read-only (the store unsyncs the shadow page)."""
    host, kvm, vma, v = _vm(policy)
    assert guest_pte_write(kvm.arch, v, GVA, 0x5000, RW, PT_GPA).exit is Exit.OK
    assert v.write(GVA, 7).exit is Exit.OK
    assert guest_pte_write(kvm.arch, v, GVA, 0x5000, RO, None).exit is Exit.OK
    return host, kvm, vma, v


def test_paging_indirect_needs_the_shadow_mmu():
    from kvmsim.errors import UsageError
    with pytest.raises(UsageError, match="needs mmu"):
        Kvm(Host(), arch="x86", mmu="tdp", paging="indirect")
    assert isinstance(Kvm(Host(), arch="x86", mmu="shadow", paging="indirect").arch, IndirectShadowMmu)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_shadow_page_write_protects_the_guest_page_table_and_a_store_unsyncs_it(policy):
    host, kvm, vma, v = _vm(policy)
    guest_pte_write(kvm.arch, v, GVA, 0x5000, RW, PT_GPA)
    assert _bits(kvm, 1) & W                          # no shadow page yet: the page table is plain memory
    v.write(GVA, 7)
    sp = kvm.arch.mmu_page_hash[1]
    assert not sp.unsync and not _bits(kvm, 1) & (W | MW)      # account_shadowed(): write-protected
    assert _bits(kvm, 5) & W and sp.access[GVA >> 12] & 2       # the gPTE's W: a writable SPTE
    before = kvm.journal.counters["mmu_unsync"]
    guest_pte_write(kvm.arch, v, GVA, 0x5000, RO, None)
    assert sp.unsync and kvm.journal.counters["mmu_unsync"] == before + 1 and _bits(kvm, 1) & W
    assert v.write(GVA, 8).exit is Exit.OK            # unsync: the stale writable SPTE still works
    kvm_mmu_sync_roots(kvm.arch, v)
    assert not sp.unsync and not _bits(kvm, 1) & (W | MW) and not _bits(kvm, 5) & W
    assert v.write(GVA, 9).exit is Exit.EXCEPTION      # the guest's own read-only gPTE: a #PF


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_remapped_gpte_is_stale_until_invlpg(policy):
    host, kvm, vma, v = _vm(policy)
    guest_pte_write(kvm.arch, v, GVA, 0x5000, RW, PT_GPA)
    guest_pte_write(kvm.arch, v, GVA + 0x1000, 0x6000, RW, None)
    v.write(GVA, 5)
    v.write(GVA + 0x1000, 6)
    guest_pte_write(kvm.arch, v, GVA, 0x6000, RW, None)      # gva now maps gpa 0x6000
    assert v.read(GVA).value == 5                             # the SPTE still maps 0x5000
    kvm_mmu_invalidate_addr(kvm.arch, v, GVA)                 # sync: the gfn changed, drop_spte()
    assert not _bits(kvm, 5) & P
    assert v.read(GVA).value == 6


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_clean_gpte_maps_read_only_until_the_walker_dirties_it(policy):
    """FNAME(protect_clean_gpte): no ACC_WRITE_MASK before the gPTE is dirty."""
    host, kvm, vma, v = _vm(policy)
    guest_pte_write(kvm.arch, v, GVA, 0x5000, PT.PRESENT | PT.WRITABLE | PT.ACCESSED, PT_GPA)
    v.read(GVA)
    assert _bits(kvm, 5) & P and not _bits(kvm, 5) & (W | MW)
    assert v.write(GVA, 1).exit is Exit.OK
    assert kvm.arch.guest_pt.gptes[GVA >> 12] & PT.DIRTY and _bits(kvm, 5) & W


def test_a_not_present_gpte_is_a_guest_page_fault():
    host, kvm, vma, v = _vm("series")
    guest_pte_write(kvm.arch, v, GVA, 0x5000, PT(0), PT_GPA)
    assert v.read(GVA).exit is Exit.EXCEPTION
    assert v.read(0x5000).exit is Exit.OK             # another block: the boot tables' identity map


# ---- patch 7: FNAME(sync_spte) ------------------------------------------------------------------------

def test_sync_spte_keeps_accessed_only_under_the_series():
    """patch 7: v6.12 rebuilt the SPTE with A clear (and D, the old SPTE being writable: "goto out"), and
    mmu_spte_update() marked the folio accessed and dirty from the SPTE's pfn under mmu_lock; v6.13 keeps A
    and marks nothing.  W went away, so both flush."""
    out = {}
    for policy in ("legacy", "series"):
        host, kvm, vma, v = _cow(policy)
        j = kvm.journal
        c0 = dict(j.counters)
        n0 = len(j.facts)
        assert kvm_mmu_invalidate_addr(kvm.arch, v, GVA) is True
        b = _bits(kvm, 5)
        marks = [f for f in j.facts[n0:] if f.caller == "mmu_spte_update"]
        out[policy] = (bool(b & A), bool(b & D), bool(b & W), j.counters["tlb_flush:kvm_mmu_invalidate_addr"]
                       - c0.get("tlb_flush:kvm_mmu_invalidate_addr", 0), sorted(str(f.kind) for f in marks),
                       {f.locked for f in marks}, {f.source for f in marks})
        slot = kvm.gfn_to_memslot(5)
        out[policy] += (kvm.arch.test_age_gfn(slot, 5, 6),)
    a, d, w, flush, kinds, locked, src, young = out["legacy"]
    assert (a, d, w, flush, young) == (False, False, False, 1, False)
    assert len(kinds) == 2 and locked == {True} and src == {Src.SPTE}
    a, d, w, flush, kinds, locked, src, young = out["series"]
    assert (a, w, flush, young, kinds) == (True, False, 1, True, [])


def test_sync_that_keeps_w_flushes_only_for_the_lost_accessed_bit():
    """A read-only gPTE gains NX: W is not lost, so v6.12's flush is only for the A bit it cleared."""
    flushes = {}
    for policy in ("legacy", "series"):
        host, kvm, vma, v = _vm(policy)
        guest_pte_write(kvm.arch, v, GVA, 0x5000, RO, PT_GPA)
        v.read(GVA)
        guest_pte_write(kvm.arch, v, GVA, 0x5000, RO | PT.NX, None)
        flushes[policy] = kvm_mmu_invalidate_addr(kvm.arch, v, GVA)
        assert not _bits(kvm, 5) & W
    assert flushes == {"legacy": True, "series": False}


def test_sync_spte_reads_the_resolved_hook_not_a_policy_name():
    """A series VM given legacy's make_spte_accessed loses A on sync: the path takes the VM's hook."""
    host, kvm, vma, v = _cow("series")
    kvm.ops = dataclasses.replace(
        kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, make_spte_accessed=x86_versions.make_spte_accessed_v612))
    kvm_mmu_invalidate_addr(kvm.arch, v, GVA)
    assert not _bits(kvm, 5) & A
    host, kvm, vma, v = _cow("legacy")
    kvm.ops = dataclasses.replace(
        kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, make_spte_accessed=x86_versions.make_spte_accessed_v613))
    kvm_mmu_invalidate_addr(kvm.arch, v, GVA)
    assert _bits(kvm, 5) & A


def test_a_sync_never_unsyncs_and_a_writable_leaf_skips_the_check_under_both():
    """make_spte() during a sync: the old writable leaf "goto out" (both kernels), so no D on the new SPTE."""
    for policy in ("legacy", "series"):
        host, kvm, vma, v = _vm(policy)
        guest_pte_write(kvm.arch, v, GVA, 0x5000, RW, PT_GPA)
        v.write(GVA, 1)
        guest_pte_write(kvm.arch, v, GVA, 0x5000, RW | PT.NX, None)
        n = kvm.journal.counters["mmu_try_to_unsync_pages"]
        kvm_mmu_invalidate_addr(kvm.arch, v, GVA)
        assert kvm.journal.counters["mmu_try_to_unsync_pages"] == n
        assert _bits(kvm, 5) & W and not _bits(kvm, 5) & D


# ---- patches 10, 11, 41: FNAME(prefetch_gpte) -------------------------------------------------------

def _prefetch(policy):
    host, kvm, vma, v = _vm(policy, thp=True)
    host.mm.host_access(vma.start + 0x10000, True, 1)        # a THP: every page present for GUP-fast
    for k in range(8):
        guest_pte_write(kvm.arch, v, GVA + k * 0x1000, 0x10000 + k * 0x1000, RW, PT_GPA if k == 0 else None)
    n0 = len(kvm.journal.facts)
    c0 = dict(kvm.journal.counters)
    assert v.write(GVA, 7).exit is Exit.OK
    facts = [f for f in kvm.journal.facts[n0:] if f.caller == "paging64_prefetch_gpte"]
    diff = {k: kvm.journal.counters[k] - c0.get(k, 0) for k in kvm.journal.counters}
    return kvm, facts, {k: n for k, n in diff.items() if n}


def test_prefetched_gptes_are_released_dirty_only_under_the_series():
    kvm, facts, diff = _prefetch("legacy")
    assert diff["prefetch"] == 7
    assert "set_dirty:paging64_prefetch_gpte" not in diff
    assert diff["mark_accessed:paging64_prefetch_gpte"] == 7 and diff["put_page:paging64_prefetch_gpte"] == 7
    assert all(_bits(kvm, 0x10 + k) & P and not _bits(kvm, 0x10 + k) & A for k in range(1, 8))
    kvm, facts, diff = _prefetch("series")
    assert diff["prefetch"] == 7
    assert diff["set_dirty:paging64_prefetch_gpte"] == 7 and diff["put_page:paging64_prefetch_gpte"] == 7
    marks = [f for f in facts if f.kind in (FactKind.SET_DIRTY, FactKind.MARK_ACCESSED)]
    assert len(marks) == 14 and {f.locked for f in marks} == {True}      # marked under mmu_lock
    assert all(_bits(kvm, 0x10 + k) & (P | W | D) == P | W | D for k in range(1, 8))


def test_prefetch_release_is_the_resolved_hook():
    """A series VM given legacy's release marks accessed by guess and never dirty."""
    host, kvm, vma, v = _vm("series", thp=True)
    kvm.ops = dataclasses.replace(
        kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, release_prefetched_gpte=x86_versions.release_prefetched_gpte_v612))
    host.mm.host_access(vma.start + 0x10000, True, 1)
    for k in range(8):
        guest_pte_write(kvm.arch, v, GVA + k * 0x1000, 0x10000 + k * 0x1000, RW, PT_GPA if k == 0 else None)
    c0 = dict(kvm.journal.counters)
    v.write(GVA, 7)
    assert kvm.journal.counters["set_dirty:paging64_prefetch_gpte"] == c0.get("set_dirty:paging64_prefetch_gpte", 0)
    assert kvm.journal.counters["mark_accessed:paging64_prefetch_gpte"] - \
        c0.get("mark_accessed:paging64_prefetch_gpte", 0) == 7


def test_prefetching_a_shadowed_page_table_gfn_write_protects_it():
    """mmu_try_to_unsync_pages(prefetch=true) on a gfn with a sync shadow page: -EEXIST, read-only SPTE."""
    host, kvm, vma, v = _vm("series", thp=True)
    host.mm.host_access(vma.start, True, 1)
    guest_pte_write(kvm.arch, v, GVA, 0x5000, RW, PT_GPA)
    guest_pte_write(kvm.arch, v, GVA + 0x1000, PT_GPA, RW, None)    # a gva mapping the page table itself
    v.write(GVA, 1)                               # shadow page for gfn 1, then prefetch of gva+4K → gfn 1
    sp = kvm.arch.mmu_page_hash[1]
    assert not sp.unsync and _bits(kvm, 1) & P and not _bits(kvm, 1) & W


# ---- the explore race -------------------------------------------------------------------------------

def test_sync_vs_munmap_marks_the_folio_only_under_legacy():
    sc = SCENARIOS["shadow-sync-vs-munmap"]
    legacy = explore(sc, "legacy", Mutations(), bound=2)
    assert legacy.violating is not None
    assert legacy.violating.violation.invariant in ("INV-2", "INV-12")
    assert legacy.violating.steps[0].thread == "vcpu0"
    series = explore(sc, "series", Mutations(), bound=2)
    assert series.violating is None and series.explored >= 3


def test_an_externally_write_tracked_gfn_is_written_by_emulation_and_never_mapped_writable():
    """kvm_write_track_add_gfn() (KVMGT's tracker): FNAME(page_fault)'s page_fault_handle_page_track() sends
    the write to the emulator; a read maps it, and mmu_try_to_unsync_pages() keeps that SPTE read-only."""
    from kvmsim.x86.page_track import kvm_gfn_is_write_tracked, kvm_write_track_add_gfn, kvm_write_track_remove_gfn
    host, kvm, vma, v = _vm("series")
    slot = kvm.gfn_to_memslot(5)
    kvm_write_track_add_gfn(kvm, slot, 5)
    guest_pte_write(kvm.arch, v, GVA, 0x5000, RW, PT_GPA)
    assert v.write(GVA, 3).exit is Exit.OK and not _bits(kvm, 5) & P     # emulated: no SPTE
    assert v.read(GVA).value == 3 and _bits(kvm, 5) & P and not _bits(kvm, 5) & (W | MW)
    kvm_write_track_remove_gfn(kvm, slot, 5)
    assert not kvm_gfn_is_write_tracked(kvm, slot, 5)
    kvm_write_track_remove_gfn(kvm, slot, 5)                               # underflow: a WARN, no change
    assert kvm.journal.counters["WARN_ON:__kvm_write_track_remove_gfn"] == 1
    assert v.write(GVA, 4).exit is Exit.OK and _bits(kvm, 5) & W
