import pytest

from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

LOG = int(KVM_MEM.LOG_DIRTY_PAGES)


def make_vm(policy="series", size=4 << 20, kind=VmaKind.HUGETLB, page_size=1 << 21, flags=0, recording=True, **kw):
    h = Host(recording=recording)
    vma = h.mm.mmap(size, kind, page_size=page_size)
    kvm = Kvm(h, policy=policy, arch="x86", **kw)
    kvm.set_user_memory_region(0, 0, size, vma.start, flags)
    return h, vma, kvm, kvm.create_vcpu()


@pytest.fixture(params=["legacy", "series"])
def policy(request):
    return request.param
