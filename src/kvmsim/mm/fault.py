"""The host page-fault handler, ``handle_mm_fault()`` (mm/memory.c, mm/hugetlb.c; THP faults in
kvmsim.mm.huge_memory, mirroring mm/huge_memory.c).

Returns 0 on success or the errno the access would see (EFAULT for SIGSEGV/SIGBUS, EHWPOISON).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import EHWPOISON
from kvmsim.mm.huge_memory import do_huge_pmd_anonymous_page
from kvmsim.mm.page import PG
from kvmsim.mm.vma import VM, Pte, Vma, VmaKind
from kvmsim.types import PAGE_SHIFT, PAGES_PER_PMD, PG_LEVEL_2M

_P, _W, _Y, _D, _S, _SW, _HWP = (int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY),
                                 int(Pte.SPECIAL), int(Pte.SWAP), int(Pte.HWPOISON))


def access_permitted(vma: Vma, write: bool) -> bool:
    if write:
        return bool(vma.flags & VM.WRITE)
    return bool(vma.flags & (VM.READ | VM.WRITE))


def handle_mm_fault(mm, vma: Vma, hva: int, write: bool) -> int:
    """Fault ``hva`` in for a read or a write; 0 or an errno."""
    if not access_permitted(vma, write):
        return errno.EFAULT
    i = vma.idx(hva)
    bits = int(vma.pte[i])
    if bits & _HWP:
        return EHWPOISON
    mm.journal.count("host_page_fault")
    if vma.driver is not None:
        return vma.driver.fault(mm, vma, i, write)
    if vma.mapping is not None and (vma.flags & VM.SHARED):
        return _shared_fault(mm, vma, i, write)
    return _anon_fault(mm, vma, i, write)


def _anon_fault(mm, vma: Vma, i: int, write: bool) -> int:
    phys = mm.phys
    bits = int(vma.pte[i])
    if bits & _P:
        if not write or bits & _W:
            vma.pte[i] |= _Y
            return 0
        if vma.pte_level[i] == PG_LEVEL_2M and phys.is_huge_zero_pfn(int(vma.pte_pfn[i])):
            return mm.huge_zero_wp_fault(mm, vma, i)        # do_huge_pmd_wp_page(): host-kernel specific
        return _wp_page(mm, vma, i)
    key = (vma.id, vma.pgoff + i)
    if bits & _SW or key in vma.anon.swap:                       # swap-in (do_swap_page)
        data = vma.anon.swap.pop(key, 0)
        pfn = phys.alloc(owner=vma.anon.owner_id, index=vma.pgoff + i)
        phys.data[pfn] = data
        vma.pte_pfn[i] = pfn
        vma.pte[i] = _P | _Y | ((_W | _D) if write else 0)
        return 0
    huge = vma.huge_level if vma.kind == VmaKind.HUGETLB else (
        PG_LEVEL_2M if vma.flags & VM.HUGEPAGE and _thp_fits(vma, i) else 1)
    if huge > 1 and vma.kind != VmaKind.HUGETLB:
        return do_huge_pmd_anonymous_page(mm, vma, i, write)
    if huge > 1:
        n = 1 << (9 * (huge - 1))
        lo = i // n * n
        head = phys.alloc(9 * (huge - 1), owner=vma.anon.owner_id, index=vma.pgoff + lo)
        vma.pte_pfn[lo:lo + n] = np.arange(head, head + n)
        vma.pte[lo:lo + n] = _P | _Y | _W | _D                    # private hugetlb is mapped writable+dirty
        vma.pte_level[lo:lo + n] = huge
        mm.journal.count("host_huge_alloc")
        return 0
    if not write:                                                 # do_anonymous_page: zero page
        vma.pte_pfn[i] = phys.zero_pfn
        vma.pte[i] = _P | _Y | _S
        return 0
    pfn = phys.alloc(owner=vma.anon.owner_id, index=vma.pgoff + i)
    vma.pte_pfn[i] = pfn
    vma.pte[i] = _P | _Y | _W | _D
    return 0


def _thp_fits(vma: Vma, i: int) -> bool:
    lo = i // PAGES_PER_PMD * PAGES_PER_PMD
    hva = vma.start + (lo << PAGE_SHIFT)
    return hva % (1 << 21) == 0 and lo + PAGES_PER_PMD <= vma.npages and not (vma.pte[lo:lo + PAGES_PER_PMD] & _P).any()


def _wp_page(mm, vma: Vma, i: int) -> int:
    """``do_wp_page``: break copy-on-write, or reuse a page nobody else owns."""
    phys = mm.phys
    old = int(vma.pte_pfn[i])
    if old != phys.zero_pfn and phys.page_count(old) == 1 and vma.pte_level[i] == 1:
        vma.pte[i] |= _W | _D | _Y                                  # wp_page_reuse
        return 0
    rng_start = vma.start + (i << PAGE_SHIFT)
    from kvmsim.mm.notifier import MmuNotifierRange, MmuNotifyEvent
    rng = MmuNotifierRange(rng_start, rng_start + 4096, MmuNotifyEvent.CLEAR, reason="COW break")
    mm.invalidate_range_start(rng)
    new = phys.alloc(owner=vma.anon.owner_id, index=vma.pgoff + i)
    phys.data[new] = phys.data[old]
    vma.pte_pfn[i] = new
    vma.pte[i] = _P | _Y | _W | _D
    vma.pte_level[i] = 1
    if old != phys.zero_pfn:
        phys.put_page(old, "wp_page_copy")
    mm.invalidate_range_end(rng)
    mm.journal.count("host_cow_break")
    return 0


def _shared_fault(mm, vma: Vma, i: int, write: bool) -> int:
    phys = mm.phys
    asp = vma.mapping
    index = vma.pgoff + i
    if index >= asp.npages:
        return errno.EFAULT                                         # SIGBUS beyond EOF
    bits = int(vma.pte[i])
    order = asp.folio_order
    n = 1 << order
    lo_index = index // n * n
    pfn = int(asp.pages[index])
    if pfn < 0:                                                     # not cached: allocate (or read back)
        head = phys.alloc(order, owner=asp.owner_id, index=lo_index)
        asp.pages[lo_index:lo_index + n] = np.arange(head, head + n)
        for k in range(n):
            asp.removed.discard(lo_index + k)
            if (lo_index + k) in asp.disk:
                phys.data[head + k] = asp.disk[lo_index + k]
            asp.needs_io.discard(lo_index + k)
        pfn = int(asp.pages[index])
    if bits & _P and int(vma.pte_pfn[i]) == pfn and (not write or bits & _W):
        vma.pte[i] |= _Y
        return 0
    writable = write or vma.vm_page_prot_writable()
    if write and vma.writenotify:                                   # ->page_mkwrite: folio_mark_dirty
        phys.SetPageDirty(pfn, "folio_mark_dirty")
    lo = i - (index - lo_index)
    if order and lo >= 0 and lo + n <= vma.npages:
        sl = slice(lo, lo + n)
        vma.pte_pfn[sl] = np.arange(pfn - (index - lo_index), pfn - (index - lo_index) + n)
        vma.pte[sl] = _P | _Y | ((_W | (_D if write else 0)) if writable else 0)
        vma.pte_level[sl] = vma.huge_level
    else:
        vma.pte_pfn[i] = pfn
        vma.pte[i] = _P | _Y | ((_W | (_D if write else 0)) if writable else 0)
    phys.flags[phys.head[pfn]] |= int(PG.uptodate)
    return 0
