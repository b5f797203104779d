"""PPC e500 ``kvmppc_e500_shadow_map()`` (arch/powerpc/kvm/e500_mmu_host.c) under v6.12 ("legacy"),
v6.13-rc1 .. rc6 ("series-rc1") and v6.13 ("series").

Each test names the kernel lines it checks: the "-" / "+" sides of series patches 52 "KVM: PPC: e500:
Mark "struct page" dirty in kvmppc_e500_shadow_map()", 53 "KVM: PPC: e500: Mark "struct page" pfn
accessed before dropping mmu_lock", 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults"
(as posted, then with the v6.13-rc7 fixes).
"""

from __future__ import annotations

import errno

import pytest

from kvmsim.check import check_all
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.page import PfnClass
from kvmsim.mm.reclaim import truncate
from kvmsim.mm.vma import VmaKind
from kvmsim.policies import POLICY_NAMES, get_policy, resolve
from kvmsim.ppc import E500Mmu
from kvmsim.ppc import e500_versions as v
from kvmsim.ppc.e500_mmu_host import BOOK3E_PAGESZ_4K, E500_TLB, MAS3, MAS3_ALL, tsize_fit
from kvmsim.sched import run_interleaved
from kvmsim.trace import Src

from tests.helpers import PAGE, make_vm

RO = MAS3.SR | MAS3.UR


def _facts(kvm, kind, caller=None):
    return [f for f in kvm.journal.facts if f.kind == kind and (caller is None or f.caller == caller)]


def _marks(kvm):
    return {k: n for k, n in kvm.journal.counters.items()
            if k.startswith(("set_dirty:kvm", "mark_accessed:kvm", "put_page:kvm", "get_page:"))}


def _inv(kvm, inv):
    return [x for x in check_all(kvm) if x.invariant == inv]


def _tlbwe(kvm, vcpu, tlbsel=0, esel=0, gpa=0, tsize=BOOK3E_PAGESZ_4K, mas3=MAS3_ALL, ea=None):
    return kvm.arch.kvmppc_e500_emul_tlbwe(vcpu, tlbsel, esel, gpa if ea is None else ea, gpa, tsize, mas3)


def _pfnmap_vm(policy, *, prot="rw", pages=4):
    """A VM whose memslot 0 is a driver's refcounted VM_PFNMAP region (/dev/mem-like vm_pgoff)."""
    host, kvm, _, _ = make_vm(policy, arch="ppc-e500", size=0)
    drv = host.add_driver("gpu", pages, PfnClass.DRIVER_REFCOUNTED)
    vma = host.mm.mmap(pages * PAGE, VmaKind.PFNMAP, driver=drv, prot=prot)
    kvm.set_user_memory_region(0, 0, pages * PAGE, vma.start, 0)
    return host, kvm, vma, kvm.create_vcpu(), drv


# ---- the arch and its three protocols --------------------------------------------------------------

def test_e500_is_an_arch_and_series_rc1_a_policy():
    _, kvm, _, _ = make_vm("series-rc1", arch="ppc-e500")
    assert isinstance(kvm.arch, E500Mmu) and kvm.arch.family == "ppc-e500"
    assert "series-rc1" in POLICY_NAMES and get_policy("series-rc1").name == "series-rc1"


def test_each_protocol_resolves_its_own_e500_lookup_and_release():
    """The (policy x arch) choice: legacy's v6.12 functions, rc1's WARNing lookup, v6.13's; the series
    and rc1 release is the same kvm_release_faultin_page() under the lock."""
    from kvmsim.kvm.fault import release_faultin_page_locked
    ops = {p: resolve(get_policy(p), "ppc-e500") for p in ("legacy", "series-rc1", "series")}
    assert ops["legacy"].arch_ops.faultin is v.kvmppc_e500_shadow_map_faultin_v612
    assert ops["legacy"].fault_release_unlocked is v.kvmppc_e500_shadow_map_v612_after_unlock
    assert ops["legacy"].fault_dirty_before_map is v.kvmppc_e500_ref_setup_v612
    assert ops["legacy"].fault_release_locked is None
    assert ops["series-rc1"].arch_ops.faultin is v.kvmppc_e500_shadow_map_faultin_rc1
    assert ops["series"].arch_ops.faultin is v.kvmppc_e500_shadow_map_faultin
    for p in ("series-rc1", "series"):
        assert ops[p].fault_release_locked is release_faultin_page_locked
        assert ops[p].fault_release_unlocked is None and ops[p].fault_dirty_before_map is None


@pytest.mark.parametrize("arch", ["x86", "arm64", "riscv", "generic"])
def test_series_rc1_is_the_series_on_every_other_arch(arch):
    a, b = resolve(get_policy("series-rc1"), arch), resolve(get_policy("series"), arch)
    assert a.arch_ops is b.arch_ops
    assert (a.fault_release_locked, a.fault_release_unlocked, a.fault_dirty_before_map) == \
        (b.fault_release_locked, b.fault_release_unlocked, b.fault_dirty_before_map)


# ---- patch 52: accessed once, dirty iff the guest TLBE is writable ---------------------------------------

def test_legacy_marks_accessed_twice_and_dirty_in_ref_setup():
    """v6.12 ``kvmppc_e500_ref_setup()``: ``kvm_set_pfn_accessed(pfn); if (tlbe_is_writable(gtlbe))
    kvm_set_pfn_dirty(pfn);`` under the lock, then ``spin_unlock(); kvm_release_pfn_clean(pfn);``"""
    _, kvm, _, vcpu = make_vm("legacy", arch="ppc-e500")
    assert _tlbwe(kvm, vcpu) == 0
    assert _marks(kvm) == {"get_page:gfn_to_pfn_memslot": 1, "mark_accessed:kvmppc_e500_ref_setup": 1,
                           "set_dirty:kvmppc_e500_ref_setup": 1, "mark_accessed:kvm_release_pfn_clean": 1,
                           "put_page:kvm_release_pfn_clean": 1}
    (acc1,) = _facts(kvm, "mark_accessed", "kvmppc_e500_ref_setup")
    (dirty,) = _facts(kvm, "set_dirty", "kvmppc_e500_ref_setup")
    (acc2,) = _facts(kvm, "mark_accessed", "kvm_release_pfn_clean")
    (spte,) = _facts(kvm, "spte_set", "write_stlbe")
    assert acc1.locked and dirty.locked and not acc2.locked and acc1.source == Src.HELD
    facts = kvm.journal.facts
    assert facts.index(acc1) < facts.index(dirty) < facts.index(spte) < facts.index(acc2)
    assert [x.detail for x in _inv(kvm, "INV-3")] == ["kvm_release_pfn_clean: mark_page_accessed after dropping mmu_lock"]


def test_series_marks_accessed_once_under_the_lock():
    """v6.13 ``kvm_release_faultin_page(kvm, page, !!ret, writable); spin_unlock(&kvm->mmu_lock);``"""
    _, kvm, _, vcpu = make_vm("series", arch="ppc-e500")
    assert _tlbwe(kvm, vcpu) == 0
    assert _marks(kvm) == {"get_page:__kvm_faultin_pfn": 1, "set_dirty:kvm_release_faultin_page": 1,
                           "mark_accessed:kvm_release_faultin_page": 1, "put_page:kvm_release_faultin_page": 1}
    assert all(f.locked for f in _facts(kvm, "mark_accessed", "kvm_release_faultin_page"))
    (spte,) = _facts(kvm, "spte_set", "write_stlbe")
    (dirty,) = _facts(kvm, "set_dirty", "kvm_release_faultin_page")
    assert kvm.journal.facts.index(spte) < kvm.journal.facts.index(dirty)
    assert kvm.host_refs == {} and check_all(kvm) == []


@pytest.mark.parametrize("policy,caller", [("legacy", "kvmppc_e500_ref_setup"), ("series", "kvm_release_faultin_page")])
def test_dirty_iff_the_guest_entry_is_writable(policy, caller):
    """Both versions dirty the page iff the guest TLBE has SW or UW (patch 52 keeps that rule)."""
    _, kvm, _, vcpu = make_vm(policy, arch="ppc-e500", pages=2)
    assert _tlbwe(kvm, vcpu, esel=0, gpa=0, mas3=RO) == 0
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 0
    assert _tlbwe(kvm, vcpu, esel=1, gpa=PAGE, mas3=MAS3.SR | MAS3.UW) == 0
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 1


def test_a_store_through_a_read_only_guest_entry_is_the_guests_own_exception():
    for policy in ("legacy", "series"):
        _, kvm, _, vcpu = make_vm(policy, arch="ppc-e500")
        _tlbwe(kvm, vcpu, mas3=RO)
        before = kvm.journal.counters["spte_write"]
        assert vcpu.write(0, 1).exit == Exit.EXCEPTION
        assert kvm.journal.counters["spte_write"] == before and vcpu.read(0).ok


# ---- patch 53: the release under mmu_lock; the retry ------------------------------------------------------

def _retry(policy):
    """tlbwe's premap resolves the pfn, then an invalidation bumps mmu_invalidate_seq: -EAGAIN."""
    host, kvm, vma, vcpu = make_vm(policy, arch="ppc-e500", kind=VmaKind.MEMFD)
    host.mm.host_access(vma.start, True, 1)
    gen = kvm.arch.kvmppc_e500_emul_tlbwe.steps(vcpu, 0, 0, 0, 0, BOOK3E_PAGESZ_4K, MAS3_ALL)

    def host_truncate():
        truncate(host.mm, vma.mapping, 0)
        yield "truncate: done"
    out = run_interleaved({"vcpu": gen, "host": host_truncate()}, ["vcpu", "vcpu", "host", "vcpu", "vcpu", "vcpu"],
                          sched=kvm.sched)
    return kvm, out["vcpu"]


def test_legacy_retry_releases_after_unlock_and_ages_the_unused_page():
    """v6.12 ``ret = -EAGAIN; goto out; ... out: spin_unlock(); kvm_release_pfn_clean(pfn);``"""
    kvm, ret = _retry("legacy")
    assert ret == -errno.EAGAIN and kvm.journal.counters["spte_write"] == 0
    (acc,) = _facts(kvm, "mark_accessed", "kvm_release_pfn_clean")
    assert not acc.locked and acc.extra.get("unused")
    assert _facts(kvm, "mark_accessed", "kvmppc_e500_ref_setup") == []
    assert _inv(kvm, "INV-7")


def test_series_retry_puts_the_page_unused_under_the_lock():
    """v6.13 ``kvm_release_faultin_page(kvm, page, !!ret, writable)`` with ret = -EAGAIN: put only."""
    kvm, ret = _retry("series")
    assert ret == -errno.EAGAIN
    assert _marks(kvm) == {"get_page:__kvm_faultin_pfn": 1, "put_page:kvm_release_faultin_page": 1}
    assert kvm.host_refs == {} and not _inv(kvm, "INV-7")


# ---- patch 54 as posted: the v6.13-rc1 regression ---------------------------------------------------------

def test_rc1_every_shadow_map_warns_and_fails():
    """v6.13-rc1: ``__kvm_faultin_pfn(slot, gfn, FOLL_WRITE, NULL, &page)`` →
    ``WARN_ON_ONCE(!writable || !refcounted_page)`` → KVM_PFN_ERR_FAULT → "real page not found", -EINVAL;
    nothing is looked up, mapped or referenced, and the guest loops on the same TLB miss."""
    host, kvm, vma, vcpu = make_vm("series-rc1", arch="ppc-e500", pages=4)
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=4) == -errno.EINVAL
    c = kvm.journal.counters
    assert c["WARN_ON:__kvm_faultin_pfn"] == 1 and c["kvm_err:real page not found"] == 1
    assert c["hva_to_pfn"] == 0 and c["spte_write"] == 0 and kvm.host_refs == {}
    assert not kvm.arch.gtlb(vcpu)[(1, 0)].ref.flags & E500_TLB.VALID
    acc = vcpu.write(PAGE * 2, 5)
    assert acc.exit == Exit.LIVELOCK and c["WARN_ON:__kvm_faultin_pfn"] > 1
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_the_same_boot_works_under_v612_and_v613(policy):
    _, kvm, _, vcpu = make_vm(policy, arch="ppc-e500", pages=4)
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=4) == 0
    assert vcpu.write(PAGE * 2, 5).ok and vcpu.read(PAGE * 2).value == 5
    assert kvm.journal.counters["WARN_ON:__kvm_faultin_pfn"] == 0


def test_rc1_still_takes_the_tlb1_pfnmap_bypass():
    """rc1 left the TLB1 VM_PFNMAP path around ``__kvm_faultin_pfn()``: it maps, with no page to release."""
    _, kvm, _, vcpu, _ = _pfnmap_vm("series-rc1")
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=4) == 0
    assert kvm.journal.counters["WARN_ON:__kvm_faultin_pfn"] == 0
    assert kvm.journal.counters["kvmppc_e500_tlb1_pfnmap"] == 1
    assert _marks(kvm) == {} and check_all(kvm) == []


# ---- patch 54 final: TLB1 over VM_PFNMAP, host writability -------------------------------------------------

def test_legacy_tlb1_pfnmap_puts_a_page_it_never_got():
    """v6.12 ``pfn = start + ((hva - vma->vm_start) >> PAGE_SHIFT)`` (no reference) ... ``kvm_release_pfn_clean(pfn)``:
    the guess finds the driver's refcounted page and puts it (INV-1), after marking it in ref_setup."""
    host, kvm, vma, vcpu, drv = _pfnmap_vm("legacy")
    pfn = int(drv.pfns[0])
    before = host.phys.page_count(pfn)
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=4) == 0
    assert kvm.journal.counters["kvmppc_e500_tlb1_pfnmap"] == 1
    assert _facts(kvm, "release_without_acquire")[0].pfn == pfn
    assert host.phys.page_count(pfn) == before - 1
    assert {x.detail for x in _inv(kvm, "INV-1")} >= {"kvm_release_pfn_clean: KVM releases (get) a page it holds no reference on"}
    assert [f.source for f in _facts(kvm, "mark_accessed", "kvmppc_e500_ref_setup")] == [Src.REMAPPED]


def test_series_maps_pfnmap_through_faultin_without_a_reference():
    """v6.13: ``__kvm_faultin_pfn()`` → ``hva_to_pfn_remapped()``: no page, so nothing is put."""
    host, kvm, vma, vcpu, drv = _pfnmap_vm("series")
    before = host.phys.page_count(int(drv.pfns[0]))
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=4) == 0
    assert kvm.journal.counters["kvmppc_e500_tlb1_pfnmap"] == 0
    assert host.phys.page_count(int(drv.pfns[0])) == before and _marks(kvm) == {}
    assert check_all(kvm) == [] and vcpu.write(0, 3).ok


@pytest.mark.parametrize("policy,ret,inv11", [("legacy", 0, True), ("series-rc1", 0, True),
                                              ("series", -errno.EINVAL, False)])
def test_read_only_host_region(policy, ret, inv11):
    """A VM_PFNMAP region without VM_WRITE under a writable TLB1 entry: v6.12 and rc1 ignore VM_WRITE and
    map it guest-writable (INV-11: W without Host-W); v6.13 asks FOLL_WRITE, so
    ``hva_to_pfn_remapped()`` returns KVM_PFN_ERR_RO_FAULT and the map fails."""
    _, kvm, _, vcpu, _ = _pfnmap_vm(policy, prot="r")
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=4) == ret
    assert bool(_inv(kvm, "INV-11")) is inv11
    leaf = {lf.gfn: lf for lf in kvm.arch.leaves()}.get(0)
    assert (leaf is not None and leaf.writable and not leaf.host_writable) is inv11


def test_series_maps_read_only_when_the_host_pte_is_not_writable():
    """v6.13-rc7 ``e500_shadow_mas3_attrib(mas3, writable, pr)``: ``if (!writable) mas3 &= ~(MAS3_UW|MAS3_SW)``,
    and ``writable = tlbe_is_writable(stlbe)`` is the release's dirty witness.  Reached here by a
    lookup that reports a read-only page (FOLL_WRITE makes that impossible through GUP)."""
    _, kvm, _, vcpu = make_vm("series", arch="ppc-e500")
    real = kvm.ops.arch_ops.faultin

    def read_only(kvm_, mmu, fault):
        pfn, kfp = real(kvm_, mmu, fault)
        kfp.map_writable = False
        return pfn, kfp
    import dataclasses
    kvm.ops = dataclasses.replace(kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, faultin=read_only))
    assert _tlbwe(kvm, vcpu) == 0
    assert kvm.journal.counters["set_dirty:kvm_release_faultin_page"] == 0
    g = kvm.arch.gtlb(vcpu)[(0, 0)]
    assert not g.ref.flags & E500_TLB.WRITABLE and not {lf.gfn: lf for lf in kvm.arch.leaves()}[0].writable


# ---- TLB1 sizes, invalidation ---------------------------------------------------------------------

def test_tsize_fit_takes_the_largest_aligned_size_inside_the_range():
    """TSIZE is log2 of KiB: 4 is 16K (4 pages), 6 is 64K (16 pages); odd sizes round down."""
    assert tsize_fit(6, gfn=5, pfn=0x105, start=0x100, end=0x110) == (6, 0x100)     # 64K fits exactly
    assert tsize_fit(7, gfn=5, pfn=0x105, start=0x104, end=0x108) == (4, 0x104)     # 64K leaves the range: 16K
    assert tsize_fit(4, gfn=5, pfn=0x106, start=0x100, end=0x110) == (BOOK3E_PAGESZ_4K, 0x106)  # misaligned
    assert tsize_fit(4, gfn=5, pfn=0x105, start=0x104, end=0x106) == (BOOK3E_PAGESZ_4K, 0x105)  # range too small


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_hugetlb_tlb1_entry_maps_a_large_shadow_entry(policy):
    """v6.12 caps TSIZE by the hugetlb VMA's page size; v6.13 fits it into ``find_linux_pte()``'s psize."""
    _, kvm, _, vcpu = make_vm(policy, arch="ppc-e500", size=2 << 20, kind=VmaKind.HUGETLB, page_size=2 << 20)
    assert _tlbwe(kvm, vcpu, tlbsel=1, esel=0, gpa=0, tsize=10) == 0          # 1M
    leaves = list(kvm.arch.leaves())
    assert len(leaves) == 256 and kvm.arch.gtlb(vcpu)[(1, 0)].ref.flags & E500_TLB.BITMAP


def test_an_invalidation_drops_every_shadow_entry_and_releases_no_page():
    """``kvm_unmap_gfn_range()`` → "Flush all shadow tlb entries everywhere": ``clear_tlb_privs()``."""
    host, kvm, vma, vcpu = make_vm("series", arch="ppc-e500", pages=2)
    _tlbwe(kvm, vcpu, esel=0, gpa=0)
    _tlbwe(kvm, vcpu, esel=1, gpa=PAGE)
    marks = _marks(kvm)
    host.mm.madvise(vma.start, PAGE, "DONTNEED")
    assert list(kvm.arch.leaves()) == [] and _marks(kvm) == marks
    assert not any(g.ref.flags for g in kvm.arch.gtlb(vcpu).values())
    assert vcpu.read(PAGE).ok and len(list(kvm.arch.leaves())) == 1


def test_the_guest_tlb_is_per_vcpu_and_a_flush_clears_every_vcpus_references():
    """``vcpu_e500->gtlb_arch`` is per vCPU: vCPU 1 does not see vCPU 0's TLB1 entry (its access misses
    and its own handler writes a TLB0 entry), and ``kvmppc_core_flush_tlb()`` on an invalidation clears
    the references of both."""
    host, kvm, vma, vcpu0 = make_vm("series", arch="ppc-e500", pages=4)
    vcpu1 = kvm.create_vcpu()
    assert _tlbwe(kvm, vcpu0, tlbsel=1, esel=0, gpa=0, tsize=4) == 0                # 16K on vCPU 0
    assert set(kvm.arch.gtlb(vcpu0)) == {(1, 0)} and kvm.arch.gtlb(vcpu1) == {}
    tlbwe_before = kvm.journal.counters["tlbwe"]
    assert vcpu1.write(PAGE, 7).ok
    assert kvm.journal.counters["tlbwe"] == tlbwe_before + 1                          # vCPU 1's own miss
    assert set(kvm.arch.gtlb(vcpu1)) == {(0, 1)} and set(kvm.arch.gtlb(vcpu0)) == {(1, 0)}
    host.mm.madvise(vma.start, 4 * PAGE, "DONTNEED")
    assert not any(g.ref.flags for v in (vcpu0, vcpu1) for g in kvm.arch.gtlb(v).values())
    assert list(kvm.arch.leaves()) == []
