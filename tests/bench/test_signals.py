"""``kvmsim bench dirty-log`` as a real process: SIGTERM, SIGINT or SIGKILL to it never leaves the
forked worker running (it used to be orphaned and run on for minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmsim

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not hasattr(os, "fork"),
                                reason="needs fork and /proc (Linux)")

#: A run that takes far longer than any test waits (a million iterations), in little memory.
LONG_RUN = ["bench", "dirty-log", "-b", "64M", "-i", "1000000", "-w", "50", "--policy", "series", "--no-warmup"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    """Running, not gone or a zombie waiting for whoever inherited it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(cond, what: str, limit: float = 120.0) -> None:
    """Poll ``cond`` (a generous limit against a stuck test, not a timing assertion)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def _start():
    env = dict(os.environ, PYTHONPATH=str(Path(kvmsim.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "kvmsim", *LONG_RUN], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: _children(proc.pid) or proc.poll() is not None, "the worker to start")
    kids = _children(proc.pid)
    assert kids and proc.poll() is None, proc.communicate()
    return proc, kids


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_signal_to_the_parent_stops_the_worker(sig, code):
    proc, kids = _start()
    try:
        assert all(_alive(k) for k in kids)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert b"Traceback" not in err
        _wait_for(lambda: not any(_alive(k) for k in kids), "the worker to stop")
    finally:
        proc.kill()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


def test_sigkill_of_the_parent_takes_the_worker_with_it():
    """PR_SET_PDEATHSIG: even a parent that cannot clean up does not leave the worker behind."""
    proc, kids = _start()
    try:
        proc.kill()                              # before or after the worker's prctl(): it checks getppid()
        proc.wait(timeout=60)
        _wait_for(lambda: not any(_alive(k) for k in kids), "the worker to die with its parent")
    finally:
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
