"""Scenario ops that act on the host (mm/): munmap, mprotect, madvise, mremap, fork, writeback, reclaim,
migration, THP split/collapse, truncate, hole punch, driver teardown, host accesses, folio_referenced.

Each op is a generator (a step of an ``interleave`` thread) returning a :class:`~kvmsim.scenarios.env.Res`.
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Res, _done
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE


def op_munmap(env, a):
    start, size = env.span(a)
    yield from env.mm.munmap.steps(start, size)
    return Res("ok")


def op_mprotect(env, a):
    start, size = env.span(a)
    yield from env.mm.mprotect.steps(start, size, a["prot"])
    return Res("ok")


def op_madvise(env, a):
    start, size = env.span(a)
    yield from env.mm.madvise.steps(start, size, a["advice"])
    return Res("ok")


def op_mremap(env, a):
    v = env.vma(a["vma"])
    to = a.get("to")
    if to is not None:             # MREMAP_FIXED onto VMA ``to``: what is mapped there is unmapped first
        to = env.vma(to)["start"]
        yield from env.mm.munmap.steps(to, v["size"])
    new = yield from env.mm.mremap.steps(v["start"], v["size"], to)
    v["start"] = new
    return Res("ok", value=new)


def op_fork(env, a):
    env.children.append(env.mm.fork())
    yield from _done("fork done")
    return Res("ok")


def op_writeback(env, a):
    from kvmsim.mm.reclaim import writeback, writeback_folio
    asp = env.mapping(a["vma"])
    if a["offset"] is None:
        n = writeback(env.mm, asp)
        yield from _done("writeback done")
        return Res("ok", value=n)
    v = env.vma(a["vma"])
    index = (a["offset"] >> PAGE_SHIFT) + 0
    _, pfn, _, _ = env.mm.pte_of(v["start"] + a["offset"])
    if pfn < 0:
        pfn = int(asp.pages[index]) if index < asp.npages else -1
    if pfn < 0:
        yield from _done("writeback: nothing cached")
        return Res("clean")
    wrote = yield from writeback_folio.steps(env.mm, pfn)
    return Res("written" if wrote else "clean")


def op_reclaim(env, a):
    from kvmsim.mm.reclaim import reclaim
    start, size = env.span(a)
    out = reclaim(env.mm, start, size)
    yield from _done("reclaim done")
    return Res("ok", value=out)


def op_migrate(env, a):
    from kvmsim.mm.reclaim import migrate_page
    new = migrate_page(env.mm, env.hva(a["vma"], a["offset"]))
    yield from _done("migrate done")
    return Res("ok", value=new)


def op_thp_split(env, a):
    from kvmsim.mm.reclaim import thp_split
    thp_split(env.mm, env.hva(a["vma"], a["offset"]))
    yield from _done("thp_split done")
    return Res("ok")


def op_thp_collapse(env, a):
    from kvmsim.mm.reclaim import thp_collapse
    head = thp_collapse(env.mm, env.hva(a["vma"], a["offset"]))
    yield from _done("thp_collapse done")
    return Res("ok", value=head)


def op_truncate(env, a):
    from kvmsim.mm.reclaim import truncate
    truncate(env.mm, env.mapping(a["vma"]), a["size"] >> PAGE_SHIFT)
    yield from _done("truncate done")
    return Res("ok")


def op_punch_hole(env, a):
    from kvmsim.mm.reclaim import punch_hole
    v = env.vma(a["vma"])
    asp = env.mapping(a["vma"])
    base = (v["pgoff"] if v.get("pgoff") is not None else 0)
    punch_hole(env.mm, asp, base + (a["offset"] >> PAGE_SHIFT), a["size"] >> PAGE_SHIFT)
    yield from _done("punch_hole done")
    return Res("ok")


def op_driver_teardown(env, a):
    drv = env.host.drivers.get(a["driver"])
    if drv is None:
        raise ModelError(errno.EINVAL, f"no driver named {a['driver']!r}")
    drv.teardown(env.mm)
    yield from _done("driver teardown: unmap_mapping_range + free pages")
    return Res("ok")


def op_host_access(env, a, write):
    got = env.mm.host_access(env.hva(a["vma"], a["offset"]), write, a.get("value"))
    yield from _done("host access done")
    return Res("ok", value=got)


def op_folio_referenced(env, a):
    """``folio_referenced()`` per page (page_idle / reclaim): clear+test young in the host PTEs, every
    secondary MMU (clear_flush_young) and PG_referenced."""
    from kvmsim.mm.reclaim import folio_referenced
    per = []
    for k in range(a["count"]):
        _, pfn, _, _ = env.mm.pte_of(env.hva(a["vma"], a["offset"] + k * PAGE_SIZE))
        if pfn >= 0 and not env.mm.phys.pfn_valid(pfn):
            per.append("no_page")                  # an MMIO pfn: no struct page, so no folio to test
            continue
        per.append("young" if pfn >= 0 and folio_referenced(env.mm, pfn) else "old")
    yield from _done("folio_referenced done")
    return Res(per[0] if len(set(per)) == 1 else ",".join(per), per_page=per)
