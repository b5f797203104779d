"""Fixtures for the backend tests.

Tests marked ``kvm`` (and tests using the ``kvm`` fixture) need a usable ``/dev/kvm``: they skip with
the reason from ``kvm_available()``, or fail instead when ``KVMSIM_REAL_KVM=1`` forces real-KVM use.
Every ``kvm`` test also asserts that the kernel logged no new KVM WARN/BUG while it ran.
"""

from __future__ import annotations

import pytest

from kvmsim.backend.availability import kvm_available, real_kvm_mode


def require_kvm() -> None:
    ok, reason = kvm_available()
    if not ok:
        if real_kvm_mode() == "force":
            pytest.fail(f"KVMSIM_REAL_KVM=1 but /dev/kvm is not usable: {reason}")
        pytest.skip(f"real /dev/kvm not usable: {reason}")


@pytest.fixture(autouse=True)
def _kvm_guard(request):
    """For ``kvm`` tests: require /dev/kvm, and fail the test if the kernel logged a KVM warning."""
    if request.node.get_closest_marker("kvm") is None:
        yield
        return
    require_kvm()
    from kvmsim.backend.kvm.dmesg import DmesgWatch

    watch = DmesgWatch()
    yield
    problems = watch.new_problems()
    assert not problems, "the kernel logged KVM warnings:\n" + "\n".join(problems)


@pytest.fixture
def kvm():
    """A fresh ``KvmBackend`` with a default VM; closed (every fd and mapping released) afterwards."""
    require_kvm()
    from kvmsim.backend.kvm import KvmBackend

    with KvmBackend() as b:
        b.create_vm()
        yield b
