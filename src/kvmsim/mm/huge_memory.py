"""Transparent huge pages of private anonymous memory (mm/huge_memory.c): the PMD fault, the huge
zero folio, PMD splitting, and the write fault on a huge zero PMD.

A read fault on THP memory maps the huge zero folio read-only (``do_huge_pmd_anonymous_page()``);
the first write to it is where the host kernels the model runs against differ:

=========  =====================================================================================
v6.12      ``do_huge_pmd_wp_page()``: ``is_huge_zero_pmd()`` → ``goto fallback``: ``__split_huge_pmd()``
           (512 PTEs of the 4K zero page) and ``VM_FAULT_FALLBACK``, so ``do_wp_page()`` copies one 4K page
v6.13      ``do_huge_zero_wp_pmd()`` ("mm: Allocate THP on hugezeropage wp-fault", v6.13-rc1): a new
           THP replaces the huge zero PMD under one 2M ``MMU_NOTIFY_CLEAR`` (split only if allocation fails)
=========  =====================================================================================

That is a host mm difference, not a KVM one: :func:`set_host_kernel` resolves it once per ``Mm`` into the
callable ``mm.huge_zero_wp_fault`` (default: v6.13).  The oracle's model side sets it to the booted
kernel's release (kvmsim/backend/oracle/model_side.py).
"""

from __future__ import annotations

import numpy as np

from kvmsim.mm.notifier import MmuNotifierRange, MmuNotifyEvent
from kvmsim.mm.page import PG
from kvmsim.mm.vma import Pte, Vma
from kvmsim.types import PAGE_SHIFT, PAGES_PER_PMD, PG_LEVEL_2M, PMD_SIZE

_P, _W, _Y, _D, _S = int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY), int(Pte.SPECIAL)


def pmd_index(vma: Vma, i: int) -> int:
    """The page index (in ``vma``) of the first page of the PMD that maps page ``i``."""
    hva = vma.start + (i << PAGE_SHIFT)
    return ((hva & ~(PMD_SIZE - 1)) - vma.start) >> PAGE_SHIFT


def transparent_hugepage_use_zero_page(mm) -> bool:
    """``transparent_hugepage_use_zero_page()``: /sys/kernel/mm/transparent_hugepage/use_zero_page (default 1)."""
    return bool(mm.thp_use_zero_page)


def do_huge_pmd_anonymous_page(mm, vma: Vma, i: int, write: bool) -> int:
    """Mirrors ``do_huge_pmd_anonymous_page()`` (mm/huge_memory.c, v6.12 and v6.13).

    A read fault maps the huge zero folio read-only (``!mm_forbids_zeropage()``, true but on s390 with
    KVM guests; ``transparent_hugepage_use_zero_page()``; ``set_huge_zero_folio()``); a write fault
    allocates a THP and maps it writable and dirty (``__do_huge_pmd_anonymous_page()``)."""
    lo = pmd_index(vma, i)
    sl = slice(lo, lo + PAGES_PER_PMD)
    if not write and transparent_hugepage_use_zero_page(mm):
        zero = mm.phys.mm_get_huge_zero_folio()
        vma.pte_pfn[sl] = np.arange(zero, zero + PAGES_PER_PMD)
        vma.pte[sl] = _P | _Y                                    # mk_pmd(zero, vm_page_prot): no write
        vma.pte_level[sl] = PG_LEVEL_2M
        return 0
    head = mm.phys.alloc(9, owner=vma.anon.owner_id, index=vma.pgoff + lo)
    _map_anon_folio_pmd(vma, lo, head)
    mm.journal.count("host_huge_alloc")
    return 0


def _map_anon_folio_pmd(vma: Vma, lo: int, head: int) -> None:
    """``map_anon_folio_pmd()``: a THP is mapped writable and dirty (``maybe_pmd_mkwrite(pmd_mkdirty())``)."""
    sl = slice(lo, lo + PAGES_PER_PMD)
    vma.pte_pfn[sl] = np.arange(head, head + PAGES_PER_PMD)
    vma.pte[sl] = _P | _Y | _W | _D
    vma.pte_level[sl] = PG_LEVEL_2M


def split_huge_pmd(mm, vma: Vma, i: int, reason: str = "split_huge_pmd") -> None:
    """Mirrors ``__split_huge_pmd()`` (mm/huge_memory.c): one ``MMU_NOTIFY_CLEAR`` over the 2M range, and
    the PMD that maps page ``i`` becomes 512 PTEs.

    A huge zero PMD becomes PTEs of the 4K zero page (``__split_huge_zero_page_pmd()``).  A THP's PTEs
    map its subpages with the PMD's bits; the kernel leaves the folio large until the deferred split
    (``deferred_split_folio()`` then the shrinker), the model splits it here (``split_folio()``): KVM
    sees the host mapping level and the pfns, which are the same either way."""
    phys = mm.phys
    lo = pmd_index(vma, i)
    sl = slice(lo, lo + PAGES_PER_PMD)
    start = vma.start + (lo << PAGE_SHIFT)
    rng = MmuNotifierRange(start, start + PMD_SIZE, MmuNotifyEvent.CLEAR, reason=reason)
    mm.invalidate_range_start(rng)
    pfn = int(vma.pte_pfn[lo])
    if phys.is_huge_zero_pfn(pfn):
        vma.pte_pfn[sl] = phys.zero_pfn
        vma.pte[sl] = (vma.pte[sl] & np.uint8(_Y)) | _P | _S
    else:
        head = phys.folio(pfn)
        extra = phys.page_count(head) - 1
        pages = slice(head, head + PAGES_PER_PMD)
        phys.head[pages] = np.arange(head, head + PAGES_PER_PMD)
        phys.order[head] = 0
        phys.flags[pages] &= ~np.uint16(int(PG.head) | int(PG.tail))
        phys.flags[pages] |= phys.flags[head] & int(PG.dirty)
        phys.refcount[pages] = 1
        phys.refcount[head] += extra
    vma.pte_level[sl] = 1
    mm.invalidate_range_end(rng)
    mm.journal.count("thp_split")


def do_huge_pmd_wp_page_fallback(mm, vma: Vma, i: int) -> int:
    """v6.12 ``do_huge_pmd_wp_page()`` on a huge zero PMD: ``goto fallback`` (``__split_huge_pmd()``,
    ``VM_FAULT_FALLBACK``), then ``handle_pte_fault()`` → ``do_wp_page()`` copies the one 4K zero page."""
    from kvmsim.mm.fault import _wp_page
    split_huge_pmd(mm, vma, i, reason="do_huge_pmd_wp_page fallback")
    return _wp_page(mm, vma, i)


def do_huge_zero_wp_pmd(mm, vma: Vma, i: int) -> int:
    """Mirrors ``do_huge_zero_wp_pmd()`` (mm/huge_memory.c, v6.13): allocate a THP, then under one
    ``MMU_NOTIFY_CLEAR`` over the 2M range replace the huge zero PMD with it
    (``pmdp_huge_clear_flush()`` + ``map_anon_folio_pmd()``)."""
    lo = pmd_index(vma, i)
    head = mm.phys.alloc(9, owner=vma.anon.owner_id, index=vma.pgoff + lo)
    start = vma.start + (lo << PAGE_SHIFT)
    rng = MmuNotifierRange(start, start + PMD_SIZE, MmuNotifyEvent.CLEAR, reason="do_huge_zero_wp_pmd")
    mm.invalidate_range_start(rng)
    _map_anon_folio_pmd(vma, lo, head)
    mm.invalidate_range_end(rng)
    mm.journal.count("host_huge_alloc")
    return 0


def set_host_kernel(mm, release: tuple[int, int]) -> None:
    """Choose the host mm behaviour of kernel ``release`` (major, minor) for ``mm``, once (module docstring)."""
    mm.huge_zero_wp_fault = do_huge_zero_wp_pmd if release >= (6, 13) else do_huge_pmd_wp_page_fallback
