"""``kvmsim run --html FILE``, ``kvmsim compare --html DIR`` and ``kvmsim bench dirty-log --html FILE``:
a run drawn as one self-contained page.

:mod:`kvmsim.report.timeline` reads the model's own state and journal after every step of an
ordinary run (the runner's ``observe`` hook); :mod:`kvmsim.report.html` writes the page (inline CSS,
JavaScript and SVG written here: no network, no library).  A benchmark run is observed after each
phase by :class:`kvmsim.report.bench.BenchTimeline` (the same reader in fold mode).  See docs/html.md.
"""

from kvmsim.report.html import render_html, write_html
from kvmsim.report.timeline import MAX_LANES, MAX_OPS_PER_STEP, MAX_VIOLATIONS, Timeline, run_with_timeline

__all__ = ["MAX_LANES", "MAX_OPS_PER_STEP", "MAX_VIOLATIONS", "Timeline", "render_html", "run_with_timeline",
           "write_html"]
