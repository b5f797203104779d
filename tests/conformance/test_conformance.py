"""The conformance suite: the same cases on the model and (when usable) the real /dev/kvm."""

import pytest

from kvmsim.backend import conformance
from kvmsim.backend.conformance import CASES, model_backend, run_case, run_suite

CASE_IDS = [c.name for c in CASES]


def test_suite_is_large_enough():
    assert len(CASES) >= 50
    assert len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_model_runs_case(case, model):
    out = run_case(case, model)
    assert not (isinstance(out, str) and out.startswith("error:")), out


@pytest.mark.kvm
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_model_agrees_with_real_kvm(case, real):
    model = model_backend()                    # the host's own protocol (conformance.host_protocol)
    got_real = run_case(case, real)
    if isinstance(got_real, str) and got_real.startswith("skip:"):
        pytest.skip(got_real)
    assert run_case(case, model) == got_real


def test_policies_agree_on_everything_observable_here():
    """On an emulating host nothing in the suite depends on the page-reference protocol."""
    rows = run_suite([model_backend("series"), model_backend("legacy")])
    assert all(r.agree for r in rows), [r.case for r in rows if not r.agree]


def test_a_wrong_model_is_caught(monkeypatch):
    """Flip one modelled rule (the 64-page alignment of KVM_CLEAR_DIRTY_LOG): the suite must notice."""
    import kvmsim.kvm.dirty as dirty
    good = model_backend("series")
    reference = {c.name: run_case(c, good) for c in CASES if c.group == "dirty"}
    orig = dirty.kvm_clear_dirty_log

    def sloppy(kvm, slot_id, first_page, num_pages, bitmap=None):
        return orig(kvm, slot_id, first_page - (first_page & 63), num_pages + (-num_pages & 63), bitmap)

    monkeypatch.setattr(dirty, "kvm_clear_dirty_log", sloppy)
    bad = model_backend("series")
    differ = [c.name for c in CASES if c.group == "dirty" and run_case(c, bad) != reference[c.name]]
    assert "clear-log-alignment" in differ
