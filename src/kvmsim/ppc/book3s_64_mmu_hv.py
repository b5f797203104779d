"""The PowerPC Book3S HV fault path with the hashed page table (arch/powerpc/kvm/book3s_64_mmu_hv.c,
Linux v6.12 and v6.13).

Mirrors ``kvmppc_book3s_hv_page_fault()`` for a guest HPTE that maps the faulting gpa (the guest's
own HPT lookup, ``kvmppc_hv_find_lock_hpte()``, is not modelled: every gpa is taken to have a valid,
writable guest HPTE).  The shape is the template's (:func:`kvmsim.kvm.fault.kvm_stage2_fault`):

* ``mmu_seq = kvm->mmu_invalidate_seq``, then the pfn: v6.12 tries ``get_user_page_fast_only(hva,
  FOLL_WRITE)`` and falls back to ``__gfn_to_pfn_memslot(memslot, gfn, false, false, NULL, writing,
  &write_ok, NULL)``; v6.13 calls ``__kvm_faultin_pfn(memslot, gfn, writing ? FOLL_WRITE : 0,
  &write_ok, &page)`` (patch 60 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s
  HV").  Both reduce to the model's one ``hva_to_pfn()`` (fast GUP for write first);
* the retry check ``mmu_invalidate_retry(vcpu->kvm, mmu_seq)`` runs under ``lock_rmap(rmap)`` with the
  HPTE locked, not under ``kvm->mmu_lock``: the model takes ``mmu_lock`` in its place (the invalidation,
  ``kvm_unmap_rmapp()``, takes both, so the check sees the same sequence).  A retry returns
  RESUME_GUEST;
* after ``preempt_enable()``: ``if (page && hpte_is_writable(r)) set_page_dirty_lock(page);`` and
  ``out_put: if (page) put_page(page);`` (:class:`kvmsim.ppc.book3s.Book3sHvFault`): v6.12 never puts a
  PG_reserved page (the zero page GUP returned for a read fault): INV-1 reports the leaked reference.

Not modelled: the guest HPT and its VRMA, ``hpte_cache_flags_ok()`` (WIMG) and the emulated-MMIO
HPTE path, large host pages (``psize``), the per-gfn rmap chains and R/C harvesting, the "PTE
disappeared" THP-collapse path.
"""

from __future__ import annotations

from kvmsim.kvm.fault import KvmPageFault, kvm_stage2_fault
from kvmsim.ppc.book3s import RESUME_GUEST, Book3sHvFault
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT


class Book3sHvMmu(Book3sHvFault):
    """PowerPC Book3S HV on a hashed page table (POWER7/8, or POWER9 in HPT mode)."""

    name = "ppc-book3s-hv"
    family = "ppc-book3s-hv"
    fault_labels = ("kvmppc_book3s_hv_page_fault: mmu_seq snapshot", "kvmppc_book3s_hv_page_fault: pfn resolved",
                    "kvmppc_book3s_hv_page_fault: unlock_rmap, preempt_enable")
    fault_retry_ret = RESUME_GUEST     # "let the guest retry"
    fault_map_caller = "kvmppc_book3s_hv_page_fault"
    fault_put_caller = "kvmppc_book3s_hv_page_fault"

    @kpath
    def kvmppc_book3s_hv_page_fault(self, vcpu, gpa: int, slot, writing: bool) -> Steps:
        """Mirrors ``kvmppc_book3s_hv_page_fault()`` (v6.12 and v6.13) for a PAGE_SIZE mapping: the
        template with the hooks of :class:`kvmsim.ppc.book3s.Book3sHvFault`.  Returns FIXED, RETRY
        (RESUME_GUEST after ``mmu_invalidate_retry()``) or -EFAULT for an error pfn."""
        r = yield from kvm_stage2_fault.steps(self, KvmPageFault(vcpu, gpa >> PAGE_SHIFT, slot, writing))
        return r

    kvmppc_fault = kvmppc_book3s_hv_page_fault
