"""The selftest flow through the Backend protocol (``kvmsim.bench.real``): on the model's backend
always, on the real /dev/kvm when it is usable (16 MiB: every real guest write is emulated)."""

import pytest

from kvmsim.backend.model import ModelBackend
from kvmsim.bench.dirty_log_perf import Options
from kvmsim.bench.real import REAL_MAX_BYTES, real_backend_or_reason, run_real
from kvmsim.errors import UsageError

NAMES = ["populate", "enable", "dirty", "get", "clear", "dirty", "get", "clear", "disable"]


def test_flow_through_the_backend_protocol():
    r = run_real(Options(vcpu_memory=4 << 20, slots=2), ModelBackend("series", "emulated"))
    assert [p.name for p in r.phases] == NAMES
    assert [p.iteration for p in r.phases if p.name == "dirty"] == [1, 2]


def test_no_manual_protect_has_no_clear_phase():
    r = run_real(Options(vcpu_memory=4 << 20, manual_protect=False), ModelBackend("legacy", "emulated"))
    assert "clear" not in [p.name for p in r.phases]


def test_real_side_refuses_more_than_1_gib():
    with pytest.raises(UsageError, match="1 GiB"):
        run_real(Options(vcpu_memory=REAL_MAX_BYTES, vcpus=2), ModelBackend("series", "emulated"))


@pytest.mark.kvm
def test_flow_on_the_real_kvm():
    backend, why = real_backend_or_reason()
    if backend is None:
        pytest.skip(f"real /dev/kvm not usable: {why}")
    r = run_real(Options(vcpu_memory=16 << 20), backend)
    assert [p.name for p in r.phases] == NAMES
    assert all(p.seconds > 0 for p in r.phases)
