"""A minimal stage-2 MMU: 4 KiB leaves only, the common fault pattern of every architecture (spec §2.14).

Enough for a fault to complete end to end, for generic tests and for architectures the model does
not detail; :mod:`kvmsim.x86` is the full x86 MMU.  Leaves live in per-slot numpy arrays
(``slot.arch["s2_pfn"]``, ``slot.arch["s2"]``).  A/D bits captured at zap time go through the
policy's ``spte_ad_lost`` hook (legacy pushes them to the pfn, the series does nothing).

Its legacy fault release is x86's v6.12 one (``kvm_release_pfn_clean()`` after unlocking, no dirty
mark).  arm64's v6.12 ``user_mem_abort()`` also called ``kvm_set_pfn_dirty()`` after
``read_unlock()`` for a writable fault; that order is :mod:`kvmsim.arm64` (``arch="arm64"``), and on
this MMU the explorer's ``mark-dirty-after-unlock`` mutation.
"""

from __future__ import annotations

import errno
from enum import IntEnum, IntFlag
from typing import Iterator

import numpy as np

from kvmsim.kvm.arch import Leaf
from kvmsim.kvm.pfn import (KVM_PFN_ERR_HWPOISON, KVM_PFN_ERR_NEEDS_IO, KVM_PFN_ERR_RO_FAULT,
                            KVM_PFN_ERR_SIGPENDING, Hold, _kvm_faultin_pfn, is_error_noslot_pfn, kvm_release_faultin)
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.mm.gup import FOLL
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT


class RET_PF(IntEnum):
    """``RET_PF_*`` (arch/x86/kvm/mmu/mmu_internal.h); shared by the generic stage-2."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6


class S2(IntFlag):
    PRESENT = 1
    W = 2
    HOST_W = 4
    A = 8
    D = 16
    HELD = 32          # model-only: the creating fault held a refcounted page


_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))


def fault_error_to_errno(pfn: int) -> int:
    """``kvm_handle_error_pfn()``: error pfn → RET_PF or -errno."""
    if pfn == KVM_PFN_ERR_RO_FAULT:
        return RET_PF.EMULATE
    if pfn == KVM_PFN_ERR_SIGPENDING:
        return -errno.EINTR
    if pfn == KVM_PFN_ERR_HWPOISON:
        return -133
    return -errno.EFAULT


def ret_to_access(r: int, gpa: int, write: bool, value) -> Access | None:
    if r == RET_PF.EMULATE:
        return Access(Exit.MMIO, gpa, write, value)
    if r == -errno.EINTR:
        return Access(Exit.EINTR, gpa, write, value, errno.EINTR)
    if r == -133:
        return Access(Exit.HWPOISON, gpa, write, value, 133)
    if r < 0:
        return Access(Exit.EFAULT, gpa, write, value, -r)
    return None


# The two GUP attempts' flags, by write (IntFlag arithmetic costs a µs per fault).
_FOLL_NOWAIT = {False: FOLL.NOWAIT, True: FOLL.WRITE | FOLL.NOWAIT}
_FOLL_INTERRUPTIBLE = {False: FOLL.INTERRUPTIBLE, True: FOLL.WRITE | FOLL.INTERRUPTIBLE}


@kpath
def kvm_mmu_faultin_pfn(kvm, slot, gfn: int, write: bool, label: str = "kvm_faultin_pfn") -> Steps:
    """The arch-independent part of a stage-2 fault's faultin (spec §2.1 step 4, arch/x86/kvm/mmu/mmu.c).

    Samples ``mmu_invalidate_seq``, pre-checks it without the lock, resolves the pfn with FOLL_NOWAIT
    and then (if I/O is needed) FOLL_INTERRUPTIBLE, maps error pfns to RET_PF / -errno, and re-checks
    before the caller takes ``mmu_lock`` (releasing the page unused when stale).  Returns
    ``(ret, mmu_seq, pfn, kfp)``: ``ret`` is None when the caller should lock, re-check and map.
    """
    mmu_seq = kvm.mmu_invalidate_seq
    yield f"{label}: mmu_seq snapshot"
    if kvm.mmu_invalidate_retry_gfn_unsafe(mmu_seq, gfn):
        kvm.journal.count("fault_retry")
        return RET_PF.RETRY, mmu_seq, None, None
    pfn, kfp = _kvm_faultin_pfn(kvm, slot, gfn, _FOLL_NOWAIT[write], caller="kvm_faultin_pfn")
    if pfn == KVM_PFN_ERR_NEEDS_IO or kfp.async_:
        pfn, kfp = _kvm_faultin_pfn(kvm, slot, gfn, _FOLL_INTERRUPTIBLE[write], caller="kvm_faultin_pfn")
    if is_error_noslot_pfn(pfn):
        return fault_error_to_errno(pfn), mmu_seq, pfn, kfp
    yield f"{label}: pfn resolved"
    if kvm.mmu_invalidate_retry_gfn_unsafe(mmu_seq, gfn):
        kvm_release_faultin(kvm, pfn, kfp, unused=True, dirty=False, caller="kvm_faultin_pfn", gfn=gfn)
        kvm.journal.count("fault_retry")
        return RET_PF.RETRY, mmu_seq, pfn, kfp
    return None, mmu_seq, pfn, kfp


class GenericStage2:
    """4 KiB-only stage-2 tables with W / host-writable / A / D bits."""

    name = "generic"

    def __init__(self, kvm, **opts):
        self.kvm = kvm

    # ---- storage ------------------------------------------------------------------------------
    @staticmethod
    def _tables(slot):
        if "s2" not in slot.arch:
            slot.arch["s2_pfn"] = np.full(slot.npages, -1, dtype=np.int64)
            slot.arch["s2"] = np.zeros(slot.npages, dtype=np.uint8)
        return slot.arch["s2_pfn"], slot.arch["s2"]

    # ---- faults -------------------------------------------------------------------------------
    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """The common fault: seq, faultin, lock, re-check, install, release, unlock."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        slot = kvm.gfn_to_memslot(gfn)
        kvm.journal.count("page_fault")
        if slot is None:
            return RET_PF.EMULATE                                  # MMIO: no memslot
        if slot.invalid:
            return RET_PF.RETRY
        if write and slot.readonly:
            return RET_PF.EMULATE
        r, mmu_seq, pfn, kfp = yield from kvm_mmu_faultin_pfn.steps(kvm, slot, gfn, write, "kvm_faultin_pfn")
        if r is not None:
            return r
        yield from kvm.mmu_lock.write_lock.steps()
        if kvm.mmu_invalidate_retry_gfn(mmu_seq, gfn):
            r = RET_PF.RETRY
            kvm.journal.count("fault_retry")
        else:
            r = self._map(slot, gfn, pfn, kfp, write)
        if kvm.policy.release_under_mmu_lock:
            kvm_release_faultin(kvm, pfn, kfp, unused=r == RET_PF.RETRY, dirty=kfp.map_writable,
                                caller="kvm_release_faultin_page", gfn=gfn)
        kvm.mmu_lock.write_unlock()
        yield "page fault: mmu_lock released"
        if not kvm.policy.release_under_mmu_lock:
            if kvm.mutations is not None and kvm.mutations.mark_dirty_after_unlock \
                    and r != RET_PF.RETRY and kfp.map_writable:          # kvmsim.explore: arm64 v6.12 order
                from kvmsim.kvm.pfn import kvm_set_pfn_dirty
                from kvmsim.trace import Src
                kvm_set_pfn_dirty(kvm, pfn, "user_mem_abort", source=Src.HELD, gfn=gfn)
            kvm_release_faultin(kvm, pfn, kfp, unused=r == RET_PF.RETRY, dirty=kfp.map_writable,
                                caller="kvm_release_pfn_clean", gfn=gfn)
        return r

    def _map(self, slot, gfn: int, pfn: int, kfp, write: bool) -> RET_PF:
        kvm = self.kvm
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        host_w = kfp.map_writable and not slot.readonly
        w = host_w and (write or not slot.logging)
        if bits[i] & _P and pfns[i] == pfn and (not write or bits[i] & _W):
            return RET_PF.SPURIOUS
        if bits[i] & _P and pfns[i] != pfn:
            self._zap(slot, i, i + 1, "mmu_set_spte: pfn change")
        new = _P | _A | (_HW if host_w else 0) | ((_W | _D) if w else 0) | (_H if kfp.hold != Hold.NONE else 0)
        pfns[i] = pfn
        bits[i] = new
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller="make_spte", locked=kvm.mmu_lock.held(),
                         extra={"writable": bool(w), "host_writable": bool(host_w)})
        if w and slot.logging:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, slot, gfn, None)
        return RET_PF.FIXED

    def guest_access(self, vcpu, gpa: int, write: bool, value: int | None) -> Access:
        """A guest load/store: through the leaf if :meth:`_leaf_allows` it, else a stage-2 fault."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        for _ in range(8):
            slot = kvm.gfn_to_memslot(gfn)
            if slot is not None and not slot.invalid:
                pfns, _ = self._tables(slot)
                i = gfn - slot.base_gfn
                if self._leaf_allows(vcpu, slot, i, write):
                    pfn = int(pfns[i])
                    if write:
                        kvm.phys.write(pfn, int(value or 0), "guest write", kvm=True)
                        return Access(Exit.OK, gpa, True, value)
                    return Access(Exit.OK, gpa, False, kvm.phys.read(pfn, "guest read", kvm=True))
            r = self.page_fault(vcpu, gpa, write)
            out = ret_to_access(int(r), gpa, write, value)
            if out is not None:
                return out
        return Access(Exit.EFAULT, gpa, write, value, errno.EFAULT)

    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """Does the leaf let the access through without a fault?  Here hardware sets A/D, and a write
        to a Host-writable read-only leaf is fixed locklessly first (the fast page fault)."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        if b & _P and write and not b & _W and b & _HW:              # fast page fault: restore W
            bits[i] |= _W | _D
            b = int(bits[i])
            self.kvm.journal.count("fast_page_fault")
            if slot.logging:
                from kvmsim.kvm.dirty import mark_page_dirty_in_slot
                mark_page_dirty_in_slot(self.kvm, slot, slot.base_gfn + i, vcpu)
        if b & _P and (not write or b & _W):
            bits[i] |= _A | (_D if write else 0)
            return True
        return False

    # ---- zapping, aging, dirty logging ---------------------------------------------------------------
    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """A/D bits of a zapped leaf go through the policy's ``spte_ad_lost`` hook (x86's v6.12 habit)."""
        self.kvm.policy.spte_ad_lost(self.kvm, pfn, dirty=bool(bits & _D), accessed=bool(bits & _A),
                                     caller=caller, gfn=gfn)

    def _zap(self, slot, lo: int, hi: int, reason: str) -> bool:
        if "s2" not in slot.arch:
            return False
        pfns, bits = self._tables(slot)
        present = np.nonzero(bits[lo:hi] & _P)[0] + lo
        for i in present:
            self._leaf_zapped(int(pfns[i]), int(bits[i]), "kvm_unmap_gfn_range", slot.base_gfn + int(i))
        pfns[lo:hi] = -1
        bits[lo:hi] = 0
        self.kvm.journal.count("spte_zap", len(present))
        return len(present) > 0

    @kpath
    def zap_leaf(self, slot, gfn: int) -> Steps:
        """Zap one leaf under mmu_lock: atomic xchg, or (``kvm.mutations.nonatomic_spte``) read, then clear."""
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        old_pfn, old = int(pfns[i]), int(bits[i])
        if self.kvm.mutations is not None and self.kvm.mutations.nonatomic_spte:
            yield "mmu_spte_clear_no_track: old_spte read, no volatile bits assumed"
        else:
            old = int(bits[i])                                   # xchg: reads what it clears
        pfns[i], bits[i] = -1, 0
        if old & _P:
            self._leaf_zapped(old_pfn, old, "kvm_zap_gfn_range", gfn)
        yield "kvm_zap_gfn_range: SPTE cleared"
        return bool(old & _P)

    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        return self._zap(slot, max(start, slot.base_gfn) - slot.base_gfn,
                         min(end, slot.base_gfn + slot.npages) - slot.base_gfn, reason)

    def age_gfn(self, slot, start: int, end: int) -> bool:
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        sl = slice(start - slot.base_gfn, end - slot.base_gfn)
        young = bool((bits[sl] & _A).any())
        bits[sl] &= ~np.uint8(_A)
        return young

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        return bool((bits[start - slot.base_gfn:end - slot.base_gfn] & _A).any())

    def flush_on_age(self) -> bool:
        return not self.kvm.v613_other

    def flush_shadow_memslot(self, slot) -> None:
        if self._zap(slot, 0, slot.npages, "memslot"):
            self.kvm.flush_remote_tlbs("flush_shadow_memslot")

    def flush_shadow_all(self) -> None:
        for slots in self.kvm.memslots:
            for slot in slots:
                self._zap(slot, 0, slot.npages, "flush_shadow_all")

    def prepare_memory_region(self, old, new, change) -> None:
        """``kvm_arch_prepare_memory_region()``: the generic stage-2 refuses nothing."""

    def slot_apply_flags(self, old, new, change) -> None:
        if new is not None and new.logging and (old is None or not old.logging) and "s2" in new.arch:
            _, bits = self._tables(new)
            bits[:] &= ~np.uint8(_W)
            self.kvm.flush_remote_tlbs("enable_dirty_logging")

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        if "s2" not in slot.arch:
            return
        _, bits = self._tables(slot)
        idx = gfn_offset + np.nonzero(mask)[0]
        bits[idx] &= ~np.uint8(_W)

    def leaf_arrays(self):
        """Present leaves per slot as arrays (the checker's vectorised view of :meth:`leaves`)."""
        for slots in self.kvm.memslots:
            for slot in slots:
                if "s2" not in slot.arch:
                    continue
                pfns, bits = self._tables(slot)
                i = np.nonzero(bits & _P)[0]
                b = bits[i].astype(np.int64)
                yield slot, {"idx": i, "pfn": pfns[i], "level": np.ones(len(i), np.uint8), "w": (b & _W) != 0,
                             "hw": (b & _HW) != 0, "mw": (b & _HW) != 0, "held": (b & _H) != 0}

    def leaves(self) -> Iterator[Leaf]:
        for slots in self.kvm.memslots:
            for slot in slots:
                if "s2" not in slot.arch:
                    continue
                pfns, bits = self._tables(slot)
                for i in np.nonzero(bits & _P)[0]:
                    b = int(bits[i])
                    yield Leaf(slot.base_gfn + int(i), int(pfns[i]), 1, bool(b & _W), bool(b & _HW), bool(b & _HW),
                               bool(b & _A), bool(b & _D), slot.id, bool(b & _H))
