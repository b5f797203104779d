"""guest_memfd (virt/kvm/guest_memfd.c): private memory that is not mapped into the VMM.

``kvm_gmem_get_pfn`` returns a folio with a reference held; the legacy caller got only the pfn and
released by guess, the series also returns the page (patches 45/46).  Punch-hole invalidates the
bound memslots' mappings directly (no host mmu_notifier is involved).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import EHWPOISON, ModelError
from kvmsim.kvm.pfn import Hold, KvmFollowPfn, kvm_acquired
from kvmsim.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP



class GuestMemfd:
    """A guest_memfd file: its page cache and the memslots bound to it."""

    def __init__(self, kvm, size: int, flags: int = 0):
        if flags & ~(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED):
            raise ModelError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: unknown flags {flags:#x}")
        if size <= 0 or size % 4096:
            raise ModelError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: size {size:#x} not page aligned")
        self.kvm = kvm
        self.flags = flags
        self.npages = size // 4096
        self.pages = np.full(self.npages, -1, dtype=np.int64)
        self.bindings: list = []
        self.owner_id = kvm.phys.register_owner(self)
        self.hwpoison: set[int] = set()


def kvm_gmem_bind(kvm, gmem: GuestMemfd | None, offset: int, npages: int) -> None:
    if not isinstance(gmem, GuestMemfd):
        raise ModelError(errno.EBADF, "KVM_MEM_GUEST_MEMFD needs a guest_memfd created on this VM")
    if gmem.kvm is not kvm:
        raise ModelError(errno.EINVAL, "guest_memfd belongs to another VM")
    if offset // 4096 + npages > gmem.npages:
        raise ModelError(errno.EINVAL, "guest_memfd range past the file's size")


def kvm_gmem_get_pfn(kvm, slot, gfn: int) -> tuple[int, KvmFollowPfn]:
    """``kvm_gmem_get_pfn()``: allocate or find the folio, return its pfn with a reference held."""
    gmem = slot.gmem_file
    index = slot.gmem_pgoff + (gfn - slot.base_gfn)
    if index in gmem.hwpoison:
        raise ModelError(EHWPOISON, f"guest_memfd index {index} is poisoned")
    pfn = int(gmem.pages[index])
    if pfn < 0:
        pfn = kvm.phys.alloc(owner=gmem.owner_id, index=index)
        gmem.pages[index] = pfn
    kvm.phys.get_page(pfn, "kvm_gmem_get_pfn", kvm=True)
    kvm_acquired(kvm, pfn, Hold.GET, "kvm_gmem_get_pfn")
    kfp = KvmFollowPfn(slot, gfn, caller="kvm_gmem_get_pfn")
    kfp.held, kfp.hold, kfp.map_writable = pfn, Hold.GET, not slot.readonly
    kfp.refcounted_page = kvm.policy.reported_page(kfp)
    return pfn, kfp


def kvm_gmem_punch_hole(kvm, gmem: GuestMemfd, index: int, npages: int) -> None:
    """``kvm_gmem_punch_hole()``: invalidate bound slots under mmu_lock, then free the folios."""
    kvm.mmu_lock.write_lock()
    kvm.mmu_invalidate_begin()
    for slots in kvm.memslots:
        for slot in slots:
            if slot.gmem_file is gmem:
                g0 = slot.base_gfn + max(0, index - slot.gmem_pgoff)
                g1 = slot.base_gfn + min(slot.npages, index + npages - slot.gmem_pgoff)
                if g0 < g1:
                    kvm.mmu_invalidate_range_add(g0, g1)
                    kvm.arch.unmap_gfn_range(slot, g0, g1, reason="gmem punch hole")
    kvm.mmu_lock.write_unlock()
    for i in range(index, min(index + npages, gmem.npages)):
        pfn = int(gmem.pages[i])
        if pfn >= 0:
            kvm.phys.put_page(pfn, "kvm_gmem_punch_hole")
            gmem.pages[i] = -1
    kvm.mmu_lock.write_lock()
    kvm.mmu_invalidate_end()
    kvm.mmu_lock.write_unlock()
