"""The dirty_log_perf_test flow on the model (kvmsim.bench.dirty_log_perf): whole-flow wall time,
peak RSS of a forked child per run, and the cost counters of the phases that differ by policy."""

import pytest

from kvmsim.bench.dirty_log_perf import Options, run_model_isolated

GiB = 1 << 30


def _flow(benchmark, record, opts, policy, rounds=1):
    res = {}

    def once():
        res["r"] = run_model_isolated(opts, policy)
    benchmark.pedantic(once, rounds=rounds, iterations=1)
    r = res["r"]
    record(flow_seconds=round(r.wall_seconds, 4), peak_rss_mib=round(r.peak_rss_bytes / 2**20, 1),
           phases={f"{p.name}{p.iteration or ''}": round(p.seconds, 4) for p in r.phases},
           disable=r.phase("disable").summary(), clear1=(r.phase("clear", 1).summary() if opts.manual_protect else {}),
           stats=r.stats)


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", ["anonymous", "anonymous_hugetlb_2mb", "anonymous_hugetlb_1gb"])
def test_flow_1g(benchmark, record, policy, backing):
    _flow(benchmark, record, Options(vcpu_memory=GiB, backing=backing, run_while_disabling=True), policy, rounds=2)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_8g_4vcpus_v613_other(benchmark, record, policy):
    _flow(benchmark, record, Options(vcpu_memory=2 * GiB, vcpus=4, backing="anonymous_hugetlb_2mb",
                                     run_while_disabling=True, v613_other=True), policy)


@pytest.mark.big
@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_flow_64g_anonymous(benchmark, record, policy):
    """Target: <= 10 s wall and <= 1.5 GiB peak RSS per policy."""
    _flow(benchmark, record, Options(vcpu_memory=64 * GiB), policy)


@pytest.mark.big
@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", ["anonymous", "anonymous_hugetlb_1gb"])
def test_flow_256g(benchmark, record, policy, backing):
    """Target: <= 4.5x the 64 GiB anonymous time."""
    _flow(benchmark, record, Options(vcpu_memory=256 * GiB, backing=backing), policy)


@pytest.mark.big
@pytest.mark.parametrize("v613_other", [False, True])
def test_flow_matlack_64x4g_2m(benchmark, record, v613_other):
    """dirty_log_perf_test -s anonymous_hugetlb_2mb -v 64 -e -b 4g: 131,072 flushes vs batched."""
    _flow(benchmark, record, Options(vcpu_memory=4 * GiB, vcpus=64, backing="anonymous_hugetlb_2mb",
                                     run_while_disabling=True, v613_other=v613_other), "series")
