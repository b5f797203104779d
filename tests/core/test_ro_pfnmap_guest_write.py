"""A guest write to a VM_PFNMAP page whose host PTE is present but read-only (dma-buf, perf ring).

``hva_to_pfn_remapped()`` answers KVM_PFN_ERR_RO_FAULT without trying a write fault.  x86's
``kvm_handle_error_pfn()`` turns that into RET_PF_EMULATE and the emulator's ``__copy_to_user()``
takes the host write fault, so the driver's ``pfn_mkwrite`` decides: accepted → the store lands,
refused → KVM_EXIT_MMIO.  arm64 ``user_mem_abort()`` and RISC-V ``kvm_riscv_gstage_map()`` return
-EFAULT for any error pfn, whatever the driver would have said.  Before issue 11 the model gave an
MMIO exit on x86 for both driver answers.
"""

import numpy as np
import pytest

from kvmsim.kvm.dirty import kvm_get_dirty_log
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.host import Host
from kvmsim.mm.vma import Pte, VmaKind

GPA = 1 << 31


def _vm(arch, policy, pte_write, flags=KVM_MEM(0)):
    host = Host()
    drv = host.add_driver("dmabuf", 2, "no_page", pte_write=pte_write, prefault=True)
    vma = host.mm.mmap(2 * 4096, VmaKind.PFNMAP, driver=drv)
    kvm = Kvm(host, policy=policy, arch=arch)
    kvm.set_user_memory_region(1, GPA, 2 * 4096, vma.start, flags)
    return host, kvm, vma, kvm.create_vcpu()


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_x86_emulates_and_pfn_mkwrite_accepts(policy):
    host, kvm, vma, vcpu = _vm("x86", policy, "on_write_fault")
    assert vcpu.read(GPA).ok
    assert not int(vma.pte[0]) & Pte.WRITE                       # present, read-only
    a = vcpu.write(GPA, 0x77)
    assert a.exit == Exit.OK
    assert host.mm.host_access(vma.start, False) == 0x77         # the store landed in the driver's page
    assert int(vma.pte[0]) & Pte.WRITE                           # pfn_mkwrite made the PTE writable
    assert vcpu.write(GPA, 0x78).ok
    assert host.mm.host_access(vma.start, False) == 0x78


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_x86_emulated_store_is_dirty_logged(policy):
    """``__kvm_write_guest_page()`` marks the page dirty after the copy."""
    host, kvm, vma, vcpu = _vm("x86", policy, "on_write_fault", KVM_MEM.LOG_DIRTY_PAGES)
    assert vcpu.write(GPA + 4096, 5).ok
    assert list(np.nonzero(kvm_get_dirty_log(kvm, 1))[0]) == [1]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_x86_refused_write_fault_is_an_mmio_exit(policy):
    host, kvm, vma, vcpu = _vm("x86", policy, "never")
    a = vcpu.write(GPA, 0x77)
    assert a.exit == Exit.MMIO and a.write
    assert host.mm.host_access(vma.start, False) == 0
    assert vcpu.read(GPA).ok                                      # reads still map


@pytest.mark.parametrize("arch", ["arm64", "riscv"])
@pytest.mark.parametrize("pte_write", ["on_write_fault", "never"])
@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_arm64_and_riscv_return_efault(arch, pte_write, policy):
    host, kvm, vma, vcpu = _vm(arch, policy, pte_write)
    assert vcpu.read(GPA).ok
    a = vcpu.write(GPA, 0x77)
    assert a.exit == Exit.EFAULT and a.errno == 14
    assert host.mm.host_access(vma.start, False) == 0
    assert not int(vma.pte[0]) & Pte.WRITE                       # KVM never asked the driver
