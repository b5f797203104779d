"""arm64 MTE: ``KVM_CAP_ARM_MTE``, ``sanitise_mte_tags()``, ``kvm_vma_mte_allowed()`` and
``kvm_vm_ioctl_mte_copy_tags()`` (arch/arm64/kvm/{arm,mmu,guest}.c, v6.12 and v6.13), and the
difference of patch 77 "KVM: arm64: Use __gfn_to_page() when copying MTE tags to/from userspace"."""

from __future__ import annotations

import errno

import pytest

from kvmsim.arm64.mte import (KVM_ARM_TAGS_FROM_GUEST, MteTagPageV612, MteTagPageV613, kvm_vm_ioctl_enable_cap_mte,
                              kvm_vm_ioctl_mte_copy_tags)
from kvmsim.check import check_all
from kvmsim.errors import ModelError
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.vma import VmaKind

from tests.helpers import PAGE, make_vm


def _mte_vm(policy, kind=VmaKind.ANON, pages=2, flags=0):
    host, kvm, _, _ = make_vm(policy, arch="arm64", size=0)
    kvm_vm_ioctl_enable_cap_mte(kvm)
    vma = host.mm.mmap(pages * PAGE, kind)
    kvm.set_user_memory_region(0, 0, pages * PAGE, vma.start, flags)
    return host, kvm, vma, kvm.create_vcpu()


def _pfnmap_behind_the_slot(policy, pfn_class):
    """An MTE VM whose anonymous memslot VMA is replaced by a driver's VM_PFNMAP mapping (mremap
    MREMAP_FIXED onto it: no memslot check runs)."""
    host, kvm, vma, vcpu = _mte_vm(policy, pages=1)
    drv = host.add_driver("gpu", 1, pfn_class, free_rule="put")
    bar = host.mm.mmap(PAGE, VmaKind.PFNMAP, driver=drv)
    host.mm.munmap(vma.start, PAGE)
    host.mm.mremap(bar.start, PAGE, vma.start)
    return host, kvm, int(drv.pfns[0])


def _errno(fn):
    with pytest.raises(ModelError) as e:
        fn()
    return e.value.errno


# ---- patch 77: a VM_PFNMAP page behind the memslot ----------------------------------------------------

def test_legacy_copies_tags_into_a_refcounted_driver_page_through_a_reference_it_does_not_own():
    """v6.12: ``gfn_to_pfn_prot()`` → ``hva_to_pfn_remapped()`` → ``kvm_try_get_pfn()`` (+1 on the driver's
    page), ``pfn_to_online_page()`` accepts it, tags written, ``kvm_release_pfn_dirty(pfn)``."""
    host, kvm, pfn = _pfnmap_behind_the_slot("legacy", "driver_refcounted")
    refs = host.phys.page_count(pfn)
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, 0, tag=5) == (PAGE, [])
    assert kvm.arch.mte_tags == {pfn: 5}
    c = kvm.journal.counters
    assert c["get_page:gfn_to_pfn_prot"] == 1 and c["set_dirty:kvm_release_pfn_dirty"] == 1
    assert c["put_page:kvm_release_pfn_dirty"] == 1 and host.phys.page_count(pfn) == refs
    assert host.phys.folio_test_dirty(pfn)
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, KVM_ARM_TAGS_FROM_GUEST) == (PAGE, [5])
    assert c["mark_accessed:kvm_release_pfn_clean"] == 1
    assert {v.invariant for v in check_all(kvm)} == {"INV-1"}        # one per kvm_try_get_pfn() reference


def test_legacy_copies_tags_of_a_reserved_driver_page_without_any_reference():
    """v6.12: ``kvm_try_get_pfn()`` takes nothing on a reserved pfn, ``pfn_to_online_page()`` still returns
    the page, and ``kvm_release_pfn_dirty()`` guesses "not refcounted": tags written, nothing held."""
    host, kvm, pfn = _pfnmap_behind_the_slot("legacy", "reserved")
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, 0, tag=9) == (PAGE, [])
    assert kvm.arch.mte_tags == {pfn: 9}
    assert kvm.journal.counters["kvm_vm_ioctl_mte_copy_tags"] == 1
    assert not [f for f in kvm.journal.facts if f.kind in ("get", "put", "set_dirty") and f.kvm]


@pytest.mark.parametrize("pfn_class", ["driver_refcounted", "reserved"])
def test_series_gfn_to_page_is_null_for_pfnmap_so_the_ioctl_is_efault(pfn_class):
    """v6.13: ``page = __gfn_to_page(kvm, gfn, write); if (!page) { ret = -EFAULT; goto out; }``."""
    host, kvm, pfn = _pfnmap_behind_the_slot("series", pfn_class)
    assert _errno(lambda: kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, 0, tag=5)) == errno.EFAULT
    assert _errno(lambda: kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, KVM_ARM_TAGS_FROM_GUEST)) == errno.EFAULT
    assert kvm.arch.mte_tags == {}
    assert not [f for f in kvm.journal.facts if f.kind in ("get", "put", "set_dirty", "mark_accessed") and f.kvm]
    assert check_all(kvm) == []


def test_the_tag_page_is_the_resolved_per_policy_choice():
    """A guard against the arch taking the other policy's path."""
    assert make_vm("legacy", arch="arm64", size=0).kvm.ops.mte_tag_page is MteTagPageV612
    assert make_vm("series", arch="arm64", size=0).kvm.ops.mte_tag_page is MteTagPageV613


# ---- both versions on ordinary memory --------------------------------------------------------------------

@pytest.mark.parametrize("policy, caller", [("legacy", "kvm_release_pfn_dirty"), ("series", "kvm_release_page_dirty")])
def test_copying_tags_to_the_guest_dirties_the_page_but_not_the_dirty_log(policy, caller):
    host, kvm, vma, vcpu = _mte_vm(policy)
    host.mm.host_access(vma.start, True, 1)
    host.mm.host_access(vma.start + PAGE, True, 1)
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, 2 * PAGE, 0, tag=3) == (2 * PAGE, [])
    assert kvm.journal.counters[f"set_dirty:{caller}"] == 2
    assert kvm.journal.counters["mark_page_dirty_in_slot"] == 0
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, 2 * PAGE, KVM_ARM_TAGS_FROM_GUEST) == (2 * PAGE, [3, 3])
    assert kvm.host_refs == {} and kvm.page_refs_out == {}
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_writing_tags_while_a_memslot_logs_is_ebusy(policy):
    host, kvm, vma, vcpu = _mte_vm(policy, flags=KVM_MEM.LOG_DIRTY_PAGES)
    assert _errno(lambda: kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, 0)) == errno.EBUSY
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, KVM_ARM_TAGS_FROM_GUEST) == (PAGE, [0])


def test_bad_arguments_are_einval():
    host, kvm, vma, vcpu = _mte_vm("series")
    assert _errno(lambda: kvm_vm_ioctl_mte_copy_tags(kvm, 1, PAGE, 0)) == errno.EINVAL
    assert _errno(lambda: kvm_vm_ioctl_mte_copy_tags(kvm, 0, PAGE, 2)) == errno.EINVAL
    plain = make_vm("series", arch="arm64").kvm
    assert _errno(lambda: kvm_vm_ioctl_mte_copy_tags(plain, 0, PAGE, 0)) == errno.EINVAL


def test_a_copy_that_stops_part_way_returns_the_bytes_done():
    """``if (length != copy_tags->length) return copy_tags->length - length;``"""
    host, kvm, vma, vcpu = _mte_vm("series", pages=2)
    assert kvm_vm_ioctl_mte_copy_tags(kvm, 0, 3 * PAGE, 0, tag=1) == (2 * PAGE, [])


def test_the_cap_is_refused_once_a_vcpu_exists_and_on_other_arches():
    host, kvm, vma, vcpu = make_vm("series", arch="arm64")
    assert _errno(lambda: kvm_vm_ioctl_enable_cap_mte(kvm)) == errno.EINVAL
    assert _errno(lambda: kvm_vm_ioctl_enable_cap_mte(make_vm("series", arch="riscv", size=0).kvm)) == errno.EINVAL


# ---- memslots and faults of an MTE VM ------------------------------------------------------------------

@pytest.mark.parametrize("kind, ok", [(VmaKind.ANON, True), (VmaKind.MEMFD, True), (VmaKind.FILE, False)])
def test_prepare_memory_region_refuses_a_vma_without_vm_mte_allowed(kind, ok):
    host, kvm, _, _ = make_vm("series", arch="arm64", size=0)
    kvm_vm_ioctl_enable_cap_mte(kvm)
    vma = host.mm.mmap(PAGE, kind)
    if ok:
        kvm.set_user_memory_region(0, 0, PAGE, vma.start, 0)
    else:
        assert _errno(lambda: kvm.set_user_memory_region(0, 0, PAGE, vma.start, 0)) == errno.EINVAL


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_fault_sanitises_the_tags_of_a_new_mapping(policy):
    host, kvm, vma, vcpu = _mte_vm(policy, pages=1)
    host.mm.host_access(vma.start, True, 1)
    pfn = int(vma.pte_pfn[0])
    assert vcpu.write(0, 2).ok
    assert kvm.arch.mte_tags == {pfn: 0} and kvm.journal.counters["mte_clear_page_tags"] == 1


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_a_fault_on_a_vma_mte_does_not_allow_is_efault(policy):
    """``if (mte_allowed) sanitise_mte_tags(); else { ret = -EFAULT; goto out_unlock; }`` for memory that
    is not a device pfn (the driver's RAM behind the replaced VMA)."""
    host, kvm, pfn = _pfnmap_behind_the_slot(policy, "driver_refcounted")
    vcpu = kvm.vcpus[0]
    acc = vcpu.read(0)
    assert (acc.exit, acc.errno) == (Exit.EFAULT, errno.EFAULT)
    assert list(kvm.arch.leaves()) == [] and kvm.host_refs == {}
