"""Pieces every PowerPC Book3S profile shares (arch/powerpc/kvm/book3s.c, book3s_64_mmu_hv.c,
book3s_64_mmu_radix.c; Linux v6.12 and v6.13).

* :class:`Book3sMmu`: the leaves of the three profiles on :class:`kvmsim.kvm.stage2.GenericStage2`
  storage (HV's hashed page table, Radix's partition-scoped tree and PR's shadow HPTEs all become one
  4 KiB leaf per gfn), ``kvm->mmu_lock`` as a spinlock (PowerPC has no KVM_HAVE_MMU_RWLOCK) and the
  whole-VM ``mmu_invalidate_retry()``;
* :class:`Book3sHvFault`: the template hooks HV (hash) and Radix share, above all their common tail
  after the lock is dropped, in both versions::

      if (page) {
          if (!ret && (pte_val(pte) & _PAGE_WRITE))     /* HV: hpte_is_writable(r) */
              set_page_dirty_lock(page);
          put_page(page);
      }

  What ``page`` is differs (patch 60 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on
  Book3s HV", patch 61 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s Radix"):
  v6.12's private rule ``page = pfn_valid(pfn) && !PageReserved(page) ? pfn_to_page(pfn) : NULL``
  (:func:`kvmppc_v612_page_to_put`) never puts a PG_reserved page GUP took a reference on (the zero
  page on a read fault, ZONE_DEVICE pages): a reference leak; v6.13 puts the ``refcounted_page``
  ``__kvm_faultin_pfn()`` reports (:func:`kvmppc_faultin_page_to_put`).  The policy picks one through
  :class:`Book3sOps` (``kvm.ops.arch_ops``);
* :class:`Book3sOps`: the per-policy callables of the Book3S profiles (HV/Radix page to put, dcbz
  patching, Ultravisor page lookups), resolved once per VM by ``Policy.arch_ops()``;
* ``get_page()`` / ``put_page()`` / ``set_page_dirty_lock()`` as Book3S calls them directly.

``set_page_dirty_lock()`` after the unlock is not a KVM A/D mark under ``mmu_lock``: it is how a GUP
user dirties a page it holds (the folio lock keeps truncation out), and v6.13 still does it, so it is
recorded outside ``journal.fault_release()`` and INV-3 does not judge it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Callable

from kvmsim.kvm.fault import FaultRet, KvmPageFault
from kvmsim.kvm.pfn import Hold, kvm_acquired, kvm_dropped
from kvmsim.kvm.stage2 import S2, GenericStage2
from kvmsim.sched import Steps, kpath
from kvmsim.trace import Src
from kvmsim.types import PAGE_SHIFT

_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))

#: arch/powerpc/include/asm/kvm_ppc.h
RESUME_GUEST = 0
EAGAIN = -errno.EAGAIN


@dataclass(frozen=True)
class Book3sOps:
    """The Book3S profiles' per-policy callables (``kvm.ops.arch_ops``)."""

    #: ``(kvm, fault) -> page | None``: the page HV / Radix dirty and put after the unlock.
    page_to_put: Callable
    #: ``(vcpu, gpa) -> None``: ``kvmppc_patch_dcbz()`` (Book3S PR).
    kvmppc_patch_dcbz: Callable
    #: ``(kvm, gfn) -> (pfn | None, release(unused))``: what ``uv_page_in()`` is given, and its release.
    uv_gfn_to_pfn: Callable


# ---- struct page operations Book3S calls directly -----------------------------------------------------

def get_page(kvm, page: int, caller: str) -> None:
    """``get_page()`` by KVM itself (the ghost ledger records the reference)."""
    kvm.phys.get_page(page, caller, kvm=True, source=Src.HELD)
    kvm_acquired(kvm, page, Hold.GET, caller)


def put_page(kvm, page: int, caller: str) -> None:
    """``put_page()`` of a reference KVM holds (the ghost ledger drops it)."""
    kvm_dropped(kvm, page, Hold.GET, caller)
    kvm.phys.put_page(page, caller, kvm=True, source=Src.HELD)


def put_gfn_to_page(kvm, page: int, caller: str) -> None:
    """``put_page()`` of a page ``gfn_to_page()`` returned: its reference leaves ``kvm->page_refs_out``."""
    n = kvm.page_refs_out.get(page, 0)
    if n <= 1:
        kvm.page_refs_out.pop(page, None)
    else:
        kvm.page_refs_out[page] = n - 1
    put_page(kvm, page, caller)


def set_page_dirty_lock(kvm, page: int, gfn: int) -> None:
    """Mirrors ``set_page_dirty_lock()`` (mm/page-writeback.c): ``folio_lock()``, ``folio_mark_dirty()``,
    ``folio_unlock()``, on a page the caller holds (module docstring: not a fault-release mark)."""
    kvm.phys.SetPageDirty(page, "set_page_dirty_lock", kvm=True, source=Src.HELD, locked=kvm.mmu_lock.held(),
                          gfn=gfn)


# ---- the page HV / Radix put, per version ----------------------------------------------------------------

def kvmppc_v612_page_to_put(kvm, fault: KvmPageFault) -> int | None:
    """v6.12 ``kvmppc_book3s_hv_page_fault()`` / ``kvmppc_book3s_instantiate_page()``: after their own
    ``get_user_page_fast_only(hva, FOLL_WRITE)`` failed, ``__gfn_to_pfn_memslot()`` and then ``page =
    NULL; if (pfn_valid(pfn)) { page = pfn_to_page(pfn); if (PageReserved(page)) page = NULL; }``: a
    reserved page GUP referenced (the zero page, ZONE_DEVICE) is never put.  Removed by patch 60 "KVM:
    PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s HV" and patch 61 "KVM: PPC: Use
    __kvm_faultin_pfn() to handle page faults on Book3s Radix"."""
    pfn, phys = fault.pfn, kvm.phys
    if not phys.pfn_valid(pfn) or phys.PageReserved(pfn):
        return None
    return pfn


def kvmppc_faultin_page_to_put(kvm, fault: KvmPageFault) -> int | None:
    """v6.13 ``__kvm_faultin_pfn(memslot, gfn, writing ? FOLL_WRITE : 0, &write_ok, &page)``: the
    refcounted page KVM holds, reserved or not (patch 60 "KVM: PPC: Use __kvm_faultin_pfn() to handle
    page faults on Book3s HV", patch 61 "KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on
    Book3s Radix")."""
    return fault.kfp.refcounted_page


def kvmppc_error_pfn(pfn: int) -> int:
    """``if (is_error_noslot_pfn(pfn)) return -EFAULT;`` (HV and Radix, any error pfn)."""
    return -errno.EFAULT


# ---- leaves ------------------------------------------------------------------------------------------

class Book3sMmu(GenericStage2):
    """A Book3S profile's leaves: present, writable (``W`` = Host-writable: a leaf becomes writable only
    through a fault), referenced (``A``) and changed (``D``); no page is marked when one is removed
    (``kvmppc_unmap_pte()``, ``kvm_unmap_rmapp()`` and PR's ``invalidate_pte()`` update only KVM's
    dirty map in either version)."""

    fault_lock_read = False            # spin_lock(&kvm->mmu_lock)
    fault_faultin_nowait = False       # one blocking faultin, no lockless pre-check
    fault_logging_write_only = False
    fault_retry_per_gfn = False        # mmu_invalidate_retry(kvm, mmu_seq): the whole VM
    fault_stale_invalid_slot = False

    def book3s_install_leaf(self, slot, gfn: int, pfn: int, writable: bool, held: bool, caller: str) -> None:
        """Write one leaf (referenced; changed and writable iff ``writable``) and record it."""
        kvm = self.kvm
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        pfns[i] = pfn
        bits[i] = _P | _A | ((_W | _HW | _D) if writable else 0) | (_H if held else 0)
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller=caller, locked=kvm.mmu_lock.held(),
                         extra={"writable": writable, "host_writable": writable})
        if writable:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, slot, gfn, None)

    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """A present leaf lets a load through, a writable one a store; the hardware sets R (and C)."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        if b & _P and (not write or b & _W):
            bits[i] |= _A | (_D if write else 0)
            return True
        return False

    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """No struct page is touched when a Book3S leaf goes, in either version."""

    def flush_on_age(self) -> bool:
        """Only x86 elides the young flush (KVM_ELIDE_TLB_FLUSH_IF_YOUNG)."""
        return True


class Book3sHvFault(Book3sMmu):
    """The fault hooks HV (hash) and Radix share: ``__kvm_faultin_pfn()`` (v6.13) or the v6.12 code it
    replaced, one leaf writable iff the host page is (``write_ok`` / ``upgrade_write``), and the tail
    after the lock (module docstring)."""

    handle_error_pfn = staticmethod(kvmppc_error_pfn)

    def __init__(self, kvm, **opts):
        super().__init__(kvm, **opts)
        #: XIVE native event queues: server → the queue page (:mod:`kvmsim.ppc.book3s_xive_native`).
        self.xive_queues: dict[int, int] = {}

    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """The guest's storage interrupt as ``kvmppc_book3s_hv_page_fault()`` and
        ``kvmppc_book3s_radix_page_fault()`` take it: no memslot (or an invalid one) is emulated MMIO
        (``kvmppc_hv_emulate_mmio()``); a store to a read-only memslot is reflected to the guest as a DSI
        (``kvmppc_core_queue_data_storage()``, counted, and returned as an exit the access does not
        complete); otherwise the profile's ``kvmppc_fault`` (HV's own fault, Radix's
        ``kvmppc_book3s_instantiate_page()``)."""
        kvm = self.kvm
        slot = kvm.gfn_to_memslot(gpa >> PAGE_SHIFT)
        kvm.journal.count("page_fault")
        if slot is None or slot.invalid:
            kvm.journal.count("kvmppc_hv_emulate_mmio")
            return FaultRet.EMULATE
        if write and slot.readonly:
            kvm.journal.count("kvmppc_core_queue_data_storage")
            return FaultRet.EMULATE
        r = yield from self.kvmppc_fault.steps(vcpu, gpa, slot, write)
        return r

    def fault_map(self, fault: KvmPageFault) -> int:
        """Install the leaf (``kvmppc_create_pte()`` / the HPTE update) and ``ret = 0``."""
        self.book3s_install_leaf(fault.slot, fault.gfn, fault.pfn, fault.map_writable,
                                 fault.kfp.hold != Hold.NONE, self.fault_map_caller)
        fault.ret = 0
        return FaultRet.FIXED

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """Nothing maps the page after a retry (ghost truth: the kernel passes no ``unused``)."""
        return fault.retry

    def fault_after_unlock(self, fault: KvmPageFault) -> None:
        """``if (page) { if (!ret && writable) set_page_dirty_lock(page); put_page(page); }`` with the
        page the policy says this version holds (:class:`Book3sOps`)."""
        kvm = self.kvm
        page = kvm.ops.arch_ops.page_to_put(kvm, fault)
        if page is None:
            return
        if not fault.retry and fault.map_writable:
            set_page_dirty_lock(kvm, page, fault.gfn)
        put_page(kvm, page, self.fault_put_caller)
