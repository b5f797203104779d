"""Dirty tracking: ``mark_page_dirty_in_slot``, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG and the dirty ring
(virt/kvm/kvm_main.c, virt/kvm/dirty_ring.c).  Identical in v6.12 and v6.13; the arch re-arms
tracking through ``enable_log_dirty_pt_masked``.  The ring reset is the protocol's
(``kvm.ops.dirty_ring_reset``): v6.17 bounded it and made it stop on a pending signal
(:func:`kvm_dirty_ring_reset_v617`, policy ``current``).
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


#: ``INT_MAX``: the most entries one KVM_RESET_DIRTY_RINGS resets (v6.17, "KVM: Bound the number of dirty
#: ring entries in a single reset at INT_MAX", 530a8ba71b4c).
INT_MAX = (1 << 31) - 1
#: ``BITS_PER_LONG``: how far apart two gfns of one slot may be to share one ``kvm_reset_dirty_gfn()``.
BITS_PER_LONG = 64


def kvm_reset_dirty_gfn(kvm, slot_id: int, offset: int, mask: int) -> None:
    """Mirrors ``kvm_reset_dirty_gfn()`` (virt/kvm/dirty_ring.c): re-arm dirty tracking for the gfns of
    ``mask`` (relative to ``offset``) in one ``mmu_lock`` hold; a slot that is gone or too small is skipped."""
    as_id, sid = slot_id >> 16, slot_id & 0xFFFF
    if as_id >= kvm.nr_memslot_as_ids or sid >= KVM_USER_MEM_SLOTS:
        return
    slot = kvm.memslots[as_id].by_id.get(sid)
    if slot is None or offset + mask.bit_length() - 1 >= slot.npages:
        return
    bits = np.array([(mask >> i) & 1 for i in range(mask.bit_length())], dtype=bool)
    kvm.journal.count("kvm_reset_dirty_gfn")
    kvm.mmu_lock.write_lock()
    kvm.arch.enable_log_dirty_pt_masked(slot, offset, bits)
    kvm.mmu_lock.write_unlock()


def _coalesce(cur_slot: int, cur_offset: int, mask: int, next_slot: int, next_offset: int):
    """The batching step of ``kvm_dirty_ring_reset()``: the new ``(offset, mask)`` if the next entry joins
    the current batch (same slot, within ``BITS_PER_LONG`` gfns either way), else None."""
    if next_slot != cur_slot:
        return None
    delta = next_offset - cur_offset
    if 0 <= delta < BITS_PER_LONG:
        return cur_offset, mask | (1 << delta)
    if -BITS_PER_LONG < delta < 0 and (mask << -delta) < (1 << BITS_PER_LONG):
        return next_offset, (mask << -delta) | 1
    return None


class _ResetIndex:
    """A vCPU ring's ``reset_index`` walk: the harvested entries (``kvm_dirty_gfn_harvested()``) in order;
    :meth:`done` drops the consumed ones from the model's list in one go."""

    def __init__(self, vcpu):
        self.vcpu, self.i = vcpu, 0

    def next(self):
        """The next harvested entry, consumed (flags cleared, ``reset_index++``), or None."""
        if self.i >= self.vcpu.dirty_ring_harvested:
            return None
        self.i += 1
        return self.vcpu.dirty_ring[self.i - 1]

    def done(self) -> None:
        del self.vcpu.dirty_ring[:self.i]
        self.vcpu.dirty_ring_harvested -= self.i


def kvm_dirty_ring_reset_v612(kvm, vcpu, nr_entries_reset: list[int], signal_pending) -> int:
    """Mirrors ``kvm_dirty_ring_reset()`` (virt/kvm/dirty_ring.c, v6.12 .. v6.16): every harvested entry,
    however many, coalesced into ``kvm_reset_dirty_gfn()`` batches; a pending signal is not looked at.
    Adds the entries reset to ``nr_entries_reset[0]`` (v6.12 returned the count); returns 0."""
    cur = None
    ring = _ResetIndex(vcpu)
    while (e := ring.next()) is not None:
        nr_entries_reset[0] += 1
        if cur is not None:
            joined = _coalesce(cur[0], cur[1], cur[2], e[0], e[1])
            if joined is not None:
                cur = (cur[0], *joined)
                continue
            kvm_reset_dirty_gfn(kvm, *cur)
        cur = (e[0], e[1], 1)
    ring.done()
    if cur is not None:
        kvm_reset_dirty_gfn(kvm, *cur)
    return 0


def kvm_dirty_ring_reset_v617(kvm, vcpu, nr_entries_reset: list[int], signal_pending) -> int:
    """Mirrors ``kvm_dirty_ring_reset()`` (virt/kvm/dirty_ring.c, v6.17 .. v6.18): at most ``INT_MAX``
    entries per ioctl ("KVM: Bound the number of dirty ring entries in a single reset at INT_MAX",
    530a8ba71b4c) and -EINTR when ``signal_pending(current)`` at the top of an iteration ("KVM: Bail from
    the dirty ring reset flow if a signal is pending", 49005a2a3d2a), batches tracked by ``mask`` ("KVM:
    Use mask of harvested dirty ring entries to coalesce dirty ring resets", e46ad851150f).

    The -EINTR return leaves the loop before the pending batch's ``kvm_reset_dirty_gfn()``: those entries
    are consumed (and counted) but their gfns are not write-protected again."""
    cur_slot = cur_offset = mask = 0
    ring = _ResetIndex(vcpu)
    while nr_entries_reset[0] < INT_MAX:
        if signal_pending(nr_entries_reset[0]):
            kvm.journal.count("dirty_ring_reset_eintr")
            if mask:
                kvm.journal.fact("dirty_ring_reset_pending_dropped", kvm=True,
                                 caller="kvm_dirty_ring_reset",
                                 detail=f"-EINTR: slot {cur_slot:#x} offset {cur_offset:#x} mask {mask:#x} "
                                        "consumed, not re-protected")
            ring.done()
            return -errno.EINTR
        e = ring.next()
        if e is None:
            break
        next_slot, next_offset = e
        nr_entries_reset[0] += 1
        if mask:
            joined = _coalesce(cur_slot, cur_offset, mask, next_slot, next_offset)
            if joined is not None:
                cur_offset, mask = joined
                continue
            kvm_reset_dirty_gfn(kvm, cur_slot, cur_offset, mask)
        cur_slot, cur_offset, mask = next_slot, next_offset, 1
    ring.done()
    if mask:
        kvm_reset_dirty_gfn(kvm, cur_slot, cur_offset, mask)
    return 0


def kvm_reset_dirty_rings(kvm, signal_after: int | None = None) -> int:
    """Mirrors ``kvm_vm_ioctl_reset_dirty_pages()`` (KVM_RESET_DIRTY_RINGS, virt/kvm/kvm_main.c): each
    vCPU's ring through the protocol's ``kvm_dirty_ring_reset()`` (``kvm.ops.dirty_ring_reset``), stopping at
    the first error; one TLB flush if anything was reset; returns the number of entries reset (an -EINTR
    from the ring is not returned: the ioctl returns the count so far).

    ``signal_after``: a signal becomes pending once that many entries have been reset in this call (the
    model's stand-in for a signal delivered during the ioctl); None, never."""
    if not kvm.dirty_ring_size:
        raise ModelError(errno.EINVAL, "no dirty ring")

    def signal_pending(done: int) -> bool:
        return signal_after is not None and done >= signal_after

    cleared = [0]
    for vcpu in kvm.vcpus:
        if kvm.ops.dirty_ring_reset(kvm, vcpu, cleared, signal_pending):
            break
    if cleared[0]:
        kvm.flush_remote_tlbs("reset_dirty_rings")
    return cleared[0]
