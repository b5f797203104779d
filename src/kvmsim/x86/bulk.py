"""Vectorised guest accesses over page ranges: the x86 MMU's bulk twin of :meth:`X86Mmu.guest_access`.

One call touches ``npages`` consecutive gfns the way the same scalar accesses in gfn order would,
with the same SPTE state, dirty bitmap / ring, folio flags and MMU counters (``page_fault``,
``fast_page_fault``, ``spte_write``, ``set_dirty:*``, ``mark_accessed:*``, ``tlb_flush``):

* hits: hardware A/D (and a PML entry for a write that sets D on a dirty-logged slot);
* 4 KiB fast page faults (access-tracked or write-protected MMU-writable SPTEs) in one write;
* on the TDP MMU (the shadow MMU's fault also prefetches neighbours, so its slow faults stay
  scalar), slow faults whose host PTE is present, writable and maps a normal page
  (``get_user_page_fast_only`` would succeed) are resolved and installed per leaf, and released
  through the policy's ``release_faultin_bulk``; the GUP reference is taken and dropped in the same call, so only its
  counters are kept, not per-page get/put facts;
* anything else (no slot, host fault needed, an SPTE in the way) goes through the scalar path.

A slow fault here follows the scalar fault's rules, not a copy of them: it snapshots
``mmu_invalidate_seq``, leaves every gfn the lockless pre-check would retry
(``mmu_invalidate_retry_gfn_unsafe()``: an invalidation in progress over it) to the scalar path,
takes ``mmu_lock`` through the MMU's own lock steps (:meth:`X86Mmu._lock`) only if it is free now
(otherwise the scalar fault blocks or reports the deadlock, as it does alone), and re-checks
``mmu_invalidate_retry_gfn()`` under the lock before any SPTE is written (a stale batch installs
nothing and goes to the scalar path, which retries).
"""

from __future__ import annotations

import numpy as np

from kvmsim.kvm.dirty import mark_page_dirty_in_slot
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.page import PG
from kvmsim.mm.vma import Pte
from kvmsim.sched import Wait
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT
from kvmsim.x86 import huge_leaves, tdp_mmu
from kvmsim.x86.spte import AT, A, ADX, D, MMIO, MW, P, SW, W, make_spte, spte_write, tables

_HP, _HW, _HS, _HPN = int(Pte.PRESENT), int(Pte.WRITE), int(Pte.SPECIAL), int(getattr(Pte, "PROTNONE", 0))
_POISONED = int(PG.poisoned)


def _span(idx: np.ndarray) -> tuple[int, int] | None:
    """``(lo, hi)`` when the ascending, distinct indices ``idx`` are exactly ``[lo, hi)`` (the usual
    case: a run of consecutive gfns), so the arrays can be sliced instead of gathered."""
    if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
        return int(idx[0]), int(idx[-1]) + 1
    return None


def _take(arr: np.ndarray, idx: np.ndarray, span: tuple[int, int] | None) -> np.ndarray:
    """``arr[idx]``, as a slice (a view: read it before writing ``arr``) when ``idx`` is a span."""
    return arr[span[0]:span[1]] if span is not None else arr[idx]


def mark_dirty_bulk(kvm, slot, idx: np.ndarray, vcpu) -> None:
    """``mark_page_dirty_in_slot()`` for each slot-relative index, in order."""
    if not slot.logging or not len(idx):
        return
    if kvm.dirty_ring_size or slot.dirty_bitmap is None:
        for i in idx.tolist():
            mark_page_dirty_in_slot(kvm, slot, slot.base_gfn + i, vcpu)
        return
    kvm.journal.count("mark_page_dirty_in_slot", len(idx))
    span = _span(idx)
    if span is not None:
        slot.dirty_bitmap[span[0]:span[1]] = True
    else:
        slot.dirty_bitmap[idx] = True


def mark_dirty_mask(kvm, slot, lo: int, mask: np.ndarray, vcpu) -> None:
    """:func:`mark_dirty_bulk` for the slot-relative pages ``lo + k`` where ``mask[k]``, in order,
    without building the index array when the dirty bitmap takes them."""
    if not slot.logging or not mask.any():
        return
    if kvm.dirty_ring_size or slot.dirty_bitmap is None:
        mark_dirty_bulk(kvm, slot, lo + np.flatnonzero(mask), vcpu)
        return
    kvm.journal.count("mark_page_dirty_in_slot", int(np.count_nonzero(mask)))
    slot.dirty_bitmap[lo:lo + len(mask)] |= mask


def host_ready(kvm, slot, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ready, pfn) per index: would ``get_user_page_fast_only(FOLL_WRITE)`` succeed.  ``pfn`` may be
    a view of the host PTEs: read it, never write it."""
    span = _span(idx)
    if span is not None:                                   # consecutive gfns: slices of each VMA's PTEs
        h0 = slot.userspace_addr + (span[0] << PAGE_SHIFT)
        h1 = slot.userspace_addr + (span[1] << PAGE_SHIFT)
        vma = kvm.mm.vma_lookup(h0)
        if vma is not None and vma.end >= h1:              # one VMA: its PTEs' slices as they are
            i0, i1 = vma.idx(h0), vma.idx(h1)
            return _gup_fast_ok(kvm, vma.pte[i0:i1], vma.pte_pfn[i0:i1])
    ready = np.zeros(len(idx), dtype=bool)
    pfn = np.full(len(idx), -1, dtype=np.int64)
    if span is not None:
        for vma in kvm.mm.vmas_in(h0, h1):
            a, b = max(h0, vma.start), min(h1, vma.end)
            i0, i1 = vma.idx(a), vma.idx(b)
            o = (a - h0) >> PAGE_SHIFT
            ready[o:o + i1 - i0], pfn[o:o + i1 - i0] = _gup_fast_ok(kvm, vma.pte[i0:i1], vma.pte_pfn[i0:i1])
        return ready, pfn
    hva = slot.userspace_addr + (idx.astype(np.int64) << PAGE_SHIFT)
    for vma in kvm.mm.vmas_in(int(hva.min()), int(hva.max()) + 4096):
        inside = (hva >= vma.start) & (hva < vma.end)
        j = (hva[inside] - vma.start) >> PAGE_SHIFT
        ready[inside], pfn[inside] = _gup_fast_ok(kvm, vma.pte[j], vma.pte_pfn[j])
    return ready, pfn


def _gup_fast_ok(kvm, pte: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_user_page_fast_only(FOLL_WRITE)`` per host PTE: present, writable, not special or
    PROT_NONE, and a valid page that is not freed.  Returns (ok, pfn)."""
    ok = ((pte & (_HP | _HW | _HS | _HPN)) == (_HP | _HW)) & (p > 0)
    ok &= p < kvm.phys.nr                                  # one pass: no gather and scatter through ok
    if kvm.phys.has_freed_pages():
        ok[ok] &= (kvm.phys.flags[p[ok]] & _POISONED) == 0
    return ok, p


def guest_access_range(mmu, vcpu, gpa: int, npages: int, write, values=None) -> np.ndarray:
    """Access ``npages`` pages from ``gpa``; returns the values read/written (-1 where the access
    exited, as the scalar access's exit says; those are counted as ``range_access_exit``).
    ``write``: one kind for every page (a bool), or a bool array of ``npages`` for a mixed pass
    (page k written if ``write[k]``), which has the state of the per-page accesses in gfn order."""
    kvm = mmu.kvm
    gfn0 = gpa >> PAGE_SHIFT
    one = not isinstance(write, np.ndarray)
    if one:
        write = bool(write)
    else:
        write = np.asarray(write, dtype=bool)
        if len(write) != npages:
            raise ValueError(f"guest_access_range: {len(write)} access kinds for {npages} pages")
    # the values to store, read only: a broadcast view when one value for all (no copy)
    vals = np.broadcast_to(np.asarray(0 if values is None else values, dtype=np.int64), (npages,))
    out = (vals.copy() if write else np.zeros(npages, dtype=np.int64)) if one else vals * write
    pos = 0
    while pos < npages:
        gfn = gfn0 + pos
        slot = kvm.gfn_to_memslot(gfn)
        wr = write if one else bool(write[pos])
        if slot is None or slot.invalid or (slot.readonly and (wr or not one)) or kvm.execution != "hardware":
            a = vcpu.access(gfn << PAGE_SHIFT, wr, int(vals[pos]) if wr else None)
            _record(kvm, out, pos, a)
            pos += 1
            continue
        end = min(npages, slot.base_gfn + slot.npages - gfn0)
        _range_in_slot(mmu, vcpu, slot, gfn - slot.base_gfn, end - pos, write if one else write[pos:end],
                       vals[pos:end], out[pos:end])
        pos = end
    return out


def _record(kvm, out, k, a) -> None:
    if a.exit == Exit.OK:
        out[k] = int(a.value or 0)
    else:
        out[k] = -1
        kvm.journal.count("range_access_exit")


def _sub(write, mask):
    """The access kinds of a subset: ``write`` itself when one kind for all, else ``write[mask]``."""
    return write if write.__class__ is bool else write[mask]


def _range_in_slot(mmu, vcpu, slot, lo: int, n: int, write, vals, out) -> None:
    """Accesses to ``[lo, lo + n)`` in gfn order; ``write`` is one kind for all (a bool) or one per
    page (a bool array: a mixed read/write pass).  Each round handles every page in one phase (hits,
    then fast faults, then slow faults, then the scalar path), each page with its own kind."""
    kvm = mmu.kvm
    t = tables(slot)
    todo = np.arange(lo, lo + n)
    one = write.__class__ is bool
    for _ in range(4 * n + 8):
        if not len(todo):
            return
        span = _span(todo)
        b = _take(t.bits, todo, span)
        present = (b & P) != 0
        if not one or present.any():                      # else a first touch: no hit, no fast fault
            if one:                                       # present, not AT/MMIO (and W for a store): one test
                hit = (b & (P | AT | MMIO | (W if write else 0))) == (P | (W if write else 0))
            else:
                hit = present & ((b & (AT | MMIO)) == 0) & (~write | ((b & W) != 0))
            if not one and not hit.all():
                if _needs_scalar(mmu, slot, t, todo, b, write, hit):
                    _by_runs(mmu, vcpu, slot, lo, todo, write, vals, out)
                    return
                hit = _in_order_hits(slot, t, todo, span, hit)
            if hit.all():                                     # every page maps: no gathers
                _hits(mmu, vcpu, slot, t, todo, b, write)
                k = slice(span[0] - lo, span[1] - lo) if span is not None else todo - lo
                _guest_data(kvm, _take(t.pfn, todo, span), k, write, vals, out)
                return
            if hit.any():
                done = todo[hit]
                _hits(mmu, vcpu, slot, t, done, b[hit], _sub(write, hit))
                _guest_data(kvm, t.pfn[done], done - lo, _sub(write, hit), vals, out)
                todo = todo[~hit]
                write = _sub(write, ~hit)
            if not len(todo):
                return
            span = _span(todo)
            b = _take(t.bits, todo, span)
            lvl = _take(t.level, todo, span)
            # fast_page_fault() can fix: a read of an access-tracked SPTE; a write where the SPTE is
            # MMU-writable (and not a huge leaf of a dirty-logged slot), access-tracked or write-protected
            if one and not write:
                fixable = (b & AT) != 0
            else:
                fixable = ((b & MW) != 0) & (((b & AT) != 0) | ((b & W) == 0)) & ((lvl == 1) | (not slot.logging))
                if not one:
                    fixable = np.where(write, fixable, (b & AT) != 0)
            fix = ((b & P) != 0) & ((b & MMIO) == 0) & fixable
            if fix.any():
                _fast_faults(mmu, vcpu, slot, t, todo[fix], _sub(write, fix))
                continue
            present = (b & P) != 0
        ready, hpfn = host_ready(kvm, slot, todo)
        if present.any():
            ready &= ~present
        if not mmu.tdp_mmu_enabled:
            ready[:] = False            # the shadow MMU's fault prefetches (direct_pte_prefetch): scalar
        if ready.any():
            mmu_seq = kvm.mmu_invalidate_seq                  # kvm_mmu_faultin_pfn(): the snapshot
            if kvm.mmu_invalidate_in_progress:                # (just snapshotted: only a range can retry)
                ready &= ~_retry_mask(kvm, slot.base_gfn + todo, mmu_seq, locked=False)
        if ready.all():                                   # the usual first touch: no gathers
            if _slow_faults(mmu, vcpu, slot, t, todo, hpfn, mmu_seq):
                continue
        elif ready.any() and _slow_faults(mmu, vcpu, slot, t, todo[ready], hpfn[ready], mmu_seq):
            continue
        # the scalar path for what needs the host or KVM's conflict handling, in gfn order; back to
        # the vectorised round as soon as the host has mapped the next page (a huge host fault)
        rest = todo.tolist()
        kinds = [write] * len(rest) if one else write.tolist()
        for k, (i, wr) in enumerate(zip(rest, kinds)):
            a = mmu.guest_access(vcpu, (slot.base_gfn + i) << PAGE_SHIFT, wr, int(vals[i - lo]) if wr else None)
            _record(kvm, out, i - lo, a)
            nxt = rest[k + 1] if k + 1 < len(rest) else None
            if nxt is not None and not int(t.bits[nxt]) & P and host_ready(kvm, slot, np.array([nxt]))[0][0]:
                todo = np.array(rest[k + 1:], dtype=np.int64)
                write = write if one else np.array(kinds[k + 1:], dtype=bool)
                break
        else:
            return


def _needs_scalar(mmu, slot, t, todo, b, write, hit) -> bool:
    """In a mixed pass: does some page that does not hit need more than a fast fault or a GUP-fast
    slow fault (a host fault, a copy-on-write break, KVM's conflict handling)?  Such a fault can
    change other pages' mappings (a THP copy-on-write zaps the whole 2 MiB region through the MMU
    notifier), so the pages must then be taken in gfn order."""
    miss = ~hit
    idx, bm, wm = todo[miss], b[miss], write[miss]
    present = (bm & P) != 0
    lvl = t.level[idx]
    wfix = ((bm & MW) != 0) & (((bm & AT) != 0) | ((bm & W) == 0)) & ((lvl == 1) | (not slot.logging))
    fix = present & ((bm & MMIO) == 0) & np.where(wm, wfix, (bm & AT) != 0)
    if fix.all():
        return False
    if (present & ~fix).any() or not mmu.tdp_mmu_enabled:
        return True
    ready, _ = host_ready(mmu.kvm, slot, idx[~fix])
    return not ready.all()


def _by_runs(mmu, vcpu, slot, lo: int, todo, write, vals, out) -> None:
    """The pages ``todo`` (ascending) in gfn order, one single-kind call per run of consecutive pages
    of the same kind."""
    brk = np.flatnonzero((write[1:] != write[:-1]) | (todo[1:] != todo[:-1] + 1)) + 1
    for s, e in zip(np.concatenate(([0], brk)).tolist(), np.concatenate((brk, [len(todo)])).tolist()):
        a, z = int(todo[s]) - lo, int(todo[e - 1]) + 1 - lo
        _range_in_slot(mmu, vcpu, slot, lo + a, z - a, bool(write[s]), vals[a:z], out[a:z])


def _in_order_hits(slot, t, todo, span, hit: np.ndarray) -> np.ndarray:
    """The hits of a mixed pass that may go before the faults of the round: on a huge leaf, a load
    can hit where a store to another page of the same leaf faults, and that fault may replace the
    leaf (a 4 KiB mapping on a dirty-logged slot, a copy-on-write break), so in gfn order the load
    would fault too.  Hits on a huge leaf that also holds a page that does not hit stay in the
    round: they are taken in gfn order with it (the scalar path), or hit again after its fast fault."""
    lvl = _take(t.level, todo, span)
    huge_hit = hit & (lvl > 1)
    if not huge_hit.any():
        return hit
    miss = ~hit & (lvl > 1)
    if not miss.any():
        return hit
    starts, _ = _leaf_starts(slot, t, todo)
    return hit & ~(huge_hit & np.isin(starts, starts[miss]))


def _guest_data(kvm, pfn: np.ndarray, k, write, vals, out) -> None:
    """The guest's loads/stores through hits (``k``: their positions in ``vals``/``out``), as
    ``phys.write``/``phys.read`` per page do them: vectorised over live pages with a struct page;
    an MMIO pfn (no struct page) or a freed page (a use after free to report) one by one, in order.
    ``write`` per page (a mixed pass): the loads and the stores apart when no page frame repeats
    (then they commute), else page by page in order, so a load sees an earlier store to its frame."""
    phys = kvm.phys
    if not len(pfn):
        return
    if write.__class__ is not bool:
        if (len(pfn) < 2 or (pfn[1:] > pfn[:-1]).all()) and pfn[0] > 0 and pfn[-1] < phys.nr and \
                (not phys.has_freed_pages() or not (phys.flags[pfn] & _POISONED).any()):
            rd = ~write                                   # distinct live frames: loads and stores commute
            p0 = int(pfn[0])
            if k.__class__ is slice and int(pfn[-1]) - p0 + 1 == len(pfn):     # one run of frames
                # a store leaves its value in the frame, a load leaves the frame as it was: either
                # way the access's value is the frame's new content (a select by bit masks, as
                # np.where over a random mask costs ten times more)
                frames = phys.data[p0:p0 + len(pfn)]
                keep = write.view(np.int8).astype(np.int64)
                np.negative(keep, out=keep)                              # all ones where written
                new = np.bitwise_xor(frames, vals[k])
                np.bitwise_and(new, keep, out=new)
                np.bitwise_xor(new, frames, out=new)
                frames[:] = new
                out[k] = new
            elif k.__class__ is slice:
                phys.data[pfn[write]] = vals[k][write]
                out[k][rd] = phys.data[pfn[rd]]
            else:
                phys.data[pfn[write]] = vals[k[write]]
                out[k[rd]] = phys.data[pfn[rd]]
        else:
            pos = np.arange(len(out))[k]
            for p, i, wr in zip(pfn.tolist(), pos.tolist(), write.tolist()):
                _guest_data(kvm, np.array([p]), np.array([i]), wr, vals, out)
        return
    run = _frame_run(pfn)
    if run is not None and run.start > 0 and run.stop <= phys.nr and not phys.has_freed_pages():
        if write:                                         # consecutive frames: a slice, no scatter
            phys.data[run] = vals[k]
        else:
            out[k] = phys.data[run]
        return
    if pfn.min() > 0 and pfn.max() < phys.nr and \
            (not phys.has_freed_pages() or not (phys.flags[pfn] & _POISONED).any()):
        if write:
            phys.data[pfn] = vals[k]
        else:
            out[k] = phys.data[pfn]
        return
    odd = (pfn <= 0) | (pfn >= phys.nr)
    odd[~odd] = (phys.flags[pfn[~odd]] & _POISONED) != 0
    pos = np.arange(len(out))[k]
    for p, i, o in zip(pfn.tolist(), pos.tolist(), odd.tolist()):
        if write and o:
            phys.write(p, int(vals[i]), "guest write", kvm=True)
        elif write:
            phys.data[p] = vals[i]
        elif o:
            out[i] = phys.read(p, "guest read", kvm=True)
        else:
            out[i] = phys.data[p]


def _frame_run(pfn: np.ndarray) -> slice | None:
    """``slice(first, last + 1)`` when ``pfn`` is one ascending run of consecutive frames."""
    p0, p1 = int(pfn[0]), int(pfn[-1]) + 1
    if p1 - p0 != len(pfn) or (len(pfn) > 1 and not (pfn[1:] > pfn[:-1]).all()):
        return None
    return slice(p0, p1)


def _leaf_starts(slot, t, idx):
    size = np.array([1, 1, LEVEL_PAGES[2], LEVEL_PAGES[3]], dtype=np.int64)[t.level[idx]]
    return (slot.base_gfn + idx) // size * size - slot.base_gfn, size


def _hits(mmu, vcpu, slot, t, idx, b, write) -> None:
    """Hardware A/D on hits (``b``: their bits, read before this writes the table); ``write`` one
    kind for all or one per page (A for a load, A|D for a store: ORs, so their order is moot)."""
    one = write.__class__ is bool
    want = np.uint16(A | (D if write else 0)) if one else write * np.uint16(D) | np.uint16(A)
    need = ((b & ADX) == 0) & ((b & want) != want)
    if not need.any():
        return
    span = _span(idx)
    if not one and span is not None and (_take(t.level, idx, span) <= 1).all():
        # a mixed pass over consecutive 4 KiB leaves: each page ORs its own bits (none where not needed)
        logged = write & need & ((b & D) == 0) if slot.logging and mmu.pml else None
        t.bits[span[0]:span[1]] |= want * need
        if logged is not None:
            mark_dirty_mask(mmu.kvm, slot, span[0], logged, vcpu)
        return
    if not need.all():
        idx, b = idx[need], b[need]
        if not one:
            want, write = want[need], write[need]
    span = _span(idx)
    small = _take(t.level, idx, span) <= 1
    if span is not None and small.all():
        b = b.copy()                                      # b may be a view of the table written next
        t.bits[span[0]:span[1]] |= want
    else:
        t.bits[idx[small]] |= want if one else want[small]
    if not small.all():
        starts, size = _leaf_starts(slot, t, idx[~small])
        first = huge_leaves.leaf_firsts(starts)
        if first is not None:                             # once per leaf: the OR of its pages' bits
            wants = [int(want)] * len(first) if one else np.bitwise_or.reduceat(want[~small], first).tolist()
            for s, sz, wv in zip(starts[first].tolist(), size[first].tolist(), wants):
                t.bits[s:s + sz] |= np.uint16(wv)
        else:
            wants = [int(want)] * len(starts) if one else want[~small].tolist()
            for s, sz, wv in set(zip(starts.tolist(), size.tolist(), wants)):
                t.bits[s:s + sz] |= np.uint16(wv)
    if slot.logging and mmu.pml:
        if one and write and span is not None:
            mark_dirty_mask(mmu.kvm, slot, span[0], (b & D) == 0, vcpu)
        elif one and write:
            mark_dirty_bulk(mmu.kvm, slot, idx[(b & D) == 0], vcpu)
        elif not one:
            mark_dirty_bulk(mmu.kvm, slot, idx[write & ((b & D) == 0)], vcpu)


def _fast_faults(mmu, vcpu, slot, t, idx, write) -> None:
    """``fast_page_fault()`` for each index (``write``: one kind for all, or one per page): 4 KiB
    leaves in one write, huge leaves once per leaf with the kind of its first page in gfn order."""
    kvm = mmu.kvm
    one = write.__class__ is bool
    small = t.level[idx] <= 1
    s = idx[small]
    if len(s):
        ws = write if one else write[small]
        lo, hi = int(s.min()), int(s.max()) + 1
        new = t.bits[lo:hi].copy()
        b = new[s - lo].astype(np.int64)
        nb = np.where(b & AT, b & ~(AT | SW), b)                 # restore R/X; W only on a write
        if one and write:
            nb |= W | np.where(nb & ADX, 0, D)
        elif not one:
            nb |= np.where(ws, W | np.where(nb & ADX, 0, D), 0)
        nb |= np.where(nb & ADX, 0, A)
        new[s - lo] = nb.astype(np.uint16)
        spte_write(kvm, slot, lo, hi, new, caller="fast_page_fault")
        kvm.journal.count("page_fault", len(s))
        kvm.journal.count("fast_page_fault", len(s))
        if one and write:
            mark_dirty_bulk(kvm, slot, s, vcpu)
        elif not one:
            mark_dirty_bulk(kvm, slot, s[ws], vcpu)
    if (~small).any():
        hidx = idx[~small]
        starts, _ = _leaf_starts(slot, t, hidx)
        hw = None if one else write[~small]
        first = huge_leaves.leaf_firsts(starts)
        if first is not None:                             # the first page of each leaf, in gfn order
            hidx, starts = hidx[first], starts[first]
            hw = None if one else hw[first]
        kinds = [write] * len(starts) if one else hw.tolist()
        seen = set()
        for i, st, wr in zip(hidx.tolist(), starts.tolist(), kinds):
            if st in seen:
                continue
            seen.add(st)
            kvm.journal.count("page_fault")
            mmu.fast_page_fault(vcpu, slot, slot.base_gfn + i, wr)


def _retry_mask(kvm, gfns: np.ndarray, mmu_seq: int, *, locked: bool) -> np.ndarray:
    """Per gfn: would the fault retry?  ``mmu_invalidate_retry_gfn_unsafe()`` (``locked=False``) or
    ``mmu_invalidate_retry_gfn()`` under ``mmu_lock`` (which the explorer's skip-retry mutation
    switches off), over an array of gfns."""
    if locked:
        return kvm.mmu_invalidate_retry_gfns(mmu_seq, gfns)       # the scalar fault's is_page_fault_stale()
    if kvm.mmu_invalidate_seq != mmu_seq:
        return np.ones(len(gfns), dtype=bool)
    if kvm.mmu_invalidate_in_progress:
        return (gfns >= kvm.mmu_invalidate_range_start) & (gfns < kvm.mmu_invalidate_range_end)
    return np.zeros(len(gfns), dtype=bool)


def _try_lock(mmu) -> bool:
    """Take ``mmu_lock`` through the MMU's lock steps (the scalar fault's ``yield from self._lock()``)
    if it is free now; False, with nothing taken, if the steps would block."""
    steps = mmu._lock()
    for item in steps:
        if item.__class__ is Wait and not item.ready():
            steps.close()
            return False
    return True


def _slow_faults(mmu, vcpu, slot, t, idx, pfn, mmu_seq: int) -> bool:
    """One fault per leaf to install: faultin (GUP-fast), map under mmu_lock, release per policy.
    False (nothing done) when ``mmu_lock`` is not free or the locked re-check finds the batch stale:
    the caller hands those pages to the scalar fault.  A read fault maps the same writable SPTE
    as a write (``make_spte()``), so the access kinds do not enter."""
    kvm = mmu.kvm
    span = _span(idx)
    if span is not None:
        levels = huge_leaves.max_mapping_levels_span(kvm, slot, span[0], span[1], mmu.max_level)
    elif len(idx) > 64:
        lo0 = int(idx.min())
        levels = tdp_mmu.max_mapping_levels(kvm, slot, lo0, int(idx.max()) + 1, mmu.max_level)[idx - lo0]
    else:
        levels = np.array([tdp_mmu.max_mapping_level(kvm, slot, i, mmu.max_level) for i in idx.tolist()],
                          dtype=np.uint8)
    if levels.max() <= 1:                                            # 4 KiB leaves: one fault per page
        fidx, fpfn, flvl, fstart = idx, pfn, levels, idx
    elif span is not None and (leaves := huge_leaves.uniform_leaves(slot, span, levels)) is not None:
        first, fstart = leaves                                       # one huge level: no per-page starts
        fidx, fpfn, flvl = idx[first], pfn[first], levels[first]
    else:
        size = np.array([1, 1, LEVEL_PAGES[2], LEVEL_PAGES[3]], dtype=np.int64)[levels]
        starts = (slot.base_gfn + idx) // size * size - slot.base_gfn
        if len(starts) < 2 or (starts[1:] >= starts[:-1]).all():    # gfn order: first of each leaf
            first = np.flatnonzero(np.concatenate(([True], starts[1:] != starts[:-1])))
        else:
            _, first = np.unique(starts, return_index=True)
            first = np.sort(first)
        fidx, fpfn, flvl, fstart = idx[first], pfn[first], levels[first], starts[first]
    nf = len(fidx)
    host_w = not slot.readonly
    writable = host_w        # as make_spte: read faults are mapped writable and logged dirty
    bits = make_spte(host_writable=host_w, writable=writable, prefetch=False,
                          ad_disabled=not mmu.ad_enabled, held=True)
    ops = kvm.ops                                 # the scalar fault's release, resolved per policy
    rel_caller = ops.fault_release_bulk_caller
    gfns = slot.base_gfn + fidx
    if not _try_lock(mmu):
        return False
    if _retry_mask(kvm, gfns, mmu_seq, locked=True).any():     # is_page_fault_stale()
        mmu._unlock()
        return False
    kvm.journal.count("page_fault", nf)
    kvm.journal.count("hva_to_pfn", nf)
    kvm.journal.count("gup_fast", nf)
    kvm.journal.count("get_page:kvm_faultin_pfn", nf)
    kvm.journal.count(f"put_page:{rel_caller}", nf)
    try:
        small = flvl == 1
        every = fidx is idx and levels.max() <= 1                    # 4 KiB leaves only: no gathers
        s = fidx if every else fidx[small]
        if len(s) and _span(s) is not None:                          # consecutive 4 KiB leaves
            spte_write(kvm, slot, int(s[0]), int(s[-1]) + 1, bits, fpfn if every else fpfn[small], 1,
                       caller=mmu.map_caller)
        elif len(s):
            lo, hi = int(s.min()), int(s.max()) + 1
            nb = t.bits[lo:hi].copy()
            npf = t.pfn[lo:hi].copy()
            nl = t.level[lo:hi].copy()
            nb[s - lo] = bits
            npf[s - lo] = fpfn[small]
            nl[s - lo] = 1
            spte_write(kvm, slot, lo, hi, nb, npf, nl, caller=mmu.map_caller)
        h = None if every else ~small
        if h is not None and h.any():
            _install_huge(kvm, slot, t, fstart[h], fpfn[h] - (fidx[h] - fstart[h]), flvl[h], bits, mmu.map_caller)
        if kvm.journal.recording:
            for i, p, lv in zip(fidx.tolist(), fpfn.tolist(), flvl.tolist()):
                kvm.journal.fact("spte_set", pfn=p, gfn=slot.base_gfn + i, kvm=True, caller="make_spte", locked=True,
                                 extra={"writable": bool(writable), "host_writable": host_w, "level": lv})
        if writable:
            mark_dirty_bulk(kvm, slot, s, vcpu)
        writable_mask = np.full(nf, host_w)
        with kvm.journal.fault_release():
            ops.fault_release_bulk_locked(kvm, fpfn, writable_mask, rel_caller, gfns)
    finally:
        mmu._unlock()
    with kvm.journal.fault_release():
        ops.fault_release_bulk_unlocked(kvm, fpfn, writable_mask, rel_caller, gfns)
    return True


def _install_huge(kvm, slot, t, starts, base_pfns, levels, bits: int, caller: str) -> None:
    """``make_spte()`` for disjoint huge leaves: one :func:`spte_write` per 1 GiB-aligned piece of
    gfns instead of one per leaf (the same entries, INV-11 checks, A/D reports and SPTE count)."""
    order = np.argsort(starts, kind="stable")
    starts, base_pfns, levels = starts[order], base_pfns[order], levels[order]
    size = np.array([1, 1, LEVEL_PAGES[2], LEVEL_PAGES[3]], dtype=np.int64)[levels]
    piece = (slot.base_gfn + starts) >> 18
    cuts = np.flatnonzero(piece[1:] != piece[:-1]) + 1
    for st, bp, sz, lv in zip(np.split(starts, cuts), np.split(base_pfns, cuts), np.split(size, cuts),
                              np.split(levels, cuts)):
        if huge_leaves.install_leaves(kvm, slot, t, st, bp, lv, bits, caller):
            continue                                                 # consecutive leaves over empty entries
        lo, hi = int(st[0]), int(st[-1] + sz[-1])
        total = int(sz.sum())
        within = np.arange(total) - np.repeat(np.cumsum(sz) - sz, sz)
        at = np.repeat(st - lo, sz) + within
        nb = t.bits[lo:hi].copy()
        npf = t.pfn[lo:hi].copy()
        nl = t.level[lo:hi].copy()
        nb[at] = bits
        npf[at] = np.repeat(bp, sz) + within
        nl[at] = np.repeat(lv, sz)
        spte_write(kvm, slot, lo, hi, nb, npf, nl, caller=caller)
