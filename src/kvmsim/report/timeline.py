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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvmsim.mm.page import GUP_PIN_COUNTING_BIAS, PG

#: Most lanes a run's timeline holds; beyond that lanes are ranges of pages (a heat strip each).
MAX_LANES = 2048
#: Most struct-page operations listed one by one per step (the rest are counted and grouped).
MAX_OPS_PER_STEP = 200
#: Most violations listed one by one per run (all are counted per lane and step).
MAX_VIOLATIONS = 1000

#: The per-lane state columns, in order (a lane of n pages holds sums; ``level`` holds the max).
STATE_FIELDS = ("ref", "pin", "dirty", "accessed", "freed", "present", "w", "a", "d", "level")

_DIRTY, _REFERENCED, _POISONED, _HEAD = int(PG.dirty), int(PG.referenced), int(PG.poisoned), int(PG.head)
_PAGE_OPS = frozenset({"get", "put", "pin", "unpin", "get_unless_zero_failed", "underflow", "set_dirty",
                       "mark_accessed", "free", "double_free", "freed_dirty", "premature_free",
                       "freed_while_referenced", "uaf"})


@dataclass
class _Snap:
    """One observation: per-pfn page state (arrays over ``mem_map``) and the stage-2 leaves."""

    ref: np.ndarray
    pin: np.ndarray
    flags: np.ndarray              # bit 0 dirty, 1 accessed, 2 freed
    spte_pfn: np.ndarray
    spte_gfn: np.ndarray
    spte_bits: np.ndarray          # bit 0 W, 1 A, 2 D
    spte_level: np.ndarray
    host_pfn: np.ndarray
    host_gfn: np.ndarray


@dataclass
class Timeline:
    """Collects one run's observations; :meth:`data` turns them into the JSON the page draws."""

    snaps: list[_Snap] = field(default_factory=list)

    def observe(self, env, i: int) -> None:
        """The runner's ``observe`` hook: snapshot the model after set-up (0) and after step ``i``."""
        kvm = env.kvm
        phys = kvm.phys
        n = phys.nr
        head = phys.head[:n]
        ref = phys.refcount[head].astype(np.int64)
        large = (phys.flags[head] & _HEAD) != 0
        pin = np.where(large, phys.pincount[head], ref // GUP_PIN_COUNTING_BIAS)
        hf = phys.flags[head]
        flags = (((hf & _DIRTY) != 0) * 1 + ((hf & _REFERENCED) != 0) * 2
                 + ((phys.flags[:n] & _POISONED) != 0) * 4).astype(np.uint8)
        spte = _leaves(kvm)
        host = _host_map(kvm)
        self.snaps.append(_Snap(ref, pin.astype(np.int64), flags, *spte, *host))

    # ---- turning observations into lanes -------------------------------------------------------------
    def data(self, rr) -> dict:
        """The JSON-ready timeline of run ``rr`` (a :class:`RunResult`) from the observations."""
        facts = [f for s in rr.steps for f in s.facts]
        fact_pfns = np.array([f.pfn for f in facts if f.pfn is not None and f.pfn >= 0], dtype=np.int64)
        pool = [fact_pfns] + [a for s in self.snaps for a in (s.spte_pfn, s.host_pfn)]
        pool += [np.array([v.pfn for v in rr.violations if v.pfn is not None], dtype=np.int64)]
        universe = np.unique(np.concatenate(pool)) if pool else np.zeros(0, np.int64)
        universe = universe[universe > 0]
        # the gfn each pfn backs (the smallest seen, SPTE or host PTE), to order and name lanes
        gfn = np.full(len(universe), np.iinfo(np.int64).max, dtype=np.int64)
        for s in self.snaps:
            for p, g in ((s.spte_pfn, s.spte_gfn), (s.host_pfn, s.host_gfn)):
                keep = p > 0
                if keep.any():
                    np.minimum.at(gfn, np.searchsorted(universe, p[keep]), g[keep])
        order = np.lexsort((universe, gfn))
        universe, gfn = universe[order], gfn[order]
        states = np.stack([self._state(s, universe) for s in self.snaps]) if self.snaps else \
            np.zeros((0, len(universe), len(STATE_FIELDS)), np.int64)       # (steps, pages, fields)
        nsteps = len(self.snaps)
        # lane index of each page: itself, or its range when there are more pages than lanes
        per = max(1, -(-len(universe) // MAX_LANES))
        nlanes = -(-len(universe) // per) if len(universe) else 0
        lane_of = np.arange(len(universe)) // per
        pos = np.empty(len(universe), np.int64)
        pos[order] = np.arange(len(universe))               # sorted-by-pfn index -> lane-sorted index

        by_pfn = np.sort(universe)

        def lane_idx(pfns: np.ndarray) -> np.ndarray:
            k = np.searchsorted(by_pfn, pfns)
            ok = (k < len(by_pfn)) & (by_pfn[np.minimum(k, len(by_pfn) - 1)] == pfns) if len(by_pfn) else \
                np.zeros(len(pfns), bool)
            out = np.full(len(pfns), -1, np.int64)
            out[ok] = lane_of[pos[k[ok]]]
            return out

        lanes = []
        agg = np.zeros((nsteps, nlanes, len(STATE_FIELDS)), np.int64)
        for c in range(len(STATE_FIELDS)):
            for t in range(nsteps):
                col = states[t, :, c]
                if STATE_FIELDS[c] == "level":
                    np.maximum.at(agg[t, :, c], lane_of, col)
                else:
                    agg[t, :, c] = np.bincount(lane_of, weights=col, minlength=nlanes).astype(np.int64)
        big = np.iinfo(np.int64).max
        for li in range(nlanes):
            lo, hi = li * per, min(len(universe), (li + 1) * per)
            g = gfn[lo:hi]
            g = g[g != big]
            lane = {"pfn": [int(universe[lo:hi].min()), int(universe[lo:hi].max())], "n": hi - lo,
                    "gfn": [int(g.min()), int(g.max())] if len(g) else None, "s": _deltas(agg[:, li, :])}
            lanes.append(lane)
        # operations and violations per (step, lane)
        ops_cells: Counter = Counter()
        steps = []
        shown_ops = 0
        for s in rr.steps:
            fp = np.array([f.pfn if f.pfn is not None and f.pfn > 0 else -1 for f in s.facts], np.int64)
            li = lane_idx(fp) if len(fp) else fp
            for lane, cnt in Counter(li[li >= 0].tolist()).items():
                ops_cells[(s.index, lane)] += cnt
            groups: Counter = Counter()
            listed = []
            for f, lane in zip(s.facts, li.tolist()):
                groups[(f.kind.value, f.caller, f.source.value, bool(f.locked), bool(f.kvm))] += 1
                if len(listed) < MAX_OPS_PER_STEP:
                    listed.append(_fact_row(f, lane))
            shown_ops += len(listed)
            steps.append({"i": s.index, "op": s.op, "text": s.text, "result": s.res.result,
                          "errno": s.res.errno_name or "", "nfacts": len(s.facts), "ops": listed,
                          "groups": [list(k) + [n] for k, n in groups.most_common()],
                          "violations": _by_inv(s.violations), "mismatches": list(s.mismatches)})
        vp = np.array([v.pfn if v.pfn is not None else -1 for v in rr.violations], np.int64)
        vl = lane_idx(vp) if len(vp) else vp
        viol_cells: Counter = Counter()
        for v, lane in zip(rr.violations, vl.tolist()):
            if lane >= 0 and v.step is not None:
                viol_cells[(v.step, lane)] += 1
        return {
            "scenario": rr.scenario, "policy": rr.policy, "verdict": rr.verdict, "error": rr.error or "",
            "expected_match": rr.expected_match, "stated": rr.stated, "mismatches": list(rr.mismatches),
            "by_invariant": rr.by_invariant(), "nsteps": nsteps, "fields": list(STATE_FIELDS),
            "pages": int(len(universe)), "pages_per_lane": per, "lanes": lanes, "steps": steps,
            "violations": [_viol_row(v, lane) for v, lane in zip(rr.violations[:MAX_VIOLATIONS],
                                                                  vl.tolist()[:MAX_VIOLATIONS])],
            "nviolations": len(rr.violations),
            "ops_cells": [[t, lane, n] for (t, lane), n in sorted(ops_cells.items())],
            "viol_cells": [[t, lane, n] for (t, lane), n in sorted(viol_cells.items())],
            "counters": {k: v for k, v in sorted(rr.counters.items()) if ":" not in k},
        }

    def _state(self, s: _Snap, pfns: np.ndarray) -> np.ndarray:
        """``(len(pfns), len(STATE_FIELDS))`` state of ``pfns`` at observation ``s``."""
        out = np.zeros((len(pfns), len(STATE_FIELDS)), np.int64)
        ok = pfns < len(s.ref)                               # pfns past mem_map (MMIO) have no struct page
        p = pfns[ok]
        out[ok, 0] = s.ref[p]
        out[ok, 1] = s.pin[p]
        fl = s.flags[p]
        out[ok, 2] = fl & 1
        out[ok, 3] = (fl >> 1) & 1
        out[ok, 4] = (fl >> 2) & 1
        if len(s.spte_pfn):
            srt = np.argsort(s.spte_pfn, kind="stable")
            sp = s.spte_pfn[srt]
            k = np.searchsorted(sp, pfns)
            kk = np.minimum(k, len(sp) - 1)
            hit = (k < len(sp)) & (sp[kk] == pfns)
            j = srt[kk[hit]]
            b = s.spte_bits[j]
            out[hit, 5] = 1
            out[hit, 6] = b & 1
            out[hit, 7] = (b >> 1) & 1
            out[hit, 8] = (b >> 2) & 1
            out[hit, 9] = s.spte_level[j]
        return out


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


def _leaves(kvm):
    """Present stage-2 leaves as arrays ``(pfn, gfn, bits, level)``, one entry per 4 KiB page.

    The arch's vectorised view (``leaf_arrays()``, as :func:`kvmsim.check.check_state` reads it) when it
    has one, else :meth:`ArchMmu.leaves`.  A huge leaf listed once (x86 lists one representative per
    leaf; the generic stage-2 lists every 4 KiB entry of a block) is spread over the pages it maps."""
    e = np.zeros(0, np.int64)
    if getattr(kvm, "destroyed", False):
        return e, e, e, e
    parts = []
    if hasattr(kvm.arch, "leaf_arrays"):
        for slot, a in kvm.arch.leaf_arrays():
            idx = np.asarray(a["idx"], np.int64)
            if not len(idx):
                continue
            ad = ("a" in a and "d" in a)
            bits = (np.asarray(a["w"], np.int64) | (np.asarray(a["a"], np.int64) << 1 if ad else 0)
                    | (np.asarray(a["d"], np.int64) << 2 if ad else 0))
            parts.append((np.asarray(a["pfn"], np.int64), slot.base_gfn + idx, bits, np.asarray(a["level"], np.int64)))
    else:
        rows = [(lf.pfn, lf.gfn, int(lf.writable) | int(lf.accessed) << 1 | int(lf.dirty) << 2, lf.level)
                for lf in kvm.arch.leaves()]
        if rows:
            parts.append(tuple(np.array(c, np.int64) for c in zip(*rows)))
    if not parts:
        return e, e, e, e
    pfn, gfn, bits, level = (np.concatenate(c) for c in zip(*parts))
    span = np.where(level > 1, np.left_shift(1, 9 * np.maximum(level - 1, 0)), 1)
    base = gfn & ~(span - 1)
    _, inv, cnt = np.unique(np.stack([base, level]), axis=1, return_inverse=True, return_counts=True)
    lone = (span > 1) & (cnt[inv.ravel()] == 1)          # a huge leaf listed by one representative
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
    """``(pfn, gfn)`` of every memslot gfn whose hva the host maps (a present host PTE)."""
    from kvmsim.check import _host_pfns
    pfns, gfns = [], []
    if not getattr(kvm, "destroyed", False):
        for slots in kvm.memslots:
            for slot in slots:
                idx = np.arange(slot.npages, dtype=np.int64)
                hp = _host_pfns(kvm.mm, slot, idx)
                ok = hp > 0
                pfns.append(hp[ok])
                gfns.append(slot.base_gfn + idx[ok])
    if not pfns:
        e = np.zeros(0, np.int64)
        return e, e
    return np.concatenate(pfns).astype(np.int64), np.concatenate(gfns).astype(np.int64)


def run_with_timeline(sc, policy: str, *, progress=None):
    """Run ``sc`` under ``policy`` through the ordinary runner; returns ``(RunResult, timeline data)``."""
    from kvmsim.scenarios.runner import run
    tl = Timeline()
    rr = run(sc, policy, progress=progress, observe=tl.observe)
    return rr, tl.data(rr)
