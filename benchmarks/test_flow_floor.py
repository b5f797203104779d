"""The dirty-log flow against its memory floor (issue 17; kvmsim.bench.floor): each phase's time as a
multiple of the least per-page state it must read plus write over the copy bandwidth measured in
the same process.  Target: the 64 GiB 4 KiB flow, both policies, <= 2x its floor.

Each round is a fresh forked run (``run_model_isolated``: warm-up, 1 GiB copy bandwidth, the flow);
a phase's multiple is its best time over the rounds against the best bandwidth, in wall time and
in CPU time (the machines these run on are shared: the CPU-time multiple is the one judged).  The per-phase cost
counters are recorded too: they must not change when the flow gets faster."""

import pytest

from kvmsim.bench.dirty_log_perf import Options, run_model_isolated

GiB = 1 << 30


def _floor_flow(benchmark, record, warm, gib: int, policy: str, rounds: int) -> None:
    runs = []

    def once():
        runs.append(run_model_isolated(Options(vcpu_memory=gib * GiB, floor=True), policy, warm=warm))
    benchmark.pedantic(once, rounds=rounds, iterations=1)
    bw = max(r.copy_bandwidth for r in runs)
    bw_cpu = max(r.copy_bandwidth_cpu for r in runs)
    keys = [(p.name, p.iteration) for p in runs[0].phases]
    best = {k: min(r.phase(*k).seconds for r in runs) for k in keys}
    best_cpu = {k: min(r.phase(*k).cpu_seconds for r in runs) for k in keys}
    nbytes = {k: runs[0].phase(*k).floor_bytes for k in keys}
    name = {k: f"{k[0]}{k[1] or ''}" for k in keys}
    record(copy_bandwidth_gbs=round(bw / 1e9, 2), copy_bandwidth_cpu_gbs=round(bw_cpu / 1e9, 2),
           state_bytes_per_page=sum(runs[0].state_bytes.values()),
           floor_seconds=round(sum(nbytes.values()) / bw, 5),
           phases_seconds={name[k]: round(best[k], 5) for k in keys},
           phases_cpu_seconds={name[k]: round(best_cpu[k], 5) for k in keys},
           floor_multiples={name[k]: round(best[k] * bw / nbytes[k], 2) for k in keys},
           floor_multiples_cpu={name[k]: round(best_cpu[k] * bw_cpu / nbytes[k], 2) for k in keys},
           floor_multiple=round(sum(best.values()) * bw / sum(nbytes.values()), 2),
           floor_multiple_cpu=round(sum(best_cpu.values()) * bw_cpu / sum(nbytes.values()), 2),
           counters={name[k]: runs[0].phase(*k).summary() for k in keys}, stats=runs[0].stats)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_floor_4g(benchmark, record, warm, policy):
    _floor_flow(benchmark, record, warm, 4, policy, rounds=3)


@pytest.mark.big
@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_floor_64g(benchmark, record, warm, policy):
    """Target: floor_multiple <= 2."""
    _floor_flow(benchmark, record, warm, 64, policy, rounds=3)


@pytest.fixture
def warm(request):
    return not request.config.getoption("--no-warmup")
