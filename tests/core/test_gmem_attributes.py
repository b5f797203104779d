"""KVM_SET_MEMORY_ATTRIBUTES (kvmsim.kvm.memory_attributes) and guest_memfd bindings (kvmsim.kvm.gmem):
the ioctls' errnos, the conversion as an MMU invalidation, memslot immutability, fallocate."""

from __future__ import annotations

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.gmem import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GuestMemfd, kvm_gmem_fallocate,
                             kvm_gmem_get_pfn)
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memory_attributes import (kvm_mem_is_private, kvm_range_has_memory_attributes,
                                          kvm_supported_mem_attributes, kvm_vm_ioctl_set_mem_attributes)
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind
from kvmsim.uapi import KVM_MEM, KVM_MEMORY_ATTRIBUTE_PRIVATE

PAGE = 4096
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = int(KVM_MEM.GUEST_MEMFD)


def vm(arch: str = "x86", **kw):
    host = Host(recording=True)
    return host, Kvm(host, arch=arch, **kw)


def err(fn, *a, **kw) -> int:
    with pytest.raises(ModelError) as e:
        fn(*a, **kw)
    return e.value.errno


# ---- KVM_SET_MEMORY_ATTRIBUTES ------------------------------------------------------------------------

@pytest.mark.parametrize("address,size,attrs,flags", [
    (0, PAGE, PRIVATE, 1),                  # flags must be 0
    (0, PAGE, 1, 0),                        # not a supported attribute
    (0, PAGE, PRIVATE | 1, 0),
    (0, 0, PRIVATE, 0),                     # zero size
    ((1 << 64) - PAGE, 2 * PAGE, PRIVATE, 0),   # wraps
    (0x800, PAGE, PRIVATE, 0),              # unaligned address
    (0, PAGE + 1, PRIVATE, 0),              # unaligned size
])
def test_set_memory_attributes_einval(address, size, attrs, flags):
    _, kvm = vm()
    assert err(kvm_vm_ioctl_set_mem_attributes, kvm, address, size, attrs, flags) == errno.EINVAL
    assert kvm.mem_attr_array == {}


@pytest.mark.parametrize("arch,kw", [("arm64", {}), ("generic", {}), ("x86", {"has_private_mem": False}),
                                     ("x86", {"mmu": "shadow"})])
def test_private_is_unsupported_without_private_memory(arch, kw):
    _, kvm = vm(arch, **kw)
    assert kvm_supported_mem_attributes(kvm) == 0
    assert err(kvm_vm_ioctl_set_mem_attributes, kvm, 0, PAGE, PRIVATE) == errno.EINVAL
    kvm_vm_ioctl_set_mem_attributes(kvm, 0, PAGE, 0)          # attributes 0 are always valid: a no-op


def test_attributes_are_per_gfn_and_shared_erases_them():
    _, kvm = vm()
    kvm_vm_ioctl_set_mem_attributes(kvm, PAGE, 3 * PAGE, PRIVATE)
    assert [kvm_mem_is_private(kvm, g) for g in range(5)] == [False, True, True, True, False]
    assert kvm_range_has_memory_attributes(kvm, 1, 4, ~0, PRIVATE)
    assert not kvm_range_has_memory_attributes(kvm, 0, 4, ~0, PRIVATE)
    kvm_vm_ioctl_set_mem_attributes(kvm, 2 * PAGE, PAGE, 0)
    assert sorted(kvm.mem_attr_array) == [1, 3]


def test_a_conversion_over_a_memslot_is_an_invalidation_and_zaps():
    host, kvm = vm()
    v = host.mm.mmap(4 * PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, 4 * PAGE, v.start)
    vcpu = kvm.create_vcpu()
    vcpu.write(PAGE, 1)
    seq = kvm.mmu_invalidate_seq
    zaps = host.journal.counters["spte_zap"]
    kvm_vm_ioctl_set_mem_attributes(kvm, PAGE, PAGE, PRIVATE)
    assert kvm.mmu_invalidate_seq == seq + 1 and kvm.mmu_invalidate_in_progress == 0
    assert host.journal.counters["spte_zap"] == zaps + 1
    # the same attributes again: nothing to do, no invalidation
    kvm_vm_ioctl_set_mem_attributes(kvm, PAGE, PAGE, PRIVATE)
    assert kvm.mmu_invalidate_seq == seq + 1


def test_a_conversion_outside_every_memslot_takes_no_invalidation():
    _, kvm = vm()
    seq = kvm.mmu_invalidate_seq
    kvm_vm_ioctl_set_mem_attributes(kvm, 1 << 30, PAGE, PRIVATE)
    assert kvm.mmu_invalidate_seq == seq and kvm_mem_is_private(kvm, (1 << 30) >> 12)


# ---- guest_memfd memslots: binding and immutability ---------------------------------------------------

def gmem_slot(kvm, size: int = 4 * PAGE, gmem=None, slot: int = 1, gpa: int = 0, offset: int = 0):
    g = gmem or GuestMemfd(kvm, size)
    kvm.set_user_memory_region(slot, gpa, size, 0, GMEM, guest_memfd=g, guest_memfd_offset=offset)
    return g


def test_guest_memfd_memslots_are_immutable():
    _, kvm = vm()
    gmem_slot(kvm)
    s = kvm.set_user_memory_region
    assert err(s, 1, 0, 4 * PAGE, 0, GMEM) == errno.EINVAL                          # the same region again
    assert err(s, 1, 1 << 20, 4 * PAGE, 0, GMEM) == errno.EINVAL                    # a move
    assert err(s, 1, 0, 4 * PAGE, 0, GMEM | int(KVM_MEM.LOG_DIRTY_PAGES)) == errno.EINVAL
    s(1, 0, 0, 0, GMEM)                                                              # delete is allowed
    assert kvm.gfn_to_memslot(0) is None


def test_a_guest_memfd_range_binds_one_memslot_until_it_is_deleted():
    _, kvm = vm()
    g = gmem_slot(kvm, 2 * PAGE, GuestMemfd(kvm, 4 * PAGE))
    assert err(gmem_slot, kvm, 2 * PAGE, g, slot=2, gpa=1 << 20, offset=PAGE) == errno.EEXIST
    assert kvm.memslots[0].by_id.get(2) is None and len(g.bindings) == 1
    assert err(gmem_slot, kvm, 4 * PAGE, g, slot=2, gpa=1 << 20, offset=2 * PAGE) == errno.EINVAL  # past the end
    gmem_slot(kvm, 2 * PAGE, g, slot=2, gpa=1 << 20, offset=2 * PAGE)
    kvm.set_user_memory_region(1, 0, 0, 0, GMEM)
    gmem_slot(kvm, 2 * PAGE, g, slot=3, gpa=2 << 20)                                 # slot 1's range is free
    assert sorted(s.id for s in g.bindings) == [2, 3]


def test_binding_needs_a_guest_memfd_of_this_vm():
    host, kvm = vm()
    _, other = vm()
    s = kvm.set_user_memory_region
    assert err(s, 1, 0, PAGE, 0, GMEM) == errno.EBADF
    assert err(s, 1, 0, PAGE, 0, GMEM, guest_memfd=object()) == errno.EINVAL
    assert err(s, 1, 0, PAGE, 0, GMEM, guest_memfd=GuestMemfd(other, PAGE)) == errno.EINVAL


def test_kvm_gmem_get_pfn_errnos_and_its_reference():
    host, kvm = vm()
    g = gmem_slot(kvm, 2 * PAGE)
    slot = kvm.gfn_to_memslot(0)
    pfn, kfp, order = kvm_gmem_get_pfn(kvm, slot, 1)
    assert order == 0 and pfn == int(g.pages[1]) and host.phys.page_count(pfn) == 2     # page cache + KVM
    assert kfp.refcounted_page == pfn                                                     # series: the page
    g.bindings.clear()                                                                    # the binding gone
    assert err(kvm_gmem_get_pfn, kvm, slot, 0) == errno.EIO
    slot.gmem_file = None
    assert err(kvm_gmem_get_pfn, kvm, slot, 0) == errno.EFAULT


def test_legacy_kvm_gmem_get_pfn_reports_no_page():
    host, kvm = vm(policy="legacy")
    gmem_slot(kvm, PAGE)
    _, kfp, _ = kvm_gmem_get_pfn(kvm, kvm.gfn_to_memslot(0), 0)
    assert kfp.refcounted_page is None and kfp.held is not None


@pytest.mark.parametrize("mode,offset,length,want", [
    (FALLOC_FL_PUNCH_HOLE, 0, PAGE, errno.EOPNOTSUPP),                     # no KEEP_SIZE
    (FALLOC_FL_KEEP_SIZE | 0x8, 0, PAGE, errno.EOPNOTSUPP),                # another mode bit
    (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0x800, PAGE, errno.EINVAL),
    (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 0x800, errno.EINVAL),
    (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 0, errno.EINVAL),
    (FALLOC_FL_KEEP_SIZE, 0, 8 * PAGE, errno.EINVAL),                      # allocate past the size
])
def test_fallocate_errnos(mode, offset, length, want):
    _, kvm = vm()
    g = GuestMemfd(kvm, 4 * PAGE)
    assert err(kvm_gmem_fallocate, kvm, g, mode, offset, length) == want


def test_fallocate_allocates_and_punches():
    host, kvm = vm()
    g = GuestMemfd(kvm, 4 * PAGE)
    kvm_gmem_fallocate(kvm, g, FALLOC_FL_KEEP_SIZE, 0, 2 * PAGE)
    assert [int(p) >= 0 for p in g.pages] == [True, True, False, False]
    kvm_gmem_fallocate(kvm, g, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, PAGE, 3 * PAGE)
    assert [int(p) >= 0 for p in g.pages] == [True, False, False, False]


# ---- scenario set-up keys ----------------------------------------------------------------------------

_SETUP = """
name = "t"
[[guest_memfd]]
name = "g"
size = "8K"
[[vma]]
name = "v"
kind = "anon"
size = "8K"
[[memslot]]
id = 1
gpa = 0
size = "8K"
vma = "v"
guest_memfd = "{gmem}"
guest_memfd_offset = {offset}
"""


def test_a_memslot_names_its_guest_memfd_and_the_runner_binds_it():
    from kvmsim.scenarios.loader import loads
    from kvmsim.scenarios.runner import build
    sc = loads(_SETUP.format(gmem="g", offset=0))
    env = build(sc, "series")
    slot = env.kvm.gfn_to_memslot(0)
    assert slot.gmem_file is env.gmems["g"] and int(slot.flags) & GMEM
    assert env.gmems["g"].bindings == [slot]


@pytest.mark.parametrize("gmem,offset,what", [("h", 0, "no [[guest_memfd]] named 'h'"),
                                              ("g", 100, "expected a multiple of 4K")])
def test_bad_guest_memfd_keys_name_the_line(gmem, offset, what):
    from kvmsim.errors import ScenarioError
    from kvmsim.scenarios.loader import loads
    with pytest.raises(ScenarioError) as e:
        loads(_SETUP.format(gmem=gmem, offset=offset), "s.toml")
    assert what in str(e.value) and "s.toml:" in str(e.value)
