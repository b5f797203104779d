"""The scenario keys of arm64 blocks and MTE: ``[vm] mte``, ``mte_copy_tags``, ``mremap to =``, and the
bundled scenarios of patches 55/56 (THP block), 77 (MTE) and the RISC-V block under dirty logging."""

from __future__ import annotations

import pytest

from kvmsim.errors import ScenarioError
from kvmsim.scenarios.loader import loads
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.runner import run

BASE = '''
name = "t"
[[vma]]
name = "ram"
kind = "anon"
size = "8K"
[vm]
policy = "both"
arch = "{arch}"
mte = {mte}
[[memslot]]
id = 0
gpa = 0
size = "8K"
vma = "ram"
'''


def test_mte_needs_arm64():
    with pytest.raises(ScenarioError, match=r"\[vm.mte\].*needs arch = \"arm64\""):
        loads(BASE.format(arch="x86", mte="true"), "t.toml")


def test_mremap_to_names_a_vma():
    text = BASE.format(arch="arm64", mte="false") + '[[step]]\nop = "mremap"\nvma = "ram"\nto = "nope"\n'
    with pytest.raises(ScenarioError, match=r"t.toml:\d+: \[step#1.to\] no \[\[vma\]\] named 'nope'"):
        loads(text, "t.toml")


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_mte_copy_tags_round_trip_through_the_runner(policy):
    text = BASE.format(arch="arm64", mte="true") + '''
[[step]]
op = "write"
gpa = 0
count = 2
[[step]]
op = "mte_copy_tags"
gpa = 0
size = "8K"
tag = 6
[[step]]
op = "mte_copy_tags"
gpa = 0
size = "8K"
direction = "from_guest"
'''
    r = run(loads(text, "t.toml"), policy)
    assert [s.res.value for s in r.steps[1:]] == [8192, [6, 6]]


def test_mte_copy_tags_without_mte_is_einval():
    text = BASE.format(arch="arm64", mte="false") + '[[step]]\nop = "mte_copy_tags"\ngpa = 0\n'
    r = run(loads(text, "t.toml"), "series")
    assert r.steps[0].res.errno_name == "EINVAL"


@pytest.mark.parametrize("name", ["arm64-thp-block-release", "arm64-mte-copy-tags-pfnmap",
                                  "riscv-hugetlb-block-dirty-log"])
def test_bundled_block_and_mte_scenarios_match_and_differ_between_policies(name):
    sc = load_scenario(name)
    runs = {p: run(sc, p) for p in ("legacy", "series")}
    assert all(r.expected_match for r in runs.values())
    assert runs["legacy"].verdict == "violations" and runs["series"].verdict == "clean"
