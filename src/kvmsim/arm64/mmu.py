"""The arm64 stage-2 fault paths (arch/arm64/kvm/mmu.c, Linux v6.12 and v6.13).

Mirrors ``kvm_handle_guest_abort()``, ``user_mem_abort()`` with its mapping size
(``get_vma_page_shift()``, ``fault_supports_stage2_huge_mapping()``, ``transparent_hugepage_adjust()``,
``get_user_mapping_size()``), ``handle_access_fault()``, ``kvm_age_gfn()`` and the dirty-logging hooks
(``kvm_arch_commit_memory_region()``, ``kvm_arch_mmu_enable_log_dirty_pt_masked()``), with PAGE_SIZE
leaves and PMD_SIZE / PUD_SIZE blocks.  Storage, zapping, aging and the checker's view of the leaves
come from :class:`kvmsim.kvm.stage2.GenericStage2`; the pfn comes from the shared
``__kvm_faultin_pfn()`` model (:func:`kvmsim.kvm.pfn._kvm_faultin_pfn`), which is also what legacy
``__gfn_to_pfn_memslot(slot, gfn, false, false, NULL, write_fault, &writable, NULL)`` does in the
model (one hva_to_pfn, policy hooks where v6.12 differs).  MTE (``KVM_CAP_ARM_MTE``,
``sanitise_mte_tags()``, ``kvm_vm_ioctl_mte_copy_tags()``) is :mod:`kvmsim.arm64.mte`.

Block mappings (both versions): with dirty logging (``memslot_is_logging()``) every fault maps
PAGE_SIZE (``force_pte``); otherwise a hugetlb VMA gives its huge page size and a VM_PFNMAP VMA the
largest block its ``vm_pgoff`` geometry allows (``get_vma_page_shift()``), each cut down until
``fault_supports_stage2_huge_mapping()`` accepts it (IPA and hva equally aligned, the block inside
the memslot); a PAGE_SIZE fault on memory that is not a device pfn becomes a PMD block when the host
maps the hva with a PMD (THP, ``transparent_hugepage_adjust()``).  ``kvm_mmu_wp_memory_region()``
write-protects blocks whole; eager splitting (``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE``) is off by
default, so a write fault on a write-protected block under logging maps one PAGE_SIZE leaf and
``kvm_pgtable_stage2_map()`` replaces the block with a table ("Accesses beyond 'end' that fall
within the new table will be mapped lazily").

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
  ``spte_ad_lost`` policy hook);
* a THP block: v6.12 ``transparent_hugepage_adjust()`` "transfers the refcount to the head page"
  under the read lock, ``kvm_release_pfn_clean(pfn)`` of the faulted (tail) pfn (accessed + put)
  then ``get_page(pfn_to_page(head))``, and the release after the unlock acts on the head pfn; patch
  56 "KVM: arm64: Use __kvm_faultin_pfn() to handle memory aborts" dropped the transfer: only
  ``fault->pfn`` moves to the head, and ``kvm_release_faultin_page()`` releases the page
  ``__kvm_faultin_pfn()`` returned (the tail, whose folio is the same).  The resolved hook is
  ``kvm.ops.arch_ops.thp_adjust_refcount`` (:func:`transparent_hugepage_adjust_v612_transfer`).

The v6.12 order is an INV-3 violation (kvm-semantics.md §3, locking.rst form)::

    CPU0 (user_mem_abort, holds a ref on F)   | CPU1 (truncate / hole punch)
    read_lock(mmu_lock); map IPA → F (W)      |
    read_unlock(mmu_lock)                     |
                                              | invalidate_range_start: unmap IPA
                                              | remove F from the page cache
    kvm_set_pfn_dirty(F)                      |
    → WARN in filemap_unaccount_folio (folio dirtied after truncate)

Not modelled: exec faults and the cache maintenance of a mapping (``clean_dcache_guest_page()``),
device (non-cacheable) attributes beyond "no THP adjustment for a device pfn", eager page splitting
(``kvm_mmu_split_memory_region()``, chunk size 0 by default), CONT_PTE / CONT_PMD hugetlb sizes (the
model's hugetlb pages are 2M or 1G), 16K/64K granules, nested stage-2, pKVM, hardware Access-flag
updates (FEAT_HAFDBS: every access to an old leaf takes an Access-flag fault).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.fault import FaultRet, KvmPageFault, abort_error_pfn, kvm_fault_memslot, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, gfn_to_hva_memslot_prot, kvm_acquired, kvm_release_pfn
from kvmsim.kvm.stage2 import LEAF_PAGES, S2, GenericStage2
from kvmsim.mm.vma import VM, Pte
from kvmsim.sched import Steps, kpath
from kvmsim.trace import Src
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PMD_SIZE, PUD_SHIFT, PUD_SIZE, PG_LEVEL_1G, PG_LEVEL_2M

_P, _W, _HW, _A, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.HELD))
_WP = np.uint8(_W | _HW)
EAGAIN = -errno.EAGAIN
_SIZE_LEVEL = {PAGE_SIZE: 1, PMD_SIZE: PG_LEVEL_2M, PUD_SIZE: PG_LEVEL_1G}
_PTRS_PER_PMD = PMD_SIZE // PAGE_SIZE


def memslot_is_logging(slot) -> bool:
    """Mirrors ``memslot_is_logging()``: a dirty bitmap and not read-only (a ring-only slot is not)."""
    return slot.dirty_bitmap is not None and not slot.readonly


@dataclass(slots=True)
class Arm64PageFault(KvmPageFault):
    """What ``user_mem_abort()`` carries besides the common fault: the hva, ``vma_pagesize`` and
    ``force_pte``, the IPA (gfn) the leaf is mapped at (``fault_ipa``, aligned down to the block; the
    ``gfn`` field stays what the kernel's ``gfn`` is), ``mte_allowed`` and the permission fault's
    ``fault_granule``."""

    hva: int = 0
    vma_pagesize: int = PAGE_SIZE
    force_pte: bool = False
    map_gfn: int = 0
    mte_allowed: bool = False
    fault_granule: int = PAGE_SIZE
    vm_pfnmap: bool = False             # vma->vm_flags & (VM_PFNMAP | VM_MIXEDMAP)
    vma_cacheable: bool = True          # kvm_vma_is_cacheable(vma) (kvmsim.arm64.pfnmap)


def fault_supports_stage2_huge_mapping(slot, hva: int, map_size: int) -> bool:
    """Mirrors ``fault_supports_stage2_huge_mapping()`` (arch/arm64/kvm/mmu.c, v6.12 and v6.13): the
    memslot's IPA and hva must be equally aligned within ``map_size``, and the block around ``hva``
    must lie inside the memslot."""
    if map_size == PAGE_SIZE:
        return True
    gpa_start = slot.base_gfn << PAGE_SHIFT
    uaddr_start = slot.userspace_addr
    uaddr_end = uaddr_start + (slot.npages << PAGE_SHIFT)
    if (gpa_start & (map_size - 1)) != (uaddr_start & (map_size - 1)):
        return False
    block = hva & ~(map_size - 1)
    return block >= uaddr_start and block + map_size <= uaddr_end


def get_vma_page_shift(vma, hva: int) -> int:
    """Mirrors ``get_vma_page_shift()`` (v6.12 and v6.13): a hugetlb VMA's huge page shift; PAGE_SHIFT
    for anything else but VM_PFNMAP, where the physical address ``(vm_pgoff << PAGE_SHIFT) + (hva -
    vm_start)`` must share the hva's alignment within a PUD (then PMD) and the aligned block must lie
    inside the VMA."""
    if vma.flags & VM.HUGETLB and not vma.flags & VM.PFNMAP:
        return vma.page_size.bit_length() - 1
    if not vma.flags & VM.PFNMAP:
        return PAGE_SHIFT
    pa = (vma.pgoff << PAGE_SHIFT) + (hva - vma.start)
    for shift in (PUD_SHIFT, PMD_SHIFT):
        size = 1 << shift
        if (hva & (size - 1)) == (pa & (size - 1)) and hva & ~(size - 1) >= vma.start and \
                (hva + size - 1) & ~(size - 1) <= vma.end:
            return shift
    return PAGE_SHIFT


def get_user_mapping_size(kvm, hva: int) -> int:
    """Mirrors ``get_user_mapping_size()`` (v6.12 and v6.13): the size the host page tables of
    ``kvm->mm`` map ``hva`` with (``kvm_pgtable_get_leaf()`` on the user pgd, i.e. the mm's PTE walk,
    :meth:`kvmsim.mm.mm.Mm.pte_of`); -EAGAIN when the leaf is not valid ("the userspace PTs are gone...
    Replay the fault")."""
    vma, pfn, bits, level = kvm.mm.pte_of(hva)
    if vma is None or pfn < 0 or not bits & Pte.PRESENT:
        return EAGAIN
    return int(LEAF_PAGES[level]) * PAGE_SIZE


def transparent_hugepage_adjust_v612_transfer(kvm, fault, head: int) -> None:
    """v6.12 ``transparent_hugepage_adjust()`` under the read lock: "we need to transfer the refcount
    to the head page", ``kvm_release_pfn_clean(pfn)`` of the faulted pfn (a guess: accessed + put)
    then ``get_page(pfn_to_page(pfn & ~(PTRS_PER_PMD - 1)))``.  Removed by patch 56 "KVM: arm64: Use
    __kvm_faultin_pfn() to handle memory aborts"."""
    kvm_release_pfn(kvm, fault.pfn, False, "transparent_hugepage_adjust", gfn=fault.gfn)
    kvm.phys.get_page(head, "transparent_hugepage_adjust", kvm=True, source=Src.HELD)
    kvm_acquired(kvm, head, Hold.GET, "transparent_hugepage_adjust")


class Arm64Mmu(GenericStage2):
    """The arm64 stage-2 MMU: S2AP_W (``W``, kept equal to the model's Host-writable bit: a leaf becomes
    writable only through a fault under ``mmu_lock``, never locklessly) and the Access flag (``A``).
    There is no dirty bit: KVM does not use DBM at stage 2."""

    name = "arm64"

    def __init__(self, kvm, *, ipa_bits: int = 40, cacheable_pfnmap_supported: bool = True, **opts):
        super().__init__(kvm, **opts)
        #: ``kvm_supports_cacheable_pfnmap()``: the CPUs have stage-2 FWB and DIC (v6.17's
        #: KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED; :mod:`kvmsim.arm64.pfnmap`).
        self.cacheable_pfnmap_supported = cacheable_pfnmap_supported
        if not 32 <= ipa_bits <= 52:
            raise UsageError(f"ipa_bits must be in [32, 52] (KVM_VM_TYPE_ARM_IPA_SIZE), not {ipa_bits}")
        #: The VM's IPA size: ``kvm_phys_size(&kvm->arch.mmu)`` is ``1 << ipa_bits``; a VM type of 0
        #: gets the default 40 bits (KVM_PHYS_SHIFT), KVM_VM_TYPE_ARM_IPA_SIZE(n) asks for n.
        self.ipa_bits = ipa_bits
        #: ``kvm_has_mte()``: KVM_ARCH_FLAG_MTE_ENABLED, set by KVM_ENABLE_CAP(KVM_CAP_ARM_MTE)
        #: (:func:`kvmsim.arm64.mte.kvm_vm_ioctl_enable_cap_mte`).
        self.mte_enabled = False
        #: The allocation tags of the pages MTE touched: pfn -> tag (the model keeps one tag per page);
        #: a pfn present here is PG_mte_tagged.
        self.mte_tags: dict[int, int] = {}

    def prepare_memory_region(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_prepare_memory_region()`` (arch/arm64/kvm/mmu.c, v6.12 and v6.13).

        CREATE, MOVE and FLAGS_ONLY only: a slot ending past the IPA space is EFAULT
        (``base_gfn + npages > kvm_phys_size() >> PAGE_SHIFT``); then each VMA the region overlaps
        (``find_vma_intersection()``, holes skipped): a VM_PFNMAP one with LOG_DIRTY_PAGES is EINVAL,
        "IO region dirty page logging not allowed" (VM_PFNMAP only: a VM_IO-only VMA passes).  Checked
        first: with MTE enabled, a VMA without VM_MTE_ALLOWED is EINVAL (``kvm_vma_mte_allowed()``).
        """
        from kvmsim.arm64.mte import kvm_vma_mte_allowed
        from kvmsim.kvm.memslot import KvmMrChange, vmas_of_region
        if change not in (KvmMrChange.CREATE, KvmMrChange.MOVE, KvmMrChange.FLAGS_ONLY):
            return
        if new.base_gfn + new.npages > (1 << self.ipa_bits) >> PAGE_SHIFT:
            raise ModelError(errno.EFAULT, f"slot {new.id}: gfn range ends past the {self.ipa_bits}-bit IPA space")
        for vma in vmas_of_region(self.kvm.mm, new):
            if self.mte_enabled and not kvm_vma_mte_allowed(vma):
                raise ModelError(errno.EINVAL, f"slot {new.id}: MTE is enabled and the VMA at {vma.start:#x} "
                                               f"({vma.kind.value}) is not VM_MTE_ALLOWED")
            if vma.flags & VM.PFNMAP and new.logging:
                raise ModelError(errno.EINVAL, f"slot {new.id}: IO region dirty page logging not allowed "
                                               f"(VM_PFNMAP VMA at {vma.start:#x})")
            slot_check = self.kvm.ops.arch_ops.pfnmap_slot_check
            if slot_check is not None:
                slot_check(self.kvm, new, vma)

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
        """Mirrors ``user_mem_abort()`` (v6.12 and v6.13): the mapping size from the VMA under
        ``mmap_read_lock()`` (:meth:`vma_pagesize_of`), then the generic template
        (:func:`kvmsim.kvm.fault.kvm_stage2_fault`) with arm64's hooks below.

        Returns FaultRet.FIXED for 0, RETRY for the ``mmu_invalidate_retry()`` -EAGAIN, SPURIOUS for the
        -EAGAIN of a map that finds the leaf already there (and of ``get_user_mapping_size()``);
        -EFAULT / -EHWPOISON for error pfns, a VMA gone, or a VMA MTE does not allow.
        """
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
        vma = kvm.mm.vma_lookup(hva)
        if vma is None:
            kvm.journal.count("kvm_err:Failed to find VMA for hva")
            return -errno.EFAULT
        fault = Arm64PageFault(vcpu, gfn, slot, write_fault, perm=fault_is_perm, hva=hva)
        self.vma_pagesize_of(fault, vma)
        if fault_is_perm:
            fault.fault_granule = int(LEAF_PAGES[self._levels(slot)[gfn - slot.base_gfn]]) * PAGE_SIZE
        r = yield from kvm_stage2_fault.steps(self, fault)
        return r

    def vma_pagesize_of(self, fault: Arm64PageFault, vma) -> None:
        """The part of ``user_mem_abort()`` under ``mmap_read_lock()``: ``force_pte`` when logging, else
        ``get_vma_page_shift()``; the ``switch (vma_shift)`` cuts PUD to PMD to PAGE until
        ``fault_supports_stage2_huge_mapping()`` accepts (a PAGE_SIZE cut sets ``force_pte``); a block
        aligns ``fault_ipa`` and ``ipa`` (so ``gfn``) down to its start; ``kvm_vma_mte_allowed()``."""
        from kvmsim.arm64.mte import kvm_vma_mte_allowed
        from kvmsim.arm64.pfnmap import kvm_vma_is_cacheable
        slot, hva = fault.slot, fault.hva
        if memslot_is_logging(slot):
            fault.force_pte, shift = True, PAGE_SHIFT
        else:
            shift = get_vma_page_shift(vma, hva)
        if shift == PUD_SHIFT and not fault_supports_stage2_huge_mapping(slot, hva, PUD_SIZE):
            shift = PMD_SHIFT
        if shift == PMD_SHIFT and not fault_supports_stage2_huge_mapping(slot, hva, PMD_SIZE):
            shift, fault.force_pte = PAGE_SHIFT, True
        fault.vma_pagesize = 1 << shift
        if fault.vma_pagesize in (PMD_SIZE, PUD_SIZE):
            n = fault.vma_pagesize >> PAGE_SHIFT
            fault.gfn = fault.gfn // n * n
        fault.map_gfn = fault.gfn
        fault.mte_allowed = kvm_vma_mte_allowed(vma)
        fault.vm_pfnmap = bool(vma.flags & (VM.PFNMAP | VM.MIXEDMAP))
        fault.vma_cacheable = kvm_vma_is_cacheable(vma)

    def transparent_hugepage_adjust(self, fault: Arm64PageFault) -> int:
        """Mirrors ``transparent_hugepage_adjust()`` (v6.12 and v6.13): if a PMD block fits the memslot
        here and the host maps the hva with at least a PMD (``get_user_mapping_size()``; a negative
        size is returned as the error), align the IPA and the pfn down to the PMD and return PMD_SIZE.
        v6.12's refcount transfer to the head page is the resolved ``kvm.ops.arch_ops.thp_adjust_refcount``."""
        if not fault_supports_stage2_huge_mapping(fault.slot, fault.hva, PMD_SIZE):
            return PAGE_SIZE
        sz = get_user_mapping_size(self.kvm, fault.hva)
        if sz < 0:
            return sz
        if sz < PMD_SIZE:
            return PAGE_SIZE
        fault.map_gfn = fault.gfn & ~(_PTRS_PER_PMD - 1)
        head = fault.pfn & ~(_PTRS_PER_PMD - 1)
        transfer = self.kvm.ops.arch_ops.thp_adjust_refcount
        if transfer is not None:
            transfer(self.kvm, fault, head)
        fault.pfn = head
        self.kvm.journal.count("thp_adjust")
        return PMD_SIZE

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "arm64"
    #: arch/arm64/kvm/Kconfig "select NEED_KVM_DIRTY_RING_WITH_BITMAP" (vgic/ITS saves dirty no vCPU's ring)
    need_dirty_ring_with_bitmap = True
    fault_labels = ("user_mem_abort: mmu_seq snapshot, mmap_read_unlock", "user_mem_abort: pfn resolved",
                    "user_mem_abort: read_unlock(mmu_lock)")
    fault_lock_read = True
    fault_faultin_nowait = False      # one __kvm_faultin_pfn(), no lockless pre-check
    fault_logging_write_only = True   # "Only actually map the page as writable if this was a write fault."
    fault_retry_ret = EAGAIN
    fault_retry_per_gfn = False       # mmu_invalidate_retry(kvm, mmu_seq): the whole VM, not the gfn
    fault_stale_invalid_slot = False
    handle_error_pfn = staticmethod(abort_error_pfn)   # kvm_send_hwpoison_signal(); return 0 / -EFAULT

    def fault_map(self, fault: Arm64PageFault) -> int:
        """Under the read lock, after the retry check: no block change for a device pfn
        (``kvm_is_device_pfn()``, no struct page); a PAGE_SIZE fault without ``force_pte`` takes the
        permission fault's granule or :meth:`transparent_hugepage_adjust`; with MTE,
        ``sanitise_mte_tags()`` or -EFAULT for a VMA without VM_MTE_ALLOWED; then
        ``kvm_pgtable_stage2_relax_perms()`` for a permission fault of the leaf's own size, else
        ``kvm_pgtable_stage2_map()``."""
        from kvmsim.arm64.mte import sanitise_mte_tags
        kvm = self.kvm
        device = kvm.ops.arch_ops.s2_noncacheable(kvm, fault)
        if device:
            kvm.journal.count("s2_noncacheable")
        elif not kvm.phys.pfn_valid(fault.pfn):
            kvm.journal.count("s2_cacheable_pfnmap")        # v6.17: cacheable stage 2 for a non-memmap pfn
        size = fault.vma_pagesize
        ret = 0
        if size == PAGE_SIZE and not (fault.force_pte or device):
            if fault.perm and fault.fault_granule > PAGE_SIZE:
                size = fault.fault_granule
            else:
                size = self.transparent_hugepage_adjust(fault)
            if size < 0:
                ret = size
        if not ret and not fault.perm and not device and self.mte_enabled:
            if fault.mte_allowed:
                sanitise_mte_tags(kvm, fault.pfn, size)
            else:
                ret = -errno.EFAULT
        if not ret and fault.perm and size == fault.fault_granule:
            ret = self.kvm_pgtable_stage2_relax_perms(fault.slot, fault.map_gfn, fault.map_writable)
        elif not ret:
            ret = self.kvm_pgtable_stage2_map(fault.slot, fault.map_gfn, fault.pfn, size, fault.map_writable,
                                              fault.kfp.hold != Hold.NONE)
        fault.ret = ret
        if ret == 0:
            return FaultRet.FIXED
        return FaultRet.SPURIOUS if ret == EAGAIN else ret

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_faultin_page(kvm, page, !!ret, writable)``."""
        return fault.ret != 0

    def fault_before_lock(self, fault: Arm64PageFault) -> int | None:
        """``user_mem_abort()`` between ``__kvm_faultin_pfn()`` and ``kvm_fault_lock()``: the resolved
        ``kvm.ops.arch_ops.pfnmap_fault_check`` (v6.17: -EFAULT for a cacheable PFNMAP the host cannot map
        cacheable; :mod:`kvmsim.arm64.pfnmap`), or None."""
        check = self.kvm.ops.arch_ops.pfnmap_fault_check
        return None if check is None else check(self.kvm, fault)

    def fault_after_unlock(self, fault: KvmPageFault) -> None:
        """``if (writable && !ret) mark_page_dirty_in_slot()`` after ``read_unlock()`` (both versions)."""
        if fault.map_writable and fault.ret == 0:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(self.kvm, fault.slot, fault.gfn, fault.vcpu)

    # ---- the page-table walkers (arch/arm64/kvm/hyp/pgtable.c) ----------------------------------------
    def kvm_pgtable_stage2_map(self, slot, gfn: int, pfn: int, size: int, writable: bool, held: bool) -> int:
        """``kvm_pgtable_stage2_map()`` of one ``size`` leaf at ``gfn`` (aligned to it): a new leaf has the
        Access flag set; a valid leaf of that size and output address that differs only in permissions
        is left alone (``stage2_pte_needs_update()`` false → -EAGAIN); anything else there is replaced
        without marking a page (break-before-make): a larger block becomes a table holding only the new
        leaf (``stage2_map_walk_leaf()``), smaller leaves go with their table
        (``stage2_map_walk_table_pre()``), another output address is replaced."""
        kvm = self.kvm
        pfns, bits = self._tables(slot)
        level = _SIZE_LEVEL[size]
        i = gfn - slot.base_gfn
        old_level = int(self._levels(slot)[i])
        if bits[i] & _P and pfns[i] == pfn and old_level == level:
            return EAGAIN
        lo, hi = self.leaf_span(slot, i, level)
        if (bits[lo:hi] & _P).any() or old_level > level:
            self._zap(slot, lo, hi, "kvm_pgtable_stage2_map: break-before-make")
        self.set_leaf(slot, i, pfn, level, _P | _A | ((_W | _HW) if writable else 0) | (_H if held else 0))
        kvm.journal.count("spte_write")
        if level == PG_LEVEL_2M:
            kvm.journal.count("stage2_block_pmd")
        elif level == PG_LEVEL_1G:
            kvm.journal.count("stage2_block_pud")
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller="kvm_pgtable_stage2_map",
                         locked=kvm.mmu_lock.held(), extra={"writable": writable, "host_writable": writable,
                                                             "level": level})
        return 0

    def kvm_pgtable_stage2_relax_perms(self, slot, gfn: int, writable: bool) -> int:
        """``kvm_pgtable_stage2_relax_perms()``: add S2AP_W to the valid leaf (a block whole) covering
        ``gfn`` (-EAGAIN if it is gone)."""
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        if not bits[i] & _P:
            return EAGAIN
        if writable:
            bits[slice(*self.leaf_bounds(slot, i, i + 1))] |= np.uint8(_W | _HW)
        self.kvm.journal.count("spte_relax_perms")
        return 0

    def kvm_pgtable_stage2_mkyoung(self, slot, gfn: int) -> tuple[bool, int]:
        """``kvm_pgtable_stage2_mkyoung()``: set the Access flag of the valid leaf covering ``gfn``;
        returns the old PTE (valid, pfn) as v6.12 did (a block's output address: its first pfn)."""
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        if not bits[i] & _P:
            return False, -1
        lo, hi = self.leaf_bounds(slot, i, i + 1)
        bits[lo:hi] |= np.uint8(_A)
        return True, int(pfns[lo])

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
        """``kvm_arch_mmu_enable_log_dirty_pt_masked()`` → ``kvm_mmu_write_protect_pt_masked()``:
        ``stage2_wp_range()`` from ``__ffs(mask)`` to ``__fls(mask)`` (clear bits in between included),
        every leaf it touches whole (a block too).  ``kvm_mmu_split_huge_pages()`` after it is a no-op
        with the default eager-split chunk size of 0."""
        if "s2" not in slot.arch:
            return
        idx = np.nonzero(mask)[0]
        if not len(idx):
            return
        _, bits = self._tables(slot)
        bits[slice(*self.leaf_bounds(slot, gfn_offset + int(idx[0]), gfn_offset + int(idx[-1]) + 1))] &= ~_WP

