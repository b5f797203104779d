"""``kvmsim bench dirty-log --html``: a benchmark run observed after each phase.

Mirrors nothing in the kernel: it reads the model the way :mod:`kvmsim.report.timeline` does for a
scenario (the same :class:`~kvmsim.report.timeline.Timeline`, in fold mode), with
tools/testing/selftests/kvm/dirty_log_perf_test.c's phases as the steps.
"""

from __future__ import annotations

import time

import numpy as np

from kvmsim.report.timeline import STATE_FIELDS, Timeline, _lane_rows


class BenchTimeline:
    """``kvmsim bench dirty-log --html``: a :class:`Timeline` in fold mode, observed as phases end.

    ``on_phase`` is :func:`kvmsim.bench.dirty_log_perf.run_model`'s hook, which the bench calls outside
    its timed region: the model is observed once before the first phase (column 0, set-up) and after
    each phase, then folded into lane sums at once, so the worker holds one observation's per-pfn
    arrays at a time and the data sent back is lanes x phases, whatever the guest size."""

    def __init__(self) -> None:
        self.tl = Timeline(fold=True)
        self.seconds = 0.0                 # spent observing (not in any phase's time)

    def on_phase(self, kvm, name: str, iteration: int | None, ended: bool) -> None:
        if ended or not self.tl.rows and not self.tl.snaps:
            t0 = time.perf_counter()
            self.tl.observe_vm(kvm, len(self.tl.rows) + len(self.tl.snaps))
            self.seconds += time.perf_counter() - t0

    def data(self, res, title: str) -> dict:
        """The JSON-ready timeline of bench result ``res`` (a ``dirty_log_perf.RunResult``)."""
        from kvmsim.bench.report import phase_label
        tl = self.tl
        if tl.snaps:                                   # never saw a page: one lane-less layout
            tl._freeze()
            tl.rows.extend(tl._aggregate(s, tl.layout) for s in tl.snaps)
            tl.snaps.clear()
        lay = tl.layout
        agg = np.stack(tl.rows) if tl.rows else np.zeros((0, lay.nlanes, len(STATE_FIELDS)), np.int64)
        notes = list(tl.notes)
        if tl.late_pages:
            notes.append(f"{tl.late_pages} page(s) first mapped after the lanes were fixed are not drawn")
        steps = []
        for i, ph in enumerate(res.phases, 1):
            summary = {k: int(v) for k, v in ph.summary().items() if v}
            steps.append({"i": i, "op": ph.name + (f" {ph.iteration}" if ph.iteration is not None else ""), "text": phase_label(ph.name, ph.iteration),
                          "result": f"{ph.seconds:.3f} s", "errno": "", "violations": {}, "seconds": ph.seconds,
                          "cpu_seconds": ph.cpu_seconds, "summary": summary,
                          "counters": {k: int(v) for k, v in sorted(ph.counters.items()) if v},
                          "peak_rss_bytes": ph.peak_rss_bytes})
        return {"scenario": title, "policy": res.policy, "verdict": "bench", "error": "", "expected_match": True,
                "stated": False, "mismatches": [], "by_invariant": {}, "nsteps": len(agg),
                "fields": list(STATE_FIELDS), "pages": int(len(lay.universe)), "pages_per_lane": lay.per,
                "lanes": _lane_rows(tl.lane_meta, agg), "steps": steps, "violations": [], "nviolations": 0,
                "ops_cells": [], "viol_cells": [], "counters": {}, "notes": notes, "stats": dict(res.stats),
                "wall_seconds": res.wall_seconds, "observe_seconds": self.seconds,
                "peak_rss_bytes": res.peak_rss_bytes, "bench": True}
