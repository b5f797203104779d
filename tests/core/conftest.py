import pytest

from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host


@pytest.fixture(params=["legacy", "series"])
def policy(request):
    return request.param


def make_vm(policy, **kw):
    host = Host()
    kw.setdefault("arch", "generic")
    kvm = Kvm(host, policy=policy, **kw)
    return host, kvm
