"""x86's per-policy callables beyond the fault, resolved once per VM into ``kvm.ops.arch_ops``
(:func:`kvmsim.policies.resolve`): the VMX APIC-access page (arch/x86/kvm/vmx/vmx.c, x86.c) and the nested
VMX maps (arch/x86/kvm/vmx/nested.c)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvmsim.x86.vmx import (apic_access_page_prefault_v612, apic_access_release_v612_unlocked,
                            apic_access_release_v613_locked)


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


X86_V612 = X86Ops(apic_access_page_prefault=apic_access_page_prefault_v612, apic_access_release_locked=None,
                  apic_access_release_unlocked=apic_access_release_v612_unlocked, nested_apic_access_unmap_dirty=False)
X86_V613 = X86Ops(apic_access_page_prefault=None, apic_access_release_locked=apic_access_release_v613_locked,
                  apic_access_release_unlocked=None, nested_apic_access_unmap_dirty=True)
