"""Random well-formed scenarios (tests/strategies.py) through the real loader and runner: every step
ends in a result or the kernel's errno, never a model exception, and no step runs away.

The budget is ``KVMSIM_FUZZ_EXAMPLES`` scenarios (default 300, the CI budget); run a large one with
``KVMSIM_FUZZ_EXAMPLES=5000 pytest tests/scenarios/test_fuzz.py``.  A step that takes longer than
``KVMSIM_FUZZ_STEP_SECONDS`` (default 60, far above any step of these sizes) is reported as a hang by
a watchdog (``SIGALRM``), which interrupts the model wherever it spins.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from hypothesis import HealthCheck, given, settings

from kvmsim.kvm.arch import ARCH_NAMES
from kvmsim.scenarios.loader import loads
from kvmsim.scenarios.runner import run
from tests.strategies import scenario_docs, to_toml

EXAMPLES = int(os.environ.get("KVMSIM_FUZZ_EXAMPLES", "300"))
STEP_SECONDS = float(os.environ.get("KVMSIM_FUZZ_STEP_SECONDS", "60"))


class StepHang(BaseException):
    """Raised by the watchdog in the thread running the model: no ``except Exception`` swallows it."""


class _Watchdog:
    """Re-armed after every step (the runner's ``progress`` callback): a per-step bound."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.step = 0

    def _fire(self, signum, frame):
        raise StepHang(f"step {self.step + 1} ran longer than {self.seconds:g} s")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def progress(self, i: int, n: int) -> None:
        self.step = i
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


def run_doc(doc: dict):
    """Load ``doc`` as scenario file text and run it under its policy, under the watchdog."""
    text = to_toml(doc)
    sc = loads(text, "fuzz.toml")
    with _Watchdog(STEP_SECONDS) as wd:
        return text, run(sc, sc.vm.policies[0], progress=wd.progress)


def model_failures(rr) -> list[str]:
    """What in a run is a model bug rather than a result: an exception, or a step that crashed."""
    out = []
    if rr.error is not None and "model raised" in rr.error:
        out.append(rr.error)
    if rr.error is None:
        out += [f"step {s.index} ({s.op}) crashed: {s.res.value}" for s in rr.steps if s.res.result == "crash"]
    return out


needs_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                       reason="the SIGALRM watchdog needs the main thread")


@needs_main_thread
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
@given(scenario_docs())
def test_random_scenarios_end_in_a_result_never_a_model_exception(doc):
    text, rr = run_doc(doc)
    assert not model_failures(rr), "\n".join(model_failures(rr)) + "\n--- scenario ---\n" + text


def test_the_watchdog_interrupts_a_spinning_step():
    """The bound is real: a step that never ends is reported, not waited for."""
    with pytest.raises(StepHang, match="step 1"):
        with _Watchdog(0.2):
            while True:
                pass


def test_the_fuzzer_counts_a_model_exception_as_a_failure(monkeypatch):
    """``model_failures`` sees an op that raises a Python exception (not a ModelError)."""
    from kvmsim.scenarios import ops
    doc = {"name": "boom", "vma": [{"name": "v0", "kind": "anon", "size": 4096}], "vm": {"policy": "series"},
           "memslot": [{"id": 0, "gpa": 0, "size": 4096, "vma": "v0"}], "step": [{"op": "fork"}]}

    def broken(env, a):
        raise IndexError("forged model bug")
        yield
    monkeypatch.setitem(ops.OPS, "fork", broken)
    _, rr = run_doc(doc)
    assert model_failures(rr) == ["step 1 (fork): model raised IndexError: forged model bug"]


def test_generated_documents_render_as_toml_the_loader_reads_back():
    """The TOML text is the document: loading it gives the same steps as loading the dict."""
    from hypothesis import find

    from kvmsim.scenarios.loader import scenario_from_dict
    doc = find(scenario_docs(), lambda d: any(s["op"] == "interleave" for s in d["step"]) and len(d["vma"]) > 1)
    a = loads(to_toml(doc), "fuzz.toml")
    b = scenario_from_dict(doc, file="fuzz.toml")
    assert [(s.op, s.describe()) for s in a.steps] == [(s.op, s.describe()) for s in b.steps]
    assert [v.name for v in a.vmas] == [v["name"] for v in doc["vma"]]


def test_the_strategies_cover_every_op_vma_kind_driver_class_and_arch():
    """A new op, VMA kind, pfn class or arch must be added to tests/strategies.py, or this fails."""
    from kvmsim.mm.page import PfnClass
    from kvmsim.mm.vma import VmaKind
    from kvmsim.scenarios.loader import VM
    from kvmsim.scenarios.ops import OP_ARGS
    from tests import strategies
    assert set(strategies.ALL_OPS) | {"interleave"} == set(OP_ARGS)
    assert set(strategies.PFN_CLASSES) == {c.name.lower() for c in PfnClass}
    kinds = {"anon", "anon_shared", "memfd", "file", "hugetlb", "pfnmap", "mixedmap"}
    assert kinds == {k.value for k in VmaKind}
    archs = {a for a, _ in strategies.ARCHES}
    assert archs == set(ARCH_NAMES)
    VM["arch"][0]("riscv")                                  # the loader takes each of them
