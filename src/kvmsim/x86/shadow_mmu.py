"""The shadow MMU in direct mode (arch/x86/kvm/mmu/mmu.c ``direct_map()``, ``mmu_set_spte()``,
``mmu_spte_update()``, ``mmu_spte_clear_track_bits()``, ``direct_pte_prefetch()``, v6.13).

Same SPTE tables as the TDP MMU, but faults map under ``mmu_lock`` held for write, and a fault
prefetches up to 8 neighbouring gfns (``PTE_PREFETCH_NUM``) with ``kvm_prefetch_pages()``.  A
prefetch never overwrites a present SPTE (``__direct_pte_prefetch`` skips them in both kernels), so
no policy hook is needed there; the page is released with ``policy.release_prefetched``.
"""

from __future__ import annotations

import numpy as np

from kvmsim.kvm.pfn import Hold, KvmFollowPfn, kvm_prefetch_pages
from kvmsim.kvm.stage2 import RET_PF
from kvmsim.x86.mmu import X86Mmu
from kvmsim.x86.spte import P, tables

PTE_PREFETCH_NUM = 8


class ShadowMmu(X86Mmu):
    """Direct-mode shadow paging (``tdp_mmu_enabled=0`` with EPT/NPT, or a direct root)."""

    name = "x86-shadow"
    tdp_mmu_enabled = False
    map_caller = "mmu_set_spte"
    zap_caller = "mmu_spte_clear_track_bits"

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
        """``direct_pte_prefetch()``: the 8-aligned group around ``gfn``, runs of non-present SPTEs;
        never with A/D bits disabled (``sp_ad_disabled()``), while an mmu_notifier invalidation is
        in progress ("If addresses are being invalidated, skip prefetching"), or for dirty-logged
        slots (``gfn_to_memslot_dirty_bitmap()`` returns NULL)."""
        kvm = self.kvm
        if slot.logging or not self.ad_enabled or kvm.mmu_invalidate_in_progress:
            return 0
        t = tables(slot)
        start = gfn // PTE_PREFETCH_NUM * PTE_PREFETCH_NUM
        done = 0
        g = max(start, slot.base_gfn)
        end = min(start + PTE_PREFETCH_NUM, slot.base_gfn + slot.npages)
        while g < end:
            if g == gfn or int(t.bits[g - slot.base_gfn]) & P:
                g += 1
                continue
            run = g
            while run < end and run != gfn and not int(t.bits[run - slot.base_gfn]) & P:
                run += 1
            pfns = kvm_prefetch_pages(kvm, slot, g, run - g)
            for k, pfn in enumerate(pfns):
                kfp = KvmFollowPfn(slot, g + k, map_writable=True, hold=Hold.GET, held=pfn)
                if not int(t.bits[g + k - slot.base_gfn]) & P:
                    super()._map(vcpu, slot, g + k, pfn, kfp, False, prefetch=True)
                    done += 1
                kvm.policy.release_prefetched(kvm, pfn, "direct_pte_prefetch_many")
            g = run
        kvm.journal.count("prefetch", done)
        return done


__all__ = ["ShadowMmu", "PTE_PREFETCH_NUM", "np"]
