"""x86 dirty logging (arch/x86/kvm/x86.c ``kvm_mmu_slot_apply_flags()``, mmu.c
``kvm_arch_mmu_enable_log_dirty_pt_masked()``, v6.13).

Enable: eager split (unless manual-protect + INITIALLY_SET, which defers everything to the first
CLEAR), then with PML clear D on 4 KiB leaves and write-protect >= 2 MiB leaves, without PML
write-protect everything.  Disable: zap collapsible SPTEs (v6.12 / the series), or with
[6.13-other] recover huge pages in place with one flush for the slot.
"""

from __future__ import annotations

import numpy as np

from kvmsim.kvm.dirty import KVM_DIRTY_LOG_INITIALLY_SET
from kvmsim.kvm.memslot import KvmMrChange
from kvmsim.types import PAGES_PER_PMD
from kvmsim.x86 import huge_leaves, tdp_mmu
from kvmsim.x86.spte import LEAF_PAGES


def manual_protect_and_init_set(kvm) -> bool:
    """``kvm_dirty_log_manual_protect_and_init_set()``."""
    return bool(kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)


def kvm_mmu_slot_apply_flags(mmu, old, new, change) -> None:
    """Mirrors ``kvm_mmu_slot_apply_flags()`` (arch/x86/kvm/x86.c, v6.12/v6.13).

    Nothing for a read-only slot ("if ((change != KVM_MR_FLAGS_ONLY) || (new_flags & KVM_MEM_READONLY))
    return").  Disable: zap collapsible SPTEs, or with [6.13-other] recover huge pages in place (TDP
    MMU only; the rmap path still zaps).  Enable, unless INITIALLY_SET: eager split (TDP MMU only),
    then with PML clear D on every leaf and write-protect >= 2M, without PML write-protect >= 4K;
    then one flush, "Unconditionally flush the TLBs after enabling dirty logging"."""
    kvm = mmu.kvm
    if change != KvmMrChange.FLAGS_ONLY or new is None or old is None or new.readonly:
        return
    if old.logging == new.logging:
        return
    if not new.logging:
        if kvm.v613_other and mmu.tdp_mmu_enabled:
            tdp_mmu.recover_huge_pages(kvm, new)
        else:
            tdp_mmu.zap_collapsible_sptes(kvm, new, flush_per_region=mmu.tdp_mmu_enabled)
        return
    if manual_protect_and_init_set(kvm):
        return
    for lo, hi in gfn_aligned_pieces(new, 0, new.npages):
        if mmu.eager_split and mmu.tdp_mmu_enabled:        # kvm_mmu_slot_try_split_huge_pages()
            tdp_mmu.split_range(kvm, new, lo, hi)
        if mmu.pml:
            # kvm_mmu_slot_leaf_clear_dirty(): clear_dirty_gfn_range() takes every leaf level on the
            # TDP MMU; the rmap walk (walk_slot_rmaps_4k) only 4K
            tdp_mmu.clear_dirty_range(kvm, new, lo, hi, "kvm_mmu_slot_leaf_clear_dirty",
                                      all_levels=mmu.tdp_mmu_enabled)
            tdp_mmu.wrprot_range(kvm, new, lo, hi, 2, "kvm_mmu_slot_remove_write_access")
        else:
            tdp_mmu.wrprot_range(kvm, new, lo, hi, 1, "kvm_mmu_slot_remove_write_access")
    kvm.flush_remote_tlbs("enable_dirty_logging")


def kvm_arch_mmu_enable_log_dirty_pt_masked(mmu, slot, gfn_offset: int, mask) -> None:
    """Mirrors ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` for each 64-page word of ``mask`` (bit k
    is slot-relative gfn ``gfn_offset + k``; words are slot-relative, so ``gfn_offset`` is a
    multiple of 64 as in the kernel).

    Vectorised over the words: the result (SPTEs, counters, struct-page marks) is the per-word
    calls' (tests/bench/test_bulk_equivalence.py).  It runs in 1 GiB-aligned pieces of
    ``[gfn_offset, +len(mask))``, never over the whole slot: no leaf crosses a piece, so each
    piece's words can be done on their own, and a 256 GiB slot needs no slot-sized temporaries."""
    kvm = mmu.kvm
    t = slot.arch.get("x86")
    if t is None:
        return
    mask = np.asarray(mask, dtype=bool)[:max(0, slot.npages - gfn_offset)]
    init_set = manual_protect_and_init_set(kvm)
    for lo, hi in gfn_aligned_pieces(slot, gfn_offset, gfn_offset + len(mask)):
        m = mask[lo - gfn_offset:hi - gfn_offset]
        if not m.any():
            continue
        if init_set:
            _protect_huge_words(mmu, slot, t, lo, m)
        # clear_dirty_pt_masked(): D with PML, else W ("wrprot"); 4K leaves; v6.12 kvm_set_pfn_dirty()
        # on each SPTE whose bit it cleared
        tdp_mmu.clear_dirty_range(kvm, slot, lo, hi, "clear_dirty_pt_masked", mask=m, wrprot=not mmu.pml)


PIECE = 1 << 18                      # 4 KiB pages per piece: 1 GiB, the largest leaf


def gfn_aligned_pieces(slot, lo: int, hi: int):
    """Slot-relative ``[a, b)`` pieces of ``[lo, hi)`` cut at 1 GiB-aligned gfns: no leaf crosses a cut."""
    a = lo
    while a < hi:
        b = min(hi, (slot.base_gfn + a) // PIECE * PIECE + PIECE - slot.base_gfn)
        yield a, b
        a = b


def _protect_huge_words(mmu, slot, t, lo: int, m) -> None:
    """The INITIALLY_SET step for the words of ``m`` (slot-relative gfns ``[lo, +len(m))``, inside
    one piece): split (eager) or write-protect at 2M the huge leaves under each word's first and
    last set gfn.  A huge leaf spans >= 512 gfns, so one that meets ``[first, last]`` of a 64-gfn
    word covers ``first`` or ``last``; a word cut by the piece boundary therefore selects the same
    leaves from its two halves as from the whole.  Those are the huge leaves that hold a set gfn,
    found per 2 MiB block when ``m`` is made of whole blocks (the flow's CLEAR of a whole slot)."""
    kvm = mmu.kvm
    hi = lo + len(m)
    if (slot.base_gfn + lo) % PAGES_PER_PMD == 0 and len(m) % PAGES_PER_PMD == 0:
        # whole 2 MiB blocks: a huge leaf covers whole blocks, so the leaves that hold a set gfn
        # are those of the blocks that hold one, read at each block's first entry
        huge = t.level[lo:hi:PAGES_PER_PMD] > 1
        if not huge.any():
            return                                       # 4 KiB leaves only: nothing to protect
        huge &= m.reshape(-1, PAGES_PER_PMD).any(axis=1)
        pos = lo + np.flatnonzero(huge) * PAGES_PER_PMD
    else:
        if not (t.level[lo:hi] > 1).any():
            return
        w0 = lo // 64
        nw = -(-hi // 64) - w0
        pad = np.zeros(nw * 64, dtype=bool)
        pad[lo - w0 * 64:hi - w0 * 64] = m
        rows = pad.reshape(nw, 64)
        w = np.flatnonzero(rows.any(axis=1))
        sel = rows[w]
        start = (w0 + w) * 64 + sel.argmax(axis=1)
        end = (w0 + w) * 64 + 63 - sel[:, ::-1].argmax(axis=1)
        del pad, rows, sel
        pos = np.stack((start, end), axis=1).ravel()   # ascending: first <= last in a word, words in order
    lvl = t.level[pos]
    pos, lvl = pos[lvl > 1], lvl[lvl > 1]
    if not len(pos):
        return
    size = LEAF_PAGES[lvl]
    starts = (slot.base_gfn + pos) // size * size - slot.base_gfn     # ascending too: leaves are disjoint
    first = np.ones(len(starts), dtype=bool)
    first[1:] = starts[1:] != starts[:-1]
    leaf = (starts[first], size[first])
    ends = leaf[0] + leaf[1]
    brk = np.flatnonzero(leaf[0][1:] != ends[:-1]) + 1              # runs of adjacent leaves
    for a, b in zip(np.split(leaf[0], brk), np.split(ends, brk)):
        if mmu.eager_split:
            for plo, phi in gfn_aligned_pieces(slot, int(a[0]), int(b[-1])):
                if not huge_leaves.split_run(kvm, slot, t, plo, phi):
                    tdp_mmu.split_range(kvm, slot, plo, phi)
            continue
        # kvm_mmu_slot_gfn_write_protect(.., PG_LEVEL_2M) per leaf; write_protect_gfn() clears
        # MMU-writable too: only the slow path makes it writable again.  One write for the run
        # (the same entries, reports and counts) unless a broken SPTE would be reported differently
        if huge_leaves.inv11_clean(t.bits[int(a[0]):int(b[-1])]):
            tdp_mmu.wrprot_range(kvm, slot, int(a[0]), int(b[-1]), 2, "kvm_mmu_slot_gfn_write_protect",
                                 mmu_writable=True)
            continue
        for g in a.tolist():
            tdp_mmu.wrprot_range(kvm, slot, g, g + 1, 2, "kvm_mmu_slot_gfn_write_protect", mmu_writable=True)


__all__ = ["kvm_mmu_slot_apply_flags", "kvm_arch_mmu_enable_log_dirty_pt_masked", "PAGES_PER_PMD"]
