"""Behaviours re-checked against the kernel sources (mm/gup.c, virt/kvm/pfncache.c, kvm_main.c v6.12 and
v6.13), each a case the model once got wrong."""

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.host_map import kvm_vcpu_map, kvm_vcpu_unmap
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.pfn import KVM_PFN_ERR_SIGPENDING, KvmFollowPfn, hva_to_pfn
from kvmsim.kvm.pfncache import GfnToPfnCache
from kvmsim.mm.gup import FOLL, get_user_page_fast_only, get_user_pages_unlocked
from kvmsim.mm.vma import Pte, VmaKind

from tests.helpers import make_vm

MB = 1 << 20


def test_fatal_signal_fails_slow_gup_even_for_a_present_page():
    """__get_user_pages() checks fatal_signal_pending() before every page, whatever the flags."""
    host, kvm, _, _ = make_vm("series")
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON)
    host.mm.host_access(vma.start, True, 1)                    # present and writable
    host.mm.signal_pending = True
    before = host.phys.page_count(host.mm.pte_of(vma.start)[1])
    assert get_user_pages_unlocked(host.mm, vma.start, FOLL.WRITE, caller="t") == (-errno.EINTR, None)
    assert host.phys.page_count(host.mm.pte_of(vma.start)[1]) == before        # no reference taken
    pfn = get_user_page_fast_only(host.mm, vma.start, FOLL.WRITE, caller="t")  # GUP-fast ignores signals
    assert pfn is not None
    host.phys.put_page(pfn, "t")


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_fatal_signal_gives_sigpending_on_the_nowait_attempt(policy):
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON)
    host.mm.signal_pending = True
    kfp = KvmFollowPfn(None, 0, flags=FOLL.WRITE | FOLL.NOWAIT, hva=vma.start, caller="t")
    assert hva_to_pfn(kvm, kfp) == KVM_PFN_ERR_SIGPENDING and kfp.held is None


def test_slow_gup_touches_the_folio_not_the_pte():
    """follow_page_pte() FOLL_TOUCH: mark_page_accessed (and SetPageDirty) but no pte_mkyoung."""
    host, kvm, _, _ = make_vm("series")
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON)
    host.mm.host_access(vma.start, True, 1)
    vma.pte[0] = int(vma.pte[0]) & ~(int(Pte.YOUNG) | int(Pte.DIRTY))   # aged and cleaned since
    rc, pfn = get_user_pages_unlocked(host.mm, vma.start, FOLL.WRITE, caller="t")
    assert rc == 1
    assert not vma.pte[0] & (int(Pte.YOUNG) | int(Pte.DIRTY))
    assert host.phys.folio_test_referenced(pfn) and host.phys.folio_test_dirty(pfn)
    host.phys.put_page(pfn, "t")


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pfncache_refuses_a_read_only_memslot_without_touching_the_page(policy):
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(MB, VmaKind.ANON)
    host.mm.host_access(vma.start, True, 1)
    pfn = host.mm.pte_of(vma.start)[1]
    kvm.set_user_memory_region(0, 0, MB, vma.start, KVM_MEM.READONLY)
    count, facts = host.phys.page_count(pfn), len(kvm.journal.facts)
    gpc = GfnToPfnCache(kvm)
    with pytest.raises(ModelError) as e:
        gpc.activate(0)
    assert e.value.errno == errno.EFAULT and not gpc.valid
    assert host.phys.page_count(pfn) == count and len(kvm.journal.facts) == facts


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pfncache_keeps_a_valid_mapping_across_a_memslot_generation(policy):
    """__kvm_gpc_refresh(): a new generation with the same hva and a valid cache does no GUP."""
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(MB, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, MB, vma.start)
    gpc = GfnToPfnCache(kvm)
    gpc.activate(0x2000)
    pfn, gups = gpc.pfn, kvm.journal.counters["hva_to_pfn"]
    other = host.mm.mmap(MB, VmaKind.ANON)
    kvm.set_user_memory_region(1, 1 << 30, MB, other.start)       # another slot: generation++
    assert not gpc.check()
    assert gpc.write(5)
    assert gpc.pfn == pfn and kvm.journal.counters["hva_to_pfn"] == gups
    assert kvm.journal.counters["gpc_refresh_kept"] == 1


def test_legacy_vcpu_map_always_resolves_for_write():
    """v6.12 kvm_vcpu_map() used gfn_to_pfn() (write); a read-only map came with patch 34."""
    for policy, ok in (("legacy", False), ("series", True)):
        host, kvm, _, _ = make_vm(policy)
        vma = host.mm.mmap(MB, VmaKind.ANON)
        kvm.set_user_memory_region(0, 0, MB, vma.start, KVM_MEM.READONLY)
        vcpu = kvm.create_vcpu()
        if ok:
            kvm_vcpu_unmap(vcpu, kvm_vcpu_map(vcpu, 0, writable=False))
        else:
            with pytest.raises(ModelError) as e:
                kvm_vcpu_map(vcpu, 0, writable=False)
            assert e.value.errno == errno.EINVAL


def test_series_release_asserts_mmu_lock_even_without_a_page():
    """kvm_release_faultin_page(): lockdep_assert_once(held || unused) comes before the NULL check."""
    host, kvm, _, _ = make_vm("series")
    kfp = KvmFollowPfn(None, 0, caller="t")                        # nothing refcounted (e.g. PFNMAP)
    kvm.policy.release_faultin(kvm, 0x1234, kfp, unused=False, dirty=False, caller="t")
    assert kvm.journal.counters["lockdep_warnings"] == 1
    kvm.policy.release_faultin(kvm, 0x1234, kfp, unused=True, dirty=False, caller="t")
    assert kvm.journal.counters["lockdep_warnings"] == 1


def test_truncating_a_dirty_folio_is_not_a_warning_but_dirtying_it_during_truncation_is():
    """truncate_cleanup_folio() cancels dirty; filemap_unaccount_folio() WARNs only if it is dirty again."""
    from kvmsim.mm.reclaim import remove_from_cache, truncate_cleanup_folios
    host, kvm, _, _ = make_vm("series")
    vma = host.mm.mmap(2 * 4096, VmaKind.FILE)
    host.mm.host_access(vma.start, True, 1)
    host.mm.host_access(vma.start + 4096, True, 2)
    asp = vma.mapping
    assert host.phys.folio_test_dirty(int(asp.pages[0]))
    remove_from_cache(host.mm, asp, 0, 1)
    assert not [f for f in host.journal.facts if f.kind == "dirty_at_truncate"]
    pfn = int(asp.pages[1])
    truncate_cleanup_folios(host.mm, asp, 1, 2)
    host.phys.SetPageDirty(pfn, "racing kvm_set_pfn_dirty", kvm=True)
    remove_from_cache(host.mm, asp, 1, 2, notify=False, cleanup=False)
    assert [f.pfn for f in host.journal.facts if f.kind == "dirty_at_truncate"] == [host.phys.folio(pfn)]
