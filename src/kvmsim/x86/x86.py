"""What x86 KVM does around a guest access outside the MMU (arch/x86/kvm/x86.c, v6.12 and v6.13): the
instruction emulator's uaccess on RET_PF_EMULATE, and KVM_RUN's exit for a guest load/store."""

from __future__ import annotations

from kvmsim.kvm.fault import kvm_guest_access, ret_to_access
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.types import PAGE_SHIFT
from kvmsim.x86.private_mem import kvm_mmu_private_access_faults


def x86_emulate_instruction(vcpu, gpa: int, write: bool, value: int | None) -> Access:
    """What ``x86_emulate_instruction()`` does with the guest load/store that faulted with RET_PF_EMULATE
    (arch/x86/kvm/x86.c, v6.12 and v6.13; the series does not touch it).

    ``kvm_mmu_page_fault()`` emulates on RET_PF_EMULATE: no memslot, a write to a READONLY slot, and
    ``kvm_handle_error_pfn()``'s KVM_PFN_ERR_RO_FAULT -- a write to a VM_PFNMAP page whose host PTE is
    present but read-only (``hva_to_pfn_remapped()`` does not try a write fault then).  The emulator's
    ``emulator_read_write_onepage()`` first tries ``emulator_{read,write}_phys()`` →
    ``kvm_vcpu_{read,write}_guest()`` → ``__copy_{from,to}_user()`` on the memslot's hva
    (``gfn_to_hva_memslot()``: an error hva for no slot or a READONLY write).  That uaccess takes a
    host write fault like any user store: ``do_wp_page()`` → ``wp_pfn_shared()`` calls the driver's
    ``->pfn_mkwrite`` (mm/memory.c), so a driver that accepts write faults makes the PTE writable and
    the store lands (``mark_page_dirty_in_slot()`` follows).  Only if the copy fails does
    ``vcpu_mmio_write()`` find no in-kernel device and the access become KVM_EXIT_MMIO
    (``complete_emulated_mmio``, ``is_write`` = the access).  This is the uaccess path the model's
    ``execution="emulated"`` takes for every access (:class:`kvmsim.kvm.vcpu.KvmVcpu`).
    """
    return vcpu._emulated_access(gpa, write, value)


def x86_guest_access(mmu, vcpu, gpa: int, write: bool, value: int | None) -> Access:
    """A guest load/store (:func:`kvmsim.kvm.fault.kvm_guest_access`); KVM_RUN's -EFAULT is a
    KVM_EXIT_MEMORY_FAULT when the fault prepared one (``vcpu->run->memory_fault``).  An access whose
    declared private/shared bit disagrees with the gfn's attribute faults even over a present SPTE (a TDX
    shared-bit alias has its own EPT; an SNP C-bit mismatch is an #NPF), so it exits."""
    vcpu.memory_fault = None
    acc = None
    if vcpu.pferr_private is not None and kvm_mmu_private_access_faults(mmu.kvm, vcpu, gpa >> PAGE_SHIFT):
        acc = ret_to_access(int(mmu.page_fault(vcpu, gpa, write)), gpa, write, value)
    if acc is None:
        acc = kvm_guest_access(mmu, vcpu, gpa, write, value)
    if vcpu.memory_fault is not None and acc.exit in (Exit.EFAULT, Exit.HWPOISON):
        acc.exit = Exit.MEMORY_FAULT       # -EFAULT, or kvm_gmem_get_pfn()'s -EHWPOISON: no SIGBUS, an exit
    return acc
