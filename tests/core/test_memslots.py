"""KVM_SET_USER_MEMORY_REGION(2) validation with the kernel's errno; dirty log ioctls; pfncache; gmem."""

import errno

import numpy as np
import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import (enable_dirty_ring, enable_manual_protect, kvm_clear_dirty_log, kvm_dirty_ring_harvest,
                              kvm_get_dirty_log, kvm_reset_dirty_rings)
from kvmsim.kvm.gmem import GuestMemfd
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.pfncache import GfnToPfnCache
from kvmsim.mm.vma import VmaKind

from tests.helpers import make_vm

MB = 1 << 20


@pytest.fixture
def vm():
    host, kvm, _, _ = make_vm("series")
    vma = host.mm.mmap(4 * MB, VmaKind.ANON_SHARED)
    return host, kvm, vma


def _errno(fn, *a, **kw):
    with pytest.raises(ModelError) as e:
        fn(*a, **kw)
    return e.value.errno


def test_region_errnos(vm):
    host, kvm, vma = vm
    s = kvm.set_user_memory_region
    s(0, 0, MB, vma.start)
    assert _errno(s, 1, 0x1000, MB, vma.start + MB) == errno.EEXIST           # overlap
    assert _errno(s, 1, 0x800, MB, vma.start) == errno.EINVAL                   # unaligned gpa
    assert _errno(s, 1, 2 * MB, 100, vma.start) == errno.EINVAL                 # unaligned size
    assert _errno(s, 1, 2 * MB, MB, vma.start + 1) == errno.EINVAL              # unaligned uaddr
    assert _errno(s, 1, 2 * MB, MB, vma.start, 1 << 7) == errno.EINVAL          # unknown flag
    assert _errno(s, 0, 0, MB, vma.start, KVM_MEM.READONLY) == errno.EINVAL     # RO toggle
    assert _errno(s, 0, 0, 2 * MB, vma.start) == errno.EINVAL                   # resize
    assert _errno(s, 32764, 8 * MB, MB, vma.start) == errno.EINVAL              # too many slots
    assert _errno(s, 5, 0, 0, 0) == errno.EINVAL                                # delete a missing slot
    assert _errno(s, 1, 2 * MB, MB, vma.start, KVM_MEM.GUEST_MEMFD, v1=True) == errno.EINVAL
    gmem = GuestMemfd(kvm, MB)
    assert _errno(s, 2, 4 * MB, MB, 0, KVM_MEM.GUEST_MEMFD | KVM_MEM.LOG_DIRTY_PAGES, guest_memfd=gmem) == errno.EINVAL
    assert _errno(s, 2, 4 * MB, MB, 0, KVM_MEM.GUEST_MEMFD | KVM_MEM.READONLY, guest_memfd=gmem) == errno.EINVAL
    s(2, 4 * MB, MB, 0, KVM_MEM.GUEST_MEMFD, guest_memfd=gmem)
    assert _errno(s, 2, 4 * MB, MB, 0, KVM_MEM.GUEST_MEMFD | 0, guest_memfd=gmem) == errno.EINVAL  # immutable
    assert s(0, 0, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES).value == "flags_only"
    assert s(0, 8 * MB, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES).value == "move"
    assert s(0, 0, 0, 0).value == "delete"
    assert _errno(GuestMemfd, kvm, MB, 4) == errno.EINVAL


def test_dirty_log_bitmap_and_clear(vm):
    host, kvm, vma = vm
    enable_manual_protect(kvm, 1)
    kvm.set_user_memory_region(0, 0, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    vcpu = kvm.create_vcpu()
    for g in (3, 70, 200):
        assert vcpu.write(g * 4096, g).ok
    got = np.nonzero(kvm_get_dirty_log(kvm, 0))[0].tolist()
    assert got == [3, 70, 200]
    assert np.nonzero(kvm_get_dirty_log(kvm, 0))[0].tolist() == got     # manual protect: not harvested
    assert _errno(kvm_clear_dirty_log, kvm, 0, 1, 64) == errno.EINVAL
    assert _errno(kvm_clear_dirty_log, kvm, 0, 0, 63) == errno.EINVAL
    kvm_clear_dirty_log(kvm, 0, 64, 64)
    assert np.nonzero(kvm_get_dirty_log(kvm, 0))[0].tolist() == [3, 200]
    assert vcpu.write(70 * 4096, 1).ok                                   # re-armed: logged again
    assert 70 in np.nonzero(kvm_get_dirty_log(kvm, 0))[0].tolist()


def test_dirty_ring_and_enxio(vm):
    host, kvm, vma = vm
    enable_dirty_ring(kvm, 1 << 16)
    kvm.set_user_memory_region(0, 0, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    vcpu = kvm.create_vcpu()
    assert _errno(enable_dirty_ring, kvm, 1 << 16) == errno.EINVAL
    for g in (1, 2, 9):
        vcpu.write(g * 4096, 1)
    assert sorted(o for _, o in kvm_dirty_ring_harvest(kvm, vcpu)) == [1, 2, 9]
    assert kvm_reset_dirty_rings(kvm) == 3
    assert _errno(kvm_get_dirty_log, kvm, 0) == errno.ENXIO


def test_pfncache_follows_invalidation(vm):
    host, kvm, vma = vm
    kvm.set_user_memory_region(0, 0, MB, vma.start)
    gpc = GfnToPfnCache(kvm)
    gpc.activate(0x3000)
    old = gpc.pfn
    assert gpc.check() and not kvm.host_refs                             # no reference while valid
    host.mm.madvise(vma.start + 0x3000, 4096, "REMOVE")
    assert not gpc.check()
    assert gpc.write(7)
    assert host.journal.counters["page_free"] >= 1                       # the old page was freed (its pfn may be reused)
    assert not host.phys.is_poisoned(gpc.pfn) and host.mm.host_access(vma.start + 0x3000, False) == 7


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pfncache_on_pfnmap_needs_writable_pte(policy):
    host, kvm, _, _ = make_vm(policy)
    drv = host.add_driver("perf", 2, "driver_refcounted", pte_write="on_write_fault")
    vma = host.mm.mmap(2 * 4096, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(0, 0, 2 * 4096, vma.start)
    gpc = GfnToPfnCache(kvm)
    gpc.active, gpc.gpa = True, 0
    assert not gpc.write(1)                                              # RO_FAULT: update skipped
    host.mm.host_access(vma.start, True, 0)                              # a write fault makes the PTE writable
    assert gpc.write(1)
