"""The explorer with and without partial-order reduction on the 3- and 4-thread races (issue 17).

Each case runs the complete preemption-bounded DFS of one race under the series policy (no
violation, so both searches run to the end) twice in one process, plain (``--reduction none``) and
DPOR (``--reduction dpor``), and records both schedule counts, both wall times and their ratios.

Target (issue 17): DPOR cuts the schedule count at least 10x on the 3- and 4-thread races.
Run one case by hand: ``python benchmarks/test_explorer.py fault-munmap-dirtylog 4``.
"""

import time

import pytest

from kvmsim.explore import SCENARIOS, Mutations, explore

#: (race, preemption bound): bounds where the plain DFS takes seconds to a minute or two here.
CASES = [("fault-munmap-dirtylog", 3), ("fault-munmap-dirtylog", 4), ("pfncache-invalidate-vcpu-map", 3),
         ("fault-munmap-dirtylog-aging", 2), ("fault-munmap-dirtylog-aging", 3)]


def compare(name: str, bound: int, policy: str = "series") -> dict:
    out = {"race": name, "bound": bound, "policy": policy, "threads": len(SCENARIOS[name].build(policy, Mutations()).threads)}
    for red in ("dpor", "none"):
        t0 = time.perf_counter()
        res = explore(SCENARIOS[name], policy, Mutations(), bound=bound, reduction=red, max_schedules=1_000_000)
        out[f"{red}_schedules"] = res.explored
        out[f"{red}_seconds"] = round(time.perf_counter() - t0, 2)
        out[f"{red}_complete"] = res.complete
        out[f"{red}_violation"] = None if res.violating is None else res.violating.violation.invariant
    out["schedule_ratio"] = round(out["none_schedules"] / out["dpor_schedules"], 1)
    out["time_ratio"] = round(out["none_seconds"] / out["dpor_seconds"], 2)
    return out


@pytest.mark.parametrize("name,bound", CASES)
def test_explorer_reduction(benchmark, record, name, bound):
    """Target: schedule_ratio >= 10."""
    res = {}

    def once():
        res.update(compare(name, bound))
    benchmark.pedantic(once, rounds=1, iterations=1)
    record(**res)


if __name__ == "__main__":
    import sys
    print(compare(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3))
