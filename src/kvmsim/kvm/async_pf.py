"""Async page faults: the x86 fault's way out when the page needs I/O (virt/kvm/async_pf.c
``kvm_setup_async_pf()`` / ``async_pf_execute()``, arch/x86/kvm/mmu/mmu.c ``__kvm_mmu_faultin_pfn()``,
arch/x86/kvm/x86.c ``kvm_can_do_async_pf()``; v6.12 and v6.13 alike).

``kvm_faultin_pfn()`` first resolves with FOLL_NOWAIT.  When the page needs I/O (a swapped-out anonymous
page, a file page not in the page cache) v6.12 set ``*async`` and returned KVM_PFN_ERR_FAULT, v6.13
returns KVM_PFN_ERR_NEEDS_IO (patch 16 "KVM: Replace "async" pointer in gfn=>pfn with "no_wait" and error
code", a refactor).  Either way x86 then asks ``kvm_can_do_async_pf()``: if the guest enabled async #PF
(MSR_KVM_ASYNC_PF_EN, the scenario's ``[vm] async_pf = true``) KVM queues the I/O on a worker, injects
"page not present" and the fault returns RET_PF_RETRY; otherwise it resolves again, blocking
(FOLL_INTERRUPTIBLE).

Model: the worker (``async_pf_execute()``: ``get_user_pages_remote(FOLL_WRITE)`` with no page array, so no
reference) runs to completion before the vCPU re-enters; the "page ready" injection and its prefetch
fault (``kvm_arch_async_page_ready()``) are not modelled: the vCPU's next access faults the page in
through GUP-fast.  A repeated fault on a gfn whose work is queued (``kvm_find_async_pf_gfn()``) cannot
happen here, since the work never stays queued.
"""

from __future__ import annotations


def kvm_can_do_async_pf(vcpu) -> bool:
    """``kvm_can_do_async_pf()``: the guest enabled async #PF (the model's ``vcpu.apf_enabled``)."""
    return vcpu is not None and vcpu.apf_enabled


def async_pf_execute(kvm, hva: int) -> None:
    """Mirrors ``async_pf_execute()``: ``get_user_pages_remote(mm, addr, 1, FOLL_WRITE, NULL, &locked)``,
    i.e. fault the page in for write and keep no reference; a failure is ignored."""
    from kvmsim.mm.fault import handle_mm_fault
    mm = kvm.mm
    vma = mm.vma_lookup(hva)
    if vma is not None:
        handle_mm_fault(mm, vma, hva, True)


def kvm_arch_setup_async_pf(vcpu, fault) -> bool:
    """Mirrors ``kvm_arch_setup_async_pf()`` -> ``kvm_setup_async_pf()``: queue the work for the fault's
    hva; True when queued (the fault then returns RET_PF_RETRY)."""
    from kvmsim.kvm.pfn import gfn_to_hva_memslot_prot
    kvm = vcpu.kvm
    hva = gfn_to_hva_memslot_prot(fault.slot, fault.gfn, False)
    if hva < 0:
        return False
    kvm.journal.count("async_pf")
    async_pf_execute(kvm, hva)
    return True
