"""The PowerPC Book3S HV fault path with a radix partition-scoped page table
(arch/powerpc/kvm/book3s_64_mmu_radix.c, Linux v6.12 and v6.13).

Mirrors ``kvmppc_book3s_radix_page_fault()``, ``kvmppc_book3s_instantiate_page()`` and
``kvmppc_create_pte()`` for PAGE_SIZE leaves, on the template
(:func:`kvmsim.kvm.fault.kvm_stage2_fault`):

* ``mmu_seq = kvm->mmu_invalidate_seq``; the pfn: v6.12 ``get_user_page_fast_only(hva, FOLL_WRITE)``
  (``upgrade_write = true``) else ``__gfn_to_pfn_memslot(memslot, gfn, false, false, NULL, writing,
  upgrade_p, NULL)``; v6.13 ``__kvm_faultin_pfn(memslot, gfn, writing ? FOLL_WRITE : 0,
  &upgrade_write, &page)`` (patch 61 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on
  Book3s Radix"; patch 62 "KVM: PPC: Drop unused @kvm_ro param from kvmppc_book3s_instantiate_page()"
  only drops a parameter);
* the PTE is writable (and dirty) iff ``writing || upgrade_write`` and the host PTE is;
  ``kvmppc_create_pte()`` takes ``spin_lock(&kvm->mmu_lock)``, returns -EAGAIN on
  ``mmu_invalidate_retry(kvm, mmu_seq)`` and installs the PTE otherwise, then unlocks;
* back in ``kvmppc_book3s_instantiate_page()``, after the unlock and in both versions: ``if (page) {
  if (!ret && (pte_val(pte) & _PAGE_WRITE)) set_page_dirty_lock(page); put_page(page); }``
  (:class:`kvmsim.ppc.book3s.Book3sHvFault`); v6.12's page is NULL for a PG_reserved pfn, so a GUP'd
  zero page is never put (INV-1 leak).  ``kvmppc_book3s_radix_page_fault()`` turns 0 and -EAGAIN into
  RESUME_GUEST.

Secure guests (``KVMPPC_SECURE_INIT_DONE``) send the page to the Ultravisor instead:
:mod:`kvmsim.ppc.book3s_hv_uvmem`.

Not modelled: 2 MiB / 1 GiB PTEs (``large_enable``, the PUD/PMD shift of the host PTE), nested guests
(``kvmhv_nested_*``), ``DSISR_SET_RC`` (``kvmppc_hv_handle_set_rc()``), the "PTE disappeared" path
(``__find_linux_pte()`` NULL after a THP collapse: put and RESUME_GUEST).
"""

from __future__ import annotations

from kvmsim.kvm.fault import KvmPageFault, kvm_stage2_fault
from kvmsim.ppc.book3s import EAGAIN, Book3sHvFault
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT


class Book3sRadixMmu(Book3sHvFault):
    """PowerPC Book3S HV in radix mode (POWER9 and later)."""

    name = "ppc-book3s-radix"
    family = "ppc-book3s-radix"
    fault_labels = ("kvmppc_book3s_instantiate_page: mmu_seq snapshot",
                    "kvmppc_book3s_instantiate_page: pfn resolved", "kvmppc_create_pte: spin_unlock(mmu_lock)")
    fault_retry_ret = EAGAIN           # kvmppc_create_pte(): "if (mmu_invalidate_retry(kvm, mmu_seq)) ret = -EAGAIN"
    fault_map_caller = "kvmppc_create_pte"
    fault_put_caller = "kvmppc_book3s_instantiate_page"

    @kpath
    def kvmppc_book3s_instantiate_page(self, vcpu, gpa: int, memslot, writing: bool) -> Steps:
        """Mirrors ``kvmppc_book3s_instantiate_page()`` (v6.12 and v6.13) for a PAGE_SIZE PTE: the template
        with :class:`kvmsim.ppc.book3s.Book3sHvFault`'s hooks.  Returns FIXED, RETRY (-EAGAIN) or
        -EFAULT for an error pfn."""
        r = yield from kvm_stage2_fault.steps(self, KvmPageFault(vcpu, gpa >> PAGE_SHIFT, memslot, writing))
        return r

    kvmppc_fault = kvmppc_book3s_instantiate_page
