"""Memslots and ``KVM_SET_USER_MEMORY_REGION(2)`` (virt/kvm/kvm_main.c ``__kvm_set_memory_region``, v6.13).

Validation returns the kernel's errno in the kernel's order, so a model result compares directly
with the real ioctl: the generic checks (:func:`validate_region`), then ``kvm_prepare_memory_region()``
(the dirty bitmap, then the arch's ``kvm_arch_prepare_memory_region()``), before anything is committed.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass, field, replace

import numpy as np

from kvmsim.errors import ModelError
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE
from kvmsim.uapi import (KVM_DIRTY_LOG_INITIALLY_SET, KVM_MEM, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_MAX_NR_PAGES,  # noqa: F401
                         KVM_MEM_READONLY, KVM_MEMSLOT_INVALID, KVM_USER_MEM_SLOTS, KvmMrChange)  # KVM_MEM, KvmMrChange re-exported

KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM.LOG_DIRTY_PAGES | KVM_MEM.READONLY
HOST_TASK_SIZE = 1 << 47                # access_ok() limit for the userspace address


@dataclass
class KvmUserspaceMemoryRegion2:
    """``struct kvm_userspace_memory_region2`` (v1 is the same without the gmem fields)."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = -1


@dataclass
class KvmMemorySlot:
    """Model of ``struct kvm_memory_slot``.

    ``readonly`` (``memslot_is_readonly()``), ``invalid`` (``KVM_MEMSLOT_INVALID``) and ``logging``
    (``kvm_slot_dirty_track_enabled()`` for LOG_DIRTY_PAGES) are the kernel's tests of ``slot->flags``,
    kept as plain attributes that every assignment to ``flags`` updates: a page fault reads them
    seven times, and as properties they cost about 7% of the scalar fault."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: KVM_MEM
    dirty_bitmap: np.ndarray | None = None          # one bool per page (the kernel's first bitmap)
    gmem_file: object | None = None
    gmem_pgoff: int = 0
    #: v6.18 ``kvm_memslot_is_gmem_only()``: bound to a guest_memfd that supports mmap, so shared faults
    #: come from guest_memfd too (:func:`kvmsim.kvm.gmem.kvm_gmem_bind`).
    gmem_only: bool = False
    arch: dict = field(default_factory=dict)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name == "flags":
            flags = int(value)
            object.__setattr__(self, "readonly", bool(flags & KVM_MEM_READONLY))
            object.__setattr__(self, "invalid", bool(flags & KVM_MEMSLOT_INVALID))
            object.__setattr__(self, "logging", bool(flags & KVM_MEM_LOG_DIRTY_PAGES))

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int:
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    @property
    def hva_end(self) -> int:
        return self.userspace_addr + (self.npages << PAGE_SHIFT)


class KvmMemslots:
    """``struct kvm_memslots`` for one address space: by id, and sorted by gfn for lookups."""

    def __init__(self) -> None:
        self.by_id: dict[int, KvmMemorySlot] = {}
        self._sorted: list[KvmMemorySlot] = []
        self._bases: list[int] = []
        self.generation = 0
        #: ``slots->last_used_slot``: the slot the last lookup found, tried first (``__gfn_to_memslot()``)
        self.last_used_slot: KvmMemorySlot | None = None

    def _reindex(self) -> None:
        self._sorted = sorted(self.by_id.values(), key=lambda s: s.base_gfn)
        self._bases = [s.base_gfn for s in self._sorted]
        self.generation += 2
        self.last_used_slot = None

    def install(self, slot: KvmMemorySlot) -> None:
        self.by_id[slot.id] = slot
        self._reindex()

    def remove(self, slot_id: int) -> None:
        self.by_id.pop(slot_id, None)
        self._reindex()

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        """Mirrors ``__gfn_to_memslot()`` (include/linux/kvm_host.h): ``last_used_slot`` if it contains
        ``gfn`` (``try_get_memslot()``), else ``search_memslots()``, which updates it."""
        slot = self.last_used_slot
        if slot is not None and slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            return slot
        i = bisect.bisect(self._bases, gfn) - 1
        if i >= 0 and self._sorted[i].contains(gfn):
            slot = self.last_used_slot = self._sorted[i]
            return slot
        return None

    def overlapping(self, start: int, end: int, skip_id: int | None = None) -> list[KvmMemorySlot]:
        return [s for s in self._sorted if s.id != skip_id and s.base_gfn < end and s.base_gfn + s.npages > start]

    def by_hva(self, start: int, end: int) -> list[KvmMemorySlot]:
        """Slots whose userspace range overlaps ``[start, end)`` (the hva interval tree)."""
        return [s for s in self._sorted if s.userspace_addr < end and s.hva_end > start]

    def __iter__(self):
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self.by_id)


def check_memory_region_flags(kvm, mem: KvmUserspaceMemoryRegion2, v1: bool) -> None:
    """``check_memory_region_flags()`` plus the v1 ioctl's flag mask (kvm_vm_ioctl)."""
    if v1 and mem.flags & ~int(KVM_SET_USER_MEMORY_REGION_V1_FLAGS):
        raise ModelError(errno.EINVAL, f"KVM_SET_USER_MEMORY_REGION: flags {mem.flags:#x} not valid for v1")
    valid = int(KVM_MEM.LOG_DIRTY_PAGES)
    if kvm.ops.supports_gmem(kvm):                          # v6.13 kvm_arch_has_private_mem(), v6.18 any VM
        valid |= int(KVM_MEM.GUEST_MEMFD)
    if mem.flags & KVM_MEM.GUEST_MEMFD:
        valid &= ~int(KVM_MEM.LOG_DIRTY_PAGES)              # dirty logging private memory unsupported
    else:
        valid |= int(KVM_MEM.READONLY)                      # GUEST_MEMFD is incompatible with READONLY
    if mem.flags & ~valid:
        raise ModelError(errno.EINVAL, f"memslot flags {mem.flags:#x} not valid (allowed {valid:#x})")


def validate_region(kvm, mem: KvmUserspaceMemoryRegion2, v1: bool) -> tuple[KvmMrChange | None, KvmMemorySlot | None]:
    """The checks of ``__kvm_set_memory_region()`` in order; returns (change, old slot)."""
    check_memory_region_flags(kvm, mem, v1)
    as_id, sid = mem.slot >> 16, mem.slot & 0xFFFF
    if mem.memory_size & (PAGE_SIZE - 1) or mem.memory_size >= 1 << 64:
        raise ModelError(errno.EINVAL, f"memory_size {mem.memory_size:#x} is not page aligned")
    if mem.guest_phys_addr & (PAGE_SIZE - 1):
        raise ModelError(errno.EINVAL, f"guest_phys_addr {mem.guest_phys_addr:#x} is not page aligned")
    if (mem.userspace_addr & (PAGE_SIZE - 1)) or mem.userspace_addr + mem.memory_size > HOST_TASK_SIZE:
        raise ModelError(errno.EINVAL, f"userspace_addr {mem.userspace_addr:#x} unaligned or not access_ok")
    if mem.flags & KVM_MEM.GUEST_MEMFD and (mem.guest_memfd_offset & (PAGE_SIZE - 1)):
        raise ModelError(errno.EINVAL, f"guest_memfd_offset {mem.guest_memfd_offset:#x} is not page aligned")
    if as_id >= kvm.nr_memslot_as_ids or sid >= KVM_USER_MEM_SLOTS:
        raise ModelError(errno.EINVAL, f"slot {mem.slot:#x}: id {sid} / address space {as_id} out of range")
    if mem.guest_phys_addr + mem.memory_size >= 1 << 64:
        raise ModelError(errno.EINVAL, "guest physical range wraps")
    if (mem.memory_size >> PAGE_SHIFT) > KVM_MEM_MAX_NR_PAGES:
        raise ModelError(errno.EINVAL, "memslot too large")
    slots = kvm.memslots[as_id]
    old = slots.by_id.get(sid)
    if not mem.memory_size:
        if old is None or not old.npages:
            raise ModelError(errno.EINVAL, f"deleting slot {sid}, which does not exist")
        return KvmMrChange.DELETE, old
    base_gfn = mem.guest_phys_addr >> PAGE_SHIFT
    npages = mem.memory_size >> PAGE_SHIFT
    if old is None or not old.npages:
        change = KvmMrChange.CREATE
    else:
        if mem.flags & KVM_MEM.GUEST_MEMFD:
            raise ModelError(errno.EINVAL, f"slot {sid}: guest_memfd memslots are immutable (delete only)")
        if mem.userspace_addr != old.userspace_addr or npages != old.npages or \
                (mem.flags ^ int(old.flags)) & KVM_MEM.READONLY:
            raise ModelError(errno.EINVAL, f"slot {sid}: only the gpa (move) or LOG_DIRTY_PAGES may change")
        if base_gfn != old.base_gfn:
            change = KvmMrChange.MOVE
        elif mem.flags != int(old.flags):
            change = KvmMrChange.FLAGS_ONLY
        else:
            return None, old
    if change in (KvmMrChange.CREATE, KvmMrChange.MOVE) and slots.overlapping(base_gfn, base_gfn + npages, sid):
        raise ModelError(errno.EEXIST, f"slot {sid}: gfn range [{base_gfn:#x}, {base_gfn + npages:#x}) overlaps another slot")
    return change, old


def new_memslot(mem: KvmUserspaceMemoryRegion2, old: KvmMemorySlot | None, change: KvmMrChange) -> KvmMemorySlot:
    """The ``new`` slot ``__kvm_set_memory_region()`` builds for CREATE, MOVE and FLAGS_ONLY (for MOVE and
    FLAGS_ONLY a copy of ``old`` with the new gpa and flags; nothing is installed yet)."""
    flags = KVM_MEM(int(mem.flags))
    if change == KvmMrChange.CREATE:
        return KvmMemorySlot(mem.slot & 0xFFFF, mem.slot >> 16, mem.guest_phys_addr >> PAGE_SHIFT,
                             mem.memory_size >> PAGE_SHIFT, mem.userspace_addr, flags,
                             gmem_pgoff=mem.guest_memfd_offset >> PAGE_SHIFT)
    return replace(old, base_gfn=mem.guest_phys_addr >> PAGE_SHIFT, flags=flags, dirty_bitmap=None)


def kvm_use_dirty_bitmap(kvm) -> bool:
    """``kvm_use_dirty_bitmap()``: no dirty ring, or the ring with KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP."""
    return not kvm.dirty_ring_size or kvm.dirty_ring_with_bitmap


def kvm_alloc_dirty_bitmap(kvm, slot: KvmMemorySlot) -> None:
    """``kvm_alloc_dirty_bitmap()`` plus the ``bitmap_set()`` of KVM_DIRTY_LOG_INITIALLY_SET."""
    slot.dirty_bitmap = np.zeros(slot.npages, dtype=bool)
    if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:  # kvm_dirty_log_manual_protect_and_init_set()
        slot.dirty_bitmap[:] = True


def kvm_prepare_memory_region(kvm, old: KvmMemorySlot | None, new: KvmMemorySlot | None,
                              change: KvmMrChange) -> None:
    """Mirrors ``kvm_prepare_memory_region()`` (virt/kvm/kvm_main.c, v6.12 and v6.13, unchanged by the series).

    The dirty bitmap of ``new``: none without LOG_DIRTY_PAGES; the *same* bitmap as ``old`` if the old
    slot had one ("If logging is enabled in both old and new, reuse the existing bitmap"), so a
    KVM_MR_MOVE of a logged slot keeps the pages dirtied before the move; otherwise a fresh one (all
    set under KVM_DIRTY_LOG_INITIALLY_SET) unless the dirty ring is in use.  Then
    ``kvm_arch_prepare_memory_region()``, which raises ``ModelError`` with the arch's errno; on failure
    the kernel frees a bitmap it allocated here, the model simply drops ``new``.
    """
    if change != KvmMrChange.DELETE:
        if not new.logging:
            new.dirty_bitmap = None
        elif old is not None and old.dirty_bitmap is not None:
            new.dirty_bitmap = old.dirty_bitmap
        elif kvm_use_dirty_bitmap(kvm):
            kvm_alloc_dirty_bitmap(kvm, new)
    kvm.arch.prepare_memory_region(old, new, change)


def vmas_of_region(mm, new: KvmMemorySlot):
    """The ``find_vma_intersection(current->mm, hva, reg_end)`` walk of the arm64 and RISC-V
    ``kvm_arch_prepare_memory_region()``: each VMA overlapping ``[userspace_addr, +npages pages)`` in
    address order, holes skipped."""
    return sorted(mm.vmas_in(new.userspace_addr, new.hva_end), key=lambda v: v.start)
