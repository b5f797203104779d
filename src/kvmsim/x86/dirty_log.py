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
from kvmsim.types import LEVEL_PAGES, PAGES_PER_PMD
from kvmsim.x86 import tdp_mmu


def manual_protect_and_init_set(kvm) -> bool:
    """``kvm_dirty_log_manual_protect_and_init_set()``."""
    return bool(kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)


def kvm_mmu_slot_apply_flags(mmu, old, new, change) -> None:
    """Mirrors ``kvm_mmu_slot_apply_flags()``."""
    kvm = mmu.kvm
    if change not in (KvmMrChange.FLAGS_ONLY,) or new is None or old is None:
        return
    if old.logging == new.logging:
        return
    if not new.logging:
        if not new.readonly:
            if kvm.v613_other:
                tdp_mmu.recover_huge_pages(kvm, new)
            else:
                tdp_mmu.zap_collapsible_sptes(kvm, new)
        return
    if manual_protect_and_init_set(kvm):
        return
    if mmu.eager_split:
        tdp_mmu.split_range(kvm, new, 0, new.npages)
    if mmu.pml:
        f = tdp_mmu.clear_dirty_range(kvm, new, 0, new.npages, "kvm_mmu_slot_leaf_clear_dirty")
        f |= tdp_mmu.wrprot_range(kvm, new, 0, new.npages, 2, "kvm_mmu_slot_remove_write_access")
    else:
        f = tdp_mmu.wrprot_range(kvm, new, 0, new.npages, 1, "kvm_mmu_slot_remove_write_access")
    if f or mmu.eager_split:
        kvm.flush_remote_tlbs("enable_dirty_logging")


def kvm_arch_mmu_enable_log_dirty_pt_masked(mmu, slot, gfn_offset: int, mask) -> None:
    """Mirrors ``kvm_arch_mmu_enable_log_dirty_pt_masked()``, for each 64-page word of ``mask``.

    Vectorised over the words: the result (SPTEs, counters, struct-page marks) is the per-word
    calls' (tests/bench/test_bulk_equivalence.py); the D-bit / W clearing runs in 1 GiB-aligned
    pieces so a 64 GiB slot never needs whole-slot temporaries."""
    kvm = mmu.kvm
    if "x86" not in slot.arch:
        return
    t = slot.arch["x86"]
    full = _slot_mask(slot, gfn_offset, mask)
    if full is None:
        return
    if manual_protect_and_init_set(kvm):
        _protect_huge_words(mmu, slot, t, full)
    for lo, hi in gfn_aligned_pieces(slot, 0, slot.npages):
        m = full[lo:hi]
        if not m.any():
            continue
        if mmu.pml:
            tdp_mmu.clear_dirty_range(kvm, slot, lo, hi, "clear_dirty_pt_masked", mask=m)
        else:
            tdp_mmu.wrprot_range(kvm, slot, lo, hi, 1, "kvm_mmu_write_protect_pt_masked",
                                 mask=m & (t.level[lo:hi] == 1))


PIECE = 1 << 18                      # 4 KiB pages per piece: 1 GiB, the largest leaf


def gfn_aligned_pieces(slot, lo: int, hi: int):
    """Slot-relative ``[a, b)`` pieces of ``[lo, hi)`` cut at 1 GiB-aligned gfns: no leaf crosses a cut."""
    a = lo
    while a < hi:
        b = min(hi, (slot.base_gfn + a) // PIECE * PIECE + PIECE - slot.base_gfn)
        yield a, b
        a = b


def _slot_mask(slot, gfn_offset: int, mask):
    mask = np.asarray(mask, dtype=bool)
    if gfn_offset == 0 and len(mask) == slot.npages:
        full = mask
    else:
        full = np.zeros(slot.npages, dtype=bool)
        n = max(0, min(len(mask), slot.npages - gfn_offset))
        full[gfn_offset:gfn_offset + n] = mask[:n]
    return full if full.any() else None


def _protect_huge_words(mmu, slot, t, full) -> None:
    """The INITIALLY_SET step for every word: split (eager) or write-protect at 2M the huge leaves
    under the word's first and last set gfn.  A huge leaf spans >= 512 gfns, so one that meets
    ``[first, last]`` of a 64-gfn word covers ``first`` or ``last``."""
    kvm = mmu.kvm
    nw = -(-slot.npages // 64)
    pad = np.zeros(nw * 64, dtype=bool)
    pad[:slot.npages] = full
    rows = pad.reshape(nw, 64)
    w = np.flatnonzero(rows.any(axis=1))
    sel = rows[w]
    start = w * 64 + sel.argmax(axis=1)
    end = w * 64 + 63 - sel[:, ::-1].argmax(axis=1)
    del pad, rows, sel
    pos = np.concatenate((start, end))
    lvl = t.level[pos]
    pos, lvl = pos[lvl > 1], lvl[lvl > 1]
    if not len(pos):
        return
    size = np.array([1, 1, LEVEL_PAGES[2], LEVEL_PAGES[3]], dtype=np.int64)[lvl]
    leaf = np.unique(np.stack(((slot.base_gfn + pos) // size * size - slot.base_gfn, size)), axis=1)
    if mmu.eager_split:
        ends = leaf[0] + leaf[1]
        brk = np.flatnonzero(leaf[0][1:] != ends[:-1]) + 1          # runs of adjacent leaves
        for a, b in zip(np.split(leaf[0], brk), np.split(ends, brk)):
            for lo, hi in gfn_aligned_pieces(slot, int(a[0]), int(b[-1])):
                tdp_mmu.split_range(kvm, slot, lo, hi)
        return
    for g in leaf[0].tolist():                      # kvm_mmu_slot_gfn_write_protect(.., PG_LEVEL_2M)
        tdp_mmu.wrprot_range(kvm, slot, g, g + 1, 2, "kvm_mmu_slot_gfn_write_protect")


__all__ = ["kvm_mmu_slot_apply_flags", "kvm_arch_mmu_enable_log_dirty_pt_masked", "PAGES_PER_PMD"]
