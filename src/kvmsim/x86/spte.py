"""x86 SPTEs (arch/x86/kvm/mmu/spte.h, spte.c, v6.13): bits, per-slot tables and INV-11.

Leaves live in per-memslot numpy arrays at 4 KiB granularity (:class:`SptTable`): a 2 MiB or 1 GiB
leaf occupies 512 / 262,144 consecutive entries that share its bits and level, each entry holding
the pfn of its own 4 KiB piece (``spte_to_pfn(huge) + offset``).  The entry whose gfn is aligned to
the leaf size is the leaf's *representative*: A/D losses are reported once per leaf, as the kernel's
``handle_changed_spte()`` does on the one SPTE.

Every SPTE write goes through :func:`spte_write`, which checks INV-11 (W ⇒ MMU-writable ⇒
Host-writable; Host-writable immutable and the pfn unchanged while the same leaf stays present)
and reports A/D bits that the write loses through the policy (:func:`handle_changed_spte`).
"""

from __future__ import annotations

from enum import IntFlag

import numpy as np

from kvmsim.types import LEVEL_PAGES


class SPTE(IntFlag):
    """Model encoding of an x86 SPTE (spte.h masks, not their hardware positions)."""

    PRESENT = 1 << 0          # is_shadow_present_pte()
    W = 1 << 1                # PT_WRITABLE_MASK
    HOST_W = 1 << 2           # shadow_host_writable_mask
    MMU_W = 1 << 3            # shadow_mmu_writable_mask
    A = 1 << 4                # shadow_accessed_mask
    D = 1 << 5                # shadow_dirty_mask
    ACC_TRACK = 1 << 6        # access-tracked: hardware not-present, W saved in SAVED_W
    SAVED_W = 1 << 7          # SHADOW_ACC_TRACK_SAVED_BITS (the W bit)
    MMIO = 1 << 8             # MMIO SPTE (pfn array holds the memslot generation)
    HELD = 1 << 9             # model-only: the creating fault held a refcounted page
    AD_DISABLED = 1 << 10     # SPTE_TDP_AD_DISABLED
    AD_WRPROT_ONLY = 1 << 11  # SPTE_TDP_AD_WRPROT_ONLY (A/D used, dirty logging by write-protection)


P, W, HW, MW, A, D, AT, SW, MMIO, HELD, ADX = (int(f) for f in (
    SPTE.PRESENT, SPTE.W, SPTE.HOST_W, SPTE.MMU_W, SPTE.A, SPTE.D, SPTE.ACC_TRACK, SPTE.SAVED_W, SPTE.MMIO,
    SPTE.HELD, SPTE.AD_DISABLED))
U16 = np.uint16


def nbits(x: int):
    """``~x`` as the table's dtype, for ``bits &= nbits(X)``."""
    return U16(~x & 0xFFFF)


def is_dirty_spte(bits):
    """``is_dirty_spte()``: D, or W when A/D bits are disabled (works on scalars and arrays)."""
    return np.where(bits & ADX, bits & W, bits & D) != 0


def is_accessed_spte(bits):
    """``is_accessed_spte()``: A, or "not access-tracked" when A/D bits are disabled."""
    return np.where(bits & ADX, (bits & AT) == 0, (bits & A) != 0) & ((bits & P) != 0)


class SptTable:
    """The leaf SPTEs of one memslot, one entry per 4 KiB gfn."""

    __slots__ = ("pfn", "bits", "level")

    def __init__(self, npages: int):
        self.pfn = np.full(npages, -1, dtype=np.int64)
        self.bits = np.zeros(npages, dtype=np.uint16)
        self.level = np.zeros(npages, dtype=np.uint8)

    def entry(self, i: int) -> tuple[int, int, int]:
        """(bits, level, pfn) of entry ``i`` as ints; a not-present entry's level and pfn are not read
        (0, -1): the fault path looks at them only under a present SPTE."""
        b = self.bits.item(i)
        if not b & P:
            return b, 0, -1
        return b, self.level.item(i), self.pfn.item(i)

    def leaf_bounds(self, slot, lo: int, hi: int) -> tuple[int, int]:
        """Widen ``[lo, hi)`` (slot-relative) to whole leaves."""
        if hi <= lo:
            return lo, hi
        lv = int(self.level[lo])
        if lv > 1:
            n = LEVEL_PAGES[lv]
            lo = (slot.base_gfn + lo) // n * n - slot.base_gfn
        lv = int(self.level[hi - 1])
        if lv > 1:
            n = LEVEL_PAGES[lv]
            hi = -(-(slot.base_gfn + hi) // n) * n - slot.base_gfn
        return max(lo, 0), min(hi, len(self.bits))

    def representatives(self, slot, lo: int, hi: int, bits=None, level=None) -> np.ndarray:
        """Slot-relative indices in ``[lo, hi)`` of the first entry of each present leaf."""
        bits = self.bits[lo:hi] if bits is None else bits
        level = self.level[lo:hi] if level is None else level
        idx = np.arange(lo, hi)
        size = np.array([0, 1, LEVEL_PAGES[2], LEVEL_PAGES[3]], dtype=np.int64)[level]
        first = ((slot.base_gfn + idx) % np.maximum(size, 1)) == 0
        return idx[(bits & P).astype(bool) & (bits & MMIO == 0) & first]


LEAF_PAGES = np.array([1, 1, LEVEL_PAGES[2], LEVEL_PAGES[3]], dtype=np.int64)     # 4 KiB entries per leaf, by level


def tables(slot) -> SptTable:
    t = slot.arch.get("x86")
    if t is None:
        t = slot.arch["x86"] = SptTable(slot.npages)
    return t


def check_inv11(kvm, slot, lo, old_bits, old_pfn, old_level, new_bits, new_pfn, new_level, caller: str) -> None:
    """INV-11 on a write of entries ``[lo, lo+len)``: records ``inv11`` facts and a counter."""
    # present and (W without MMU-writable, or MMU-writable without Host-writable): two masked compares
    bad = ((new_bits & (P | W | MW)) == (P | W)) | ((new_bits & (P | MW | HW)) == (P | MW))
    changed = ((old_bits ^ new_bits) & HW) != 0
    if new_pfn is not old_pfn:
        changed |= old_pfn != new_pfn
    if changed.any():                                    # Host-writable or the pfn changed somewhere
        same_leaf = ((old_bits & P) != 0) & ((new_bits & P) != 0)
        if new_level is not old_level:
            same_leaf &= old_level == new_level
        bad |= same_leaf & changed
    if bad.any():
        where = np.nonzero(bad)[0]
        kvm.journal.count("inv11", len(where))
        for i in where[:16]:
            kvm.journal.fact("inv11", gfn=slot.base_gfn + lo + int(i), pfn=int(new_pfn[i]), caller=caller, kvm=True,
                             detail=f"SPTE {int(old_bits[i]):#x}@{int(old_pfn[i])} -> {int(new_bits[i]):#x}"
                                    f"@{int(new_pfn[i])}: W ⇒ MMU-W ⇒ Host-W, Host-W/pfn immutable while present")


def handle_changed_spte(kvm, slot, lo: int, old_bits, old_pfn, old_level, new_bits, new_pfn, new_level,
                        caller: str) -> None:
    """The A/D part of ``handle_changed_spte()`` (tdp_mmu.c) / ``mmu_spte_update()`` (mmu.c), v6.12.

    For each old leaf (its representative entry) whose dirty or accessed state the write loses
    (zapped, replaced by another level, pfn changed, or the bit cleared), hand the old pfn to
    ``kvm.ops.spte_ad_lost_bulk`` (the VM's resolved hook): legacy ``kvm_set_pfn_dirty/accessed``, the series nothing.
    """
    rep = ((old_bits & P) != 0) & ((old_bits & MMIO) == 0)
    if not rep.any():
        return
    if old_level.max() > 1:                              # a huge leaf is reported at its first entry only
        size = LEAF_PAGES[old_level]
        rep &= ((slot.base_gfn + lo + np.arange(len(old_bits))) % size) == 0
    gone = ((new_bits & P) == 0) | (new_level != old_level) | (new_pfn != old_pfn)
    dirty = rep & is_dirty_spte(old_bits) & (gone | ~is_dirty_spte(new_bits))
    acc = rep & is_accessed_spte(old_bits) & (gone | ~is_accessed_spte(new_bits))
    lost = dirty | acc
    if lost.any():
        kvm.ops.spte_ad_lost_bulk(kvm, old_pfn[lost], dirty[lost], acc[lost], caller)


_SCALAR = (int, np.integer)        # a scalar argument to spte_write (np.ndim() costs a µs per call)


def spte_write(kvm, slot, lo: int, hi: int, new_bits, new_pfn=None, new_level=None, *, caller: str,
               track: bool = True) -> None:
    """Write entries ``[lo, hi)`` of ``slot``'s table (scalars broadcast); INV-11, A/D loss, counters.

    ``track=False`` skips the A/D-loss report, for writes the kernel makes without
    ``handle_changed_spte`` (aging's ``tdp_mmu_clear_spte_bits``, which captures what it needs itself).
    """
    t = tables(slot)
    if hi - lo == 1 and isinstance(new_bits, _SCALAR) and (new_pfn is None or isinstance(new_pfn, _SCALAR)) \
            and (new_level is None or isinstance(new_level, _SCALAR)):
        spte_write_one(kvm, slot, t, lo, int(new_bits), new_pfn, new_level, caller=caller, track=track)
        return
    if new_bits.__class__ in _SCALAR_TYPES and int(new_bits) & P and _install_fresh(kvm, t, lo, hi, int(new_bits),
                                                                               new_pfn, new_level):
        return
    # old values: copies of what this write overwrites, views of what it leaves alone
    old_bits = t.bits[lo:hi].copy()
    old_pfn = t.pfn[lo:hi] if new_pfn is None else t.pfn[lo:hi].copy()
    old_level = t.level[lo:hi] if new_level is None else t.level[lo:hi].copy()
    nb = np.broadcast_to(np.asarray(new_bits, dtype=np.uint16), old_bits.shape)
    npf = old_pfn if new_pfn is None else np.broadcast_to(np.asarray(new_pfn, dtype=np.int64), old_pfn.shape)
    nl = old_level if new_level is None else np.broadcast_to(np.asarray(new_level, dtype=np.uint8), old_level.shape)
    check_inv11(kvm, slot, lo, old_bits, old_pfn, old_level, nb, npf, nl, caller)
    if track:
        handle_changed_spte(kvm, slot, lo, old_bits, old_pfn, old_level, nb, npf, nl, caller)
    t.bits[lo:hi] = nb
    if new_pfn is not None:
        t.pfn[lo:hi] = npf
    if new_level is not None:
        t.level[lo:hi] = nl
    changed = old_bits != nb
    if new_pfn is not None:
        changed |= old_pfn != npf
    if new_level is not None:
        changed |= old_level != nl
    if changed.any():
        kvm.journal.count("spte_write", _leaves_in(slot, lo, old_level, nl, changed))


_SCALAR_TYPES = (int, np.uint16, np.int64)


def _install_fresh(kvm, t, lo: int, hi: int, nb: int, new_pfn, new_level) -> bool:
    """:func:`spte_write` of one present 4 KiB SPTE value over entries none of which is present (a
    first fault of each page): INV-11's same-leaf rules and A/D losses need an old present SPTE, so
    only the new value's W ⇒ MMU-writable ⇒ Host-writable is checked, once; every entry changes.
    False, with nothing written, when the write is not such a one."""
    if new_level is None or not isinstance(new_level, _SCALAR) or int(new_level) != 1 or \
            (nb & W and not nb & MW) or (nb & MW and not nb & HW):
        return False
    if (t.bits[lo:hi] & P).any() or t.level[lo:hi].max() > 1:
        return False
    t.bits[lo:hi] = nb
    if new_pfn is not None:
        t.pfn[lo:hi] = new_pfn
    t.level[lo:hi] = 1
    kvm.journal.count("spte_write", hi - lo)
    return True


def spte_write_one(kvm, slot, t: SptTable, i: int, nb: int, new_pfn: int | None = None, new_level: int | None = None,
                   *, caller: str, track: bool = True) -> None:
    """:func:`spte_write` for one 4 KiB entry ``i`` of ``t`` (``tables(slot)``), in plain integers (the
    scalar fault path)."""
    ob, op, ol = t.bits.item(i), t.pfn.item(i), t.level.item(i)
    npf = op if new_pfn is None else int(new_pfn)
    nl = ol if new_level is None else int(new_level)
    if nb & P and ((nb & W and not nb & MW) or (nb & MW and not nb & HW)
                   or (ob & P and ol == nl and ((ob ^ nb) & HW or op != npf))):
        check_inv11(kvm, slot, i, np.array([ob], np.uint16), np.array([op], np.int64), np.array([ol], np.uint8),
                    np.array([nb], np.uint16), np.array([npf], np.int64), np.array([nl], np.uint8), caller)
    if track and ob & P and not ob & MMIO:
        handle_changed_spte(kvm, slot, i, np.array([ob], np.uint16), np.array([op], np.int64),
                            np.array([ol], np.uint8), np.array([nb], np.uint16), np.array([npf], np.int64),
                            np.array([nl], np.uint8), caller)
    t.bits[i] = nb
    t.pfn[i] = npf
    t.level[i] = nl
    if ob != nb or op != npf or ol != nl:
        kvm.journal.count("spte_write")


def _leaves_in(slot, lo, old_level, new_level, changed) -> int:
    """Number of SPTEs (not 4 KiB entries) a write touched: one per leaf."""
    lvl = np.maximum(old_level, new_level)
    if lvl.max() <= 1:
        return int(np.count_nonzero(changed)) or 1
    size = LEAF_PAGES[lvl]
    rel = np.arange(len(changed))
    return int(np.count_nonzero(changed & (((slot.base_gfn + lo + rel) % size) == 0))) or 1


def make_spte(*, host_writable: bool, writable: bool, prefetch: bool, ad_disabled: bool, held: bool) -> int:
    """``make_spte()``: HOST_W from the host mapping; W|MMU_W|D if writable; A unless prefetched."""
    bits = P | (HW if host_writable else 0) | (HELD if held else 0)
    if writable:
        bits |= W | MW | (0 if ad_disabled else D)
    elif host_writable:
        bits |= MW                                   # write-protected for dirty logging: fast-fault fixable
    if ad_disabled:
        bits |= ADX
        if prefetch:                                 # mark_spte_for_access_track(): R/X saved, never W
            bits = (bits | AT) & ~W
    elif not prefetch:
        bits |= A
    return bits
