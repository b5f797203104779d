"""``kvm_prepare_memory_region()`` (virt/kvm/kvm_main.c) and x86's ``kvm_arch_prepare_memory_region()``.

Each test fails on the model as it was before issue 11: a KVM_MR_MOVE emptied the dirty bitmap, and
x86 accepted slots at any gpa below 2^64.
"""

import errno

import numpy as np
import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import enable_dirty_ring, enable_manual_protect, kvm_get_dirty_log
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM, KvmMrChange
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

from .conftest import make_vm

MB = 1 << 20
PAGE = 4096
GPA = 1 << 30


def _errno(fn, *a, **kw):
    with pytest.raises(ModelError) as e:
        fn(*a, **kw)
    return e.value.errno


def _logged_vm(arch, policy="series", execution="hardware", manual=0):
    host, kvm = make_vm(policy, arch=arch, execution=execution)
    if manual:
        enable_manual_protect(kvm, manual)
    vma = host.mm.mmap(MB, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(1, GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    return host, kvm, vma, kvm.create_vcpu()


@pytest.mark.parametrize("arch", ["x86", "arm64", "riscv", "generic"])
@pytest.mark.parametrize("execution", ["hardware", "emulated"])
def test_move_keeps_the_dirty_bitmap(policy, arch, execution):
    """A logged slot moved with logging still on reports the pages dirtied before the move (the bitmap is
    ``old->dirty_bitmap``), at their offsets in the slot."""
    host, kvm, vma, vcpu = _logged_vm(arch, policy, execution)
    for p in (3, 17, 100):
        assert vcpu.write(GPA + p * PAGE, p).ok
    before = kvm.memslots[0].by_id[1].dirty_bitmap
    assert kvm.set_user_memory_region(1, 2 * GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES) == KvmMrChange.MOVE
    slot = kvm.memslots[0].by_id[1]
    assert slot.base_gfn == (2 * GPA) >> 12
    assert slot.dirty_bitmap is before
    assert list(np.nonzero(kvm_get_dirty_log(kvm, 1))[0]) == [3, 17, 100]
    assert vcpu.write(2 * GPA + 5 * PAGE, 1).ok                 # logging continues at the new gpa
    assert list(np.nonzero(kvm_get_dirty_log(kvm, 1))[0]) == [5]


def test_move_that_stops_logging_drops_the_bitmap():
    host, kvm, vma, vcpu = _logged_vm("x86")
    assert vcpu.write(GPA, 1).ok
    kvm.set_user_memory_region(1, 2 * GPA, MB, vma.start, 0)
    assert kvm.memslots[0].by_id[1].dirty_bitmap is None
    assert _errno(kvm_get_dirty_log, kvm, 1) == errno.ENOENT


def test_move_that_starts_logging_gets_a_fresh_bitmap_initially_set():
    """No old bitmap: ``kvm_alloc_dirty_bitmap()``, all ones under KVM_DIRTY_LOG_INITIALLY_SET."""
    host, kvm = make_vm("series", arch="x86")
    enable_manual_protect(kvm, 3)
    vma = host.mm.mmap(MB, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(1, GPA, MB, vma.start, 0)
    kvm.set_user_memory_region(1, 2 * GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    assert kvm.memslots[0].by_id[1].dirty_bitmap.all()


def test_flags_only_toggle_keeps_then_reallocates():
    host, kvm, vma, vcpu = _logged_vm("x86")
    assert vcpu.write(GPA + PAGE, 1).ok
    bm = kvm.memslots[0].by_id[1].dirty_bitmap
    # LOG stays on through a no-op rewrite of the same flags: nothing changes at all
    assert kvm.set_user_memory_region(1, GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES) is None
    assert kvm.memslots[0].by_id[1].dirty_bitmap is bm
    kvm.set_user_memory_region(1, GPA, MB, vma.start, 0)
    assert kvm.memslots[0].by_id[1].dirty_bitmap is None
    kvm.set_user_memory_region(1, GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    assert not kvm.memslots[0].by_id[1].dirty_bitmap.any()


def test_dirty_ring_vm_gets_no_bitmap_on_move():
    host, kvm = make_vm("series", arch="x86")
    enable_dirty_ring(kvm, 1 << 16)
    vma = host.mm.mmap(MB, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(1, GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    kvm.set_user_memory_region(1, 2 * GPA, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    assert kvm.memslots[0].by_id[1].dirty_bitmap is None


# ---- x86: kvm_mmu_max_gfn() ----------------------------------------------------------------------------

def _x86(**kw):
    host = Host()
    kvm = Kvm(host, policy="series", arch="x86", **kw)
    return host, kvm, host.mm.mmap(MB, VmaKind.ANON_SHARED)


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_x86_tdp_limit_is_host_maxphyaddr(mmu):
    """With TDP the last gfn may not pass ``kvm_host.maxphyaddr`` bits (46 by default)."""
    host, kvm, vma = _x86(mmu=mmu)
    s = kvm.set_user_memory_region
    assert kvm.arch.kvm_mmu_max_gfn() == (1 << 34) - 1
    assert _errno(s, 2, (1 << 46) - MB + PAGE, MB, vma.start) == errno.EINVAL  # one page past 2^46
    assert _errno(s, 2, 1 << 52, MB, vma.start) == errno.EINVAL
    assert 2 not in kvm.memslots[0].by_id                                      # nothing installed
    assert s(1, (1 << 46) - MB, MB, vma.start) == KvmMrChange.CREATE          # ends exactly at 2^46
    # MOVE is checked too; FLAGS_ONLY is not (the slot already passed the check)
    assert _errno(s, 1, 1 << 47, MB, vma.start) == errno.EINVAL
    assert kvm.memslots[0].by_id[1].base_gfn == ((1 << 46) - MB) >> 12
    assert s(1, (1 << 46) - MB, MB, vma.start, KVM_MEM.LOG_DIRTY_PAGES) == KvmMrChange.FLAGS_ONLY


def test_x86_maxphyaddr_is_a_parameter():
    host, kvm, vma = _x86(maxphyaddr=39)
    assert _errno(kvm.set_user_memory_region, 1, 1 << 39, MB, vma.start) == errno.EINVAL
    assert kvm.set_user_memory_region(1, (1 << 39) - MB, MB, vma.start) == KvmMrChange.CREATE


def test_x86_without_tdp_the_limit_is_52_bits():
    """``max_gpa_bits = tdp_enabled ? kvm_host.maxphyaddr : 52``; emulated execution (kvm_pvm) runs without
    TDP, which is what the real /dev/kvm of the development machines answers."""
    for kw in ({"tdp_enabled": False}, {"execution": "emulated"}):
        host, kvm, vma = _x86(**kw)
        s = kvm.set_user_memory_region
        assert _errno(s, 2, (1 << 52) - MB + PAGE, MB, vma.start) == errno.EINVAL
        assert _errno(s, 2, 1 << 60, MB, vma.start) == errno.EINVAL
        assert s(1, (1 << 52) - MB, MB, vma.start) == KvmMrChange.CREATE


def test_x86_rejects_a_nonsense_maxphyaddr():
    from kvmsim.errors import UsageError
    with pytest.raises(UsageError):
        _x86(maxphyaddr=64)
