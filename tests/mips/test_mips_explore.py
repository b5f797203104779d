"""The explorer on MIPS: v6.12 marks pages accessed with no reference held, after ``spin_unlock()``
(``_kvm_mips_map_page_fast()``) or after its own put (``kvm_mips_map_page()``); a racing munmap frees
the page first.  v6.13 finds nothing (patches 70 "KVM: MIPS: Mark "struct page" pfns accessed only in
"slow" page fault path" and 71 "KVM: MIPS: Mark "struct page" pfns accessed prior to dropping mmu_lock")."""

import json

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.errors import UsageError
from kvmsim.explore import SCENARIOS, Mutations, explore


@pytest.mark.parametrize("name,caller,last", [
    ("mips-accessed-after-put", "kvm_mips_map_page", "kvm_mips_map_page: spin_unlock(mmu_lock)"),
    ("mips-fast-accessed-vs-munmap", "_kvm_mips_map_page_fast", "_kvm_mips_map_page_fast: spin_unlock(mmu_lock)")])
def test_legacy_marks_a_page_munmap_freed_and_the_series_does_not(name, caller, last):
    sc = SCENARIOS[name].on("mips")
    res = explore(sc, "legacy", Mutations(), bound=2)
    assert res.violating is not None
    v = res.violating.violation
    assert v.invariant == "INV-3" and v.detail == f"{caller}: mark_page_accessed on a freed page"
    labels = [s.label for s in res.violating.steps]
    assert last in labels and labels.index(last) < next(i for i, s in enumerate(res.violating.steps)
                                                        if s.thread == "host")
    assert explore(sc, "series", Mutations(), bound=2).violating is None


def test_mips_races_run_only_on_mips():
    with pytest.raises(UsageError, match="mips"):
        SCENARIOS["mips-accessed-after-put"].on("x86")


def test_cli_explore_arch_mips():
    r = CliRunner().invoke(cli, ["explore", "mips-accessed-after-put", "--arch", "mips", "--policy", "legacy",
                                 "--json"])
    assert r.exit_code == 0, r.output
    (out,) = json.loads(r.output)
    assert out["arch"] == "mips" and out["policy"] == "legacy"


@pytest.mark.parametrize("policy,names,absent", [
    ("legacy", ["kvm_mips_map_page", "set_pte", "kvm_release_pfn_clean", "mark_page_accessed on a freed page"],
     "kvm_release_faultin_page"),
    ("series", ["set_pte", "kvm_release_faultin_page"], "kvm_release_pfn_clean")])
def test_run_trace_shows_the_mips_fault_path(policy, names, absent):
    r = CliRunner().invoke(cli, ["run", "mips-accessed-after-put", "--policy", policy, "--trace"])
    assert r.exit_code == 0, r.output
    for n in names:
        assert n in r.output
    assert absent not in r.output


def test_cli_explore_defaults_to_the_races_own_arch():
    r = CliRunner().invoke(cli, ["explore", "mips-fast-accessed-vs-munmap", "--policy", "series", "--json"])
    assert r.exit_code == 0, r.output
    (out,) = json.loads(r.output)
    assert out["arch"] == "mips"
    r = CliRunner().invoke(cli, ["explore", "mips-fast-accessed-vs-munmap", "--arch", "arm64"])
    assert r.exit_code == 2 and "runs on mips" in r.output


def test_fault_vs_truncate_is_clean_on_mips_both_versions():
    """v6.12 MIPS dirtied under ``mmu_lock`` before ``set_pte()`` (after the retry check), v6.13 in
    ``kvm_release_faultin_page()`` under it: no truncate slips in before either."""
    sc = SCENARIOS["fault-vs-truncate"].on("mips")
    for policy in ("legacy", "series"):
        assert explore(sc, policy, Mutations(), bound=2).violating is None
