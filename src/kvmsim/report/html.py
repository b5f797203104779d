"""Write a run (or a scenario's runs side by side) as one self-contained HTML page.

The page needs nothing but itself: CSS, JavaScript and SVG are inline and written here
(:mod:`kvmsim.report.assets`), the run's data is a JSON ``<script type="application/json">`` block.
The tables (steps, violations, struct-page operations) are plain HTML, so they read without
JavaScript too; the script draws the timeline (per-page lanes, or per-range heat strips with zoom
when there are more pages than fit) and filters the operations table when a step or cell is clicked.

Every string from a scenario file or the model goes through :func:`html.escape` (tables) or the
JSON block (escaped so that ``</script>`` cannot end it).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from kvmsim.report.assets import CSS, JS

_MARKS = ("set_dirty", "mark_accessed")
#: Tables longer than this start folded.
OPEN_ROWS = 40


def _e(x: object) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _hex(x) -> str:
    return "" if x is None else f"{x:#x}"


def _json_block(obj: object) -> str:
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _inv_text(by_inv: dict[str, int]) -> str:
    return " ".join(f"{k}×{v}" if v > 1 else k for k, v in by_inv.items()) or "none"


def _run_section(k: int, d: dict) -> str:
    verdict = d["verdict"]
    match = ("matches its stated outcome" if d["expected_match"] else "MISMATCH") if d["stated"] else \
        "no stated outcome"
    out = [f'<section class="run" id="run-{k}" data-policy="{_e(d["policy"])}" data-verdict="{_e(verdict)}">',
           f'<h2><span class="pol">{_e(d["policy"])}</span> <span class="verdict v-{_e(verdict)}">{_e(verdict)}</span>'
           + (f' <span class="invs">{_e(_inv_text(d["by_invariant"]))}</span>' if d["by_invariant"] else "")
           + f' <span class="match {"ok" if d["expected_match"] else "bad"}">{_e(match)}</span></h2>']
    if d["error"]:
        out.append(f'<p class="err">error: {_e(d["error"])}</p>')
    for m in d["mismatches"]:
        out.append(f'<p class="err">mismatch: {_e(m)}</p>')
    for m in d.get("notes", ()):
        out.append(f'<p class="err">timeline: {_e(m)}</p>')
    per = d["pages_per_lane"]
    lanes = f'{d["pages"]} page(s)' + (f' in {len(d["lanes"])} lanes of {per} pages' if per > 1 else "")
    out.append(f'<p class="meta">{_e(lanes)} · {sum(s["nfacts"] for s in d["steps"])} journal facts · '
               f'{d["nviolations"]} violation(s)</p>')
    out.append(f'<div class="tl" data-run="{k}"><div class="tl-nav"></div><div class="tl-scroll"></div></div>')
    # steps
    out.append('<details open class="steps"><summary>Steps</summary><table class="steps">'
               '<tr><th>#</th><th>step</th><th>result</th><th>violations</th><th>facts</th></tr>')
    for s in d["steps"]:
        res = s["result"] + (f' {s["errno"]}' if s["errno"] else "")
        cls = ' class="has-viol"' if s["violations"] else ""
        out.append(f'<tr data-step="{s["i"]}"{cls}><td>{s["i"]}</td><td class="txt">{_e(s["text"])}</td>'
                   f'<td>{_e(res)}</td><td class="vi">{_e(_inv_text(s["violations"]) if s["violations"] else "")}</td>'
                   f'<td>{s["nfacts"]}</td></tr>')
        for m in s["mismatches"]:
            out.append(f'<tr class="mism"><td></td><td colspan="4">mismatch: {_e(m)}</td></tr>')
    out.append("</table></details>")
    # violations
    nv, listed = d["nviolations"], len(d["violations"])
    # a long list starts folded (its counts are in the heading and the steps table)
    out.append(f'<details {"open" if 0 < nv <= OPEN_ROWS else ""} class="viols"><summary>Violations ({nv}'
               f'{": " + _e(_inv_text(d["by_invariant"])) if nv else ""})</summary>')
    if nv:
        out.append('<table class="violations"><tr><th>invariant</th><th>step</th><th>pfn</th><th>gfn</th>'
                   '<th>caller</th><th>detail</th></tr>')
        for v in d["violations"]:
            out.append(f'<tr class="violation" data-inv="{_e(v["inv"])}" data-step="{_e(v["step"])}" '
                       f'data-lane="{v["lane"]}"><td class="inv">{_e(v["inv"])}</td><td>{_e(v["step"])}</td>'
                       f'<td>{_hex(v["pfn"])}</td><td>{_hex(v["gfn"])}</td><td>{_e(v["caller"])}</td>'
                       f'<td>{_e(v["detail"])}</td></tr>')
        out.append("</table>")
        if nv > listed:
            out.append(f'<p class="meta">{nv - listed} more violation(s) not listed (counted in the timeline)</p>')
    out.append("</details>")
    # struct-page operations
    nops = sum(len(s["ops"]) for s in d["steps"])
    out.append(f'<details {"open" if nops <= OPEN_ROWS else ""} class="ops"><summary>Struct-page operations and '
               f'other journal facts ({sum(s["nfacts"] for s in d["steps"])}) '
               '<span class="filter"></span></summary><table class="ops"><tr><th>step</th><th>fact</th>'
               '<th>pfn</th><th>gfn</th><th>caller</th><th>source</th><th>mmu_lock</th><th>by</th>'
               '<th>fault release</th><th>detail</th></tr>')
    for s in d["steps"]:
        for kind, pfn, gfn, caller, source, locked, kvm, frel, detail, lane, page_op in s["ops"]:
            lock = "held" if locked else "not held"
            # an A/D mark by KVM outside mmu_lock is what INV-3 is about; GUP and puts need no lock
            lcls = "lock-held" if locked else ("lock-no" if kvm and kind in _MARKS else "lock-na")
            out.append(f'<tr class="op{" pageop" if page_op else ""}" data-step="{s["i"]}" data-lane="{lane}">'
                       f'<td>{s["i"]}</td><td class="kind k-{_e(kind)}">{_e(kind)}</td><td>{_hex(pfn)}</td>'
                       f'<td>{_hex(gfn)}</td><td class="caller">{_e(caller)}</td><td>{_e(source)}</td>'
                       f'<td class="{lcls}">{lock}</td><td>{"KVM" if kvm else "host"}</td>'
                       f'<td>{"yes" if frel else ""}</td><td>{_e(detail)}</td></tr>')
        if s["nfacts"] > len(s["ops"]):
            out.append(f'<tr class="more" data-step="{s["i"]}"><td>{s["i"]}</td><td colspan="9">'
                       f'{s["nfacts"] - len(s["ops"])} more facts in this step; all {s["nfacts"]} by kind, caller, '
                       'source, mmu_lock and KVM/host:<ul>')
            for kind, caller, source, locked, kvm, n in s["groups"]:
                out.append(f'<li>{n} × {_e(kind)} by {_e(caller)} ({_e(source)}, '
                           f'mmu_lock {"held" if locked else "not held"}, {"KVM" if kvm else "host"})</li>')
            out.append("</ul></td></tr>")
    out.append("</table></details>")
    if d["counters"]:
        out.append('<details class="counters"><summary>Counters</summary><p class="meta">'
                   + _e(" ".join(f"{k}={v}" for k, v in d["counters"].items())) + "</p></details>")
    out.append("</section>")
    return "\n".join(out)


def render_html(scenario, runs: list[dict]) -> str:
    """The page of ``scenario``'s ``runs`` (timeline data from :func:`run_with_timeline`), side by side."""
    title = f"kvmsim: {scenario.name} ({', '.join(d['policy'] for d in runs)})"
    head = [f'<h1>{_e(scenario.name)} <small>{_e(" vs ".join(d["policy"] for d in runs))}</small></h1>',
            f'<p class="desc">{_e(" ".join(scenario.description.split()))}</p>']
    if scenario.source:
        head.append(f'<p class="meta">source: {_e(scenario.source)}</p>')
    legend = ('<p class="legend"><b>Lanes</b> (one per page: struct page pfn, the gfn it backs): '
              '<span class="lg ref">ref</span> folio_ref_count, pin = pin count · '
              '<span class="lg dirty">D</span> PG_dirty <span class="lg acc">A</span> PG_referenced '
              '<span class="lg freed">freed</span> page back in the allocator · '
              '<span class="lg spte">4K WAD</span> stage-2 leaf present: level, Writable, Accessed, Dirty · '
              '<span class="lg ops">●</span> struct-page operations in the step (click: list them) · '
              '<span class="lg viol">!</span> a violation names this page at this step. '
              '<b>Ranges</b> of pages are heat strips, top to bottom: share of pages with a stage-2 leaf '
              'present, W, D; with PG_dirty, PG_referenced; journal facts; violations. Click one to zoom in '
              '(the bar above the lanes zooms out).</p>')
    body = "\n".join(_run_section(k, d) for k, d in enumerate(runs))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(head) + "\n" + legend + "\n"
            + f'<div class="runs" style="--n:{max(1, len(runs))}">\n{body}\n</div>\n'
            + f'<script type="application/json" id="kvmsim-data">{_json_block(runs)}</script>\n'
            + f"<script>{JS}</script>\n</body></html>\n")


def write_html(path: str | Path, scenario, runs: list[dict]) -> int:
    """Write the page of ``runs`` to ``path``; returns its size in bytes."""
    text = render_html(scenario, runs)
    data = text.encode("utf-8")
    Path(path).write_bytes(data)
    return len(data)


def _bench_section(k: int, d: dict) -> str:
    """One bench run: its lanes (drawn by the script), leaf stats and the per-phase counters."""
    out = [f'<section class="run bench" id="run-{k}" data-policy="{_e(d["policy"])}" data-verdict="bench">',
           f'<h2><span class="pol">{_e(d["policy"])}</span> <span class="invs">{_e(d["scenario"])}</span></h2>']
    for m in d.get("notes", ()):
        out.append(f'<p class="err">timeline: {_e(m)}</p>')
    per = d["pages_per_lane"]
    lanes = f'{d["pages"]} page(s)' + (f' in {len(d["lanes"])} lanes of {per} pages' if per > 1 else "")
    stats = " ".join(f"{k}={v}" for k, v in d["stats"].items())
    out.append(f'<p class="meta">{_e(lanes)} · flow {d["wall_seconds"]:.3f} s wall of which '
               f'{d["observe_seconds"]:.3f} s observing for this page (outside every phase\'s time) · '
               f'peak RSS {d["peak_rss_bytes"] / 2**30:.2f} GiB · leaves at the end: <span class="stats">'
               f'{_e(stats)}</span></p>')
    out.append(f'<div class="tl" data-run="{k}"><div class="tl-nav"></div><div class="tl-scroll"></div></div>')
    # phases with their counters (the bench runs with the journal off: counters stand in for facts)
    kinds = sorted({c for s in d["steps"] for c in s["summary"]})
    out.append('<details open class="steps ops"><summary>Phases and their counters <span class="filter"></span>'
               '</summary><table class="steps phases"><tr><th>#</th><th>phase</th><th>seconds</th><th>CPU s</th>'
               + "".join(f"<th>{_e(c)}</th>" for c in kinds) + "</tr>")
    for s in d["steps"]:
        out.append(f'<tr class="op" data-step="{s["i"]}" data-lane="-1"><td>{s["i"]}</td><td class="txt">'
                   f'{_e(s["text"])}</td><td>{s["seconds"]:.3f}</td><td>{s["cpu_seconds"]:.3f}</td>'
                   + "".join(f'<td data-counter="{_e(c)}">{s["summary"].get(c, 0)}</td>' for c in kinds) + "</tr>")
    out.append("</table></details>")
    out.append('<details class="counters"><summary>Every counter per phase (by caller)</summary>')
    for s in d["steps"]:
        out.append(f'<p class="meta"><b>{_e(s["text"])}</b>: '
                   + _e(" ".join(f"{k}={v}" for k, v in s["counters"].items()) or "none") + "</p>")
    out.append("</details></section>")
    return "\n".join(out)


def render_bench_html(title: str, runs: list[dict]) -> str:
    """``kvmsim bench dirty-log --html``: the runs' lanes per phase (policies side by side)."""
    pols = " vs ".join(f'{d["policy"]} ({d["scenario"].split(" -v")[0].split("-b ")[-1]})' for d in runs)
    head = (f'<h1>{_e(title)} <small>{_e(pols)}</small></h1>'
            '<p class="desc">kvmsim bench dirty-log: one column per phase of the dirty_log_perf_test flow '
            '(column 0 is the VM before populate). The benchmark runs with the journal off, so there are no '
            'struct-page operations to list; each phase\'s cost counters are in the table below its lanes.</p>')
    legend = ('<p class="legend"><b>Ranges</b> of guest pages (in gfn order) are heat strips, top to bottom: share '
              'of pages with a stage-2 leaf present, W, D; with PG_dirty, PG_referenced. Hover a cell for its sums '
              '(refcount, pins, largest level); click a range to zoom in (the bar above the lanes zooms out).</p>')
    body = "\n".join(_bench_section(k, d) for k, d in enumerate(runs))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e('kvmsim: ' + title)}</title><style>{CSS}</style></head><body>\n"
            + head + "\n" + legend + "\n"
            + f'<div class="runs" style="--n:{max(1, len(runs))}">\n{body}\n</div>\n'
            + f'<script type="application/json" id="kvmsim-data">{_json_block(runs)}</script>\n'
            + f"<script>{JS}</script>\n</body></html>\n")


def write_bench_html(path: str | Path, title: str, runs: list[dict]) -> int:
    """Write the bench page of ``runs`` to ``path``; returns its size in bytes."""
    data = render_bench_html(title, runs).encode("utf-8")
    Path(path).write_bytes(data)
    return len(data)


def render_index(entries: list[tuple[str, str, list[dict]]]) -> str:
    """``compare --html``'s index: one row per scenario (file name, description, runs)."""
    rows = []
    for fname, name, runs in entries:
        cells = " ".join(f'<span class="verdict v-{_e(d["verdict"])}">{_e(d["policy"])}: {_e(d["verdict"])}'
                         f' {_e(_inv_text(d["by_invariant"]) if d["by_invariant"] else "")}</span>' for d in runs)
        ok = all(d["expected_match"] for d in runs)
        rows.append(f'<tr><td><a href="{_e(fname)}">{_e(name)}</a></td><td>{cells}</td>'
                    f'<td class="match {"ok" if ok else "bad"}">{"✓" if ok else "✗"}</td></tr>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kvmsim compare</title>"
            f"<style>{CSS}</style></head><body><h1>kvmsim compare</h1>"
            '<table class="index"><tr><th>scenario</th><th>runs</th><th>match</th></tr>'
            + "\n".join(rows) + "</table></body></html>\n")
