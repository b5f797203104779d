"""RISC-V ``kvm_arch_prepare_memory_region()`` (arch/riscv/kvm/mmu.c; the same code in v6.12 and v6.13).

Walks every VMA the region overlaps (``find_vma()`` until ``vm_start >= reg_end``, holes skipped): a
writable slot over a VMA without VM_WRITE is EPERM, a VM_PFNMAP VMA with LOG_DIRTY_PAGES is EINVAL;
the G-stage GPA limit is EFAULT with ``>=``.  The model before issue 11 accepted all of these."""

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM, KvmMrChange
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

PAGE = 4096
GPA = 1 << 30
LOG, RO = KVM_MEM.LOG_DIRTY_PAGES, KVM_MEM.READONLY


@pytest.fixture(params=["legacy", "series"])
def policy(request):
    return request.param


def _errno(fn, *a, **kw):
    with pytest.raises(ModelError) as e:
        fn(*a, **kw)
    return e.value.errno


def _vm(policy, **kw):
    host = Host()
    return host, Kvm(host, policy=policy, arch="riscv", **kw)


def test_writable_slot_over_read_only_vma_is_eperm(policy):
    host, kvm = _vm(policy)
    vma = host.mm.mmap(4 * PAGE, VmaKind.ANON_SHARED, prot="r")
    s = kvm.set_user_memory_region
    assert _errno(s, 1, GPA, 4 * PAGE, vma.start) == errno.EPERM
    assert not kvm.memslots[0].by_id
    assert s(1, GPA, 4 * PAGE, vma.start, RO) == KvmMrChange.CREATE            # a READONLY slot is fine
    assert s(1, 2 * GPA, 4 * PAGE, vma.start, RO) == KvmMrChange.MOVE


def test_eperm_on_move_and_flags_only_after_mprotect(policy):
    """The check runs again on MOVE and FLAGS_ONLY, against the VMAs as they are now."""
    host, kvm = _vm(policy)
    vma = host.mm.mmap(4 * PAGE, VmaKind.ANON_SHARED)
    s = kvm.set_user_memory_region
    s(1, GPA, 4 * PAGE, vma.start)
    host.mm.mprotect(vma.start, 4 * PAGE, "r")
    assert _errno(s, 1, 2 * GPA, 4 * PAGE, vma.start) == errno.EPERM          # MOVE
    assert _errno(s, 1, GPA, 4 * PAGE, vma.start, LOG) == errno.EPERM         # FLAGS_ONLY
    assert kvm.memslots[0].by_id[1].base_gfn == GPA >> 12


def test_a_read_only_vma_anywhere_in_the_region_counts(policy):
    host, kvm = _vm(policy)
    rw = host.mm.mmap(2 * PAGE, VmaKind.ANON_SHARED)
    host.mm.mmap(2 * PAGE, VmaKind.ANON_SHARED, prot="r", addr=rw.end)
    assert _errno(kvm.set_user_memory_region, 1, GPA, 4 * PAGE, rw.start) == errno.EPERM
    assert kvm.set_user_memory_region(1, GPA, 2 * PAGE, rw.start) == KvmMrChange.CREATE


def test_holes_are_skipped(policy):
    """No VMA at all under (part of) the region is not an error: the walk only visits VMAs."""
    host, kvm = _vm(policy)
    vma = host.mm.mmap(PAGE, VmaKind.ANON_SHARED)
    assert kvm.set_user_memory_region(1, GPA, 4 * PAGE, vma.start - 2 * PAGE) == KvmMrChange.CREATE


def test_pfnmap_logging_is_einval_and_eperm_comes_first(policy):
    host, kvm = _vm(policy)
    drv = host.add_driver("bar", 4, "no_page")
    vma = host.mm.mmap(4 * PAGE, VmaKind.PFNMAP, driver=drv)
    s = kvm.set_user_memory_region
    assert _errno(s, 1, GPA, 4 * PAGE, vma.start, LOG) == errno.EINVAL
    s(1, GPA, 4 * PAGE, vma.start)
    assert _errno(s, 1, GPA, 4 * PAGE, vma.start, LOG) == errno.EINVAL         # FLAGS_ONLY
    ro_drv = host.add_driver("rom", 4, "no_page")
    ro = host.mm.mmap(4 * PAGE, VmaKind.PFNMAP, driver=ro_drv, prot="r")
    assert _errno(s, 2, 2 * GPA, 4 * PAGE, ro.start, LOG) == errno.EPERM       # VM_WRITE is checked first
    assert _errno(s, 2, 2 * GPA, 4 * PAGE, ro.start, LOG | RO) == errno.EINVAL


@pytest.mark.parametrize("levels,bits", [(3, 41), (4, 50), (5, 59)])
def test_gstage_gpa_limit_is_efault_with_ge(policy, levels, bits):
    host, kvm = _vm(policy, gstage_pgd_levels=levels)
    vma = host.mm.mmap(4 * PAGE, VmaKind.ANON_SHARED)
    s = kvm.set_user_memory_region
    assert _errno(s, 1, (1 << bits) - 4 * PAGE, 4 * PAGE, vma.start) == errno.EFAULT   # ends at the limit
    assert s(1, (1 << bits) - 5 * PAGE, 4 * PAGE, vma.start) == KvmMrChange.CREATE
