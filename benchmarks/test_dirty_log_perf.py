"""The dirty_log_perf_test flow on the model (kvmsim.bench.dirty_log_perf): whole-flow wall time,
peak RSS of a forked child per run, and the cost counters of the phases that differ by policy."""

import pytest

from kvmsim.bench.dirty_log_perf import Options, run_model_isolated

GiB = 1 << 30


@pytest.fixture
def warm(request):
    return not request.config.getoption("--no-warmup")


def _flow(benchmark, record, opts, policy, rounds=1, warm=True):
    res = {}

    def once():
        res["r"] = run_model_isolated(opts, policy, warm=warm)
    benchmark.pedantic(once, rounds=rounds, iterations=1)
    r = res["r"]
    record(flow_seconds=round(r.wall_seconds, 4), peak_rss_mib=round(r.peak_rss_bytes / 2**20, 1),
           phases={f"{p.name}{p.iteration or ''}": round(p.seconds, 4) for p in r.phases},
           disable=r.phase("disable").summary(), clear1=(r.phase("clear", 1).summary() if opts.manual_protect else {}),
           stats=r.stats)


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", ["anonymous", "anonymous_hugetlb_2mb", "anonymous_hugetlb_1gb"])
def test_flow_1g(benchmark, record, warm, policy, backing):
    _flow(benchmark, record, Options(vcpu_memory=GiB, backing=backing, run_while_disabling=True), policy, rounds=2,
          warm=warm)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_8g_4vcpus_v613_other(benchmark, record, warm, policy):
    _flow(benchmark, record, Options(vcpu_memory=2 * GiB, vcpus=4, backing="anonymous_hugetlb_2mb",
                                     run_while_disabling=True, v613_other=True), policy, warm=warm)


@pytest.mark.big
@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_64g_anonymous(benchmark, record, warm, policy):
    """Target: <= 10 s wall and <= 1.5 GiB peak RSS per policy."""
    _flow(benchmark, record, Options(vcpu_memory=64 * GiB), policy, warm=warm)


@pytest.mark.big
@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_64g_hugetlb_1gb(benchmark, record, warm, policy):
    """The 64 GiB point of the 1 GiB hugetlb scaling target."""
    _flow(benchmark, record, Options(vcpu_memory=64 * GiB, backing="anonymous_hugetlb_1gb"), policy, warm=warm)


@pytest.mark.big
@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", ["anonymous", "anonymous_hugetlb_1gb"])
def test_flow_256g(benchmark, record, warm, policy, backing):
    """Target: <= 4.5x the 64 GiB time of the same backing (linear scaling)."""
    _flow(benchmark, record, Options(vcpu_memory=256 * GiB, backing=backing), policy, warm=warm)


@pytest.mark.big
@pytest.mark.parametrize("v613_other", [False, True])
def test_flow_matlack_64x4g_2m(benchmark, record, warm, v613_other):
    """dirty_log_perf_test -s anonymous_hugetlb_2mb -v 64 -e -b 4g: 131,072 flushes vs batched."""
    _flow(benchmark, record, Options(vcpu_memory=4 * GiB, vcpus=64, backing="anonymous_hugetlb_2mb",
                                     run_while_disabling=True, v613_other=v613_other), "series", warm=warm)
