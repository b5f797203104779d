"""A small VM on the RISC-V G-stage MMU (:class:`kvmsim.riscv.RiscvMmu`)."""

from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

PAGE = 4096


def make_vm(policy, *, kind=VmaKind.FILE, flags=KVM_MEM(0), pages=1, manual_protect=0):
    """Host + RISC-V VM with one ``pages``-page memslot at gpa 0 backed by one ``kind`` VMA, and one vCPU."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch="riscv")
    if manual_protect:
        from kvmsim.kvm.dirty import enable_manual_protect
        enable_manual_protect(kvm, manual_protect)
    vma = host.mm.mmap(pages * PAGE, kind)
    kvm.set_user_memory_region(0, 0, pages * PAGE, vma.start, flags)
    return host, kvm, vma, kvm.create_vcpu()
