"""Session-wide guards: the suite never leaves host settings changed, and never provokes a KVM warning.

Host settings that the real backend may touch only when asked (hugepages, THP) are read before the
session and compared after it; the kernel log is snapshotted (``/dev/kmsg`` through the backend's
``DmesgWatch``, else ``dmesg``) and any new KVM warning-level line or WARN/BUG fails the run.
"""

import pathlib
import subprocess

import pytest

SETTINGS = [
    "/proc/sys/vm/nr_hugepages",
    "/proc/sys/vm/nr_overcommit_hugepages",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
]


def _read_settings() -> dict:
    out = {}
    for p in SETTINGS:
        try:
            out[p] = pathlib.Path(p).read_text().strip()
        except OSError:
            pass
    return out


def _dmesg() -> list[str] | None:
    try:
        r = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.splitlines() if r.returncode == 0 else None


def _kvm_warnings(lines: list[str]) -> list[str]:
    keys = ("WARNING", "BUG", "kvm_dirty_ring_push", "Call Trace")
    return [line for line in lines if any(k in line for k in keys) and ("kvm" in line.lower() or "Call Trace" in line)]


def _watch():
    try:
        from kvmsim.backend.kvm.dmesg import DmesgWatch
    except ImportError:
        return None
    w = DmesgWatch()
    return w if w.available else None


@pytest.fixture(params=["legacy", "series"])
def policy(request):
    """Each test taking ``policy`` runs under v6.12 (legacy) and v6.13 (series)."""
    return request.param


def pytest_sessionstart(session):
    session.config._kvmsim_settings = _read_settings()
    session.config._kvmsim_watch = _watch()
    session.config._kvmsim_dmesg = None if session.config._kvmsim_watch else _dmesg()


def pytest_sessionfinish(session, exitstatus):
    cfg = session.config
    problems = []
    after = _read_settings()
    for k, v in getattr(cfg, "_kvmsim_settings", {}).items():
        if after.get(k) != v:
            problems.append(f"host setting {k} changed: {v!r} -> {after.get(k)!r}")
    watch = getattr(cfg, "_kvmsim_watch", None)
    if watch is not None:
        problems.extend(f"new kernel warning: {line}" for line in watch.new_problems())
    before = getattr(cfg, "_kvmsim_dmesg", None)
    now = _dmesg() if before is not None else None
    if before is not None and now is not None:
        new = now[len(before):] if now[:len(before)] == before else [l for l in now if l not in set(before)]
        problems.extend(f"new kernel warning: {l}" for l in _kvm_warnings(new))
    if problems:
        tr = cfg.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("")
            for p in problems:
                tr.write_line(f"kvmsim host guard: {p}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
