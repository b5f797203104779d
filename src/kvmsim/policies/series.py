"""Linux v6.13: KVM reports exactly the page it holds and releases it under mmu_lock.

Series: "KVM: Stop grabbing references to PFNMAP'd pages" (v13, 85 patches, merge 5cb1659f4120).
"""

from __future__ import annotations

from kvmsim.kvm.pfn import (KVM_PFN_ERR_NEEDS_IO, KVM_PFN_ERR_SIGPENDING, Hold, kvm_release_page_clean,
                            kvm_release_page_dirty, kvm_release_page_unused)


class SeriesPolicy:
    name = "series"
    title = "v6.13: kvm_follow_pfn + kvm_release_faultin_page"
    release_under_mmu_lock = True          # patch 40/49 "kvm_release_faultin_page" under mmu_lock

    def reported_page(self, kfp):
        """Patch 27 "KVM: Add kvm_follow_pfn.refcounted_page output": the page KVM holds, or NULL."""
        return kfp.held

    def gup_error_pfn(self, rc):
        """Patch 14 "KVM: Return ERR_SIGPENDING from hva_to_pfn() if GUP returns -EGAIN": -EINTR and -EAGAIN."""
        if rc in (-4, -11):
            return KVM_PFN_ERR_SIGPENDING
        return None

    def needs_io_pfn(self, kfp):
        """Patch 16 "KVM: Replace "async" pointer in gfn=>pfn with "no_wait" and error code": NEEDS_IO."""
        return KVM_PFN_ERR_NEEDS_IO

    def refuses_unpinned_direct_map(self, kvm):
        """Patch 35 "KVM: Disallow direct access (w/o mmu_notifier) to unpinned pfn by default"."""
        return not kvm.allow_unsafe_mappings

    def remapped_get_ref(self, kvm, pfn, caller):
        """Patch 85 "KVM: Don't grab reference on VM_MIXEDMAP pfns that have a "struct page"": never a ref."""
        return True, Hold.NONE

    def release_faultin(self, kvm, pfn, kfp, *, unused, dirty, caller, gfn=None):
        """``kvm_release_faultin_page()`` (patches 40, 41, 47, 48, 49; arm64 56 "KVM: arm64: Use
        __kvm_faultin_pfn() to handle memory aborts"): unused → put only; dirty iff map_writable ("KVM: x86/mmu: Mark page/folio accessed only when zapping leaf SPTEs" and
        "Mark folio dirty when creating SPTE, not when zapping/modifying")."""
        page = kfp.refcounted_page if kfp is not None else None
        hold = kfp.hold if kfp is not None else Hold.NONE
        if not unused:                      # lockdep_assert_once(held || unused), before the NULL check
            kvm.lockdep_assert_held_mmu_lock(caller)
        if page is None:
            return
        if unused:
            kvm_release_page_unused(kvm, page, hold, caller)
        elif dirty:
            kvm_release_page_dirty(kvm, page, hold, caller, gfn=gfn)
        else:
            kvm_release_page_clean(kvm, page, hold, caller, gfn=gfn)

    def release_clean(self, kvm, pfn, kfp, *, caller, unused=False):
        """pfncache / APIC page: patch 29 "KVM: pfncache: Precisely track refcounted pages"."""
        page = kfp.refcounted_page if kfp is not None else None
        if unused:
            kvm_release_page_unused(kvm, page, kfp.hold if kfp else Hold.NONE, caller)
        else:
            kvm_release_page_clean(kvm, page, kfp.hold if kfp else Hold.NONE, caller)

    def release_prefetched(self, kvm, pfn, caller):
        """Patches 38/39/41: prefetched pages are released dirty (always GUP'd writable)."""
        kvm_release_page_dirty(kvm, pfn, Hold.GET, caller)

    def gfn_to_page_write(self, write):
        """Patch 76 "KVM: Add support for read-only usage of gfn_to_page()"."""
        return write

    def gfn_to_page_result(self, kvm, pfn, kfp):
        """Patch 75 "KVM: Convert gfn_to_page() to use kvm_follow_pfn()": the refcounted page or NULL."""
        return kfp.refcounted_page

    def vcpu_map_write(self, writable):
        """Patch 34 "KVM: Get writable mapping for __kvm_vcpu_map() only when necessary": FOLL_WRITE
        only for a writable map (``kvm_vcpu_map_readonly()`` resolves read-only)."""
        return writable

    def vcpu_map_pins(self):
        """Patch 31 "KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()"."""
        return True

    def vcpu_map_dirty_at_map(self):
        """Patch 33 "KVM: Mark "struct page" pfns dirty only in kvm_release_pfn_dirty()"… the map's
        ``writable`` decides at map time ("KVM: Get writable mapping for __kvm_vcpu_map() only when
        necessary", patch 34)."""
        return True

    def spte_ad_lost(self, kvm, pfn, *, dirty, accessed, caller, gfn=None, n=1):
        """Patches 8 and 82 (x86) and 83 "KVM: arm64: Don't mark "struct page" accessed when making SPTE
        young": no struct page is touched from a stage-2 PTE's pfn."""
        return None

    def spte_ad_lost_bulk(self, kvm, pfns, dirty_mask, accessed_mask, caller):
        """Patches 8 and 82 ("Mark folio dirty when creating SPTE, not when zapping/modifying", "Don't
        mark "struct page" accessed when zapping SPTEs"): nothing, for any number of SPTEs."""
        return None

    def release_faultin_bulk(self, kvm, pfns, writable_mask, caller, gfns=None):
        """Vectorised ``kvm_release_faultin_page()`` for used pages (patches 40/41/47/49): dirty iff
        map_writable, then accessed (the GUP reference is modelled as taken and dropped)."""
        from kvmsim.trace import Src
        from kvmsim.x86.folio_ops import mark_page_accessed_bulk, set_page_dirty_bulk
        set_page_dirty_bulk(kvm, pfns[writable_mask], caller, Src.HELD, None if gfns is None else gfns[writable_mask])
        mark_page_accessed_bulk(kvm, pfns, caller, Src.HELD, gfns)
