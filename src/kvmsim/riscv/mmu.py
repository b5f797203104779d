"""The RISC-V G-stage fault path (arch/riscv/kvm/mmu.c, arch/riscv/kvm/vcpu_exit.c; Linux v6.12 and v6.13).

Mirrors ``gstage_page_fault()`` (vcpu_exit.c), ``kvm_riscv_gstage_map()``, ``gstage_map_page()`` /
``gstage_set_pte()``, ``kvm_unmap_gfn_range()``, ``kvm_age_gfn()`` / ``kvm_test_age_gfn()`` and the
dirty-logging hooks (``kvm_arch_commit_memory_region()`` → ``gstage_wp_memory_region()``,
``kvm_arch_mmu_enable_log_dirty_pt_masked()`` → ``gstage_wp_range()``) on PAGE_SIZE leaves and
hugetlb PMD / PUD blocks.  Storage
and the checker's view of the leaves come from :class:`kvmsim.kvm.stage2.GenericStage2`; the pfn
from the shared ``__kvm_faultin_pfn()`` model, which is what both ``gfn_to_pfn_prot(kvm, gfn,
is_write, &writable)`` (v6.12) and ``kvm_faultin_pfn(vcpu, gfn, is_write, &writable, &page)``
(v6.13) reduce to.  ``kvm->mmu_lock`` is a spinlock on RISC-V (no KVM_HAVE_MMU_RWLOCK): the model's
write side.  ``ret`` is 0 when the lock is taken (it last held ``kvm_mmu_topup_memory_cache()``'s
result), so an ``mmu_invalidate_retry()`` leaves it 0.

Where the two versions differ (the "-" / "+" sides of the v13 series patches 57 "KVM: RISC-V: Mark
"struct page" pfns dirty iff a stage-2 PTE is installed", 58 "KVM: RISC-V: Mark "struct page" pfns
accessed before dropping mmu_lock" and 59 "KVM: RISC-V: Use kvm_faultin_pfn() when mapping pfns
into the guest")::

    v6.12                                        | v6.13
    spin_lock(&kvm->mmu_lock);                   | spin_lock(&kvm->mmu_lock);
    if (mmu_invalidate_retry(kvm, mmu_seq))      | if (mmu_invalidate_retry(kvm, mmu_seq))
            goto out_unlock;                     |         goto out_unlock;
    if (writable) {                              | if (writable) {
            kvm_set_pfn_dirty(hfn);              |
            mark_page_dirty(kvm, gfn);           |         mark_page_dirty(kvm, gfn);
            ret = gstage_map_page(.., false, ..);|         ret = gstage_map_page(.., false, ..);
    } else ret = gstage_map_page(.., true, ..);  | } else ret = gstage_map_page(.., true, ..);
    out_unlock:                                  | out_unlock:
                                                 | kvm_release_faultin_page(kvm, page,
                                                 |         ret && ret != -EEXIST, writable);
    spin_unlock(&kvm->mmu_lock);                 | spin_unlock(&kvm->mmu_lock);
    kvm_set_pfn_accessed(hfn);                   |
    kvm_release_pfn_clean(hfn);                  |

So v6.12 dirties under the lock but *before* mapping (also when the map fails), and marks accessed
twice after the unlock (INV-3; INV-7 on a retry); v6.13 releases under the lock, and a retry
(ret = 0) counts as *used*: the page is marked accessed, and dirty if writable, though nothing maps
it (kvm-semantics.md §3, INV-7's RISC-V exception).  Neither version marks a page when zapping,
write-protecting or aging: ``gstage_op_pte()`` and ``ptep_test_and_clear_young()`` touch PTEs only.

Block mappings (both versions): ``kvm_riscv_gstage_map()`` takes the mapping size from the VMA, a
hugetlb VMA's huge page size (``huge_page_shift(hstate_vma(vma))``) and PAGE_SIZE for anything else:
v6.12 and v6.13 have no THP support on RISC-V (no ``transparent_hugepage_adjust()``), and
``logging || VM_PFNMAP`` forces PAGE_SIZE.  A block aligns ``gfn`` (the pfn looked up, and the gfn
``mark_page_dirty()`` marks) down to the huge page, while ``gstage_set_pte()`` walks with the faulting
``gpa``.  Unlike arm64 there is no memslot alignment check (``fault_supports_stage2_huge_mapping()``)
and no block split: ``gstage_wp_memory_region()`` write-protects a block whole when dirty logging is
enabled, and the next write fault (logging: PAGE_SIZE) meets that block leaf above level 0 in
``gstage_set_pte()``, which returns ``-EEXIST``; ``gstage_page_fault()`` returns it to KVM_RUN, and
the release treats it as used (v6.13 ``ret && ret != -EEXIST``).  ``gstage_wp_range()`` and
``gstage_unmap_range()`` act only on a leaf that is aligned at ``addr`` and fits before ``end``: a
range inside a block (a 64-page dirty-log mask, a 4 KiB invalidation) leaves the block as it is.
``-ENOMEM`` cannot occur after the top-up; it, and an ``-EEXIST`` without a block, are reachable
through :attr:`RiscvMmu.inject_set_pte_error`.  A block reaching past its memslot is kept to the
part inside the slot (the kernel maps the whole huge page).  Also not modelled: hardware A/D updating (Svadu): a guest access to a leaf whose A bit aging cleared
takes a guest page fault and goes through ``kvm_riscv_gstage_map()`` again (Svade behaviour);
``kvm_arch_prepare_memory_region()``'s eager VM_PFNMAP ioremap; exec permissions; MMIO emulation.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.dirty import mark_page_dirty_in_slot
from kvmsim.kvm.fault import FaultRet, KvmPageFault, abort_error_pfn, kvm_fault_memslot, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, gfn_to_hva_memslot_prot
from kvmsim.kvm.stage2 import LEAF_PAGES, S2, GenericStage2
from kvmsim.mm.vma import VM
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE

_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))
_WP = np.uint8(_W | _HW)
EEXIST = -errno.EEXIST
# gstage_page_size_to_level(): PAGE_SIZE, PMD_SIZE and PUD_SIZE (Sv39x4 and up), in pages
_GSTAGE_PAGE_SIZES = (1, 1 << 9, 1 << 18)
# the model's leaf level (1, 2, 3) of each G-stage page size; the kernel's level is one less
_SIZE_LEVEL = {PAGE_SIZE: 1, PMD_SIZE: 2, PUD_SIZE: 3}


@dataclass(slots=True)
class GstagePageFault(KvmPageFault):
    """What ``kvm_riscv_gstage_map()`` carries besides the common fault: ``vma_pagesize`` and the
    faulting gfn ``gstage_set_pte()`` walks with (``gfn`` is aligned down to a block)."""

    vma_pagesize: int = PAGE_SIZE
    gpa_gfn: int = 0
    gpa_slot: object = None


class RiscvMmu(GenericStage2):
    """The RISC-V G-stage MMU: ``_PAGE_WRITE`` (``W``, kept equal to the model's Host-writable bit: a leaf
    becomes writable only through ``kvm_riscv_gstage_map()`` under ``mmu_lock``), ``_PAGE_ACCESSED``
    (``A``) and ``_PAGE_DIRTY`` (``D``).  ``gstage_map_page()`` sets A and D on every new leaf; dirty
    logging write-protects instead of using D."""

    name = "riscv"

    def __init__(self, kvm, *, gstage_pgd_levels: int = 3, **opts):
        super().__init__(kvm, **opts)
        if gstage_pgd_levels not in (3, 4, 5):
            raise UsageError(f"gstage_pgd_levels must be 3 (Sv39x4), 4 (Sv48x4) or 5 (Sv57x4), "
                             f"not {gstage_pgd_levels}")
        #: ``gstage_pgd_levels``: 3 (Sv39x4) is the kernel's static default, which
        #: ``kvm_riscv_gstage_mode_detect()`` raises to 4 or 5 when HGATP accepts Sv48x4 / Sv57x4.
        self.gstage_pgd_levels = gstage_pgd_levels
        #: Model-only fault injection: the next ``gstage_set_pte()`` returns this -errno (``-EEXIST`` for a
        #: block leaf in the way, ``-ENOMEM`` for an empty page cache), then it resets to 0.
        self.inject_set_pte_error = 0

    @property
    def gstage_gpa_bits(self) -> int:
        """``gstage_gpa_bits``: HGATP_PAGE_SHIFT + levels * gstage_index_bits (9) + gstage_pgd_xbits (2)."""
        return PAGE_SHIFT + self.gstage_pgd_levels * 9 + 2

    def prepare_memory_region(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_prepare_memory_region()`` (arch/riscv/kvm/mmu.c, v6.12 and v6.13: the same code).

        CREATE, MOVE and FLAGS_ONLY only.  ``base_gfn + npages >= gstage_gpa_size >> PAGE_SHIFT`` is
        EFAULT (note ``>=``: the last page of the G-stage space cannot be in a slot).  Then the VMAs the
        region overlaps, in address order, holes skipped (``find_vma(mm, hva)`` until ``vm_start >=
        reg_end``): a writable slot (no KVM_MEM_READONLY) over a VMA without VM_WRITE is EPERM ("Mapping
        a read-only VMA is only allowed if the memory region is configured as read-only"), checked
        first; a VM_PFNMAP VMA with LOG_DIRTY_PAGES is EINVAL.  The first failing VMA decides.  The
        eager ``kvm_riscv_gstage_ioremap()`` of VM_PFNMAP ranges is not modelled.
        """
        from kvmsim.kvm.memslot import KvmMrChange, vmas_of_region
        if change not in (KvmMrChange.CREATE, KvmMrChange.MOVE, KvmMrChange.FLAGS_ONLY):
            return
        if new.base_gfn + new.npages >= (1 << self.gstage_gpa_bits) >> PAGE_SHIFT:
            raise ModelError(errno.EFAULT, f"slot {new.id}: gfn range reaches past the {self.gstage_gpa_bits}-bit "
                                           f"G-stage space")
        writable = not new.readonly
        for vma in vmas_of_region(self.kvm.mm, new):
            if writable and not vma.flags & VM.WRITE:
                raise ModelError(errno.EPERM, f"slot {new.id}: writable memslot over a VMA without VM_WRITE "
                                              f"at {vma.start:#x}")
            if vma.flags & VM.PFNMAP and new.logging:
                raise ModelError(errno.EINVAL, f"slot {new.id}: IO region dirty page logging not allowed "
                                               f"(VM_PFNMAP VMA at {vma.start:#x})")

    # ---- gstage_page_fault (vcpu_exit.c) ---------------------------------------------------------
    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """Mirrors ``gstage_page_fault()``: ``gfn_to_hva_memslot_prot()``; a bad hva, or a store fault on a
        non-writable one, is MMIO (``kvm_riscv_vcpu_mmio_load/store()``); otherwise
        ``kvm_riscv_gstage_map(vcpu, memslot, fault_addr, hva, scause == EXC_STORE_GUEST_PAGE_FAULT)``."""
        kvm = self.kvm
        gfn, slot = kvm_fault_memslot(kvm, gpa)
        if gfn_to_hva_memslot_prot(slot, gfn, write) < 0:     # kvm_is_error_hva() || (write && !writable)
            kvm.journal.count("kvm_riscv_vcpu_mmio_store" if write else "kvm_riscv_vcpu_mmio_load")
            return FaultRet.EMULATE
        r = yield from self.kvm_riscv_gstage_map.steps(vcpu, slot, gpa, write)
        return r

    # ---- kvm_riscv_gstage_map (mmu.c) ----------------------------------------------------------------
    @kpath
    def kvm_riscv_gstage_map(self, vcpu, slot, gpa: int, is_write: bool) -> Steps:
        """Mirrors ``kvm_riscv_gstage_map()`` (v6.12 and v6.13): ``vma_lookup()`` under ``mmap_read_lock()``
        (none: -EFAULT), the mapping size (module docstring: hugetlb, or PAGE_SIZE when logging or
        VM_PFNMAP) and a block's aligned ``gfn``, then the generic template
        (:func:`kvmsim.kvm.fault.kvm_stage2_fault`) with RISC-V's hooks below.

        Returns FaultRet.FIXED when a leaf was written, RETRY for the ``mmu_invalidate_retry()`` path (the
        kernel returns 0 and the guest faults again), -errno for ``gstage_set_pte()`` errors (forwarded
        by ``gstage_page_fault()`` to KVM_RUN) and error pfns.
        """
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        vma = kvm.mm.vma_lookup(slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT))
        if vma is None:
            kvm.journal.count("kvm_err:Failed to find VMA for hva")
            return -errno.EFAULT
        logging = slot.dirty_bitmap is not None and not slot.readonly
        size = vma.page_size if vma.flags & VM.HUGETLB else PAGE_SIZE
        if logging or vma.flags & VM.PFNMAP:
            size = PAGE_SIZE
        fault = GstagePageFault(vcpu, gfn, slot, is_write, vma_pagesize=size, gpa_gfn=gfn, gpa_slot=slot)
        if size in (PMD_SIZE, PUD_SIZE):
            fault.gfn = gfn // (size >> PAGE_SHIFT) * (size >> PAGE_SHIFT)
            fault.slot = kvm.gfn_to_memslot(fault.gfn)     # gfn_to_pfn_prot(kvm, gfn, ...) looks it up again
            kvm.journal.count("gstage_block_fault")
        r = yield from kvm_stage2_fault.steps(self, fault)
        return r

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "riscv"
    fault_labels = ("kvm_riscv_gstage_map: mmu_seq snapshot, mmap_read_unlock", "kvm_riscv_gstage_map: pfn resolved",
                    "kvm_riscv_gstage_map: spin_unlock(mmu_lock)")
    fault_lock_read = False           # spin_lock(&kvm->mmu_lock)
    fault_faultin_nowait = False      # one gfn_to_pfn_prot() / kvm_faultin_pfn(), no lockless pre-check
    fault_logging_write_only = True   # "we allow writable pages only for write faults"
    fault_retry_ret = 0               # goto out_unlock with ret == 0 (the top-up's result)
    fault_retry_per_gfn = False       # mmu_invalidate_retry(kvm, mmu_seq): the whole VM, not the gfn
    fault_stale_invalid_slot = False
    fault_after_unlock = None         # mark_page_dirty() came before the map
    handle_error_pfn = staticmethod(abort_error_pfn)   # send_sig_mceerr(); return 0 / -EFAULT

    def fault_map(self, fault: KvmPageFault) -> int:
        """``if (writable) { mark_page_dirty(); gstage_map_page(.., false, ..) } else gstage_map_page(.., true, ..)``;
        v6.12 also ``kvm_set_pfn_dirty()`` first (the resolved ``fault_dirty_before_map``)."""
        kvm = self.kvm
        writable = fault.map_writable
        dirty_before_map = kvm.ops.fault_dirty_before_map
        if writable and dirty_before_map is not None:
            with kvm.journal.fault_release():
                dirty_before_map(kvm, fault)
        if writable:
            mark_page_dirty_in_slot(kvm, fault.slot, fault.gfn, fault.vcpu)      # mark_page_dirty(kvm, gfn)
        ret = self.gstage_map_page(fault.gpa_slot, fault.gpa_gfn, fault.pfn, page_rdonly=not writable,
                                   held=fault.kfp.hold != Hold.NONE, page_size=fault.vma_pagesize)
        if ret:
            kvm.journal.count("kvm_err:Failed to map in G-stage")
        fault.ret = ret
        return ret if ret else FaultRet.FIXED

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_faultin_page(kvm, page, ret && ret != -EEXIST, writable)``: a retry (ret 0) is used."""
        return fault.ret != 0 and fault.ret != EEXIST

    def gstage_map_page(self, slot, gfn: int, pfn: int, *, page_rdonly: bool, held: bool,
                        page_size: int = PAGE_SIZE) -> int:
        """``gstage_map_page()`` + ``gstage_set_pte()`` at the level of ``page_size``: ``pfn_pte(hfn,
        PAGE_READ_EXEC / PAGE_WRITE_EXEC)`` made dirty (A and D always set).  The walk from the top
        returns -EEXIST at a leaf above that level (a block in the way); otherwise ``set_pte()`` replaces
        whatever is at the level (a table of smaller leaves included) and ``gstage_remote_tlb_flush()``.
        ``gfn`` is the faulting gfn, ``pfn`` that of the leaf's first page.  Returns 0 or -errno."""
        kvm = self.kvm
        if self.inject_set_pte_error:
            ret, self.inject_set_pte_error = self.inject_set_pte_error, 0
            return ret
        level = _SIZE_LEVEL[page_size]
        self._tables(slot)
        i = gfn - slot.base_gfn
        if self._levels(slot)[i] > level and self._tables(slot)[1][i] & _P:
            return EEXIST
        self.set_leaf(slot, i, pfn, level, _P | _A | _D | (0 if page_rdonly else _W | _HW) | (_H if held else 0))
        kvm.journal.count("spte_write")
        if level == 2:
            kvm.journal.count("gstage_block_pmd")
        elif level == 3:
            kvm.journal.count("gstage_block_pud")
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller="gstage_set_pte", locked=kvm.mmu_lock.held(),
                         extra={"writable": not page_rdonly, "host_writable": not page_rdonly, "level": level})
        kvm.flush_remote_tlbs("gstage_remote_tlb_flush")
        return 0

    # ---- guest accesses -------------------------------------------------------------------------
    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """A leaf without A (after aging), or a store to a leaf without W, is a guest page fault that
        ``gstage_page_fault()`` handles like any other."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        return bool(b & _P and b & _A and (not write or b & _W))

    # ---- zapping, aging, dirty logging ---------------------------------------------------------------
    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """``gstage_op_pte(GSTAGE_OP_CLEAR)`` clears the PTE and flushes; no page is marked in either version."""

    def _gstage_range_leaves(self, slot, lo: int, hi: int) -> np.ndarray:
        """Slot-relative ``[start, end)`` rows of the leaves ``gstage_unmap_range()`` / ``gstage_wp_range()``
        act on in ``[lo, hi)``: ``if (!(addr & (page_size - 1)) && ((end - addr) >= page_size))``, i.e. a
        4 KiB leaf in the range, or a block aligned at its start inside the slot that fits in the range
        (the walk's stride from an unaligned address through an empty table is not modelled)."""
        if "s2" not in slot.arch or hi <= lo:
            return np.zeros((0, 2), dtype=np.int64)
        reps = self.representatives(slot, lo, hi)
        n = LEAF_PAGES[self._levels(slot)[reps].astype(np.int64)]
        ok = ((slot.base_gfn + reps) % n == 0) & (reps + n <= hi)
        return np.stack([reps[ok], reps[ok] + n[ok]], axis=1)

    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        """``kvm_unmap_gfn_range()`` → ``gstage_unmap_range()`` (:meth:`_gstage_range_leaves`): each
        cleared leaf is flushed by ``gstage_remote_tlb_flush()`` right there, and the function returns
        false (no flush by the caller)."""
        lo = max(start, slot.base_gfn) - slot.base_gfn
        hi = min(end, slot.base_gfn + slot.npages) - slot.base_gfn
        rows = self._gstage_range_leaves(slot, lo, hi)
        for a, b in rows.tolist():
            self._zap(slot, a, b, reason)
        if len(rows):
            self.kvm.flush_remote_tlbs("gstage_remote_tlb_flush", len(rows))
        return False

    def flush_shadow_memslot(self, slot) -> None:
        """``kvm_arch_flush_shadow_memslot()``: ``gstage_unmap_range()`` of the slot under ``mmu_lock``."""
        self.unmap_gfn_range(slot, slot.base_gfn, slot.base_gfn + slot.npages, "kvm_arch_flush_shadow_memslot")

    def _gstage_leaf(self, slot, start: int, end: int, fn: str) -> int | None:
        """The leaf ``gstage_get_leaf_entry()`` finds for ``range->start``, after the WARN_ON on a range
        that is not one G-stage page size (the kernel ages one leaf per call)."""
        if end - start not in _GSTAGE_PAGE_SIZES:
            self.kvm.journal.count(f"WARN_ON:{fn}")
        if "s2" not in slot.arch:
            return None
        i = start - slot.base_gfn
        return i if self._tables(slot)[1][i] & _P else None

    def age_gfn(self, slot, start: int, end: int) -> bool:
        """``kvm_age_gfn()``: ``ptep_test_and_clear_young()`` on the leaf at ``range->start`` only (a block
        whole); no page marking in either version."""
        i = self._gstage_leaf(slot, start, end, "kvm_age_gfn")
        if i is None:
            return False
        bits = self._tables(slot)[1]
        young = bool(bits[i] & _A)
        bits[slice(*self.leaf_bounds(slot, i, i + 1))] &= ~np.uint8(_A)
        return young

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        """``kvm_test_age_gfn()``: ``pte_young()`` of the leaf at ``range->start``."""
        i = self._gstage_leaf(slot, start, end, "kvm_test_age_gfn")
        return i is not None and bool(self._tables(slot)[1][i] & _A)

    def flush_on_age(self) -> bool:
        """The young flush stays in v6.13: only x86 selects KVM_ELIDE_TLB_FLUSH_IF_YOUNG."""
        return True

    def slot_apply_flags(self, old, new, change) -> None:
        """``kvm_arch_commit_memory_region()``: ``if (change != KVM_MR_DELETE && new->flags &
        KVM_MEM_LOG_DIRTY_PAGES) gstage_wp_memory_region(kvm, new->id)`` -- on every such commit, and
        with no KVM_DIRTY_LOG_INITIALLY_SET exception (unlike arm64)."""
        self.wp_slot_on_log_dirty_commit(new, change, "gstage_wp_memory_region")

    def wp_slot_on_log_dirty_commit(self, new, change, why: str) -> None:
        """``gstage_wp_memory_region()``: ``gstage_wp_range()`` over the whole slot (a block inside it
        whole), then ``kvm_flush_remote_tlbs()``."""
        from kvmsim.kvm.memslot import KvmMrChange
        if new is None or not new.logging or change == KvmMrChange.DELETE:
            return
        self._gstage_wp_range(new, 0, new.npages)
        self.kvm.flush_remote_tlbs(why)

    def _gstage_wp_range(self, slot, lo: int, hi: int) -> None:
        """``gstage_wp_range()``: ``gstage_op_pte(GSTAGE_OP_WP)`` clears ``_PAGE_WRITE`` of each leaf
        :meth:`_gstage_range_leaves` finds."""
        if "s2" not in slot.arch:
            return
        _, bits = self._tables(slot)
        for a, b in self._gstage_range_leaves(slot, lo, hi).tolist():
            bits[a:b] &= ~_WP

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked()``: ``gstage_wp_range()`` from ``__ffs(mask)`` to
        ``__fls(mask)``, so clear pages between two set bits are write-protected too (a block only if the
        range covers it)."""
        idx = np.nonzero(mask)[0]
        if not len(idx):
            return
        self._gstage_wp_range(slot, gfn_offset + int(idx[0]), gfn_offset + int(idx[-1]) + 1)

