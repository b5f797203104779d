"""The HTML timeline in a real browser: headless Chromium loads each page, its screenshot must not
be blank, and the DOM after the script ran must hold the steps and violations the run produced.

Three bundled scenarios: one with violations under legacy (``dirty-after-writeback``), one clean
under both (``dmabuf-readonly-pte``), one with many pages (``hugetlb-1g-disable-dirty-log``: 262,144
pages drawn as range rows of heat strips).  Skipped with the reason when ``chromium`` is not on
PATH (``.ci/run`` installs the Debian package); ``KVMSIM_CHROMIUM`` names another binary.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from kvmsim.report import run_with_timeline, write_html
from kvmsim.scenarios import load_scenario

CHROMIUM = os.environ.get("KVMSIM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

DETAIL, GROUPS = 24, 32                     # as the page's script draws them (kvmsim.report.assets)
VIOLATION_RED = (214, 40, 40)               # #d62828: violation markers and outlines
LEGEND_RED = 400                            # at most this many such pixels: the legend's "!" swatch


def _chromium(tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


class _Dom(HTMLParser):
    """Elements (tag, attributes) in document order; table rows as (run section, table class, row
    attributes, cell texts)."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.rows: list[tuple[int, str, dict, list[str]]] = []
        self._section = -1
        self._table = ""
        self._cells: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "section" and "run" in _classes(a):
            self._section += 1
        elif tag == "table":
            self._table = a.get("class", "")
        elif tag == "tr":
            self._cells = []
            self.rows.append((self._section, self._table, a, self._cells))
        elif tag == "td" and self._cells is not None:
            self._cells.append("")

    def handle_data(self, data):
        if self._cells:
            self._cells[-1] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in _classes(a))]

    def table(self, section: int, cls: str) -> list[tuple[dict, list[str]]]:
        return [(a, [c.strip() for c in cells]) for sec, t, a, cells in self.rows
                if sec == section and t == cls and cells]


def _classes(a: dict) -> list[str]:
    return (a.get("class") or "").split()


def _load(tmp_path: Path, name: str, size=(1600, 1100), dom_hash: str = ""):
    """Run ``name`` under its policies, write its page, load it twice in Chromium: the DOM after the
    script ran (at ``dom_hash``) and a screenshot (not zoomed)."""
    sc = load_scenario(name)
    runs = [run_with_timeline(sc, p) for p in sc.policies]
    page = tmp_path / f"{name}.html"
    nbytes = write_html(page, sc, [d for _, d in runs])
    url = page.resolve().as_uri()
    res = _chromium(tmp_path, "--dump-dom", url + dom_hash)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _Dom()
    dom.feed(res.stdout)
    png = tmp_path / f"{name}.png"
    res = _chromium(tmp_path, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", url)
    assert res.returncode == 0 and png.exists(), res.stderr[-2000:]
    keep = os.environ.get("KVMSIM_HTML_KEEP")                  # a directory to keep the pages and screenshots
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(page, keep)
        shutil.copy(png, keep)
    return sc, runs, dom, _pixels(png), nbytes


def _pixels(png: Path) -> np.ndarray:
    from matplotlib.image import imread
    img = imread(png)                                           # float RGBA in [0, 1] for a PNG
    return np.rint(img[..., :3] * 255).astype(np.int16)


def _assert_not_blank(px: np.ndarray) -> None:
    non_white = np.any(px < 245, axis=2).mean()
    colours = len(np.unique(px.reshape(-1, 3)[::7], axis=0))
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is not white"
    assert colours > 20, f"only {colours} colours in the screenshot"


def _has_colour(px: np.ndarray, rgb, tol: int = 10) -> int:
    return int(np.all(np.abs(px - np.array(rgb)) <= tol, axis=2).sum())


def _assert_dom_is_the_run(dom: _Dom, runs, zoom: dict | None = None) -> None:
    """The DOM shows each run's steps, violations and facts; ``zoom`` maps a run to the lanes shown."""
    body = dom.find("body")[0]
    assert body.get("data-rendered") == str(len(runs)), "the script did not draw every run"
    svgs = dom.find("svg", "timeline")
    assert [s["data-policy"] for s in svgs] == [rr.policy for rr, _ in runs]
    sections = dom.find("section", "run")
    assert [s["data-policy"] for s in sections] == [rr.policy for rr, _ in runs]
    marks_by_run = _split_by_section(dom, "g", "vmark")
    lanes_by_run = _split_by_section(dom, "g", "lane")
    groups_by_run = _split_by_section(dom, "g", "grp")
    dom_groups1 = _split_by_section(dom, "g", "grp1")
    for k, (rr, d) in enumerate(runs):
        # the violation markers the script drew: one per step with violations, naming its invariants
        want = {s.index: sorted({v.invariant for v in s.violations}) for s in rr.steps if s.violations}
        got = {int(m["data-step"]): sorted(m["data-inv"].split()) for m in marks_by_run[k]}
        assert got == want
        # the steps table: every step the run took, its text and result
        steps = [cells for a, cells in dom.table(k, "steps") if "data-step" in a]
        assert [c[0] for c in steps] == [str(s.index) for s in rr.steps]
        assert [c[1] for c in steps] == [s.text for s in rr.steps]
        assert [c[2] for c in steps] == [s.res.result + (f" {s.res.errno_name}" if s.res.errno else "")
                                         for s in rr.steps]
        # the violations table: what the checker found (as many as are listed)
        viols = [cells for a, cells in dom.table(k, "violations")]
        assert [(c[0], c[1]) for c in viols] == [(v.invariant, str(v.step)) for v in rr.violations[:len(viols)]]
        assert len(viols) == min(len(rr.violations), 1000)
        # the operations table: each listed fact's caller and whether mmu_lock was held
        ops = [cells for a, cells in dom.table(k, "ops") if "op" in _classes(a)]
        facts = [f for s in rr.steps for f in s.facts[:200]]
        assert [(c[1], c[4], c[6]) for c in ops] == \
            [(f.kind.value, f.caller, "held" if f.locked else "not held") for f in facts]
        # the lanes: one per page when few, else at most GROUPS range rows over all of them
        lo, hi = (zoom or {}).get(k, (0, len(d["lanes"])))
        n = hi - lo
        if n <= DETAIL and any(lane["n"] > 1 for lane in d["lanes"][lo:hi]):
            assert [(int(g["data-lo"]), int(g["data-hi"])) for g in dom_groups1[k]] == [(j, j + 1) for j in range(lo, hi)]
        elif n <= DETAIL:
            assert len(lanes_by_run[k]) == sum(1 for lane in d["lanes"] if lane["n"] == 1)
        else:
            assert len(groups_by_run[k]) == math.ceil(n / math.ceil(n / GROUPS))
            assert sum(int(g["data-hi"]) - int(g["data-lo"]) for g in groups_by_run[k]) == n


def _split_by_section(dom: _Dom, tag: str, cls: str) -> list[list[dict]]:
    out: list[list[dict]] = []
    for t, a in dom.elements:
        if t == "section" and "run" in _classes(a):
            out.append([])
        elif t == tag and cls in _classes(a) and out:
            out[-1].append(a)
    return out


def test_violations_under_legacy(tmp_path):
    sc, runs, dom, px, _ = _load(tmp_path, "dirty-after-writeback")
    assert [rr.verdict for rr, _ in runs] == ["violations", "clean"]
    _assert_dom_is_the_run(dom, runs)
    _assert_not_blank(px)
    assert _has_colour(px, VIOLATION_RED) > 4 * LEGEND_RED, "no violation marker drawn"
    # the page's one lane is drawn in detail; its cells are outlined where a violation names it
    assert len(_split_by_section(dom, "rect", "vcell")[0]) == len({(t, lane) for t, lane, _ in runs[0][1]["viol_cells"]})
    assert _split_by_section(dom, "rect", "vcell")[1] == []


def test_clean_scenario(tmp_path):
    sc, runs, dom, px, _ = _load(tmp_path, "dmabuf-readonly-pte")
    assert [rr.verdict for rr, _ in runs] == ["clean", "clean"]
    _assert_dom_is_the_run(dom, runs)
    _assert_not_blank(px)
    assert _has_colour(px, VIOLATION_RED) <= LEGEND_RED, "a clean run shows a violation marker"


def test_many_pages_are_ranges_with_zoom(tmp_path):
    """262,144 pages: range rows of heat strips; the legacy run opened zoomed into its first 16 lanes
    (``#run0=0-16``) shows one row per lane, outlined where the run's violations name its pages."""
    sc, runs, dom, px, nbytes = _load(tmp_path, "hugetlb-1g-disable-dirty-log", dom_hash="#run0=0-16")
    assert [rr.verdict for rr, _ in runs] == ["violations", "clean"]
    for rr, d in runs:
        assert d["pages"] == 262144 and d["pages_per_lane"] > 1
    _assert_dom_is_the_run(dom, runs, zoom={0: (0, 16)})
    outlined = _split_by_section(dom, "rect", "vcell")
    assert len(outlined[0]) == len({(t, lane) for t, lane, _ in runs[0][1]["viol_cells"] if lane < 16}) > 0
    assert outlined[1] == []
    _assert_not_blank(px)
    assert _has_colour(px, VIOLATION_RED) > 4 * LEGEND_RED
    assert nbytes < 4 << 20, f"{nbytes} bytes for 262144 pages"
