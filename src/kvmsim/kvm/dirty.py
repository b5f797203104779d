"""Dirty tracking: ``mark_page_dirty_in_slot``, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG and the dirty ring
(virt/kvm/kvm_main.c, virt/kvm/dirty_ring.c).  Identical in both protocols; the arch re-arms
tracking through ``enable_log_dirty_pt_masked``.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import ModelError
from kvmsim.uapi import (KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,  # noqa: F401 (re-exported)
                         KVM_USER_MEM_SLOTS)

KVM_DIRTY_RING_RSVD_ENTRIES = 64          # kvm_dirty_ring_get_rsvd_entries() without PML quirks
KVM_DIRTY_GFN_SIZE = 16                   # sizeof(struct kvm_dirty_gfn)


def mark_page_dirty_in_slot(kvm, slot, gfn: int, vcpu) -> None:
    """``mark_page_dirty_in_slot()``: the ring of the running vCPU, or the slot's bitmap."""
    if slot is None or not slot.logging:
        return
    rel = gfn - slot.base_gfn
    kvm.journal.count("mark_page_dirty_in_slot")
    if kvm.dirty_ring_size and not (vcpu is None and kvm.dirty_ring_with_bitmap):
        if vcpu is None:
            vcpu = kvm.vcpus[0] if kvm.vcpus else None
        if vcpu is None:
            return
        entries = kvm.dirty_ring_size // KVM_DIRTY_GFN_SIZE
        if len(vcpu.dirty_ring) >= entries:
            kvm.journal.fact("dirty_ring_overflow", gfn=gfn, kvm=True, caller="kvm_dirty_ring_push",
                             detail="WARN_ON_ONCE: dirty ring full, entry dropped")
            return
        vcpu.dirty_ring.append(((slot.as_id << 16) | slot.id, rel))
        return
    if slot.dirty_bitmap is not None:
        slot.dirty_bitmap[rel] = True


def dirty_ring_soft_full(kvm, vcpu) -> bool:
    entries = kvm.dirty_ring_size // KVM_DIRTY_GFN_SIZE
    return len(vcpu.dirty_ring) >= entries - KVM_DIRTY_RING_RSVD_ENTRIES


#: ``KVM_DIRTY_RING_MAX_ENTRIES``: the largest ring is 65536 entries (1 MiB).
KVM_DIRTY_RING_MAX_ENTRIES = 65536


def enable_dirty_ring(kvm, size: int) -> None:
    """Mirrors ``kvm_vm_ioctl_enable_dirty_log_ring()`` (virt/kvm/kvm_main.c, v6.12/v6.13), in its order:
    not a power of two, or smaller than a page or the reserved entries: EINVAL; larger than
    ``KVM_DIRTY_RING_MAX_ENTRIES`` entries: E2BIG; already set: EINVAL; after KVM_CREATE_VCPU: EINVAL."""
    if not size or size & (size - 1):
        raise ModelError(errno.EINVAL, f"dirty ring size {size} is not a power of two")
    if size < KVM_DIRTY_RING_RSVD_ENTRIES * KVM_DIRTY_GFN_SIZE or size < 4096:
        raise ModelError(errno.EINVAL, f"dirty ring size {size} is smaller than a page")
    if size > KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE:
        raise ModelError(errno.E2BIG, f"dirty ring size {size} is larger than "
                                      f"{KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE} (KVM_DIRTY_RING_MAX_ENTRIES)")
    if kvm.dirty_ring_size:
        raise ModelError(errno.EINVAL, "dirty ring already enabled")
    if kvm.vcpus:
        raise ModelError(errno.EINVAL, "KVM_CAP_DIRTY_LOG_RING must be enabled before KVM_CREATE_VCPU")
    kvm.dirty_ring_size = size


def enable_dirty_ring_with_bitmap(kvm) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)`` (kvm_vm_ioctl_enable_cap_generic()):
    EINVAL unless the arch selects NEED_KVM_DIRTY_RING_WITH_BITMAP (arm64: vgic/ITS tables are saved with
    no running vCPU), the ring is on and no memslot exists yet.  Then every logging memslot gets a
    bitmap too, KVM_GET_DIRTY_LOG works, and a dirtying with no running vCPU goes to the bitmap."""
    if not getattr(kvm.arch, "need_dirty_ring_with_bitmap", False) or not kvm.dirty_ring_size:
        raise ModelError(errno.EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP needs an arch that selects it (arm64) "
                                       "and KVM_CAP_DIRTY_LOG_RING enabled first")
    if any(len(list(slots)) for slots in kvm.memslots):
        raise ModelError(errno.EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP must be enabled before any memslot")
    kvm.dirty_ring_with_bitmap = True


def enable_manual_protect(kvm, flags: int) -> None:
    """``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``."""
    if flags & ~(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET):
        raise ModelError(errno.EINVAL, f"MANUAL_DIRTY_LOG_PROTECT2 flags {flags:#x}")
    kvm.manual_dirty_log_protect = flags


def _slot_for_log(kvm, slot_id: int):
    from kvmsim.kvm.memslot import kvm_use_dirty_bitmap
    if not kvm_use_dirty_bitmap(kvm):
        raise ModelError(errno.ENXIO, "dirty-log bitmap ioctls are disabled while the dirty ring is on")
    as_id, sid = slot_id >> 16, slot_id & 0xFFFF
    if as_id >= kvm.nr_memslot_as_ids or sid >= KVM_USER_MEM_SLOTS:
        raise ModelError(errno.EINVAL, f"slot {slot_id:#x} out of range")
    slot = kvm.memslots[as_id].by_id.get(sid)
    if slot is None or slot.dirty_bitmap is None:
        raise ModelError(errno.ENOENT, f"slot {sid} has no dirty bitmap")
    return slot


def kvm_get_dirty_log(kvm, slot_id: int) -> np.ndarray:
    """``KVM_GET_DIRTY_LOG``: returns one bool per page.

    Without manual protect the bitmap is harvested (xchg to 0) and tracking re-armed for the
    reaped pages, with a TLB flush if anything was dirty; with manual protect it is only copied.
    """
    slot = _slot_for_log(kvm, slot_id)
    out = slot.dirty_bitmap.copy()
    kvm.journal.count("get_dirty_log")
    if kvm.manual_dirty_log_protect:
        return out
    if out.any():
        kvm.mmu_lock.write_lock()
        slot.dirty_bitmap[:] = False
        kvm.arch.enable_log_dirty_pt_masked(slot, 0, out)
        kvm.mmu_lock.write_unlock()
        kvm.flush_remote_tlbs("get_dirty_log")
    return out


CLEAR_CHUNK = 1 << 18       # pages per step of KVM_CLEAR_DIRTY_LOG's walk (4096 words)


def kvm_clear_dirty_log(kvm, slot_id: int, first_page: int, num_pages: int, bitmap=None) -> None:
    """``KVM_CLEAR_DIRTY_LOG``: the kernel's alignment and range rules, then re-arm."""
    if kvm.dirty_ring_size:
        raise ModelError(errno.ENXIO, "dirty-log bitmap ioctls are disabled while the dirty ring is on")
    if first_page & 63:
        raise ModelError(errno.EINVAL, f"KVM_CLEAR_DIRTY_LOG: first_page {first_page} is not 64-aligned")
    slot = _slot_for_log(kvm, slot_id)
    if first_page > slot.npages or num_pages > slot.npages - first_page or \
            (num_pages < slot.npages - first_page and num_pages & 63):
        raise ModelError(errno.EINVAL, f"KVM_CLEAR_DIRTY_LOG: [{first_page}, +{num_pages}) not valid for "
                                       f"{slot.npages} pages (num_pages must be 64-aligned unless it reaches the end)")
    mask = None if bitmap is None else np.asarray(bitmap, dtype=bool)[:num_pages]
    kvm.journal.count("clear_dirty_log")
    flush = False
    kvm.mmu_lock.write_lock()
    # kvm_clear_dirty_log_protect() walks the bitmap a 64-page word at a time under one mmu_lock
    # hold and flushes once; the model walks CLEAR_CHUNK pages (a whole number of words) at a time.
    for a in range(first_page, first_page + num_pages, CLEAR_CHUNK):
        b = min(a + CLEAR_CHUNK, first_page + num_pages)
        m = slot.dirty_bitmap[a:b] if mask is None else mask[a - first_page:b - first_page] & slot.dirty_bitmap[a:b]
        if m.any():
            if mask is None:
                m = m.copy()                           # a view of the bitmap cleared next
            slot.dirty_bitmap[a:b] ^= m                # m is a subset of the bitmap: XOR clears it
            kvm.arch.enable_log_dirty_pt_masked(slot, a, m)
            flush = True
    kvm.mmu_lock.write_unlock()
    if flush:
        kvm.flush_remote_tlbs("clear_dirty_log")


def kvm_dirty_ring_harvest(kvm, vcpu) -> list[tuple[int, int]]:
    """Userspace collects the vCPU's ring (entries it then flags for reset)."""
    entries = vcpu.dirty_ring[vcpu.dirty_ring_harvested:]
    vcpu.dirty_ring_harvested = len(vcpu.dirty_ring)
    return list(entries)


def kvm_reset_dirty_rings(kvm) -> int:
    """``KVM_RESET_DIRTY_RINGS``: re-arm the harvested entries; returns how many were reset."""
    if not kvm.dirty_ring_size:
        raise ModelError(errno.EINVAL, "no dirty ring")
    total = 0
    kvm.mmu_lock.write_lock()
    for vcpu in kvm.vcpus:
        done = vcpu.dirty_ring[:vcpu.dirty_ring_harvested]
        for slot_id, off in done:
            slot = kvm.memslots[slot_id >> 16].by_id.get(slot_id & 0xFFFF)
            if slot is not None:
                kvm.arch.enable_log_dirty_pt_masked(slot, off, np.ones(1, dtype=bool))
        total += len(done)
        del vcpu.dirty_ring[:vcpu.dirty_ring_harvested]
        vcpu.dirty_ring_harvested = 0
    kvm.mmu_lock.write_unlock()
    if total:
        kvm.flush_remote_tlbs("reset_dirty_rings")
    return total
