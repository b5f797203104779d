"""The kernel's own KVM selftests (tools/testing/selftests/kvm/) run inside the oracle kernels: where each
kernel's build is, how one boot runs a batch of them (:mod:`selftest_runner` inside the guest), and how
their output is read (KSFT exit codes, ``==== Test Assertion Failure ====`` blocks, and the per-phase
lines of ``dirty_log_perf_test.c``: ``pr_info("Iteration %d dirty memory time: %ld.%.9lds\\n", ...)``).

Binaries from one tree expect that tree's uAPI: each kernel runs the set built from its own tree
(``selftests-<release>`` beside the bzImage); a stable release of the same line (6.12.117) uses its
line's set (``selftests-6.12.0``) when there is no set of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvmsim.backend.oracle.boot import BootConfig, BootResult, OracleError, boot
from kvmsim.backend.oracle.kernels import OracleKernel, parse_release

RUNNER = Path(__file__).with_name("selftest_runner.py")

#: tools/testing/selftests/kselftest.h exit codes.
KSFT_PASS, KSFT_FAIL, KSFT_XFAIL, KSFT_XPASS, KSFT_SKIP = 0, 1, 2, 3, 4

#: dirty_log_perf_test.c's per-phase ``pr_info`` lines → (phase, iteration), the names
#: :mod:`kvmsim.bench.dirty_log_perf` gives its phases.
PHASE_LINE = re.compile(r"^(?:(Populate memory)|(Enabling dirty logging)|(Disabling dirty logging)|"
                        r"Iteration (\d+) (dirty memory|get dirty log|clear dirty log)) time: (\d+)\.(\d+)s$")
_ITER_PHASE = {"dirty memory": "dirty", "get dirty log": "get", "clear dirty log": "clear"}


def parse_phase_line(line: str) -> tuple[str, int | None, float] | None:
    """``(phase, iteration, seconds)`` of one dirty_log_perf_test phase line, else None."""
    m = PHASE_LINE.match(line.strip())
    if not m:
        return None
    populate, enable, disable, it, what, sec, frac = m.groups()
    seconds = int(sec) + int(frac) / 10 ** len(frac)
    if populate:
        return "populate", None, seconds
    if enable:
        return "enable", None, seconds
    if disable:
        return "disable", None, seconds
    return _ITER_PHASE[what], int(it), seconds


@dataclass
class RealPhase:
    """One phase of a selftest run in a real kernel: kprobe hits (``None``: the function is absent from
    that kernel) and KVM stat deltas between the phase line before it and its own line; ``stats_end``
    holds the ``pages_*`` gauges when the phase ended."""

    name: str
    iteration: int | None
    seconds: float | None
    calls: dict[str, int | None] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    stats_end: dict[str, int] = field(default_factory=dict)


GAUGES = ("pages_4k", "pages_2m", "pages_1g")


def split_phases(snapshots: list[dict], absent: dict[str, str] | None = None) -> list[RealPhase]:
    """Per-phase deltas from the runner's snapshots (one before the selftest, one per phase line, one
    after it exited).  The segment ending at a phase line is that phase; the last segment (vCPU threads
    joined, VM destroyed) is ``teardown``, where the VM's stats are gone (only kprobe hits are kept)."""
    out: list[RealPhase] = []
    for k in range(1, len(snapshots)):
        before, after = snapshots[k - 1]["counts"], snapshots[k]["counts"]
        line = snapshots[k]["line"]
        if line is None:
            if k != len(snapshots) - 1:
                continue
            name, it, secs = "teardown", None, None
        else:
            parsed = parse_phase_line(line)
            if parsed is None:
                continue
            name, it, secs = parsed
        calls: dict[str, int | None] = {fn: None for fn in (absent or {})}
        stats, end = {}, {}
        for key, v in after.items():
            if key.startswith("stat."):
                if name == "teardown":
                    continue
                s = key[5:]
                if s in GAUGES:
                    end[s] = v
                if key in before:
                    stats[s] = v - before[key]
            else:
                calls[key] = v - before.get(key, 0)
        out.append(RealPhase(name, it, secs, calls, stats, end))
    return out


def selftest_dir_for(kernel: OracleKernel) -> tuple[Path | None, str]:
    """``(directory, note)``: the kernel's own selftest build, else its line's ``.0`` build, else None."""
    base = kernel.path.parent
    own = base / f"selftests-{kernel.release}"
    if own.is_dir():
        return own, ""
    major, minor, _ = parse_release(kernel.release)
    line = base / f"selftests-{major}.{minor}.0"
    if line.is_dir():
        return line, f"no selftests-{kernel.release}: using {line.name} (same uAPI line)"
    return None, f"no selftest build for {kernel.release} (looked for {own.name} and {line.name})"


def run_batch(kernel: OracleKernel, runs: list[dict], probes: tuple[str, ...] = (), *,
              config: BootConfig | None = None, results_dir: str | Path | None = None,
              python: str | None = None, hold_vm: bool = False) -> tuple[dict, BootResult]:
    """Boot ``kernel`` once and run ``runs`` (runner specs: name, argv, phase_re, timeout, setup) with
    ``probes`` counted; returns the runner's result JSON and the boot result.

    Raises :class:`OracleError` when the boot fails or the runner left no result."""
    import sys
    own_tmp = results_dir is None
    out = Path(tempfile.mkdtemp(prefix="kvmsim-selftests-")) if own_tmp else Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / "spec.json").write_text(json.dumps({"probes": list(probes), "runs": runs, "hold_vm": hold_vm}))
        (out / "result.json").unlink(missing_ok=True)
        py = python or sys.executable
        cmd = f"{py} -S {RUNNER} $OUT/spec.json $OUT/result.json"
        timeout = sum(float(r.get("timeout", 120)) for r in runs) + 120
        cfg = config or BootConfig(timeout=timeout)
        res = boot(kernel.path, cmd, out, config=cfg)
        path = out / "result.json"
        if not path.exists():
            raise OracleError(f"{kernel.path.name}: the selftest runner wrote no result (exit "
                              f"{res.returncode}); its output:\n{res.command_log[-3000:]}")
        return json.loads(path.read_text()), res
    finally:
        if own_tmp:
            shutil.rmtree(out, ignore_errors=True)


# ---- the selftest set: small arguments, so the whole set takes a few minutes under TCG ----
# Left out: demand_paging_test -u (the oracle kernels have no CONFIG_USERFAULTFD: userfaultfd() is ENOSYS).

_NX_PARAMS = "/sys/module/kvm/parameters"


@dataclass(frozen=True)
class Selftest:
    """One selftest invocation: binary, arguments, guest setup commands, timeout, and what it checks."""

    name: str
    binary: str
    args: tuple[str, ...] = ()
    checks: str = ""
    setup: tuple[str, ...] = ()
    timeout: float = 120.0
    phased: bool = False
    drop_caps: tuple[str, ...] = ()
    cpus: int = 1                      # guest CPUs the selftest needs (one boot per distinct count)

    def runner_spec(self, directory: Path) -> dict:
        spec = {"name": self.name, "argv": [str(directory / self.binary), *self.args],
                "timeout": self.timeout, "setup": list(self.setup), "drop_caps": list(self.drop_caps)}
        if self.phased:
            spec["phase_re"] = PHASE_LINE.pattern
        return spec


SELFTESTS: tuple[Selftest, ...] = (
    Selftest("dirty_log_perf_test", "dirty_log_perf_test", ("-b", "16M", "-i", "2"),
             "the memstress flow: populate, dirty passes, GET/CLEAR_DIRTY_LOG, disable", phased=True),
    # dirty_log_test's memory is 1 GiB (DIRTY_MEM_BITS): a log mode writes all of it first (65-85 s under
    # TCG per mode), the dirty ring mode does not (3 s); -M dirty-log is left out for time
    Selftest("dirty_log_test -M dirty-ring", "dirty_log_test", ("-M", "dirty-ring", "-i", "3", "-c", "1024"),
             "every page the guest wrote is in the dirty ring, nothing else (exactness)"),
    Selftest("dirty_log_test -M clear-log", "dirty_log_test", ("-M", "clear-log", "-i", "3", "-I", "10"),
             "every page the guest wrote is in the log after GET + CLEAR (manual protect), exactness",
             timeout=240),
    Selftest("dirty_log_page_splitting_test", "dirty_log_page_splitting_test",
             ("-b", "32M", "-s", "anonymous_hugetlb_2mb"),
             "pages_4k/2m after enabling logging (eager split), after disabling (huge pages back)"),
    Selftest("access_tracking_perf_test", "access_tracking_perf_test", ("-b", "16M"),
             "page_idle: guest accesses clear the idle bit through the mmu notifier's young checks"),
    # calc_default_nr_vcpus() runs before the options: 3/4 of one CPU is no vCPU ("Uh, no CPUs?")
    Selftest("max_guest_memory_test", "max_guest_memory_test", ("-c", "1", "-m", "1", "-s", "1"),
             "a 1 GiB memslot faulted twice, slots deleted and memory unmapped while vCPUs hold SPTEs",
             timeout=300, cpus=2),
    Selftest("memslot_modification_stress_test", "memslot_modification_stress_test",
             ("-b", "16M", "-i", "5"), "memslots added and deleted while vCPUs fault"),
    # one test of six (-f 3 -e 3): each takes ~17 s under TCG, and the RW test (5) dies on its own alarm
    Selftest("memslot_perf_test", "memslot_perf_test", ("-f", "3", "-e", "3", "-l", "1", "-r", "1", "-s", "64"),
             "moving the active memslot area under a running guest: the guest's checks of memory contents",
             timeout=120),
    Selftest("demand_paging_test", "demand_paging_test", ("-b", "16M"), "first-touch faults of a region"),
    Selftest("kvm_page_table_test", "kvm_page_table_test", ("-b", "16M", "-s", "anonymous_thp"),
             "stage-2 table creation, dirty logging split and huge page restore"),
    # nx_huge_pages_test.sh's settings; without -r the test expects EPERM from
    # KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, which needs CAP_SYS_BOOT: drop it, as a non-root run would
    Selftest("nx_huge_pages_test", "nx_huge_pages_test", ("-t", "887563923", "-p", "100"),
             "NX huge page splits and recovery; disabling NX huge pages refused without CAP_SYS_BOOT",
             setup=(f"echo 1 > {_NX_PARAMS}/nx_huge_pages", f"echo 1 > {_NX_PARAMS}/nx_huge_pages_recovery_ratio",
                    f"echo 100 > {_NX_PARAMS}/nx_huge_pages_recovery_period_ms"), drop_caps=("CAP_SYS_BOOT",)),
    Selftest("nx_huge_pages_test -r", "nx_huge_pages_test", ("-t", "887563923", "-p", "100", "-r"),
             "the same with NX huge pages disabled for the VM (KVM_CAP_VM_DISABLE_NX_HUGE_PAGES)"),
    Selftest("set_memory_region_test", "set_memory_region_test", (),
             "memslot add/delete/move semantics, zero slots, max slots, overlaps", timeout=300),
    Selftest("guest_memfd_test", "guest_memfd_test", (), "guest_memfd file semantics (needs KVM_CAP_GUEST_MEMFD)"),
    Selftest("pre_fault_memory_test", "pre_fault_memory_test", (),
             "KVM_PRE_FAULT_MEMORY maps the range, ENOENT outside memslots"),
)


@dataclass
class SelftestOutcome:
    """One selftest's result in one kernel: ``pass``, ``skip`` (KSFT_SKIP, with the reason), ``fail``
    (with the assertion), ``timeout`` or ``missing`` (no binary)."""

    name: str
    outcome: str
    returncode: int | None
    seconds: float
    detail: str = ""
    ktap: dict[str, int] = field(default_factory=dict)
    tail: list[str] = field(default_factory=list)           # the last lines of its output


_ASSERT = "==== Test Assertion Failure ===="
_KTAP = re.compile(r"^(not ok|ok) \d+ ")


def classify(name: str, returncode: int | None, output: list[str], timed_out: bool = False,
             seconds: float = 0.0) -> SelftestOutcome:
    """A selftest's outcome from its exit status and output (kselftest.h exit codes; KTAP lines
    ``ok N``/``not ok N``, ``# SKIP``; test_util.c's assertion block)."""
    ktap = {"ok": 0, "not ok": 0, "skip": 0}
    for line in output:
        m = _KTAP.match(line)
        if m:
            ktap["skip" if "# SKIP" in line else m.group(1)] += 1
    detail = ""
    if _ASSERT in output:
        i = output.index(_ASSERT)
        detail = " | ".join(x.strip() for x in output[i + 1:i + 3] if x.strip())
        tail = [x.strip() for x in output[i + 3:i + 12] if x.strip() and not re.match(r"^\d+\s+0x", x.strip())]
        if tail:
            detail += " | " + tail[-1]
    if timed_out:
        return SelftestOutcome(name, "timeout", returncode, seconds, detail or "killed at its timeout", ktap)
    if returncode == KSFT_PASS and not ktap["not ok"]:
        return SelftestOutcome(name, "pass", returncode, seconds, "", ktap)
    if returncode == KSFT_SKIP:
        reason = next((x.split("SKIP", 1)[1].strip(" -") for x in output if "SKIP" in x), "")
        return SelftestOutcome(name, "skip", returncode, seconds, reason, ktap)
    if not detail:
        bad = [x for x in output if x.startswith("not ok")]
        detail = bad[0] if bad else (output[-1] if output else "")
    return SelftestOutcome(name, "fail", returncode, seconds, detail, ktap)


@dataclass
class KernelSelftests:
    """The set run in one kernel: outcomes, the boot's wall time and guest uptime, notes."""

    release: str
    policy: str
    selftest_dir: str | None
    outcomes: list[SelftestOutcome] = field(default_factory=list)
    boot_seconds: float | None = None
    uptime: float | None = None
    note: str = ""
    error: str = ""
    boots: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def run_selftests(kernel: OracleKernel, tests: tuple[Selftest, ...] = SELFTESTS, *,
                  config: BootConfig | None = None) -> KernelSelftests:
    """Boot ``kernel`` once per guest CPU count the ``tests`` need (one CPU for all but
    max_guest_memory_test) and run them from the kernel's own selftest build.  A two-CPU boot holds a
    VM open for its whole run (selftest_runner.hold_vm: TCG and kernel text patching)."""
    d, note = selftest_dir_for(kernel)
    out = KernelSelftests(kernel.release, kernel.policy, str(d) if d else None, note=note)
    if d is None:
        out.error = note
        return out
    by_name: dict[str, dict] = {}
    out.boot_seconds = out.uptime = 0.0
    for cpus in sorted({t.cpus for t in tests}):
        group = [t for t in tests if t.cpus == cpus and (d / t.binary).is_file()]
        if not group:
            continue
        cfg = config or BootConfig(timeout=sum(t.timeout for t in group) + 120, cpus=cpus, hugepages_2m=64,
                                   hugepages_1g=0)
        try:
            result, res = run_batch(kernel, [t.runner_spec(d) for t in group], config=cfg, hold_vm=cpus > 1)
        except OracleError as e:
            out.error += (f"{cpus}-CPU boot: " if len({t.cpus for t in tests}) > 1 else "") + str(e) + "\n"
            continue
        out.boot_seconds += res.seconds
        out.uptime += res.uptime or 0.0
        out.boots.append({"cpus": cpus, "seconds": res.seconds, "uptime": res.uptime,
                          "selftests": [t.name for t in group]})
        by_name.update({r["name"]: r for r in result["runs"]})
    for t in tests:
        r = by_name.get(t.name)
        if r is None:
            missing = not (d / t.binary).is_file()
            out.outcomes.append(SelftestOutcome(t.name, "missing" if missing else "not run", None, 0.0,
                                                f"no {t.binary} in {d}" if missing else "its boot failed"))
            continue
        o = classify(t.name, r["returncode"], r["output"], r.get("timed_out", False), r.get("seconds", 0.0))
        o.tail = r["output"][-25:]
        out.outcomes.append(o)
    out.error = out.error.strip()
    return out
