"""The explorer on LoongArch: v6.12 ``kvm_map_page_fast()`` dirties the folio after ``spin_unlock()``
(holding a transient ``get_page()``), so a truncate in that window leaves it dirtying a folio the page
cache dropped; v6.13 marks only the dirty log (patch 65 "KVM: LoongArch: Mark "struct page" pfns dirty
only in "slow" page fault path")."""

import json

from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.explore import SCENARIOS, Mutations, explore


def test_legacy_fast_path_dirties_the_truncated_folio():
    sc = SCENARIOS["loongarch-fast-dirty-vs-truncate"].on("loongarch")
    res = explore(sc, "legacy", Mutations(), bound=2)
    assert res.violating is not None
    v = res.violating.violation
    assert v.invariant == "INV-3" and "after its mapping was truncated" in v.detail
    labels = [s.label for s in res.violating.steps]
    assert "kvm_map_page_fast: spin_unlock(mmu_lock)" in labels
    assert not any(lb.startswith("kvm_map_page:") for lb in labels)      # the fast path, not the slow one
    assert any("removed from the page cache" in lb for lb in labels)


def test_series_fast_path_is_clean():
    sc = SCENARIOS["loongarch-fast-dirty-vs-truncate"].on("loongarch")
    assert explore(sc, "series", Mutations(), bound=2).violating is None


def test_cli_explore_arch_loongarch():
    r = CliRunner().invoke(cli, ["explore", "loongarch-fast-dirty-vs-truncate", "--arch", "loongarch", "--json"])
    assert r.exit_code == 0, r.output
    assert {(o["arch"], o["policy"]) for o in json.loads(r.output)} >= {("loongarch", "series")}


def test_run_trace_shows_the_loongarch_fault_paths():
    r = CliRunner().invoke(cli, ["run", "loongarch-fast-path-dirty", "--policy", "legacy", "--trace"])
    assert r.exit_code == 0, r.output
    for n in ("kvm_set_pte", "kvm_release_pfn_clean", "get pfn", "by kvm_map_page_fast"):
        assert n in r.output
    r = CliRunner().invoke(cli, ["run", "loongarch-fast-path-dirty", "--policy", "series", "--trace"])
    assert r.exit_code == 0, r.output
    assert "kvm_release_faultin_page" in r.output and "kvm_map_page_fast+1" in r.output   # the fast path ran
    assert "by kvm_map_page_fast" not in r.output                                         # and touched no page


def test_fault_vs_truncate_finds_the_v612_slow_path_dirty_after_unlock():
    """v6.12 ``kvm_map_page()``: ``spin_unlock(); ... kvm_set_pfn_dirty(pfn);`` (patch 65 moved it under
    the lock); the common race finds it on LoongArch under legacy only."""
    sc = SCENARIOS["fault-vs-truncate"].on("loongarch")
    res = explore(sc, "legacy", Mutations(), bound=2)
    assert res.violating is not None and "after its mapping was truncated" in res.violating.violation.detail
    assert "kvm_map_page: spin_unlock(mmu_lock)" in [s.label for s in res.violating.steps]
    assert explore(sc, "series", Mutations(), bound=2).violating is None
