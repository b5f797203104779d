"""The memory floor of each dirty_log_perf_test phase on the model (issue 17): the least per-page
model state the phase must read plus write, over the copy bandwidth measured in the same process.

Per-page state.  The model keeps one element per 4 KiB page in these arrays (the bytes per page are
read from the run's own arrays, :func:`state_bytes`, so a smaller dtype lowers the floor):

==================  ==========================================  =====================================
name                array                                       what
==================  ==========================================  =====================================
``mem_map.*``       ``kvm.phys.{cls,flags,refcount,pincount,    ``struct page`` (kvmsim.mm.page)
                    head,order,data,owner,index}``
``pte.pfn``,        ``vma.pte_pfn``, ``vma.pte``,               the host PTE (kvmsim.mm.vma)
``pte.flags``,      ``vma.pte_level``
``pte.level``
``spte.pfn``,       ``SptTable.pfn``, ``.bits``, ``.level``     the leaf SPTE (kvmsim.x86.spte)
``spte.bits``,
``spte.level``
``dirty_bitmap``    ``slot.dirty_bitmap``                       the memslot's dirty bitmap
==================  ==========================================  =====================================

What each phase must touch (:data:`PHASE_ACCESS`), for the 4 KiB default flow (anonymous memory,
``MANUAL_PROTECT_ENABLE | INITIALLY_SET``, PML, ``-w 100``, no ``-e``), every page once:

* populate: the first write fault of every page.  The host fault writes the ``struct page`` fields a
  new page gets (flags, refcount, head, owner, index: class, pincount and order stay 0) and the host
  PTE (pfn, flags); KVM's fault writes the SPTE (bits, pfn, level); the guest's store writes the
  page's data.  Nothing needs to be read that the fault did not just produce.
* enable: the dirty bitmap is allocated all set (``INITIALLY_SET``); nothing else.
* dirty, iteration 1: every SPTE is still writable and dirty (INITIALLY_SET defers protection to
  the first CLEAR): read the SPTE bits and pfn, store the data.
* dirty, later iterations: the CLEAR cleared D: read and write the SPTE bits (hardware sets D), read
  the pfn, store the data, and PML sets the dirty bit.
* get: copy the dirty bitmap out (read it, write the copy).
* clear: read userspace's bitmap and the slot's, write the slot's; read the SPTE level (only 4 KiB
  leaves are cleared) and read and write the bits.  For each ``set_dirty`` (v6.12's
  ``kvm_set_pfn_dirty()`` on every SPTE whose D it clears) also read the SPTE pfn and the page's
  head, and read and write the folio's flags.
* disable: zap collapsible SPTEs: the host level of each 2 MiB region (one host PTE level per 512
  pages); with a host mapping only 4 KiB nothing else.

The floor's seconds are ``bytes / copy bandwidth``: :func:`copy_bandwidth` copies a 1 GiB array
(best of a few rounds) and counts the bytes read plus written.  Other flows (hugetlb, THP, ``-w <
100``, ``-g``, ``-e``) have no floor here: their phases touch other state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kvmsim.types import PAGES_PER_PMD

MEM_MAP_FIELDS = ("cls", "flags", "refcount", "pincount", "head", "order", "data", "owner", "index")

#: ``(name, fraction of pages)``: a fraction below 1 is state read once per group of pages.
Term = tuple[str, float]


@dataclass(frozen=True)
class PhaseAccess:
    """The per-page arrays a phase must read and write; ``per_set_dirty`` is touched once per
    ``set_dirty`` counted in the phase (legacy's SetPageDirty on zapped/cleared SPTEs)."""

    reads: tuple[Term, ...] = ()
    writes: tuple[Term, ...] = ()
    per_set_dirty: tuple[str, ...] = ()


def _all(*names: str) -> tuple[Term, ...]:
    return tuple((n, 1.0) for n in names)


#: Keyed by phase name; "dirty1" is the first dirty pass (SPTEs still dirty from populate).
PHASE_ACCESS: dict[str, PhaseAccess] = {
    "populate": PhaseAccess(writes=_all("mem_map.flags", "mem_map.refcount", "mem_map.head", "mem_map.owner",
                                   "mem_map.index", "mem_map.data", "pte.pfn", "pte.flags",
                                   "spte.bits", "spte.pfn", "spte.level")),
    "enable": PhaseAccess(writes=_all("dirty_bitmap")),
    "dirty1": PhaseAccess(reads=_all("spte.bits", "spte.pfn"), writes=_all("mem_map.data")),
    "dirty": PhaseAccess(reads=_all("spte.bits", "spte.pfn"), writes=_all("spte.bits", "mem_map.data", "dirty_bitmap")),
    "get": PhaseAccess(reads=_all("dirty_bitmap"), writes=_all("dirty_bitmap")),
    "clear": PhaseAccess(reads=_all("dirty_bitmap", "dirty_bitmap", "spte.level", "spte.bits"),
                    writes=_all("dirty_bitmap", "spte.bits"),
                    per_set_dirty=("spte.pfn", "mem_map.head", "mem_map.flags", "mem_map.flags")),
    "disable": PhaseAccess(reads=(("pte.level", 1 / PAGES_PER_PMD),)),
}


def floor_applies(opts) -> bool:
    """Is the run the flow :data:`PHASE_ACCESS` describes?"""
    return (opts.backing == "anonymous" and opts.manual_protect and opts.write_percent == 100
            and not opts.run_while_disabling and opts.pml)


def state_bytes(kvm, slot, vma) -> dict[str, float]:
    """Bytes per guest page of each per-page array, read from the run's arrays (``slot`` needs its
    dirty bitmap: call it while logging is on)."""
    from kvmsim.x86.spte import tables
    phys, t = kvm.phys, tables(slot)
    out = {f"mem_map.{f}": float(getattr(phys, f).itemsize) for f in MEM_MAP_FIELDS}
    out.update({"pte.pfn": vma.pte_pfn.itemsize, "pte.flags": vma.pte.itemsize, "pte.level": vma.pte_level.itemsize,
                "spte.pfn": t.pfn.itemsize, "spte.bits": t.bits.itemsize, "spte.level": t.level.itemsize})
    bm = slot.dirty_bitmap
    out["dirty_bitmap"] = bm.nbytes / slot.npages if bm is not None else float("nan")
    return {k: float(v) for k, v in out.items()}


def phase_key(name: str, iteration: int | None) -> str:
    return "dirty1" if name == "dirty" and iteration == 1 else name


def phase_floor_bytes(state: dict[str, float], name: str, iteration: int | None, npages: int,
                      set_dirty: int = 0) -> int | None:
    """The bytes a phase must read plus write over ``npages`` guest pages; None for a phase the
    table does not know."""
    acc = PHASE_ACCESS.get(phase_key(name, iteration))
    if acc is None:
        return None
    per_page = sum(state[n] * f for n, f in acc.reads + acc.writes)
    return round(per_page * npages + sum(state[n] for n in acc.per_set_dirty) * set_dirty)


def copy_bandwidth(nbytes: int = 1 << 30, rounds: int = 3, *, cpu: bool = False) -> float:
    """Bytes read plus written per second by ``np.copyto`` of an ``nbytes`` int64 array, best of
    ``rounds`` (after one untimed copy that faults the destination in); ``cpu``: per second of this
    process's CPU time instead of wall time (on a shared machine, what the phases' CPU times are
    compared with)."""
    src = np.ones(max(1, nbytes // 8), dtype=np.int64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    clock = time.process_time if cpu else time.perf_counter
    best = float("inf")
    for _ in range(rounds):
        t0 = clock()
        np.copyto(dst, src)
        best = min(best, clock() - t0)
    return 2 * src.nbytes / max(best, 1e-9)


def copy_bandwidths(nbytes: int = 1 << 30, rounds: int = 3) -> tuple[float, float]:
    """(wall, CPU) copy bandwidth, each the best of ``rounds`` copies of one pair of arrays (of at
    most a quarter of ``MemAvailable`` each, so the measurement never exhausts memory)."""
    from kvmsim.bench.dirty_log_perf import mem_available
    avail = mem_available()
    if avail is not None:
        nbytes = max(64 << 20, min(nbytes, avail // 4))
    src = np.ones(max(1, nbytes // 8), dtype=np.int64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    wall = cpu = float("inf")
    for _ in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        np.copyto(dst, src)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return 2 * src.nbytes / max(wall, 1e-9), 2 * src.nbytes / max(cpu, 1e-9)
