"""x86 private memory: the guest_memfd half of the page fault and the memory-attribute hooks
(arch/x86/kvm/mmu/mmu.c ``kvm_mmu_faultin_pfn()``'s private/shared check, ``kvm_mmu_faultin_pfn_private()``
(v6.12: ``kvm_faultin_pfn_private()``), ``kvm_max_level_for_order()``, ``kvm_max_private_mapping_level()``,
``kvm_mmu_prepare_memory_fault_exit()``, ``kvm_arch_pre_set_memory_attributes()``,
``kvm_arch_post_set_memory_attributes()`` with ``hugepage_has_attrs()`` / ``hugepage_test_mixed()``;
Linux v6.12 and v6.13).

A private fault takes the same template (:func:`kvmsim.kvm.fault.kvm_stage2_fault`) as a shared one;
only the pfn comes from ``kvm_gmem_get_pfn()`` instead of ``__kvm_faultin_pfn()``, ``map_writable`` is
"not a READONLY slot", and the mapping level is capped by the gmem folio's order (always 4K: the
folios are order 0 in both kernels).  What differs between the protocols is the release, through the
VM's resolved hooks like every other fault:

* v6.12: ``kvm_faultin_pfn_private()`` returned only the pfn; the fault ended with
  ``kvm_release_pfn_clean(fault->pfn)`` after ``mmu_lock`` (the page guessed from the pfn, marked
  accessed, never dirtied); the folio was dirtied only when a zap found the SPTE's D bit
  (``handle_changed_spte()`` → ``kvm_set_pfn_dirty()``).
* v6.13: ``kvm_gmem_get_pfn()`` also returns the page (patch 46 "KVM: guest_memfd: Provide "struct page"
  as output from kvm_gmem_get_pfn()"), stored in ``fault->refcounted_page`` and released by
  ``kvm_mmu_finish_page_fault()`` → ``kvm_release_faultin_page(kvm, page, r == RET_PF_RETRY,
  fault->map_writable)`` under ``mmu_lock`` (patch 47 "KVM: x86/mmu: Put refcounted pages instead of
  blindly releasing pfns"): dirty at fault finish whenever the slot is writable, a read fault
  included (patch 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()"); zaps no
  longer dirty (patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying").

The private/shared check (after the ``mmu_seq`` snapshot, so a racing conversion is caught by
``is_page_fault_stale()``)::

    fault->is_private   (error code PFERR_PRIVATE_ACCESS: C-bit / shared bit, or the
                         SW_PROTECTED VM's current attributes)
    != kvm_mem_is_private(kvm, gfn)  →  KVM_EXIT_MEMORY_FAULT {gpa, PAGE_SIZE, PRIVATE?}, -EFAULT
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.kvm.memory_attributes import (kvm_get_memory_attributes, kvm_mem_is_private,
                                          kvm_prepare_memory_fault_exit, kvm_range_has_memory_attributes,
                                          kvm_slot_can_be_private)
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT, PAGE_SIZE

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
#: ``KVM_HPAGE_GFN_SHIFT(level)``: the order of a level's huge page.
_LEVEL_ORDER = {PG_LEVEL_2M: 9, PG_LEVEL_1G: 18}


def kvm_max_level_for_order(order: int) -> int:
    """Mirrors ``kvm_max_level_for_order()``: the largest level a folio of ``order`` can back."""
    if order >= _LEVEL_ORDER[PG_LEVEL_1G]:
        return PG_LEVEL_1G
    if order >= _LEVEL_ORDER[PG_LEVEL_2M]:
        return PG_LEVEL_2M
    return PG_LEVEL_4K


def kvm_max_private_mapping_level(kvm, pfn: int, max_level: int, gmem_order: int) -> int:
    """Mirrors ``kvm_max_private_mapping_level()``: ``min(max_level, kvm_max_level_for_order())``; the
    vendor's ``private_max_mapping_level()`` (SNP's RMP, TDX) is absent for a SW-protected VM."""
    if max_level == PG_LEVEL_4K:
        return PG_LEVEL_4K
    return min(kvm_max_level_for_order(gmem_order), max_level)


def kvm_mmu_prepare_memory_fault_exit(fault) -> None:
    """Mirrors ``kvm_mmu_prepare_memory_fault_exit()``: the fault's gfn as a PAGE_SIZE memory fault exit."""
    if fault.vcpu is not None:
        kvm_prepare_memory_fault_exit(fault.vcpu, fault.gfn << PAGE_SHIFT, PAGE_SIZE, fault.write, fault.exec,
                                      fault.is_private)


def kvm_mmu_fault_is_private(kvm, vcpu, gfn: int) -> bool:
    """``fault->is_private`` (``kvm_mmu_do_page_fault()``: ``err & PFERR_PRIVATE_ACCESS``): the guest's
    C-bit / shared bit if it declared one (``vcpu.pferr_private``), else, as ``kvm_mmu_page_fault()``
    computes it for a KVM_X86_SW_PROTECTED_VM, the gfn's current attributes."""
    private = None if vcpu is None else vcpu.pferr_private
    if private is None:
        return bool(kvm.mem_attr_array) and kvm_mem_is_private(kvm, gfn)
    return private


def page_fault_can_be_fast(kvm, is_private: bool, gfn: int) -> bool:
    """The private half of ``page_fault_can_be_fast()``: "For hardware-protected VMs ... don't attempt
    the fast path" when ``fault->is_private != kvm_mem_is_private()`` (it would call the fault spurious
    instead of exiting)."""
    return is_private == (bool(kvm.mem_attr_array) and kvm_mem_is_private(kvm, gfn))


def kvm_mmu_private_access_faults(kvm, vcpu, gfn: int) -> bool:
    """A guest access that declared its private/shared bit (``vcpu.pferr_private``) and disagrees with
    the gfn's attribute cannot use the SPTE of the other kind: it takes the fault (and exits)."""
    return vcpu.pferr_private != (bool(kvm.mem_attr_array) and kvm_mem_is_private(kvm, gfn))


def kvm_mmu_private_mismatch(mmu, fault) -> bool:
    """``kvm_mmu_faultin_pfn()``: "Now that we have a snapshot of mmu_invalidate_seq we can check for a
    private vs. shared mismatch" -- true (and the exit prepared) when the access and the attribute differ."""
    kvm = mmu.kvm
    if fault.is_private == (bool(kvm.mem_attr_array) and kvm_mem_is_private(kvm, fault.gfn)):
        return False
    kvm_mmu_prepare_memory_fault_exit(fault)
    kvm.journal.count("private_shared_mismatch")
    return True


def kvm_mmu_faultin_pfn_private(mmu, fault) -> int | None:
    """Mirrors ``kvm_mmu_faultin_pfn_private()`` (v6.12 ``kvm_faultin_pfn_private()``), after
    ``kvm_mmu_faultin_pfn()``'s lockless ``mmu_invalidate_retry_gfn_unsafe()``: a memslot without
    guest_memfd, or a ``kvm_gmem_get_pfn()`` error, is a memory fault exit with that error; else the pfn,
    the folio reference, ``map_writable = !(slot->flags & KVM_MEM_READONLY)``.  None when the fault goes on.
    (The level cap, ``kvm_max_private_mapping_level()``, is applied at map time by
    :func:`kvm_mmu_max_mapping_level_attrs`, from the same folio order.)"""
    from kvmsim.kvm.gmem import kvm_gmem_get_pfn
    kvm = mmu.kvm
    slot = fault.slot
    if not kvm_slot_can_be_private(slot):
        kvm_mmu_prepare_memory_fault_exit(fault)
        return -errno.EFAULT
    try:
        pfn, kfp, _max_order = kvm_gmem_get_pfn(kvm, slot, fault.gfn)
    except ModelError as e:
        kvm_mmu_prepare_memory_fault_exit(fault)
        return -e.errno
    fault.pfn, fault.kfp = pfn, kfp
    fault.map_writable = not slot.readonly
    return None


# ---- huge pages: the attributes' mixed tracking ------------------------------------------------------

def _mixed_cache(kvm) -> dict:
    cache = getattr(kvm.arch, "lpage_mixed", None)
    if cache is None:
        cache = kvm.arch.lpage_mixed = {}
    return cache


def hugepage_has_attrs(kvm, gfn: int, level: int, attrs: int) -> bool:
    """Mirrors ``hugepage_has_attrs()``: a 2M page whose every gfn has ``attrs``; a 1G page whose 2M pages
    are not mixed and each has ``attrs``."""
    n = LEVEL_PAGES[level]
    if level == PG_LEVEL_2M:
        return kvm_range_has_memory_attributes(kvm, gfn, gfn + n, ~0, attrs)
    step = LEVEL_PAGES[level - 1]
    return all(not hugepage_test_mixed(kvm, g, level - 1) and kvm_get_memory_attributes(kvm, g) == attrs
               for g in range(gfn, gfn + n, step))


def hugepage_test_mixed(kvm, gfn: int, level: int) -> bool:
    """Mirrors ``hugepage_test_mixed()``: the ``KVM_LPAGE_MIXED_FLAG`` of the level's huge page holding
    ``gfn``.  The kernel keeps the flag in ``lpage_info`` and updates it in
    :func:`kvm_arch_post_set_memory_attributes` (and at memslot creation); the model derives it from the
    attributes the first time it is asked and caches it until the next conversion (the same flag)."""
    n = LEVEL_PAGES[level]
    head = gfn // n * n
    cache = _mixed_cache(kvm)
    key = (level, head)
    mixed = cache.get(key)
    if mixed is None:
        mixed = cache[key] = not hugepage_has_attrs(kvm, head, level, kvm_get_memory_attributes(kvm, head))
    return mixed


def kvm_mmu_max_mapping_level_attrs(mmu, slot, gfn: int, pfn: int, level: int) -> int:
    """The attribute half of ``kvm_mmu_hugepage_adjust()`` → ``__kvm_mmu_max_mapping_level()``: a private
    gfn of a guest_memfd slot maps at ``kvm_max_private_mapping_level()`` (the gmem folio order, not the
    host mapping); any gfn drops below a level whose huge page is mixed (``lpage_info->disallow_lpage``'s
    KVM_LPAGE_MIXED_FLAG).  ``level`` is what the shared path computed (host level, slot alignment)."""
    kvm = mmu.kvm
    if kvm_slot_can_be_private(slot) and kvm_mem_is_private(kvm, gfn):
        index = slot.gmem_pgoff + (gfn - slot.base_gfn)
        level = kvm_max_private_mapping_level(kvm, pfn, mmu.max_level, slot.gmem_file.folio_order(index))
        kvm.journal.count("private_max_level")
    if level > PG_LEVEL_4K and kvm.mem_attr_array:
        top = level
        while level > PG_LEVEL_4K and hugepage_test_mixed(kvm, gfn, level):
            level -= 1
        if level != top:
            kvm.journal.count("hugepage_mixed")
    return level


def kvm_arch_pre_set_memory_attributes(mmu, slot, start: int, end: int) -> bool:
    """Mirrors ``kvm_arch_pre_set_memory_attributes()``: "Zap SPTEs even if the slot can't be mapped
    PRIVATE" -- ``kvm_unmap_gfn_range()``; true asks for a flush."""
    return bool(mmu.unmap_gfn_range(slot, start, end, reason="kvm_arch_pre_set_memory_attributes"))


def kvm_arch_post_set_memory_attributes(mmu, slot, start: int, end: int, attrs: int) -> bool:
    """Mirrors ``kvm_arch_post_set_memory_attributes()``: recompute the mixed flags of the huge pages the
    converted range touches (2M first: "upper levels consume the result of lower level's scanning").
    The model drops the cached flags so :func:`hugepage_test_mixed` recomputes them; never a flush."""
    cache = _mixed_cache(mmu.kvm)
    cache.clear()
    mmu.kvm.journal.count("kvm_arch_post_set_memory_attributes")
    return False
