"""The explorer's DFS on a local Dask cluster against the single-process DFS of the same race, and the
numbers a projection to more workers needs (kvmsim.explore.distributed; docs/explorer-distributed.md).

Measured in one process, variants interleaved, best of ``ROUNDS``: the local search's wall and CPU
time; the same search on a ``LocalCluster`` of 1 and of 2 worker processes (its wall time, task
count, frontier time, each task's wall and CPU seconds); and Dask's cost per task (a no-op task's
round trip through the scheduler, many in flight).  From those: the speed-up on 2 workers, and the
projection to ``N`` workers

    T(N) = frontier(N) + sum(task CPU seconds) / N + longest task + tasks(N) × Dask's cost per task

against the local search's CPU seconds.  CPU time, because this machine's 2 cores are shared and wall
times swing with the load (the wall times are recorded too).  The frontier is the serial part, built
here before the first task; the longest task is the tail when the rest is perfectly balanced; the
scheduler is one process, so its per-task cost counts as serial; tasks(N) is the measured task count
with the frontier's 8 × N subtrees in place of 8 × 2.

Run ``python benchmarks/test_explore_distributed.py [RACE [BOUND]]`` for the numbers alone; the
default race is the 4-thread ``fault-munmap-dirtylog-aging`` at bound 2 when the library has it, else
``pfncache-refresh-vs-munmap`` at bound 5.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest

distributed = pytest.importorskip("distributed", reason="kvmsim[distributed] is not installed") \
    if __name__ != "__main__" else __import__("distributed")

from kvmsim.explore import SCENARIOS, Mutations, explore
from kvmsim.explore.distributed import PER_WORKER, explore_distributed, frontier

ROUNDS = int(os.environ.get("ROUNDS", 2))


def default_race() -> tuple[str, int]:
    return ("fault-munmap-dirtylog-aging", 2) if "fault-munmap-dirtylog-aging" in SCENARIOS \
        else ("pfncache-refresh-vs-munmap", 5)


def _noop(i: int) -> None:
    return None


def dask_task_cost(client, n: int = 2000) -> float:
    """Seconds per no-op task, ``n`` of them in flight at once: the scheduler's and the wire's share."""
    t0 = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - t0) / n


def measure(name: str, bound: int, policy: str = "series", rounds: int = ROUNDS) -> dict:
    s, m = SCENARIOS[name], Mutations.parse([])
    out: dict = {"race": name, "bound": bound, "policy": policy, "cpus": os.cpu_count()}
    best = {"local": float("inf"), 1: float("inf"), 2: float("inf")}
    local_cpu = float("inf")
    stats2: dict = {}
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as c2, \
            distributed.Client(c2) as cl2, \
            distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1,
                                     dashboard_address=None) as c1, distributed.Client(c1) as cl1:
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            local = explore(s, policy, m, bound=bound, max_schedules=10**7)
            best["local"] = min(best["local"], time.perf_counter() - t0)
            local_cpu = min(local_cpu, time.process_time() - c0)
            for n, cl in ((1, cl1), (2, cl2)):
                st: dict = {}
                t0 = time.perf_counter()
                dist = explore_distributed(s, policy, m, cl, bound=bound, max_schedules=10**7, stats=st)
                wall = time.perf_counter() - t0
                assert dist.explored == local.explored and dist.coverage is local.coverage
                if wall < best[n]:
                    best[n] = wall
                    if n == 2:
                        stats2 = st
        per_task = dask_task_cost(cl2)
    tasks, secs, cpu = stats2["tasks"], stats2["task_seconds"], stats2["task_cpu_seconds"]
    out.update(schedules=local.explored, coverage=local.coverage.value,
               local_seconds=round(best["local"], 3), workers1_seconds=round(best[1], 3),
               workers2_seconds=round(best[2], 3), speedup_2=round(best["local"] / best[2], 2),
               local_cpu_seconds=round(local_cpu, 3), task_cpu_seconds_sum=round(sum(cpu), 3),
               work_ratio=round((sum(cpu) + stats2["frontier_seconds"]) / local_cpu, 3),
               tasks=tasks, task_seconds_sum=round(sum(secs), 3),
               task_seconds_median=round(statistics.median(secs), 4), task_seconds_max=round(max(secs), 4),
               frontier_seconds_2=round(stats2["frontier_seconds"], 4),
               dask_seconds_per_task=round(per_task, 6))
    # The frontier a 64-worker run would build first (PER_WORKER x 64 prefixes), timed here.
    t0 = time.perf_counter()
    f64 = frontier(s, policy, m, bound, PER_WORKER * 64)
    out["frontier_seconds_64"] = round(time.perf_counter() - t0, 4)
    out["frontier_explored_64"] = f64.explored
    tasks64 = tasks - stats2["frontier_subtrees"] + PER_WORKER * 64
    out["projected_tasks_64"] = tasks64
    out["projected_seconds_64"] = round(out["frontier_seconds_64"] + sum(cpu) / 64 + max(cpu)
                                        + tasks64 * per_task, 3)
    out["projected_speedup_64"] = round(local_cpu / out["projected_seconds_64"], 1)
    return out


def test_explore_on_two_workers(benchmark, record):
    name, bound = default_race()
    res: dict = {}

    def once():
        res.update(measure(name, bound))
    benchmark.pedantic(once, rounds=1, iterations=1)
    record(**res)


if __name__ == "__main__":
    race, b = default_race()
    if len(sys.argv) > 1:
        race, b = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for k, v in measure(race, b).items():
        print(f"{k:24} {v}")
