"""x86's per-policy callables beyond the fault's release, resolved once per VM into ``kvm.ops.arch_ops``
(:func:`kvmsim.policies.resolve`): ``make_spte()`` / ``mmu_set_spte()`` and indirect prefetch
(arch/x86/kvm/mmu/spte.c, mmu.c, paging_tmpl.h), the VMX APIC-access page (arch/x86/kvm/vmx/vmx.c, x86.c)
and the nested VMX maps (arch/x86/kvm/vmx/nested.c)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvmsim.kvm.fault import kvm_release_pfn_clean_guess
from kvmsim.kvm.pfn import Hold, kvm_release_page_dirty
from kvmsim.x86.vmx import (apic_access_page_prefault_v612, apic_access_release_v612_unlocked,
                            apic_access_release_v613_locked)


def make_spte_skip_unsync_v612(old_writable, old_leaf):
    """v6.12 ``make_spte()``: ``if (is_writable_pte(old_spte)) goto out;`` -- any writable old SPTE,
    a page-table (non-leaf) SPTE included, skips ``mmu_try_to_unsync_pages()`` and the D bit (changed by
    patch 4 "KVM: x86/mmu: Skip the "try unsync" path iff the old SPTE was a leaf SPTE")."""
    return old_writable


def prefetch_present_spte_v612(kvm, slot, gfn):
    """v6.12 ``mmu_set_spte()`` / ``tdp_mmu_map_handle_target_level()``: a prefetch (KVM_PRE_FAULT_MEMORY,
    async #PF completion, FNAME(prefetch_gpte)) rewrites a present SPTE prefetch-style, A cleared (patch
    5 "KVM: x86/mmu: Don't overwrite shadow-present MMU SPTEs when prefaulting" stopped it)."""
    return None


def make_spte_accessed_v612(prefetch, synchronizing):
    """v6.12 ``make_spte()``: Accessed iff ``!prefetch``; ``FNAME(sync_spte)`` passes prefetch=true, so a
    synchronized SPTE loses A (patch 7 "KVM: x86/mmu: Mark new SPTE as Accessed when synchronizing
    existing SPTE")."""
    return not prefetch


def release_prefetched_gpte_v612(kvm, pfn, kfp, caller):
    """v6.12 ``FNAME(prefetch_gpte)``: ``gfn_to_pfn_memslot_atomic()`` then ``kvm_release_pfn_clean(pfn)``
    by guess, accessed + put (patch 10 "KVM: x86/mmu: Use gfn_to_page_many_atomic() when prefetching
    indirect PTEs", then patch 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()")."""
    kvm_release_pfn_clean_guess(kvm, pfn, kfp, unused=False, caller=caller)


def make_spte_skip_unsync_v613(old_writable, old_leaf):
    """patch 4 "KVM: x86/mmu: Skip the "try unsync" path iff the old SPTE was a leaf SPTE": only a
    writable *leaf* skips ``mmu_try_to_unsync_pages()`` and D; a huge leaf replacing a page table runs the
    check and gets D."""
    return old_writable and old_leaf


def prefetch_present_spte_v613(kvm, slot, gfn):
    """patch 5 "KVM: x86/mmu: Don't overwrite shadow-present MMU SPTEs when prefaulting": RET_PF_SPURIOUS,
    the SPTE and the folio untouched."""
    from kvmsim.x86.mmu_internal import RET_PF
    kvm.journal.count("spurious")
    kvm.journal.count("prefetch_present_spurious")
    return RET_PF.SPURIOUS


def make_spte_accessed_v613(prefetch, synchronizing):
    """patch 7 "KVM: x86/mmu: Mark new SPTE as Accessed when synchronizing existing SPTE": Accessed iff
    ``!prefetch || synchronizing``."""
    return not prefetch or synchronizing


def release_prefetched_gpte_v613(kvm, pfn, kfp, caller):
    """``FNAME(prefetch_gpte)`` through ``kvm_mmu_prefetch_sptes()`` with n=1 (patch 10 "KVM: x86/mmu: Use
    gfn_to_page_many_atomic() when prefetching indirect PTEs", patch 11 "KVM: Rename
    gfn_to_page_many_atomic() to kvm_prefetch_pages()", patch 39 "KVM: x86/mmu: Add common helper to
    handle prefetching SPTEs"): ``kvm_release_page_dirty()`` (patch 41 "KVM: x86/mmu: Mark pages/folios
    dirty at the origin of make_spte()")."""
    kvm_release_page_dirty(kvm, pfn, Hold.GET, caller)


@dataclass(frozen=True)
class X86Ops:
    """x86's per-policy callables (``kvm.ops.arch_ops``)."""

    #: ``(kvm, gfn)``: ``kvm_alloc_apic_access_page()``'s fault-in of the new page (v6.12); None: none
    #: (patch 36 "KVM: x86: Don't fault-in APIC access page during initial allocation").
    apic_access_page_prefault: Callable | None
    #: ``(kvm, pfn, kfp)``: ``vmx_set_apic_access_page_addr()``'s release before / after ``read_unlock()``
    #: (patch 50 "KVM: VMX: Hold mmu_lock until page is released when updating APIC access page").
    apic_access_release_locked: Callable | None
    apic_access_release_unlocked: Callable | None
    #: The ``dirty`` ``nested_put_vmcs12_pages()`` passes for vmcs12's APIC-access page
    #: (patch 32 "KVM: nVMX: Mark vmcs12's APIC access page dirty when unmapping").
    nested_apic_access_unmap_dirty: bool
    #: ``make_spte()``: ``(old_writable, old_leaf) -> bool``, skip ``mmu_try_to_unsync_pages()`` and D (patch 4).
    make_spte_skip_unsync: Callable
    #: ``mmu_set_spte()`` / ``tdp_mmu_map_handle_target_level()`` on a present SPTE for a prefetch:
    #: ``(kvm, slot, gfn) -> RET_PF_SPURIOUS or None`` (None: overwrite it; patch 5).
    prefetch_present_spte: Callable
    #: ``make_spte()``: ``(prefetch, synchronizing) -> bool``, whether the new SPTE is Accessed (patch 7).
    make_spte_accessed: Callable
    #: ``FNAME(prefetch_gpte)``'s release of its page: ``(kvm, pfn, kfp, caller)`` (patches 10, 41).
    release_prefetched_gpte: Callable


X86_V612 = X86Ops(apic_access_page_prefault=apic_access_page_prefault_v612, apic_access_release_locked=None,
                  apic_access_release_unlocked=apic_access_release_v612_unlocked, nested_apic_access_unmap_dirty=False,
                  make_spte_skip_unsync=make_spte_skip_unsync_v612, prefetch_present_spte=prefetch_present_spte_v612,
                  make_spte_accessed=make_spte_accessed_v612, release_prefetched_gpte=release_prefetched_gpte_v612)
X86_V613 = X86Ops(apic_access_page_prefault=None, apic_access_release_locked=apic_access_release_v613_locked,
                  apic_access_release_unlocked=None, nested_apic_access_unmap_dirty=True,
                  make_spte_skip_unsync=make_spte_skip_unsync_v613, prefetch_present_spte=prefetch_present_spte_v613,
                  make_spte_accessed=make_spte_accessed_v613, release_prefetched_gpte=release_prefetched_gpte_v613)
