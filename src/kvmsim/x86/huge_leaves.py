"""Huge leaves per leaf, not per 4 KiB entry: the bulk range paths of a hugetlb-backed slot
(arch/x86/kvm/mmu/tdp_mmu.c ``kvm_tdp_mmu_map()``, ``tdp_mmu_split_huge_pages_root()``,
``zap_collapsible_spte_range()``, v6.13).

The slot's table (:class:`kvmsim.x86.spte.SptTable`) keeps one entry per 4 KiB gfn, so a 1 GiB leaf
is 262,144 entries.  The generic writer :func:`kvmsim.x86.spte.spte_write` compares every entry
before and after (INV-11, A/D loss, the ``spte_write`` count).  Where the shape of a write is known
per leaf, these helpers do that bookkeeping once per leaf (its representative entry) and fill the
entries with slices:

* :func:`max_mapping_levels_span`: ``kvm_mmu_max_mapping_level()`` over a run of gfns, with the
  memslot alignment checks per region instead of per gfn;
* :func:`install_leaves`: ``make_spte()`` for consecutive leaves over entries that hold nothing;
* :func:`split_run`: the eager split of a run of whole huge leaves down to 4 KiB;
* :func:`zap_small_span`: zapping a run of 4 KiB leaves (``zap_collapsible_spte_range()``);
* :func:`recover_span`: huge-page recovery in place over side-by-side regions of 4 KiB leaves.

Each returns False (nothing done) when its precondition does not hold; the caller then takes the
generic path, so state, counters and reports are always those of :func:`spte_write`
(tests/x86/test_huge_leaves.py checks both against each other).
"""

from __future__ import annotations

import numpy as np

from kvmsim.types import LEVEL_PAGES
from kvmsim.x86.spte import ADX, AT, HW, MMIO, MW, A, D, P, W, LEAF_PAGES
from kvmsim.x86 import tdp_mmu

#: INV-11 on the low SPTE bits (P, W, HOST_W, MMU_W): present and (W without MMU-W, or MMU-W without
#: Host-W), by ``bits & 0xF`` (check_inv11()'s test when the leaf and its pfn stay the same).
_INV11_BAD = np.zeros(16, dtype=bool)
for _b in range(16):
    _INV11_BAD[_b] = bool(_b & P) and ((bool(_b & W) and not _b & MW) or (bool(_b & MW) and not _b & HW))
del _b


def inv11_clean(bits: np.ndarray) -> bool:
    """No present entry of ``bits`` breaks W ⇒ MMU-writable ⇒ Host-writable."""
    return not _INV11_BAD[bits & 0xF].any()


def max_mapping_levels_span(kvm, slot, lo: int, hi: int, max_level: int) -> np.ndarray:
    """:func:`kvmsim.x86.tdp_mmu.max_mapping_levels` over ``[lo, hi)``: the host level per gfn, then the
    ``lpage_info`` disallows per level, which are per region: the hva misaligned for the level (the
    whole slot), or a region crossing the slot's start or end (only the first and last region of
    the span can)."""
    if slot.logging or max_level <= 1:
        return np.ones(hi - lo, dtype=np.uint8)
    lv = tdp_mmu.host_levels(kvm, slot, lo, hi)
    if max_level < 3:
        np.minimum(lv, max_level, out=lv)
    if lv.max() <= 1:
        return lv
    base, end = slot.base_gfn, slot.base_gfn + slot.npages
    for level in (3, 2):
        n = LEVEL_PAGES[level]
        if ((slot.userspace_addr >> 12) - base) % n:
            np.minimum(lv, level - 1, out=lv)             # every region of the slot is disallowed
            continue
        g0 = base + lo
        first_end = min(hi, (g0 // n + 1) * n - base)     # the first region's part of the span
        if g0 // n * n < base:
            sub = lv[:first_end - lo]
            np.minimum(sub, level - 1, out=sub)
        g1 = base + hi - 1
        last_start = max(lo, g1 // n * n - base)
        if g1 // n * n + n > end:
            sub = lv[last_start - lo:]
            np.minimum(sub, level - 1, out=sub)
    return lv


def install_leaves(kvm, slot, t, starts, base_pfns, levels, bits: int, caller: str) -> bool:
    """``make_spte()`` of leaves that follow one another with no gap (``starts`` ascending), where
    every entry they cover is empty (not present, level 0): one slice write per array, one
    ``spte_write`` count per leaf.  INV-11 is judged on ``bits`` (every entry gets them), and an
    empty entry loses no A/D bit, so :func:`spte_write` would report nothing either."""
    size = LEAF_PAGES[levels]
    lo, hi = int(starts[0]), int(starts[-1] + size[-1])
    if len(starts) > 1 and (starts[1:] != starts[:-1] + size[:-1]).any():
        return False
    if _INV11_BAD[bits & 0xF] or (t.bits[lo:hi] & P).any() or t.level[lo:hi].any():
        return False
    t.bits[lo:hi] = bits
    if len(starts) == 1:
        t.pfn[lo:hi] = np.arange(int(base_pfns[0]), int(base_pfns[0]) + hi - lo)
        t.level[lo:hi] = levels[0]
    else:
        pfn = t.pfn[lo:hi]
        pfn[:] = np.repeat(base_pfns - (starts - lo), size)
        pfn += np.arange(hi - lo)
        t.level[lo:hi] = np.repeat(levels, size)
    kvm.journal.count("spte_write", len(starts))
    return True


def split_run(kvm, slot, t, lo: int, hi: int, caller: str = "tdp_mmu_split_huge_page") -> bool:
    """:func:`kvmsim.x86.tdp_mmu.split_range` to 4 KiB of ``[lo, hi)``, a run of whole, present huge
    leaves inside one 1 GiB piece: per step (1 GiB to 2 MiB, then 2 MiB to 4 KiB, pre-order as
    ``tdp_mmu_split_huge_pages_root()``) each leaf that becomes a page table reports its A/D bits
    once, at its representative entry, and counts one SPTE write; the children keep the bits and
    the consecutive pfns, so only the level changes."""
    bits = t.bits[lo:hi]
    lv = t.level[lo:hi]
    blocks = np.arange(lo, hi, LEVEL_PAGES[2])                  # one entry per 2 MiB
    bb, bl = t.bits[blocks], lv[::LEVEL_PAGES[2]]
    if (slot.base_gfn + lo) % LEVEL_PAGES[2] or (hi - lo) % LEVEL_PAGES[2] or (bl < 2).any() \
            or ((bb & (P | MMIO)) != P).any() or _INV11_BAD[bb & 0xF].any() \
            or (bits.reshape(-1, LEVEL_PAGES[2]) != bb[:, None]).any():
        return False                                             # (every entry has its block's bits)
    size = LEAF_PAGES[bl]
    reps = ((slot.base_gfn + blocks) % size) == 0                # a leaf's first block
    per = size[reps] // LEVEL_PAGES[2]
    if not reps[0] or int(per.sum()) != len(blocks) or (bl != np.repeat(bl[reps], per)).any() \
            or (lv.reshape(-1, LEVEL_PAGES[2]) != bl[:, None]).any():
        return False                                             # not whole leaves of one level each
    nhuge = int(np.count_nonzero(reps))
    for step in (2, 1):
        gone = reps & (bl > step) if step == 2 else np.ones(len(blocks), dtype=bool)
        if not gone.any():
            continue
        ob = bb[gone]
        dirty = np.where(ob & ADX, ob & W, ob & D) != 0
        acc = np.where(ob & ADX, (ob & AT) == 0, (ob & A) != 0)
        lost = dirty | acc
        if lost.any():
            kvm.ops.spte_ad_lost_bulk(kvm, t.pfn[blocks[gone]][lost], dirty[lost], acc[lost], caller)
        kvm.journal.count("spte_write", int(np.count_nonzero(gone)))
    lv[:] = 1
    kvm.journal.count("split", nhuge)
    return True


def zap_small_span(kvm, slot, t, lo: int, hi: int, caller: str) -> bool:
    """``spte_write(kvm, slot, lo, hi, 0, -1, 0)`` plus the ``spte_zap`` count over entries that hold
    no huge leaf: every present entry is its own leaf and loses its A/D bits; an empty entry
    breaks no INV-11."""
    lv = t.level[lo:hi]
    if lv.max() > 1:
        return False
    bits = t.bits[lo:hi]
    pfn = t.pfn[lo:hi]
    _lose_ad_small(kvm, bits, pfn, caller)
    nleaves = int(np.count_nonzero((bits & (P | MMIO)) == P))
    if nleaves == hi - lo:
        changed = nleaves                            # every entry present: every entry changes
    else:
        changed = int(np.count_nonzero((bits != 0) | (pfn != -1) | (lv != 0)))
    bits[:] = 0
    pfn[:] = -1
    lv[:] = 0
    if changed:
        kvm.journal.count("spte_write", changed)
    kvm.journal.count("spte_zap", nleaves)
    return True


def uniform_leaves(slot, span: tuple[int, int], levels: np.ndarray):
    """The leaves of a span of gfns ``[lo, hi)`` that all map at one huge level: ``(first, starts)``,
    the position in the span of each leaf's first gfn (in gfn order) and the leaf's slot-relative
    start (before ``lo`` for a leaf the span enters midway); None when the levels differ."""
    lo, hi = span
    lv = int(levels[0])
    if lv <= 1 or not (levels == lv).all():
        return None
    n = LEVEL_PAGES[lv]
    g0 = slot.base_gfn + lo
    starts = np.arange(g0 // n * n, slot.base_gfn + hi, n, dtype=np.int64)
    first = np.maximum(starts, g0) - g0
    return first, starts - slot.base_gfn


def _lose_ad_small(kvm, bits: np.ndarray, pfn: np.ndarray, caller: str) -> None:
    """The A/D report of :func:`kvmsim.x86.spte.handle_changed_spte` for 4 KiB leaves that all go
    (zapped or replaced by a huge leaf): every present, non-MMIO entry is its own leaf."""
    rep = (bits & (P | MMIO)) == P
    if (bits & ADX).any():
        dirty = rep & (np.where(bits & ADX, bits & W, bits & D) != 0)
        acc = rep & np.where(bits & ADX, (bits & AT) == 0, (bits & A) != 0)
    else:
        dirty = rep & ((bits & D) != 0)
        acc = rep & ((bits & A) != 0)
    lost = dirty | acc
    if lost.all():                                   # the usual case: every leaf was accessed
        kvm.ops.spte_ad_lost_bulk(kvm, pfn, dirty, acc, caller)
    elif lost.any():
        kvm.ops.spte_ad_lost_bulk(kvm, pfn[lost], dirty[lost], acc[lost], caller)


def recover_span(kvm, slot, t, starts: np.ndarray, level: int) -> int | None:
    """``make_huge_spte()`` in place over side-by-side ``level`` regions ``starts`` (one 1 GiB
    piece) whose entries are all present, non-MMIO 4 KiB leaves: each region takes its first
    child's bits and the host's consecutive pfns, where the host maps the region's first gfn at the
    child's pfn (else the region is left alone, as :func:`kvmsim.x86.tdp_mmu.recover_huge_pages`
    does).  Returns the regions recovered, or None (nothing done) when the shape does not hold."""
    n = LEVEL_PAGES[level]
    lo, hi = int(starts[0]), int(starts[-1]) + n
    if hi - lo != len(starts) * n:
        return None
    bits, pfn, lv = t.bits[lo:hi], t.pfn[lo:hi], t.level[lo:hi]
    if ((bits & (P | MMIO)) != P).any() or (lv != 1).any():
        return None
    child = bits[::n]
    _, hpfn = tdp_mmu._host_at(kvm, slot, starts)
    if (hpfn != pfn[::n]).any() or _INV11_BAD[child & 0xF].any():
        return None
    _lose_ad_small(kvm, bits, pfn, "make_huge_spte")
    bits.reshape(-1, n)[:] = child.copy()[:, None]
    rows = pfn.reshape(-1, n)                                    # a view: one row per region
    rows[:] = hpfn[:, None]
    rows += np.arange(n)
    lv[:] = level
    kvm.journal.count("spte_write", len(starts))
    return len(starts)


def leaf_firsts(starts: np.ndarray) -> np.ndarray | None:
    """For per-page leaf starts in gfn order (non-decreasing): the position of each leaf's first
    page, so a loop runs once per leaf, not once per 4 KiB page; None when not in order."""
    if len(starts) < 2 or (starts[1:] >= starts[:-1]).all():
        return np.flatnonzero(np.concatenate(([True], starts[1:] != starts[:-1])))
    return None
