"""The shadow MMU (arch/x86/kvm/mmu/mmu.c ``direct_map()``, ``mmu_set_spte()``, ``mmu_spte_update()``,
``mmu_spte_clear_track_bits()``, ``direct_pte_prefetch()``, v6.13): :class:`ShadowMmu` in direct mode, and
:class:`IndirectShadowMmu`, shadow paging of the guest's own page tables (its ``FNAME(...)`` functions are
in :mod:`kvmsim.x86.paging_tmpl`).

Same SPTE tables as the TDP MMU, but faults map under ``mmu_lock`` held for write, and a fault
prefetches up to 8 neighbouring gfns (``PTE_PREFETCH_NUM``) with ``kvm_prefetch_pages()``.  A
prefetch never overwrites a present SPTE (``__direct_pte_prefetch`` skips them in both kernels), so
no policy hook is needed there; the page is released by the policy's ``release_prefetched()`` hook.
"""

from __future__ import annotations

import numpy as np

from kvmsim.kvm.fault import kvm_guest_access
from kvmsim.kvm.pfn import Hold, KvmFollowPfn, kvm_prefetch_pages
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.types import PAGE_SHIFT
from kvmsim.x86.mmu_internal import RET_PF
from kvmsim.x86.mmu import X86Mmu, mmu_set_spte
from kvmsim.x86.paging_tmpl import (PT64_ENT_PER_PAGE, PTE_PREFETCH_NUM, GuestPageTables, KvmMmuPage, paging64_fetch,
                                    paging64_page_fault, paging64_walk_addr)
from kvmsim.x86.spte import P, tables


class ShadowMmu(X86Mmu):
    """Direct-mode shadow paging (``tdp_mmu_enabled=0`` with EPT/NPT, or a direct root)."""

    name = "x86-shadow"
    tdp_mmu_enabled = False
    map_caller = "mmu_set_spte"
    zap_caller = "mmu_spte_clear_track_bits"
    fault_lock_read = False           # the shadow MMU maps under mmu_lock for write

    def _lock(self):
        return self.kvm.mmu_lock.write_lock.steps()

    def _unlock(self) -> None:
        self.kvm.mmu_lock.write_unlock()

    def _map(self, vcpu, slot, gfn, pfn, kfp, write, *, prefetch=False):
        r = super()._map(vcpu, slot, gfn, pfn, kfp, write, prefetch=prefetch)
        # direct_map(): "if (ret == RET_PF_SPURIOUS) return ret;" before direct_pte_prefetch()
        if not prefetch and r != RET_PF.SPURIOUS and int(tables(slot).level[gfn - slot.base_gfn]) == 1:
            self.direct_pte_prefetch(vcpu, slot, gfn)
        return r

    def direct_pte_prefetch(self, vcpu, slot, gfn: int) -> int:
        """``direct_pte_prefetch()``: runs of non-present SPTEs in the 8-aligned group around ``gfn``,
        each through ``direct_pte_prefetch_many()``, stopping at the first run that fails.  Never with
        A/D bits disabled (``sp_ad_disabled()``), while an mmu_notifier invalidation is in progress
        ("If addresses are being invalidated, skip prefetching"), or for a dirty-logged slot
        (``gfn_to_memslot_dirty_bitmap()`` returns NULL)."""
        kvm = self.kvm
        if not self.ad_enabled or kvm.mmu_invalidate_in_progress:
            return 0
        start = gfn // PTE_PREFETCH_NUM * PTE_PREFETCH_NUM
        done = 0
        run = None
        for g in range(start, start + PTE_PREFETCH_NUM + 1):
            s = kvm.gfn_to_memslot(g) if g < start + PTE_PREFETCH_NUM else None
            mapped = g == start + PTE_PREFETCH_NUM or g == gfn or \
                (s is not None and "x86" in s.arch and int(tables(s).bits[g - s.base_gfn]) & P)
            if not mapped:
                run = g if run is None else run
                continue
            if run is not None:
                n = self._prefetch_many(vcpu, run, g - run)
                if n < 0:
                    break
                done += n
                run = None
        kvm.journal.count("prefetch", done)
        return done

    def _prefetch_many(self, vcpu, gfn: int, n: int) -> int:
        """``direct_pte_prefetch_many()``: -1 without a (non-logged) slot or when nothing resolves."""
        kvm = self.kvm
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None or slot.invalid or slot.logging:
            return -1
        pfns = kvm_prefetch_pages(kvm, slot, gfn, n)
        if not pfns:
            return -1
        t = tables(slot)
        done = 0
        for k, pfn in enumerate(pfns):
            kfp = KvmFollowPfn(slot, gfn + k, map_writable=True, hold=Hold.GET, held=pfn)
            if not int(t.bits[gfn + k - slot.base_gfn]) & P:
                X86Mmu._map(self, vcpu, slot, gfn + k, pfn, kfp, False, prefetch=True)
                done += 1
            kvm.policy.release_prefetched(kvm, pfn, "direct_pte_prefetch_many")
        return done


class IndirectShadowMmu(ShadowMmu):
    """Shadow paging with TDP off (``paging = "indirect"``): faults and accesses by gva through the guest's
    page tables (:class:`GuestPageTables`), level-1 indirect shadow pages, unsync and sync."""

    name = "x86-shadow-indirect"
    max_level = 1                     # the guest maps 4 KiB pages only (model limit)
    map_caller = "mmu_set_spte"

    def __init__(self, kvm, **opts):
        super().__init__(kvm, **opts)
        self.tdp_enabled = False      # vcpu->arch.mmu->page_fault == FNAME(page_fault), not kvm_tdp_page_fault
        self.guest_pt = GuestPageTables()
        self.mmu_page_hash: dict[object, KvmMmuPage] = {}
        self.rmap_owner: dict[int, int] = {}      # gfn → the gvn whose SPTE it is

    fault_map = paging64_fetch
    page_fault = paging64_page_fault
    _map = mmu_set_spte

    def sp_of(self, gvn: int) -> KvmMmuPage | None:
        pt = self.guest_pt.table_gfn(gvn)
        return self.mmu_page_hash.get(pt if pt is not None else ("boot", gvn // PT64_ENT_PER_PAGE))

    def spte_present(self, gvn: int) -> bool:
        """Whether ``gvn`` has a present SPTE (hardware would use it: stale or not)."""
        sp = self.sp_of(gvn)
        gfn = sp.spt.get(gvn) if sp is not None else None
        if gfn is None or self.rmap_owner.get(gfn) != gvn:
            return False
        slot = self.kvm.gfn_to_memslot(gfn)
        return slot is not None and "x86" in slot.arch and bool(int(tables(slot).bits[gfn - slot.base_gfn]) & P)

    shadow_pages_unsync = True

    def mmu_try_to_unsync_pages(self, slot, gfn: int, synchronizing: bool, prefetch: bool) -> bool:
        """Mirrors ``mmu_try_to_unsync_pages()``: -EPERM for a write-tracked gfn; for each shadow page of the
        gfn, -EPERM when synchronizing (a sync never unsyncs), skip an unsync one, -EEXIST for a prefetch,
        else ``kvm_unsync_page()``.  True: write-protect the new SPTE."""
        from kvmsim.x86.page_track import kvm_gfn_is_write_tracked
        kvm = self.kvm
        kvm.journal.count("mmu_try_to_unsync_pages")
        if kvm_gfn_is_write_tracked(kvm, slot, gfn):
            return True
        sp = self.mmu_page_hash.get(gfn)
        if sp is None:
            return False
        if synchronizing:
            return True
        if sp.unsync:
            return False
        if prefetch:
            return True
        sp.unsync = True
        kvm.journal.count("mmu_unsync")
        return False

    # ---- guest accesses by gva -------------------------------------------------------------------------
    def _translate(self, vcpu, gva: int, write: bool) -> int | None:
        """Through the (possibly stale) SPTE of ``gva``, as hardware would: the pfn, or None for a #PF exit."""
        gvn = gva >> PAGE_SHIFT
        sp = self.sp_of(gvn)
        gfn = sp.spt.get(gvn) if sp is not None else None
        if gfn is None or self.rmap_owner.get(gfn) != gvn:
            return None
        slot = self.kvm.gfn_to_memslot(gfn)
        if slot is None or slot.invalid:
            return None
        return X86Mmu.leaf_access(self, vcpu, slot, gfn - slot.base_gfn, write)

    def _guest_page_fault(self, vcpu, gva: int, write: bool, value: int | None) -> Access | None:
        """A guest #PF (Exit.EXCEPTION) when the guest's own tables refuse the access, before any KVM fault."""
        if paging64_walk_addr(self, vcpu, gva >> PAGE_SHIFT, write, update=False).fault:
            self.kvm.journal.count("guest_page_fault")
            return Access(Exit.EXCEPTION, gva, write, value)
        return None

    def guest_access(self, vcpu, gva: int, write: bool, value: int | None) -> Access:
        """A guest load/store at a gva: :func:`kvmsim.kvm.fault.kvm_guest_access` by gva, through its SPTE,
        else a guest #PF when the guest's own tables refuse it, else :func:`paging64_page_fault` and
        re-entry."""
        return kvm_guest_access(self, vcpu, gva, write, value, translate=self._translate,
                                guest_fault=self._guest_page_fault)

    def emulate(self, vcpu, gva: int, write: bool, value: int | None) -> Access:
        """``x86_emulate_instruction()`` at a gva: the emulator walks the guest's tables, then the uaccess."""
        w = paging64_walk_addr(self, vcpu, gva >> PAGE_SHIFT, write, update=False)
        if w.fault:
            return Access(Exit.EXCEPTION, gva, write, value)
        gpa = (w.gfn << PAGE_SHIFT) | (gva & ((1 << PAGE_SHIFT) - 1))
        acc = vcpu._emulated_access(gpa, write, value)
        return Access(acc.exit, gva, acc.write, acc.value, acc.errno) if acc.exit is not Exit.OK \
            else Access(Exit.OK, gva, write, acc.value)

    def guest_access_range(self, vcpu, gva: int, npages: int, write: bool, values=None):
        """``npages`` guest accesses by gva, one at a time (the TDP MMU's vectorised range is by gfn): the
        values read/written, -1 where an access exited (counted as ``range_access_exit``)."""
        import numpy as np
        kvm = self.kvm
        vals = np.zeros(npages, dtype=np.int64) if values is None else \
            np.broadcast_to(np.asarray(values, dtype=np.int64), (npages,))
        out = np.zeros(npages, dtype=np.int64)
        for k in range(npages):
            a = vcpu.access(gva + (k << PAGE_SHIFT), write, int(vals[k]) if write else None)
            if a.exit is Exit.OK:
                out[k] = int(a.value or 0)
            else:
                out[k] = -1
                kvm.journal.count("range_access_exit")
        return out

    # ---- zapping: the shadow pages forget SPTEs the notifier or a memslot change zapped -------------
    def flush_shadow_memslot(self, slot) -> None:
        super().flush_shadow_memslot(slot)
        self._forget_zapped()

    def flush_shadow_all(self) -> None:
        super().flush_shadow_all()
        self.mmu_page_hash.clear()
        self.rmap_owner.clear()

    def _forget_zapped(self) -> None:
        for gfn in list(self.rmap_owner):
            slot = self.kvm.gfn_to_memslot(gfn)
            if slot is None or not int(tables(slot).bits[gfn - slot.base_gfn]) & P:
                gvn = self.rmap_owner.pop(gfn)
                sp = self.sp_of(gvn)
                if sp is not None:
                    sp.spt.pop(gvn, None)
                    sp.access.pop(gvn, None)


__all__ = ["ShadowMmu", "IndirectShadowMmu", "PTE_PREFETCH_NUM", "np"]
