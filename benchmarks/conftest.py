"""pytest-benchmark suite of the model (not collected by ``python -m pytest -q``: testpaths is ``tests``).

Run ``python -m pytest benchmarks`` (add ``--bench-big`` for the 64 GiB and 256 GiB flows).  Each
benchmark's numbers (best wall time, plus its own extra numbers: faults/s, peak RSS, counters) are
merged into ``benchmarks/results.json``, which is kept in the repository: ``git diff`` shows a
regression, and the end of the run prints each number next to the recorded one.
``KVMSIM_BENCH_RECORD=0`` runs without touching the file.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess

import pytest

RESULTS = pathlib.Path(__file__).with_name("results.json")
_new: dict[str, dict] = {}


def pytest_addoption(parser):
    parser.addoption("--bench-big", action="store_true", help="also run the 64 GiB / 256 GiB flows")
    parser.addoption("--no-warmup", action="store_true", help="skip the memory warm-up (see warm_memory)")


@pytest.fixture(scope="session", autouse=True)
def warm_memory(request):
    """Write, once, as much memory as the largest flow needs, then free it.

    On the development machines (themselves VMs) the first write to memory the machine never
    touched costs several µs per 4 KiB page more (kvm-on-these-machines.md §2: "Benchmarks must warm
    up, interleave variants, or prepopulate"); without this, whichever flow runs first pays it."""
    if request.config.getoption("--no-warmup"):
        return
    import numpy as np
    size = (5 << 30) if request.config.getoption("--bench-big") else (256 << 20)
    buf = np.ones(size // 8, dtype=np.int64)
    del buf


def pytest_configure(config):
    config.addinivalue_line("markers", "big: 64 GiB and larger flows (need --bench-big)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-big"):
        return
    skip = pytest.mark.skip(reason="large flow: pass --bench-big")
    for item in items:
        if "big" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def record(request, benchmark):
    """``record(**extra)`` after the benchmark ran: stores its best/mean time and ``extra``."""
    def _record(**extra):
        st = benchmark.stats.stats if benchmark.stats else None
        entry = {"seconds_min": round(st.min, 6) if st else None,
                 "seconds_mean": round(st.mean, 6) if st else None,
                 "rounds": st.rounds if st else 0}
        entry.update(extra)
        _new[request.node.name] = entry
    return _record


def _targets(new: dict, recorded: dict) -> list[str]:
    """The issue's targets, judged on this run's numbers (a 256 GiB run against the recorded 64 GiB
    run of the same backing when this run has none)."""
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'MISS'} {text}")

    for policy in ("legacy", "series"):
        e = new.get(f"test_flow_64g_anonymous[{policy}]")
        if e:
            line(e["flow_seconds"] <= 10 and e["peak_rss_mib"] <= 1.5 * 1024,
                 f"64 GiB anonymous, {policy}: {e['flow_seconds']} s (<= 10), {e['peak_rss_mib']} MiB (<= 1536)")
        for gib in (4, 16):
            e = new.get(f"test_w50_vs_w100[{gib}-{policy}]")
            if e:
                line(e["ratio"] <= 1.5, f"-w 50 / -w 100 flow, {gib} GiB, {policy}: {e['ratio']}x (<= 1.5x, CPU time)")
        e = new.get(f"test_flow_floor_64g[{policy}]")
        if e:
            m = e.get("floor_multiple_cpu", e["floor_multiple"])
            line(m <= 2, f"64 GiB 4 KiB flow, {policy}: {m}x its memory floor in CPU time (<= 2x; wall "
                         f"{e['floor_multiple']}x)")
        e = new.get(f"test_hugetlb_vs_4k[64-{policy}]")
        if e:
            line(max(e["ratio_2m"], e["ratio_1g"]) <= 1.0,
                 f"64 GiB hugetlb / 4 KiB flow, {policy}: 2M {e['ratio_2m']}x, 1G {e['ratio_1g']}x "
                 "(<= 1.0x, CPU time of the phases)")
        e = new.get(f"test_scalar_faults_per_second[host-mapped-{policy}]")
        if e:
            line(e["faults_per_second"] >= 100_000,
                 f"scalar faults, {policy}: {e['faults_per_second']}/s (>= 100,000, CPU time)")
    for key, e in sorted(new.items()):
        if key.startswith("test_explorer_reduction["):
            line(e["schedule_ratio"] >= 10, f"explorer {e['race']} bound {e['bound']}: {e['none_schedules']} -> "
                                            f"{e['dpor_schedules']} schedules with DPOR ({e['schedule_ratio']}x, >= 10x)")
    for backing, small in (("anonymous", "test_flow_64g_anonymous[{p}]"),
                           ("anonymous_hugetlb_1gb", "test_flow_64g_hugetlb_1gb[{p}]")):
        for policy in ("legacy", "series"):
            big = new.get(f"test_flow_256g[{backing}-{policy}]")
            base = new.get(small.format(p=policy)) or recorded.get(small.format(p=policy))
            if big and base:
                r = big["flow_seconds"] / base["flow_seconds"]
                line(r <= 4.5, f"256 GiB / 64 GiB, {backing}, {policy}: {r:.2f}x (<= 4.5x)")
    return out


def _headline(entry: dict) -> str:
    """The number a run is judged by: a flow's own wall time (``flow_seconds``: the timed call also
    forks a child and warms its memory), else the benchmark's best time."""
    return "flow_seconds" if "flow_seconds" in entry else "seconds_min"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def pytest_terminal_summary(terminalreporter):
    if not _new:
        return
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmarks": {}}
    tr = terminalreporter
    tr.section("kvmsim benchmarks vs benchmarks/results.json")
    for name, e in sorted(_new.items()):
        prev = old["benchmarks"].get(name, {})
        key = _headline(e)
        a, b = e.get(key), prev.get(key)
        ratio = f"{a / b:.2f}x of recorded" if a and b else "new"
        tr.write_line(f"{name}: {key} {a} ({ratio})")
    for line in _targets(_new, old["benchmarks"]):
        tr.write_line(line)
    if os.environ.get("KVMSIM_BENCH_RECORD", "1") == "0":
        return
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for e in _new.values():
        e["recorded_at"] = stamp
        e["commit"] = _git_commit()
    old["benchmarks"].update(_new)
    old["machine"] = {"cpus": os.cpu_count(), "uname": " ".join(os.uname()[2:5])}
    RESULTS.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
