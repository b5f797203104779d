"""kvmsim.explore: each mutation re-opens its race, and only then; replay and seeds are deterministic."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvmsim.explore import SCENARIOS, Mutations, execute, explore, format_schedule, parse_schedule

POLICIES = ("legacy", "series")


def run(name, policy, *muts, **kw):
    return explore(SCENARIOS[name], policy, Mutations.parse(muts), **kw)


@pytest.mark.parametrize("policy", POLICIES)
def test_skip_retry_leaves_stale_spte_after_munmap(policy):
    res = run("fault-vs-munmap", policy, "skip-retry", bound=2)
    assert res.violating is not None
    assert res.violating.violation.invariant == "INV-5"
    assert "SPTE" in res.violating.violation.detail


@pytest.mark.parametrize("policy", POLICIES)
def test_retry_recheck_closes_the_munmap_race(policy):
    res = run("fault-vs-munmap", policy, bound=3)
    assert res.violating is None
    assert res.explored > 40                       # really exhaustive, not one schedule
    assert res.rate > 0                            # throughput is measured (not asserted against time)


def test_lost_dirty_bit_loses_data_under_legacy_only():
    legacy = run("lost-dirty-bit", "legacy", "nonatomic-spte", bound=2)
    assert legacy.violating is not None
    v = legacy.violating.violation
    assert v.invariant == "INV-4" and v.objects["caller"] == "shrink_folio_list"
    labels = [s.label for s in legacy.violating.steps]
    assert any("old_spte read" in lb for lb in labels)
    series = run("lost-dirty-bit", "series", "nonatomic-spte", bound=2)
    assert series.violating is None


@pytest.mark.parametrize("policy", POLICIES)
def test_atomic_spte_update_keeps_the_dirty_bit(policy):
    assert run("lost-dirty-bit", policy, bound=2).violating is None


def test_mark_dirty_after_unlock_dirties_a_truncated_folio_under_legacy_only():
    legacy = run("fault-vs-truncate", "legacy", "mark-dirty-after-unlock", bound=2)
    assert legacy.violating is not None
    assert legacy.violating.violation.invariant == "INV-3"
    assert "truncated" in legacy.violating.violation.detail
    assert run("fault-vs-truncate", "series", "mark-dirty-after-unlock", bound=2).violating is None
    assert run("fault-vs-truncate", "legacy", bound=2).violating is None


def test_replay_of_printed_schedule_reproduces_violation():
    res = run("fault-vs-munmap", "legacy", "skip-retry", bound=2)
    printed = format_schedule(res.shortest)
    again = execute(SCENARIOS["fault-vs-munmap"], "legacy", Mutations(skip_retry=True), parse_schedule(printed),
                    strict=True)
    assert again.violation is not None and again.violation.invariant == res.violating.violation.invariant
    assert [s.label for s in again.steps] == [s.label for s in res.violating.steps]
    # without the mutation the same schedule is harmless
    assert execute(SCENARIOS["fault-vs-munmap"], "legacy", Mutations(), parse_schedule(printed)).violation is None


def test_shrunk_schedule_is_no_longer_than_found():
    res = run("lost-dirty-bit", "legacy", "nonatomic-spte", bound=2)
    assert len(res.shortest) <= len(res.violating.steps)


def test_same_seed_same_exploration():
    def trace(seed):
        from kvmsim.explore.engine import random_runs
        return [r.schedule for r in random_runs(SCENARIOS["fault-vs-munmap"], "series", Mutations(), 15, seed)]
    assert trace(7) == trace(7)
    assert trace(7) != trace(8)


def test_random_finds_the_skip_retry_race():
    res = run("fault-vs-munmap", "series", "skip-retry", random_n=200, seed=1)
    assert res.violating is not None and res.violating.violation.invariant == "INV-5"


def test_schedule_round_trip():
    s = ["vcpu0", "vcpu0", "host", "host", "host", "vcpu0"]
    assert format_schedule(s) == "vcpu0*2,host*3,vcpu0"
    assert parse_schedule(format_schedule(s)) == s


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_runs_both_policies(name):
    for arch in SCENARIOS[name].arches:
        for policy in POLICIES:
            r = execute(SCENARIOS[name].on(arch), policy, Mutations(), [])
            assert r.steps


X86_FAULT_RACES = ("fault-vs-munmap", "fault-vs-mprotect", "fault-vs-writeback", "fault-vs-truncate")


@pytest.mark.parametrize("name", X86_FAULT_RACES)
@pytest.mark.parametrize("policy", POLICIES)
def test_x86_fault_path_closes_each_race_and_skip_retry_reopens_it(name, policy):
    scenario = SCENARIOS[name].on("x86")
    clean = explore(scenario, policy, Mutations(), bound=2)
    assert clean.violating is None and clean.explored > 40
    broken = explore(scenario, policy, Mutations.parse(["skip-retry"]), bound=2)
    assert broken.violating is not None
    assert broken.violating.violation.invariant in ("INV-3", "INV-4", "INV-5")
    labels = [s.label for s in broken.violating.steps]
    assert any("fast_page_fault" in lb for lb in labels)       # the x86 fault path's own steps ran


def test_lost_dirty_bit_is_generic_only():
    from kvmsim.errors import UsageError
    with pytest.raises(UsageError, match="runs on generic"):
        SCENARIOS["lost-dirty-bit"].on("x86")


def _cli():
    import kvmsim.cli_explore  # noqa: F401  (registers the command)
    from kvmsim.cli import cli
    return cli


def test_cli_json_reports_throughput_and_violation():
    out = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--mutate", "skip-retry", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert {d["policy"] for d in data} == {"legacy", "series"}
    assert all(d["violation"]["invariant"] == "INV-5" and d["schedule"] for d in data)
    assert all(d["schedules_per_second"] > 0 for d in data)


def test_cli_arch_x86_in_json_and_refused_where_not_modelled():
    out = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--arch", "x86", "--policy", "series",
                                      "--mutate", "skip-retry", "--json"])
    assert out.exit_code == 0, out.output
    (d,) = json.loads(out.output)
    assert d["arch"] == "x86" and d["violation"]["invariant"] == "INV-5"
    r = CliRunner().invoke(_cli(), ["explore", "lost-dirty-bit", "--arch", "x86"])
    assert r.exit_code == 2 and "runs on generic" in r.output and "Traceback" not in r.output


def test_cli_replay_and_bad_input():
    cli = _cli()
    out = CliRunner().invoke(cli, ["explore", "fault-vs-munmap", "--policy", "legacy", "--mutate", "skip-retry",
                                   "--replay", "host,vcpu0"])
    assert out.exit_code == 0 and "VIOLATION INV-5" in out.output
    for args in (["explore", "nope"], ["explore", "fault-vs-munmap", "--replay", "host*x"],
                 ["explore", "fault-vs-munmap", "--replay", "ghost"], ["explore", "fault-vs-munmap", "--mutate", "x"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output


# ---- completeness ------------------------------------------------------------------------------------

def test_dfs_that_runs_out_of_schedules_is_complete():
    res = run("fault-vs-munmap", "series", bound=2)
    assert res.violating is None and res.complete and res.coverage.value == "complete"
    assert res.pending == 0 and res.explored > 3


def test_dfs_stopped_by_the_cap_is_truncated_not_a_clean_bound():
    full = run("fault-vs-munmap", "series", bound=2)
    res = run("fault-vs-munmap", "series", bound=2, max_schedules=3)
    assert res.violating is None and not res.complete
    assert res.coverage.value == "truncated" and res.explored == 3 and res.pending > 0
    assert res.explored < full.explored
    assert "incomplete" in res.why() and "3" in res.why()
    # a cap exactly at the space's size still finishes it: complete, not truncated
    exact = run("fault-vs-munmap", "series", bound=2, max_schedules=full.explored)
    assert exact.complete and exact.explored == full.explored


def test_cli_truncated_search_says_so_and_exits_3():
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--policy", "series", "--max-schedules", "3"])
    assert r.exit_code == 3, r.output
    assert "no violation up to bound" not in r.output
    assert "search incomplete" in r.output and "schedule cap (3)" in r.output
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--policy", "series", "--max-schedules", "3",
                                    "--json"])
    assert r.exit_code == 3
    (d,) = json.loads(r.stdout)
    assert d["coverage"] == "truncated" and d["complete"] is False and d["explored"] == 3
    assert d["unexplored_prefixes"] > 0 and d["violation"] is None


def test_cli_complete_search_says_so_and_exits_0():
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--policy", "series", "--json"])
    assert r.exit_code == 0
    (d,) = json.loads(r.output)
    assert d["coverage"] == "complete" and d["complete"] is True
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--policy", "series"])
    assert r.exit_code == 0 and "no violation up to bound 2 (search complete)" in r.output


def test_cli_violation_found_under_a_cap_is_still_exit_0():
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--mutate", "skip-retry", "--policy", "series",
                                    "--json", "--max-schedules", "50"])
    assert r.exit_code == 0
    (d,) = json.loads(r.output)
    assert d["violation"]["invariant"] == "INV-5" and d["coverage"] == "stopped"


def test_cli_list_names_every_race_with_its_description():
    r = CliRunner().invoke(_cli(), ["explore", "--list"])
    assert r.exit_code == 0
    for s in SCENARIOS.values():
        assert any(line.startswith(s.name + " ") and s.doc in line for line in r.output.splitlines()), s.name
    r = CliRunner().invoke(_cli(), ["explore", "--list", "--json"])
    assert {d["name"] for d in json.loads(r.output)} == set(SCENARIOS)
    r = CliRunner().invoke(_cli(), ["explore"])
    assert r.exit_code == 2 and "--list" in r.output


def test_cli_bad_max_schedules_is_a_usage_error():
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--max-schedules", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_cli_absurd_replay_count_is_a_usage_error_not_memoryerror():
    r = CliRunner().invoke(_cli(), ["explore", "fault-vs-munmap", "--replay", "vcpu0*99999999999"])
    assert r.exit_code == 2 and "at most" in r.output and "Traceback" not in r.output
