"""Partial-order reduction (kvmsim.explore.por, kvmsim.explore.dpor) and the subtree interface.

The agreement test runs every bundled race under every policy and mutation twice, plain DFS and
DPOR, each to the end (not stopping at the first violation), and compares the sets of watched
invariants they find: DPOR explores a subset of the plain DFS's schedules, so equal sets mean it
misses nothing the plain search finds.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest
from click.testing import CliRunner

from kvmsim.explore import (MUTATIONS, SCENARIOS, FrontierItem, Mutations, Reduction, execute, explore, frontier,
                            search_subtree)
from kvmsim.explore.engine import dfs
from kvmsim.explore.por import EVERYTHING, Footprint, independent

POLICIES = ("legacy", "series")
MUTATION_SETS = ((),) + tuple((m,) for m in MUTATIONS)


def _threads(name: str) -> int:
    return len(SCENARIOS[name].build("series", Mutations()).threads)


def _bound(name: str) -> int:
    """Bound 2 for two threads, 1 for three or four (the plain DFS of a 4-thread race at bound 2 is
    11,288 schedules: the benchmark's job, not a unit test's)."""
    return 2 if _threads(name) <= 2 else 1


def _found(name, policy, muts, bound, reduction) -> tuple[set[str], int]:
    invs, n = set(), 0
    for run in dfs(SCENARIOS[name], policy, Mutations.parse(muts), bound, reduction=reduction):
        n += 1
        if run.violation is not None:
            invs.add(run.violation.invariant)
    return invs, n


COMBOS = [pytest.param(name, policy, muts, id=f"{name}-{policy}-{'+'.join(muts) or 'none'}")
          for name in SCENARIOS for policy in POLICIES for muts in MUTATION_SETS]


@pytest.mark.parametrize("name,policy,muts", COMBOS)
def test_dpor_finds_every_invariant_plain_dfs_finds(name, policy, muts):
    bound = _bound(name)
    plain, n_plain = _found(name, policy, muts, bound, "none")
    reduced, n_reduced = _found(name, policy, muts, bound, "dpor")
    assert reduced == plain
    assert n_reduced <= n_plain


def test_agreement_covers_violating_and_clean_combinations():
    """The agreement above is not vacuous: some combinations violate, some are clean."""
    some = [("fault-vs-munmap", "series", ("skip-retry",)), ("fault-vs-munmap", "series", ()),
            ("lost-dirty-bit", "legacy", ("nonatomic-spte",))]
    found = {c: _found(*c, 2, "dpor")[0] for c in some}
    assert found[some[0]] == {"INV-5"}
    assert found[some[1]] == set()
    assert found[some[2]] == {"INV-4"}


@pytest.mark.slow
@pytest.mark.parametrize("name,bound", [("fault-munmap-dirtylog", 4)])
def test_dpor_cuts_three_thread_races_tenfold(name, bound):
    """Counts, not times (the benchmark, benchmarks/test_explorer.py, records both)."""
    plain = explore(SCENARIOS[name], "series", Mutations(), bound=bound, reduction="none")
    reduced = explore(SCENARIOS[name], "series", Mutations(), bound=bound, reduction="dpor")
    assert plain.complete and reduced.complete
    assert plain.violating is None and reduced.violating is None
    assert reduced.explored * 10 <= plain.explored


# ---- footprints -----------------------------------------------------------------------------------

def _steps(name="fault-vs-munmap", policy="series", schedule=()):
    run = execute(SCENARIOS[name], policy, Mutations(), list(schedule), footprints=True)
    assert len(run.footprints) == len(run.steps)
    return run


def test_lock_acquisitions_of_different_threads_conflict():
    run = _steps()
    acq = [fp for s, fp in zip(run.steps, run.footprints) if s.label == "write_lock(mmu_lock) acquired"]
    threads = {s.thread for s in run.steps if s.label == "write_lock(mmu_lock) acquired"}
    assert threads == {"vcpu0", "host"}
    assert not independent(acq[0], acq[-1])


def test_in_place_spte_update_is_a_write():
    """The zap clears the SPTE in a numpy array (no attribute assigned): still a recorded write, and
    it conflicts with the fault's install."""
    run = _steps()
    by_label = {s.label: fp for s, fp in zip(run.steps, run.footprints)}
    zap = next(fp for lb, fp in by_label.items() if lb.startswith("kvm_mmu_notifier_invalidate_range_start"))
    install = next(fp for s, fp in zip(run.steps, run.footprints) if s.thread == "vcpu0" and fp.writes
                   and any(a == "arch" for _, a in fp.writes))
    assert any(a == "arch" for _, a in zap.writes)
    assert not independent(zap, install)


def test_some_steps_of_different_threads_commute():
    """The mmu_seq snapshot only reads; the host's steps that touch only its page tables commute with it."""
    run = _steps("fault-vs-writeback")
    snap = next(fp for s, fp in zip(run.steps, run.footprints) if s.label.endswith("mmu_seq snapshot"))
    assert not snap.writes
    host = [fp for s, fp in zip(run.steps, run.footprints) if s.thread == "host"]
    assert any(independent(snap, fp) for fp in host)
    assert not all(independent(snap, fp) for fp in host)      # the sequence bump does not commute


def test_a_store_through_a_reference_kept_across_a_yield_is_a_write():
    """The non-atomic zap reads the SPTE arrays in one step and clears them in the next through the
    local it kept: no attribute access, still a write of that step, conflicting with the guest's store."""
    run = execute(SCENARIOS["lost-dirty-bit"], "legacy", Mutations(nonatomic_spte=True), ["zap", "vcpu0"],
                  footprints=True)
    fp = dict((s.label, f) for s, f in zip(run.steps, run.footprints))
    cleared = fp["kvm_zap_gfn_range: SPTE cleared"]
    store = next(f for s, f in zip(run.steps, run.footprints) if s.label.startswith("guest: store"))
    assert any(a == "arch" for _, a in cleared.writes)
    assert not independent(cleared, store)


def test_a_thread_blocked_on_a_held_lock_does_not_race_inside_the_critical_section():
    from kvmsim.explore.dpor import _races, _would_block
    run = _steps()                                           # vcpu0's fault to the end, then munmap
    host_acq = next(k for k, s in enumerate(run.steps) if s.thread == "host" and s.label.endswith("acquired"))
    held = [j for j, h in enumerate(run.holders) if "vcpu0" in [w for w, _ in h.values()]]
    free = [j for j in range(host_acq) if j not in held and run.steps[j].thread == "vcpu0"]
    assert held and free
    assert all(_would_block(run, j, host_acq) for j in held)
    assert not any(_would_block(run, j, host_acq) for j in free)
    assert any(k == host_acq for _, k in _races(run))


def test_unknown_footprint_conflicts_with_everything():
    assert not independent(EVERYTHING, Footprint())
    assert independent(Footprint(), Footprint())
    a = Footprint(frozenset({(("w", 1), "x")}), frozenset())
    b = Footprint(frozenset(), frozenset({(("w", 1), "x")}))
    assert not independent(a, b) and independent(a, a)


def test_footprints_are_the_same_in_every_execution():
    a, b = _steps(schedule=["host", "vcpu0"]), _steps(schedule=["host", "vcpu0"])
    assert a.footprints == b.footprints


# ---- the subtree interface (distribution) ------------------------------------------------------------

def test_frontier_subtrees_add_up_to_the_plain_search():
    sc = SCENARIOS["fault-vs-writeback"]
    items = frontier(sc, "series", Mutations(), 2, "none", count=8)
    assert len(items) >= 8
    items = pickle.loads(pickle.dumps(items))                # the unit a worker receives
    union = Counter(tuple(r.schedule) for it in items
                    for r in search_subtree(sc, "series", Mutations(), it, 2, "none"))
    single = Counter(tuple(r.schedule) for r in dfs(sc, "series", Mutations(), 2))
    assert union == single
    assert max(union.values()) == 1


@pytest.mark.parametrize("muts,expect", [((), set()), (("skip-retry",), {"INV-5"})])
def test_frontier_subtrees_under_dpor_find_the_same_violations(muts, expect):
    sc, m = SCENARIOS["fault-munmap-dirtylog"], Mutations.parse(muts)
    items = frontier(sc, "series", m, 1, "dpor", count=6)
    found, n = set(), 0
    for it in items:
        for r in search_subtree(sc, "series", m, it, 1, "dpor"):
            n += 1
            if r.violation is not None:
                found.add(r.violation.invariant)
    single, n_single = _found("fault-munmap-dirtylog", "series", muts, 1, "dpor")
    assert found == single == expect
    assert n >= n_single


def test_the_root_item_is_the_whole_search():
    sc = SCENARIOS["fault-vs-munmap"]
    assert frontier(sc, "series", Mutations(), 2, "dpor", count=1) == [FrontierItem()]


def test_unknown_reduction_is_a_usage_error():
    from kvmsim.errors import UsageError
    with pytest.raises(UsageError, match="unknown reduction 'fast'"):
        explore(SCENARIOS["fault-vs-munmap"], "series", Mutations(), reduction="fast")
    assert Reduction("dpor") is Reduction.DPOR


# ---- the 3- and 4-thread races ---------------------------------------------------------------------

@pytest.mark.parametrize("name,bound", [("fault-munmap-dirtylog", 2), ("fault-munmap-dirtylog-aging", 1)])
def test_dirty_log_races_legacy_ages_from_the_spte_series_is_clean(name, bound):
    """v6.12 pushes Accessed to the folio from the SPTE the munmap's zap removes (INV-12; patch 82
    "KVM: x86/mmu: Don't mark "struct page" accessed when zapping SPTEs" removed it); v6.13 is clean
    under every interleaving of the fault, the munmap, the harvest (and the aging)."""
    legacy = explore(SCENARIOS[name], "legacy", Mutations(), bound=bound, reduction="dpor")
    assert legacy.violating is not None and legacy.violating.violation.invariant == "INV-12"
    series = explore(SCENARIOS[name], "series", Mutations(), bound=bound, reduction="dpor")
    assert series.violating is None and series.complete


def test_dirty_log_race_without_the_retry_check_maps_a_freed_page():
    res = explore(SCENARIOS["fault-munmap-dirtylog"], "series", Mutations(skip_retry=True), bound=2, reduction="dpor")
    assert res.violating is not None and res.violating.violation.invariant == "INV-5"
    assert {"vcpu0", "host"} <= {s.thread for s in res.violating.steps}


def test_pfncache_and_vcpu_map_race_legacy_maps_without_a_pin():
    """v6.12 ``kvm_vcpu_map()`` takes FOLL_GET: the map outlives the munmap unpinned (INV-6; patch 31
    and 35); v6.13 pins, and every interleaving with the pfncache refresh is clean."""
    legacy = explore(SCENARIOS["pfncache-invalidate-vcpu-map"], "legacy", Mutations(), bound=2, reduction="dpor")
    assert legacy.violating is not None and legacy.violating.violation.invariant == "INV-6"
    assert "map" in {s.thread for s in legacy.violating.steps}
    series = explore(SCENARIOS["pfncache-invalidate-vcpu-map"], "series", Mutations(), bound=2, reduction="dpor")
    assert series.violating is None and series.complete


def test_new_races_have_three_and_four_threads():
    assert _threads("fault-munmap-dirtylog") == 3
    assert _threads("pfncache-invalidate-vcpu-map") == 3
    assert _threads("fault-munmap-dirtylog-aging") == 4


# ---- CLI ---------------------------------------------------------------------------------------------

def test_cli_reduction_flag_reports_fewer_schedules_same_verdict():
    from kvmsim.cli import cli
    out = {}
    for red in ("none", "dpor"):
        r = CliRunner().invoke(cli, ["explore", "fault-munmap-dirtylog", "--policy", "series", "--bound", "2",
                                     "--reduction", red, "--json"])
        assert r.exit_code == 0, r.output
        (res,) = json.loads(r.output)
        assert res["reduction"] == red and res["complete"] and res["violation"] is None
        out[red] = res["explored"]
    assert out["dpor"] < out["none"]
    bad = CliRunner().invoke(cli, ["explore", "fault-vs-munmap", "--reduction", "fast"])
    assert bad.exit_code == 2 and "fast" in bad.output
