"""``kvmsim.patches``: the 85-patch table, the scenarios that demonstrate its patches, and the rule that
every behaviour-changing patch names a bundled scenario whose legacy and series outcomes differ."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.errors import ScenarioError
from kvmsim.patches import PATCHES, Kind, demonstrations, markdown, outcome_differences, patch, table
from kvmsim.scenarios import library, loader

ROOT = Path(__file__).resolve().parents[1]

#: Behaviour changes not yet demonstrated by a bundled scenario: none (every one must be).
PENDING: set[int] = set()


@pytest.fixture(scope="module")
def scenarios():
    return {sc.name: sc for sc in library()}


def test_table_has_the_85_patches_with_the_titles_of_series_patches_md():
    titles = dict(re.findall(r"^\| (\d+) \| (.*) \|$", (ROOT / "docs/series-patches.md").read_text(), re.M))
    assert len(PATCHES) == 85 and len(titles) == 85
    assert {p.number: p.title for p in PATCHES} == {int(n): t for n, t in titles.items()}
    kinds = {k: sorted(p.number for p in PATCHES if p.kind is k) for k in Kind}
    assert len(kinds[Kind.BEHAVIOUR]) == 42 and kinds[Kind.API] == [34, 35] and len(kinds[Kind.REFACTOR]) == 41
    assert patch(85).title == "KVM: Don't grab reference on VM_MIXEDMAP pfns that have a \"struct page\""
    with pytest.raises(KeyError):
        patch(86)


def test_every_behaviour_change_names_a_bundled_scenario(scenarios):
    demos = demonstrations(scenarios.values())
    missing = sorted(p.number for p in PATCHES if p.kind is Kind.BEHAVIOUR and not demos[p.number])
    assert missing == sorted(PENDING), (
        f"behaviour-changing patches without a bundled scenario: {sorted(set(missing) - PENDING)}; "
        f"PENDING patches that are now demonstrated (drop them from PENDING): {sorted(PENDING - set(missing))}")


def test_every_claimed_demonstration_differs_between_legacy_and_series(scenarios):
    demos = demonstrations(scenarios.values())
    claimed = sorted({n for names in demos.values() for n in names})
    assert len(claimed) >= 40
    same = [n for n in claimed if not outcome_differences(scenarios[n])]
    assert same == [], f"scenarios that claim a patch but run the same under legacy and series: {same}"


def test_outcome_differences_is_empty_for_a_scenario_that_runs_the_same(scenarios):
    # dmabuf-readonly-pte is the same in both protocols and claims no patch
    assert outcome_differences(scenarios["dmabuf-readonly-pte"]) == []
    assert scenarios["dmabuf-readonly-pte"].patches == ()
    assert any("INV-7" in d for d in outcome_differences(scenarios["fault-vs-invalidate-retry"]))


def test_docs_patches_md_is_current():
    assert (ROOT / "docs/patches.md").read_text() == markdown(), \
        "docs/patches.md is stale: run `python -m kvmsim patches --markdown > docs/patches.md`"


def test_cli_json_lists_85_rows_with_scenarios():
    res = CliRunner().invoke(cli, ["patches", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["number"] for r in rows] == list(range(1, 86))
    r48 = rows[47]
    assert r48["kind"] == "behaviour change" and "fault-vs-invalidate-retry" in r48["scenarios"]
    assert rows[0]["kind"] == "refactor" and rows[0]["scenarios"] == []
    res = CliRunner().invoke(cli, ["patches", "--json", "--kind", "api"])
    assert [r["number"] for r in json.loads(res.output)] == [34, 35]


def test_cli_check_exits_1_while_behaviour_changes_lack_a_demonstration():
    rows = table()
    missing = [r["number"] for r in rows if r["kind"] == "behaviour change" and not r["scenarios"]]
    res = CliRunner().invoke(cli, ["patches", "--kind", "api", "--check"])
    assert res.exit_code == (1 if missing else 0), res.output


@pytest.mark.parametrize("value, message", [
    ("[86]", "expected patch numbers 1..85"),
    ("[0]", "expected patch numbers 1..85"),
    ('["41"]', "expected a list of patch numbers"),
    ("[41, 41]", "a patch is listed twice"),
    ("[true]", "expected a list of patch numbers"),
])
def test_loader_refuses_bad_patches_key_with_file_and_line(value, message):
    text = f'name = "x"\ndescription = "d"\npatches = {value}\n'
    with pytest.raises(ScenarioError) as ei:
        loader.loads(text, file="t.toml")
    assert message in str(ei.value) and ei.value.line == 3 and "t.toml" in str(ei.value)


def test_loader_reads_patches_key():
    assert loader.loads('name = "x"\npatches = [41, 48]\n').patches == (41, 48)
    assert loader.loads('name = "x"\npatches = 14\n').patches == (14,)
    assert loader.loads('name = "x"\n').patches == ()


def test_show_names_the_patches_a_scenario_demonstrates():
    res = CliRunner().invoke(cli, ["show", "fault-fatal-signal-during-gup"])
    assert res.exit_code == 0
    assert 'patch: 14 "KVM: Return ERR_SIGPENDING from hva_to_pfn() if GUP returns -EGAIN"' in res.output
