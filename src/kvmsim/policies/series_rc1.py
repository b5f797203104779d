"""Linux v6.13-rc1 .. rc6: the series as merged, before Paolo Bonzini's e500 fixes in v6.13-rc7.

Identical to :class:`~kvmsim.policies.series.SeriesPolicy` on every architecture but PPC e500, where
patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults" passed a NULL ``writable`` to
``__kvm_faultin_pfn()``: its ``WARN_ON_ONCE(!writable || !refcounted_page)`` returned KVM_PFN_ERR_FAULT,
so every e500 shadow map that was not TLB1 over VM_PFNMAP failed with -EINVAL ("real page not found")
and guests did not boot (reported by Christian Zigotzky; fixed by "[PATCH v2 0/5] KVM: e500: map
readonly host pages for read, and cleanup", 87ecfdbc699c .. 55f4db79c4d9).
"""

from __future__ import annotations

from kvmsim.policies.series import SeriesPolicy


class SeriesRc1Policy(SeriesPolicy):
    name = "series-rc1"
    title = "v6.13-rc1..rc6: the series as posted (PPC e500 passes writable=NULL)"

    def arch_faultin(self, arch):
        """PPC e500 as posted in patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page
        faults": ``__kvm_faultin_pfn(slot, gfn, FOLL_WRITE, NULL, &page)`` WARNs and fails; the TLB1
        VM_PFNMAP bypass still skips it.  Every other arch: the series'."""
        if arch == "ppc-e500":
            from kvmsim.ppc.e500_versions import kvmppc_e500_shadow_map_faultin_rc1
            return kvmppc_e500_shadow_map_faultin_rc1
        return super().arch_faultin(arch)
