"""Every bundled scenario's stated outcome holds, policy by policy."""

import pytest

from kvmsim.scenarios import library_names, load_scenario
from kvmsim.scenarios.runner import missing_requirement, run

CASES = [(name, policy) for name in library_names() for policy in load_scenario(name).policies]


def test_library_is_complete():
    want = {"ttm-noncompound-pfnmap", "driver-refcounted-pfnmap", "cve-2021-22543", "vcpu-map-pfnmap",
            "hugetlb-1g-disable-dirty-log", "access-tracking-after-zap", "dmabuf-readonly-pte",
            "mmu-stress-readonly-vma", "slot-delete-drops-references", "fault-vs-invalidate-retry",
            "dirty-after-writeback", "pfncache-pfnmap-readonly-pte"}
    assert want <= set(library_names())
    for name in library_names():
        sc = load_scenario(name)
        assert sc.description and sc.source, name
        assert {"legacy", "series"} <= set(sc.expect), f"{name} must state legacy and series outcomes"


@pytest.mark.parametrize("name,policy", CASES, ids=[f"{n}[{p}]" for n, p in CASES])
def test_stated_outcome_holds(name, policy):
    sc = load_scenario(name)
    why = missing_requirement(sc)
    if why:
        pytest.skip(f"{name}: {why}")
    rr = run(sc, policy)
    assert rr.error is None
    assert rr.expected_match, "\n".join(rr.mismatches)


def _run(name, policy):
    return run(load_scenario(name), policy)


def test_ttm_series_maps_every_page_without_refcounts_legacy_faults_on_tails():
    legacy, series = _run("ttm-noncompound-pfnmap", "legacy"), _run("ttm-noncompound-pfnmap", "series")
    assert legacy.steps[0].res.per_page == ["ok", "efault", "efault", "efault"]
    assert series.steps[0].res.per_page == ["ok"] * 4
    assert series.counters.get("kvm_get", 0) == series.counters.get("kvm_put", 0) == 0


def test_cve_2021_22543_three_policies():
    pre, legacy, series = (_run("cve-2021-22543", p) for p in ("pre-5.13", "legacy", "series"))
    assert pre.steps[0].res.result == "ok" and "INV-1" in pre.by_invariant()
    assert legacy.steps[0].res.result == "efault"
    assert series.steps[0].res.result == "ok" and series.verdict == "clean"


def test_dirty_after_writeback_loses_data_only_under_legacy():
    legacy, series = _run("dirty-after-writeback", "legacy"), _run("dirty-after-writeback", "series")
    assert legacy.steps[-1].res.value == 0
    assert series.steps[-1].res.value == 0xD1
