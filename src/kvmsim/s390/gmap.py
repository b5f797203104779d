"""s390 guest memory: the gmap (arch/s390/mm/gmap.c, arch/s390/kvm/kvm-s390.c; Linux v6.12 and v6.13).

s390 KVM has no stage-2 tables of its own and does not use the stage-2 fault template
(:mod:`kvmsim.kvm.fault`).  A guest's absolute storage is the host process's address space: the
gmap's region and segment tables point at the *host's* page tables (``__gmap_link()`` links a 1 MiB
segment of guest memory to the host PMD of the memslot's hva), so SIE translates guest addresses
through the very PTEs the primary MMU maintains.  A guest access to a page the host has not
faulted in exits SIE with a DAT exception; ``vcpu_post_run_handle_fault()`` →
``kvm_arch_fault_in_page()`` → ``gmap_fault()`` → ``fixup_user_fault()`` makes the host PTE present
and SIE is re-entered.  Neither version calls ``__kvm_faultin_pfn()`` / ``gfn_to_pfn()`` here, takes
a reference, or marks a struct page: the host PTE's young/dirty state is the primary MMU's
(the series changed nothing on this path; kvm-semantics.md §4).  Dirty logging reads the host
PTE's dirty state at ``KVM_GET_DIRTY_LOG`` (``kvm_arch_sync_dirty_log()`` →
``gmap_sync_dirty_log_pmd()`` → ``mark_page_dirty()``).

What the model keeps of it (:class:`S390Gmap`), as a stand-in with the kernel's effects:

* a guest load/store goes through the host page tables at the memslot's hva
  (:meth:`kvmsim.mm.mm.Mm.host_access`): a missing or read-only host PTE is a host page fault,
  which is what ``gmap_fault()``'s ``fixup_user_fault()`` does; no KVM reference, no struct-page mark;
* a guest write sets the gfn in the dirty log right away, standing for the sync that
  ``kvm_arch_sync_dirty_log()`` does from the host PTE's dirty bit at ``KVM_GET_DIRTY_LOG`` time;
* there are no KVM leaves: :meth:`S390Gmap.leaves` is empty, the mmu_notifier finds nothing to zap,
  aging finds nothing young (the host PTE's young bit is the primary MMU's, which the host's aging
  reads itself).

The series' s390 change is elsewhere: the vSIE's pinning of guest 2's control blocks through
``gfn_to_page()`` (:mod:`kvmsim.s390.vsie`).

Not modelled: the gmap's own tables and their 1 MiB segment granularity (``__gmap_link()``,
``gmap_unlink()``, the ``ptep_notify()`` IPTE notifier for shadow gmaps and prefix pages), storage
keys and PGSTEs, CMMA, async page faults (pfault), ucontrol VMs, protected virtualization,
``kvm_arch_prepare_memory_region()``'s 1 MiB alignment and ``mem_limit`` checks, and the exact
guest-visible result of a failed fault: the model reports EFAULT where the kernel either injects an
addressing exception into the guest (``vcpu_post_run_fault_in_sie()``, an address without a
memslot) or returns -EFAULT from KVM_RUN (``fixup_user_fault()`` failing).
"""

from __future__ import annotations

import errno
from typing import Iterator

from kvmsim.errors import ModelError
from kvmsim.kvm.arch import Leaf
from kvmsim.kvm.dirty import mark_page_dirty_in_slot
from kvmsim.kvm.fault import FaultRet
from kvmsim.kvm.pfn import gfn_to_hva_memslot_prot
from kvmsim.mm.gup import fixup_user_fault
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT
from kvmsim.uapi import Access, Exit


class S390Gmap:
    """The s390 "MMU": guest memory through the host page tables, plus the vSIE's pinned pages
    (``kvm->arch.vsie``: :class:`kvmsim.s390.vsie.VsiePage` by SCB address)."""

    name = "s390"
    #: The family :func:`kvmsim.policies.resolve` resolves the VM's hooks for.
    family = "s390"

    def __init__(self, kvm, **opts):
        self.kvm = kvm
        #: ``kvm->arch.vsie.addr_to_page``: the vsie pages by SCB guest address (``get_vsie_page()``).
        self.vsie_pages: dict[int, object] = {}

    # ---- guest accesses and faults -------------------------------------------------------------
    def guest_access(self, vcpu, gpa: int, write: bool, value: int | None) -> Access:
        """A guest load/store: through the host PTE at the memslot's hva, faulting it in the way
        ``gmap_fault()`` → ``fixup_user_fault()`` does; a write marks the gfn dirty in the log
        (``gmap_sync_dirty_log_pmd()``'s effect)."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        slot = kvm.gfn_to_memslot(gfn)
        hva = gfn_to_hva_memslot_prot(slot, gfn, write)
        if hva < 0:                        # __gmap_translate(): -EFAULT, no memslot for this address
            return Access(Exit.EFAULT, gpa, write, value, errno.EFAULT)
        try:
            got = kvm.mm.host_access(hva, write, value)
        except ModelError as e:            # fixup_user_fault() failed
            return Access(Exit.EFAULT, gpa, write, value, e.errno)
        if write:
            mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
        return Access(Exit.OK, gpa, write, got)

    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """Mirrors ``kvm_arch_fault_in_page()`` → ``gmap_fault()``: ``fixup_user_fault()`` on the
        memslot's hva; FIXED, or -EFAULT when there is no memslot or the host fault fails."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        kvm.journal.count("page_fault")
        hva = gfn_to_hva_memslot_prot(kvm.gfn_to_memslot(gfn), gfn, write)
        yield "gmap_fault: __gmap_translate"
        if hva < 0:
            return -errno.EFAULT
        if fixup_user_fault(kvm.mm, hva, write):
            return -errno.EFAULT
        return FaultRet.FIXED

    # ---- the mmu_notifier, aging, memslots: nothing of KVM's own to change -----------------------
    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        """No KVM leaves: SIE uses the host PTEs the primary MMU has just changed."""
        return False

    def age_gfn(self, slot, start: int, end: int) -> bool:
        return False

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        return False

    def flush_on_age(self) -> bool:
        return False

    def flush_shadow_memslot(self, slot) -> None:
        """``kvm_arch_flush_shadow_memslot()`` is empty on s390."""

    def flush_shadow_all(self) -> None:
        """``kvm_arch_flush_shadow_all()`` is empty on s390."""

    def prepare_memory_region(self, old, new, change) -> None:
        """``kvm_arch_prepare_memory_region()``'s 1 MiB alignment and ``mem_limit`` checks are not modelled."""

    def slot_apply_flags(self, old, new, change) -> None:
        """Dirty logging needs no write protection: the host PTE's dirty bit is the log's source."""

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        """Re-arming after KVM_CLEAR_DIRTY_LOG: the host PTE's dirty state was consumed by the sync."""

    def leaves(self) -> Iterator[Leaf]:
        return iter(())
