"""``kvmsim run --html FILE`` and ``kvmsim compare --html DIR``: a run drawn as one self-contained page.

:mod:`kvmsim.report.timeline` reads the model's own state and journal after every step of an
ordinary run (the runner's ``observe`` hook); :mod:`kvmsim.report.html` writes the page (inline CSS,
JavaScript and SVG written here: no network, no library).  See docs/html.md.
"""

from kvmsim.report.html import render_html, write_html
from kvmsim.report.timeline import MAX_LANES, MAX_OPS_PER_STEP, MAX_VIOLATIONS, Timeline, run_with_timeline

__all__ = ["MAX_LANES", "MAX_OPS_PER_STEP", "MAX_VIOLATIONS", "Timeline", "render_html", "run_with_timeline",
           "write_html"]
