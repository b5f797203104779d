"""The explorer's DFS on a local Dask cluster against the single-process DFS of the same race, and the
numbers a projection to more workers needs (kvmsim.explore.distributed; docs/explorer-distributed.md).

Measured in one process, variants interleaved, best of ``ROUNDS`` (and each round's local / distributed
wall-time ratio, the median of those being the speed-up least moved by other load): the local search's wall and CPU
time; the same search on a ``LocalCluster`` of 1 and of 2 worker processes (its wall time, task
count, frontier time, each task's wall and CPU seconds); and Dask's cost per task (a no-op task's
round trip through the scheduler, many in flight).  From those: the speed-up on 2 workers, and the
projection to 64 workers of one core each, in CPU seconds (this machine's 2 cores are shared and wall times swing with the load; the
wall times are recorded too):

    T(64) = frontier(8 × 64 prefixes) + max(W / 64, tasks(64) × c) + CHUNK_SECONDS

W is the tasks' CPU seconds measured here; the frontier is built on the client before the first task
(timed here for 512 prefixes); c is the client's and scheduler's CPU per task (one process in a
LocalCluster, one task at a time: the serial part), measured on 2,000 no-op tasks; tasks(64) =
W / CHUNK_SECONDS (a task that does not finish its subtrees runs CHUNK_SECONDS) + 2 × 64 (the first
round); the last chunk is the tail.  Speed-up = the local search's CPU seconds / T(64).

Run ``python benchmarks/test_explore_distributed.py [RACE [BOUND]]`` for the numbers alone; the
default race is the 4-thread ``fault-munmap-dirtylog-aging`` at bound 2 when the library has it, else
``pfncache-refresh-vs-munmap`` at bound 5.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import pytest

distributed = pytest.importorskip("distributed", reason="kvmsim[distributed] is not installed") \
    if __name__ != "__main__" else __import__("distributed")

from kvmsim.explore import SCENARIOS, Mutations, explore
from kvmsim.explore.distributed import CHUNK_SECONDS, PER_WORKER, explore_distributed, frontier

ROUNDS = int(os.environ.get("ROUNDS", 2))


def default_race() -> tuple[str, int]:
    return ("fault-munmap-dirtylog-aging", 2) if "fault-munmap-dirtylog-aging" in SCENARIOS \
        else ("pfncache-refresh-vs-munmap", 5)


def _noop(i: int) -> None:
    return None


def dask_task_cost(client, n: int = 2000) -> tuple[float, float]:
    """Per no-op task, ``n`` of them in flight at once: wall seconds, and CPU seconds of this process,
    which holds the client and (in a LocalCluster) the scheduler: the serial part of a task's cost."""
    t0, c0 = time.perf_counter(), time.process_time()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def measure(name: str, bound: int, policy: str = "series", rounds: int = ROUNDS) -> dict:
    s, m = SCENARIOS[name], Mutations.parse([])
    out: dict = {"race": name, "bound": bound, "policy": policy, "cpus": os.cpu_count()}
    best = {"local": float("inf"), 1: float("inf"), 2: float("inf")}
    local_cpu = float("inf")
    ratios: dict[int, list[float]] = {1: [], 2: []}     # local wall / distributed wall, per round
    stats2: dict = {}
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as c2, \
            distributed.Client(c2) as cl2, \
            distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1,
                                     dashboard_address=":0") as c1, distributed.Client(c1) as cl1:
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            local = explore(s, policy, m, bound=bound, max_schedules=10**7)
            wall_local = time.perf_counter() - t0
            best["local"] = min(best["local"], wall_local)
            local_cpu = min(local_cpu, time.process_time() - c0)
            for n, cl in ((1, cl1), (2, cl2)):
                st: dict = {}
                t0 = time.perf_counter()
                dist = explore_distributed(s, policy, m, cl, bound=bound, max_schedules=10**7, stats=st)
                wall = time.perf_counter() - t0
                ratios[n].append(wall_local / wall)
                assert dist.explored == local.explored and dist.coverage is local.coverage
                if wall < best[n]:
                    best[n] = wall
                    if n == 2:
                        stats2 = st
        per_task, per_task_cpu = dask_task_cost(cl2)
    tasks, secs, cpu = stats2["tasks"], stats2["task_seconds"], stats2["task_cpu_seconds"]
    out.update(schedules=local.explored, coverage=local.coverage.value,
               local_seconds=round(best["local"], 3), workers1_seconds=round(best[1], 3),
               workers2_seconds=round(best[2], 3), speedup_2=round(best["local"] / best[2], 2),
               speedup_1_per_round=[round(r, 2) for r in ratios[1]],
               speedup_2_per_round=[round(r, 2) for r in ratios[2]],
               speedup_2_median=round(statistics.median(ratios[2]), 2),
               local_cpu_seconds=round(local_cpu, 3), task_cpu_seconds_sum=round(sum(cpu), 3),
               work_ratio=round((sum(cpu) + stats2["frontier_seconds"]) / local_cpu, 3),
               tasks=tasks, task_seconds_sum=round(sum(secs), 3),
               task_seconds_median=round(statistics.median(secs), 4), task_seconds_max=round(max(secs), 4),
               frontier_seconds_2=round(stats2["frontier_seconds"], 4),
               dask_seconds_per_task=round(per_task, 6), dask_client_cpu_per_task=round(per_task_cpu, 6))
    # The frontier a 64-worker run would build first (PER_WORKER x 64 prefixes), timed here.
    c0 = time.process_time()
    f64 = frontier(s, policy, m, bound, PER_WORKER * 64)
    out["frontier_cpu_seconds_64"] = round(time.process_time() - c0, 4)
    out["frontier_explored_64"] = f64.explored
    work = sum(cpu)
    tasks64 = math.ceil(work / CHUNK_SECONDS) + 2 * 64
    out["projected_tasks_64"] = tasks64
    out["projected_seconds_64"] = round(out["frontier_cpu_seconds_64"] + max(work / 64, tasks64 * per_task_cpu)
                                        + CHUNK_SECONDS, 3)
    out["projected_speedup_64"] = round(local_cpu / out["projected_seconds_64"], 1)
    # The same arithmetic for the "about an hour on one machine" (a 4-thread race at bound 5).
    hour = 3600.0
    t_hour = out["frontier_cpu_seconds_64"] + max(hour / 64, (math.ceil(hour / CHUNK_SECONDS) + 128) * per_task_cpu) \
        + CHUNK_SECONDS
    out["projected_seconds_64_for_1h"] = round(t_hour, 1)
    out["projected_speedup_64_for_1h"] = round(hour / t_hour, 1)
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
