"""vCPUs and guest memory accesses (virt/kvm/kvm_main.c ``kvm_vcpu_{read,write}_guest``, KVM_RUN exits).

A guest access runs in one of two host-execution modes (``Kvm.execution``):

* ``hardware``: the access goes through the stage-2 tables; a missing or read-only mapping takes
  a stage-2 fault (the arch's ``page_fault``), as on a host with VMX/SVM.
* ``emulated``: the access goes through the memslot's host address (``copy_{from,to}_user``) and
  logs one dirty entry per write, as KVM's instruction emulator does on the development machines
  (kvm-on-these-machines.md §0).  A failing uaccess becomes an MMIO exit, never EFAULT.
"""

from __future__ import annotations

from kvmsim.errors import ModelError
from kvmsim.kvm.pfn import gfn_to_hva_memslot_prot
from kvmsim.types import PAGE_SHIFT
from kvmsim.uapi import Access, Exit  # noqa: F401 (re-exported: the model's guest accesses)


class KvmVcpu:
    """Model of ``struct kvm_vcpu``: what the memory model needs of it."""

    def __init__(self, kvm, vcpu_id: int):
        self.kvm = kvm
        self.vcpu_id = vcpu_id
        self.dirty_ring: list[tuple[int, int]] = []     # (slot id | as_id << 16, offset)
        self.dirty_ring_harvested = 0
        #: The guest's private/shared bit for its accesses (SEV-SNP's C-bit, TDX's shared bit, through the
        #: #NPF / EPT-violation error code's PFERR_PRIVATE_ACCESS); None: a KVM_X86_SW_PROTECTED_VM, where
        #: ``kvm_mmu_page_fault()`` derives it from the gfn's current attributes.
        self.pferr_private: bool | None = None
        #: ``kvm_run.memory_fault`` of the last KVM_EXIT_MEMORY_FAULT (kvmsim.kvm.memory_attributes).
        self.memory_fault = None
        self.apf_enabled = False    # the guest wrote MSR_KVM_ASYNC_PF_EN (kvmsim.kvm.async_pf)

    def access(self, gpa: int, write: bool, value: int | None = None) -> Access:
        if self.kvm.execution == "emulated":
            return self._emulated_access(gpa, write, value)
        return self.kvm.arch.guest_access(self, gpa, write, value)

    def read(self, gpa: int) -> Access:
        return self.access(gpa, False)

    def write(self, gpa: int, value: int) -> Access:
        return self.access(gpa, True, value)

    def _emulated_access(self, gpa: int, write: bool, value: int | None) -> Access:
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        slot = kvm.gfn_to_memslot(gfn)
        hva = gfn_to_hva_memslot_prot(slot, gfn, write)
        if hva < 0:
            return Access(Exit.MMIO, gpa, write, value)
        try:
            got = kvm.mm.host_access(hva, write, value)
        except ModelError as e:
            kvm.journal.count("emulated_mmio_fallback")
            return Access(Exit.MMIO, gpa, write, value, e.errno)
        if write:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, slot, gfn, self)
        return Access(Exit.OK, gpa, write, got)
