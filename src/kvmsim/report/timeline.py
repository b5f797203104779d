"""The data of an HTML timeline: per-step page state, struct-page operations and violations of one run.

Nothing here is a second model.  :func:`run_with_timeline` runs a scenario through the ordinary
runner (:func:`kvmsim.scenarios.runner.run`), whose ``observe`` hook hands us the environment after
set-up (step 0) and after every checked step.  We then read what the model itself holds:

* the host's ``mem_map`` arrays (:class:`kvmsim.mm.page.PhysMem`): ``folio_ref_count()`` of each
  pfn's folio (``refcount[head]``), its pin count (``_pincount`` of a large folio, ``_refcount /
  GUP_PIN_COUNTING_BIAS`` of a small one, as ``folio_maybe_dma_pinned()`` reads them), ``PG_dirty``
  and ``PG_referenced`` of the folio and the model's freed (poisoned) marker of the page;
* the stage-2 leaves (``kvm->arch`` through :meth:`ArchMmu.leaves`): present, W, A, D and level of
  the leaf that maps each pfn, a huge leaf spread over the pfns it covers;
* the host PTE behind each memslot gfn (to name the gfn a page backs);
* the journal facts of each step (:class:`kvmsim.trace.Fact`: kind, caller, source, ``mmu_lock``
  held) and the checker's violations (:class:`kvmsim.check.Violation`).

Bounded size.  A *lane* is one pfn, or - when a run touches more than :data:`MAX_LANES` pfns - a
range of consecutive lanes whose state is the sum over its pages (counts of dirty, present, W ...).
At most :data:`MAX_OPS_PER_STEP` operations of a step are listed one by one; every operation is
still counted, per lane and step and in a per-step summary grouped by (kind, caller, source,
mmu_lock).  At most :data:`MAX_VIOLATIONS` violations are listed (all are counted).  So a file's
size grows with steps x lanes, never with pages or operations.

Fold mode (:class:`kvmsim.report.bench.BenchTimeline`, ``kvmsim bench dirty-log --html``): the lanes are fixed by the
first observation that sees a page and every observation becomes lane sums at once, read a piece
(:data:`PIECE_PFNS`) at a time, so memory holds lane sums per step, not per-pfn arrays per step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import IntFlag
from typing import NamedTuple

import numpy as np

from kvmsim.mm.page import GUP_PIN_COUNTING_BIAS, PG

#: Most lanes a run's timeline holds; beyond that lanes are ranges of pages (a heat strip each).
MAX_LANES = 2048
#: Most struct-page operations listed one by one per step (the rest are counted and grouped).
MAX_OPS_PER_STEP = 200
#: Most violations listed one by one per run (all are counted per lane and step).
MAX_VIOLATIONS = 1000
#: pfns (or gfns) read at a time by a folded observation: int64 temporaries of 16 MiB.
PIECE_PFNS = 1 << 21

#: The per-lane state columns, in order (a lane of n pages holds sums; ``level`` holds the max).
STATE_FIELDS = ("ref", "pin", "dirty", "accessed", "freed", "present", "w", "a", "d", "level")

_DIRTY, _REFERENCED, _POISONED, _HEAD = int(PG.dirty), int(PG.referenced), int(PG.poisoned), int(PG.head)
_PAGE_OPS = frozenset({"get", "put", "pin", "unpin", "get_unless_zero_failed", "underflow", "set_dirty",
                       "mark_accessed", "free", "double_free", "freed_dirty", "premature_free",
                       "freed_while_referenced", "uaf"})


_BIG = np.iinfo(np.int64).max


class LanePage(IntFlag):
    """A page's bits in an observation (``_Snap.flags``)."""

    DIRTY = 1 << 0           # PG_dirty of its folio
    ACCESSED = 1 << 1        # PG_referenced of its folio
    FREED = 1 << 2           # back in the allocator (the model's poison)


class LaneSpte(IntFlag):
    """The leaf mapping a page in an observation (``_Snap.spte``); the level sits above these bits."""

    W = 1 << 0
    A = 1 << 1
    D = 1 << 2
    PRESENT = 1 << 3


_LEVEL_SHIFT = 4
_DIRTY_L, _ACCESSED_L, _FREED_L = int(LanePage.DIRTY), int(LanePage.ACCESSED), int(LanePage.FREED)
_W_L, _A_L, _D_L, _P_L = int(LaneSpte.W), int(LaneSpte.A), int(LaneSpte.D), int(LaneSpte.PRESENT)


@dataclass
class _Snap:
    """One observation: per-pfn arrays over ``mem_map`` as it was then (``nr`` pfns)."""

    ref: np.ndarray                # i32 folio_ref_count
    pin: np.ndarray                # i32 pin count
    flags: np.ndarray              # u8 LanePage
    spte: np.ndarray               # u8 LaneSpte, level << _LEVEL_SHIFT
    far_pfn: np.ndarray            # SPTE pfns past mem_map (no struct page: MMIO) ...
    far_spte: np.ndarray           # ... and their SPTE code


class _Layout(NamedTuple):
    """Which lane each pfn of the universe (the pfns drawn, sorted) falls in."""

    universe: np.ndarray           # pfns, sorted
    gfn: np.ndarray                # the smallest gfn each backs (_BIG: none)
    order: np.ndarray              # universe indices in lane order (gfn, then pfn)
    lane_of: np.ndarray            # lane of each universe index
    per: int                       # pages per lane
    nlanes: int


@dataclass
class Timeline:
    """Collects one run's observations; :meth:`data` turns them into the JSON the page draws.

    An observation costs 10 bytes per pfn of ``mem_map``; the pfns worth a lane (any SPTE, host PTE
    behind a memslot, fact or violation names them) and the smallest gfn each backs are kept as one
    running array each."""

    snaps: list[_Snap] = field(default_factory=list)
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    gfn_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    far_gfn: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Fold mode (bench scale): each observation becomes lane sums as it is taken, so memory holds one
    #: observation's per-pfn arrays at a time, not one per step (:meth:`_fold`).
    fold: bool = False
    layout: _Layout | None = None
    rows: list[np.ndarray] = field(default_factory=list)
    lane_meta: list[dict] = field(default_factory=list)
    late_pages: int = 0

    def observe(self, env, i: int) -> None:
        """The runner's ``observe`` hook: snapshot the model after set-up (0) and after step ``i``."""
        self.observe_vm(env.kvm, i)

    def observe_vm(self, kvm, i: int) -> None:
        """Snapshot VM ``kvm`` (its host's ``mem_map`` and its stage-2 leaves) as column ``i``.

        The model state is read, never changed; should reading it fail (a model broken by the step,
        which the runner reports as the run's error), the column repeats the previous one and the
        page says so (``notes``)."""
        try:
            self._observe(kvm)
        except Exception as e:  # noqa: BLE001 -- shown on the page, never a traceback
            self.notes.append(f"state after step {i} could not be read ({type(e).__name__}: {e}); "
                              "its column repeats the previous one")
            if self.rows and not self.snaps:                 # fold mode, lanes fixed
                self.rows.append(self.rows[-1])
                return
            prev = self.snaps[-1] if self.snaps else _Snap(*(np.zeros(0, t) for t in (np.int32, np.int32, np.uint8,
                                                                                          np.uint8, np.int64, np.uint8)))
            self.snaps.append(prev)

    def _observe(self, kvm) -> None:
        phys = kvm.phys
        n = phys.nr
        if len(self.seen) < n and self.layout is None:
            self.seen = np.concatenate([self.seen, np.zeros(n - len(self.seen), bool)])
            self.gfn_of = np.concatenate([self.gfn_of, np.full(n - len(self.gfn_of), _BIG, np.int64)])
        spte = np.zeros(n, np.uint8)
        far_pfn, far_code = [], []
        late = 0
        for pfn, gfn, bits, level in _leaf_pieces(kvm):          # a piece of leaves at a time
            code = (bits | _P_L | (np.minimum(level, 7) << _LEVEL_SHIFT)).astype(np.uint8)
            near = (pfn > 0) & (pfn < n)
            spte[pfn[near]] = code[near]
            far = pfn >= n
            far_pfn.append(pfn[far])
            far_code.append(code[far])
            for p, g in zip(pfn[far].tolist(), gfn[far].tolist()):
                self.far_gfn[p] = min(g, self.far_gfn.get(p, g))
            if self.layout is None:
                self._note(pfn[near], gfn[near])
            else:                                                # lanes fixed (fold mode): count newcomers
                p = pfn[near]
                inside = p < len(self.seen)                      # ``seen`` is the lanes' pfns, as fixed
                late += int((~inside).sum() + (~self.seen[p[inside]]).sum())
        self.late_pages = max(self.late_pages, late)
        if self.layout is None:
            for hp, hg in _host_map(kvm):
                ok = hp < n
                self._note(hp[ok], hg[ok])
        far_pfn = np.concatenate(far_pfn) if far_pfn else np.zeros(0, np.int64)
        far_code = np.concatenate(far_code) if far_code else np.zeros(0, np.uint8)
        if self.fold and self.layout is None and (self.seen.any() or self.far_gfn):
            self._fold()                                         # fix the lanes, fold what is held
        if self.layout is None:
            self.snaps.append(_Snap(*_page_state(phys, 0, n), spte, far_pfn, far_code))
        else:
            self.rows.append(self._aggregate_pieces(lambda a, b: _page_state(phys, a, b), n, spte, far_pfn, far_code))

    def _aggregate_pieces(self, page_state, n: int, spte, far_pfn, far_code) -> np.ndarray:
        """Fold mode: the lane sums of one observation, read :data:`PIECE_PFNS` pfns of ``mem_map`` at a
        time, so no temporary is larger than a piece (glibc keeps freed blocks of up to 32 MiB for
        reuse: larger ones are fresh mappings faulted in page by page on every observation)."""
        lay = self.layout
        u = lay.universe
        row = np.zeros((lay.nlanes, len(STATE_FIELDS)), np.int64)
        lv = STATE_FIELDS.index("level")
        e = np.zeros(0, np.int64)
        cuts = list(range(0, n, PIECE_PFNS)) + [n]
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo, hi = np.searchsorted(u, [a, b])
            if lo < hi:
                s = _Snap(*page_state(a, b), spte[a:b], e, e.astype(np.uint8))
                part = self._aggregate(s, _Layout(u[lo:hi] - a, e, e, lay.lane_of[lo:hi], lay.per, lay.nlanes))
                row[:, :lv] += part[:, :lv]
                row[:, lv] = np.maximum(row[:, lv], part[:, lv])
        lo = np.searchsorted(u, n)
        if lo < len(u):                                          # pfns with no struct page (MMIO)
            s = _Snap(*(np.zeros(0, t) for t in (np.int32, np.int32, np.uint8, np.uint8)), far_pfn, far_code)
            part = self._aggregate(s, _Layout(u[lo:], e, e, lay.lane_of[lo:], lay.per, lay.nlanes))
            row[:, :lv] += part[:, :lv]
            row[:, lv] = np.maximum(row[:, lv], part[:, lv])
        return row

    def _note(self, pfns: np.ndarray, gfns: np.ndarray) -> None:
        if len(pfns):
            self.seen[pfns] = True
            np.minimum.at(self.gfn_of, pfns, gfns)

    # ---- turning observations into lanes -------------------------------------------------------------
    def _layout(self, named: np.ndarray) -> _Layout:
        """The lanes over the pfns seen so far plus ``named`` (pfns a fact or violation names)."""
        n = len(self.seen)
        seen = self.seen.copy()
        seen[named[named < n]] = True
        if n:
            seen[0] = False                                  # pfn 0 is never handed out
        far = np.unique(np.concatenate([named[named >= n], np.array(list(self.far_gfn), np.int64)]))
        universe = np.concatenate([np.nonzero(seen)[0].astype(np.int64), far])   # sorted by pfn
        del seen
        gfn = np.concatenate([self.gfn_of[universe[universe < n]],
                              np.array([self.far_gfn.get(int(p), _BIG) for p in far], np.int64)])
        order = np.lexsort((universe, gfn))                  # lanes in gfn order, then pfn
        npages = len(universe)
        per = max(1, -(-npages // MAX_LANES))                # pages per lane
        nlanes = -(-npages // per) if npages else 0
        lane_of = np.empty(npages, np.int64)                 # by pfn-sorted index
        lane_of[order] = np.arange(npages) // per
        return _Layout(universe, gfn, order, lane_of, per, nlanes)

    def _aggregate(self, s: _Snap, lay: _Layout) -> np.ndarray:
        """Observation ``s`` as lane sums (``nlanes`` x :data:`STATE_FIELDS`; ``level`` the max)."""
        row = np.zeros((lay.nlanes, len(STATE_FIELDS)), np.int64)
        for c, col in enumerate(self._columns(s, lay.universe)):
            if STATE_FIELDS[c] == "level":
                np.maximum.at(row[:, c], lay.lane_of, col)
            elif lay.nlanes == len(lay.universe):
                row[lay.lane_of, c] = col
            elif col.dtype == bool:                          # a count: no float weights to convert
                row[:, c] = np.bincount(lay.lane_of[col], minlength=lay.nlanes)
            else:
                row[:, c] = np.bincount(lay.lane_of, weights=col, minlength=lay.nlanes).astype(np.int64)
        return row

    def _fold(self) -> None:
        """Fold mode: turn the observations held so far into lane sums and drop their per-pfn arrays.

        The lanes are fixed by the first observation that sees a page; a page first seen later (no
        such page in the dirty-log flow, whose populate touches all guest memory) is counted in
        ``late_pages`` and named in ``notes``, not drawn."""
        if self.layout is None:
            if not self.seen.any() and not self.far_gfn:
                return                                       # nothing seen yet: keep the observation
            self._freeze()
        for s in self.snaps:
            self.rows.append(self._aggregate_pieces(lambda a, b, s=s: (s.ref[a:b], s.pin[a:b], s.flags[a:b]),
                                                    len(s.ref), s.spte, s.far_pfn, s.far_spte))
        self.snaps.clear()

    def _freeze(self) -> None:
        """Fix the lanes (fold mode); keep only what aggregating needs (pfns and their lane)."""
        lay = self._layout(np.zeros(0, np.int64))
        self.lane_meta = _lane_meta(lay)
        e = np.zeros(0, np.int64)
        self.layout = _Layout(lay.universe, e, e, lay.lane_of.astype(np.int32), lay.per, lay.nlanes)
        self.gfn_of = e

    def data(self, rr) -> dict:
        """The JSON-ready timeline of run ``rr`` (a :class:`RunResult`) from the observations."""
        fact_pfns = [np.fromiter((-1 if f.pfn is None else f.pfn for f in s.facts), np.int64, len(s.facts))
                     for s in rr.steps]
        viol_pfns = np.fromiter((-1 if v.pfn is None else v.pfn for v in rr.violations), np.int64,
                                len(rr.violations))
        named = np.concatenate(fact_pfns + [viol_pfns])
        named = named[named > 0]
        lay = self._layout(named)
        universe, gfn, order, lane_of, per, nlanes = lay
        npages = len(universe)
        nsteps = len(self.snaps)
        agg = np.stack([self._aggregate(s, lay) for s in self.snaps]) if nsteps else \
            np.zeros((0, nlanes, len(STATE_FIELDS)), np.int64)

        def lane_idx(pfns: np.ndarray) -> np.ndarray:
            k = np.searchsorted(universe, pfns)
            kk = np.minimum(k, max(npages - 1, 0))
            ok = (k < npages) & (universe[kk] == pfns) if npages else np.zeros(len(pfns), bool)
            out = np.full(len(pfns), -1, np.int64)
            out[ok] = lane_of[kk[ok]]
            return out

        lanes = _lane_rows(_lane_meta(lay), agg)
        del order, gfn
        # operations and violations per (step, lane)
        ops_cells: Counter = Counter()
        steps = []
        for s, fp in zip(rr.steps, fact_pfns):
            li = lane_idx(fp) if len(fp) else fp
            lanes_hit, cnt = np.unique(li[li >= 0], return_counts=True)
            for lane, c in zip(lanes_hit.tolist(), cnt.tolist()):
                ops_cells[(s.index, lane)] += c
            groups = Counter((f.kind, f.caller, f.source, f.locked, f.kvm) for f in s.facts)
            listed = [_fact_row(f, lane) for f, lane in zip(s.facts[:MAX_OPS_PER_STEP], li[:MAX_OPS_PER_STEP].tolist())]
            steps.append({"i": s.index, "op": s.op, "text": s.text, "result": s.res.result,
                          "errno": s.res.errno_name or "", "nfacts": len(s.facts), "ops": listed,
                          "groups": [[k.value, c, src.value, bool(lk), bool(kv), n]
                                     for (k, c, src, lk, kv), n in groups.most_common()],
                          "violations": _by_inv(s.violations), "mismatches": list(s.mismatches)})
        vl = lane_idx(viol_pfns) if len(viol_pfns) else viol_pfns
        vs = np.fromiter((-1 if v.step is None else v.step for v in rr.violations), np.int64, len(rr.violations))
        keep = (vl >= 0) & (vs >= 0)
        cells, cnt = np.unique(vs[keep] * (nlanes + 1) + vl[keep], return_counts=True)
        viol_cells = {divmod(int(k), nlanes + 1): int(c) for k, c in zip(cells.tolist(), cnt.tolist())}
        return {
            "scenario": rr.scenario, "policy": rr.policy, "verdict": rr.verdict, "error": rr.error or "",
            "expected_match": rr.expected_match, "stated": rr.stated, "mismatches": list(rr.mismatches),
            "by_invariant": rr.by_invariant(), "nsteps": nsteps, "fields": list(STATE_FIELDS),
            "pages": int(len(universe)), "pages_per_lane": per, "lanes": lanes, "steps": steps,
            "violations": [_viol_row(v, lane) for v, lane in zip(rr.violations[:MAX_VIOLATIONS],
                                                                  vl[:MAX_VIOLATIONS].tolist())],
            "nviolations": len(rr.violations),
            "ops_cells": [[t, lane, n] for (t, lane), n in sorted(ops_cells.items())],
            "viol_cells": [[t, lane, n] for (t, lane), n in sorted(viol_cells.items())],
            "counters": {k: v for k, v in sorted(rr.counters.items()) if ":" not in k},
            "notes": list(self.notes),
        }

    @staticmethod
    def _columns(s: _Snap, pfns: np.ndarray):
        """The :data:`STATE_FIELDS` columns of ``pfns`` at observation ``s``, one array at a time."""
        inside = pfns < len(s.ref)
        if inside.all():                                     # every pfn has a struct page: no masking
            def at(a):
                return a[pfns]
        else:
            p = np.where(inside, pfns, 0)

            def at(a):
                return np.where(inside, a[p], 0) if len(a) else np.zeros(len(pfns), a.dtype)
        yield at(s.ref)
        yield at(s.pin)
        fl = at(s.flags)
        for bit in (_DIRTY_L, _ACCESSED_L, _FREED_L):
            yield (fl & bit) != 0
        del fl
        code = at(s.spte)
        if len(s.far_pfn):                                   # SPTEs on pfns with no struct page
            srt = np.argsort(s.far_pfn)
            fp = s.far_pfn[srt]
            kk = np.minimum(np.searchsorted(fp, pfns), len(fp) - 1)
            hit = ~inside & (fp[kk] == pfns)
            code[hit] = s.far_spte[srt][kk[hit]]
        for bit in (_P_L, _W_L, _A_L, _D_L):
            yield (code & bit) != 0
        yield (code >> _LEVEL_SHIFT).astype(np.int64)


def _lane_meta(lay: _Layout) -> list[dict]:
    """One dict per lane: its pfn and gfn range and page count."""
    lanes = []
    su, sg = lay.universe[lay.order], lay.gfn[lay.order]
    npages, per = len(lay.universe), lay.per
    for li in range(lay.nlanes):
        lo, hi = li * per, min(npages, (li + 1) * per)
        g = sg[lo:hi]
        g = g[g != _BIG]
        lanes.append({"pfn": [int(su[lo:hi].min()), int(su[lo:hi].max())], "n": hi - lo,
                      "gfn": [int(g.min()), int(g.max())] if len(g) else None})
    return lanes


def _lane_rows(meta: list[dict], agg: np.ndarray) -> list[dict]:
    """The lanes of ``meta`` with their state changes (``agg``: steps x lanes x fields)."""
    return [dict(m, s=_deltas(agg[:, li, :])) for li, m in enumerate(meta)]


def _deltas(m: np.ndarray) -> list:
    """Rows of ``m`` (steps x fields) as ``[[step, *state], ...]``, a row only where the state changed."""
    out = []
    prev = None
    for t in range(m.shape[0]):
        row = m[t].tolist()
        if row != prev:
            out.append([t] + row)
            prev = row
    return out


def _by_inv(vs) -> dict[str, int]:
    c: Counter = Counter(v.invariant for v in vs)
    return dict(sorted(c.items(), key=lambda kv: int(kv[0].split("-")[1])))


def _fact_row(f, lane: int) -> list:
    """``[kind, pfn, gfn, caller, source, mmu_lock, kvm, fault_release, detail, lane, page_op]``."""
    return [f.kind.value, f.pfn, f.gfn, f.caller, f.source.value, bool(f.locked), bool(f.kvm),
            bool(f.fault_release), f.detail, lane, f.kind.value in _PAGE_OPS]


def _viol_row(v, lane: int) -> dict:
    return {"inv": v.invariant, "step": v.step, "pfn": v.pfn, "gfn": v.gfn, "detail": v.detail,
            "caller": v.objects.get("caller", "") if isinstance(v.objects, dict) else "", "lane": lane}


def _leaf_pieces(kvm):
    """Present stage-2 leaves as arrays ``(pfn, gfn, bits, level)``, one entry per 4 KiB page, a piece
    at a time.

    The arch's vectorised view (``leaf_pieces()`` a 1 GiB piece at a time, else ``leaf_arrays()``, as
    :func:`kvmsim.check.check_state` reads it) when it has one, else :meth:`ArchMmu.leaves`.  A huge
    leaf listed once (x86 lists one representative per leaf; the generic stage-2 lists every 4 KiB
    entry of a block) is spread over the pages it maps (no leaf crosses a piece)."""
    if getattr(kvm, "destroyed", False):
        return
    arch = kvm.arch
    if hasattr(arch, "leaf_arrays"):
        for slot, a in (arch.leaf_pieces() if hasattr(arch, "leaf_pieces") else arch.leaf_arrays()):
            idx = np.asarray(a["idx"], np.int64)
            if not len(idx):
                continue
            bits = np.where(np.asarray(a["w"]), _W_L, 0)
            if "a" in a and "d" in a:
                bits |= np.where(np.asarray(a["a"]), _A_L, 0) | np.where(np.asarray(a["d"]), _D_L, 0)
            yield _spread(np.asarray(a["pfn"], np.int64), slot.base_gfn + idx, bits,
                          np.asarray(a["level"], np.int64))
    else:
        rows = [(lf.pfn, lf.gfn, (_W_L if lf.writable else 0) | (_A_L if lf.accessed else 0)
                 | (_D_L if lf.dirty else 0), lf.level) for lf in arch.leaves()]
        if rows:
            yield _spread(*(np.array(c, np.int64) for c in zip(*rows)))


def _spread(pfn, gfn, bits, level):
    """A huge leaf listed by one representative, spread over the 4 KiB pages it maps."""
    span = np.where(level > 1, np.left_shift(1, 9 * np.maximum(level - 1, 0)), 1)
    huge = np.nonzero(span > 1)[0]                       # 4 KiB leaves are one entry each: skip them
    if not len(huge):
        return pfn, gfn, bits, level
    lone = np.zeros(len(pfn), bool)
    base = gfn[huge] & ~(span[huge] - 1)
    _, inv, cnt = np.unique(np.stack([base, level[huge]]), axis=1, return_inverse=True, return_counts=True)
    lone[huge] = cnt[inv.ravel()] == 1                   # a huge leaf listed by one representative
    if lone.any():
        reps = np.nonzero(lone)[0]
        n = span[reps]
        r = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        src = np.repeat(reps, n)
        keep = ~lone
        pfn = np.concatenate([pfn[keep], pfn[src] + r])
        gfn = np.concatenate([gfn[keep], gfn[src] + r])
        bits = np.concatenate([bits[keep], bits[src]])
        level = np.concatenate([level[keep], level[src]])
    return pfn, gfn, bits, level


def _host_map(kvm):
    """``(pfn, gfn)`` of the memslot gfns whose hva the host maps (a present host PTE), a piece of at
    most :data:`PIECE_PFNS` gfns at a time."""
    from kvmsim.check import _host_pfns
    if getattr(kvm, "destroyed", False):
        return
    for slots in kvm.memslots:
        for slot in slots:
            for lo in range(0, slot.npages, PIECE_PFNS):
                idx = np.arange(lo, min(slot.npages, lo + PIECE_PFNS), dtype=np.int64)
                hp = _host_pfns(kvm.mm, slot, idx)
                ok = hp > 0
                yield hp[ok].astype(np.int64), slot.base_gfn + idx[ok]


def _page_state(phys, a: int, b: int):
    """``(ref, pin, flags)`` of pfns ``[a, b)``: ``folio_ref_count()``, the pin count as
    ``folio_maybe_dma_pinned()`` reads it, and :class:`LanePage` bits."""
    head = phys.head[a:b]
    hf = phys.flags[head]
    ref = phys.refcount[head].astype(np.int32)
    pin = np.where((hf & _HEAD) != 0, phys.pincount[head], ref // GUP_PIN_COUNTING_BIAS).astype(np.int32)
    flags = (np.where((hf & _DIRTY) != 0, _DIRTY_L, 0) | np.where((hf & _REFERENCED) != 0, _ACCESSED_L, 0)
             | np.where((phys.flags[a:b] & _POISONED) != 0, _FREED_L, 0)).astype(np.uint8)
    return ref, pin, flags


def run_with_timeline(sc, policy: str, *, progress=None):
    """Run ``sc`` under ``policy`` through the ordinary runner; returns ``(RunResult, timeline data)``."""
    from kvmsim.scenarios.runner import run
    tl = Timeline()
    rr = run(sc, policy, progress=progress, observe=tl.observe)
    return rr, tl.data(rr)

