"""x86 behaviours re-checked against arch/x86/kvm (x86.c kvm_mmu_slot_apply_flags, tdp_mmu.c
clear_dirty_gfn_range / clear_dirty_pt_masked / write_protect_gfn, mmu.c kvm_mmu_hugepage_adjust,
kvm_rmap_zap_collapsible_sptes), v6.12 and v6.13.  Each is a case the model once got wrong."""

import numpy as np
import pytest

from kvmsim.kvm.dirty import enable_manual_protect, kvm_clear_dirty_log, kvm_get_dirty_log
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.vma import VmaKind
from kvmsim.x86.spte import D, MW, P, W, tables
from tests.helpers import make_vm
from tests.x86.conftest import LOG

NP = 1024                                   # 4 MiB: two 2 MiB regions


def _counter(kvm, prefix):
    return sum(v for k, v in kvm.journal.counters.items() if k.startswith(prefix))


def test_enabling_logging_always_flushes():
    """"Unconditionally flush the TLBs after enabling dirty logging" (nothing mapped, no eager split)."""
    h, kvm, vma, v = make_vm(eager_split=False, arch="x86")
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)
    assert kvm.journal.counters["tlb_flush:enable_dirty_logging"] == 1


def test_read_only_slot_logging_changes_no_spte_but_faults_map_4k():
    h, kvm, vma, v = make_vm(flags=int(KVM_MEM.READONLY), arch="x86")
    kvm.arch.populate(v, 0, NP, False)
    t = tables(kvm.memslots[0].by_id[0])
    assert (t.level == 2).all()
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, int(KVM_MEM.READONLY) | LOG)
    assert (t.level == 2).all() and "tlb_flush:enable_dirty_logging" not in kvm.journal.counters
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, int(KVM_MEM.READONLY))
    kvm.set_user_memory_region(0, 0, 0, vma.start, 0)                     # delete, then map again logged
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, int(KVM_MEM.READONLY) | LOG)
    kvm.arch.populate(v, 0, 8, False)
    t = tables(kvm.memslots[0].by_id[0])
    assert (t.level[:8] == 1).all()                                        # kvm_mmu_hugepage_adjust: 4K


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pml_enable_clears_d_on_huge_leaves_too(policy):
    h, kvm, vma, v = make_vm(policy, eager_split=False, arch="x86")
    kvm.arch.populate(v, 0, NP, True)
    dirty0 = _counter(kvm, "set_dirty:")
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)
    t = tables(kvm.memslots[0].by_id[0])
    assert (t.level == 2).all() and not (t.bits & D).any() and not (t.bits & W).any()
    assert kvm.journal.counters.get("set_dirty:kvm_mmu_slot_leaf_clear_dirty", 0) == (2 if policy == "legacy" else 0)
    assert _counter(kvm, "set_dirty:") - dirty0 == (2 if policy == "legacy" else 0)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_clear_log_without_pml_dirties_each_reprotected_page_under_legacy(policy):
    h, kvm, vma, v = make_vm(policy, pml=False, arch="x86")
    enable_manual_protect(kvm, 1)
    kvm.arch.populate(v, 0, NP, True)
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)            # split + write-protect
    for g in range(0, 100):
        assert v.write(g << 12, g).ok                                      # fast page faults restore W
    log = kvm_get_dirty_log(kvm, 0)
    before = kvm.journal.counters.get("set_dirty:clear_dirty_pt_masked", 0)
    kvm_clear_dirty_log(kvm, 0, 0, NP, log)
    t = tables(kvm.memslots[0].by_id[0])
    assert not (t.bits[:100] & W).any() and (t.bits[:100] & MW).all()
    got = kvm.journal.counters.get("set_dirty:clear_dirty_pt_masked", 0) - before
    assert got == (100 if policy == "legacy" else 0)


def test_initially_set_write_protect_clears_mmu_writable():
    """write_protect_gfn(): without eager split the first CLEAR leaves a huge leaf that only the slow
    path can make writable again."""
    h, kvm, vma, v = make_vm(eager_split=False, arch="x86")
    enable_manual_protect(kvm, 3)
    kvm.arch.populate(v, 0, NP, True)
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)
    kvm_clear_dirty_log(kvm, 0, 0, 64)                                     # one word of the first 2M region
    t = tables(kvm.memslots[0].by_id[0])
    assert t.level[0] == 2 and not t.bits[0] & (W | MW) and t.bits[0] & P
    assert t.bits[600] & W                                                 # the other region untouched


def test_shadow_mmu_has_no_eager_split_and_flushes_once_per_slot():
    h, kvm, vma, v = make_vm(mmu="shadow", v613_other=True, size=8 << 20, arch="x86")
    kvm.arch.populate(v, 0, 2048, True)
    kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, LOG)
    t = tables(kvm.memslots[0].by_id[0])
    assert (t.level == 2).all()                                             # kvm_mmu_slot_try_split: TDP only
    for g in range(0, 2048, 512):
        assert v.write((g + 3) << 12, 1).ok                                 # logging: 4K mappings appear
    assert (t.level[[3, 515, 1027, 1539]] == 1).all()
    flushes = kvm.journal.counters.get("tlb_flush:zap_collapsible_sptes", 0)
    kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, 0)
    assert kvm.journal.counters.get("recover", 0) == 0                      # the rmap path still zaps
    assert kvm.journal.counters["tlb_flush:zap_collapsible_sptes"] - flushes == 1
    assert kvm.journal.counters["zap_collapsible"] == 4


def test_tdp_fault_splits_a_huge_leaf_in_the_way_without_a_flush():
    """kvm_tdp_mmu_map() → tdp_mmu_split_huge_page(): the siblings stay mapped, no TLB flush."""
    h, kvm, vma, v = make_vm(eager_split=False, arch="x86")
    kvm.arch.populate(v, 0, NP, True)
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)            # huge leaves write-protected
    t = tables(kvm.memslots[0].by_id[0])
    flushes, faults = kvm.journal.counters["tlb_flush"], kvm.journal.counters["page_fault"]
    assert v.write(5 << 12, 1).ok                                          # a 4K write in logged memory
    assert kvm.journal.counters["tlb_flush"] == flushes
    assert (t.level[:512] == 1).all() and (t.bits[:512] & P).all()
    assert t.bits[5] & W and not (t.bits[[4, 6]] & W).any()
    for g in (4, 6, 300):
        assert v.read(g << 12).ok                                          # siblings: no new fault
    assert kvm.journal.counters["page_fault"] == faults + 1


def test_shadow_fault_still_drops_the_huge_leaf():
    h, kvm, vma, v = make_vm(mmu="shadow", arch="x86")
    kvm.arch.populate(v, 0, NP, True)
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)
    t = tables(kvm.memslots[0].by_id[0])
    assert v.write(5 << 12, 1).ok
    assert not (t.bits[[4, 6]] & P).any()                                  # drop_large_spte()


def test_access_tracking_restores_w_only_on_a_write():
    """SHADOW_ACC_TRACK_SAVED_BITS_MASK holds R/X: a read after aging gets a read-only SPTE."""
    h, kvm, vma, v = make_vm(ad_enabled=False, size=NP << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    kvm.arch.populate(v, 0, 4, True)
    t = tables(kvm.memslots[0].by_id[0])
    assert (t.bits[:4] & W).all()
    kvm.notifier.clear_flush_young(vma.start, vma.start + 4 * 4096)
    assert not (t.bits[:4] & W).any()
    assert v.read(0).ok and not t.bits[0] & W                              # read: R/X back, not W
    assert v.write(1 << 12, 3).ok and t.bits[1] & W                        # write: W from MMU-writable


def test_shadow_prefetch_skips_while_an_invalidation_is_in_progress():
    h, kvm, vma, v = make_vm(mmu="shadow", size=64 << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    for g in range(16):
        h.mm.host_access(vma.start + (g << 12), True, g)
    kvm.mmu_invalidate_in_progress = 1                                     # a range elsewhere is invalidating
    kvm.mmu_invalidate_range_start, kvm.mmu_invalidate_range_end = 1000, 1001
    assert v.read(0).ok
    assert kvm.journal.counters.get("prefetch", 0) == 0
    kvm.mmu_invalidate_in_progress = 0
    assert v.read(8 << 12).ok and kvm.journal.counters["prefetch"] == 7


@pytest.mark.parametrize("zap_all,other_left", [(True, 0), (False, 4)])
def test_deleting_a_slot_zaps_every_slot_under_the_default_quirk(zap_all, other_left):
    h, kvm, vma, v = make_vm(size=4 << 12, kind=VmaKind.ANON, page_size=4096, slot_zap_all=zap_all, arch="x86")
    other = h.mm.mmap(4 << 12, VmaKind.ANON)
    kvm.set_user_memory_region(1, 1 << 30, 4 << 12, other.start, 0)
    kvm.arch.populate(v, 0, 4, True)
    kvm.arch.populate(v, 1 << 30, 4, True)
    keep = kvm.memslots[0].by_id[1]
    kvm.set_user_memory_region(0, 0, 0, vma.start, 0)                     # delete slot 0
    assert int(np.count_nonzero(tables(keep).bits & P)) == other_left
    assert ("tlb_flush:flush_shadow_memslot" in kvm.journal.counters) == (not zap_all)


def test_shadow_prefetch_run_past_the_slot_end_prefetches_nothing():
    """kvm_prefetch_pages(): "if (entry < nr_pages) return 0;" for a run that leaves the slot."""
    h, kvm, vma, v = make_vm(mmu="shadow", size=6 << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    for g in range(6):
        h.mm.host_access(vma.start + (g << 12), True, g)
    assert v.read(0).ok                                                    # group 0..7: run 1..7 leaves the slot
    assert kvm.journal.counters.get("prefetch", 0) == 0
    assert v.read(5 << 12).ok                                              # run 1..4 inside: prefetched
    assert kvm.journal.counters["prefetch"] == 4
