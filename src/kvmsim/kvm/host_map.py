"""``kvm_vcpu_map`` / ``kvm_vcpu_unmap``: direct kernel access to guest memory without mmu_notifier
protection (virt/kvm/kvm_main.c).  Used by nested VMX/SVM, the SEV-ES GHCB and PPC dcbz patching.

Legacy takes FOLL_GET (and ``kvm_try_get_pfn`` on remapped memory, which it maps unprotected);
the series pins with FOLL_PIN and refuses remapped memory unless ``allow_unsafe_mappings`` (patches
31 and 35).  The map keeps working on the pfn it got, whatever the host does afterwards: that is
what INV-6 is about.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from kvmsim.kvm.pfn import (Hold, KvmFollowPfn, gfn_to_hva_memslot_prot, is_error_noslot_pfn, kvm_dropped,
                            kvm_follow_pfn, kvm_pfn_to_refcounted_page, kvm_release_pfn)
from kvmsim.mm.gup import FOLL
from kvmsim.trace import Src


@dataclass
class KvmHostMap:
    """Model of ``struct kvm_host_map``."""

    vcpu: object
    gfn: int
    pfn: int
    hva: int
    writable: bool
    pinned_page: int | None      # series: the page KVM pinned
    page: int | None             # the struct page (kmap'd), None if memremap'd
    hold: Hold
    remapped: bool


def kvm_vcpu_map(vcpu, gfn: int, writable: bool = True) -> KvmHostMap:
    """``kvm_vcpu_map()`` (series ``__kvm_vcpu_map(..., writable)``); raises ModelError(EINVAL/EFAULT)."""
    from kvmsim.errors import ModelError
    kvm = vcpu.kvm
    pins = kvm.policy.vcpu_map_pins()
    slot = kvm.gfn_to_memslot(gfn)
    write = kvm.policy.vcpu_map_write(writable)
    kfp = KvmFollowPfn(slot, gfn, flags=FOLL.WRITE if write else FOLL(0), pin=pins, caller="kvm_vcpu_map")
    pfn = kvm_follow_pfn(kvm, kfp)
    kvm.journal.count("kvm_vcpu_map")
    if is_error_noslot_pfn(pfn):
        raise ModelError(errno.EINVAL, f"kvm_vcpu_map(gfn {gfn:#x}): resolution failed")
    hva = gfn_to_hva_memslot_prot(slot, gfn, False)
    page = pfn if kvm.phys.pfn_valid(pfn) else None
    m = KvmHostMap(vcpu, gfn, pfn, hva, writable, kfp.held if pins else None, page, kfp.hold, kfp.remapped)
    kvm.host_maps.append(m)
    kvm.journal.fact("vcpu_map", pfn=pfn, gfn=gfn, kvm=True, caller="kvm_vcpu_map",
                     extra={"pinned": m.pinned_page is not None, "remapped": kfp.remapped, "hold": kfp.hold.value})
    return m


def kvm_vcpu_map_access(m: KvmHostMap, write: bool, value: int | None = None) -> int:
    """KVM reads or writes the mapped page through its kernel mapping (kmap / memremap)."""
    kvm = m.vcpu.kvm
    kvm.journal.count("host_map_access")
    if kvm.phys.is_poisoned(m.pfn):
        kvm.journal.fact("map_uaf", pfn=m.pfn, gfn=m.gfn, kvm=True, caller="kvm_host_map access",
                         detail="KVM accesses a freed page through kvm_host_map")
    if write:
        kvm.phys.write(m.pfn, int(value or 0), "kvm_host_map write", kvm=True)
        return int(value or 0)
    return kvm.phys.read(m.pfn, "kvm_host_map read", kvm=True)


def kvm_vcpu_unmap(vcpu, m: KvmHostMap, dirty: bool = False) -> None:
    """``kvm_vcpu_unmap()``: mark the gfn dirty and release the page.

    Legacy: ``dirty`` is the caller's word at unmap time, and the page is released by pfn guess.
    Series: ``map->writable`` decides (at map time) and the pinned page is unpinned.
    """
    from kvmsim.kvm.dirty import mark_page_dirty_in_slot
    from kvmsim.kvm.pfn import kvm_is_ad_tracked_page
    kvm = vcpu.kvm
    if m not in kvm.host_maps:
        return
    kvm.host_maps.remove(m)
    dirty = m.writable if kvm.policy.vcpu_map_dirty_at_map() else dirty
    if dirty:
        mark_page_dirty_in_slot(kvm, kvm.gfn_to_memslot(m.gfn), m.gfn, vcpu)
    if kvm.policy.vcpu_map_pins():
        page = m.pinned_page
        if page is None:
            return
        if dirty and kvm_is_ad_tracked_page(kvm.phys, page):
            kvm.phys.SetPageDirty(page, "kvm_vcpu_unmap", kvm=True, source=Src.HELD)
        if kvm_is_ad_tracked_page(kvm.phys, page):
            kvm.phys.mark_page_accessed(page, "kvm_vcpu_unmap", kvm=True, source=Src.HELD)
        kvm_dropped(kvm, page, Hold.PIN, "kvm_vcpu_unmap")
        kvm.phys.unpin_user_page(page, "kvm_vcpu_unmap", kvm=True)
    else:
        if kvm_pfn_to_refcounted_page(kvm.phys, m.pfn) is None and m.hold != Hold.NONE:
            kvm.journal.fact("guess_mismatch", pfn=m.pfn, kvm=True, caller="kvm_vcpu_unmap")
        kvm_release_pfn(kvm, m.pfn, dirty, "kvm_vcpu_unmap")
