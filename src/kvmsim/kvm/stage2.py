"""A minimal stage-2 MMU: the common fault pattern of every architecture (spec §2.14).

Enough for a fault to complete end to end, for generic tests and for architectures the model does
not detail; :mod:`kvmsim.x86` is the full x86 MMU.  Leaves live in per-slot numpy arrays, one entry
per 4 KiB gfn (``slot.arch["s2_pfn"]``, ``slot.arch["s2"]`` and ``slot.arch["s2_level"]``).  Its own
fault maps 4 KiB leaves only; an arch profile built on it (arm64, RISC-V) may install a block leaf
(2 MiB PMD / 1 GiB PUD, :meth:`GenericStage2.set_leaf`): every entry the block covers holds the
block's bits, its level and the consecutive pfn, so a guest access reads its own subpage; zapping,
aging, write-protection and :meth:`GenericStage2.leaves` act on whole leaves
(:meth:`GenericStage2.leaf_bounds`).  A/D bits captured at zap time go through the policy's
``spte_ad_lost`` hook (legacy pushes them to the pfn, the series does nothing), once per leaf.

Its legacy fault release is x86's v6.12 one (``kvm_release_pfn_clean()`` after unlocking, no dirty
mark).  arm64's v6.12 ``user_mem_abort()`` also called ``kvm_set_pfn_dirty()`` after
``read_unlock()`` for a writable fault; that order is :mod:`kvmsim.arm64` (``arch="arm64"``), and on
this MMU the explorer's ``mark-dirty-after-unlock`` mutation.
"""

from __future__ import annotations

from enum import IntFlag
from typing import Iterator

import numpy as np

from kvmsim.kvm.arch import Leaf
from kvmsim.kvm.fault import (FaultRet, KvmPageFault, kvm_fault_memslot, kvm_guest_access, kvm_handle_error_pfn,
                              kvm_stage2_fault)
from kvmsim.kvm.pfn import Hold
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGES_PER_PMD, PAGES_PER_PUD


class S2(IntFlag):
    PRESENT = 1
    W = 2
    HOST_W = 4
    A = 8
    D = 16
    HELD = 32          # model-only: the creating fault held a refcounted page


_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))
#: 4 KiB entries per leaf, by level (1: PAGE_SIZE, 2: PMD_SIZE block, 3: PUD_SIZE block).
LEAF_PAGES = np.array([1, 1, PAGES_PER_PMD, PAGES_PER_PUD], dtype=np.int64)


class GenericStage2:
    """Stage-2 tables with W / host-writable / A / D bits: 4 KiB leaves from its own fault, blocks from
    an arch profile's."""

    name = "generic"

    def __init__(self, kvm, **opts):
        self.kvm = kvm

    # ---- storage ------------------------------------------------------------------------------
    @staticmethod
    def _tables(slot):
        if "s2" not in slot.arch:
            slot.arch["s2_pfn"] = np.full(slot.npages, -1, dtype=np.int64)
            slot.arch["s2"] = np.zeros(slot.npages, dtype=np.uint8)
            slot.arch["s2_level"] = np.ones(slot.npages, dtype=np.uint8)
        return slot.arch["s2_pfn"], slot.arch["s2"]

    @staticmethod
    def _levels(slot) -> np.ndarray:
        """The level of the leaf covering each entry (1 where nothing or a 4 KiB leaf is mapped)."""
        GenericStage2._tables(slot)
        return slot.arch["s2_level"]

    @staticmethod
    def leaf_span(slot, i: int, level: int) -> tuple[int, int]:
        """Slot-relative ``[lo, hi)`` of the ``level`` leaf that covers entry ``i`` (a block is aligned in
        gfn space; the part of it inside the slot)."""
        n = int(LEAF_PAGES[level])
        start = (slot.base_gfn + i) // n * n - slot.base_gfn
        return max(start, 0), min(start + n, slot.npages)

    def leaf_bounds(self, slot, lo: int, hi: int) -> tuple[int, int]:
        """Widen ``[lo, hi)`` (slot-relative) to whole leaves."""
        if hi <= lo or "s2" not in slot.arch:
            return lo, hi
        lv = slot.arch["s2_level"]
        if lv[lo] > 1:
            lo = self.leaf_span(slot, lo, int(lv[lo]))[0]
        if lv[hi - 1] > 1:
            hi = self.leaf_span(slot, hi - 1, int(lv[hi - 1]))[1]
        return lo, hi

    def representatives(self, slot, lo: int, hi: int) -> np.ndarray:
        """Slot-relative indices in ``[lo, hi)`` of the first entry of each present leaf."""
        _, bits = self._tables(slot)
        lv = slot.arch["s2_level"][lo:hi].astype(np.int64)
        idx = np.arange(lo, hi)
        n = LEAF_PAGES[lv]
        first = np.maximum((slot.base_gfn + idx) // n * n - slot.base_gfn, 0) == idx
        return idx[((bits[lo:hi] & _P) != 0) & first]

    def set_leaf(self, slot, i: int, pfn: int, level: int, bits: int) -> tuple[int, int]:
        """Install a ``level`` leaf at the block that covers entry ``i``: ``pfn`` is the pfn of the
        block's first gfn; each entry gets its own consecutive pfn.  Any leaf there is overwritten
        (the caller zaps it first when the kernel does).  Returns the entries ``[lo, hi)``."""
        pfns, b = self._tables(slot)
        lo, hi = self.leaf_span(slot, i, level)
        first = (slot.base_gfn + i) // int(LEAF_PAGES[level]) * int(LEAF_PAGES[level]) - slot.base_gfn
        pfns[lo:hi] = pfn + np.arange(lo - first, hi - first)
        b[lo:hi] = bits
        slot.arch["s2_level"][lo:hi] = level
        return lo, hi

    def _leaf_mask(self, slot, idx) -> np.ndarray:
        """Entries of every leaf that covers one of ``idx`` (a block counts whole)."""
        mask = np.zeros(slot.npages, dtype=bool)
        mask[idx] = True
        lv = slot.arch["s2_level"]
        for i in np.asarray(idx)[lv[idx] > 1].tolist():
            lo, hi = self.leaf_span(slot, i, int(lv[i]))
            mask[lo:hi] = True
        return mask

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "generic"
    fault_labels = ("kvm_faultin_pfn: mmu_seq snapshot", "kvm_faultin_pfn: pfn resolved",
                    "page fault: mmu_lock released")
    fault_lock_read = False
    fault_faultin_nowait = True
    fault_logging_write_only = False
    fault_retry_ret = 0
    fault_retry_per_gfn = True
    fault_stale_invalid_slot = False
    handle_error_pfn = staticmethod(kvm_handle_error_pfn)
    fault_pfn_lookup = None           # the generic __kvm_faultin_pfn() attempts
    fault_before_lock = None
    fault_after_unlock = None
    emulate = None

    def fault_map(self, fault: KvmPageFault) -> int:
        return self._map(fault.slot, fault.gfn, fault.pfn, fault.kfp, fault.write)

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_faultin_page(..., fault->pfn, r == RET_PF_RETRY, ...)``: only a retry is unused."""
        return fault.result == FaultRet.RETRY

    # ---- faults -------------------------------------------------------------------------------
    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """The common fault: slot checks, then :func:`kvmsim.kvm.fault.kvm_stage2_fault`."""
        gfn, slot = kvm_fault_memslot(self.kvm, gpa)
        if slot is None:
            return FaultRet.EMULATE                                # MMIO: no memslot
        if slot.invalid:
            return FaultRet.RETRY
        if write and slot.readonly:
            return FaultRet.EMULATE
        r = yield from kvm_stage2_fault.steps(self, KvmPageFault(vcpu, gfn, slot, write, exec))
        return r

    def _map(self, slot, gfn: int, pfn: int, kfp, write: bool) -> FaultRet:
        kvm = self.kvm
        pfns, bits = self._tables(slot)
        i = gfn - slot.base_gfn
        host_w = kfp.map_writable and not slot.readonly
        w = host_w and (write or not slot.logging)
        if bits[i] & _P and pfns[i] == pfn and (not write or bits[i] & _W):
            return FaultRet.SPURIOUS
        if bits[i] & _P and pfns[i] != pfn:
            self._zap(slot, i, i + 1, "mmu_set_spte: pfn change")
        new = _P | _A | (_HW if host_w else 0) | ((_W | _D) if w else 0) | (_H if kfp.hold != Hold.NONE else 0)
        pfns[i] = pfn
        bits[i] = new
        slot.arch["s2_level"][i] = 1
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=pfn, gfn=gfn, kvm=True, caller="make_spte", locked=kvm.mmu_lock.held(),
                         extra={"writable": bool(w), "host_writable": bool(host_w)})
        if w and slot.logging:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, slot, gfn, None)
        return FaultRet.FIXED

    #: A guest load/store: :func:`kvmsim.kvm.fault.kvm_guest_access` (the one re-entry loop).
    guest_access = kvm_guest_access

    def leaf_access(self, vcpu, slot, i: int, write: bool) -> int | None:
        """The pfn the access goes to if :meth:`_leaf_allows` it, else None (a stage-2 fault)."""
        pfns, _ = self._tables(slot)
        if self._leaf_allows(vcpu, slot, i, write):
            return int(pfns[i])
        return None

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
        self.kvm.ops.spte_ad_lost(self.kvm, pfn, dirty=bool(bits & _D), accessed=bool(bits & _A),
                                     caller=caller, gfn=gfn)

    def _zap(self, slot, lo: int, hi: int, reason: str) -> bool:
        """Zap every leaf touching ``[lo, hi)`` (a block whole), marking each leaf's A/D once."""
        if "s2" not in slot.arch:
            return False
        pfns, bits = self._tables(slot)
        lo, hi = self.leaf_bounds(slot, lo, hi)
        present = self.representatives(slot, lo, hi)
        for i in present:
            self._leaf_zapped(int(pfns[i]), int(bits[i]), "kvm_unmap_gfn_range", slot.base_gfn + int(i))
        pfns[lo:hi] = -1
        bits[lo:hi] = 0
        slot.arch["s2_level"][lo:hi] = 1
        self.kvm.journal.count("spte_zap", len(present))
        return len(present) > 0

    @kpath
    def zap_leaf(self, slot, gfn: int) -> Steps:
        """Zap one leaf under mmu_lock with an atomic xchg (``mmu_spte_clear_track_bits()``: it reads what it
        clears).  The explorer's ``nonatomic-spte`` mutation replaces this (kvmsim.explore.mutations)."""
        pfns, bits = self._tables(slot)
        lo, hi = self.leaf_bounds(slot, gfn - slot.base_gfn, gfn - slot.base_gfn + 1)
        old_pfn, old = int(pfns[lo]), int(bits[lo])
        pfns[lo:hi], bits[lo:hi] = -1, 0
        slot.arch["s2_level"][lo:hi] = 1
        if old & _P:
            self._leaf_zapped(old_pfn, old, "kvm_zap_gfn_range", slot.base_gfn + lo)
        yield "kvm_zap_gfn_range: SPTE cleared"
        return bool(old & _P)

    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        return self._zap(slot, max(start, slot.base_gfn) - slot.base_gfn,
                         min(end, slot.base_gfn + slot.npages) - slot.base_gfn, reason)

    def age_gfn(self, slot, start: int, end: int) -> bool:
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        sl = slice(*self.leaf_bounds(slot, start - slot.base_gfn, end - slot.base_gfn))
        young = bool((bits[sl] & _A).any())
        bits[sl] &= ~np.uint8(_A)
        return young

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        if "s2" not in slot.arch:
            return False
        _, bits = self._tables(slot)
        return bool((bits[slice(*self.leaf_bounds(slot, start - slot.base_gfn, end - slot.base_gfn))] & _A).any())

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

    def wp_slot_on_log_dirty_commit(self, new, change, why: str) -> None:
        """arm64 ``kvm_mmu_wp_memory_region()`` / RISC-V ``gstage_wp_memory_region()`` from
        ``kvm_arch_commit_memory_region()``: with LOG_DIRTY_PAGES in the new slot (not a delete),
        write-protect the whole slot and flush (``why``)."""
        from kvmsim.kvm.memslot import KvmMrChange
        if new is None or not new.logging or change == KvmMrChange.DELETE:
            return
        if "s2" in new.arch:
            _, bits = self._tables(new)
            bits[:] &= ~np.uint8(_W | _HW)
        self.kvm.flush_remote_tlbs(why)

    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None:
        if "s2" not in slot.arch:
            return
        _, bits = self._tables(slot)
        idx = gfn_offset + np.nonzero(mask)[0]
        bits[self._leaf_mask(slot, idx)] &= ~np.uint8(_W)

    def leaf_arrays(self):
        """Present entries per slot as arrays (the checker's vectorised view of :meth:`leaves`): every
        4 KiB entry of a block too, with the block's level, so each subpage is checked against the host."""
        for slots in self.kvm.memslots:
            for slot in slots:
                if "s2" not in slot.arch:
                    continue
                pfns, bits = self._tables(slot)
                i = np.nonzero(bits & _P)[0]
                b = bits[i].astype(np.int64)
                yield slot, {"idx": i, "pfn": pfns[i], "level": slot.arch["s2_level"][i], "w": (b & _W) != 0,
                             "hw": (b & _HW) != 0, "mw": (b & _HW) != 0, "held": (b & _H) != 0,
                             "a": (b & _A) != 0, "d": (b & _D) != 0}

    def leaves(self) -> Iterator[Leaf]:
        for slots in self.kvm.memslots:
            for slot in slots:
                if "s2" not in slot.arch:
                    continue
                pfns, bits = self._tables(slot)
                lv = slot.arch["s2_level"]
                for i in self.representatives(slot, 0, slot.npages):
                    b = int(bits[i])
                    yield Leaf(slot.base_gfn + int(i), int(pfns[i]), int(lv[i]), bool(b & _W), bool(b & _HW),
                               bool(b & _HW), bool(b & _A), bool(b & _D), slot.id, bool(b & _H))
