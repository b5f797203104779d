"""The x86 MMU's page fault and guest accesses (arch/x86/kvm/mmu/mmu.c ``kvm_mmu_page_fault()``,
``fast_page_fault()``, ``kvm_mmu_faultin_pfn()``, ``is_page_fault_stale()``; tdp_mmu.c
``kvm_tdp_mmu_map()``; v6.13), and :class:`X86Mmu`, the ``ArchMmu`` for arch="x86".

Locking (Documentation/virt/kvm/locking.rst): the TDP MMU maps under ``mmu_lock`` for read (SPTE
updates are atomic), the shadow MMU under ``mmu_lock`` for write; ``fast_page_fault()`` fixes a
write-protected or access-tracked SPTE without ``mmu_lock``.  The race the stale check closes::

    CPU0 (vCPU fault)                          | CPU1 (mmu_notifier)
    mmu_seq = kvm->mmu_invalidate_seq          |
    pfn = __kvm_faultin_pfn()                  |
                                               | invalidate_range_start: zap, seq++ at end
    read_lock(mmu_lock)                        |
    is_page_fault_stale() → RET_PF_RETRY       |
"""

from __future__ import annotations

import errno
from typing import Iterator

import numpy as np

from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.arch import Leaf
from kvmsim.kvm.dirty import mark_page_dirty_in_slot
from kvmsim.kvm.fault import KvmPageFault, kvm_faultin_pfn, kvm_handle_error_pfn, kvm_stage2_fault
from kvmsim.kvm.pfn import KVM_PFN_NOSLOT
from kvmsim.kvm.vcpu import Access
from kvmsim.sched import Steps, kpath
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT
from kvmsim.x86 import tdp_mmu
from kvmsim.x86.mmu_internal import RET_PF, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS, X86PageFault
from kvmsim.x86.page_track import kvm_gfn_is_write_tracked
from kvmsim.x86.private_mem import (kvm_arch_post_set_memory_attributes, kvm_arch_pre_set_memory_attributes,
                                    kvm_mmu_fault_is_private, kvm_mmu_faultin_pfn_private, page_fault_can_be_fast,
                                    kvm_mmu_max_mapping_level_attrs, kvm_mmu_private_mismatch)
from kvmsim.x86.x86 import x86_emulate_instruction, x86_guest_access
from kvmsim.x86.spte import (AT, A, ADX, D, HELD, HW, MMIO, MW, P, SW, W, is_accessed_spte, is_dirty_spte,
                             make_spte, spte_write, spte_write_one, tables)


#: ``ACC_EXEC_MASK``, ``ACC_WRITE_MASK``, ``ACC_USER_MASK``, ``ACC_ALL`` (arch/x86/kvm/mmu/spte.h).
ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK = 1, 2, 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK


@kpath
def kvm_mmu_page_fault(mmu, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
    """Mirrors ``kvm_mmu_page_fault()`` → ``kvm_mmu_do_page_fault()``: a cached MMIO SPTE or no memslot
    is RET_PF_EMULATE (``handle_mmio_page_fault()``, ``kvm_handle_noslot_fault()``), then
    ``fast_page_fault()``, then :func:`kvm_tdp_page_fault`.  RET_PF or -errno."""
    kvm = mmu.kvm
    gfn = gpa >> PAGE_SHIFT
    kvm.journal.count("page_fault")
    mmio_sptes = mmu.mmio_sptes
    # handle_mmio_page_fault(): an MMIO SPTE cached for the gfn in the memslots' current generation
    if mmio_sptes and mmio_sptes.get(gfn) == kvm.memslots[0].generation:
        kvm.journal.count("mmio")
        return RET_PF.EMULATE
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None:                                    # kvm_handle_noslot_fault(): cache an MMIO SPTE
        mmio_sptes[gfn] = kvm.memslots[0].generation
        kvm.journal.count("mmio")
        # The fault then ends like any other: v6.12 kvm_release_pfn_clean(fault->pfn) on KVM_PFN_NOSLOT (a
        # call that returns at is_error_noslot_pfn(), yet a kprobe counts it), v6.13
        # kvm_mmu_finish_page_fault() -> kvm_release_faultin_page() with a NULL refcounted_page.  No page
        # is involved, so it is passed as unused: nothing to assert about mmu_lock, nothing to mark.
        kvm.ops.release_faultin(kvm, KVM_PFN_NOSLOT, None, unused=True, dirty=False,
                                caller="kvm_mmu_finish_page_fault", gfn=gfn)
        return RET_PF.EMULATE
    if mmio_sptes:
        mmio_sptes.pop(gfn, None)                       # a memslot now covers a gfn cached as MMIO
    if slot.invalid:
        return RET_PF.RETRY
    if write and slot.readonly:
        return RET_PF.EMULATE                           # KVM_PFN_ERR_RO_FAULT → emulate
    if vcpu.pferr_private is None and not kvm.mem_attr_array:     # no private memory: a shared fault
        is_private, fast = False, True
    else:
        is_private = kvm_mmu_fault_is_private(kvm, vcpu, gfn)
        fast = page_fault_can_be_fast(kvm, is_private, gfn)
    r = mmu.fast_page_fault(vcpu, slot, gfn, write) if fast else None
    if r is not None:
        return r
    yield "fast_page_fault: not fixed"
    fault = X86PageFault(vcpu, gfn, slot, write, exec, is_private=is_private)
    r = yield from kvm_tdp_page_fault(mmu, fault)
    return r


def kvm_tdp_page_fault(mmu, fault: KvmPageFault) -> Steps:
    """Mirrors ``kvm_tdp_page_fault()`` → ``kvm_tdp_mmu_page_fault()`` (and the shadow MMU's
    ``direct_page_fault()``): the steps of the generic template :func:`kvmsim.kvm.fault.kvm_stage2_fault`
    with x86's hooks -- :func:`kvm_mmu_faultin_pfn`'s two attempts and lockless checks,
    ``is_page_fault_stale()``, :func:`kvm_tdp_mmu_map`, and :func:`kvm_mmu_finish_page_fault` (the VM's
    resolved release).  Returns the steps (``yield from`` them), not a generator of its own."""
    return kvm_stage2_fault.steps(mmu, fault)


def kvm_mmu_faultin_pfn(mmu, fault: KvmPageFault) -> int | None:
    """Mirrors ``kvm_mmu_faultin_pfn()`` (arch/x86/kvm/mmu/mmu.c) between the template's ``mmu_seq``
    snapshot and its lockless re-check (:func:`kvmsim.kvm.fault.kvm_faultin_pfn` with x86's hooks):
    ``mmu_invalidate_retry_gfn_unsafe()``, ``__kvm_faultin_pfn()`` with FOLL_NOWAIT then
    FOLL_INTERRUPTIBLE, ``kvm_handle_error_pfn()``.  None when the fault goes on.  First the private vs
    shared check (-EFAULT with a KVM_EXIT_MEMORY_FAULT); a private fault takes its pfn from guest_memfd
    (``kvm_mmu_faultin_pfn_private()``): :class:`X86Mmu`'s ``fault_private_mismatch`` and
    ``fault_faultin_private`` hooks (:mod:`kvmsim.x86.private_mem`)."""
    return kvm_faultin_pfn(mmu, fault)


def kvm_mmu_finish_page_fault(kvm, mmu, fault: KvmPageFault) -> None:
    """Mirrors ``kvm_mmu_finish_page_fault()`` (v6.13; patch 40 "KVM: x86/mmu: Add helper to "finish"
    handling a guest page fault"): ``kvm_release_faultin_page(kvm, fault->refcounted_page, r ==
    RET_PF_RETRY, fault->map_writable)`` under ``mmu_lock``; in v6.12 the release came after the unlock.
    Both are the VM's resolved ``kvm.ops`` hooks, which the template calls at each point."""
    kvm.ops.fault_release_locked(kvm, mmu, fault)


def kvm_tdp_mmu_map(mmu, fault: KvmPageFault) -> RET_PF:
    """Mirrors ``kvm_tdp_mmu_map()`` / ``tdp_mmu_map_handle_target_level()`` (the shadow MMU's
    ``direct_map()`` likewise): the template's ``fault_map`` hook on x86 -- install the fault's leaf
    through the MMU's :func:`mmu_set_spte` (which the shadow MMU follows with ``direct_pte_prefetch()``)."""
    if fault.exec and mmu.nx_huge_pages and mmu.tdp_mmu_enabled:
        # kvm_mmu_hugepage_adjust(): fault->huge_page_disallowed (exec && nx_huge_page_workaround_enabled)
        # keeps goal_level at 4K; an NX huge leaf in the way is split (disallowed_hugepage_adjust())
        mmu.kvm.journal.count("nx_huge_page_disallowed")
        return mmu_set_spte(mmu, fault.vcpu, fault.slot, fault.gfn, fault.pfn, fault.kfp, fault.write, max_level=1)
    return mmu._map(fault.vcpu, fault.slot, fault.gfn, fault.pfn, fault.kfp, fault.write,
                    prefetch=fault.prefetch)


def mmu_set_spte(mmu, vcpu, slot, gfn: int, pfn: int, kfp, write: bool, *, prefetch: bool = False,
                 pte_access: int = ACC_ALL, max_level: int | None = None) -> RET_PF:
    """Mirrors ``mmu_set_spte()`` / ``tdp_mmu_map_handle_target_level()``: pick the level
    (``kvm_mmu_hugepage_adjust()``), split a huge leaf above it (TDP MMU), zap a conflicting leaf (INV-11),
    :func:`make_spte` and write it; RET_PF_SPURIOUS if the leaf is already there.

    ``pte_access`` is the shadow MMU's ``ACC_*`` from the guest PTE (:mod:`kvmsim.x86.paging_tmpl`; ACC_ALL
    for direct and TDP maps).  A prefetch (``fault->prefetch``: KVM_PRE_FAULT_MEMORY, a prefetched gPTE)
    over a shadow-present SPTE asks the VM's ``prefetch_present_spte`` hook (patch 5).  ``make_spte()``'s
    write path asks ``make_spte_skip_unsync`` whether the old SPTE -- a page-table SPTE when a huge leaf
    replaces a TDP MMU page table (:func:`tdp_page_table_present`) -- skips ``mmu_try_to_unsync_pages()``
    and the D bit (patch 4); a write-protected result of a write fault is RET_PF_WRITE_PROTECTED, which
    ``kvm_mmu_write_protect_fault()`` ends in emulation (RET_PF_EMULATE here)."""
    self = mmu
    kvm = self.kvm
    t = tables(slot)
    i = gfn - slot.base_gfn
    level = tdp_mmu.max_mapping_level(kvm, slot, i, self.max_level if max_level is None else max_level)
    if kvm.mem_attr_array or slot.gmem_file is not None:     # private gfns, mixed huge pages
        level = kvm_mmu_max_mapping_level_attrs(self, slot, gfn, pfn, level)
    n = LEVEL_PAGES[level]
    lo = (gfn // n * n) - slot.base_gfn
    hi = lo + n
    base_pfn = pfn - (i - lo)
    tdp = self.tdp_mmu_enabled
    b, old_level, old_pfn = t.entry(i)
    present = b & P and not b & MMIO                    # a shadow-present leaf, not an MMIO SPTE
    if tdp and present and old_level > level:
        # kvm_tdp_mmu_map(): a huge leaf above the goal level is split (tdp_mmu_split_huge_page(),
        # no TLB flush; the other children stay mapped), where the shadow MMU drops it
        hl, hh = t.leaf_bounds(slot, i, i + 1)
        tdp_mmu.split_range(kvm, slot, hl, hh, "tdp_mmu_split_huge_page", to_level=level)
        b, old_level, old_pfn = t.entry(i)
    old_pt = tdp and level > 1 and tdp_mmu.tdp_page_table_present(slot, gfn, level)
    if prefetch and (present or old_pt):
        r = kvm.ops.arch_ops.prefetch_present_spte(kvm, slot, gfn)       # patch 5: series RET_PF_SPURIOUS
        if r is not None:
            return r
    elif present and old_level == level and old_pfn == pfn and not b & AT and (not write or b & W):
        kvm.journal.count("spurious")
        return RET_PF_SPURIOUS
    host_w = kfp.map_writable and not slot.readonly
    # x86 maps read faults writable too (make_spte, ACC_ALL); logged dirty below
    writable = host_w if pte_access == ACC_ALL else host_w and pte_access & ACC_WRITE_MASK != 0
    dirty = True
    wrprot = False
    if writable:
        # patch 4: a writable old SPTE may "goto out", no D (a non-writable one never skips, under
        # either protocol)
        if (old_pt or present and old_level == level and b & W) and \
                kvm.ops.arch_ops.make_spte_skip_unsync(True, not old_pt):
            dirty = False
            kvm.journal.count("make_spte:skip_unsync")
        elif (self.shadow_pages_unsync or slot.arch.get("x86-write-track")) and \
                self.mmu_try_to_unsync_pages(slot, gfn, False, prefetch):
            writable = False
            wrprot = True
    bits = make_spte(host_writable=host_w, writable=writable, prefetch=prefetch,
                     ad_disabled=not self.ad_enabled, held=kfp.held is not None)
    if not writable:
        bits &= ~MW                   # MMU-writable only with ACC_WRITE_MASK and no write-protection
    elif not dirty:
        bits &= ~D
    if prefetch and present and old_level == level and old_pfn == pfn and not (bits ^ b) & ~HELD:
        kvm.journal.count("spurious")                  # v6.12: "if (new_spte == iter->old_spte)"
        return RET_PF_SPURIOUS
    # A different leaf in the way (another level or pfn, or a changed host-writable bit) is
    # zapped first: INV-11 forbids changing the pfn or Host-W of a present SPTE.
    if n == 1 and (not b & P or old_level == 1):             # the common 4K case, in plain integers
        conflict = bool(b & P) and (old_pfn != pfn or (b & HW) != (bits & HW))
        zlo, zhi = i, i + 1
    else:
        zlo, zhi = t.leaf_bounds(slot, lo, hi)
        old = t.bits[zlo:zhi]
        conflict = bool((((old & P) != 0) & ((t.level[zlo:zhi] != level)
                                             | (t.pfn[zlo:zhi] != base_pfn - lo + np.arange(zlo, zhi))
                                             | ((old & HW) != (bits & HW)))).any())
    if conflict:
        tdp_mmu.zap_range(kvm, slot, zlo, zhi, self.zap_caller)
        kvm.flush_remote_tlbs("kvm_tdp_mmu_map: zap")
        b = t.bits.item(i)
    if b & P and not prefetch:
        bits |= b & (A | D)                              # same leaf: keep what the guest set
    if n == 1:
        spte_write_one(kvm, slot, t, i, bits, pfn, level, caller=self.map_caller)
    else:
        spte_write(kvm, slot, lo, hi, bits, base_pfn + np.arange(n), level, caller=self.map_caller)
    if tdp:
        pts = slot.arch.get("x86-pt")
        if level == 1 and pts is not None and self.max_level == 3:   # a 4K leaf: its PMD and PUD tables
            pts.add(gfn >> 9 << 2 | 2)                 # tdp_mmu.pt_key(gfn, 2), pt_key(gfn, 3)
            pts.add(gfn >> 18 << 2 | 3)
        else:
            tdp_mmu.tdp_page_tables_update(slot, gfn, level, self.max_level)
    if kvm.journal.recording:
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller="make_spte", locked=kvm.mmu_lock.held(),
                         extra={"writable": bool(writable), "host_writable": bool(host_w), "level": level})
    if writable and slot.logging:
        mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
    if wrprot and write:
        return RET_PF_EMULATE          # RET_PF_WRITE_PROTECTED → kvm_mmu_write_protect_fault() → emulate
    return RET_PF_FIXED


@kpath
def kvm_zap_gfn_range(kvm, gfn: int) -> Steps:
    """Mirrors ``kvm_zap_gfn_range()`` (arch/x86/kvm/mmu/mmu.c) for one gfn: a zap under ``mmu_lock``
    (for write) outside the mmu_notifier, through the MMU's steppable ``zap_leaf`` (the generic stage-2's;
    the explorer's ``nonatomic-spte`` mutation replaces it)."""
    yield from kvm.mmu_lock.write_lock.steps()
    slot = kvm.gfn_to_memslot(gfn)
    if slot is not None:                                # deleted meanwhile: nothing to zap
        yield from kvm.arch.zap_leaf.steps(slot, gfn)
    kvm.mmu_lock.write_unlock()
    yield "kvm_zap_gfn_range: mmu_lock released"


class X86Mmu:
    """Model of the x86 ``struct kvm_mmu`` machinery for one VM (TDP MMU; see :class:`ShadowMmu`)."""

    name = "x86-tdp"
    tdp_mmu_enabled = True            # tdp_mmu_enabled: eager split and in-place recovery exist only here
    max_level = 3                     # KVM_MAX_HUGEPAGE_LEVEL with 1 GiB support
    map_caller = "kvm_tdp_mmu_map"
    zap_caller = "tdp_mmu_zap_leafs"

    def __init__(self, kvm, *, mmu: str = "tdp", pml: bool = True, ad_enabled: bool = True,
                 eager_split: bool = True, slot_zap_all: bool = True, nx_huge_pages: bool = False,
                 maxphyaddr: int = 46, tdp_enabled: bool | None = None, **opts):
        if not 32 <= maxphyaddr <= 52:
            raise UsageError(f"maxphyaddr must be in [32, 52] (CPUID.0x80000008:EAX[7:0]), not {maxphyaddr}")
        self.kvm = kvm
        #: ``kvm_host.maxphyaddr``: the host's MAXPHYADDR (CPUID.0x80000008:EAX[7:0]); 46 is a common
        #: Intel server value (the development machines report 48).
        self.maxphyaddr = maxphyaddr
        #: ``tdp_enabled`` (EPT/NPT in use).  Defaults to the execution mode: ``emulated`` models the
        #: development machines' kvm_pvm, which runs without TDP -- measured there: CPUID says 48 physical
        #: bits, yet a slot ending at 2^52 is accepted and one page further is EINVAL, the non-TDP 52.
        self.tdp_enabled = (kvm.execution == "hardware") if tdp_enabled is None else tdp_enabled
        self.pml = pml
        self.ad_enabled = ad_enabled
        self.eager_split = eager_split
        self.slot_zap_all = slot_zap_all              # KVM_X86_QUIRK_SLOT_ZAP_ALL (default on)
        #: kvm.nx_huge_pages (iTLB multihit mitigation; "auto" is on for affected Intel CPUs): an exec
        #: fault maps 4K (the TDP MMU; not modelled for the shadow MMU)
        self.nx_huge_pages = nx_huge_pages
        self.mmio_sptes: dict[int, int] = {}          # gfn → memslot generation of a cached MMIO SPTE

    # ---- locking ---------------------------------------------------------------------------------
    def _lock(self):
        return self.kvm.mmu_lock.read_lock.steps()

    def _unlock(self) -> None:
        self.kvm.mmu_lock.read_unlock()

    # ---- the fault template's hooks (kvmsim.kvm.fault) ------------------------------------------------
    family = "x86"
    fault_labels = ("kvm_mmu_faultin_pfn: mmu_seq snapshot", "kvm_mmu_faultin_pfn: pfn resolved",
                    "page fault: mmu_lock released")
    fault_lock_read = True            # the TDP MMU maps under mmu_lock for read
    fault_faultin_nowait = True
    fault_logging_write_only = False  # x86 maps read faults writable and logs them dirty
    fault_retry_ret = 0
    fault_retry_per_gfn = True        # is_page_fault_stale(): mmu_invalidate_retry_gfn() ...
    fault_stale_invalid_slot = True   # ... or an obsolete root (the memslot is being deleted or moved)
    fault_pfn_lookup = None           # __kvm_faultin_pfn(): FOLL_NOWAIT, then FOLL_INTERRUPTIBLE
    fault_before_lock = None
    handle_error_pfn = staticmethod(kvm_handle_error_pfn)
    fault_after_unlock = None

    fault_map = kvm_tdp_mmu_map
    fault_private_mismatch = kvm_mmu_private_mismatch
    fault_faultin_private = kvm_mmu_faultin_pfn_private

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_mmu_finish_page_fault()``: ``r == RET_PF_RETRY``."""
        return fault.retry

    @staticmethod
    def emulate(vcpu, gpa: int, write: bool, value: int | None) -> Access:
        return x86_emulate_instruction(vcpu, gpa, write, value)

    # ---- the fault path ----------------------------------------------------------------------------
    page_fault = kvm_mmu_page_fault

    def fast_page_fault(self, vcpu, slot, gfn: int, write: bool) -> RET_PF | None:
        """Mirrors ``fast_page_fault()``: restore an access-tracked SPTE or W on an MMU-writable one,
        lockless; never W on a huge leaf of a dirty-logged slot.  None = take the slow path."""
        t = slot.arch.get("x86")
        if t is None:
            return None
        i = gfn - slot.base_gfn
        b = t.bits.item(i)
        if not b & P or b & MMIO:
            return None
        lvl = t.level.item(i)
        if not b & AT and (not write or b & W):
            self.kvm.journal.count("spurious")
            return RET_PF.SPURIOUS
        new = b
        if b & AT:                                           # restore_acc_track_spte(): R/X only
            new &= ~(AT | SW)
        if write and not new & W:
            if not new & MW or (lvl > 1 and slot.logging):
                return None
            new |= W | (0 if new & ADX else D)
        if write and not new & ADX:
            new |= D
        if not new & ADX:
            new |= A
        lo, hi = t.leaf_bounds(slot, i, i + 1)
        spte_write(self.kvm, slot, lo, hi, new, caller="fast_page_fault")
        self.kvm.journal.count("fast_page_fault")
        if write and slot.logging:
            mark_page_dirty_in_slot(self.kvm, slot, gfn, vcpu)
        return RET_PF.FIXED

    _map = mmu_set_spte

    #: Whether ``make_spte()``'s ``mmu_try_to_unsync_pages()`` can find shadow pages of the gfn (indirect
    #: shadow paging); without them it only checks write tracking, so it is called only for a slot with a
    #: write-tracked gfn.
    shadow_pages_unsync = False

    def mmu_try_to_unsync_pages(self, slot, gfn: int, synchronizing: bool, prefetch: bool) -> bool:
        """Mirrors ``mmu_try_to_unsync_pages()`` (mmu.c) without shadow pages: -EPERM (write-protect the
        SPTE) iff the gfn is write-tracked (``kvm_gfn_is_write_tracked()``, :mod:`kvmsim.x86.page_track`)."""
        return kvm_gfn_is_write_tracked(self.kvm, slot, gfn)

    # ---- guest accesses ----------------------------------------------------------------------------
    #: A guest load/store: :func:`kvmsim.kvm.fault.kvm_guest_access` (the one re-entry loop), with
    #: :meth:`leaf_access` and RET_PF_EMULATE → ``x86_emulate_instruction()``.
    guest_access = x86_guest_access

    def leaf_access(self, vcpu, slot, i: int, write: bool) -> int | None:
        """Through the SPTEs: hardware sets A/D (PML logs a write that sets D on a dirty-logged slot) and
        the access goes to the pfn; None for an EPT violation."""
        t = slot.arch.get("x86")
        if t is None:
            return None
        b = int(t.bits[i])
        if b & P and not b & (AT | MMIO) and (not write or b & W):
            self._hw_set_ad(vcpu, slot, t, i, b, write)
            return int(t.pfn[i])
        return None

    def _hw_set_ad(self, vcpu, slot, t, i: int, b: int, write: bool) -> None:
        if b & ADX:
            return
        want = A | (D if write else 0)
        if b & want == want:
            return
        lo, hi = t.leaf_bounds(slot, i, i + 1)
        t.bits[lo:hi] |= np.uint16(want)                  # hardware A/D assist: not an SPTE write by KVM
        if write and not b & D and slot.logging and self.pml:
            mark_page_dirty_in_slot(self.kvm, slot, slot.base_gfn + i, vcpu)     # PML entry

    # ---- memory attributes (kvmsim.kvm.memory_attributes) ---------------------------------------------
    pre_set_memory_attributes = kvm_arch_pre_set_memory_attributes
    post_set_memory_attributes = kvm_arch_post_set_memory_attributes

    # ---- ArchMmu: zapping, aging ---------------------------------------------------------------------
    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        lo = max(start, slot.base_gfn) - slot.base_gfn
        hi = min(end, slot.base_gfn + slot.npages) - slot.base_gfn
        flush = tdp_mmu.zap_range(self.kvm, slot, lo, hi, "kvm_unmap_gfn_range")
        from kvmsim.x86.vmx import kvm_apic_access_page_unmapped
        kvm_apic_access_page_unmapped(self.kvm, slot)        # KVM_REQ_APIC_PAGE_RELOAD (kvmsim.x86.vmx)
        return flush

    def age_gfn(self, slot, start: int, end: int) -> bool:
        return tdp_mmu.age_range(self.kvm, slot, start - slot.base_gfn, end - slot.base_gfn, clear=True)

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        return tdp_mmu.age_range(self.kvm, slot, start - slot.base_gfn, end - slot.base_gfn, clear=False)

    def flush_on_age(self) -> bool:
        """[6.13-other] "KVM: x86/mmu: Don't flush TLBs when aging SPTEs": no flush with the option."""
        return not self.kvm.v613_other

    def flush_shadow_memslot(self, slot) -> None:
        """``kvm_arch_flush_shadow_memslot()`` (delete/move).  With KVM_X86_QUIRK_SLOT_ZAP_ALL (on by
        default, v6.12/v6.13) ``kvm_mmu_zap_all_fast()``: every slot's SPTEs go with the obsolete
        roots, and the vCPUs reload their roots instead of a remote flush.  Without the quirk
        ``kvm_mmu_zap_memslot_leafs()``: this slot only, one flush."""
        kvm = self.kvm
        if self.slot_zap_all:
            every = [s for slots in kvm.memslots for s in slots]
            if not any(s is slot for s in every):           # already unlinked from the memslots
                every.append(slot)
            for s in every:
                tdp_mmu.zap_range(kvm, s, 0, s.npages, "kvm_mmu_zap_all_fast")
                tdp_mmu.tdp_page_tables_free(s)
            kvm.journal.count("mmu_zap_all_fast")
        elif tdp_mmu.zap_range(kvm, slot, 0, slot.npages, "kvm_mmu_zap_memslot"):
            kvm.flush_remote_tlbs("flush_shadow_memslot")
        tdp_mmu.tdp_page_tables_free(slot)
        self.mmio_sptes.clear()

    def flush_shadow_all(self) -> None:
        """``kvm_arch_flush_shadow_all()`` → ``kvm_mmu_zap_all()`` (VM destroy / notifier release)."""
        for slots in self.kvm.memslots:
            for slot in slots:
                tdp_mmu.zap_range(self.kvm, slot, 0, slot.npages, "kvm_mmu_zap_all")
                tdp_mmu.tdp_page_tables_free(slot)
        self.mmio_sptes.clear()

    # ---- memslots -------------------------------------------------------------------------------------
    def kvm_mmu_max_gfn(self) -> int:
        """Mirrors ``kvm_mmu_max_gfn()`` (arch/x86/kvm/mmu.h, v6.12 and v6.13): the host MAXPHYADDR with
        TDP ("EPT/NPT cannot support GPAs that would exceed host.MAXPHYADDR"), else 52."""
        max_gpa_bits = self.maxphyaddr if self.tdp_enabled else 52
        return (1 << (max_gpa_bits - PAGE_SHIFT)) - 1

    def prepare_memory_region(self, old, new, change) -> None:
        """Mirrors ``kvm_arch_prepare_memory_region()`` (arch/x86/kvm/x86.c, v6.12 and v6.13): a created
        or moved slot whose last gfn is past ``kvm_mmu_max_gfn()`` is EINVAL.  (The KVMGT external
        page-tracker refusal of a move is not modelled.)"""
        from kvmsim.kvm.memslot import KvmMrChange
        if change in (KvmMrChange.CREATE, KvmMrChange.MOVE) and new.base_gfn + new.npages - 1 > self.kvm_mmu_max_gfn():
            raise ModelError(errno.EINVAL, f"slot {new.id}: last gfn {new.base_gfn + new.npages - 1:#x} is past "
                                           f"kvm_mmu_max_gfn() {self.kvm_mmu_max_gfn():#x}")

    # ---- dirty logging (kvmsim.x86.dirty_log) ---------------------------------------------------------
    def slot_apply_flags(self, old, new, change) -> None:
        from kvmsim.x86.dirty_log import kvm_mmu_slot_apply_flags
        kvm_mmu_slot_apply_flags(self, old, new, change)
        if old is not None and new is not None and old.logging and not new.logging:
            tdp_mmu.tdp_page_tables_free(new)          # zap_collapsible / recover_huge_pages replaced the page tables

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        from kvmsim.x86.dirty_log import kvm_arch_mmu_enable_log_dirty_pt_masked
        kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot, gfn_offset, mask)

    # ---- bulk paths (kvmsim.x86.bulk) --------------------------------------------------------------------
    def guest_access_range(self, vcpu, gpa: int, npages: int, write: bool, values=None) -> np.ndarray:
        from kvmsim.x86.bulk import guest_access_range
        return guest_access_range(self, vcpu, gpa, npages, write, values)

    def populate(self, vcpu, gpa: int, npages: int, write: bool) -> np.ndarray:
        """Fault in ``npages`` from ``gpa`` as guest accesses would (memstress's first pass)."""
        return self.guest_access_range(vcpu, gpa, npages, write, None)

    # ---- introspection --------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """The VM binary stats ``pages_4k`` / ``pages_2m`` / ``pages_1g`` (number of leaves)."""
        out = {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}
        for slots in self.kvm.memslots:
            for slot in slots:
                t = slot.arch.get("x86")
                if t is None:
                    continue
                reps = t.representatives(slot, 0, slot.npages)
                lv = np.bincount(t.level[reps], minlength=4)
                out["pages_4k"] += int(lv[1])
                out["pages_2m"] += int(lv[2])
                out["pages_1g"] += int(lv[3])
        return out

    def leaf_arrays(self):
        """Present leaves per slot as arrays (the checker's vectorised view of :meth:`leaves`)."""
        for slots in self.kvm.memslots:
            for slot in slots:
                if "x86" in slot.arch:
                    yield slot, self._leaf_arrays(slot, 0, slot.npages)

    def leaf_pieces(self):
        """:meth:`leaf_arrays` one 1 GiB-aligned piece of a slot at a time (no leaf crosses a cut), so
        a reader of a 64 GiB guest holds one piece's arrays, not the slot's."""
        from kvmsim.x86.dirty_log import gfn_aligned_pieces
        for slots in self.kvm.memslots:
            for slot in slots:
                if "x86" in slot.arch:
                    for lo, hi in gfn_aligned_pieces(slot, 0, slot.npages):
                        yield slot, self._leaf_arrays(slot, lo, hi)

    @staticmethod
    def _leaf_arrays(slot, lo: int, hi: int) -> dict:
        t = slot.arch["x86"]
        i = t.representatives(slot, lo, hi)
        b = t.bits[i].astype(np.int64)
        return {"idx": i, "pfn": t.pfn[i], "level": t.level[i], "w": (b & W) != 0, "hw": (b & HW) != 0,
                "mw": (b & MW) != 0, "held": (b & HELD) != 0, "a": is_accessed_spte(b), "d": is_dirty_spte(b)}

    def leaves(self) -> Iterator[Leaf]:
        for slots in self.kvm.memslots:
            for slot in slots:
                t = slot.arch.get("x86")
                if t is None:
                    continue
                for i in t.representatives(slot, 0, slot.npages).tolist():
                    b = int(t.bits[i])
                    yield Leaf(slot.base_gfn + i, int(t.pfn[i]), int(t.level[i]), bool(b & W), bool(b & HW),
                               bool(b & MW), bool(is_accessed_spte(b)), bool(is_dirty_spte(b)), slot.id, bool(b & HELD))
