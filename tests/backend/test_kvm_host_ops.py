"""Real /dev/kvm: host mappings of each kind and host mm operations under a live memslot."""

from __future__ import annotations

import errno
import signal

import pytest

from kvmsim.backend.base import (
    Exit, GuestMemfdFlags, KVM_MEM, Madv, MappingKind, MemoryRegion, Prot, page_gpas,
)
from kvmsim.backend.kvm.caps import meminfo
from kvmsim.backend.kvm.settings import host_settings, read_host_settings
from kvmsim.errors import UsageError
from kvmsim.types import Gpa

pytestmark = pytest.mark.kvm

G = 1 << 30
MB = 1 << 20
OLD, NEW = 0x11, 0x22
GMEM_MMAP = GuestMemfdFlags.GUEST_MEMFD_FLAG_MMAP
GMEM_SHARED = GuestMemfdFlags.GUEST_MEMFD_FLAG_INIT_SHARED


def _live(kvm, kind, npages=16, flags=0):
    m = kvm.host_mmap(kind, npages * 4096).mapping
    assert kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva, KVM_MEM(flags))).errno == 0
    return m


def _filled(kvm, kind):
    m = _live(kvm, kind)
    assert kvm.guest_write(page_gpas(G, 4), OLD).complete
    return m


@pytest.mark.parametrize("kind,advice,errno_,after", [
    (MappingKind.ANON_PRIVATE, Madv.MADV_DONTNEED, 0, 0),        # fresh zero pages
    (MappingKind.ANON_SHARED, Madv.MADV_DONTNEED, 0, OLD),       # the page stays in shmem
    (MappingKind.MEMFD, Madv.MADV_DONTNEED, 0, OLD),
    (MappingKind.ANON_SHARED, Madv.MADV_REMOVE, 0, 0),           # the page is freed
    (MappingKind.MEMFD, Madv.MADV_REMOVE, 0, 0),
    (MappingKind.ANON_PRIVATE, Madv.MADV_REMOVE, errno.EINVAL, OLD),
])
def test_madvise_under_live_slot(kvm, kind, advice, errno_, after):
    m = _filled(kvm, kind)
    assert kvm.host_madvise(m, advice).errno == errno_
    assert kvm.guest_read(page_gpas(G, 4)).values == [after] * 4
    assert kvm.guest_write([G + 4096], NEW).exits == [Exit.OK]
    assert kvm.host_read(m, 4096).data == NEW.to_bytes(8, "little")


def test_punch_hole(kvm):
    m = _filled(kvm, MappingKind.MEMFD)
    assert kvm.host_fallocate(m, 0, 2 * 4096).errno == 0
    assert kvm.guest_read(page_gpas(G, 4)).values == [0, 0, OLD, OLD]
    anon = kvm.host_mmap(MappingKind.ANON_SHARED, 4096).mapping
    assert kvm.host_fallocate(anon, 0, 4096).errno == errno.EBADF     # no file behind it


def test_munmap_then_remap_same_address(kvm):
    m = _filled(kvm, MappingKind.ANON_SHARED)
    assert kvm.host_munmap(m).errno == 0
    r = kvm.guest_read(page_gpas(G, 2))
    assert [(a.exit, a.write) for a in r.accesses] == [(Exit.MMIO, False)] * 2
    w = kvm.guest_write([G + 8], 1)
    assert [(a.exit, a.gpa, a.write) for a in w.accesses] == [(Exit.MMIO, G + 8, True)]
    with pytest.raises(UsageError, match="not one of"):
        kvm.host_read(m, 0)                                       # the handle died with munmap
    n = kvm.host_mmap(MappingKind.ANON_SHARED, m.size, hva=m.hva).mapping
    assert n.hva == m.hva
    kvm.host_write(n, 0, (0x33).to_bytes(8, "little"))
    assert kvm.guest_read([G, G + 4096]).values == [0x33, 0]       # the new memory, at once


def test_mprotect_read_only(kvm):
    m = _filled(kvm, MappingKind.ANON_SHARED)
    assert kvm.host_mprotect(m, Prot.PROT_READ).errno == 0
    assert kvm.guest_read(page_gpas(G, 4)).values == [OLD] * 4
    assert kvm.guest_write([G], NEW).exits == [Exit.MMIO]
    assert kvm.host_write(m, 0, b"x").signal == signal.SIGSEGV
    assert kvm.host_mprotect(m, Prot.PROT_NONE, 4096, 4096).errno == 0
    assert kvm.guest_read(page_gpas(G, 2)).exits == [Exit.OK, Exit.MMIO]
    assert kvm.host_read(m, 4096).signal == signal.SIGSEGV
    assert kvm.host_mprotect(m, Prot.PROT_READ | Prot.PROT_WRITE).errno == 0
    assert kvm.guest_write([G], NEW).exits == [Exit.OK]


def test_mremap_moves_the_memory_away(kvm):
    m = _filled(kvm, MappingKind.MEMFD)
    out = kvm.host_mremap(m)
    assert out.errno == 0 and out.mapping.hva != m.hva and out.mapping.id == m.id
    assert kvm.guest_read([G]).exits == [Exit.MMIO]                # the slot's hva is empty now
    assert kvm.host_read(out.mapping, 0).data == OLD.to_bytes(8, "little")


@pytest.mark.parametrize("kind,cow_breaks", [(MappingKind.ANON_PRIVATE, True), (MappingKind.MEMFD, False)])
def test_fork_keeps_cow_child(kvm, kind, cow_breaks):
    m = _filled(kvm, kind)
    before = kvm.host_pfn(m, 0)
    child = kvm.host_fork()
    try:
        assert kvm.guest_write([G], NEW).exits == [Exit.OK]
        assert kvm.guest_read([G]).values == [NEW]
        after = kvm.host_pfn(m, 0)
        assert before is not None and after is not None
        assert (after != before) == cow_breaks       # a private page is copied on the guest's write
    finally:
        child.release()


def test_thp_anon(kvm):
    m = _live(kvm, MappingKind.THP_ANON, npages=1024)
    assert m.hva % (2 * MB) == 0
    assert kvm.guest_write(page_gpas(G, 1024, 0)[::64], 5).complete
    assert kvm.guest_read([G + 64 * 4096, G + 4096]).values == [5, 0]
    thp = kvm.capabilities()["thp_enabled"]
    if thp in ("always", "madvise"):
        assert _smaps_field(m.hva, "AnonHugePages") > 0


def _smaps_field(hva: int, name: str) -> int:
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= hva < hi
            elif inside and line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def test_hugetlb_2m_with_a_restored_pool(kvm):
    before = read_host_settings()
    if meminfo().get("HugePages_Free", 0) < 2:
        assert kvm.host_mmap(MappingKind.HUGETLB_2M, 2 * MB).errno == errno.ENOMEM
    try:
        guard = host_settings(nr_hugepages=int(before["nr_hugepages"]) + 2)
        with guard:
            if meminfo().get("HugePages_Free", 0) < 2:
                pytest.skip("the kernel could not allocate 2 hugepages")
            m = _live(kvm, MappingKind.HUGETLB_2M, npages=1024)
            assert kvm.guest_write(page_gpas(G, 4), 9).complete
            assert kvm.guest_read(page_gpas(G, 5)).values == [9, 9, 9, 9, 0]
            assert _smaps_field(m.hva, "KernelPageSize") == 2048
            assert kvm.host_fallocate(m, 0, 2 * MB).errno == 0       # punch the whole page
            assert kvm.guest_read([G]).values == [0]
            kvm.set_memory_region(MemoryRegion(1, Gpa(G), 0, m.hva))
            kvm.host_munmap(m)
    except PermissionError:
        pytest.skip("not allowed to change nr_hugepages")
    assert read_host_settings() == before


def test_perf_ring_pfnmap(kvm):
    m = _live(kvm, MappingKind.PERF_RING, npages=5)     # user page + 4 data pages
    assert kvm.guest_read(page_gpas(G, 5)).exits == [Exit.OK] * 5
    # only the user page can become writable (perf_mmap_pfn_mkwrite); data pages SIGBUS -> MMIO
    assert kvm.guest_write(page_gpas(G, 5, 8), 9).exits == [Exit.OK] + [Exit.MMIO] * 4
    assert kvm.host_read(m, 8).data == (9).to_bytes(8, "little")
    assert kvm.host_write(m, 4096, b"x").signal == signal.SIGBUS


def test_vvar_read_only_pfnmap(kvm):
    v = kvm.host_mmap(MappingKind.VVAR, 0).mapping
    ro = KVM_MEM.READONLY
    assert kvm.set_memory_region(MemoryRegion(1, Gpa(G), v.size, v.hva, ro)).errno == 0
    host = [kvm.host_read(v, off).signal for off in range(0, v.size, 4096)]
    guest = kvm.guest_read(page_gpas(G, v.size // 4096)).exits
    # the guest can read exactly the pages the host can read; the rest are MMIO exits
    assert guest == [Exit.OK if s == 0 else Exit.MMIO for s in host] and Exit.OK in guest
    assert kvm.guest_write([G], 1).exits == [Exit.MMIO]
    with pytest.raises(UsageError, match="borrows"):
        kvm.host_munmap(v)


def test_io_uring_ring_mixedmap(kvm):
    m = _live(kvm, MappingKind.IO_URING_RING, npages=4)
    assert kvm.guest_write([G + 3 * 4096], 4).exits == [Exit.OK]
    assert kvm.host_read(m, 3 * 4096).data == (4).to_bytes(8, "little")
    assert kvm.host_madvise(m, Madv.MADV_DONTNEED).errno == 0       # zaps the ring from the VMA
    assert kvm.host_read(m, 0).signal == signal.SIGBUS
    assert kvm.guest_read([G]).exits == [Exit.MMIO]


def test_guest_memfd_creation_and_mmap(kvm):
    got = {f: kvm.create_guest_memfd(MB, GuestMemfdFlags(f)).errno for f in (0, 1, 2, 3, 4)}
    assert got == {0: 0, 1: 0, 2: 0, 3: 0, 4: errno.EINVAL}
    plain = kvm.create_guest_memfd(MB).gmem
    assert kvm.host_mmap(MappingKind.GUEST_MEMFD, MB, gmem=plain).errno == errno.ENODEV
    private = kvm.create_guest_memfd(MB, GMEM_MMAP).gmem
    pm = kvm.host_mmap(MappingKind.GUEST_MEMFD, MB, gmem=private).mapping
    assert kvm.host_read(pm, 0).signal == signal.SIGBUS               # private by default
    shared = kvm.create_guest_memfd(MB, GMEM_MMAP | GMEM_SHARED).gmem
    sm = kvm.host_mmap(MappingKind.GUEST_MEMFD, MB, gmem=shared).mapping
    kvm.host_write(sm, 0, (0x77).to_bytes(8, "little"))
    gm = KVM_MEM.GUEST_MEMFD
    assert kvm.set_memory_region(MemoryRegion(1, Gpa(G), MB, sm.hva, gm, shared)).errno == 0
    assert kvm.guest_read([G]).values == [0x77]                       # userspace_addr decides
    assert kvm.guest_write([G + 8], 5).exits == [Exit.OK]
    assert kvm.host_read(sm, 8).data == (5).to_bytes(8, "little")
    assert kvm.host_fallocate(shared, 0, 4096).errno == 0
    assert kvm.guest_read([G]).values == [0]
    assert kvm.set_memory_region(MemoryRegion(2, Gpa(2 * G), MB, pm.hva, gm, private)).errno == 0
    assert kvm.guest_read([2 * G]).exits == [Exit.MMIO]
