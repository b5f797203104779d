"""The bundled PPC e500 scenarios and the ``tlbwe`` op: one scenario, three outcomes (v6.12, v6.13-rc1,
v6.13), and clear errors for bad input."""

from __future__ import annotations

import pytest

from kvmsim.errors import ScenarioError
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.loader import loads
from kvmsim.scenarios.runner import run

E500 = ["ppc-e500-boot-rc1-regression", "ppc-e500-accessed-twice", "ppc-e500-release-after-unlock",
        "ppc-e500-tlb1-pfnmap"]


@pytest.mark.parametrize("name", E500)
def test_bundled_e500_scenarios_match_every_stated_outcome(name):
    sc = load_scenario(name)
    assert sc.vm.arch == "ppc-e500" and "legacy" in sc.policies and "series" in sc.policies
    for policy in sc.policies:
        r = run(sc, policy)
        assert r.expected_match, (policy, r.mismatches)


def test_the_boot_scenario_is_three_outcomes():
    """v6.12 boots (marking twice), v6.13-rc1 does not (every map -EINVAL, the guest livelocks), v6.13 boots."""
    sc = load_scenario("ppc-e500-boot-rc1-regression")
    assert sc.policies == ("legacy", "series-rc1", "series")
    res = {p: run(sc, p) for p in sc.policies}
    first = {p: (r.steps[0].res.result, r.steps[0].res.errno_name) for p, r in res.items()}
    assert first == {"legacy": ("ok", None), "series-rc1": ("error", "EINVAL"), "series": ("ok", None)}
    assert [s.res.result for s in res["series-rc1"].steps[2:]] == ["livelock"] * 3
    assert res["legacy"].counters["mark_accessed:kvm_release_pfn_clean"] == 6
    assert res["series"].counters["mark_accessed:kvm_release_faultin_page"] == 6
    assert res["series-rc1"].counters["WARN_ON:__kvm_faultin_pfn"] >= 6


_BASE = """
name = "t"
description = "t"
source = "t"
[[vma]]
name = "ram"
kind = "anon"
size = "16K"
[vm]
policy = "series"
arch = "{arch}"
[[memslot]]
id = 0
gpa = 0
size = "16K"
vma = "ram"
[[step]]
op = "tlbwe"
{step}
[expect.series]
verdict = "clean"
"""


@pytest.mark.parametrize("step,match", [('tlb = 2\ngpa = 0', "tlb"), ('tlb = 0\ngpa = 0\nmas3 = ["RW"]', "MAS3"),
                                        ('tlb = 0', "gpa")])
def test_bad_tlbwe_steps_are_scenario_errors(step, match):
    with pytest.raises(ScenarioError, match=match):
        loads(_BASE.format(arch="ppc-e500", step=step))


@pytest.mark.parametrize("arch,step,why", [("x86", "tlb = 0\ngpa = 0", "ppc-e500"),
                                           ("ppc-e500", 'tlb = 1\ngpa = 0\nsize = "12K"', "power of two"),
                                           ("ppc-e500", "tlb = 0\nesel = 600\ngpa = 0", "TLB0")])
def test_tlbwe_refused_at_run_time_says_why(arch, step, why):
    r = run(loads(_BASE.format(arch=arch, step=step)), "series")
    assert r.steps[0].res.result == "error" and why in str(r.steps[0].res.value)
