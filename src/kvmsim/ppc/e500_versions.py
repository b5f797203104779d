"""What ``kvmppc_e500_shadow_map()`` did differently in v6.12, v6.13-rc1 .. rc6 and v6.13
(arch/powerpc/kvm/e500_mmu_host.c): the functions the policies resolve for ``arch = "ppc-e500"``.

* v6.12 (policy "legacy"): :func:`kvmppc_e500_shadow_map_faultin_v612`,
  :func:`kvmppc_e500_ref_setup_v612` (under the lock, before the shadow entry) and
  :func:`kvmppc_e500_shadow_map_v612_after_unlock`;
* v6.13-rc1 .. rc6 (policy "series-rc1"): :func:`kvmppc_e500_shadow_map_faultin_rc1`, then the
  series release (``kvm_release_faultin_page()`` under the lock);
* v6.13 (policy "series"): :func:`kvmppc_e500_shadow_map_faultin`, then the series release.

The series patches: 52 "KVM: PPC: e500: Mark "struct page" dirty in kvmppc_e500_shadow_map()" (the
second accessed mark goes, dirty moves out of ``kvmppc_e500_ref_setup()``), 53 "KVM: PPC: e500: Mark
"struct page" pfn accessed before dropping mmu_lock" (the release moves under the lock), 54 "KVM: PPC:
e500: Use __kvm_faultin_pfn() to handle page faults" (as posted with a NULL ``writable``, so
``__kvm_faultin_pfn()``'s ``WARN_ON_ONCE(!writable || !refcounted_page)`` returns KVM_PFN_ERR_FAULT:
the regression Christian Zigotzky reported), and Paolo Bonzini's v6.13-rc7 fixes ("[PATCH v2 0/5] KVM:
e500: map readonly host pages for read, and cleanup": 87ecfdbc699c "KVM: e500: always restore irqs",
e97fbb43fb1b "KVM: e500: use shadow TLB entry as witness for writability", f2104bf22f04 "KVM: e500:
track host-writability of pages", 03b755b2aa48 "KVM: e500: map readonly host pages for read",
55f4db79c4d9 "KVM: e500: perform hugepage check after looking up the PFN").
"""

from __future__ import annotations

from kvmsim.kvm.fault import KvmPageFault, _held_src, kvm_release_pfn_clean_guess
from kvmsim.kvm.pfn import KVM_PFN_ERR_FAULT, KvmFollowPfn, _kvm_faultin_pfn, kvm_set_pfn_accessed, kvm_set_pfn_dirty
from kvmsim.mm.gup import FOLL
from kvmsim.ppc.e500_mmu_host import tlbe_is_writable


def kvmppc_e500_shadow_map_faultin_v612(kvm, mmu, fault):
    """v6.12: TLB1 over a VM_PFNMAP VMA takes ``pfn = vm_pgoff + ...`` with no reference
    (:meth:`~kvmsim.ppc.e500_mmu_host.E500Mmu.kvmppc_e500_tlb1_pfnmap`); anything else
    ``gfn_to_pfn_memslot(slot, gfn)``: write fault, ``writable`` NULL.  The host's permission is not
    asked, so the shadow entry is as writable as the guest's MAS3 (replaced by patch 54 "KVM: PPC:
    e500: Use __kvm_faultin_pfn() to handle page faults" and 03b755b2aa48 "KVM: e500: map readonly
    host pages for read")."""
    bypass = mmu.kvmppc_e500_tlb1_pfnmap(fault)
    if bypass is not None:
        return bypass
    pfn, kfp = _kvm_faultin_pfn(kvm, fault.slot, fault.gfn, FOLL.WRITE, want_writable=False,
                                caller="gfn_to_pfn_memslot")
    kfp.map_writable = True
    return pfn, kfp


def kvmppc_e500_shadow_map_faultin_rc1(kvm, mmu, fault):
    """v6.13-rc1 .. rc6, patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults" as
    posted: the TLB1 VM_PFNMAP bypass is unchanged, anything else calls ``__kvm_faultin_pfn(slot, gfn,
    FOLL_WRITE, NULL, &page)``, whose ``WARN_ON_ONCE(!writable || !refcounted_page)`` returns
    KVM_PFN_ERR_FAULT before any lookup: "real page not found", -EINVAL, on every such map."""
    bypass = mmu.kvmppc_e500_tlb1_pfnmap(fault)
    if bypass is not None:
        return bypass
    kvm.journal.count("WARN_ON:__kvm_faultin_pfn")
    return KVM_PFN_ERR_FAULT, KvmFollowPfn(fault.slot, fault.gfn, flags=FOLL.WRITE, caller="__kvm_faultin_pfn")


def kvmppc_e500_shadow_map_faultin(kvm, mmu, fault):
    """v6.13: ``__kvm_faultin_pfn(slot, gfn, FOLL_WRITE, &writable, &page)`` for every entry, VM_PFNMAP
    included (no reference on it), the TLB1 size from ``find_linux_pte()``'s psize under the lock (03b755b2aa48
    "KVM: e500: map readonly host pages for read", 55f4db79c4d9 "KVM: e500: perform hugepage check after
    looking up the PFN", fixing patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults")."""
    fault.tsize = None
    return _kvm_faultin_pfn(kvm, fault.slot, fault.gfn, FOLL.WRITE, caller="__kvm_faultin_pfn")


def kvmppc_e500_ref_setup_v612(kvm, fault) -> None:
    """v6.12 ``kvmppc_e500_ref_setup()``, under ``mmu_lock``: "Mark the page accessed"
    (``kvm_set_pfn_accessed(pfn)``) and ``if (tlbe_is_writable(gtlbe)) kvm_set_pfn_dirty(pfn)`` -- on
    any pfn, the TLB1 VM_PFNMAP one included (patch 52 "KVM: PPC: e500: Mark "struct page" dirty in
    kvmppc_e500_shadow_map()" dropped the accessed mark and moved the dirty one out)."""
    src = _held_src(fault.kfp)
    kvm_set_pfn_accessed(kvm, fault.pfn, "kvmppc_e500_ref_setup", source=src, gfn=fault.gfn)
    if tlbe_is_writable(fault.gtlbe.mas3):
        kvm_set_pfn_dirty(kvm, fault.pfn, "kvmppc_e500_ref_setup", source=src, gfn=fault.gfn)


def kvmppc_e500_shadow_map_v612_after_unlock(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.12 ``out: spin_unlock(&kvm->mmu_lock); kvm_release_pfn_clean(pfn);`` on every path that took
    the lock (-EAGAIN and "pte not present" included), also for the TLB1 VM_PFNMAP pfn it never took
    a reference on: the guess puts the page if it has a refcounted struct page (patch 53 "KVM: PPC:
    e500: Mark "struct page" pfn accessed before dropping mmu_lock" moved it under the lock, patch 54
    "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults" made it the page it got)."""
    kvm_release_pfn_clean_guess(kvm, fault.pfn, fault.kfp, unused=fault.ret != 0, caller="kvm_release_pfn_clean",
                                gfn=fault.gfn)
