"""Linux v6.12: KVM guesses from a bare pfn whether a page is refcounted.

Every hook names the series patch that removed the behaviour it models.
"""

from __future__ import annotations

import errno

from kvmsim.kvm.fault import (gstage_map_v612_after_unlock, gstage_map_v612_dirty_before_map,
                              kvm_release_pfn_clean_guess, release_pfn_clean_after_unlock,
                              user_mem_abort_v612_after_unlock)
from kvmsim.kvm.pfn import (KVM_PFN_ERR_FAULT, KVM_PFN_ERR_SIGPENDING, Hold, kvm_pfn_to_refcounted_page,
                            kvm_set_pfn_accessed, kvm_set_pfn_dirty)
from kvmsim.kvm.pfn import kvm_dropped
from kvmsim.policies import load_arch_ops
from kvmsim.trace import Src


class LegacyPolicy:
    name = "legacy"
    title = "v6.12: kvm_pfn_to_refcounted_page guesses, A/D pushed from SPTEs"

    #: The other MMU changes merged for v6.13, outside the series ("[6.13-other]": "KVM: x86/mmu: Don't
    #: flush TLBs when aging SPTEs", huge pages recovered in place when dirty logging is disabled): v6.12
    #: has none of them.
    mmu_613_other = False

    def reported_page(self, kfp):
        """No page output before patch 27 "KVM: Provide refcounted page as output field in struct kvm_follow_pfn"."""
        return None

    def gup_error_pfn(self, rc):
        """Before patch 14 "KVM: Return ERR_SIGPENDING from hva_to_pfn() if GUP returns -EGAIN" only -EINTR became SIGPENDING; -EAGAIN fell through to the VMA lookup."""
        if rc == -errno.EINTR:
            return KVM_PFN_ERR_SIGPENDING
        return None

    def needs_io_pfn(self, kfp):
        """Before patch 16 "KVM: Replace "async" pointer in gfn=>pfn with "no_wait" and error code": FAULT with ``*async = true``."""
        kfp.async_ = True
        return KVM_PFN_ERR_FAULT

    def refuses_unpinned_direct_map(self, kvm):
        """No pin concept before patch 31 "KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()" and patch 35 "KVM: Disallow direct access (w/o mmu_notifier) to unpinned pfn by default": remapped memory is mapped as is."""
        return False

    def remapped_get_ref(self, kvm, pfn, caller):
        """``kvm_try_get_pfn()``: guess the page, then ``get_page_unless_zero()`` (CVE-2021-22543 fix
        f8be156be163); removed by patch 85 "KVM: Don't grab reference on VM_MIXEDMAP pfns that have a "struct page""."""
        page = kvm_pfn_to_refcounted_page(kvm.phys, pfn)
        if page is None:
            return True, Hold.NONE
        if not kvm.phys.get_page_unless_zero(page, caller, kvm=True, source=Src.REMAPPED):
            return False, Hold.NONE
        return True, Hold.GET

    def fault_release(self, arch):
        """Each arch's v6.12 order, all after ``mmu_lock`` is dropped: x86 ``kvm_release_pfn_clean()``
        (moved under the lock by patch 40 "KVM: x86/mmu: Add helper to "finish" handling a guest page
        fault"); arm64 ``kvm_set_pfn_dirty()`` + ``kvm_release_pfn_clean()`` (patch 55 "KVM: arm64: Mark
        "struct page" pfns accessed/dirty before dropping mmu_lock"); RISC-V dirty before the map (patch 57
        "KVM: RISC-V: Mark "struct page" pfns dirty iff a stage-2 PTE is installed") and accessed + release
        after the unlock (patch 58 "KVM: RISC-V: Mark "struct page" pfns accessed before dropping
        mmu_lock"); LoongArch and MIPS in their folders (patch 65 "KVM: LoongArch: Mark "struct page" pfns
        dirty only in "slow" page fault path", patch 67 "KVM: LoongArch: Mark "struct page" pfn accessed
        before dropping mmu_lock", patch 69 "KVM: MIPS: Mark "struct page" pfns dirty only in "slow" page
        fault path", patch 71 "KVM: MIPS: Mark "struct page" pfns accessed prior to dropping mmu_lock"); Book3S PR accessed + dirty before taking
        the lock and ``kvm_release_pfn_clean()`` after it (patch 63 "KVM: PPC: Book3S: Mark "struct page" pfns dirty/accessed after installing PTE");
        Book3S HV / Radix release by themselves (:meth:`arch_ops`);
        PPC e500 ``kvmppc_e500_ref_setup()`` marks accessed and (guest-writable) dirty under
        the lock and ``kvm_release_pfn_clean()`` follows the unlock (patch 52 "KVM: PPC: e500: Mark
        "struct page" dirty in kvmppc_e500_shadow_map()", patch 53 "KVM: PPC: e500: Mark "struct page"
        pfn accessed before dropping mmu_lock")."""
        if arch == "arm64":
            return None, user_mem_abort_v612_after_unlock, None
        if arch == "riscv":
            return None, gstage_map_v612_after_unlock, gstage_map_v612_dirty_before_map
        if arch == "loongarch":         # patches 65, 67, 68 (kvmsim.loongarch.mmu)
            from kvmsim.loongarch.mmu import kvm_map_page_v612_after_unlock
            return None, kvm_map_page_v612_after_unlock, None
        if arch == "mips":              # patches 69, 71, 72 (kvmsim.mips.mmu)
            from kvmsim.mips.mmu import kvm_mips_map_page_v612_after_unlock, kvm_mips_map_page_v612_dirty_before_map
            return None, kvm_mips_map_page_v612_after_unlock, kvm_mips_map_page_v612_dirty_before_map
        if arch in ("ppc-book3s-hv", "ppc-book3s-radix"):
            return None, None, None        # set_page_dirty_lock() + put_page() after the unlock: arch_ops
        if arch == "ppc-book3s-pr":
            from kvmsim.ppc.book3s_pr import kvmppc_mmu_map_page_v612_marks
            return None, release_pfn_clean_after_unlock, kvmppc_mmu_map_page_v612_marks
        if arch == "ppc-e500":
            from kvmsim.ppc.e500_versions import kvmppc_e500_ref_setup_v612, kvmppc_e500_shadow_map_v612_after_unlock
            return None, kvmppc_e500_shadow_map_v612_after_unlock, kvmppc_e500_ref_setup_v612
        return None, release_pfn_clean_after_unlock, None

    def fault_release_bulk(self):
        """The x86 bulk fault releases after unlocking, by ``kvm_release_pfn_clean()`` (patch 40 "KVM:
        x86/mmu: Add helper to "finish" handling a guest page fault" moved it under the lock)."""
        return self.release_faultin_bulk, False, "kvm_release_pfn_clean"

    def _release_by_guess(self, kvm, pfn, kfp, *, dirty, caller, unused, gfn=None):
        kvm_release_pfn_clean_guess(kvm, pfn, kfp, unused=unused, caller=caller, gfn=gfn)

    def release_faultin(self, kvm, pfn, kfp, *, unused, dirty, caller, gfn=None):
        """``kvm_release_pfn_clean(pfn)`` after unlock for every outcome, RETRY included (patch 48 "KVM: x86/mmu: Don't mark unused faultin pages as accessed"
        changed that); never dirty (x86 captured D from
        SPTEs at zap time until patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when
        zapping/modifying"; arm64 called ``kvm_set_pfn_dirty()`` itself just before, also
        after unlocking, until patch 55 "KVM: arm64: Mark "struct page" pfns accessed/dirty before
        dropping mmu_lock")."""
        self._release_by_guess(kvm, pfn, kfp, dirty=False, caller=caller, unused=unused, gfn=gfn)

    def release_clean(self, kvm, pfn, kfp, *, caller, unused=False):
        """pfncache before patch 29 "KVM: pfncache: Precisely track refcounted pages" (and Book3S PR on a
        32-bit host before patch 64 "KVM: PPC: Use kvm_faultin_pfn() to handle page faults on Book3s PR"):
        ``kvm_release_pfn_clean(pfn)`` on retry and on success."""
        self._release_by_guess(kvm, pfn, kfp, dirty=False, caller=caller, unused=unused)

    def release_prefetched(self, kvm, pfn, caller):
        """Direct prefetch before patch 38 "KVM: x86/mmu: Put direct prefetched pages via kvm_release_page_clean()": ``put_page()`` only, no A/D."""
        kvm_dropped(kvm, pfn, Hold.GET, caller)
        kvm.phys.put_page(pfn, caller, kvm=True, source=Src.HELD)

    def gfn_to_page_write(self, write):
        """Before patch 76 "KVM: Add support for read-only usage of gfn_to_page()" gfn_to_page() always resolved for write."""
        return True

    def gfn_to_page_result(self, kvm, pfn, kfp):
        """``kvm_pfn_to_refcounted_page(pfn)``, including VM_MIXEDMAP/VM_IO pages ref'd by
        ``kvm_try_get_pfn`` (patch 85 "KVM: Don't grab reference on VM_MIXEDMAP pfns that have a "struct page"" made remapped pfns NULL, through patch 75 "KVM: Convert gfn_to_page() to use kvm_follow_pfn()")."""
        return kvm_pfn_to_refcounted_page(kvm.phys, pfn)

    def vcpu_map_pins(self):
        """FOLL_GET before patch 31 "KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()"."""
        return False

    def vcpu_map_write(self, writable):
        """``kvm_vcpu_map()`` resolved with ``gfn_to_pfn()``, always for write, before patch 34 "KVM: Get
        writable mapping for __kvm_vcpu_map() only when necessary" (and ``kvm_vcpu_map_readonly()``)."""
        return True

    def vcpu_map_dirty_at_map(self):
        """The caller decided ``dirty`` at unmap time before patch 33 "KVM: Pass in write/dirty to kvm_vcpu_map(), not kvm_vcpu_unmap()"."""
        return False

    #: Each arch's own v6.12 callables (``kvm.ops.arch_ops``), beyond the fault's release.
    ARCH_OPS = {
        "x86": "kvmsim.x86.versions:X86_V612",
        "arm64": "kvmsim.arm64.versions:ARM64_V612",
        "loongarch": "kvmsim.loongarch.mmu:LOONGARCH_V612",
        "s390": "kvmsim.s390.vsie:S390_V612",
        "ppc-e500": "kvmsim.ppc.e500_versions:E500_V612",
        "ppc-book3s-hv": "kvmsim.ppc.book3s_ops:BOOK3S_V612",
        "ppc-book3s-radix": "kvmsim.ppc.book3s_ops:BOOK3S_V612",
        "ppc-book3s-pr": "kvmsim.ppc.book3s_ops:BOOK3S_V612",
    }

    def arch_ops(self, arch):
        """The arch's v6.12 namespace from :attr:`ARCH_OPS`: x86's APIC-access page (patch 36 "KVM: x86: Don't
        fault-in APIC access page during initial allocation", patch 50 "KVM: VMX: Hold mmu_lock until page is
        released when updating APIC access page") and nested APIC-access unmap (patch 32 "KVM: nVMX: Mark
        vmcs12's APIC access page dirty when unmapping"), arm64's THP refcount transfer (patch 56 "KVM:
        arm64: Use __kvm_faultin_pfn() to handle memory aborts") and MTE tag pages (patch 77 "KVM: arm64: Use
        __gfn_to_page() when copying MTE tags to/from userspace"), LoongArch's fast-path reference (patch 66
        "KVM: LoongArch: Mark "struct page" pfns accessed only in "slow" page fault path"), s390's vSIE unpin
        (patch 80 "KVM: s390: Use kvm_release_page_dirty() to unpin "struct page" memory"), PPC e500's pfn
        lookup (patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults"), PPC Book3S's
        HV / Radix release (patch 60 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s HV",
        patch 61 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s Radix"), dcbz patching
        (patch 73 "KVM: PPC: Remove extra get_page() to fix page refcount leak", patch 74 "KVM: PPC: Use
        kvm_vcpu_map() to map guest memory to patch dcbz instructions") and uvmem (patch 78 "KVM: PPC:
        Explicitly require struct page memory for Ultravisor sharing")."""
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
        """x86 pushed A/D from SPTE bits to the pfn when zapping/modifying/aging (removed by patch 8
        "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying" and patch 82
        "KVM: x86/mmu: Don't mark "struct page" accessed when zapping SPTEs"); arm64's
        ``handle_access_fault()`` marked the young PTE's pfn accessed after unlocking (removed by patch 83
        "KVM: arm64: Don't mark "struct page" accessed when making SPTE young"); the LoongArch and MIPS fast
        paths marked the PTE's pfn (patch 65 "KVM: LoongArch: Mark "struct page" pfns dirty only in "slow"
        page fault path", patch 66 "KVM: LoongArch: Mark "struct page" pfns accessed only in "slow" page
        fault path", patch 69 "KVM: MIPS: Mark "struct page" pfns dirty only in "slow" page fault path",
        patch 70 "KVM: MIPS: Mark "struct page" pfns accessed only in "slow" page fault path")."""
        for _ in range(n):
            if dirty:
                kvm_set_pfn_dirty(kvm, pfn, caller, source=Src.SPTE, gfn=gfn)
            if accessed:
                kvm_set_pfn_accessed(kvm, pfn, caller, source=Src.SPTE, gfn=gfn)

    def spte_ad_lost_bulk(self, kvm, pfns, dirty_mask, accessed_mask, caller):
        """Vectorised :meth:`spte_ad_lost`: one ``kvm_set_pfn_dirty/accessed`` per SPTE whose bit is lost
        (patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying" and
        patch 82 "KVM: x86/mmu: Don't mark "struct page" accessed when zapping SPTEs" removed them)."""
        from kvmsim.kvm.pfn_bulk import mark_page_accessed_bulk, set_page_dirty_bulk
        set_page_dirty_bulk(kvm, pfns if dirty_mask.all() else pfns[dirty_mask], caller, Src.SPTE)
        if accessed_mask.any():
            mark_page_accessed_bulk(kvm, pfns if accessed_mask.all() else pfns[accessed_mask], caller, Src.SPTE)

    def release_faultin_bulk(self, kvm, pfns, writable_mask, caller, gfns=None):
        """Vectorised :meth:`release_faultin` for faults that used a page: ``kvm_release_pfn_clean()``
        by guess, i.e. mark accessed only (the GUP reference is modelled as taken and dropped); dirty at
        release came only with patch 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()"."""
        from kvmsim.kvm.pfn_bulk import mark_page_accessed_bulk
        mark_page_accessed_bulk(kvm, pfns, caller, Src.GUESS, gfns)

    # ---- x86 make_spte / mmu_set_spte / shadow paging (kvmsim.x86.mmu, kvmsim.x86.paging_tmpl) ----------------
