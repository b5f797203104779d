"""The gfn→pfn cache (virt/kvm/pfncache.c): KVM's kernel mapping of a guest page, kept coherent by the
mmu_notifier instead of a page reference (kvmclock, Xen shared info, steal time).

Refresh resolves the pfn for write, then *drops* the reference; validity is revoked by
``invalidate_range_start`` (before SPTE zapping, outside mmu_lock), and a refresh that raced an
invalidation loops (``mmu_notifier_retry_cache``).
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.kvm.pfn import (KVM_HVA_ERR_RO_BAD, KvmFollowPfn, gfn_to_hva_memslot_prot, hva_to_pfn,
                            is_error_noslot_pfn, pfn_name)
from kvmsim.mm.gup import FOLL
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE


class GfnToPfnCache:
    """Model of ``struct gfn_to_pfn_cache``."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.gpa = -1
        self.uhva = -1
        self.pfn = -1
        self.khva_valid = False
        self.active = False
        self.valid = False
        self.generation = -1
        self.last_error = ""
        kvm.gpcs.append(self)

    def activate(self, gpa: int, length: int = 32) -> None:
        """``kvm_gpc_activate()``: then refresh."""
        self.active = True
        self.gpa = gpa
        self.refresh(length)

    def deactivate(self) -> None:
        self.active = False
        self.valid = False
        if self in self.kvm.gpcs:
            self.kvm.gpcs.remove(self)

    def check(self, length: int = 32) -> bool:
        """``kvm_gpc_check()``: usable without a refresh?"""
        kvm = self.kvm
        if not self.active or not self.valid or self.uhva < 0:
            return False
        if (self.gpa & (PAGE_SIZE - 1)) + length > PAGE_SIZE:
            return False
        return self.generation == kvm.memslots[0].generation

    def invalidate(self, start: int, end: int) -> None:
        """``gfn_to_pfn_cache_invalidate_start()``."""
        if self.valid and self.pfn >= 0 and start <= self.uhva < end:
            self.valid = False
            self.kvm.journal.count("gpc_invalidate")

    @kpath
    def refresh_steps(self, length: int = 32) -> Steps:
        """``hva_to_pfn_retry()`` under the refresh lock."""
        kvm = self.kvm
        if (self.gpa & (PAGE_SIZE - 1)) + length > PAGE_SIZE:
            raise ModelError(errno.EINVAL, "pfncache: length crosses a page")
        gfn = self.gpa >> PAGE_SHIFT
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:
            self.valid = False
            self.last_error = "no memslot"
            raise ModelError(errno.EFAULT, f"pfncache: no memslot for gpa {self.gpa:#x}")
        # __kvm_gpc_refresh(): gfn_to_hva_memslot() is the write-checked lookup, so a read-only or
        # invalid memslot fails the refresh with -EFAULT before any GUP.
        uhva = gfn_to_hva_memslot_prot(slot, gfn, True)
        if uhva < 0:
            self.valid = False
            self.last_error = "read-only memslot" if uhva == KVM_HVA_ERR_RO_BAD else "invalid memslot"
            raise ModelError(errno.EFAULT, f"pfncache: gpa {self.gpa:#x} is in a {self.last_error}")
        self.generation = kvm.memslots[0].generation
        if self.valid and uhva == self.uhva:
            # "If the HVA→PFN mapping was already valid, don't unmap it": a new memslot generation
            # with the same hva keeps the cached pfn, no GUP.
            kvm.journal.count("gpc_refresh_kept")
            return self.pfn
        self.uhva = uhva
        self.valid = False
        for attempt in range(16):
            mmu_seq = kvm.mmu_invalidate_seq
            yield "hva_to_pfn_retry: mmu_seq snapshot, gpc lock dropped"
            kfp = KvmFollowPfn(slot, gfn, flags=FOLL.WRITE, hva=self.uhva, caller="hva_to_pfn_retry")
            pfn = hva_to_pfn(kvm, kfp)
            if is_error_noslot_pfn(pfn):
                self.last_error = pfn_name(pfn)
                kvm.journal.count("gpc_refresh_error")
                raise ModelError(errno.EFAULT, f"pfncache refresh of gpa {self.gpa:#x}: {pfn_name(pfn)}")
            yield "hva_to_pfn_retry: pfn resolved and mapped"
            if kvm.mn_active_invalidate_count == 0 and kvm.mmu_invalidate_seq == mmu_seq:
                self.pfn = pfn
                self.valid = True
                kvm.policy.release_clean(kvm, pfn, kfp, caller="hva_to_pfn_retry")
                kvm.journal.count("gpc_refresh")
                return pfn
            kvm.policy.release_clean(kvm, pfn, kfp, caller="hva_to_pfn_retry", unused=True)
            kvm.journal.count("gpc_refresh_retry")
        raise ModelError(errno.EAGAIN, "pfncache refresh kept racing invalidations")

    def refresh(self, length: int = 32) -> int:
        return self.refresh_steps(length)

    def write(self, value: int, length: int = 32) -> bool:
        """KVM updates the cached page (e.g. the pvclock) if the cache is valid; refreshes otherwise.

        Returns whether the write landed; mirrors the kvmclock update that is silently skipped when
        the refresh fails (kvm-on-these-machines §10).
        """
        if not self.check(length):
            try:
                self.refresh(length)
            except ModelError:
                return False
        if self.kvm.phys.is_poisoned(self.pfn):
            self.kvm.journal.fact("gpc_uaf", pfn=self.pfn, kvm=True, caller="gpc write",
                                  detail="pfncache writes a freed page")
        self.kvm.phys.write(self.pfn, value, "gpc write", kvm=True)
        return True
