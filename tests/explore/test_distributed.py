"""The explorer's search split into subtrees (kvmsim.explore.distributed): the split itself, then the same
search on a local Dask cluster of 2 worker processes, compared with the single-process search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.explore import SCENARIOS, Coverage, Mutations, explore, format_schedule
from kvmsim.explore.distributed import (DistributedUnavailable, Subtree, connect, explore_distributed, frontier,
                                        search_subtree)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "release_after_unlock.py"
NONE = Mutations.parse([])
SKIP = Mutations.parse(["skip-retry"])


def _cases():
    for name in SCENARIOS:
        for policy in ("legacy", "series"):
            for muts in ((), ("skip-retry",)):
                yield pytest.param(name, policy, muts, id=f"{name}-{policy}-{'+'.join(muts) or 'none'}")


# ---- the split, without a cluster ----------------------------------------------------------------------

@pytest.mark.parametrize("want", [1, 3, 10, 40])
def test_frontier_and_subtrees_cover_the_dfs_exactly_once(want):
    s = SCENARIOS["pfncache-refresh-vs-munmap"]
    local = explore(s, "series", NONE, bound=3)
    assert local.complete and local.explored == 694
    front = frontier(s, "series", NONE, 3, want)
    assert len(front.subtrees) >= min(want, 2) and not front.found
    counts = [search_subtree(s, "series", NONE, 3, [sub], 10**6) for sub in front.subtrees]
    assert all(not c.left and c.found is None for c in counts)
    assert front.explored + sum(c.explored for c in counts) == local.explored


def test_subtrees_come_in_the_order_the_dfs_visits_them():
    """The first subtree (by key) holding a violation holds the one the single-process DFS stops at."""
    s = SCENARIOS["fault-vs-truncate"]
    local = explore(s, "series", SKIP, bound=2)
    front = frontier(s, "series", SKIP, 2, 6)
    assert front.subtrees == sorted(front.subtrees) and len(front.subtrees) >= 6
    hits = [r.found for r in (search_subtree(s, "series", SKIP, 2, [sub], 10**6) for sub in front.subtrees)
            if r.found is not None]
    first = min(hits + front.found, key=lambda f: f.key)
    assert len({h.schedule for h in hits}) > 1                # more than one subtree violates ...
    assert local.violating.violation.invariant == first.invariant
    from kvmsim.explore.engine import shrink
    assert shrink(s, "series", SKIP, list(first.schedule), first.invariant) == local.shortest


def test_a_subtree_search_stops_at_its_cap_and_hands_back_the_rest():
    s = SCENARIOS["pfncache-refresh-vs-munmap"]
    r = search_subtree(s, "series", NONE, 3, [Subtree((), ())], 50)
    assert r.explored == 50 and r.left == sorted(r.left) and len(r.left) > 0
    rest = [search_subtree(s, "series", NONE, 3, [sub], 10**6) for sub in r.left]
    assert r.explored + sum(x.explored for x in rest) == 694      # the rest, searched, is the rest of the DFS


def test_one_task_takes_several_subtrees_in_dfs_order():
    s = SCENARIOS["fault-vs-truncate"]
    front = frontier(s, "series", SKIP, 2, 6)
    one = search_subtree(s, "series", SKIP, 2, front.subtrees[::-1], 10**6)   # given in any order
    each = [search_subtree(s, "series", SKIP, 2, [sub], 10**6) for sub in front.subtrees]
    first = next(r for r in each if r.found is not None)
    assert one.found == first.found and one.left == []
    assert one.explored == sum(r.explored for r in each[:each.index(first) + 1])


# ---- on a local cluster of 2 workers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed", reason="kvmsim[distributed] (dask, distributed) is not installed")
    import distributed
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as c, \
            distributed.Client(c) as cl:
        yield cl


@pytest.mark.parametrize("name,policy,muts", list(_cases()))
def test_distributed_search_equals_the_local_one(client, name, policy, muts):
    s, m = SCENARIOS[name], Mutations.parse(muts)
    local = explore(s, policy, m, bound=2)
    stats: dict = {}
    dist = explore_distributed(s, policy, m, client, bound=2, per_worker=2, stats=stats)
    assert dist.coverage is local.coverage
    if local.violating is None:
        assert dist.violating is None
        assert dist.explored == local.explored            # a complete search counts the same schedules
    else:
        assert dist.violating.violation.invariant == local.violating.violation.invariant
        assert dist.shortest == local.shortest            # the DFS's first violation, shrunk the same way


def test_a_bigger_tree_runs_as_tasks_on_both_workers_and_counts_the_same(client):
    s = SCENARIOS["pfncache-refresh-vs-munmap"]
    stats: dict = {}
    dist = explore_distributed(s, "series", NONE, client, bound=4, stats=stats)
    assert dist.complete and dist.explored == explore(s, "series", NONE, bound=4).explored
    assert stats["workers"] == 2 and stats["frontier_subtrees"] >= 16
    assert stats["tasks"] >= 4 and len(stats["task_seconds"]) == stats["tasks"]   # 2 in flight per worker


def test_a_capped_distributed_search_is_truncated_and_stays_under_the_cap(client):
    s = SCENARIOS["pfncache-refresh-vs-munmap"]
    dist = explore_distributed(s, "series", NONE, client, bound=4, max_schedules=500)
    assert dist.coverage is Coverage.TRUNCATED and not dist.complete
    assert dist.explored <= 500 and dist.pending > 0
    assert "search incomplete" in dist.why()


def test_a_cap_the_search_fits_under_leaves_it_complete(client):
    s = SCENARIOS["pfncache-refresh-vs-munmap"]
    dist = explore_distributed(s, "series", NONE, client, bound=3, max_schedules=694)
    assert dist.complete and dist.explored == 694


# ---- the CLI --------------------------------------------------------------------------------------------

def _run(*args):
    return CliRunner().invoke(cli, ["explore", *args])


def test_cli_workers_reports_what_the_local_search_finds(client):
    """``--workers 2`` against :func:`explore` in this process (the plain DFS), both policies."""
    for name, args in (("fault-vs-truncate", ["--mutate", "skip-retry"]), ("pfncache-refresh-vs-munmap", ["--bound", "3"])):
        r = _run(name, *args, "--json", "--workers", "2")
        assert r.exit_code == 0, r.output
        bound = int(args[1]) if args[0] == "--bound" else 2
        muts = Mutations.parse(args[1:] if args[0] == "--mutate" else [])
        for out in json.loads(r.output):
            local = explore(SCENARIOS[name], out["policy"], muts, bound=bound)
            assert out["dask_workers"] == 2 and out["coverage"] == local.coverage.value
            if local.violating is None:
                assert out["violation"] is None and out["explored"] == local.explored
            else:
                assert out["violation"]["invariant"] == local.violating.violation.invariant
                assert out["schedule"] == format_schedule(local.shortest)


def test_cli_address_uses_an_existing_scheduler(client):
    addr = client.scheduler.address
    r = _run("fault-vs-truncate", "--mutate", "skip-retry", "--policy", "series", "--json", "--address", addr)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)[0]
    assert out["dask_workers"] == 2 and out["violation"]["invariant"] == "INV-3"
    assert client.scheduler_info()["workers"]                 # the cluster is still up: not ours to close


def test_cli_plugin_policy_runs_on_the_workers(client):
    from kvmsim.policies.plugin import load_plugin
    spec = f"{EXAMPLE}:ReleaseAfterUnlock"
    r = _run("fault-vs-truncate", "--arch", "x86", "--policy", spec, "--json", "--workers", "2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)[0]
    assert out["policy"] == "series-unlocked-release" and out["violation"]["invariant"] == "INV-3"
    local = explore(SCENARIOS["fault-vs-truncate"].on("x86"), load_plugin(spec), NONE, bound=2)
    assert out["schedule"] == format_schedule(local.shortest)


def test_cli_without_dask_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)     # import distributed -> ImportError
    r = _run("fault-vs-munmap", "--workers", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "pip install 'kvmsim[distributed]'" in r.output


def test_cli_workers_do_not_combine_with_random_replay_or_address():
    for extra in (["--random", "3"], ["--replay", "host"], ["--address", "tcp://127.0.0.1:1"]):
        r = _run("fault-vs-munmap", "--workers", "2", *extra)
        assert r.exit_code == 2 and "Traceback" not in r.output, extra
    assert _run("fault-vs-munmap", "--workers", "0").exit_code == 2


def test_cli_workers_run_the_plain_dfs_and_refuse_an_explicit_dpor(client):
    """The CLI reduces by default; the distributed search is the plain DFS, says so, and refuses
    ``--reduction dpor`` given explicitly."""
    addr = client.scheduler.address
    r = _run("fault-vs-munmap", "--policy", "series", "--address", addr, "--reduction", "dpor")
    assert r.exit_code == 2 and "the distributed search runs the plain DFS" in r.output
    r = _run("fault-vs-munmap", "--policy", "series", "--json", "--address", addr)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)[0]
    assert out["reduction"] == "none" and out["explored"] == explore(SCENARIOS["fault-vs-munmap"], "series", NONE,
                                                                     bound=2).explored


def test_an_unreachable_scheduler_is_a_clear_error():
    pytest.importorskip("distributed", reason="kvmsim[distributed] (dask, distributed) is not installed")
    with pytest.raises(DistributedUnavailable, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'"):
        with connect(address="tcp://127.0.0.1:1", timeout="1s"):
            pass
