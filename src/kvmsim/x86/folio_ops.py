"""Vectorised struct-page flag operations for the x86 MMU's bulk paths (mm/page.py semantics).

``SetPageDirty`` / ``mark_page_accessed`` on many pfns at once, with the same counters
(``set_dirty:<caller>``, ``mark_accessed:<caller>``), the same facts when the journal records, the
same ``kvm_is_ad_tracked_page()`` filter and the same use-after-free detection as the scalar
helpers in :mod:`kvmsim.kvm.pfn`, so a bulk path and its scalar twin leave identical state.
"""

from __future__ import annotations

import numpy as np

from kvmsim.mm.page import PG
from kvmsim.trace import Src


def _tracked(kvm, pfns: np.ndarray) -> np.ndarray:
    """``kvm_is_ad_tracked_page()`` plus ``!is_error_noslot_pfn()``, vectorised; uaf pfns go scalar."""
    phys = kvm.phys
    pfns = np.asarray(pfns, dtype=np.int64)
    ok = (pfns > 0) & (pfns < phys.nr)
    pfns = pfns[ok]
    pfns = pfns[(phys.flags[pfns] & int(PG.reserved)) == 0]
    return pfns


def _live(kvm, pfns, scalar_op, caller: str, source: Src) -> np.ndarray:
    """The A/D-tracked pfns that are not freed; freed ones go through ``scalar_op`` so each use after
    free is reported exactly as the scalar path reports it."""
    phys = kvm.phys
    pfns = _tracked(kvm, pfns)
    if not len(pfns):
        return pfns
    poisoned = (phys.flags[pfns] & int(PG.poisoned)) != 0
    for pfn in pfns[poisoned]:
        scalar_op(int(pfn), caller, kvm=True, source=source, locked=kvm.mmu_lock.held())
    return pfns[~poisoned]


def set_page_dirty_bulk(kvm, pfns, caller: str, source: Src, gfns=None) -> None:
    """``kvm_set_pfn_dirty()`` on each pfn (one ``SetPageDirty`` per entry, duplicates included)."""
    phys = kvm.phys
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
    if kvm.journal.recording:                # the check only records a fact: nothing to do otherwise
        for h in np.unique(heads).tolist():
            phys._dirty_after_clean_check(h, caller, True)
    phys.flags[heads] |= int(PG.dirty)       # an OR: repeated heads are harmless


def _gfn_of(pfns, gfns) -> dict:
    """pfn → gfn for the facts (``gfns`` parallel to ``pfns``), so a fact names the gfn as the scalar one does."""
    return {} if gfns is None else dict(zip(np.asarray(pfns).tolist(), np.asarray(gfns).tolist()))


def mark_page_accessed_bulk(kvm, pfns, caller: str, source: Src, gfns=None) -> None:
    """``kvm_set_pfn_accessed()`` / ``mark_page_accessed()`` on each pfn (``gfns``: the gfn of each, for facts)."""
    phys = kvm.phys
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
