"""The LoongArch GPA page-table fault paths (arch/loongarch/kvm/mmu.c, Linux v6.12 and v6.13).

Mirrors ``kvm_handle_mm_fault()``, ``kvm_map_page()`` (the slow path, on the generic template
:func:`kvmsim.kvm.fault.kvm_stage2_fault`), ``kvm_map_page_fast()`` (the fast path, taken first on every
fault), ``kvm_unmap_gfn_range()`` / ``kvm_flush_range()``, ``kvm_age_gfn()`` / ``kvm_test_age_gfn()``,
``kvm_arch_prepare_memory_region()``, ``kvm_arch_commit_memory_region()`` and
``kvm_arch_mmu_enable_log_dirty_pt_masked()`` on 4 KiB leaves.  ``kvm->mmu_lock`` is a spinlock (no
KVM_HAVE_MMU_RWLOCK): the model's write side.

The PTE bits (arch/loongarch/include/asm/kvm_mmu.h, v6.12 and v6.13): ``_PAGE_PRESENT``,
``_PAGE_WRITE`` (``kvm_pte_write()``: the page may be made writable; set iff ``writeable``, the model's
W and Host-writable bits), ``_PAGE_DIRTY`` (``kvm_pte_dirty()``: hardware-writable, set by a write fault
or by the fast path's ``kvm_pte_mkdirty()``, cleared by ``kvm_pte_mkclean()`` for dirty logging; the
model's D) and the software ``_PAGE_ACCESSED`` (``kvm_pte_young()``; the model's A).  ``kvm_map_page()``
builds ``_PAGE_PRESENT | __READABLE`` (+ ``_PAGE_WRITE``, + ``__WRITEABLE`` on a write fault): a new
leaf is *not* young; only the fast path sets ``_PAGE_ACCESSED``, and ``kvm_mkold_pte()`` clears only it,
so a read through a present leaf never faults.  A store to a leaf without ``_PAGE_DIRTY`` faults.

Where v6.12 and v6.13 differ (the "-" / "+" sides of the v13 series patches):

* ``kvm_map_page_fast()``: v6.12 takes ``get_page(kvm_pfn_to_refcounted_page(pfn))`` under the lock
  when it changed the PTE, then after ``spin_unlock()`` ``kvm_set_pfn_accessed(pfn)`` (young changed),
  ``mark_page_dirty()`` + ``kvm_set_pfn_dirty(pfn)`` (dirty changed) and ``put_page()``.  Patch 65
  "KVM: LoongArch: Mark "struct page" pfns dirty only in "slow" page fault path" dropped the
  ``kvm_set_pfn_dirty()``, patch 66 "KVM: LoongArch: Mark "struct page" pfns accessed only in "slow" page
  fault path" the get/accessed/put: v6.13 only marks the memslot dirty log.  The pfn comes from the PTE
  (``kvm_pte_pfn(new)``): the policy's ``fast_path_get_page`` and ``spte_ad_lost`` hooks;
* ``kvm_map_page()``: v6.12 after ``spin_unlock()``: ``if (prot_bits & _PAGE_DIRTY) {
  mark_page_dirty_in_slot(); kvm_set_pfn_dirty(pfn); }`` (a write fault only) then
  ``kvm_release_pfn_clean(pfn)``; on ``mmu_invalidate_retry_gfn()`` ``kvm_release_pfn_clean(pfn)`` marks
  the unused page accessed (:func:`kvm_map_page_v612_after_unlock`, picked by ``fault_release("loongarch")``).
  Patch 65 moved the dirty mark under the lock as ``if (writeable) kvm_set_pfn_dirty(pfn)``, patch 67
  "KVM: LoongArch: Mark "struct page" pfn accessed before dropping mmu_lock" the release, and patch 68
  "KVM: LoongArch: Use kvm_faultin_pfn() to map pfns into the guest" made them
  ``kvm_release_faultin_page(kvm, page, false, writeable)`` under the lock and the retry
  ``kvm_release_page_unused(page)``: a read fault on a host-writable page now dirties the folio.

The v6.12 fast path against truncate (kvm-semantics.md §3, INV-3 scenario 1)::

    CPU0 (kvm_map_page_fast, store to a clean leaf) | CPU1 (truncate)
    spin_lock; PTE |= _PAGE_DIRTY; get_page(F)      |
    spin_unlock                                     |
                                                    | invalidate_range_start: flush the GPA PTE
                                                    | remove F from the page cache
    kvm_set_pfn_dirty(F); put_page(F)               |
    → WARN in filemap_unaccount_folio (dirty folio) (the transient reference keeps F alive)

Model differences: ``kvm_map_page()`` loops to ``retry:`` itself; the model returns RETRY and the vCPU
re-enters (the next pass runs the fast path first, which finds the PTE absent).  The v6.13 retry's
``kvm_release_page_unused()`` runs after ``spin_unlock()``; the template puts it under the lock (a put
records no lock state, so nothing observable differs).  Not modelled: huge mappings
(``fault_supports_huge_mapping()``, ``host_pfn_mapping_level()``, ``kvm_split_huge()``; the
KVM_MEM_HUGEPAGE_CAPABLE / INCAPABLE flags ``kvm_arch_prepare_memory_region()`` computes are kept in
``slot.arch["flags"]`` but no leaf is ever a PMD), cache attributes (``_CACHE_CC`` / ``_CACHE_SUC``),
the vCPU TLB flush requests and ifetch faults (``kvm_handle_rdwr_fault()`` raises ADE for them).
"""

from __future__ import annotations

import errno
from enum import IntFlag

import numpy as np

from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.fault import FaultRet, KvmPageFault, _held_src, kvm_release_pfn_clean_guess, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, kvm_acquired, kvm_dropped, kvm_pfn_to_refcounted_page, kvm_set_pfn_dirty
from kvmsim.kvm.stage2 import S2, GenericStage2
from kvmsim.sched import Steps, kpath
from kvmsim.trace import Src
from kvmsim.types import PAGE_SHIFT

_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))
PMD_SHIFT = 21 - PAGE_SHIFT                   # PMD_SIZE in pages (4 KiB pages, 3-level tables)


class KVM_MEM_HUGEPAGE(IntFlag):
    """``slot->arch.flags`` (arch/loongarch/include/asm/kvm_host.h)."""

    CAPABLE = 1 << 0        # KVM_MEM_HUGEPAGE_CAPABLE
    INCAPABLE = 1 << 1      # KVM_MEM_HUGEPAGE_INCAPABLE


def _fault_efault(pfn: int) -> int:
    """``kvm_map_page()``: any error pfn is -EFAULT, which ``kvm_handle_rdwr_fault()`` (exit.c) emulates
    as an MMIO access."""
    return FaultRet.EMULATE


class LoongArchMmu(GenericStage2):
    """The LoongArch GPA page table: W (``_PAGE_WRITE``, equal to the model's Host-writable bit), D
    (``_PAGE_DIRTY``) and the software young bit A (``_PAGE_ACCESSED``)."""

    name = "loongarch"

    def __init__(self, kvm, *, cpu_vabits: int = 48, **opts):
        super().__init__(kvm, **opts)
        if not 40 <= cpu_vabits <= 48:
            raise UsageError(f"cpu_vabits must be in [40, 48] (CPUCFG1.VALEN), not {cpu_vabits}")
        #: ``kvm_arch_init_vm()`` (vm.c, v6.12 and v6.13): ``kvm->arch.gpa_size = BIT(cpu_vabits - 1)``.
        self.gpa_size = 1 << (cpu_vabits - 1)

    # ---- memslots --------------------------------------------------------------------------------
    def prepare_memory_region(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_prepare_memory_region()`` (v6.12 and v6.13): CREATE and MOVE only; a slot
        ending past ``gpa_size`` is ENOMEM; then ``new->arch.flags``: HUGEPAGE_CAPABLE when size, gpa and
        hva are all PMD-aligned, INCAPABLE when gpa and hva differ within a PMD or the slot cannot hold
        one aligned PMD.  No VMA is looked at (VM_PFNMAP with dirty logging is accepted)."""
        from kvmsim.kvm.memslot import KvmMrChange
        if change not in (KvmMrChange.CREATE, KvmMrChange.MOVE):
            return
        if new.base_gfn + new.npages > self.gpa_size >> PAGE_SHIFT:
            raise ModelError(errno.ENOMEM, f"slot {new.id}: gfn range ends past the VM's GPA size "
                                           f"({self.gpa_size:#x})")
        pmd = 1 << PMD_SHIFT
        gpa_off, hva_off = new.base_gfn % pmd, (new.userspace_addr >> PAGE_SHIFT) % pmd
        if new.npages % pmd == 0 and gpa_off == 0 and hva_off == 0:
            flags = KVM_MEM_HUGEPAGE.CAPABLE
        elif gpa_off != hva_off or new.npages + (gpa_off or pmd) < 2 * pmd:
            flags = KVM_MEM_HUGEPAGE.INCAPABLE
        else:
            flags = KVM_MEM_HUGEPAGE(0)
        new.arch["flags"] = flags

    def slot_apply_flags(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_commit_memory_region()``: FLAGS_ONLY only; nothing when both old and new are
        read-only; when LOG_DIRTY_PAGES is turned on (and not manual-protect + INITIALLY_SET),
        ``kvm_mkclean_gpa_pt()`` of the slot under ``mmu_lock`` (clears ``_PAGE_DIRTY``; ``_PAGE_WRITE``
        stays, so the next store takes the fast path), and a flush if anything changed."""
        from kvmsim.kvm.dirty import KVM_DIRTY_LOG_INITIALLY_SET
        from kvmsim.kvm.memslot import KVM_MEM, KvmMrChange
        if change != KvmMrChange.FLAGS_ONLY or (old.flags & new.flags) & KVM_MEM.READONLY:
            return
        if old.logging or not new.logging:
            return
        if self.kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            return
        kvm = self.kvm
        kvm.mmu_lock.write_lock()
        needs_flush = self.kvm_mkclean_gpa_pt(new, 0, new.npages)
        kvm.mmu_lock.write_unlock()
        if needs_flush:
            kvm.flush_remote_tlbs("kvm_arch_commit_memory_region")

    def kvm_mkclean_gpa_pt(self, slot, lo: int, hi: int, mask=None) -> bool:
        """``kvm_mkclean_pte()`` over ``[lo, hi)`` (slot-relative): clear ``_PAGE_DIRTY`` of present leaves
        (only those whose bit is set in ``mask``, the ``_KVM_HAS_PGMASK`` walk); true if any changed."""
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        idx = np.arange(lo, hi) if mask is None else lo + np.nonzero(mask[:hi - lo])[0]
        hit = idx[(bits[idx] & _P).astype(bool) & (bits[idx] & _D).astype(bool)]
        bits[hit] &= ~np.uint8(_D)
        return len(hit) > 0

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked()``: ``kvm_mkclean_pte()`` with ``_KVM_HAS_PGMASK``
        from ``__ffs(mask)`` to ``__fls(mask)``: only the pages whose mask bit is set are cleaned."""
        m = np.asarray(mask, dtype=bool)
        self.kvm_mkclean_gpa_pt(slot, gfn_offset, gfn_offset + len(m), m)

    # ---- kvm_handle_mm_fault / kvm_map_page ----------------------------------------------------------
    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """Mirrors ``kvm_handle_mm_fault()`` → ``kvm_map_page()``: the fast path first; if it fails,
        ``gfn_to_hva_memslot_prot()`` (no slot, or a store to a read-only one: -EFAULT, which
        ``kvm_handle_rdwr_fault()`` emulates as MMIO), then the slow path."""
        kvm = self.kvm
        kvm.journal.count("page_fault")
        r = yield from self.kvm_map_page_fast.steps(vcpu, gpa, write)
        if r == 0:
            return FaultRet.FIXED
        gfn = gpa >> PAGE_SHIFT
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None or slot.invalid or (write and slot.readonly):
            kvm.journal.count("kvm_emu_mmio_write" if write else "kvm_emu_mmio_read")
            return FaultRet.EMULATE
        r = yield from self.kvm_map_page.steps(vcpu, slot, gpa, write)
        return r

    @kpath
    def kvm_map_page(self, vcpu, slot, gpa: int, write: bool) -> Steps:
        """Mirrors the slow path of ``kvm_map_page()`` (v6.12 and v6.13): the generic template with
        LoongArch's hooks below; FIXED, RETRY (``mmu_invalidate_retry_gfn()``), or EMULATE for an error pfn."""
        r = yield from kvm_stage2_fault.steps(self, KvmPageFault(vcpu, gpa >> PAGE_SHIFT, slot, write))
        return r

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "loongarch"
    fault_labels = ("kvm_map_page: mmu_seq snapshot", "kvm_map_page: pfn resolved",
                    "kvm_map_page: spin_unlock(mmu_lock)")
    fault_lock_read = False           # spin_lock(&kvm->mmu_lock)
    fault_faultin_nowait = False      # one gfn_to_pfn_prot() / kvm_faultin_pfn()
    fault_logging_write_only = False  # a read fault maps _PAGE_WRITE (not _PAGE_DIRTY) while logging too
    fault_retry_ret = 0
    fault_retry_per_gfn = True        # mmu_invalidate_retry_gfn(kvm, mmu_seq, gfn)
    fault_stale_invalid_slot = False
    handle_error_pfn = staticmethod(_fault_efault)

    def fault_map(self, fault: KvmPageFault) -> int:
        """``prot_bits = _PAGE_PRESENT | __READABLE``; ``writeable``: ``|= _PAGE_WRITE``, and a write
        fault ``|= __WRITEABLE``; ``kvm_set_pte()`` over whatever is there (no page is marked)."""
        kvm = self.kvm
        pfns, bits = self._tables(fault.slot)
        i = fault.gfn - fault.slot.base_gfn
        w = fault.map_writable
        pfns[i] = fault.pfn
        bits[i] = _P | ((_W | _HW) if w else 0) | (_D if w and fault.write else 0) | \
            (_H if fault.kfp.hold != Hold.NONE else 0)
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=fault.pfn, gfn=fault.gfn, kvm=True, caller="kvm_set_pte",
                         locked=kvm.mmu_lock.held(), extra={"writable": w, "host_writable": w})
        return FaultRet.FIXED

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_page_unused(page)`` on the retry only; success is ``kvm_release_faultin_page(kvm,
        page, false, writeable)``."""
        return fault.retry

    def fault_after_unlock(self, fault: KvmPageFault) -> None:
        """``if (prot_bits & _PAGE_DIRTY) mark_page_dirty_in_slot()`` after ``spin_unlock()`` (both versions)."""
        if not fault.retry and fault.map_writable and fault.write:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(self.kvm, fault.slot, fault.gfn, fault.vcpu)

    # ---- kvm_map_page_fast --------------------------------------------------------------------------
    @kpath
    def kvm_map_page_fast(self, vcpu, gpa: int, write: bool) -> Steps:
        """Mirrors ``kvm_map_page_fast()``: under ``mmu_lock``, no present PTE (or a store to a PTE without
        ``_PAGE_WRITE``) is -EFAULT; else ``kvm_pte_mkyoung()`` and, for a store, ``kvm_pte_mkdirty()``.
        If the PTE changed: the policy's ``fast_path_get_page`` (v6.12 ``get_page()`` on the
        guessed page) under the lock; after the unlock its ``spte_ad_lost`` (v6.12
        ``kvm_set_pfn_accessed()`` / ``kvm_set_pfn_dirty()``), the ``put_page()``, and
        ``mark_page_dirty()`` when the dirty bit changed (both versions)."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        yield from kvm.mmu_lock.write_lock.steps()
        slot = kvm.gfn_to_memslot(gfn)
        old = 0
        if slot is not None and "s2" in slot.arch:
            pfns, bits = self._tables(slot)
            i = gfn - slot.base_gfn
            old = int(bits[i])
        if not old & _P or (write and not old & _D and not old & _W):
            kvm.mmu_lock.write_unlock()
            return -errno.EFAULT
        new = old | _A | (_D if write else 0)
        changed = new ^ old
        page = None
        pfn = int(pfns[i])
        if changed:
            bits[i] = new
            kvm.journal.count("kvm_map_page_fast")
            page = kvm.ops.fast_path_get_page(kvm, pfn, "kvm_map_page_fast")
        kvm.mmu_lock.write_unlock()
        yield "kvm_map_page_fast: spin_unlock(mmu_lock)"
        if changed:
            kvm.ops.spte_ad_lost(kvm, pfn, dirty=bool(changed & _D), accessed=bool(changed & _A),
                                 caller="kvm_map_page_fast", gfn=gfn)
            if page is not None:
                kvm_dropped(kvm, page, Hold.GET, "kvm_map_page_fast")
                kvm.phys.put_page(page, "kvm_map_page_fast", kvm=True, source=Src.SPTE)
        if changed & _D:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
        return 0

    # ---- guest accesses -------------------------------------------------------------------------
    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """A present leaf lets loads through whatever its young bit (``_PAGE_ACCESSED`` is software);
        a store needs ``_PAGE_DIRTY`` (else a TLB modify exception → ``kvm_handle_write_fault()``)."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        return bool(b & _P and (not write or b & _D))

    # ---- zapping, aging -----------------------------------------------------------------------
    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """``kvm_flush_pte()`` writes the invalid entry; no page is marked in either version."""

    def flush_on_age(self) -> bool:
        """The young flush stays in v6.13: only x86 selects KVM_ELIDE_TLB_FLUSH_IF_YOUNG."""
        return True

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        """``kvm_test_age_gfn()``: ``kvm_pte_young()`` of the leaf at ``range->start`` only."""
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        b = int(bits[start - slot.base_gfn])
        return bool(b & _P and b & _A)


# ---- v6.12 (picked by LegacyPolicy.fault_release("loongarch")) --------------------------------------------

def kvm_map_page_v612_after_unlock(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.12 ``kvm_map_page()`` after ``spin_unlock()``: on the retry ``kvm_release_pfn_clean(pfn)``
    (accessed + put of the unused page); else ``if (prot_bits & _PAGE_DIRTY) kvm_set_pfn_dirty(pfn)`` (a
    write fault on a writeable page only) and ``kvm_release_pfn_clean(pfn)``.  Patch 65 "KVM: LoongArch:
    Mark "struct page" pfns dirty only in "slow" page fault path", patch 67 "KVM: LoongArch: Mark "struct
    page" pfn accessed before dropping mmu_lock" and patch 68 "KVM: LoongArch: Use kvm_faultin_pfn() to
    map pfns into the guest" made it ``kvm_release_faultin_page(kvm, page, false, writeable)`` under the
    lock and ``kvm_release_page_unused()`` on the retry."""
    pfn, gfn, kfp = fault.pfn, fault.gfn, fault.kfp
    if not fault.retry and fault.map_writable and fault.write:
        kvm_set_pfn_dirty(kvm, pfn, "kvm_map_page", source=_held_src(kfp), gfn=gfn)
    kvm_release_pfn_clean_guess(kvm, pfn, kfp, unused=fault.retry, caller="kvm_release_pfn_clean", gfn=gfn)


def kvm_map_page_fast_v612_get_page(kvm, pfn: int, caller: str) -> int | None:
    """v6.12 ``kvm_map_page_fast()`` under ``mmu_lock``: ``page = kvm_pfn_to_refcounted_page(pfn); if
    (page) get_page(page);`` on the pfn of the PTE it just changed, put after ``kvm_set_pfn_accessed()`` /
    ``kvm_set_pfn_dirty()`` past the unlock.  Removed by patch 66 "KVM: LoongArch: Mark "struct page" pfns
    accessed only in "slow" page fault path"."""
    page = kvm_pfn_to_refcounted_page(kvm.phys, pfn)
    if page is None:
        return None
    kvm_acquired(kvm, page, Hold.GET, caller)
    kvm.phys.get_page(page, caller, kvm=True, source=Src.SPTE)
    return page
