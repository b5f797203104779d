"""Linux v6.13: KVM reports exactly the page it holds and releases it under mmu_lock.

Series: "KVM: Stop grabbing references to PFNMAP'd pages" (v13, 85 patches, merge 5cb1659f4120).
"""

from __future__ import annotations

import errno

from kvmsim.kvm.fault import kvm_release_faultin_page, release_faultin_page_locked
from kvmsim.policies import load_arch_ops
from kvmsim.kvm.pfn import (KVM_PFN_ERR_NEEDS_IO, KVM_PFN_ERR_SIGPENDING, Hold, kvm_release_page_clean,
                            kvm_release_page_dirty, kvm_release_page_unused)


class SeriesPolicy:
    name = "series"
    title = "v6.13: kvm_follow_pfn + kvm_release_faultin_page"

    #: v6.13 has the other MMU changes merged beside the series ("[6.13-other]": no TLB flush when aging
    #: SPTEs, huge pages recovered in place when dirty logging is disabled).  A VM created with
    #: ``v613_other=False`` runs the series alone on a v6.12 base ("series only").
    mmu_613_other = True

    def reported_page(self, kfp):
        """patch 27 "KVM: Provide refcounted page as output field in struct kvm_follow_pfn": the page KVM holds, or NULL."""
        return kfp.held

    def gup_error_pfn(self, rc):
        """patch 14 "KVM: Return ERR_SIGPENDING from hva_to_pfn() if GUP returns -EGAIN": -EINTR and -EAGAIN."""
        if rc in (-errno.EINTR, -errno.EAGAIN):
            return KVM_PFN_ERR_SIGPENDING
        return None

    def needs_io_pfn(self, kfp):
        """patch 16 "KVM: Replace "async" pointer in gfn=>pfn with "no_wait" and error code": NEEDS_IO."""
        return KVM_PFN_ERR_NEEDS_IO

    def refuses_unpinned_direct_map(self, kvm):
        """patch 35 "KVM: Disallow direct access (w/o mmu_notifier) to unpinned pfn by default"."""
        return not kvm.allow_unsafe_mappings

    def remapped_get_ref(self, kvm, pfn, caller):
        """patch 85 "KVM: Don't grab reference on VM_MIXEDMAP pfns that have a "struct page"": never a ref."""
        return True, Hold.NONE

    def fault_release(self, arch):
        """Every arch releases with ``kvm_release_faultin_page()`` under ``mmu_lock``: x86 patch 40 "KVM:
        x86/mmu: Add helper to "finish" handling a guest page fault", arm64 patch 56 "KVM: arm64: Use
        __kvm_faultin_pfn() to handle memory aborts", RISC-V patch 59 "KVM: RISC-V: Use kvm_faultin_pfn()
        when mapping pfns into the guest", LoongArch patch 68 "KVM: LoongArch: Use kvm_faultin_pfn() to map pfns
        into the guest", MIPS patch 72 "KVM: MIPS: Use kvm_faultin_pfn() to map pfns into the guest", Book3S PR patch 64 "KVM: PPC: Use
        kvm_faultin_pfn() to handle page faults on Book3s PR".  Book3S HV / Radix keep their own ``set_page_dirty_lock()`` + ``put_page()``
        after the unlock, on the refcounted page (:meth:`arch_ops`)."""
        if arch in ("ppc-book3s-hv", "ppc-book3s-radix"):
            return None, None, None
        return release_faultin_page_locked, None, None

    def fault_release_bulk(self):
        """The x86 bulk fault releases under ``mmu_lock`` (patch 40 "KVM: x86/mmu: Add helper to "finish"
        handling a guest page fault")."""
        return self.release_faultin_bulk, True, "kvm_release_faultin_page"

    def release_faultin(self, kvm, pfn, kfp, *, unused, dirty, caller, gfn=None):
        """``kvm_release_faultin_page()`` (patch 49 "KVM: Move x86's API to release a faultin page to
        common KVM"): unused → put only (patch 48 "KVM: x86/mmu: Don't mark unused faultin pages as
        accessed"); dirty iff map_writable (patch 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin
        of make_spte()")."""
        kvm_release_faultin_page(kvm, kfp.refcounted_page if kfp is not None else None, unused, dirty,
                                 hold=kfp.hold if kfp is not None else Hold.NONE, caller=caller, gfn=gfn)

    def release_clean(self, kvm, pfn, kfp, *, caller, unused=False):
        """pfncache / APIC page: patch 29 "KVM: pfncache: Precisely track refcounted pages"; Book3S PR on a
        32-bit host: patch 64 "KVM: PPC: Use kvm_faultin_pfn() to handle page faults on Book3s PR"."""
        page = kfp.refcounted_page if kfp is not None else None
        if unused:
            kvm_release_page_unused(kvm, page, kfp.hold if kfp else Hold.NONE, caller)
        else:
            kvm_release_page_clean(kvm, page, kfp.hold if kfp else Hold.NONE, caller)

    def release_prefetched(self, kvm, pfn, caller):
        """patch 38 "KVM: x86/mmu: Put direct prefetched pages via kvm_release_page_clean()", patch 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()": prefetched pages are released dirty (always GUP'd writable)."""
        kvm_release_page_dirty(kvm, pfn, Hold.GET, caller)

    def gfn_to_page_write(self, write):
        """patch 76 "KVM: Add support for read-only usage of gfn_to_page()"."""
        return write

    def gfn_to_page_result(self, kvm, pfn, kfp):
        """patch 75 "KVM: Convert gfn_to_page() to use kvm_follow_pfn()": the refcounted page or NULL (NULL for remapped memory since patch 85 "KVM: Don't grab reference on VM_MIXEDMAP pfns that have a "struct page"")."""
        return kfp.refcounted_page

    def vcpu_map_write(self, writable):
        """patch 34 "KVM: Get writable mapping for __kvm_vcpu_map() only when necessary": FOLL_WRITE
        only for a writable map (``kvm_vcpu_map_readonly()`` resolves read-only)."""
        return writable

    def vcpu_map_pins(self):
        """patch 31 "KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()"."""
        return True

    def vcpu_map_dirty_at_map(self):
        """patch 33 "KVM: Pass in write/dirty to kvm_vcpu_map(), not kvm_vcpu_unmap()": the map's ``writable`` decides at map time."""
        return True

    #: Each arch's own v6.13 callables (``kvm.ops.arch_ops``), beyond the fault's release.
    ARCH_OPS = {
        "x86": "kvmsim.x86.versions:X86_V613",
        "arm64": "kvmsim.arm64.versions:ARM64_V613",
        "loongarch": "kvmsim.loongarch.mmu:LOONGARCH_V613",
        "s390": "kvmsim.s390.vsie:S390_V613",
        "ppc-e500": "kvmsim.ppc.e500_versions:E500_V613",
        "ppc-book3s-hv": "kvmsim.ppc.book3s_ops:BOOK3S_V613",
        "ppc-book3s-radix": "kvmsim.ppc.book3s_ops:BOOK3S_V613",
        "ppc-book3s-pr": "kvmsim.ppc.book3s_ops:BOOK3S_V613",
    }

    def arch_ops(self, arch):
        """The arch's v6.13 namespace from :attr:`ARCH_OPS`: the same rows as
        :meth:`LegacyPolicy.arch_ops <kvmsim.policies.legacy.LegacyPolicy.arch_ops>` (which cites each
        patch), on the v6.13 side -- e.g. patch 77 "KVM: arm64: Use __gfn_to_page() when copying MTE tags
        to/from userspace"."""
        return load_arch_ops(self.ARCH_OPS, arch)

    def dirty_ring_reset(self):
        """``kvm_dirty_ring_reset()`` before v6.17: every harvested entry, no bound, no signal check
        (changed by "KVM: Bail from the dirty ring reset flow if a signal is pending", 49005a2a3d2a, v6.17;
        :attr:`CurrentPolicy <kvmsim.policies.current.CurrentPolicy>`)."""
        from kvmsim.kvm.dirty import kvm_dirty_ring_reset_v612
        return kvm_dirty_ring_reset_v612

    def gmem_supported_flags(self, kvm):
        """``KVM_CREATE_GUEST_MEMFD`` before v6.18 accepts no flag (GUEST_MEMFD_FLAG_MMAP came with "KVM:
        Allow and advertise support for host mmap() on guest_memfd files", 3d3a04fad25a, v6.18)."""
        return 0

    def supports_gmem(self, kvm):
        """KVM_MEM_GUEST_MEMFD before v6.18 needs ``kvm_arch_has_private_mem()`` (x86: a
        KVM_X86_SW_PROTECTED_VM, SEV-SNP or TDX VM); v6.18's ``kvm_arch_supports_gmem()`` ("KVM: x86: Enable
        KVM_GUEST_MEMFD for all 64-bit builds", d1e54dd08f16) takes it on any VM."""
        return kvm.has_private_mem

    def spte_ad_lost(self, kvm, pfn, *, dirty, accessed, caller, gfn=None, n=1):
        """patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying", patch 82 "KVM: x86/mmu: Don't mark "struct page" accessed when zapping SPTEs" (x86) and patch 83 "KVM: arm64: Don't mark "struct page" accessed when making SPTE young", patch 65 "KVM: LoongArch: Mark "struct page" pfns dirty only in "slow" page fault path", patch 66 "KVM: LoongArch: Mark "struct page" pfns accessed only in "slow" page fault path", patch 69 "KVM: MIPS: Mark "struct page" pfns dirty only in "slow" page fault path" and patch 70 "KVM: MIPS: Mark "struct page" pfns accessed only in "slow" page fault path": no struct page is touched from a stage-2 PTE's pfn."""
        return None

    def spte_ad_lost_bulk(self, kvm, pfns, dirty_mask, accessed_mask, caller):
        """patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying" and patch 82 "KVM: x86/mmu: Don't mark "struct page" accessed when zapping SPTEs": nothing, for any number of SPTEs."""
        return None

    def release_faultin_bulk(self, kvm, pfns, writable_mask, caller, gfns=None):
        """Vectorised ``kvm_release_faultin_page()`` for used pages (patch 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()"): dirty iff map_writable,
        then accessed (the GUP reference is modelled as taken and dropped)."""
        from kvmsim.trace import Src
        from kvmsim.kvm.pfn_bulk import mark_page_accessed_bulk, set_page_dirty_bulk
        if writable_mask.all():                           # the usual case: no gathers
            set_page_dirty_bulk(kvm, pfns, caller, Src.HELD, gfns)
        else:
            set_page_dirty_bulk(kvm, pfns[writable_mask], caller, Src.HELD,
                                None if gfns is None else gfns[writable_mask])
        mark_page_accessed_bulk(kvm, pfns, caller, Src.HELD, gfns)

    # ---- x86 make_spte / mmu_set_spte / shadow paging (kvmsim.x86.mmu, kvmsim.x86.paging_tmpl) ----------------
