"""Real /dev/kvm: memslot ioctls (v1/v2, flags, delete/move/flags-only) and guest accesses."""

from __future__ import annotations

import errno

import pytest

from kvmsim.backend.base import (
    APIC_GPA, BOOT_GPA_END, Exit, GuestMemfdFlags, KVM_MEM, MappingKind, MemoryRegion,
    MemoryRegionApi, delete_memory_region, move_memory_region, page_gpas, update_memory_region_flags,
)
from kvmsim.errors import UsageError
from kvmsim.types import Gpa

pytestmark = pytest.mark.kvm

G = 1 << 30
MB = 1 << 20
LOG, RO, GMEM = (KVM_MEM.LOG_DIRTY_PAGES, KVM_MEM.READONLY,
                 KVM_MEM.GUEST_MEMFD)


def _slot(kvm, slot, gpa, m, flags=0, size=None, offset=0, api=MemoryRegionApi.V2):
    size = m.size - offset if size is None else size
    return kvm.set_memory_region(MemoryRegion(slot, Gpa(gpa), size, m.at(offset), KVM_MEM(flags)), api).errno


@pytest.mark.parametrize("api", list(MemoryRegionApi))
def test_guest_write_read_round_trip(kvm, api):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, MB).mapping
    assert _slot(kvm, 1, G, m, api=api) == 0
    gpas = page_gpas(G, 32, offset=8 * 7)
    values = [0x1111_0000_0000_0000 + i for i in range(32)]
    w = kvm.guest_write(gpas, values)
    assert w.complete and w.exits == [Exit.OK] * 32
    r = kvm.guest_read(gpas)
    assert r.values == values
    assert kvm.host_read(m, 5 * 4096 + 56).data == values[5].to_bytes(8, "little")
    kvm.host_write(m, 9 * 4096 + 56, (42).to_bytes(8, "little"))
    assert kvm.guest_read([gpas[9]]).values == [42]


def test_readonly_slot_write_is_mmio_exit(kvm):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, MB).mapping
    kvm.host_write(m, 4096, (7).to_bytes(8, "little"))
    assert _slot(kvm, 1, G, m, RO) == 0
    w = kvm.guest_write([G + 4096], 99)
    (a,) = w.accesses
    assert (a.exit, a.gpa, a.write) == (Exit.MMIO, G + 4096, True)
    assert kvm.guest_read([G + 4096]).values == [7]            # the write never landed
    assert kvm.host_read(m, 4096).data == (7).to_bytes(8, "little")


def test_access_without_slot_is_mmio_and_range_goes_on(kvm):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, 4 * 4096).mapping
    _slot(kvm, 1, G, m)
    out = kvm.guest_write(page_gpas(G, 6), 3)                 # pages 4, 5 are outside the slot
    assert out.exits == [Exit.OK] * 4 + [Exit.MMIO] * 2 and out.complete
    r = kvm.guest_read(page_gpas(G, 6))
    assert r.values == [3, 3, 3, 3, None, None]


@pytest.mark.parametrize("case,expected", [
    ("overlap", errno.EEXIST), ("overlap-boot", errno.EEXIST), ("unaligned-gpa", errno.EINVAL),
    ("unaligned-size", errno.EINVAL), ("unaligned-uaddr", errno.EINVAL), ("unknown-flag", errno.EINVAL),
    ("toggle-readonly", errno.EINVAL), ("v1-guest-memfd", errno.EINVAL), ("gmem-log-dirty", errno.EINVAL),
    ("delete-missing", errno.EINVAL), ("slot-id-too-big", errno.EINVAL),
])
def test_memslot_errnos(kvm, case, expected):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, 4 * MB).mapping
    if case == "overlap":
        assert _slot(kvm, 1, G, m, size=MB) == 0
        got = _slot(kvm, 2, G + 4096, m, size=MB, offset=MB)
    elif case == "overlap-boot":
        got = _slot(kvm, 1, BOOT_GPA_END - 4096, m, size=MB)
    elif case == "unaligned-gpa":
        got = _slot(kvm, 1, G + 0x800, m, size=MB)
    elif case == "unaligned-size":
        got = _slot(kvm, 1, G, m, size=MB + 100)
    elif case == "unaligned-uaddr":
        got = kvm.set_memory_region(MemoryRegion(1, Gpa(G), MB, m.at(0x10))).errno
    elif case == "unknown-flag":
        got = _slot(kvm, 1, G, m, KVM_MEM(1 << 9))
    elif case == "toggle-readonly":
        assert _slot(kvm, 1, G, m) == 0
        got = update_memory_region_flags(kvm, 1, RO).errno
    elif case == "v1-guest-memfd":
        got = _slot(kvm, 1, G, m, GMEM, api=MemoryRegionApi.V1)
    elif case == "gmem-log-dirty":
        gmem = kvm.create_guest_memfd(4 * MB, GuestMemfdFlags(0)).gmem
        got = kvm.set_memory_region(MemoryRegion(1, Gpa(G), 4 * MB, m.hva, GMEM | LOG, gmem)).errno
        assert kvm.set_memory_region(MemoryRegion(1, Gpa(G), 4 * MB, m.hva, GMEM, gmem)).errno == 0
    elif case == "delete-missing":
        got = delete_memory_region(kvm, 5).errno
    else:
        got = _slot(kvm, kvm.capabilities()["nr_memslots"], G, m)
    assert got == expected


def test_delete_move_and_flags_only_update(kvm):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, MB).mapping
    assert _slot(kvm, 1, G, m) == 0
    kvm.guest_write([G], 0xAB)
    # move: the data follows the slot to the new base, the old gpa has no memory any more
    assert move_memory_region(kvm, 1, 2 * G).errno == 0
    assert kvm.memslots()[1].guest_phys_addr == 2 * G
    assert kvm.guest_read([2 * G, G]).exits == [Exit.OK, Exit.MMIO]
    assert kvm.guest_read([2 * G]).values == [0xAB]
    # flags only: turning on dirty logging starts logging
    assert update_memory_region_flags(kvm, 1, LOG).errno == 0
    kvm.guest_write([2 * G + 3 * 4096], 1)
    assert kvm.get_dirty_log(1).dirty == {3}
    # delete: the gpa becomes MMIO, the host memory keeps the data
    assert delete_memory_region(kvm, 1).errno == 0
    assert 1 not in kvm.memslots()
    assert kvm.guest_read([2 * G]).exits == [Exit.MMIO]
    assert kvm.host_read(m, 0).data == (0xAB).to_bytes(8, "little")
    # the id is free again
    assert _slot(kvm, 1, G, m) == 0


def test_contract_violations_are_usage_errors(kvm):
    with pytest.raises(UsageError, match="boot slot"):
        kvm.set_memory_region(MemoryRegion(kvm.vm.boot_slot, Gpa(G), MB, 0))
    for bad in (BOOT_GPA_END - 8, APIC_GPA, G + 4):
        with pytest.raises(UsageError, match="8-byte aligned"):
            kvm.guest_read([bad])
    with pytest.raises(UsageError, match="values"):
        kvm.guest_write([G, G + 8], [1])
    with type(kvm)() as fresh, pytest.raises(UsageError, match="create_vm"):
        fresh.guest_read([G])

