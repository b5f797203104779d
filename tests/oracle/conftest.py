"""The oracle kernels, booted once per test session.

``oracle_results`` boots every kernel of ``../shared/oracle`` (or ``$KVMSIM_ORACLE_KERNELS``) once, two
at a time, runs the whole case batch in each and returns ``{release: results}``; tests that need it
skip with the reason when QEMU or the kernels are missing.  ``KVMSIM_ORACLE=0`` disables the boots;
``KVMSIM_ORACLE_RECORDED=DIR`` reuses ``DIR/results-<release>.json`` (``kvmsim oracle run --save DIR``)
instead of booting.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvmsim.backend.oracle.boot import qemu_binary
from kvmsim.backend.oracle.initramfs import find_busybox
from kvmsim.backend.oracle.kernels import default_kernel_dir, find_kernels


def _why_not() -> str | None:
    if os.environ.get("KVMSIM_ORACLE") == "0":
        return "KVMSIM_ORACLE=0"
    if os.environ.get("KVMSIM_ORACLE_RECORDED"):
        return None
    if qemu_binary() is None:
        return "qemu-system-x86_64 not installed (kvmsim oracle setup)"
    if find_busybox() is None:
        return "busybox not installed (kvmsim oracle setup)"
    if not find_kernels():
        return f"no oracle kernels (bzImage-*) in {default_kernel_dir()}"
    if not os.access("/", os.R_OK):
        return "the host root is not readable"
    return None


@pytest.fixture(scope="session")
def oracle_results(tmp_path_factory) -> dict[str, dict]:
    why = _why_not()
    if why:
        pytest.skip(f"oracle kernels unusable: {why}")
    kernels = find_kernels()
    recorded = os.environ.get("KVMSIM_ORACLE_RECORDED")
    if recorded:
        out = {}
        for k in kernels:
            p = Path(recorded) / f"results-{k.release}.json"
            if p.exists():
                out[k.release] = json.loads(p.read_text())
        if not out:
            pytest.skip(f"no results-<release>.json in {recorded}")
        return out
    from kvmsim.backend.oracle.run import record_kernel

    base = tmp_path_factory.mktemp("oracle")

    def one(k):
        results, secs, up = record_kernel(k, base / k.release)
        results["_boot_seconds"] = secs
        return k.release, results

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, kernels))


def results_for(oracle_results: dict, policy: str) -> dict:
    """The recorded results of the first kernel running ``policy``."""
    for release, res in sorted(oracle_results.items()):
        if res["policy"] == policy:
            return res
    pytest.skip(f"no oracle kernel with the {policy} protocol")
