"""A one-page VM on the arm64 stage-2 MMU (:class:`kvmsim.arm64.Arm64Mmu`)."""

from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

PAGE = 4096


def make_vm(policy, *, kind=VmaKind.FILE, flags=KVM_MEM(0), ring=0):
    """Host + arm64 VM with one 4 KiB memslot at gpa 0 backed by one ``kind`` VMA, and one vCPU."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch="arm64")
    if ring:
        from kvmsim.kvm.dirty import enable_dirty_ring
        enable_dirty_ring(kvm, ring)
    vma = host.mm.mmap(PAGE, kind)
    kvm.set_user_memory_region(0, 0, PAGE, vma.start, flags)
    return host, kvm, vma, kvm.create_vcpu()
