"""arm64 ``kvm_arch_prepare_memory_region()`` (arch/arm64/kvm/mmu.c, v6.12 and v6.13): the IPA limit
(EFAULT) and "IO region dirty page logging not allowed" (EINVAL on a VM_PFNMAP VMA) on create, move
and flags-only changes.  The model before issue 11 accepted all of these."""

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM, KvmMrChange
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

PAGE = 4096
GPA = 1 << 30
LOG = KVM_MEM.LOG_DIRTY_PAGES


@pytest.fixture(params=["legacy", "series"])
def policy(request):
    return request.param


def _errno(fn, *a, **kw):
    with pytest.raises(ModelError) as e:
        fn(*a, **kw)
    return e.value.errno


@pytest.fixture
def pfnmap_vm(policy):
    host = Host()
    kvm = Kvm(host, policy=policy, arch="arm64")
    drv = host.add_driver("bar", 4, "no_page")
    vma = host.mm.mmap(4 * PAGE, VmaKind.PFNMAP, driver=drv)
    return host, kvm, vma


def test_logging_a_pfnmap_slot_is_einval_on_create(pfnmap_vm):
    host, kvm, vma = pfnmap_vm
    assert _errno(kvm.set_user_memory_region, 1, GPA, 4 * PAGE, vma.start, LOG) == errno.EINVAL
    assert not kvm.memslots[0].by_id
    assert kvm.set_user_memory_region(1, GPA, 4 * PAGE, vma.start) == KvmMrChange.CREATE


def test_logging_a_pfnmap_slot_is_einval_on_flags_only_and_move(pfnmap_vm):
    host, kvm, vma = pfnmap_vm
    s = kvm.set_user_memory_region
    s(1, GPA, 4 * PAGE, vma.start)
    assert _errno(s, 1, GPA, 4 * PAGE, vma.start, LOG) == errno.EINVAL         # FLAGS_ONLY
    assert _errno(s, 1, 2 * GPA, 4 * PAGE, vma.start, LOG) == errno.EINVAL     # MOVE + LOG
    slot = kvm.memslots[0].by_id[1]
    assert slot.base_gfn == GPA >> 12 and not slot.logging and slot.dirty_bitmap is None
    assert s(1, 2 * GPA, 4 * PAGE, vma.start) == KvmMrChange.MOVE              # a plain move is fine


def test_only_the_pfnmap_part_of_a_region_matters(policy):
    """The walk covers every VMA the region overlaps: anon + PFNMAP behind it fails, a hole is skipped."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch="arm64")
    drv = host.add_driver("bar", 2, "no_page")
    anon = host.mm.mmap(2 * PAGE, VmaKind.ANON_SHARED)
    host.mm.mmap(2 * PAGE, VmaKind.PFNMAP, driver=drv, addr=anon.end)
    assert _errno(kvm.set_user_memory_region, 1, GPA, 4 * PAGE, anon.start, LOG) == errno.EINVAL
    assert kvm.set_user_memory_region(1, GPA, 2 * PAGE, anon.start, LOG) == KvmMrChange.CREATE
    hole = host.mm.mmap(PAGE, VmaKind.ANON_SHARED, addr=anon.end + 16 * PAGE)
    assert kvm.set_user_memory_region(2, 2 * GPA, 2 * PAGE, hole.start - PAGE, LOG) == KvmMrChange.CREATE


def test_vm_io_without_pfnmap_may_log(policy):
    """The kernel tests VM_PFNMAP only: a VM_IO|VM_MIXEDMAP VMA (a driver's vm_insert_page ring) may log."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch="arm64")
    drv = host.add_driver("ring", 2, "normal", mixed=True)
    vma = host.mm.mmap(2 * PAGE, VmaKind.MIXEDMAP, driver=drv, io=True)
    assert kvm.set_user_memory_region(1, GPA, 2 * PAGE, vma.start, LOG) == KvmMrChange.CREATE


def test_ipa_limit_is_efault(policy):
    """``base_gfn + npages > kvm_phys_size() >> PAGE_SHIFT`` → EFAULT; 40 bits by default."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch="arm64")
    vma = host.mm.mmap(4 * PAGE, VmaKind.ANON_SHARED)
    s = kvm.set_user_memory_region
    assert _errno(s, 1, (1 << 40) - 3 * PAGE, 4 * PAGE, vma.start) == errno.EFAULT
    assert s(1, (1 << 40) - 4 * PAGE, 4 * PAGE, vma.start) == KvmMrChange.CREATE   # ends exactly at 2^40
    assert _errno(s, 1, 1 << 40, 4 * PAGE, vma.start) == errno.EFAULT               # MOVE past it
    big = Kvm(Host(), policy=policy, arch="arm64", ipa_bits=48)
    v2 = big.mm.mmap(4 * PAGE, VmaKind.ANON_SHARED)
    assert big.set_user_memory_region(1, 1 << 44, 4 * PAGE, v2.start) == KvmMrChange.CREATE
