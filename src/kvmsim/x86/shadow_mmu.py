"""The shadow MMU in direct mode (arch/x86/kvm/mmu/mmu.c ``direct_map()``, ``mmu_set_spte()``,
``mmu_spte_update()``, ``mmu_spte_clear_track_bits()``, ``direct_pte_prefetch()``, v6.13).

Same SPTE tables as the TDP MMU, but faults map under ``mmu_lock`` held for write, and a fault
prefetches up to 8 neighbouring gfns (``PTE_PREFETCH_NUM``) with ``kvm_prefetch_pages()``.  A
prefetch never overwrites a present SPTE (``__direct_pte_prefetch`` skips them in both kernels), so
no policy hook is needed there; the page is released by the policy's ``release_prefetched()`` hook.
"""

from __future__ import annotations

import numpy as np

from kvmsim.kvm.pfn import Hold, KvmFollowPfn, kvm_prefetch_pages
from kvmsim.x86.mmu_internal import RET_PF
from kvmsim.x86.mmu import X86Mmu
from kvmsim.x86.spte import P, tables

PTE_PREFETCH_NUM = 8


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


__all__ = ["ShadowMmu", "PTE_PREFETCH_NUM", "np"]
