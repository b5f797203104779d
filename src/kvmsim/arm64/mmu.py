"""The arm64 stage-2 fault paths (arch/arm64/kvm/mmu.c, Linux v6.12 and v6.13).

Mirrors ``kvm_handle_guest_abort()``, ``user_mem_abort()``, ``handle_access_fault()``,
``kvm_age_gfn()`` and the dirty-logging hooks (``kvm_arch_commit_memory_region()``,
``kvm_arch_mmu_enable_log_dirty_pt_masked()``) on 4 KiB leaves.  Storage, zapping, aging and the
checker's view of the leaves come from :class:`kvmsim.kvm.stage2.GenericStage2`; the pfn comes from
the shared ``__kvm_faultin_pfn()`` model (:func:`kvmsim.kvm.pfn._kvm_faultin_pfn`), which is also
what legacy ``__gfn_to_pfn_memslot(slot, gfn, false, false, NULL, write_fault, &writable, NULL)``
does in the model (one hva_to_pfn, policy hooks where v6.12 differs).

Where the two versions differ (checked against the v13 series mails):

* v6.12 releases after ``read_unlock(&kvm->mmu_lock)``: ``if (writable && !ret) {
  kvm_set_pfn_dirty(pfn); mark_page_dirty_in_slot(); }`` then ``kvm_release_pfn_clean(pfn)``,
  which marks accessed and puts even on the ``-EAGAIN`` retry.  Patch 55 "KVM: arm64: Mark "struct
  page" pfns accessed/dirty before dropping mmu_lock" and patch 56 "KVM: arm64: Use
  __kvm_faultin_pfn() to handle memory aborts" made it ``kvm_release_faultin_page(kvm, page, !!ret,
  writable)`` under the read lock, with only ``mark_page_dirty_in_slot()`` after the unlock;
* v6.12 ``handle_access_fault()`` calls ``kvm_set_pfn_accessed()`` on the pfn of the PTE that
  ``kvm_pgtable_stage2_mkyoung()`` returned, after the unlock and without a reference; patch 83
  "KVM: arm64: Don't mark "struct page" accessed when making SPTE young" removed it (the
  ``spte_ad_lost`` policy hook).

The v6.12 order is an INV-3 violation (kvm-semantics.md §3, locking.rst form)::

    CPU0 (user_mem_abort, holds a ref on F)   | CPU1 (truncate / hole punch)
    read_lock(mmu_lock); map IPA → F (W)      |
    read_unlock(mmu_lock)                     |
                                              | invalidate_range_start: unmap IPA
                                              | remove F from the page cache
    kvm_set_pfn_dirty(F)                      |
    → WARN in filemap_unaccount_folio (folio dirtied after truncate)

Not modelled: block mappings (``transparent_hugepage_adjust()``, hugetlb and PFNMAP block sizes;
every leaf is PAGE_SIZE), MTE tag sanitising and ``kvm_vm_ioctl_mte_copy_tags()`` (patch 77),
exec faults and device (non-cacheable) mappings, nested stage-2, pKVM, hardware Access-flag
updates (FEAT_HAFDBS: every access to an old leaf takes an Access-flag fault).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.fault import FaultRet, KvmPageFault, abort_error_pfn, kvm_fault_memslot, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, gfn_to_hva_memslot_prot
from kvmsim.kvm.stage2 import S2, GenericStage2
from kvmsim.mm.vma import VM
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT

_P, _W, _HW, _A, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.HELD))
_WP = np.uint8(_W | _HW)
EAGAIN = -errno.EAGAIN


def memslot_is_logging(slot) -> bool:
    """Mirrors ``memslot_is_logging()``: a dirty bitmap and not read-only (a ring-only slot is not)."""
    return slot.dirty_bitmap is not None and not slot.readonly


class Arm64Mmu(GenericStage2):
    """The arm64 stage-2 MMU: S2AP_W (``W``, kept equal to the model's Host-writable bit: a leaf becomes
    writable only through a fault under ``mmu_lock``, never locklessly) and the Access flag (``A``).
    There is no dirty bit: KVM does not use DBM at stage 2."""

    name = "arm64"

    def __init__(self, kvm, *, ipa_bits: int = 40, **opts):
        super().__init__(kvm, **opts)
        if not 32 <= ipa_bits <= 52:
            raise UsageError(f"ipa_bits must be in [32, 52] (KVM_VM_TYPE_ARM_IPA_SIZE), not {ipa_bits}")
        #: The VM's IPA size: ``kvm_phys_size(&kvm->arch.mmu)`` is ``1 << ipa_bits``; a VM type of 0
        #: gets the default 40 bits (KVM_PHYS_SHIFT), KVM_VM_TYPE_ARM_IPA_SIZE(n) asks for n.
        self.ipa_bits = ipa_bits

    def prepare_memory_region(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_prepare_memory_region()`` (arch/arm64/kvm/mmu.c, v6.12 and v6.13).

        CREATE, MOVE and FLAGS_ONLY only: a slot ending past the IPA space is EFAULT
        (``base_gfn + npages > kvm_phys_size() >> PAGE_SHIFT``); then each VMA the region overlaps
        (``find_vma_intersection()``, holes skipped): a VM_PFNMAP one with LOG_DIRTY_PAGES is EINVAL,
        "IO region dirty page logging not allowed" (VM_PFNMAP only: a VM_IO-only VMA passes).  The MTE
        check (``kvm_vma_mte_allowed()``) is not modelled.
        """
        from kvmsim.kvm.memslot import KvmMrChange, vmas_of_region
        if change not in (KvmMrChange.CREATE, KvmMrChange.MOVE, KvmMrChange.FLAGS_ONLY):
            return
        if new.base_gfn + new.npages > (1 << self.ipa_bits) >> PAGE_SHIFT:
            raise ModelError(errno.EFAULT, f"slot {new.id}: gfn range ends past the {self.ipa_bits}-bit IPA space")
        for vma in vmas_of_region(self.kvm.mm, new):
            if vma.flags & VM.PFNMAP and new.logging:
                raise ModelError(errno.EINVAL, f"slot {new.id}: IO region dirty page logging not allowed "
                                               f"(VM_PFNMAP VMA at {vma.start:#x})")

    # ---- kvm_handle_guest_abort ------------------------------------------------------------------
    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """Mirrors ``kvm_handle_guest_abort()``: the abort's class follows from the leaf the vCPU saw.

        No memslot, or a write to a read-only one (``gfn_to_hva_memslot_prot()`` not writable) is an
        MMIO exit (``io_mem_abort()``); an invalid leaf is a translation fault, a valid leaf with the
        Access flag clear an Access-flag fault, a valid leaf without S2AP_W a permission fault.
        """
        kvm = self.kvm
        gfn, slot = kvm_fault_memslot(kvm, gpa)
        if gfn_to_hva_memslot_prot(slot, gfn, write) < 0:     # kvm_is_error_hva() || (write && !writable)
            kvm.journal.count("io_mem_abort")
            return FaultRet.EMULATE
        pfns, bits = self._tables(slot)
        b = int(bits[gfn - slot.base_gfn])
        if b & _P and not b & _A:
            yield from self.handle_access_fault.steps(vcpu, gpa)
            return FaultRet.FIXED
        fault_is_perm = bool(b & _P) and write and not b & _W
        r = yield from self.user_mem_abort.steps(vcpu, gpa, slot, write, fault_is_perm)
        return r

    @kpath
    def user_mem_abort(self, vcpu, gpa: int, slot, write_fault: bool, fault_is_perm: bool) -> Steps:
        """Mirrors ``user_mem_abort()`` for a PAGE_SIZE mapping (v6.12 and v6.13): the generic template
        (:func:`kvmsim.kvm.fault.kvm_stage2_fault`) with arm64's hooks below.

        Returns FaultRet.FIXED for 0, RETRY for the ``mmu_invalidate_retry()`` -EAGAIN, SPURIOUS for the
        -EAGAIN of a map that finds the leaf already there; -EFAULT / -EHWPOISON for error pfns.
        """
        fault = KvmPageFault(vcpu, gpa >> PAGE_SHIFT, slot, write_fault, perm=fault_is_perm)
        r = yield from kvm_stage2_fault.steps(self, fault)
        return r

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "arm64"
    fault_labels = ("user_mem_abort: mmu_seq snapshot, mmap_read_unlock", "user_mem_abort: pfn resolved",
                    "user_mem_abort: read_unlock(mmu_lock)")
    fault_lock_read = True
    fault_faultin_nowait = False      # one __kvm_faultin_pfn(), no lockless pre-check
    fault_logging_write_only = True   # "Only actually map the page as writable if this was a write fault."
    fault_retry_ret = EAGAIN
    fault_retry_per_gfn = False       # mmu_invalidate_retry(kvm, mmu_seq): the whole VM, not the gfn
    fault_stale_invalid_slot = False
    handle_error_pfn = staticmethod(abort_error_pfn)   # kvm_send_hwpoison_signal(); return 0 / -EFAULT

    def fault_map(self, fault: KvmPageFault) -> int:
        """``kvm_pgtable_stage2_relax_perms()`` for a permission fault, else ``kvm_pgtable_stage2_map()``."""
        if fault.perm:
            ret = self.kvm_pgtable_stage2_relax_perms(fault.slot, fault.gfn, fault.map_writable)
        else:
            ret = self.kvm_pgtable_stage2_map(fault.slot, fault.gfn, fault.pfn, fault.map_writable,
                                              fault.kfp.hold != Hold.NONE)
        fault.ret = ret
        return FaultRet.FIXED if ret == 0 else FaultRet.SPURIOUS

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_faultin_page(kvm, page, !!ret, writable)``."""
        return fault.ret != 0

    def fault_after_unlock(self, fault: KvmPageFault) -> None:
        """``if (writable && !ret) mark_page_dirty_in_slot()`` after ``read_unlock()`` (both versions)."""
        if fault.map_writable and fault.ret == 0:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(self.kvm, fault.slot, fault.gfn, fault.vcpu)

    # ---- the page-table walkers (arch/arm64/kvm/hyp/pgtable.c) ----------------------------------------
    def kvm_pgtable_stage2_map(self, slot, gfn: int, pfn: int, writable: bool, held: bool) -> int:
        """``kvm_pgtable_stage2_map()`` of one page: a new leaf has the Access flag set; a valid leaf that
        differs only in permissions is left alone (``stage2_pte_needs_update()`` false → -EAGAIN); a
        different output address is replaced (break-before-make), with no page marking."""
        kvm = self.kvm
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        if bits[i] & _P and pfns[i] == pfn:
            return EAGAIN
        pfns[i] = pfn
        bits[i] = _P | _A | ((_W | _HW) if writable else 0) | (_H if held else 0)
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller="kvm_pgtable_stage2_map",
                         locked=kvm.mmu_lock.held(), extra={"writable": writable, "host_writable": writable})
        return 0

    def kvm_pgtable_stage2_relax_perms(self, slot, gfn: int, writable: bool) -> int:
        """``kvm_pgtable_stage2_relax_perms()``: add S2AP_W to a valid leaf (-EAGAIN if it is gone)."""
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        if not bits[i] & _P:
            return EAGAIN
        if writable:
            bits[i] |= np.uint8(_W | _HW)
        self.kvm.journal.count("spte_relax_perms")
        return 0

    def kvm_pgtable_stage2_mkyoung(self, slot, gfn: int) -> tuple[bool, int]:
        """``kvm_pgtable_stage2_mkyoung()``: set the Access flag of a valid leaf; returns the old PTE
        (valid, pfn) as v6.12 did."""
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        if not bits[i] & _P:
            return False, -1
        bits[i] |= np.uint8(_A)
        return True, int(pfns[i])

    # ---- handle_access_fault --------------------------------------------------------------------
    @kpath
    def handle_access_fault(self, vcpu, gpa: int) -> Steps:
        """Mirrors ``handle_access_fault()``: make the leaf young under the read lock; v6.12 then marks the
        PTE's pfn accessed after the unlock, holding no reference (the ``spte_ad_lost`` hook, patch 83)."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        kvm.journal.count("access_flag_fault")
        yield from kvm.mmu_lock.read_lock.steps()
        slot = kvm.gfn_to_memslot(gfn)
        valid, pfn = self.kvm_pgtable_stage2_mkyoung(slot, gfn) if slot is not None else (False, -1)
        kvm.mmu_lock.read_unlock()
        yield "handle_access_fault: read_unlock(mmu_lock)"
        if valid:
            kvm.ops.spte_ad_lost(kvm, pfn, dirty=False, accessed=True, caller="handle_access_fault", gfn=gfn)

    # ---- guest accesses -------------------------------------------------------------------------
    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """A leaf lets an access through only with the Access flag set and, for a store, S2AP_W: there is
        no lockless write-unprotect on arm64 (a store to a read-only leaf is a permission fault)."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        return bool(b & _P and b & _A and (not write or b & _W))

    # ---- zapping, aging, dirty logging ---------------------------------------------------------------
    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """``stage2_unmap_walker()`` marks no page in either version: arm64 dirtied and aged at map time."""
        return None

    def flush_on_age(self) -> bool:
        """``kvm_age_gfn()`` flushes when young in both versions: only x86 selects
        KVM_ELIDE_TLB_FLUSH_IF_YOUNG (v6.13)."""
        return True

    def slot_apply_flags(self, old, new, change) -> None:
        """``kvm_arch_commit_memory_region()``: with LOG_DIRTY_PAGES in the new slot (not a delete),
        ``kvm_mmu_wp_memory_region()`` write-protects the slot and flushes, unless manual protect with
        KVM_DIRTY_LOG_INITIALLY_SET defers it to KVM_CLEAR_DIRTY_LOG."""
        from kvmsim.kvm.dirty import KVM_DIRTY_LOG_INITIALLY_SET
        if self.kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            return
        self.wp_slot_on_log_dirty_commit(new, change, "kvm_mmu_wp_memory_region")

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked()`` → ``stage2_wp_range()`` on the masked pages."""
        if "s2" not in slot.arch:
            return
        _, bits = self._tables(slot)
        bits[gfn_offset + np.nonzero(mask)[0]] &= ~_WP

