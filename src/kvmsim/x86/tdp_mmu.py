"""Range operations on x86 leaf SPTEs (arch/x86/kvm/mmu/tdp_mmu.c, v6.13): zap, age, write-protect,
clear-dirty, split, zap-collapsible and huge-page recovery; all vectorised over a slot's table.

Index arguments are slot-relative 4 KiB offsets ``[lo, hi)``; every write goes through
:func:`kvmsim.x86.spte.spte_write` (INV-11 check, A/D-loss hook, ``spte_write`` counter).
"""

from __future__ import annotations

import numpy as np

from kvmsim.mm.vma import Pte
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT
from kvmsim.x86 import huge_leaves
from kvmsim.x86.spte import (ADX, AT, MW, P, SW, W, A, D, MMIO, is_accessed_spte, nbits, spte_write,
                             tables, LEAF_PAGES)

_PTE_PRESENT = int(Pte.PRESENT)


def host_levels(kvm, slot, lo: int, hi: int) -> np.ndarray:
    """``host_pfn_mapping_level()`` for each gfn of ``[lo, hi)`` (1 where the host maps nothing)."""
    out = np.ones(hi - lo, dtype=np.uint8)
    h0 = slot.userspace_addr + (lo << PAGE_SHIFT)
    h1 = slot.userspace_addr + (hi << PAGE_SHIFT)
    vma = kvm.mm.vma_lookup(h0)
    if vma is not None and vma.end >= h1:
        lv = vma.pte_level[vma.idx(h0):vma.idx(h1)]
        if lv.max() <= 1 and lv.min() >= 1:             # one VMA the host maps in 4 KiB pages: all 1
            return out
    for vma in kvm.mm.vmas_in(h0, h1):
        a, b = max(h0, vma.start), min(h1, vma.end)
        i0, i1 = vma.idx(a), vma.idx(b)
        present = ((vma.pte[i0:i1] & _PTE_PRESENT) != 0) & (vma.pte_pfn[i0:i1] >= 0)
        o = (a - h0) >> PAGE_SHIFT
        out[o:o + i1 - i0] = np.where(present, vma.pte_level[i0:i1], 1)
    return out


def host_pfn_mapping_level(kvm, gfn: int, slot) -> int:
    """Mirrors ``host_pfn_mapping_level()`` (arch/x86/kvm/mmu/mmu.c): the level the host page tables map
    ``gfn``'s hva at; 1 when nothing is mapped there.  Like the kernel, x86 walks ``kvm->mm``'s page
    tables itself (``__gfn_to_hva_memslot()``, then a lockless ``READ_ONCE()`` walk from
    ``pgd_offset()``): the model's tables are per VMA, so the walk finds the VMA (``pgd_offset()``'s
    part) and reads its PTE arrays directly.  :func:`host_levels` is the same over a range."""
    hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
    vma = kvm.mm.vma_lookup(hva)
    if vma is None:
        return 1
    i = (hva - vma.start) >> PAGE_SHIFT
    if not vma.pte.item(i) & _PTE_PRESENT or vma.pte_pfn.item(i) < 0:
        return 1
    return vma.pte_level.item(i)


def max_mapping_level(kvm, slot, i: int, max_level: int) -> int:
    """:func:`max_mapping_levels` for one gfn, in plain integers (the scalar fault path)."""
    if max_level <= 1 or slot.logging:          # kvm_slot_dirty_track_enabled(): read-only slots too
        return 1
    gfn = slot.base_gfn + i
    lv = min(host_pfn_mapping_level(kvm, gfn, slot), max_level)
    if lv == 1:                                 # the host maps 4 KiB: nothing to align
        return 1
    for level in (3, 2):
        if lv < level:
            continue
        n = LEVEL_PAGES[level]
        start = gfn // n * n
        if start < slot.base_gfn or start + n > slot.base_gfn + slot.npages or \
                ((slot.userspace_addr >> PAGE_SHIFT) - slot.base_gfn) % n:
            lv = level - 1
    return lv


def max_mapping_levels(kvm, slot, lo: int, hi: int, max_level: int, *, logging: bool | None = None) -> np.ndarray:
    """``kvm_mmu_max_mapping_level()`` per gfn: host level, memslot alignment (``lpage_info``
    disallow for misaligned gfn/hva or a huge page crossing the slot), dirty logging, ``max_level``."""
    logging = slot.logging if logging is None else logging
    if logging or max_level <= 1:
        return np.ones(hi - lo, dtype=np.uint8)
    lv = np.minimum(host_levels(kvm, slot, lo, hi), max_level)
    if lv.max() <= 1:                                   # the host maps only 4 KiB: nothing to align
        return lv.astype(np.uint8)
    gfn = slot.base_gfn + np.arange(lo, hi)
    for level in (3, 2):
        n = LEVEL_PAGES[level]
        start = gfn // n * n
        bad = (start < slot.base_gfn) | (start + n > slot.base_gfn + slot.npages) | \
            (((slot.userspace_addr >> PAGE_SHIFT) - slot.base_gfn) % n != 0)
        lv = np.where((lv >= level) & bad, level - 1, lv)
    return lv.astype(np.uint8)


def zap_range(kvm, slot, lo: int, hi: int, caller: str) -> bool:
    """``kvm_tdp_mmu_unmap_gfn_range()`` / ``tdp_mmu_zap_leafs()``: zap every leaf touching the range."""
    t = slot.arch.get("x86")
    if t is None:
        return False
    lo, hi = t.leaf_bounds(slot, lo, hi)
    present = (t.bits[lo:hi] & P) != 0
    if not present.any():
        return False
    nleaves = len(t.representatives(slot, lo, hi))
    spte_write(kvm, slot, lo, hi, 0, -1, 0, caller=caller)
    kvm.journal.count("spte_zap", nleaves)
    return True


def age_range(kvm, slot, lo: int, hi: int, *, clear: bool, caller: str = "kvm_tdp_mmu_age_gfn_range") -> bool:
    """``kvm_tdp_mmu_age_gfn_range()`` / ``test_age_gfn()``: A bit, or access tracking without A/D."""
    t = slot.arch.get("x86")
    if t is None:
        return False
    lo, hi = t.leaf_bounds(slot, lo, hi)
    bits = t.bits[lo:hi]
    young = is_accessed_spte(bits) & ((bits & MMIO) == 0)
    if not young.any() or not clear:
        return bool(young.any())
    new = bits.copy()
    ad = young & ((bits & ADX) == 0)
    new[ad] &= nbits(A)
    nad = young & ((bits & ADX) != 0)
    if nad.any():
        # "Capture the dirty status of the page, so that it doesn't get lost when the SPTE is marked
        # for access tracking" (legacy kvm_set_pfn_dirty on a writable SPTE; the series drops it).
        reps = t.representatives(slot, lo, hi)
        wr = reps[((t.bits[reps] & W) != 0) & ((t.bits[reps] & ADX) != 0)]
        if len(wr):
            kvm.ops.spte_ad_lost_bulk(kvm, t.pfn[wr], np.ones(len(wr), bool), np.zeros(len(wr), bool), caller)
        sel = new[nad]
        # mark_spte_for_access_track(): "We do not save the W bit ... the W bit will be restored
        # only when a write is attempted to the page" (spte.h, SHADOW_ACC_TRACK_SAVED_BITS_MASK)
        new[nad] = (sel | AT) & nbits(W)
    spte_write(kvm, slot, lo, hi, new, caller=caller, track=False)
    return True


def wrprot_range(kvm, slot, lo: int, hi: int, min_level: int, caller: str, mask=None, *,
                 mmu_writable: bool = False) -> bool:
    """``wrprot_gfn_range()`` / ``kvm_mmu_slot_remove_write_access()``: clear W on leaves >= min_level;
    with ``mmu_writable`` also MMU-writable, as ``write_protect_gfn()`` does (then only the slow
    path can make the SPTE writable again)."""
    t = slot.arch.get("x86")
    if t is None:
        return False
    lo, hi = t.leaf_bounds(slot, lo, hi)
    bits = t.bits[lo:hi]
    clear = W | SW | (MW if mmu_writable else 0)
    sel = ((bits & clear) != 0) & (t.level[lo:hi] >= min_level)
    if mask is not None:
        sel &= mask
    if not sel.any():
        return False
    new = bits.copy()
    new[sel] &= nbits(clear)
    spte_write(kvm, slot, lo, hi, new, caller=caller)
    return True


def clear_dirty_range(kvm, slot, lo: int, hi: int, caller: str, mask=None, *, wrprot: bool = False,
                      all_levels: bool = False) -> bool:
    """``clear_dirty_gfn_range()`` (a whole slot when logging starts: every leaf level, ``all_levels``)
    and ``clear_dirty_pt_masked()`` (4 KiB leaves under ``mask``): clear D, or W when A/D bits are
    disabled or without PML (``wrprot``).  v6.12 calls ``kvm_set_pfn_dirty()`` for every SPTE whose
    bit it cleared (tdp_mmu.c; removed by patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE,
    not when zapping/modifying"): the VM's resolved ``spte_ad_lost_bulk``."""
    t = slot.arch.get("x86")
    if t is None:
        return False
    if all_levels:
        lo, hi = t.leaf_bounds(slot, lo, hi)
    bits = t.bits[lo:hi]
    lvl = t.level[lo:hi]
    if wrprot or (bits & ADX).any():
        dbit = np.where(((bits & ADX) != 0) | wrprot, W, D).astype(np.uint16)
        sel = ((bits & P) != 0) & ((bits & MMIO) == 0) & ((bits & dbit) != 0)
    else:
        dbit = np.uint16(D)                             # A/D bits everywhere: present, not MMIO, D set
        sel = (bits & (P | MMIO | D)) == (P | D)
    if not all_levels:
        sel &= lvl == 1
    if mask is not None:
        sel &= mask
    if not sel.any():
        return False
    new = bits ^ (sel * dbit)                           # sel implies the bit is set: XOR clears it, no gather
    spte_write(kvm, slot, lo, hi, new, caller=caller, track=False)
    if lvl.max() > 1:                                   # one report per leaf: its first entry
        sel &= ((slot.base_gfn + lo + np.arange(hi - lo)) % LEAF_PAGES[lvl]) == 0
    n = int(np.count_nonzero(sel))
    pfns = t.pfn[lo:hi] if n == hi - lo else t.pfn[lo:hi][sel]      # every entry: a view, no gather
    # every one dirty, none accessed: read-only broadcast masks (no per-page arrays to allocate)
    kvm.ops.spte_ad_lost_bulk(kvm, pfns, np.broadcast_to(True, (n,)), np.broadcast_to(False, (n,)), caller)
    return True


def split_range(kvm, slot, lo: int, hi: int, caller: str = "tdp_mmu_split_huge_page", to_level: int = 1) -> int:
    """``kvm_tdp_mmu_try_split_huge_pages()`` (to 4 KiB) or the fault path's ``tdp_mmu_split_huge_page()``
    (to ``to_level``): children inherit the huge SPTE's bits and consecutive pfns, no TLB flush;
    legacy reports the A/D of each huge leaf that becomes a page table, the intermediate 2 MiB
    leaves of a split 1 GiB page included."""
    t = slot.arch.get("x86")
    if t is None:
        return 0
    lo, hi = t.leaf_bounds(slot, lo, hi)
    reps = t.representatives(slot, lo, hi)
    nhuge = int(np.count_nonzero(t.level[reps] > to_level))
    if not nhuge:
        return 0
    # Pre-order, one level at a time (tdp_mmu_split_huge_pages_root(): "splitting a 1GB to 512 2MB
    # pages, and then splitting each of those to 512 4KB pages"): each 2 MiB child inherits the 1 GiB
    # leaf's A/D bits and is itself a huge leaf that becomes a page table, so legacy reports 1 + 512.
    for step in range(int(t.level[lo:hi].max()) - 1, to_level - 1, -1):
        lvl = t.level[lo:hi]
        if not (lvl > step).any():
            continue
        new = np.where(lvl > step, step, lvl).astype(np.uint8)
        spte_write(kvm, slot, lo, hi, t.bits[lo:hi].copy(), None, new, caller=caller)
    kvm.journal.count("split", nhuge)
    return nhuge


def _host_at(kvm, slot, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(host mapping level, host pfn or -1) at slot-relative ``idx``: ``host_mapping_level()`` and
    ``pte_of()`` vectorised."""
    level = np.ones(len(idx), dtype=np.uint8)
    pfn = np.full(len(idx), -1, dtype=np.int64)
    if not len(idx):
        return level, pfn
    hva = slot.userspace_addr + (idx.astype(np.int64) << PAGE_SHIFT)
    for vma in kvm.mm.vmas_in(int(hva.min()), int(hva.max()) + 4096):
        inside = (hva >= vma.start) & (hva < vma.end)
        j = (hva[inside] - vma.start) >> PAGE_SHIFT
        p = vma.pte_pfn[j]
        present = ((vma.pte[j] & _PTE_PRESENT) != 0) & (p >= 0)
        level[inside] = np.where(present, vma.pte_level[j], 1)
        pfn[inside] = p
    return level, pfn


def _host_levels_strided(kvm, slot, first: int, count: int, n: int) -> np.ndarray:
    """:func:`_host_at`'s level at slot-relative ``first + k * n`` for ``k < count``: strided views of
    the host PTEs when one VMA maps the slot's range, else the gathers of :func:`_host_at`."""
    h0 = slot.userspace_addr + (first << PAGE_SHIFT)
    h1 = h0 + (((count - 1) * n + 1) << PAGE_SHIFT)
    vma = kvm.mm.vma_lookup(h0)
    if vma is None or vma.end < h1:
        return _host_at(kvm, slot, first + np.arange(count, dtype=np.int64) * n)[0]
    i0 = vma.idx(h0)
    sl = slice(i0, i0 + (count - 1) * n + 1, n)
    present = ((vma.pte[sl] & _PTE_PRESENT) != 0) & (vma.pte_pfn[sl] >= 0)
    return np.where(present, vma.pte_level[sl], 1).astype(np.uint8)


def _collapsible_regions(kvm, slot, level: int) -> np.ndarray:
    """Slot-relative starts of aligned ``level`` regions mapped by smaller leaves that could be huge
    (``kvm_mmu_max_mapping_level()`` of the region's first gfn is at least ``level``)."""
    t = tables(slot)
    n = LEVEL_PAGES[level]
    first = (-slot.base_gfn) % n
    count = (slot.npages - first) // n
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if ((slot.userspace_addr >> PAGE_SHIFT) - slot.base_gfn) % n:
        return np.zeros(0, dtype=np.int64)        # the hva is misaligned: lpage_info disallows the level
    # the host level first (one host PTE per region): where the host maps only 4 KiB, no SPTE is read
    host_level = _host_levels_strided(kvm, slot, first, count, n)
    cand = np.flatnonzero(host_level >= level)
    found = []
    per = max(1, (1 << 18) // n)                     # regions per step: 1 GiB of entries at a time
    for c0 in range(0, len(cand), per):
        c = cand[c0:c0 + per]
        if int(c[-1]) - int(c[0]) + 1 == len(c):      # consecutive regions: reshaped slices
            a, b = first + int(c[0]) * n, first + (int(c[-1]) + 1) * n
            lvl = t.level[a:b].reshape(len(c), n)
            pres = (t.bits[a:b].reshape(len(c), n) & P) != 0
        else:
            rows = (first + c * n)[:, None] + np.arange(n)
            lvl, pres = t.level[rows], (t.bits[rows] & P) != 0
        found.append(first + c[(pres & (lvl < level)).any(axis=1)] * n)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _zap_regions(kvm, slot, starts: np.ndarray, n: int, caller: str) -> None:
    """``zap_range()`` of each ``n``-page region, one :func:`spte_write` per 1 GiB piece of gfns
    (the regions hold only small leaves: the same entries, A/D reports and counts)."""
    t = tables(slot)
    piece = (slot.base_gfn + starts) >> 18
    cuts = np.flatnonzero(piece[1:] != piece[:-1]) + 1
    for st in np.split(starts, cuts):
        lo, hi = int(st[0]), int(st[-1]) + n
        if hi - lo == len(st) * n and huge_leaves.zap_small_span(kvm, slot, t, lo, hi, caller):
            continue                                 # regions side by side, 4 KiB leaves only: slices
        at = (np.repeat(st - lo, n) + np.tile(np.arange(n), len(st)))
        nb = t.bits[lo:hi].copy()
        npf = t.pfn[lo:hi].copy()
        nl = t.level[lo:hi].copy()
        nleaves = int(np.count_nonzero(((nb[at] & P) != 0) & ((nb[at] & MMIO) == 0)))
        nb[at], npf[at], nl[at] = 0, -1, 0
        spte_write(kvm, slot, lo, hi, nb, npf, nl, caller=caller)
        kvm.journal.count("spte_zap", nleaves)


def zap_collapsible_sptes(kvm, slot, *, flush_per_region: bool = True) -> int:
    """``kvm_mmu_zap_collapsible_sptes()`` (v6.12): zap small leaves where a huge page could map;
    the next faults map huge.  The TDP MMU flushes once per huge region; the rmap walk
    (``kvm_rmap_zap_collapsible_sptes()``, ``flush_per_region=False``) once for the slot."""
    zapped = 0
    for level in (3, 2):
        starts = _collapsible_regions(kvm, slot, level)
        if len(starts):
            _zap_regions(kvm, slot, starts, LEVEL_PAGES[level], "zap_collapsible_spte_range")
            if flush_per_region:
                kvm.flush_remote_tlbs("zap_collapsible_sptes", len(starts))
            zapped += len(starts)
    if zapped and not flush_per_region:
        kvm.flush_remote_tlbs("zap_collapsible_sptes")
    kvm.journal.count("zap_collapsible", zapped)
    return zapped


def recover_huge_pages(kvm, slot) -> int:
    """``kvm_tdp_mmu_recover_huge_pages()`` ([6.13-other]): replace small leaves with the huge SPTE
    in place (``make_huge_spte()`` from a present child), one batched TLB flush for the slot.
    Vectorised per 1 GiB piece of gfns; the regions are disjoint, so it equals one write per region."""
    t = tables(slot)
    recovered = 0
    for level in (3, 2):
        n = LEVEL_PAGES[level]
        starts = _collapsible_regions(kvm, slot, level)
        if not len(starts):
            continue
        piece = (slot.base_gfn + starts) >> 18
        cuts = np.flatnonzero(piece[1:] != piece[:-1]) + 1
        for st in np.split(starts, cuts):
            done = huge_leaves.recover_span(kvm, slot, t, st, level)
            if done is not None:                     # side by side, every child present: slices
                recovered += done
                continue
            rows = st[:, None] + np.arange(n)
            child = st + ((t.bits[rows] & P) != 0).argmax(axis=1)
            del rows
            base_pfn = t.pfn[child] - (child - st)
            _, hpfn = _host_at(kvm, slot, st)
            ok = hpfn == base_pfn
            st, child, base_pfn = st[ok], child[ok], base_pfn[ok]
            if not len(st):
                continue
            lo, hi = int(st[0]), int(st[-1]) + n
            at = np.repeat(st - lo, n) + np.tile(np.arange(n), len(st))
            nb = t.bits[lo:hi].copy()
            npf = t.pfn[lo:hi].copy()
            nl = t.level[lo:hi].copy()
            nb[at] = np.repeat(t.bits[child], n)
            npf[at] = np.repeat(base_pfn, n) + np.tile(np.arange(n), len(st))
            nl[at] = level
            spte_write(kvm, slot, lo, hi, nb, npf, nl, caller="make_huge_spte")
            recovered += len(st)
    if recovered:
        kvm.flush_remote_tlbs("recover_huge_pages")
    kvm.journal.count("recover", recovered)
    return recovered


# ---- the TDP MMU's page tables (non-leaf SPTEs), for patch 4 -------------------------------------------

def pt_key(gfn: int, level: int) -> int:
    """The page table at ``level`` over ``gfn``, as one int (its index at that level, and the level)."""
    return (gfn >> (9 * (level - 1))) << 2 | level


def tdp_page_table_present(slot, gfn: int, level: int) -> bool:
    """Whether the TDP MMU has a page-table (non-leaf) SPTE at ``level`` over ``gfn``: it created one to
    map a smaller leaf there, and only a huge leaf in its place or freeing the roots / zapping collapsible
    SPTEs removes it -- ``tdp_mmu_zap_leafs()`` (an mmu_notifier unmap) leaves it, empty."""
    pts = slot.arch.get("x86-pt")
    return pts is not None and pt_key(gfn, level) in pts


def tdp_page_tables_update(slot, gfn: int, level: int, max_level: int) -> None:
    """After a leaf at ``level``: page tables above it exist, the ones it replaced (at and below) are gone."""
    pts = slot.arch.get("x86-pt")
    if pts is None:
        if level >= max_level:
            return
        pts = slot.arch["x86-pt"] = set()
    for lv in range(level + 1, max_level + 1):
        pts.add(pt_key(gfn, lv))
    if level > 1:
        pts.discard(pt_key(gfn, level))
        if level == 3:                                   # the 2 MiB page tables under a 1 GiB leaf
            n, step = LEVEL_PAGES[3], LEVEL_PAGES[2]
            base = gfn // n * n
            pts.difference_update([pt_key(g, 2) for g in range(base, base + n, step)])


def tdp_page_tables_free(slot) -> None:
    """Root teardown, memslot flush or zapping collapsible SPTEs freed the slot's page tables."""
    slot.arch.pop("x86-pt", None)
