"""The HTML timeline's data and page (``kvmsim run --html``, ``compare --html``) without a browser.

The timeline reads the model; these tests compare it with what the scenario's story says the model
did (a page dirtied or not, an SPTE present or zapped, a page freed) and with the run's own result
(steps, violations per step), so a wrong column or a lost violation fails.  tests/test_html_browser.py
loads the pages in headless Chromium.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.report import render_html, run_with_timeline, write_html
from kvmsim.report import timeline as tl
from kvmsim.scenarios import load_scenario


def _state(d: dict, lane: int, t: int) -> dict:
    """The state of ``lane`` at observation ``t``, by field name (undoing the delta encoding)."""
    row = None
    for r in d["lanes"][lane]["s"]:
        if r[0] <= t:
            row = r
    return dict(zip(d["fields"], row[1:]))


@pytest.fixture(scope="module")
def dirty_after_writeback():
    sc = load_scenario("dirty-after-writeback")
    return sc, {p: run_with_timeline(sc, p) for p in ("legacy", "series")}


def test_timeline_steps_and_violations_are_the_runs(dirty_after_writeback):
    _, runs = dirty_after_writeback
    for policy, (rr, d) in runs.items():
        assert d["policy"] == policy and d["verdict"] == rr.verdict
        assert d["nsteps"] == len(rr.steps) + 1                      # set-up, then each step
        assert [(s["i"], s["text"], s["result"]) for s in d["steps"]] == \
            [(s.index, s.text, s.res.result) for s in rr.steps]
        assert d["by_invariant"] == rr.by_invariant()
        assert [s["violations"] for s in d["steps"]] == \
            [{k: v for k, v in _count(s.violations).items()} for s in rr.steps]
        # every violation naming a page is drawn in that page's lane at its step
        cells = {(t, lane) for t, lane, _ in d["viol_cells"]}
        for v in d["violations"]:
            if v["pfn"] is not None:
                assert (v["step"], v["lane"]) in cells
    assert runs["legacy"][0].verdict == "violations" and runs["series"][0].verdict == "clean"


def _count(vs) -> dict:
    out: dict = {}
    for v in sorted(vs, key=lambda v: int(v.invariant.split("-")[1])):
        out[v.invariant] = out.get(v.invariant, 0) + 1
    return out


def test_lanes_show_the_story_of_dirty_after_writeback(dirty_after_writeback):
    """Legacy never dirties the folio (the D bit is lost in the zap race); the series dirties it when
    the fault creates the Host-writable SPTE (patch 8).  Both zap the SPTE in step 3; reclaim frees
    the page in step 6."""
    _, runs = dirty_after_writeback
    for policy, (rr, d) in runs.items():
        assert len(d["lanes"]) == 1 and d["lanes"][0]["n"] == 1
        after_fault, after_zap, after_reclaim = _state(d, 0, 2), _state(d, 0, 3), _state(d, 0, 6)
        assert after_fault["present"] == 1 and after_fault["level"] == 1
        assert after_zap["present"] == 0
        assert after_reclaim["freed"] == 1
        assert _state(d, 0, 0)["freed"] == 0
        dirtied = [t for t in range(d["nsteps"]) if _state(d, 0, t)["dirty"]]
        if policy == "legacy":
            assert dirtied == []
        else:
            assert dirtied[0] == 2
        # the facts listed are the step's facts, with caller and mmu_lock as recorded
        for s, sr in zip(d["steps"], rr.steps):
            assert [(o[0], o[3], o[5]) for o in s["ops"]] == [(f.kind.value, f.caller, f.locked) for f in sr.facts]


def test_page_has_what_the_run_produced(dirty_after_writeback):
    sc, runs = dirty_after_writeback
    page = render_html(sc, [d for _, d in runs.values()])
    for policy, (rr, _) in runs.items():
        assert f'data-policy="{policy}"' in page
        for s in rr.steps:
            assert f'<tr data-step="{s.index}"' in page
        for v in rr.violations:
            assert f'data-inv="{v.invariant}" data-step="{v.step}"' in page
    # KVM's A/D marks outside mmu_lock (legacy kvm_release_pfn_clean, INV-3) are flagged in the table
    legacy_marks = [f for s in runs["legacy"][0].steps for f in s.facts
                    if f.kvm and f.kind in ("set_dirty", "mark_accessed") and not f.locked]
    assert legacy_marks
    assert page.count('class="lock-no"') == len(legacy_marks)


def test_text_from_a_scenario_file_cannot_break_out(tmp_path):
    import kvmsim.scenarios
    src = (Path(kvmsim.scenarios.__file__).parent / "library" / "dirty-after-writeback.toml").read_text()
    evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"
    src = re.sub(r'description = """.*?"""', f'description = """{evil}"""', src, flags=re.S)
    f = tmp_path / "evil.toml"
    f.write_text(src)
    sc = load_scenario(str(f))
    rr, d = run_with_timeline(sc, "series")
    page = render_html(sc, [d])
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page
    assert page.count("<script") == 2                                  # the data block and ours


def _generated(tmp_path: Path, size_mib: int) -> Path:
    """A scenario over ``size_mib`` of 4 KiB anonymous pages: written, logged, written, harvested."""
    n = size_mib * 256
    f = tmp_path / f"gen-{size_mib}m.toml"
    f.write_text(f'''name = "generated-{size_mib}m"
description = "generated: {n} pages written, logged, written again, harvested"
[[vma]]
name = "ram"
kind = "anon"
size = "{size_mib}M"
[vm]
policy = "series"
arch = "x86"
[[memslot]]
id = 0
gpa = "4G"
size = "{size_mib}M"
vma = "ram"
[[step]]
op = "write"
gpa = "4G"
count = {n}
[[step]]
op = "memslot_flags"
id = 0
flags = ["log_dirty_pages"]
[[step]]
op = "write"
gpa = "4G"
count = {n}
value = 2
[[step]]
op = "get_dirty_log"
slot = 0
''')
    return f


def test_size_is_bounded_by_lanes_not_pages(tmp_path, monkeypatch):
    """Past MAX_LANES pages a lane is a range; listed operations stop at MAX_OPS_PER_STEP a step.
    Four times the pages must not make a noticeably larger file."""
    monkeypatch.setattr(tl, "MAX_LANES", 64)
    monkeypatch.setattr(tl, "MAX_OPS_PER_STEP", 20)
    sizes, datas = {}, {}
    for mib in (2, 8):
        sc = load_scenario(str(_generated(tmp_path, mib)))
        rr, d = run_with_timeline(sc, "series")
        assert rr.verdict == "clean"
        datas[mib] = (rr, d)
        sizes[mib] = write_html(tmp_path / f"{mib}.html", sc, [d])
    for mib, (rr, d) in datas.items():
        pages = mib * 256
        assert d["pages"] >= pages and len(d["lanes"]) <= 64
        assert sum(lane["n"] for lane in d["lanes"]) == d["pages"]
        # every page's SPTE is counted in its range after the first write
        assert sum(_state(d, i, 1)["present"] for i in range(len(d["lanes"]))) == pages
        for s, sr in zip(d["steps"], rr.steps):
            assert len(s["ops"]) == min(20, len(sr.facts))
            assert sum(g[-1] for g in s["groups"]) == len(sr.facts) == s["nfacts"]
        assert sum(n for t, _, n in d["ops_cells"] if t == 1) == \
            sum(1 for f in rr.steps[0].facts if f.pfn is not None and f.pfn > 0)
    assert datas[8][1]["nsteps"] == 5
    assert sizes[8] < 1.25 * sizes[2], sizes


def test_run_html_option(tmp_path):
    out = tmp_path / "t.html"
    res = CliRunner().invoke(cli, ["run", "dirty-after-writeback", "--html", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-policy="legacy"' in page and 'data-policy="series"' in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")         # nothing fetched
    assert "https://" not in page and "src=" not in page
    one = tmp_path / "one.html"
    res = CliRunner().invoke(cli, ["run", "dirty-after-writeback", "--policy", "series", "--html", str(one)])
    assert res.exit_code == 0 and 'data-policy="legacy"' not in one.read_text()


def test_run_html_unwritable_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(cli, ["run", "dirty-after-writeback", "--html", str(tmp_path / "no" / "such" / "x.html")])
    assert res.exit_code == 2
    assert "cannot write" in res.output and "Traceback" not in res.output


def test_compare_html_writes_one_page_per_scenario(tmp_path):
    from kvmsim.cli import _write_html_dir
    pairs, datas = [], []
    for name in ("dirty-after-writeback", "s390-vsie-unpin-release"):
        sc = load_scenario(name)
        for p in sc.policies:
            pairs.append((sc, p))
            datas.append(run_with_timeline(sc, p)[1])
    _write_html_dir(str(tmp_path / "out"), pairs, datas)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["dirty-after-writeback.html", "index.html", "s390-vsie-unpin-release.html"]
    page = (tmp_path / "out" / "dirty-after-writeback.html").read_text()
    assert 'data-policy="legacy"' in page and 'data-policy="series"' in page
    assert 'href="dirty-after-writeback.html"' in (tmp_path / "out" / "index.html").read_text()


def test_a_run_whose_set_up_fails_is_a_page_with_the_error(tmp_path):
    """Two memslots over the same gfns: KVM_SET_USER_MEMORY_REGION fails with EEXIST, so the run has
    no steps and no observations; the page says why instead of drawing lanes."""
    import kvmsim.scenarios
    src = (Path(kvmsim.scenarios.__file__).parent / "library" / "dirty-after-writeback.toml").read_text()
    i, j = src.index("[[memslot]]"), src.index("[[step]]")
    f = tmp_path / "overlap.toml"
    f.write_text(src[:j] + src[i:j].replace("id = 0", "id = 1") + src[j:])
    sc = load_scenario(str(f))
    rr, d = run_with_timeline(sc, "series")
    assert rr.verdict == "error" and "EEXIST" in rr.error
    assert d["lanes"] == [] and d["steps"] == [] and d["nsteps"] == 0
    page = render_html(sc, [d])
    assert "set-up failed" in page and "EEXIST" in page


def test_state_that_cannot_be_read_is_said_not_a_traceback(dirty_after_writeback, monkeypatch):
    """A failing read of the model (here: the stage-2 leaves after the fault step) repeats the previous
    column and is named on the page."""
    sc, _ = dirty_after_writeback
    real = tl._leaf_pieces
    calls = []

    def leaves(kvm):
        calls.append(1)
        if len(calls) == 3:                                  # after step 2 (set-up is call 1)
            raise RuntimeError("leaf table in a state the reader does not know")
        return real(kvm)
    monkeypatch.setattr(tl, "_leaf_pieces", leaves)
    rr, d = run_with_timeline(sc, "series")
    assert rr.verdict == "clean" and d["nsteps"] == len(rr.steps) + 1
    assert _state(d, 0, 2) == _state(d, 0, 1)                # repeated, not made up
    assert _state(d, 0, 3)["freed"] == 0 and len(d["notes"]) == 1 and "after step 2" in d["notes"][0]
    assert "timeline: state after step 2 could not be read" in render_html(sc, [d])
