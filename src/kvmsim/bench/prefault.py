"""The host side of first-touch guest faults over a range, vectorised (mm/gup.c
``get_user_pages_unlocked()`` → mm/memory.c ``handle_mm_fault()``, mm/hugetlb.c, mm/shmem.c).

A stage-2 fault on a page the host has not mapped writable makes KVM's ``hva_to_pfn()`` fall back from
``get_user_page_fast_only()`` to ``get_user_pages_unlocked(FOLL_WRITE)``, which faults the page (or
the whole THP / hugetlb folio) in and touches it (``FOLL_TOUCH``).  :func:`host_prefault_range` does
that for every fault a write pass over ``[lo, hi)`` of a slot would take, in gfn order, leaving the
host PTEs, folios and counters (``gup_slow``, ``host_page_fault``, ``host_huge_alloc``,
``mark_accessed:follow_page_pte:FOLL_TOUCH``) exactly as the scalar faults would.  The KVM side
(the fast GUP that now succeeds, ``make_spte()``, the release) is then
:func:`kvmsim.x86.bulk.guest_access_range`'s vectorised slow fault.

Only fresh memory is handled: private anonymous memory (4 KiB, THP, private hugetlb) and shared
memory (shmem, memfd, shared hugetlb) with no swap, no file data to read back and an empty page
free list; everything else is left to the scalar path (the function then does nothing there).
"""

from __future__ import annotations

import numpy as np

from kvmsim.mm.page import PG
from kvmsim.mm.vma import VM, Pte, VmaKind
from kvmsim.types import PAGE_SHIFT, PAGES_PER_PMD, PG_LEVEL_2M
from kvmsim.x86.spte import SPTE

_P, _W, _Y, _D, _PN = int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY), int(Pte.PROTNONE)
_SP, _SW_, _SMW = int(SPTE.PRESENT), int(SPTE.W), int(SPTE.MMU_W)
_FOLL_TOUCH = "follow_page_pte:FOLL_TOUCH"


def host_prefault_range(kvm, slot, lo: int, hi: int) -> tuple[int, bool]:
    """Fault in, for write, what guest writes to slot-relative ``[lo, hi)`` would make GUP fault in.

    Only a prefix is done, so that no allocation happens out of the scalar order: it ends before the
    first page whose fault takes another host path (a read-only host PTE to break copy-on-write, a
    write-protected SPTE that is not MMU-writable) or the first VMA this module does not handle.
    Returns ``(stop, irregular)``: ``[lo, stop)`` is done; when ``stop < hi``, ``irregular`` says
    the page at ``stop`` needs the scalar path alone (then prefaulting may resume after it),
    otherwise the rest of the range must go to the scalar-ordered MMU path without prefaulting."""
    if hi <= lo or slot.readonly or kvm.execution != "hardware":
        return lo, False
    t = slot.arch.get("x86")
    h0 = slot.userspace_addr + (lo << PAGE_SHIFT)
    h1 = slot.userspace_addr + (hi << PAGE_SHIFT)
    pos = lo
    for vma in kvm.mm.vmas_in(h0, h1):
        a, b = max(h0, vma.start), min(h1, vma.end)
        s0 = lo + ((a - h0) >> PAGE_SHIFT)
        if s0 != pos or not _handled(kvm, vma):
            return pos, False
        i0, i1 = vma.idx(a), vma.idx(b)
        pte = vma.pte[i0:i1]
        need = (pte & (_P | _W)) != (_P | _W)
        if not need.any():                   # mapped writable already (a later pass): nothing to fault in
            pos = s0 + i1 - i0
            continue
        irregular = (pte & _PN) != 0
        irregular |= need & ((pte & _P) != 0)                        # read-only host PTE: COW / zero page
        if t is not None:
            sb = t.bits[s0:s0 + i1 - i0]
            present = (sb & _SP) != 0
            if present.any():                                        # else a first touch: no SPTE to test
                irregular |= present & ((sb & (_SW_ | _SMW)) == 0)   # no fast fix: slow fault
                need &= ~present
        cut = int(np.argmax(irregular)) if irregular.any() else i1 - i0
        todo = need[:cut]
        if todo.any():
            idx = np.arange(i0, i0 + cut) if todo.all() else i0 + np.flatnonzero(todo)   # all: no nonzero scan
            if not _fault_vma(kvm, vma, idx):
                return s0, False
        if cut < i1 - i0:
            return s0 + cut, True
        pos = s0 + i1 - i0
    return pos, False


def host_mapped_range(kvm, slot, lo: int, hi: int) -> bool:
    """Does the host map every page of slot-relative ``[lo, hi)`` (a present PTE)?  Then no guest
    access there makes the host allocate (a copy-on-write break aside, which the scalar path does
    in gfn order), so a mixed read/write pass needs no prefault."""
    h0 = slot.userspace_addr + (lo << PAGE_SHIFT)
    h1 = slot.userspace_addr + (hi << PAGE_SHIFT)
    covered = 0
    for vma in kvm.mm.vmas_in(h0, h1):
        a, b = max(h0, vma.start), min(h1, vma.end)
        if not (vma.pte[vma.idx(a):vma.idx(b)] & _P).all():
            return False
        covered += (b - a) >> PAGE_SHIFT
    return covered == hi - lo


def _handled(kvm, vma) -> bool:
    """Fresh private anonymous or shared memory with nothing to read back, and no free pages to reuse."""
    if kvm.phys._free or not vma.flags & VM.WRITE or vma.flags & (VM.IO | VM.PFNMAP) or vma.driver is not None:
        return False
    if vma.mapping is not None and vma.flags & VM.SHARED:
        asp = vma.mapping
        return not (asp.disk or asp.needs_io or asp.removed or asp.truncated_from is not None or vma.writenotify)
    return vma.anon is not None and not vma.anon.swap


def _fault_vma(kvm, vma, idx: np.ndarray) -> bool:
    """Fault ``idx`` (VMA page indices, ascending) in; False, with nothing done, when it cannot."""
    if vma.mapping is not None and vma.flags & VM.SHARED:
        return _fault_shared(kvm, vma, idx)
    if vma.kind == VmaKind.HUGETLB:
        return _fault_anon_huge(kvm, vma, idx, vma.huge_level)
    if vma.flags & VM.HUGEPAGE:
        n = PAGES_PER_PMD
        lo = idx // n * n
        fits = ((vma.start + (lo << PAGE_SHIFT)) % (1 << 21) == 0) & (lo + n <= vma.npages)
        if fits.all():
            return _fault_anon_huge(kvm, vma, idx, PG_LEVEL_2M)
        if fits.any():
            return False                      # some regions THP, some not: leave the order to the scalar path
    return _fault_anon_4k(kvm, vma, idx)


def _touch(kvm, pfns: np.ndarray, huge: bool = False) -> None:
    """``get_user_pages_unlocked()``'s accounting for each fault: ``gup_slow``, ``FOLL_TOUCH``.

    ``huge``: the pages are mapped by a PMD/PUD, which ``follow_huge_pmd()``/``follow_huge_pud()``
    only make young (``touch_pmd()``), with no ``mark_page_accessed()`` (mm/gup.c); the entries
    are already young and dirty from the fault."""
    _count_gup_slow(kvm, len(pfns), huge)
    if not huge:
        kvm.phys.flags[kvm.phys.head[pfns]] |= int(PG.referenced)      # an OR: repeats are harmless


def _count_gup_slow(kvm, n: int, huge: bool) -> None:
    """:func:`_touch`'s counters for ``n`` faults."""
    j = kvm.journal
    j.count("gup_slow", n)
    j.count("host_page_fault", n)
    if not huge:
        j.count(f"mark_accessed:{_FOLL_TOUCH}", n)


def _fault_anon_4k(kvm, vma, idx: np.ndarray) -> bool:
    """``do_anonymous_page()`` for write: a new page each, mapped writable and dirty.  The new pages
    are consecutive frames (``alloc(count=n)``); consecutive ``idx`` (the usual first touch of a
    whole range) is done with slices alone: ``alloc`` already set each page's index."""
    phys = kvm.phys
    n = len(idx)
    pfn0 = phys.alloc(0, owner=vma.anon.owner_id, index=vma.pgoff + int(idx[0]), count=n)
    if int(idx[-1]) - int(idx[0]) + 1 == n:
        i0 = int(idx[0])
        vma.pte_pfn[i0:i0 + n] = np.arange(pfn0, pfn0 + n, dtype=np.int64)
        vma.pte[i0:i0 + n] = _P | _Y | _W | _D
        _count_gup_slow(kvm, n, huge=False)
        phys.flags[pfn0:pfn0 + n] |= int(PG.referenced)                 # order-0 pages: their own heads
        return True
    pfns = np.arange(pfn0, pfn0 + n, dtype=np.int64)
    phys.index[pfns] = vma.pgoff + idx
    vma.pte_pfn[idx] = pfns
    vma.pte[idx] = _P | _Y | _W | _D
    _touch(kvm, pfns)
    return True


def _runs(starts: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Split sorted region starts into runs of consecutive regions: (first start, count)."""
    brk = np.flatnonzero(np.diff(starts) != n) + 1
    return [(int(r[0]), len(r)) for r in np.split(starts, brk)]


def _fault_anon_huge(kvm, vma, idx: np.ndarray, level: int) -> bool:
    """Anonymous THP / private hugetlb: one folio per touched huge region, mapped writable+dirty."""
    phys = kvm.phys
    n = 1 << (9 * (level - 1))
    region = idx // n * n
    if len(region) < 2 or (region[1:] >= region[:-1]).all():   # in order (the usual pass): no sort
        first = np.flatnonzero(np.concatenate(([True], region[1:] != region[:-1])))
        starts = region[first]
    else:
        starts, first = np.unique(region, return_index=True)
    leaders = idx[first]
    for s, cnt in _runs(starts, n):
        head = phys.alloc(9 * (level - 1), owner=vma.anon.owner_id, index=vma.pgoff + s, count=cnt)
        m = cnt * n
        vma.pte_pfn[s:s + m] = np.arange(head, head + m)
        vma.pte[s:s + m] = _P | _Y | _W | _D
        vma.pte_level[s:s + m] = level
    kvm.journal.count("host_huge_alloc", len(starts))
    _touch(kvm, vma.pte_pfn[leaders], huge=True)
    return True


def _fault_shared(kvm, vma, idx: np.ndarray) -> bool:
    """``shmem_fault()`` / ``hugetlb_fault()`` on a shared mapping: allocate the folio into the page
    cache if absent, map it writable and dirty (the whole folio when it fits in the VMA)."""
    phys = kvm.phys
    asp = vma.mapping
    order = asp.folio_order
    n = 1 << order
    index = vma.pgoff + idx
    if (index >= asp.npages).any():
        return False
    if n == 1:
        cached = asp.pages[index] >= 0
        new = index[~cached]
        if len(new):
            pfn0 = phys.alloc(0, owner=asp.owner_id, index=int(new[0]), count=len(new))
            pfns = np.arange(pfn0, pfn0 + len(new), dtype=np.int64)
            phys.index[pfns] = new
            asp.pages[new] = pfns
        vma.pte_pfn[idx] = asp.pages[index]
        vma.pte[idx] = _P | _Y | _W | _D
        phys.flags[phys.head[vma.pte_pfn[idx]]] |= int(PG.uptodate)
        _touch(kvm, vma.pte_pfn[idx])
        return True
    lo_index = index // n * n
    starts, first = np.unique(lo_index, return_index=True)
    leaders = idx[first]
    lo_vma = leaders - (index[first] - starts)
    if ((lo_vma < 0) | (lo_vma + n > vma.npages)).any():
        return False
    missing = starts[asp.pages[starts] < 0]
    for s, cnt in (_runs(missing, n) if len(missing) else []):
        head = phys.alloc(order, owner=asp.owner_id, index=s, count=cnt)
        asp.pages[s:s + cnt * n] = np.arange(head, head + cnt * n)
    for s, cnt in _runs(lo_vma, n):
        m = cnt * n
        sl = slice(s, s + m)
        vma.pte_pfn[sl] = asp.pages[vma.pgoff + s:vma.pgoff + s + m]
        vma.pte[sl] = _P | _Y | _W | _D
        vma.pte_level[sl] = vma.huge_level
    heads = asp.pages[starts]
    phys.flags[heads] |= int(PG.uptodate)
    _touch(kvm, vma.pte_pfn[leaders], huge=vma.huge_level > 1)
    return True
