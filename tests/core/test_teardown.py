"""VM destruction and mmu_notifier release: everything is zapped and KVM holds no reference."""

import pytest

from kvmsim.check import check_all
from kvmsim.mm.vma import VmaKind

from tests.helpers import make_vm


@pytest.mark.parametrize("arch", ["generic", "x86"])
def test_process_exit_release_zaps_everything(policy, arch):
    host, kvm, _, _ = make_vm(policy, arch=arch, size=0)
    vma = host.mm.mmap(16 * 4096, VmaKind.MEMFD)
    kvm.set_user_memory_region(0, 0, 16 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    for i in range(16):
        assert vcpu.write(i * 4096, i).ok
    assert len(list(kvm.arch.leaves())) > 0
    host.mm.exit_mmap()                                    # mmu_notifier release, then the VMAs go
    assert list(kvm.arch.leaves()) == []
    assert not kvm.host_refs
    spte_marks = [f for f in host.journal.facts if f.kvm and f.source.value == "spte"]
    # legacy pushes A/D from every zapped SPTE ("VM dying, marking accessed provides no value"); series none
    assert bool(spte_marks) == (policy == "legacy")


def test_vm_destroy_unmaps_host_maps_and_drops_references(policy):
    from kvmsim.kvm.host_map import kvm_vcpu_map
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    kvm_vcpu_map(vcpu, 2)
    assert kvm.host_refs
    kvm.destroy()
    assert not kvm.host_refs and not kvm.host_maps
    assert [v for v in check_all(kvm) if v.invariant == "INV-1"] == []
