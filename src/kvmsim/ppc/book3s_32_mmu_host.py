"""PowerPC Book3S PR on a 32-bit host: ``kvmppc_mmu_map_page()`` (arch/powerpc/kvm/book3s_32_mmu_host.c,
Linux v6.12 and v6.13).

The 32-bit host does not fit the template: it takes no ``mmu_lock`` and checks no
``mmu_invalidate_seq`` (so a racing invalidation can leave a stale shadow HPTE, in both versions).
It resolves the pfn with ``kvmppc_gpa_to_pfn()`` (:meth:`kvmsim.ppc.book3s_pr.Book3sPrMmu.kvmppc_gpa_to_pfn`),
calls ``mark_page_dirty()`` for a writable HPTE, writes the PTEG, then asks the HPTE cache for an
entry::

    pte = kvmppc_mmu_hpte_cache_next(vcpu);
    if (!pte) {
        kvm_release_pfn_clean(hpaddr >> PAGE_SHIFT);      /* v6.13: kvm_release_page_unused(page) */
        r = -EAGAIN;
        goto out;
    }
    ...
    kvmppc_mmu_hpte_cache_map(vcpu, pte);
    kvm_release_pfn_clean(hpaddr >> PAGE_SHIFT);          /* v6.13: kvm_release_page_clean(page) */

Never dirty in either version.  The -EAGAIN release was accessed + put (v6.12) and is put-only since
patch 64 "KVM: PPC: Use kvm_faultin_pfn() to handle page faults on Book3s PR"; the policy's
``release_clean`` hook is that choice (``kvm_release_pfn_clean()`` by guess, or the page-based
``kvm_release_page_clean/unused()``).  The model installs the leaf only together with its cache
entry (the kernel writes the PTEG before ``kvmppc_mmu_hpte_cache_next()`` and leaves it untracked on
-EAGAIN: not modelled).
"""

from __future__ import annotations

from kvmsim.kvm.fault import FaultRet, KvmPageFault
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT


@kpath
def kvmppc_mmu_map_page_32(mmu, vcpu, gpa: int, slot, iswrite: bool) -> Steps:
    """Mirrors ``kvmppc_mmu_map_page()`` of book3s_32_mmu_host.c (module docstring).  Returns FIXED,
    RETRY (-EAGAIN: no HPTE cache entry) or -EINVAL for an error pfn."""
    kvm = mmu.kvm
    fault = KvmPageFault(vcpu, gpa >> PAGE_SHIFT, slot, iswrite)
    r = mmu.fault_faultin(fault)
    if r is not None:
        return r
    yield "kvmppc_mmu_map_page: pfn resolved"
    writable = fault.map_writable and fault.gfn not in mmu.guest_pte_ro
    if writable and slot is not None:
        from kvmsim.kvm.dirty import mark_page_dirty_in_slot
        mark_page_dirty_in_slot(kvm, slot, fault.gfn, vcpu)                    # mark_page_dirty()
    if not mmu.kvmppc_mmu_hpte_cache_next(vcpu):
        kvm.policy.release_clean(kvm, fault.pfn, fault.kfp, caller="kvmppc_mmu_map_page", unused=True)
        return FaultRet.RETRY
    mmu.kvmppc_mmu_hpte_cache_map(vcpu, slot, fault.gfn, fault.pfn, writable, fault.kfp.held is not None)
    kvm.policy.release_clean(kvm, fault.pfn, fault.kfp, caller="kvmppc_mmu_map_page")
    return FaultRet.FIXED

