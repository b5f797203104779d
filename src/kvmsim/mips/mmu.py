"""The MIPS VZ GPA page-table fault paths (arch/mips/kvm/mmu.c, arch/mips/kvm/mips.c; Linux v6.12 and v6.13).

Mirrors ``kvm_mips_handle_vz_root_tlb_fault()`` → ``kvm_mips_map_page()`` (the slow path, on the generic
template :func:`kvmsim.kvm.fault.kvm_stage2_fault`) and ``_kvm_mips_map_page_fast()`` (tried first),
``kvm_unmap_gfn_range()`` / ``kvm_mips_flush_gpa_pt()``, ``kvm_age_gfn()`` / ``kvm_test_age_gfn()``
(``kvm_mips_mkold_gpa_pt()``), ``kvm_arch_commit_memory_region()`` and
``kvm_arch_mmu_enable_log_dirty_pt_masked()`` (``kvm_mips_mkclean_gpa_pt()``) on 4 KiB leaves.
``kvm->mmu_lock`` is a spinlock: the model's write side.

The GPA PTE is a host ``pte_t`` (arch/mips/include/asm/pgtable-bits.h): ``_PAGE_WRITE`` (the model's W
and Host-writable, set iff ``writeable``), ``_PAGE_MODIFIED`` with ``_PAGE_SILENT_WRITE``
(``pte_dirty()``, the model's D: hardware-writable) and ``_PAGE_ACCESSED`` with ``_PAGE_SILENT_READ``
(``pte_young()``, the model's A: hardware-valid).  ``kvm_mips_map_page()`` builds ``_PAGE_PRESENT |
__READABLE`` (young), + ``_PAGE_WRITE``, + ``__WRITEABLE`` on a write fault; ``pte_mkold()`` clears the
valid bit too, so *any* access to an old leaf faults, and a store to a clean one faults.

Where v6.12 and v6.13 differ (the "-" / "+" sides of the v13 series patches):

* ``_kvm_mips_map_page_fast()``: v6.12 calls ``kvm_set_pfn_dirty(pte_pfn())`` under the lock when a
  store makes a clean PTE dirty, and ``kvm_set_pfn_accessed(pfn)`` after ``spin_unlock()`` when it made
  an old PTE young, both holding no reference (the policy's ``spte_ad_lost`` hook).  Patch 69 "KVM:
  MIPS: Mark "struct page" pfns dirty only in "slow" page fault path" and patch 70 "KVM: MIPS: Mark
  "struct page" pfns accessed only in "slow" page fault path" removed them; both versions keep
  ``mark_page_dirty()`` under the lock;
* ``kvm_mips_map_page()``: v6.12 ``kvm_set_pfn_dirty(pfn)`` under the lock before ``set_pte()``, for a
  write fault on a writeable page only; after ``spin_unlock()`` ``kvm_release_pfn_clean(pfn)`` *then*
  ``kvm_set_pfn_accessed(pfn)``, a mark after KVM's own put; the retry's ``kvm_release_pfn_clean()``
  marks the unused page accessed (:func:`kvm_mips_map_page_v612_after_unlock`,
  :func:`kvm_mips_map_page_v612_dirty_before_map`).  Patch 69 moved the dirty mark after ``set_pte()``
  as ``if (writeable)``, patch 71 "KVM: MIPS: Mark "struct page" pfns accessed prior to dropping
  mmu_lock" the release under the lock, and patch 72 "KVM: MIPS: Use kvm_faultin_pfn() to map pfns into
  the guest" made it ``kvm_release_faultin_page(kvm, page, false, writeable)`` and the retry
  ``kvm_release_page_unused(page)``.

The v6.12 slow path against munmap (kvm-semantics.md §3, INV-3 scenario 2)::

    CPU0 (kvm_mips_map_page, holds the GUP ref on P) | CPU1 (munmap)
    spin_lock; set_pte(GPA → P); spin_unlock         |
                                                     | invalidate_range_start: flush the GPA PTE
                                                     | zap the host PTE, drop its reference
    kvm_release_pfn_clean(P)  → P freed              |
    kvm_set_pfn_accessed(P)   → mark_page_accessed on a freed page

Model differences: ``kvm_mips_map_page()`` loops to ``retry:`` itself; the model returns RETRY and the
vCPU re-enters (the fast path runs again first).  The v6.13 retry's ``kvm_release_page_unused()`` runs
after ``spin_unlock()``; the template puts it under the lock (a put records no lock state).  The
buddy PTE (``ptep_buddy()``), the root TLB write of ``kvm_mips_handle_vz_root_tlb_fault()``, the
trap-and-emulate (KSeg0) paths, the inclusive ``end`` of the ``kvm_mips_*_gpa_pt()`` walkers and the
GVA page tables are not modelled.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.kvm.fault import FaultRet, KvmPageFault, _held_src, kvm_release_pfn_clean_guess, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, kvm_set_pfn_accessed, kvm_set_pfn_dirty
from kvmsim.kvm.stage2 import S2, GenericStage2
from kvmsim.sched import Steps, kpath
from kvmsim.trace import Src
from kvmsim.types import PAGE_SHIFT

_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))


def _root_tlb_fault_mmio(pfn: int) -> int:
    """``kvm_mips_map_page()``: an error pfn is -EFAULT; ``kvm_trap_vz_handle_tlb_ld_miss()`` /
    ``_st_miss()`` then "Treat as MMIO" (``kvm_mips_emulate_load/store()``)."""
    return FaultRet.EMULATE


class MipsMmu(GenericStage2):
    """The MIPS VZ GPA page table (``kvm->arch.gpa_mm``): W (``_PAGE_WRITE``), D (``pte_dirty()``) and A
    (``pte_young()``, which is also the hardware valid bit)."""

    name = "mips"

    # ---- memslots --------------------------------------------------------------------------------
    def prepare_memory_region(self, old, new, change) -> None:
        """``kvm_arch_prepare_memory_region()`` (mips.c, v6.12 and v6.13) returns 0: nothing is refused."""

    def slot_apply_flags(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_commit_memory_region()`` (mips.c): on FLAGS_ONLY turning LOG_DIRTY_PAGES on,
        ``kvm_mips_mkclean_gpa_pt()`` of the whole slot under ``mmu_lock`` and
        ``kvm_flush_remote_tlbs_memslot()`` if anything changed.  No manual-protect exception."""
        from kvmsim.kvm.memslot import KvmMrChange
        if change != KvmMrChange.FLAGS_ONLY or old.logging or not new.logging:
            return
        kvm = self.kvm
        kvm.mmu_lock.write_lock()
        if self.kvm_mips_mkclean_gpa_pt(new, 0, new.npages):
            kvm.flush_remote_tlbs("kvm_flush_remote_tlbs_memslot")
        kvm.mmu_lock.write_unlock()

    def kvm_mips_mkclean_gpa_pt(self, slot, lo: int, hi: int) -> bool:
        """``pte_mkclean()`` on every present dirty leaf of ``[lo, hi)`` (slot-relative); true if any."""
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        seg = bits[lo:hi]
        hit = (seg & _P).astype(bool) & (seg & _D).astype(bool)
        seg[hit] &= ~np.uint8(_D)
        return bool(hit.any())

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked()``: ``kvm_mips_mkclean_gpa_pt()`` from
        ``__ffs(mask)`` to ``__fls(mask)``, so clean pages between two set bits are cleaned too."""
        idx = np.nonzero(mask)[0]
        if len(idx):
            self.kvm_mips_mkclean_gpa_pt(slot, gfn_offset + int(idx[0]), gfn_offset + int(idx[-1]) + 1)

    # ---- kvm_mips_handle_vz_root_tlb_fault / kvm_mips_map_page ---------------------------------------
    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """Mirrors ``kvm_mips_handle_vz_root_tlb_fault()`` → ``kvm_mips_map_page()``: the fast path, then
        the slow path; no slot, an invalid one or a store to a read-only one ends in an error pfn, i.e.
        -EFAULT, which the TLB-miss handlers emulate as MMIO (checked up front here)."""
        kvm = self.kvm
        kvm.journal.count("page_fault")
        r = yield from self._kvm_mips_map_page_fast.steps(vcpu, gpa, write)
        if r == 0:
            return FaultRet.FIXED
        slot = kvm.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if slot is None or slot.invalid or (write and slot.readonly):
            kvm.journal.count("kvm_mips_emulate_store" if write else "kvm_mips_emulate_load")
            return FaultRet.EMULATE
        r = yield from self.kvm_mips_map_page.steps(vcpu, slot, gpa, write)
        return r

    @kpath
    def kvm_mips_map_page(self, vcpu, slot, gpa: int, write_fault: bool) -> Steps:
        """Mirrors the slow path of ``kvm_mips_map_page()`` (v6.12 and v6.13): the generic template with
        the MIPS hooks below; FIXED, RETRY (``mmu_invalidate_retry()``) or EMULATE for an error pfn."""
        r = yield from kvm_stage2_fault.steps(self, KvmPageFault(vcpu, gpa >> PAGE_SHIFT, slot, write_fault))
        return r

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "mips"
    fault_labels = ("kvm_mips_map_page: mmu_seq snapshot", "kvm_mips_map_page: pfn resolved",
                    "kvm_mips_map_page: spin_unlock(mmu_lock)")
    fault_lock_read = False           # spin_lock(&kvm->mmu_lock)
    fault_faultin_nowait = False      # one gfn_to_pfn_prot() / kvm_faultin_pfn()
    fault_logging_write_only = False  # _PAGE_WRITE on a read fault too; only __WRITEABLE waits for a store
    fault_retry_ret = 0
    fault_retry_per_gfn = False       # mmu_invalidate_retry(kvm, mmu_seq): the whole VM
    fault_stale_invalid_slot = False
    fault_after_unlock = None         # mark_page_dirty() ran under the lock
    handle_error_pfn = staticmethod(_root_tlb_fault_mmio)

    def fault_map(self, fault: KvmPageFault) -> int:
        """``prot_bits = _PAGE_PRESENT | __READABLE``; ``if (writeable) { |= _PAGE_WRITE; if (write_fault)
        { |= __WRITEABLE; mark_page_dirty(); } }`` (v6.12 also ``kvm_set_pfn_dirty()`` here, the resolved
        ``fault_dirty_before_map``), then ``set_pte()`` over whatever is there."""
        kvm = self.kvm
        w, dirty = fault.map_writable, fault.map_writable and fault.write
        if dirty:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, fault.slot, fault.gfn, fault.vcpu)
            before = kvm.ops.fault_dirty_before_map
            if before is not None:
                with kvm.journal.fault_release():
                    before(kvm, fault)
        pfns, bits = self._tables(fault.slot)
        i = fault.gfn - fault.slot.base_gfn
        pfns[i] = fault.pfn
        bits[i] = _P | _A | ((_W | _HW) if w else 0) | (_D if dirty else 0) | \
            (_H if fault.kfp.hold != Hold.NONE else 0)
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=fault.pfn, gfn=fault.gfn, kvm=True, caller="set_pte",
                         locked=kvm.mmu_lock.held(), extra={"writable": w, "host_writable": w})
        return FaultRet.FIXED

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_page_unused(page)`` on the retry; ``kvm_release_faultin_page(kvm, page, false,
        writeable)`` otherwise."""
        return fault.retry

    # ---- _kvm_mips_map_page_fast --------------------------------------------------------------------
    @kpath
    def _kvm_mips_map_page_fast(self, vcpu, gpa: int, write_fault: bool) -> Steps:
        """Mirrors ``_kvm_mips_map_page_fast()``: under ``mmu_lock``, no present PTE is -EFAULT; an old PTE
        is made young (v6.12 remembers its pfn for ``kvm_set_pfn_accessed()`` after the unlock, *also*
        when the store check below fails); a store to a clean PTE without ``_PAGE_WRITE`` is -EFAULT,
        else ``pte_mkdirty()``, ``mark_page_dirty()`` and v6.12's ``kvm_set_pfn_dirty()``."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        yield from kvm.mmu_lock.write_lock.steps()
        slot = kvm.gfn_to_memslot(gfn)
        b = 0
        if slot is not None and "s2" in slot.arch:
            pfns, bits = self._tables(slot)
            i = gfn - slot.base_gfn
            b = int(bits[i])
        ret, pfn_valid, pfn = 0, False, -1
        if not b & _P:
            ret = -errno.EFAULT
        else:
            pfn = int(pfns[i])
            if not b & _A:
                bits[i] = b = b | _A
                pfn_valid = True
                kvm.journal.count("pte_mkyoung")
            if write_fault and not b & _D:
                if not b & _W:
                    ret = -errno.EFAULT
                else:
                    from kvmsim.kvm.dirty import mark_page_dirty_in_slot
                    bits[i] = b | _D
                    kvm.journal.count("pte_mkdirty")
                    mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
                    kvm.ops.spte_ad_lost(kvm, pfn, dirty=True, accessed=False, caller="_kvm_mips_map_page_fast",
                                         gfn=gfn)
        kvm.mmu_lock.write_unlock()
        yield "_kvm_mips_map_page_fast: spin_unlock(mmu_lock)"
        if pfn_valid:
            kvm.ops.spte_ad_lost(kvm, pfn, dirty=False, accessed=True, caller="_kvm_mips_map_page_fast", gfn=gfn)
        return ret

    # ---- guest accesses -------------------------------------------------------------------------
    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """Any access to an old leaf faults (``pte_mkold()`` clears the valid bit); a store needs D."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        return bool(b & _P and b & _A and (not write or b & _D))

    # ---- zapping, aging -----------------------------------------------------------------------
    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """``kvm_mips_flush_gpa_pt()`` clears PTEs; no page is marked in either version."""

    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        """``kvm_unmap_gfn_range()``: ``kvm_mips_flush_gpa_pt()`` of the range, then ``return true`` (the
        caller flushes whether or not anything was mapped)."""
        super().unmap_gfn_range(slot, start, end, reason)
        return True

    def flush_on_age(self) -> bool:
        """The young flush stays in v6.13: only x86 selects KVM_ELIDE_TLB_FLUSH_IF_YOUNG."""
        return True

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        """``kvm_test_age_gfn()``: ``pte_young()`` of the PTE at ``range->start`` only."""
        if "s2" not in slot.arch:
            return False
        b = int(self._tables(slot)[1][start - slot.base_gfn])
        return bool(b & _P and b & _A)


# ---- v6.12 (picked by LegacyPolicy.fault_release("mips")) --------------------------------------------------

def kvm_mips_map_page_v612_dirty_before_map(kvm, fault: KvmPageFault) -> None:
    """v6.12 ``kvm_mips_map_page()``: ``if (write_fault) { prot_bits |= __WRITEABLE; mark_page_dirty();
    kvm_set_pfn_dirty(pfn); }`` under the lock, before ``set_pte()``, for a write fault on a writeable
    page only.  Patch 69 "KVM: MIPS: Mark "struct page" pfns dirty only in "slow" page fault path" moved it
    after ``set_pte()`` as ``if (writeable)``."""
    kvm_set_pfn_dirty(kvm, fault.pfn, "kvm_mips_map_page", source=_held_src(fault.kfp), gfn=fault.gfn)


def kvm_mips_map_page_v612_after_unlock(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.12 ``kvm_mips_map_page()`` after ``spin_unlock()``: on the retry ``kvm_release_pfn_clean(pfn)``
    (accessed + put of the unused page); else ``kvm_release_pfn_clean(pfn); kvm_set_pfn_accessed(pfn);``:
    the second mark comes after KVM's own put, on a pfn it no longer holds (``Src.GUESS``: only the pfn
    says which page), a mark on a freed page if a racing munmap dropped the last other reference.
    Patch 71 "KVM: MIPS: Mark "struct page" pfns accessed prior to dropping mmu_lock" made it one release
    under the lock, patch 72 "KVM: MIPS: Use kvm_faultin_pfn() to map pfns into the guest"
    ``kvm_release_faultin_page()`` / ``kvm_release_page_unused()``."""
    pfn, gfn = fault.pfn, fault.gfn
    kvm_release_pfn_clean_guess(kvm, pfn, fault.kfp, unused=fault.retry, caller="kvm_release_pfn_clean",
                                gfn=gfn)
    if not fault.retry:
        kvm_set_pfn_accessed(kvm, pfn, "kvm_mips_map_page", source=Src.GUESS, gfn=gfn)
