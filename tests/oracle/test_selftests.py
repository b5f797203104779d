"""The kernel's own KVM selftests inside the oracle kernels (kvmsim.backend.oracle.selftests) and
``kvmsim bench dirty-log --backend oracle`` (kvmsim.bench.oracle).

Unit tests (no boot): the phase lines of dirty_log_perf_test.c, per-phase splitting of the runner's
snapshots, outcome classification, the in-guest runner driven by a fake selftest, the model's
counters mapped to kernel functions, and the comparison's verdicts.  Boot tests: one boot per kernel
for the whole module (6.12.0 with selftests-6.12.0, 6.13.7 with selftests-6.13.7), skipped with the
reason when QEMU, busybox, the kernels or their selftests are missing (``KVMSIM_ORACLE=0`` disables).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

from kvmsim.backend.oracle.selftests import (
    SELFTESTS,
    Selftest,
    classify,
    parse_phase_line,
    split_phases,
)
from kvmsim.bench.oracle import compare, explain, model_calls, model_phases

# ---- unit: parsing and splitting ----------------------------------------------------------------------


def test_phase_lines_of_dirty_log_perf_test():
    assert parse_phase_line("Populate memory time: 1.534280850s") == ("populate", None, 1.534280850)
    assert parse_phase_line("Enabling dirty logging time: 0.000590198s")[:2] == ("enable", None)
    assert parse_phase_line("Iteration 12 dirty memory time: 0.012032310s")[:2] == ("dirty", 12)
    assert parse_phase_line("Iteration 2 get dirty log time: 0.000019649s")[:2] == ("get", 2)
    assert parse_phase_line("Iteration 2 clear dirty log time: 0.001746807s")[:2] == ("clear", 2)
    assert parse_phase_line("Disabling dirty logging time: 0.000770235s")[:2] == ("disable", None)
    # the summaries and the preamble are not phases
    assert parse_phase_line("Get dirty log over 2 iterations took 0.000241509s. (Avg 0.000120754s/iteration)") is None
    assert parse_phase_line("Random seed: 0x1") is None
    assert parse_phase_line("Iteration 1 dirty memory time: soon") is None


def _snap(line, **counts):
    return {"line": line, "t": 0.0, "counts": counts}


def test_split_phases_deltas_gauges_and_teardown():
    snaps = [
        _snap(None, kvm_set_pfn_dirty=5, **{"stat.pages_4k": 0, "stat.pf_taken": 10}),
        _snap("Populate memory time: 1.0s", kvm_set_pfn_dirty=5, **{"stat.pages_4k": 100, "stat.pf_taken": 110}),
        _snap("Iteration 1 clear dirty log time: 0.5s", kvm_set_pfn_dirty=105,
              **{"stat.pages_4k": 100, "stat.pf_taken": 110}),
        _snap(None, kvm_set_pfn_dirty=205),                     # the VM is gone: no stats
    ]
    phases = split_phases(snaps, {"kvm_release_page_unused": "Invalid argument"})
    assert [(p.name, p.iteration) for p in phases] == [("populate", None), ("clear", 1), ("teardown", None)]
    pop, clear, down = phases
    assert pop.seconds == 1.0 and pop.stats["pf_taken"] == 100 and pop.stats_end == {"pages_4k": 100}
    assert pop.calls["kvm_set_pfn_dirty"] == 0 and pop.calls["kvm_release_page_unused"] is None
    assert clear.calls["kvm_set_pfn_dirty"] == 100 and clear.stats["pages_4k"] == 0
    assert down.calls["kvm_set_pfn_dirty"] == 100 and down.stats == {} and down.seconds is None


def test_classify_outcomes():
    assert classify("t", 0, ["Random seed: 0x1", "ok 1 foo"]).outcome == "pass"
    skip = classify("t", 4, ["1..0 # SKIP - Requirement not met: kvm_has_cap(KVM_CAP_GUEST_MEMFD)"])
    assert skip.outcome == "skip" and "KVM_CAP_GUEST_MEMFD" in skip.detail
    out = ["Random seed: 0x6b8b4567", "==== Test Assertion Failure ====", "  max_guest_memory_test.c:149: nr_vcpus > 0",
           "  pid=72 tid=72 errno=0 - Success", "     1\t0x0000000000402579: ?? ??:0", "  Uh, no CPUs?"]
    fail = classify("t", 254, out)
    assert fail.outcome == "fail" and "nr_vcpus > 0" in fail.detail and "Uh, no CPUs?" in fail.detail
    assert classify("t", 0, ["ok 1 a", "not ok 2 b"]).outcome == "fail"       # exit 0 but a KTAP failure
    assert classify("t", None, [], timed_out=True).outcome == "timeout"


def test_runner_splits_a_fake_selftest(tmp_path, monkeypatch):
    """The in-guest runner against a script that prints dirty_log_perf_test's lines: one snapshot
    before, one per phase line, one after; other lines are kept but do not split."""
    from kvmsim.backend.oracle import selftest_runner as sr
    monkeypatch.setattr(sr, "KVM_DEBUGFS", str(tmp_path / "none"))
    script = tmp_path / "fake.sh"
    script.write_text("echo 'Random seed: 0x1'\necho 'Populate memory time: 0.100000000s'\n"
                      "echo 'Iteration 1 dirty memory time: 0.200000000s'\necho done\nexit 3\n")
    spec = Selftest("fake", "fake.sh", phased=True).runner_spec(tmp_path)
    spec["argv"] = ["/bin/sh", str(script)]
    r = sr.run_one(spec, {})
    assert r["returncode"] == 3 and not r["timed_out"]
    assert r["output"] == ["Random seed: 0x1", "Populate memory time: 0.100000000s",
                           "Iteration 1 dirty memory time: 0.200000000s", "done"]
    assert [s["line"] for s in r["snapshots"]] == [None, "Populate memory time: 0.100000000s",
                                                   "Iteration 1 dirty memory time: 0.200000000s", None]
    assert os.sched_getaffinity(0)                     # the runner gave its CPUs back


def test_runner_kills_at_the_timeout(tmp_path):
    from kvmsim.backend.oracle import selftest_runner as sr
    r = sr.run_one({"name": "sleep", "argv": ["/bin/sleep", "30"], "timeout": 0.5}, {})
    assert r["timed_out"] and r["returncode"] != 0 and r["seconds"] < 30


def test_the_set_covers_the_shipped_binaries():
    names = {t.binary for t in SELFTESTS}
    assert {"dirty_log_perf_test", "dirty_log_test", "dirty_log_page_splitting_test", "access_tracking_perf_test",
            "max_guest_memory_test", "memslot_perf_test", "memslot_modification_stress_test", "demand_paging_test",
            "kvm_page_table_test", "nx_huge_pages_test", "set_memory_region_test", "guest_memfd_test",
            "pre_fault_memory_test"} <= names
    assert len({t.name for t in SELFTESTS}) == len(SELFTESTS)


# ---- unit: the model side and the comparison -----------------------------------------------------------


@pytest.fixture(scope="module")
def model_runs():
    return {p: model_phases(p, "anonymous", 4 << 20, 2) for p in ("legacy", "series")}


def test_model_calls_carry_each_protocol(model_runs):
    """1,024 pages written: v6.12 releases clean and marks dirty at CLEAR (write-protection) and at the
    VM's destruction; v6.13 releases dirty at fault time and never calls the removed functions."""
    leg = {(p.name, p.iteration): model_calls("legacy", p.counters) for p in model_runs["legacy"].phases}
    ser = {(p.name, p.iteration): model_calls("series", p.counters) for p in model_runs["series"].phases}
    assert leg[("populate", None)]["kvm_release_pfn_clean"] == 1024
    assert leg[("populate", None)]["kvm_release_page_dirty"] == 0
    assert leg[("populate", None)]["mark_page_accessed"] == 2048          # FOLL_TOUCH + the release
    assert leg[("clear", 1)]["kvm_set_pfn_dirty"] == 1024
    assert leg[("teardown", None)]["kvm_set_pfn_dirty"] == 1024
    assert leg[("populate", None)]["kvm_release_page_unused"] is None      # added by the series
    assert ser[("populate", None)]["kvm_release_page_dirty"] == 1024
    assert ser[("populate", None)]["mark_page_accessed"] == 1024           # KVM's only: GUP calls the folio API
    assert ser[("populate", None)]["folio_mark_accessed"] == 2048
    assert ser[("clear", 1)]["kvm_set_pfn_dirty"] is None
    assert ser[("teardown", None)]["kvm_release_page_dirty"] == 0


def test_explain_verdicts():
    assert explain("clear", "kvm_set_pfn_dirty", 4096, 4096, 0) == ("agree", "")
    assert explain("populate", "pf_taken", 4096, 4125, 29)[0] == "explained"
    assert explain("populate", "pf_taken", 4096, 4126, 29)[0] == "DISAGREE"     # not the slot-0 faults
    assert explain("clear", "kvm_set_pfn_dirty", 4096, 4097, 29)[0] == "DISAGREE"
    assert explain("clear", "mark_page_accessed", 1, 513, 0)[0] == "DISAGREE"   # no process start/exit here
    assert explain("teardown", "folio_mark_accessed", 4096, 4300, 29, 29)[0] == "explained"
    assert explain("teardown", "folio_mark_accessed", 4096, 4000, 29, 29)[0] == "DISAGREE"
    assert explain("populate", "kvm_release_page_unused", 0, None, 29)[0] == "absent"
    assert explain("populate", "kvm_set_pfn_dirty", None, 5, 29)[0] == "DISAGREE"


_SLOT0_POPULATE = {"legacy": ("kvm_release_pfn_clean", "kvm_release_page_clean", "get_user_pages_fast_only",
                               "mark_page_accessed", "folio_mark_accessed"),
                    "series": ("kvm_release_page_dirty", "get_user_pages_fast_only", "mark_page_accessed",
                               "folio_mark_accessed")}
_SLOT0_TEARDOWN = {"legacy": ("kvm_set_pfn_dirty", "kvm_set_pfn_accessed", "mark_page_accessed", "folio_mark_accessed"),
                   "series": ()}


def _fake_real(policy, run, slot0=7, bump=None):
    """A runner result built from the model's own phases plus what a memslot 0 of ``slot0`` pages adds
    (a fault, a release and an accessed mark each; zapped with the VM), optionally one count bumped."""
    from kvmsim.bench.report import phase_label
    cum = {"stat.pf_taken": 0, "stat.pf_fixed": 0, "stat.pf_fast": 0}
    snaps = [{"line": None, "counts": dict(cum, **{"stat.pages_4k": 0, "stat.pages_2m": 0, "stat.pages_1g": 0})}]
    for p in run.phases:
        c = {k: v for k, v in model_calls(policy, p.counters).items() if v is not None}
        extra = {"populate": _SLOT0_POPULATE, "teardown": _SLOT0_TEARDOWN}.get(p.name, {}).get(policy, ())
        for k in extra:
            c[k] += slot0
        if bump and bump[0] == (p.name, p.iteration):
            c[bump[1]] += 1
        for k, v in c.items():
            cum[k] = cum.get(k, 0) + v
        if p.name == "teardown":
            snaps.append({"line": None, "counts": {k: v for k, v in cum.items() if not k.startswith("stat.")}})
            continue
        cum["stat.pf_taken"] += p.counters.get("page_fault", 0) + (slot0 if p.name == "populate" else 0)
        cum["stat.pf_fixed"] = cum["stat.pf_taken"]
        cum["stat.pf_fast"] += p.counters.get("fast_page_fault", 0)
        gauges = {"stat.pages_4k": p.stats["pages_4k"] + slot0, "stat.pages_2m": p.stats["pages_2m"],
                  "stat.pages_1g": p.stats["pages_1g"]}
        snaps.append({"line": f"{phase_label(p.name, p.iteration)} time: 0.1s", "counts": dict(cum, **gauges)})
    return {"returncode": 0, "snapshots": snaps, "output": []}


def test_model_fixes_the_oracle_found():
    """What the real dirty_log_perf_test showed (benchmarks/oracle/dirty-log.txt), on the model alone:
    GUP through a huge PMD only touches the PMD (follow_huge_pmd(): touch_pmd(), no
    mark_page_accessed), and eager splitting of a 1 GiB leaf goes through 512 2 MiB leaves, each of
    which v6.12 reports dirty and accessed when it becomes a page table."""
    thp = {(p.name, p.iteration): model_calls("legacy", p.counters)
           for p in model_phases("legacy", "anonymous_hugetlb_2mb", 64 << 20, 2).phases}
    assert thp[("populate", None)]["mark_page_accessed"] == 32           # the 32 releases only
    assert thp[("populate", None)]["get_user_pages_unlocked"] == 32
    gig = {(p.name, p.iteration): model_calls("legacy", p.counters)
           for p in model_phases("legacy", "anonymous_hugetlb_1gb", 1 << 30, 2).phases}
    assert gig[("clear", 1)]["kvm_set_pfn_dirty"] == 262144 + 1 + 512
    assert gig[("clear", 1)]["kvm_set_pfn_accessed"] == 1 + 512
    assert gig[("disable", None)]["kvm_set_pfn_dirty"] == 262144


def test_g_flow_has_no_clear_phase_and_write_protects_at_enable():
    """-g (no manual protect): enabling logging write-protects every SPTE, so the first dirty pass
    faults; GET_DIRTY_LOG write-protects again (legacy marks dirty there)."""
    run = model_phases("legacy", "anonymous", 4 << 20, 2, manual_protect=False)
    names = [(p.name, p.iteration) for p in run.phases]
    assert ("clear", 1) not in names and ("get", 1) in names
    by = {(p.name, p.iteration): p for p in run.phases}
    assert by[("dirty", 1)].counters.get("page_fault", 0) == 1024
    assert model_calls("legacy", by[("get", 2)].counters)["kvm_set_pfn_dirty"] == 1024


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_compare_agrees_with_itself_and_catches_one_call(policy, model_runs):
    run = model_runs[policy]
    absent = {"kvm_set_pfn_dirty": "x", "kvm_set_pfn_accessed": "x", "kvm_release_pfn_clean": "x",
              "kvm_release_pfn_dirty": "x", "kvm_release_page_unused": "x"} if policy == "series" else \
        {"kvm_release_page_unused": "x"}
    clean = compare(policy, "anonymous", 4 << 20, 2, _fake_real(policy, run), absent)
    assert clean.agreed, [r for r in clean.rows if r.verdict == "DISAGREE"]
    assert any(r.verdict == "explained" and r.counter == "pf_taken" for r in clean.rows)
    fn = "kvm_set_pfn_dirty" if policy == "legacy" else "kvm_release_page_dirty"
    broken = compare(policy, "anonymous", 4 << 20, 2, _fake_real(policy, run, bump=(("clear", 1), fn)), absent)
    assert not broken.agreed
    assert [(r.phase, r.counter) for r in broken.rows if r.verdict == "DISAGREE"] == [("clear", fn)]


def test_bench_oracle_rejects_what_the_selftest_cannot_do():
    from kvmsim.cli import cli
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "--backend", "oracle", "-v", "2"])
    assert r.exit_code == 2 and "-v: not supported with --backend oracle" in r.output
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "--backend", "oracle", "-s", "anonymous_hugetlb_1gb",
                                 "-b", "64M", "--json"])
    assert r.exit_code == 2 and "multiple of 1G" in json.loads(r.output)["error"]


# ---- boots: one per kernel for the module --------------------------------------------------------------

BOOT_TESTS = ("dirty_log_test -M dirty-ring", "dirty_log_page_splitting_test", "set_memory_region_test",
              "pre_fault_memory_test", "guest_memfd_test")
BENCH_RUNS = (("anonymous", 16 << 20, 2), ("anonymous_hugetlb_2mb", 16 << 20, 2))


def _why_not() -> str | None:
    from kvmsim.backend.oracle.boot import qemu_binary
    from kvmsim.backend.oracle.initramfs import find_busybox
    from kvmsim.backend.oracle.kernels import default_kernel_dir, find_kernels
    if os.environ.get("KVMSIM_ORACLE") == "0":
        return "KVMSIM_ORACLE=0"
    if qemu_binary() is None:
        return "qemu-system-x86_64 not installed (kvmsim oracle setup)"
    if find_busybox() is None:
        return "busybox not installed (kvmsim oracle setup)"
    if not any(k.release in ("6.12.0", "6.13.7") for k in find_kernels()):
        return f"no 6.12.0/6.13.7 oracle kernels in {default_kernel_dir()}"
    return None


@pytest.fixture(scope="module")
def booted():
    """{release: (bench result, selftest results)}: one boot per kernel runs both."""
    why = _why_not()
    if why:
        pytest.skip(f"oracle kernels unusable: {why}")
    from kvmsim.backend.oracle.boot import BootConfig
    from kvmsim.backend.oracle.kernels import find_kernels
    from kvmsim.backend.oracle.selftests import classify, run_batch, selftest_dir_for
    from kvmsim.bench.oracle import PROBES, real_runs

    def one(k):
        d, _ = selftest_dir_for(k)
        if d is None:
            return None
        tests = [t for t in SELFTESTS if t.name in BOOT_TESTS]
        specs = real_runs(d, BENCH_RUNS) + [t.runner_spec(d) for t in tests]
        result, _ = run_batch(k, specs, PROBES, config=BootConfig(timeout=400, hugepages_2m=64, hugepages_1g=0))
        by = {r["name"]: r for r in result["runs"]}
        bench = [compare(k.policy, b, s, i, by[b], result["absent"]) for b, s, i in BENCH_RUNS]
        outcomes = {t.name: classify(t.name, by[t.name]["returncode"], by[t.name]["output"],
                                     by[t.name]["timed_out"]) for t in tests}
        return k.release, (k.policy, bench, outcomes, result)

    from concurrent.futures import ThreadPoolExecutor
    kernels = [k for k in find_kernels() if k.release in ("6.12.0", "6.13.7")]
    with ThreadPoolExecutor(2) as pool:                    # the two boots side by side
        out = dict(r for r in pool.map(one, kernels) if r)
    if not out:
        pytest.skip("no selftest builds beside the 6.12.0/6.13.7 kernels")
    return out


def test_real_dirty_log_perf_test_agrees_with_the_model(booted):
    for release, (policy, bench, _, _) in booted.items():
        for b in bench:
            bad = [r for r in b.rows if r.verdict == "DISAGREE"]
            assert not b.error and not bad, (release, b.backing, b.error, bad[:5])


def test_the_protocol_difference_is_in_the_real_counts(booted):
    """v6.12 marks every written page dirty when CLEAR_DIRTY_LOG write-protects it; v6.13 has no
    kvm_set_pfn_dirty at all and releases the faulted pages dirty."""
    for release, (policy, bench, _, _) in booted.items():
        rows = {(r.phase, r.iteration, r.counter): r for r in bench[0].rows}
        if policy == "legacy":
            assert rows[("clear", 1, "kvm_set_pfn_dirty")].real == 4096
            assert rows[("populate", None, "kvm_release_page_dirty")].real == 0
        else:
            assert rows[("clear", 1, "kvm_set_pfn_dirty")].real is None
            assert rows[("populate", None, "kvm_release_page_dirty")].real >= 4096


def test_huge_pages_come_back_only_in_613(booted):
    """Disabling dirty logging over 2 MiB hugetlb: v6.12 zaps the collapsible 4 KiB SPTEs (no 2 MiB
    leaf until the next fault), v6.13 recovers the huge mappings in place."""
    for release, (policy, bench, _, _) in booted.items():
        rows = {(r.phase, r.iteration, r.counter): r for r in bench[1].rows}
        assert rows[("disable", None, "pages_2m")].real == (0 if policy == "legacy" else 8)


@pytest.mark.parametrize("name", BOOT_TESTS)
def test_selftest_assertions_hold(booted, name):
    for release, (_, _, outcomes, _) in booted.items():
        o = outcomes[name]
        assert o.outcome in ("pass", "skip"), (release, name, o.detail)
        if name == "guest_memfd_test":
            # neither kernel builds KVM_SW_PROTECTED_VM: no VM type with guest_memfd
            assert o.outcome == "skip" and "KVM_CAP_GUEST_MEMFD" in o.detail
        elif name != "pre_fault_memory_test":
            assert o.outcome == "pass", (release, name, o.detail)


def test_runner_ran_realtime_for_phase_splitting(booted):
    for release, (_, _, _, result) in booted.items():
        assert all(r["realtime"] for r in result["runs"] if r.get("snapshots") and len(r["snapshots"]) > 2), \
            f"{release}: the runner could not take SCHED_FIFO, phases may be misattributed"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
