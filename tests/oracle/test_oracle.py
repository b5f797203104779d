"""The hardware-mode suite on every oracle kernel: each case, model beside kernel, must agree.

The kernel side is booted once per kernel per session (conftest.py); the model side runs here.  The
disagreements the lead has been told about (docs/oracle.md, "Known disagreements") are listed in
``KNOWN`` with the kernel code that explains them and are expected to fail (strict: a fix turns them
into an XPASS, which fails until the entry is removed).  Nothing else may disagree.
"""

from __future__ import annotations

import pytest

from kvmsim.backend.oracle.cases import CASES, TABLE_CASE
from kvmsim.backend.oracle.compare import compare_kernel
from kvmsim.backend.oracle.kernels import find_kernels

pytestmark = pytest.mark.oracle

# (policy or None for both, case) → why the model disagrees with the kernel (reported to the lead).
KNOWN: dict[tuple[str | None, str], str] = {
}

RELEASES = [k.release for k in find_kernels()] or ["(no kernel)"]


@pytest.fixture(scope="session")
def oracle_rows(oracle_results):
    return {rel: {r.case: r for r in compare_kernel(res)} for rel, res in oracle_results.items()}


def _known(policy: str, case: str) -> str | None:
    return KNOWN.get((policy, case)) or KNOWN.get((None, case))


@pytest.mark.parametrize("case", [c.name for c in CASES])
@pytest.mark.parametrize("release", RELEASES)
def test_case_agrees_with_the_kernel(oracle_results, oracle_rows, request, release, case):
    if release not in oracle_rows:
        pytest.skip(f"kernel {release} was not booted")
    row = oracle_rows[release][case]
    if row.agree is None:
        pytest.skip(row.note)
    why = _known(oracle_results[release]["policy"], case)
    if why:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True))
    assert row.agree, (row.note, row.diffs)


def test_at_least_40_cases_per_kernel(oracle_rows):
    for release, rows in oracle_rows.items():
        ran = [r for r in rows.values() if r.agree is not None]
        assert len(ran) >= 40, (release, len(ran))


def test_no_kernel_warned(oracle_results):
    warned = {(rel, name): c["warnings"] for rel, res in oracle_results.items()
              for name, c in res["cases"].items() if c["warnings"]}
    assert warned == {}


# The README table (../shared/oracle/README.md), 1,000 pages: what each protocol calls, per phase.
TABLE = {
    "legacy": {"first write": {"kvm_release_pfn_clean": 1000, "mark_page_accessed": 2000},
               "MADV_DONTNEED": {"kvm_set_pfn_dirty": 1000, "kvm_set_pfn_accessed": 1000},
               "GET_DIRTY_LOG": {"kvm_set_pfn_dirty": 1000}},
    "series": {"first write": {"kvm_release_page_dirty": 1000, "mark_page_accessed": 1000},
               "MADV_DONTNEED": {"kvm_set_pfn_dirty": 0, "kvm_set_pfn_accessed": 0},
               "GET_DIRTY_LOG": {"kvm_set_pfn_dirty": 0}},
}


@pytest.mark.parametrize("release", RELEASES)
def test_readme_table_reproduced(oracle_results, oracle_rows, release):
    if release not in oracle_rows:
        pytest.skip(f"kernel {release} was not booted")
    policy = oracle_results[release]["policy"]
    row = oracle_rows[release][TABLE_CASE]
    for phase, want in TABLE[policy].items():
        for fn, n in want.items():
            model = row.model[phase].get(fn, 0)
            real = row.real[phase].get(fn, 0)
            assert model == n, (phase, fn, "model", model)
            assert real in (n, "absent") if n == 0 else real == n, (phase, fn, "kernel", real)
    # deleting the slot: legacy dirties every writable SPTE of the VM (zap-all), the series nothing
    dirty = row.model["delete slot"].get("kvm_set_pfn_dirty", 0)
    assert (dirty > 1000) if policy == "legacy" else dirty == 0
