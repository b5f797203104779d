"""``kvm_set_pfn_dirty()`` / ``kvm_set_pfn_accessed()`` over many pfns (virt/kvm/kvm_main.c semantics), for
the x86 MMU's bulk paths and the policies' bulk hooks.

``SetPageDirty`` / ``mark_page_accessed`` on many pfns at once, with the same counters
(``set_dirty:<caller>``, ``mark_accessed:<caller>``), the same facts when the journal records, the
same ``kvm_is_ad_tracked_page()`` filter and the same use-after-free detection as the scalar
helpers in :mod:`kvmsim.kvm.pfn`, so a bulk path and its scalar twin leave identical state.
"""

from __future__ import annotations

import numpy as np

from kvmsim.mm.page import PG
from kvmsim.trace import Src


_RESERVED, _POISONED = int(PG.reserved), int(PG.poisoned)
_NOT_PLAIN = int(PG.reserved | PG.poisoned | PG.head | PG.tail)


def order0_run(kvm, pfns) -> slice | None:
    """The slice of ``mem_map`` when ``pfns`` is one ascending run of consecutive frames, each a live,
    tracked order-0 page (not reserved, not freed, not part of a large folio: its own head): then
    the bulk helpers update the flags through the slice, with no gather or scatter.  The usual case
    on 4 KiB anonymous memory, whose first touches take consecutive frames."""
    n = len(pfns)
    if not n or pfns.__class__ is not np.ndarray:
        return None
    p0, p1 = int(pfns[0]), int(pfns[-1]) + 1
    if p1 - p0 != n or p0 <= 0 or p1 > kvm.phys.nr or (n > 1 and not (pfns[1:] > pfns[:-1]).all()):
        return None
    if (kvm.phys.flags[p0:p1] & _NOT_PLAIN).any():
        return None
    return slice(p0, p1)


def _live(kvm, pfns, scalar_op, caller: str, source: Src) -> np.ndarray:
    """The pfns ``kvm_is_ad_tracked_page()`` accepts (valid, not PG_reserved; error pfns dropped as
    ``is_error_noslot_pfn()`` does) that are not freed; freed ones go through ``scalar_op`` so each use
    after free is reported exactly as the scalar path reports it.  One read of the page flags; no
    copy when every pfn is a live, tracked page (the common case)."""
    phys = kvm.phys
    pfns = np.asarray(pfns, dtype=np.int64)
    if not len(pfns):
        return pfns
    if pfns.min() <= 0 or pfns.max() >= phys.nr:
        pfns = pfns[(pfns > 0) & (pfns < phys.nr)]
    flags = phys.flags[pfns]
    if not (flags & (_RESERVED | _POISONED)).any():
        return pfns
    tracked = (flags & _RESERVED) == 0
    poisoned = tracked & ((flags & _POISONED) != 0)
    for pfn in pfns[poisoned].tolist():
        scalar_op(pfn, caller, kvm=True, source=source, locked=kvm.mmu_lock.held())
    return pfns[tracked & ~poisoned]


def set_page_dirty_bulk(kvm, pfns, caller: str, source: Src, gfns=None) -> None:
    """``kvm_set_pfn_dirty()`` on each pfn (one ``SetPageDirty`` per entry, duplicates included)."""
    phys = kvm.phys
    if not kvm.journal.recording:
        run = order0_run(kvm, pfns)
        if run is not None:                              # each page is its own folio head
            kvm.journal.count(f"set_dirty:{caller}", run.stop - run.start)
            phys.flags[run] |= int(PG.dirty)
            return
    gfn_of = _gfn_of(pfns, gfns) if kvm.journal.recording else {}
    pfns = _live(kvm, pfns, phys.SetPageDirty, caller, source)
    if not len(pfns):
        return
    kvm.journal.count(f"set_dirty:{caller}", len(pfns))
    heads = phys.head[pfns]
    if kvm.journal.recording:
        locked = kvm.mmu_lock.held()
        first = np.zeros(len(pfns), dtype=bool)
        first[np.unique(heads, return_index=True)[1]] = True
        was = ((phys.flags[heads] & int(PG.dirty)) != 0) | ~first
        for k, pfn in enumerate(pfns.tolist()):
            kvm.journal.fact("set_dirty", pfn=pfn, gfn=gfn_of.get(pfn), caller=caller, kvm=True, source=source,
                             locked=locked, extra={"reserved": False, "was_dirty": bool(was[k])})
    phys.set_folios_dirty(heads, caller, kvm=True)


def _gfn_of(pfns, gfns) -> dict:
    """pfn → gfn for the facts (``gfns`` parallel to ``pfns``), so a fact names the gfn as the scalar one does."""
    return {} if gfns is None else dict(zip(np.asarray(pfns).tolist(), np.asarray(gfns).tolist()))


def mark_page_accessed_bulk(kvm, pfns, caller: str, source: Src, gfns=None) -> None:
    """``kvm_set_pfn_accessed()`` / ``mark_page_accessed()`` on each pfn (``gfns``: the gfn of each, for facts)."""
    phys = kvm.phys
    if not kvm.journal.recording:
        run = order0_run(kvm, pfns)
        if run is not None:                              # each page is its own folio head
            kvm.journal.count(f"mark_accessed:{caller}", run.stop - run.start)
            phys.flags[run] |= int(PG.referenced)
            return
    gfn_of = _gfn_of(pfns, gfns) if kvm.journal.recording else {}
    pfns = _live(kvm, pfns, phys.mark_page_accessed, caller, source)
    if not len(pfns):
        return
    kvm.journal.count(f"mark_accessed:{caller}", len(pfns))
    if kvm.journal.recording:
        locked = kvm.mmu_lock.held()
        for pfn in pfns.tolist():
            kvm.journal.fact("mark_accessed", pfn=pfn, gfn=gfn_of.get(pfn), caller=caller, kvm=True, source=source,
                             locked=locked, extra={"reserved": False, "unused": False})
    phys.flags[phys.head[pfns]] |= int(PG.referenced)
