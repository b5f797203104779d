"""guest_memfd (virt/kvm/guest_memfd.c, Linux v6.12, v6.13 and v6.18): private memory that is not mapped
into the VMM -- and, since v6.18, memory the VMM may mmap() (GUEST_MEMFD_FLAG_MMAP) and that serves a
memslot's shared faults too.

The flags KVM_CREATE_GUEST_MEMFD accepts are the protocol's (``kvm.ops.gmem_supported_flags``): none
before v6.18; MMAP and, on a VM without private memory, INIT_SHARED in v6.18 ("KVM: Allow and advertise
support for host mmap() on guest_memfd files", 3d3a04fad25a; "KVM: guest_memfd: Add INIT_SHARED flag,
reject user page faults if not set", fe2bf6234e94).  A memslot bound to an mmap-able file is "gmem only"
(``KVM_MEMSLOT_GMEM_ONLY``, "KVM: guest_memfd: Track guest_memfd mmap support in memslot", 576d035e2aef):
x86 then faults shared gfns in from the file as well ("KVM: x86/mmu: Handle guest page faults for
guest_memfd with shared memory", f029f04ddbec; :func:`kvmsim.kvm.fault.kvm_faultin_pfn`).

A :class:`GuestMemfd` is the file (its page cache of order-0 folios, ``kvm_gmem_get_folio()``'s "TODO:
Support huge pages") and its bindings, the memslots that map a range of it (``kvm_gmem_bind()``,
``kvm_gmem_unbind()``; an index is bound to at most one memslot, -EEXIST otherwise).

``kvm_gmem_get_pfn()`` returns the folio's pfn with a reference held and ``max_order`` (always 0 here).
v6.12 returned only the pfn, and the x86 fault released it by guess (``kvm_release_pfn_clean()``);
v6.13 also returns the page (patch 45 "KVM: guest_memfd: Pass index, not gfn, to __kvm_gmem_get_pfn()",
patch 46 "KVM: guest_memfd: Provide "struct page" as output from kvm_gmem_get_pfn()"), which
``kvm_release_faultin_page()`` releases: the policy's ``reported_page`` decides what the caller sees.

Punch-hole (``kvm_gmem_punch_hole()``) invalidates the bound memslots' mappings directly, no host
mmu_notifier involved::

    kvm_gmem_invalidate_begin()    mmu_lock; kvm_mmu_invalidate_begin(); range_add; unmap; flush
    truncate_inode_pages_range()   the page cache drops its references: the folios are freed
    kvm_gmem_invalidate_end()      mmu_lock; kvm_mmu_invalidate_end() (seq++)
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import EHWPOISON, ModelError
from kvmsim.kvm.pfn import Hold, KvmFollowPfn, kvm_acquired
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE
from kvmsim.uapi import GUEST_MEMFD_FLAG_MMAP

#: ``FALLOC_FL_KEEP_SIZE`` and ``FALLOC_FL_PUNCH_HOLE`` (include/uapi/linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class GuestMemfd:
    """Model of a guest_memfd file (``struct kvm_gmem`` and its inode): its page cache and the memslots
    bound to it."""

    def __init__(self, kvm, size: int, flags: int = 0):
        supported = kvm.ops.gmem_supported_flags(kvm)      # kvm_gmem_get_supported_flags()
        if flags & ~supported:
            raise ModelError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: flags {flags:#x} not supported "
                                           f"(this kernel accepts {supported:#x})")
        if size <= 0 or size % 4096:
            raise ModelError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: size {size:#x} not page aligned")
        self.kvm = kvm
        self.flags = flags
        self.npages = size // 4096
        self.pages = np.full(self.npages, -1, dtype=np.int64)
        self.bindings: list = []             # the bound memslots (the kernel's xarray index → slot)
        self.owner_id = kvm.phys.register_owner(self)
        self.hwpoison: set[int] = set()

    def binding(self, index: int):
        """``xa_load(&gmem->bindings, index)``: the memslot bound at ``index``, or None."""
        for slot in self.bindings:
            if slot.gmem_pgoff <= index < slot.gmem_pgoff + slot.npages:
                return slot
        return None

    def host_address_space(self, mm):
        """v6.18 ``kvm_gmem_mmap()`` / ``kvm_gmem_fault_user_mapping()``: the file's page cache as the
        ``address_space`` a host VMA maps (the same folios ``kvm_gmem_get_pfn()`` returns), made on first use."""
        asp = getattr(self, "_host_asp", None)
        if asp is None:
            from kvmsim.mm.vma import AddressSpace
            asp = AddressSpace(f"guest_memfd@{self.owner_id}", self.npages, pages=self.pages)
            asp.owner_id = self.owner_id
            self._host_asp = asp
        return asp

    @staticmethod
    def folio_order(index: int) -> int:
        """The order of the folio at ``index``: 0 (``kvm_gmem_get_folio()`` allocates order-0 folios and
        WARNs on a large one, v6.12 and v6.13)."""
        return 0


def kvm_gmem_bind(kvm, slot, gmem: GuestMemfd | None, offset: int) -> None:
    """Mirrors ``kvm_gmem_bind()``: -EBADF for a non-file, -EINVAL for a file that is not a guest_memfd of
    this VM or a range past its size (or unaligned), -EEXIST if part of the range is bound already;
    then the slot points at the file."""
    if gmem is None:
        raise ModelError(errno.EBADF, "KVM_MEM_GUEST_MEMFD needs guest_memfd (an fd from KVM_CREATE_GUEST_MEMFD)")
    if not isinstance(gmem, GuestMemfd):
        raise ModelError(errno.EINVAL, "guest_memfd is not a guest_memfd file (file->f_op != &kvm_gmem_fops)")
    if gmem.kvm is not kvm:
        raise ModelError(errno.EINVAL, "guest_memfd belongs to another VM")
    if offset < 0 or offset % PAGE_SIZE or (offset >> PAGE_SHIFT) + slot.npages > gmem.npages:
        raise ModelError(errno.EINVAL, f"guest_memfd range [{offset:#x}, +{slot.npages} pages) is unaligned "
                                       f"or past the file's size ({gmem.npages} pages)")
    start = offset >> PAGE_SHIFT
    for other in gmem.bindings:
        if other.gmem_pgoff < start + slot.npages and start < other.gmem_pgoff + other.npages:
            raise ModelError(errno.EEXIST, f"guest_memfd pages [{start:#x}, {start + slot.npages:#x}) overlap "
                                           f"memslot {other.id}'s binding")
    slot.gmem_file = gmem
    slot.gmem_pgoff = start
    slot.gmem_only = bool(gmem.flags & GUEST_MEMFD_FLAG_MMAP)     # v6.18 KVM_MEMSLOT_GMEM_ONLY
    gmem.bindings.append(slot)


def kvm_gmem_unbind(slot) -> None:
    """Mirrors ``kvm_gmem_unbind()``: the memslot's range of the file is free to bind again."""
    gmem = slot.gmem_file
    if gmem is not None and slot in gmem.bindings:
        gmem.bindings.remove(slot)


def kvm_gmem_get_folio(kvm, gmem: GuestMemfd, index: int) -> int:
    """Mirrors ``kvm_gmem_get_folio()``: the page cache's folio at ``index``, allocated (order 0) if absent."""
    pfn = int(gmem.pages[index])
    if pfn < 0:
        pfn = kvm.phys.alloc(owner=gmem.owner_id, index=index)
        gmem.pages[index] = pfn
    return pfn


def kvm_gmem_get_pfn(kvm, slot, gfn: int) -> tuple[int, KvmFollowPfn, int]:
    """Mirrors ``kvm_gmem_get_pfn()`` → ``__kvm_gmem_get_pfn()``: ``(pfn, kfp, max_order)`` with a folio
    reference held (``kfp.refcounted_page`` is the page the caller is told about: patch 46 "KVM:
    guest_memfd: Provide "struct page" as output from kvm_gmem_get_pfn()").  Raises ``ModelError``:
    -EFAULT without a file, -EIO if the index is not bound to this memslot, -EHWPOISON."""
    gmem = slot.gmem_file
    if gmem is None:
        raise ModelError(errno.EFAULT, f"memslot {slot.id} has no guest_memfd file")
    index = slot.gmem_pgoff + (gfn - slot.base_gfn)        # kvm_gmem_get_index(); patch 45 passes it
    if gmem.binding(index) is not slot:
        raise ModelError(errno.EIO, f"guest_memfd index {index:#x} is not bound to memslot {slot.id}")
    pfn = kvm_gmem_get_folio(kvm, gmem, index)
    if index in gmem.hwpoison:
        raise ModelError(EHWPOISON, f"guest_memfd index {index} is poisoned")
    kvm.phys.get_page(pfn, "kvm_gmem_get_pfn", kvm=True)
    kvm_acquired(kvm, pfn, Hold.GET, "kvm_gmem_get_pfn")
    kfp = KvmFollowPfn(slot, gfn, caller="kvm_gmem_get_pfn")
    kfp.held, kfp.hold, kfp.map_writable = pfn, Hold.GET, not slot.readonly
    kfp.refcounted_page = kvm.policy.reported_page(kfp)
    kvm.journal.count("kvm_gmem_get_pfn")
    return pfn, kfp, gmem.folio_order(index)


def _bound_ranges(gmem: GuestMemfd, start: int, end: int):
    """The ``(slot, gfn start, gfn end)`` of each binding overlapping file pages ``[start, end)``
    (``__kvm_gmem_invalidate_begin()``'s ``xa_for_each_range()``)."""
    for slot in gmem.bindings:
        pgoff = slot.gmem_pgoff
        g0 = slot.base_gfn + max(pgoff, start) - pgoff
        g1 = slot.base_gfn + min(pgoff + slot.npages, end) - pgoff
        if g0 < g1:
            yield slot, g0, g1


def kvm_gmem_invalidate_begin(kvm, gmem: GuestMemfd, start: int, end: int) -> bool:
    """Mirrors ``kvm_gmem_invalidate_begin()``: at the first bound memslot in range, ``mmu_lock`` and
    ``kvm_mmu_invalidate_begin()``; each one's gfns added and unmapped (``kvm_mmu_unmap_gfn_range()``);
    one flush.  True if a memslot was found (then :func:`kvm_gmem_invalidate_end` ends it)."""
    found = flush = False
    for slot, g0, g1 in _bound_ranges(gmem, start, end):
        if not found:
            found = True
            kvm.mmu_lock.write_lock()
            kvm.mmu_invalidate_begin()
        kvm.mmu_invalidate_range_add(g0, g1)
        flush |= bool(kvm.arch.unmap_gfn_range(slot, g0, g1, reason="guest_memfd invalidate"))
    if flush:
        kvm.flush_remote_tlbs("kvm_gmem_invalidate_begin")
    if found:
        kvm.mmu_lock.write_unlock()
    return found


def kvm_gmem_invalidate_end(kvm, gmem: GuestMemfd, start: int, end: int) -> None:
    """Mirrors ``kvm_gmem_invalidate_end()``: ``kvm_mmu_invalidate_end()`` if a binding is in range."""
    if any(True for _ in _bound_ranges(gmem, start, end)):
        kvm.mmu_lock.write_lock()
        kvm.mmu_invalidate_end()
        kvm.mmu_lock.write_unlock()


def kvm_gmem_punch_hole(kvm, gmem: GuestMemfd, index: int, npages: int) -> None:
    """Mirrors ``kvm_gmem_punch_hole()``: invalidate the bound memslots, truncate the page cache (its
    references go; a folio nobody else holds is freed), end the invalidation."""
    start, end = index, index + npages
    kvm_gmem_invalidate_begin(kvm, gmem, start, end)
    for i in range(max(start, 0), min(end, gmem.npages)):
        pfn = int(gmem.pages[i])
        if pfn >= 0:
            kvm.phys.put_page(pfn, "kvm_gmem_punch_hole")
            gmem.pages[i] = -1
    kvm.journal.count("kvm_gmem_punch_hole")
    kvm_gmem_invalidate_end(kvm, gmem, start, end)


def kvm_gmem_fallocate(kvm, gmem: GuestMemfd, mode: int, offset: int, length: int) -> None:
    """Mirrors ``kvm_gmem_fallocate()`` (after ``vfs_fallocate()``'s ``len <= 0`` EINVAL): -EOPNOTSUPP
    without FALLOC_FL_KEEP_SIZE or with another mode bit, -EINVAL for an unaligned offset or length;
    FALLOC_FL_PUNCH_HOLE punches (:func:`kvm_gmem_punch_hole`), else ``kvm_gmem_allocate()`` (-EINVAL
    past the file's size) allocates the folios."""
    if length <= 0 or offset < 0:
        raise ModelError(errno.EINVAL, f"fallocate: offset {offset:#x} / length {length:#x} invalid")
    if not mode & FALLOC_FL_KEEP_SIZE or mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        raise ModelError(errno.EOPNOTSUPP, f"fallocate on a guest_memfd: mode {mode:#x} (KEEP_SIZE is required, "
                                           "PUNCH_HOLE the only other bit)")
    if offset % PAGE_SIZE or length % PAGE_SIZE:
        raise ModelError(errno.EINVAL, f"fallocate: offset {offset:#x} / length {length:#x} not page aligned")
    if mode & FALLOC_FL_PUNCH_HOLE:
        kvm_gmem_punch_hole(kvm, gmem, offset >> PAGE_SHIFT, length >> PAGE_SHIFT)
        return
    if offset + length > gmem.npages << PAGE_SHIFT:
        raise ModelError(errno.EINVAL, f"fallocate: [{offset:#x}, +{length:#x}) past the file's size")
    for i in range(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT):
        kvm_gmem_get_folio(kvm, gmem, i)
