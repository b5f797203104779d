"""``kvmsim bench dirty-log --html``: the bench-scale page, without and with a browser.

The page's lanes are the model's own state after each phase, folded into range sums; these tests
hold them against what the bench itself reports (leaf_stats at the end, its per-phase counters) and
against the dirty-log semantics of the flow (every page written by a 100% pass is dirty; a manual
KVM_CLEAR_DIRTY_LOG under PML clears the D bits, x86 kvm_arch_mmu_clear_dirty_pt_masked()), so a
wrong column, a lost phase or a lane summed twice fails.  The size bound: 4x the guest, not 1.25x
the bytes.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from kvmsim.bench.dirty_log_perf import Options, run_with_timeline
from kvmsim.bench.report import phase_label
from kvmsim.cli import cli
from kvmsim.report.html import write_bench_html
from kvmsim.report.timeline import MAX_LANES

MIB = 1 << 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _column(d: dict, t: int) -> dict:
    """Every lane's state at column ``t`` summed (``level``: the max), by field name."""
    tot = dict.fromkeys(d["fields"], 0)
    for lane in d["lanes"]:
        row = None
        for r in lane["s"]:
            if r[0] <= t:
                row = r
        for f, v in zip(d["fields"], row[1:] if row else [0] * len(d["fields"])):
            tot[f] = max(tot[f], v) if f == "level" else tot[f] + v
    return tot


def _embedded(page: str) -> list[dict]:
    m = re.search(r'<script type="application/json" id="kvmsim-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def small():
    """A 64 MiB flow (16384 pages, 8 a lane) under each policy, in this process."""
    return {p: run_with_timeline(Options(64 * MIB, floor=False), p) for p in ("legacy", "series")}


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_lanes_are_the_models_state_after_each_phase(small, policy):
    res = small[policy]
    d = res.timeline
    npages = (64 * MIB) >> 12
    assert d["pages"] == npages and d["pages_per_lane"] == npages // MAX_LANES
    assert d["nsteps"] == len(res.phases) + 1                       # set-up plus one column per phase
    assert [s["text"] for s in d["steps"]] == [phase_label(p.name, p.iteration) for p in res.phases]
    assert sum(lane["n"] for lane in d["lanes"]) == npages
    assert _column(d, 0)["present"] == 0                            # before populate: no leaf
    names = [f"{p.name} {p.iteration}" if p.iteration is not None else p.name for p in res.phases]
    after = {n: _column(d, t) for t, n in enumerate(names, 1)}
    assert after["populate"]["present"] == npages and after["populate"]["w"] == npages
    assert after["dirty 2"]["d"] == npages                          # -w 100: every page written
    assert after["clear 1"]["d"] == 0 and after["clear 2"]["d"] == 0  # PML: CLEAR clears D bits
    last = _column(d, d["nsteps"] - 1)
    st = res.stats
    assert last["present"] == st["pages_4k"] + 512 * st["pages_2m"] + 512 * 512 * st["pages_1g"] == d["stats"]["pages_4k"]
    assert last["ref"] >= npages and last["freed"] == 0
    # the counters table is the bench's own per-phase counters
    for s, ph in zip(d["steps"], res.phases):
        assert s["summary"] == {k: v for k, v in ph.summary().items() if v}
        assert s["seconds"] == ph.seconds


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pg_dirty_column_matches_mem_map_after_each_phase(policy):
    """PG_dirty per column against a direct count over the host's ``mem_map`` at each phase's end."""
    import numpy as np

    from kvmsim.bench.dirty_log_perf import run_model
    from kvmsim.mm.page import PG
    from kvmsim.report.bench import BenchTimeline
    bt, direct = BenchTimeline(), []

    def on_phase(kvm, name, iteration, ended):
        bt.on_phase(kvm, name, iteration, ended)
        if ended:
            phys = kvm.phys
            direct.append(int(np.count_nonzero(phys.flags[phys.head[:phys.nr]] & int(PG.dirty))))
    res = run_model(Options(16 * MIB, floor=False), policy, on_phase=on_phase)
    d = bt.data(res, "t")
    assert [_column(d, t)["dirty"] for t in range(1, d["nsteps"])] == direct
    assert max(direct) > 0                                          # some phase left pages dirty


def test_size_is_bounded_by_lanes_not_pages(tmp_path):
    sizes = {}
    for mib in (64, 256):
        runs = [run_with_timeline(Options(mib * MIB, floor=False), p).timeline for p in ("legacy", "series")]
        assert all(len(d["lanes"]) == MAX_LANES for d in runs)
        sizes[mib] = write_bench_html(tmp_path / f"{mib}.html", "t", runs)
    assert sizes[256] < 1.25 * sizes[64], sizes


def test_cli_html_through_the_worker(tmp_path):
    out = tmp_path / "b.html"
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "64M", "--no-progress", "--html", str(out)])
    assert r.exit_code == 0, r.output
    runs = _embedded(out.read_text())
    assert [d["policy"] for d in runs] == ["legacy", "series"]
    for d in runs:
        assert d["pages"] == 16384 and d["nsteps"] == 10
        assert _column(d, d["nsteps"] - 1)["present"] == d["stats"]["pages_4k"] == 16384
    assert "--html" not in json.dumps(runs) and f"wrote {out}" in r.output


def test_json_output_leaves_the_timeline_out(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M", "--no-isolate", "--policy", "legacy", "--json",
                                 "--html", str(tmp_path / "j.html")])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert "timeline" not in runs[0] and (tmp_path / "j.html").stat().st_size > 0


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_bad_html_path_is_exit_2_before_the_run(tmp_path, where):
    path = tmp_path / "no" / "such" / "x.html" if where == "missing-dir" else tmp_path
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M", "--no-isolate", "--html", str(path)])
    assert r.exit_code == 2
    assert "--html" in r.output and ("does not exist" in r.output or "is a directory" in r.output)
    assert "Traceback" not in r.output and "populate" not in r.output


def test_html_needs_model_runs(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M", "--backend", "kvm", "--html",
                                 str(tmp_path / "k.html")])
    assert r.exit_code == 2 and "model" in r.output and "Traceback" not in r.output


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_bench_page_in_chromium(tmp_path, small):
    from tests.test_html_browser import _assert_not_blank, _chromium, _Dom, _pixels
    runs = [small["legacy"].timeline, small["series"].timeline]
    page = tmp_path / "bench.html"
    write_bench_html(page, "dirty_log_perf_test -b 64M", runs)
    res = _chromium(tmp_path, "--dump-dom", page.resolve().as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _Dom()
    dom.feed(res.stdout)
    body = [a for t, a in dom.elements if t == "body"][0]
    assert body.get("data-rendered") == "2"                         # the script drew both runs
    assert [a["data-policy"] for a in dom.find("svg", "timeline")] == ["legacy", "series"]
    for k, d in enumerate(runs):
        rows = dom.table(k, "steps phases")
        assert [cells[1] for _, cells in rows] == [s["text"] for s in d["steps"]]
        hdrs = [a for a in dom.find("g", "hdr")]
        assert len(hdrs) == 2 * d["nsteps"]
        assert len(dom.find("g", "grp")) >= 2                      # range rows, not one lane a page
    png = tmp_path / "bench.png"
    res = _chromium(tmp_path, f"--screenshot={png}", "--window-size=1600,1100", page.resolve().as_uri())
    assert res.returncode == 0 and png.exists(), res.stderr[-2000:]
    _assert_not_blank(_pixels(png))


def test_folded_pieces_equal_the_whole_observation(monkeypatch):
    """Fold mode (lane sums per observation, read a piece of ``mem_map`` at a time) gives the same
    lanes as holding every observation whole and folding at the end, as ``run --html`` does."""
    import numpy as np

    from kvmsim.bench.dirty_log_perf import run_model
    from kvmsim.report import timeline as tl
    monkeypatch.setattr(tl, "PIECE_PFNS", 1000)              # many pieces, cut mid-lane
    folded, whole = tl.Timeline(fold=True), tl.Timeline()

    def on_phase(kvm, name, iteration, ended):
        if ended or name == "populate":
            folded.observe_vm(kvm, 0)
            whole.observe_vm(kvm, 0)
    run_model(Options(16 * MIB, floor=False), "series", on_phase=on_phase)
    lay = whole._layout(np.zeros(0, np.int64))
    expect = np.stack([whole._aggregate(s, lay) for s in whole.snaps])
    assert folded.layout.nlanes == lay.nlanes and folded.late_pages == 0
    assert np.array_equal(np.stack(folded.rows), expect)
    assert expect[-1, :, tl.STATE_FIELDS.index("present")].sum() == (16 * MIB) >> 12
