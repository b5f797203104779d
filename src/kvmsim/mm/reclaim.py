"""Writeback, truncation, reclaim, migration and THP split/collapse (mm/page-writeback.c, mm/rmap.c,
mm/truncate.c, mm/vmscan.c, mm/migrate.c, mm/huge_memory.c, mm/khugepaged.c), and MADV_COLD/MADV_PAGEOUT
(mm/madvise.c).

Each fires the mmu_notifier the way the kernel does, so KVM zaps its stage-2 mappings; writeback
is a kernel path with a yield between ``folio_mkclean()`` and clearing PG_dirty, the window of the
legacy lost-dirty races.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import ModelError
from kvmsim.mm.notifier import MmuNotifierRange, MmuNotifyEvent
from kvmsim.mm.page import PG
from kvmsim.mm.vma import VM, AddressSpace, AnonVma, Pte, Vma
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE, PAGES_PER_PMD, PG_LEVEL_2M

_P, _W, _Y, _D, _S, _SW = (int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY),
                           int(Pte.SPECIAL), int(Pte.SWAP))


def rmap_walk(mm, pfn: int) -> list[tuple[Vma, int]]:
    """Every (vma, page index) whose PTE maps ``pfn`` (``rmap_walk`` through i_mmap / anon_vma)."""
    phys = mm.phys
    owner = phys.owners.get(int(phys.owner[pfn]))
    out = []
    for vma in getattr(owner, "vmas", []):
        if vma not in mm.vmas:
            continue
        i = int(phys.index[pfn]) - vma.pgoff
        if 0 <= i < vma.npages and int(vma.pte_pfn[i]) == pfn:
            out.append((vma, i))
    return out


def _notify(mm, vma: Vma, i: int, n: int, event: MmuNotifyEvent, reason: str) -> MmuNotifierRange:
    start = vma.start + (i << PAGE_SHIFT)
    return MmuNotifierRange(start, start + (n << PAGE_SHIFT), event, reason=reason)


@kpath
def writeback_folio(mm, pfn: int) -> Steps:
    """``folio_clear_dirty_for_io()`` + write: mkclean every mapping, then clear PG_dirty and write.

    The kernel holds the folio lock from ``folio_mkclean()`` until PG_dirty is cleared, so no fault
    can re-dirty the folio in between.  The model gets the same exclusion by keeping the
    invalidations open until PG_dirty is cleared: a racing KVM fault fails its
    ``mmu_invalidate_retry_gfn`` re-check and retries.
    """
    phys = mm.phys
    head = phys.folio(pfn)
    n = phys.folio_nr_pages(head)
    asp = phys.owners.get(int(phys.owner[head]))
    was_pte_dirty = False
    ranges = []
    for p in range(head, head + n):
        for vma, i in rmap_walk(mm, p):                       # folio_mkclean → page_vma_mkclean_one
            rng = _notify(mm, vma, i, 1, MmuNotifyEvent.PROTECTION_PAGE, "folio_mkclean")
            yield from mm.invalidate_range_start.steps(rng)
            was_pte_dirty |= bool(vma.pte[i] & _D)
            vma.pte[i] &= ~np.uint8(_W | _D)
            ranges.append(rng)
    yield "writeback: folio_mkclean done (folio locked)"
    if was_pte_dirty:
        phys.flags[head] |= int(PG.dirty)
    written = bool(phys.flags[head] & PG.dirty)
    if written:
        phys.folio_clear_dirty(head)
        if isinstance(asp, AddressSpace):
            for p in range(head, head + n):
                asp.disk[int(phys.index[p])] = int(phys.data[p])
        mm.journal.count("writeback_folio")
        mm.journal.fact("writeback", pfn=head, caller="folio_clear_dirty_for_io")
    for rng in ranges:
        yield from mm.invalidate_range_end.steps(rng)
    return written


def writeback(mm, asp: AddressSpace) -> int:
    """Write back every dirty folio of a file (``filemap_write_and_wait``); returns folios written."""
    n = 0
    seen = set()
    for pfn in asp.pages[asp.pages >= 0]:
        head = mm.phys.folio(int(pfn))
        if head in seen:
            continue
        seen.add(head)
        n += bool(writeback_folio(mm, head))
    return n


def truncate_cleanup_folios(mm, asp: AddressSpace, lo: int, hi: int) -> None:
    """``truncate_cleanup_folio()``'s ``folio_cancel_dirty()`` for the cached folios of ``[lo, hi)``:
    a folio dirty before truncation is not a bug; one dirtied after this is (see below)."""
    phys = mm.phys
    for index in range(lo, min(hi, asp.npages)):
        pfn = int(asp.pages[index])
        if pfn >= 0:
            phys.folio_clear_dirty(pfn)


def remove_from_cache(mm, asp: AddressSpace, lo: int, hi: int, *, notify: bool = True,
                      cleanup: bool = True) -> None:
    """``truncate_inode_pages_range`` / hole punch: unmap, cancel dirty (``cleanup``; a caller that
    steps through truncation does it itself), then drop the page cache's references.
    ``filemap_unaccount_folio()`` WARNs for a folio that is dirty again by then ("loss of unwritten
    data"): somebody dirtied it between the cancel and the removal."""
    phys = mm.phys
    if notify:
        for vma in list(asp.vmas):
            a, b = max(lo, vma.pgoff), min(hi, vma.pgoff + vma.npages)
            if a < b and vma in mm.vmas:
                rng = _notify(mm, vma, a - vma.pgoff, b - a, MmuNotifyEvent.UNMAP, "unmap_mapping_range")
                mm.invalidate_range_start(rng)
                vma.pte_pfn[a - vma.pgoff:b - vma.pgoff] = -1
                vma.pte[a - vma.pgoff:b - vma.pgoff] = 0
                mm.invalidate_range_end(rng)
    if cleanup:
        truncate_cleanup_folios(mm, asp, lo, hi)
    heads = []
    for index in range(lo, min(hi, asp.npages)):
        pfn = int(asp.pages[index])
        if pfn >= 0:
            head = phys.folio(pfn)
            if head not in heads:
                heads.append(head)
        asp.pages[index] = -1
        asp.removed.add(index)
        asp.disk.pop(index, None)
    for head in heads:
        if phys.flags[head] & PG.dirty and asp.can_writeback:
            mm.journal.fact("dirty_at_truncate", pfn=head, caller="filemap_unaccount_folio",
                            detail="WARN: dirty folio removed from the page cache (loss of unwritten data)")
        phys.folio_clear_dirty(head)
        phys.put_page(head, "truncate_inode_folio")


def truncate(mm, asp: AddressSpace, new_npages: int) -> None:
    remove_from_cache(mm, asp, new_npages, asp.npages)


def punch_hole(mm, asp: AddressSpace, index: int, npages: int) -> None:
    remove_from_cache(mm, asp, index, index + npages)


def folio_referenced(mm, pfn: int) -> bool:
    """``folio_referenced()``: clear+test the young bits of every host PTE and, through
    ``mmu_notifier_clear_flush_young``, every secondary MMU; plus PG_referenced."""
    if not mm.phys.pfn_valid(pfn):                     # no struct page, no folio (an MMIO pfn)
        return False
    young = False
    for vma, i in rmap_walk(mm, pfn):
        if vma.pte[i] & _Y:
            young = True
            vma.pte[i] &= ~np.uint8(_Y)
        hva = vma.start + (i << PAGE_SHIFT)
        young |= mm.clear_flush_young(hva, hva + 4096)
    young |= mm.phys.folio_test_clear_referenced(pfn)
    return young


def reclaim(mm, start: int, length: int) -> dict[str, int]:
    """Shrink the pages mapped in ``[start, start+length)``: young ones are kept (rotated), the rest
    are written back if dirty, unmapped and freed (anon pages go to swap).  Returns counts."""
    phys = mm.phys
    out = {"young": 0, "reclaimed": 0, "busy": 0}
    parts = list(mm._clip(start, length))
    for vma, _, _ in parts:
        if vma.flags & (VM.PFNMAP | VM.HUGETLB):
            # madvise_pageout(): can_madv_lru_vma() refuses VM_PFNMAP and VM_HUGETLB (mm/madvise.c)
            raise ModelError(errno.EINVAL, f"reclaim at {vma.start:#x}: VM_PFNMAP/VM_HUGETLB memory is not on an LRU")
    for vma, lo, hi in parts:
        for i in range(lo, hi):
            pfn = int(vma.pte_pfn[i])
            if pfn < 0 or not vma.pte[i] & _P or vma.pte[i] & _S or phys.is_huge_zero_pfn(pfn):
                continue
            if not _on_lru(mm, vma, pfn):
                continue                                         # a driver page or the zero page
            if folio_referenced(mm, pfn):
                out["young"] += 1
                continue
            owners = 1
            if phys.page_count(pfn) > owners:
                out["busy"] += 1                                 # extra references: not freeable
                continue
            if vma.mapping is not None and vma.mapping.can_writeback:
                writeback_folio(mm, pfn)
            rng = _notify(mm, vma, i, 1, MmuNotifyEvent.CLEAR, "reclaim")
            mm.invalidate_range_start(rng)
            if vma.anon is not None and vma.mapping is None:
                vma.anon.swap[(vma.id, vma.pgoff + i)] = int(phys.data[pfn])
                vma.pte[i] = _SW
                vma.pte_pfn[i] = -1
                phys.put_page(pfn, "shrink_folio_list")
            else:
                asp = vma.mapping
                index = vma.pgoff + i
                if asp.can_writeback and int(phys.data[pfn]) != asp.disk.get(index, 0) and not phys.folio_test_dirty(pfn):
                    mm.journal.fact("data_lost", pfn=pfn, caller="shrink_folio_list",
                                    detail="clean folio evicted although its content was never written back")
                    mm.journal.count("data_lost")
                for v in list(asp.vmas):
                    j = index - v.pgoff
                    if 0 <= j < v.npages and v in mm.vmas:
                        v.pte[j] = 0
                        v.pte_pfn[j] = -1
                if not asp.can_writeback:
                    asp.disk[index] = int(phys.data[pfn])          # shmem: to swap
                asp.pages[index] = -1
                asp.needs_io.add(index)
                phys.put_page(pfn, "shrink_folio_list")
            mm.invalidate_range_end(rng)
            out["reclaimed"] += 1
    mm.journal.count("reclaimed", out["reclaimed"])
    return out


def _on_lru(mm, vma: Vma, pfn: int) -> bool:
    """Is ``pfn`` a page of this VMA's own memory (its anon_vma or file), i.e. on an LRU list?  Driver
    pages of a VM_MIXEDMAP VMA and the zero page are not: reclaim and migration never isolate them."""
    if not mm.phys.pfn_valid(pfn):
        return False
    owner = mm.phys.owners.get(int(mm.phys.owner[pfn]))
    return owner is not None and (owner is vma.anon or owner is vma.mapping)


def madvise_cold_or_pageout(mm, parts: list[tuple[Vma, int, int]], pageout: bool) -> int:
    """Mirrors ``madvise_cold_or_pageout_pte_range()`` (mm/madvise.c, v6.12/v6.13) over ``(vma, lo, hi)``
    page ranges, then, for MADV_PAGEOUT, ``reclaim_pages()``; returns the folios reclaimed.

    Each PTE-mapped normal folio not mapped elsewhere (``folio_likely_mapped_shared()``) is made old:
    the host PTE's young bit is cleared without the mmu_notifier (``ptep_get_and_clear_full()`` +
    ``pte_mkold()``, so KVM keeps its accessed bits), then ``folio_clear_referenced()``.  MADV_COLD
    stops there (``folio_deactivate()``; the model keeps no LRU lists).  PMD-mapped THPs are left alone
    (the kernel pages them out whole or splits them; not modelled)."""
    phys = mm.phys
    folios: list[int] = []
    for vma, lo, hi in parts:
        for i in range(lo, hi):
            pfn, bits = int(vma.pte_pfn[i]), int(vma.pte[i])
            if pfn < 0 or not bits & _P or bits & _S or vma.pte_level[i] > 1:
                continue                                      # vm_normal_folio(): NULL for the zero page
            head = phys.folio(pfn)
            if len(rmap_walk(mm, head)) > 1:                  # folio_likely_mapped_shared()
                continue
            vma.pte[i] &= ~np.uint8(_Y)
            phys.folio_test_clear_referenced(head)
            if pageout and head not in folios:
                folios.append(head)                           # folio_isolate_lru()
    if not pageout:
        return 0
    return reclaim_pages(mm, folios)


def reclaim_pages(mm, folios: list[int]) -> int:
    """Mirrors ``reclaim_pages()`` (mm/vmscan.c): ``shrink_folio_list()`` with ``ignore_references``."""
    n = sum(1 for head in folios if _shrink_folio(mm, head))
    mm.journal.count("reclaimed", n)
    return n


def _try_to_unmap(mm, head: int) -> None:
    """``try_to_unmap()`` → ``try_to_unmap_one()``: per mapping, an ``MMU_NOTIFY_CLEAR`` over the page,
    the PTE cleared and a dirty PTE moved to the folio (``folio_mark_dirty()``)."""
    phys = mm.phys
    for vma, i in rmap_walk(mm, head):
        rng = _notify(mm, vma, i, 1, MmuNotifyEvent.CLEAR, "try_to_unmap")
        mm.invalidate_range_start(rng)
        if vma.pte[i] & _D:
            phys.flags[head] |= int(PG.dirty)
        vma.pte[i] = 0
        vma.pte_pfn[i] = -1
        mm.invalidate_range_end(rng)


def _shrink_folio(mm, head: int) -> bool:
    """One folio of ``shrink_folio_list()`` (mm/vmscan.c) when references are ignored; True if freed.

    Private anon: ``add_to_swap()`` first, which fails without swap (``total_swap_pages`` 0): the folio
    stays mapped (``activate_locked``).  Otherwise ``try_to_unmap()``; a dirty folio then: of a regular
    file stays cached (direct reclaim does not write file folios: ``activate_locked``), of shmem is
    written to swap, or without swap re-dirtied and kept (``shmem_writepage()``: ``goto redirty``,
    ``AOP_WRITEPAGE_ACTIVATE``).  A folio with references beyond the page cache's stays
    (``__remove_mapping()``'s ``folio_ref_freeze()`` fails)."""
    phys = mm.phys
    owner = phys.owners.get(int(phys.owner[head]))
    if isinstance(owner, AnonVma):
        maps = rmap_walk(mm, head)
        if not mm.total_swap_pages or len(maps) != 1 or phys.page_count(head) > 1:
            return False
        vma, i = maps[0]
        rng = _notify(mm, vma, i, 1, MmuNotifyEvent.CLEAR, "try_to_unmap")
        mm.invalidate_range_start(rng)
        vma.anon.swap[(vma.id, vma.pgoff + i)] = int(phys.data[head])
        vma.pte[i] = _SW
        vma.pte_pfn[i] = -1
        phys.put_page(head, "shrink_folio_list")
        mm.invalidate_range_end(rng)
        return True
    if not isinstance(owner, AddressSpace):
        return False
    asp, index = owner, int(phys.index[head])
    _try_to_unmap(mm, head)
    if phys.folio_test_dirty(head):
        if asp.can_writeback or not mm.total_swap_pages:
            return False
        asp.disk[index] = int(phys.data[head])                 # shmem_writepage(): to swap
        phys.folio_clear_dirty(head)
    if phys.page_count(head) > 1:
        return False
    asp.pages[index] = -1
    asp.needs_io.add(index)
    phys.put_page(head, "shrink_folio_list")
    return True


def migrate_page(mm, hva: int) -> int:
    """``migrate_pages()`` of the page at ``hva``: new pfn, same data; -EAGAIN if someone holds an
    extra reference (a GUP pin or KVM's FOLL_GET).  Returns the new pfn."""
    phys = mm.phys
    vma, pfn, bits, level = mm.pte_of(hva)
    if vma is None or pfn < 0 or bits & _S or level > 1:
        raise ModelError(errno.EINVAL, f"migrate at {hva:#x}: not a present small normal page")
    if not _on_lru(mm, vma, pfn):
        raise ModelError(errno.EBUSY, f"migrate pfn {pfn:#x}: not a page on an LRU (isolation fails)")
    if phys.page_count(pfn) > 1:
        mm.journal.count("migrate_busy")
        raise ModelError(errno.EAGAIN, f"migrate pfn {pfn:#x}: refcount {phys.page_count(pfn)} > expected 1")
    maps = rmap_walk(mm, pfn)
    new = phys.alloc(owner=int(phys.owner[pfn]), index=int(phys.index[pfn]))
    phys.data[new] = phys.data[pfn]
    phys.flags[new] |= phys.flags[pfn] & int(PG.dirty)
    for v, i in maps:
        rng = _notify(mm, v, i, 1, MmuNotifyEvent.MIGRATE, "migrate")
        mm.invalidate_range_start(rng)
        v.pte_pfn[i] = new
        mm.invalidate_range_end(rng)
    if vma.mapping is not None:
        vma.mapping.pages[vma.pgoff + vma.idx(hva)] = new
    phys.put_page(pfn, "migrate_folio")
    mm.journal.count("migrated")
    return new


def thp_split(mm, hva: int) -> None:
    """``split_huge_pmd`` + ``split_folio``: the PMD becomes 512 PTEs and the folio 512 small folios
    (kvmsim.mm.huge_memory.split_huge_pmd; a huge zero PMD becomes 512 zero-page PTEs)."""
    from kvmsim.mm.huge_memory import split_huge_pmd
    vma, pfn, bits, level = mm.pte_of(hva)
    if vma is None or level != PG_LEVEL_2M or vma.mapping is not None:
        raise ModelError(errno.EINVAL, f"thp split at {hva:#x}: not an anonymous PMD mapping")
    split_huge_pmd(mm, vma, vma.idx(hva))


def thp_collapse(mm, hva: int) -> int:
    """``MADV_COLLAPSE`` / khugepaged: copy 512 small pages into a new THP; returns the new head."""
    phys = mm.phys
    vma = mm.vma_lookup(hva)
    if vma is None or vma.mapping is not None or vma.anon is None or vma.flags & (VM.PFNMAP | VM.MIXEDMAP):
        # hugepage_vma_check() (mm/huge_memory.c): no THP for VM_PFNMAP/VM_MIXEDMAP or non-anon memory
        raise ModelError(errno.EINVAL, f"collapse at {hva:#x}: not anonymous memory")
    i = vma.idx(hva) // PAGES_PER_PMD * PAGES_PER_PMD
    if i + PAGES_PER_PMD > vma.npages:
        raise ModelError(errno.EINVAL, "collapse: range is not a whole PMD inside the VMA")
    old = vma.pte_pfn[i:i + PAGES_PER_PMD].copy()
    present = (vma.pte[i:i + PAGES_PER_PMD] & _P) != 0
    for pfn in old[present]:
        if int(pfn) != phys.zero_pfn and not phys.is_huge_zero_pfn(int(pfn)) and phys.page_count(int(pfn)) > 1:
            raise ModelError(errno.EAGAIN, f"collapse: pfn {int(pfn):#x} has extra references")
    rng = _notify(mm, vma, i, PAGES_PER_PMD, MmuNotifyEvent.CLEAR, "collapse_huge_page")
    mm.invalidate_range_start(rng)
    head = phys.alloc(9, owner=vma.anon.owner_id, index=vma.pgoff + i)
    for k in range(PAGES_PER_PMD):
        if present[k] and old[k] != phys.zero_pfn and not phys.is_huge_zero_pfn(int(old[k])):
            phys.data[head + k] = phys.data[int(old[k])]
            phys.put_page(int(old[k]), "collapse_huge_page")
    vma.pte_pfn[i:i + PAGES_PER_PMD] = np.arange(head, head + PAGES_PER_PMD)
    vma.pte[i:i + PAGES_PER_PMD] = _P | _W | _D | _Y
    vma.pte_level[i:i + PAGES_PER_PMD] = PG_LEVEL_2M
    mm.invalidate_range_end(rng)
    mm.journal.count("thp_collapse")
    return head


@kpath
def truncate_page(mm, vma, index: int) -> Steps:
    """``truncate_inode_pages_range()`` of one page: inside one notifier window, zap the PTE and drop
    the folio from the page cache (``truncate_inode_folio`` → ``unmap_mapping_folio``)."""
    start = vma.start + ((index - vma.pgoff) << PAGE_SHIFT)
    rng = MmuNotifierRange(start, start + PAGE_SIZE, MmuNotifyEvent.UNMAP, reason="unmap_mapping_range")
    yield from mm.invalidate_range_start.steps(rng)
    vma.pte_pfn[index - vma.pgoff] = -1
    vma.pte[index - vma.pgoff] = 0
    yield "unmap_mapping_range: PTE zapped"
    truncate_cleanup_folios(mm, vma.mapping, index, index + 1)
    yield "truncate_cleanup_folio: dirty cancelled"
    remove_from_cache(mm, vma.mapping, index, index + 1, notify=False, cleanup=False)
    yield "truncate_inode_folio: folio removed from the page cache"
    yield from mm.invalidate_range_end.steps(rng)
