"""``kvmsim oracle run``: boot each oracle kernel once, run the whole case batch in it (agent.py), then
the model beside it (compare.py).  Recorded kernel results can be reused (``results_from``), which is
what the mutation tests do.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmsim.backend.oracle.boot import BootConfig, OracleError, boot
from kvmsim.backend.oracle.compare import Row, compare_kernel
from kvmsim.backend.oracle.kernels import OracleKernel

SRC_DIR = Path(__file__).resolve().parents[3]          # .../src, put on the guest's PYTHONPATH


@dataclass
class KernelRun:
    kernel: OracleKernel
    results: dict
    boot_seconds: float = 0.0          # wall time of the whole boot (kernel + agent + power off)
    guest_uptime: float | None = None
    rows: list[Row] = field(default_factory=list)
    model_seconds: float = 0.0

    @property
    def agent_seconds(self) -> float:
        return float(self.results.get("seconds", 0.0))

    @property
    def agree(self) -> int:
        return sum(1 for r in self.rows if r.agree)

    @property
    def disagree(self) -> int:
        return sum(1 for r in self.rows if r.agree is False)

    def to_json(self) -> dict:
        return {"release": self.kernel.release, "policy": self.kernel.policy, "image": str(self.kernel.path),
                "boot_seconds": round(self.boot_seconds, 2), "guest_uptime": self.guest_uptime,
                "agent_seconds": self.agent_seconds, "model_seconds": round(self.model_seconds, 2),
                "absent": sorted(self.results.get("absent", {})),
                "cases": [r.to_json() for r in self.rows]}


def record_kernel(kernel: OracleKernel, out_dir: str | os.PathLike | None = None,
                  cases: list[str] | None = None, config: BootConfig | None = None) -> tuple[dict, float, float | None]:
    """Boot ``kernel`` once and run the agent over the cases; returns (results, wall s, guest uptime)."""
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvmsim-oracle-out-")
        out_dir = tmp.name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)
    python = sys.executable
    cmd = f"{python} -m kvmsim.backend.oracle.agent $OUT {' '.join(cases or [])}"
    try:
        res = boot(kernel.path, cmd, out, env={"PYTHONPATH": str(SRC_DIR)}, config=config or BootConfig())
        path = out / "results.json"
        if res.returncode != 0 or not path.exists():
            raise OracleError(f"{kernel.path.name}: the agent exited {res.returncode}:\n{res.command_log[-3000:]}")
        results = json.loads(path.read_text())
        return results, res.seconds, res.uptime
    finally:
        if tmp is not None:
            tmp.cleanup()


def run_kernel(kernel: OracleKernel, *, results_from: dict | None = None, out_dir=None,
               config: BootConfig | None = None) -> KernelRun:
    if results_from is None:
        results, secs, up = record_kernel(kernel, out_dir, config=config)
    else:
        results, secs, up = results_from, 0.0, None
    run = KernelRun(kernel, results, secs, up)
    t0 = time.perf_counter()
    run.rows = compare_kernel(results, kernel.policy)
    run.model_seconds = time.perf_counter() - t0
    return run
