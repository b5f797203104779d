import os

import pytest

from kvmsim.backend.conformance import model_backend, real_backend


@pytest.fixture(scope="session")
def real():
    b, why = real_backend()
    if b is None:
        if os.environ.get("KVMSIM_REAL_KVM", "").strip() in ("1", "force"):
            pytest.fail(f"KVMSIM_REAL_KVM=1 but the real backend is unusable: {why}")
        pytest.skip(f"real /dev/kvm not usable: {why}")
    yield b
    b.close()


@pytest.fixture
def model():
    b = model_backend()          # the host's protocol (conformance.host_protocol)
    yield b
    b.close()
