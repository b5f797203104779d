"""Real /dev/kvm: the kvmclock gfn_to_pfn_cache (MSR_KVM_SYSTEM_TIME_NEW), the one place KVM holds a pfn
on an emulating host (kvm-on-these-machines.md §10)."""

from __future__ import annotations

import pytest

from kvmsim.backend.base import Madv, MappingKind, MemoryRegion, Prot
from kvmsim.types import Gpa

pytestmark = pytest.mark.kvm

G = 1 << 30
PV = G + 0x100                     # pvclock in page 0 of the slot


def _clock_on(kvm, kind, npages=16):
    m = kvm.host_mmap(kind, npages * 4096).mapping
    assert kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva)).errno == 0
    return m


def test_anon_is_written_and_updates_bump_the_version(kvm):
    _clock_on(kvm, MappingKind.ANON_SHARED)
    assert kvm.kvmclock_enable(Gpa(PV)).errno == 0
    first = kvm.kvmclock_update()
    assert first.written and first.after.version % 2 == 0 and first.after.version > 0
    assert first.after.flags & 1                      # PVCLOCK_TSC_STABLE_BIT
    second = kvm.kvmclock_update()
    assert second.written and second.after.version > first.after.version
    assert second.after.system_time >= first.after.system_time


def test_perf_ring_written_only_after_a_write_fault(kvm):
    m = _clock_on(kvm, MappingKind.PERF_RING, npages=5)
    kvm.kvmclock_enable(Gpa(PV))
    assert not kvm.kvmclock_update().written          # PTE present but read-only: RO fault, skipped
    kvm.guest_read([G])
    assert kvm.host_read(m, 0).signal == 0
    assert not kvm.kvmclock_update().written          # reads do not make it writable
    kvm.guest_write([G + 8], 0)                       # a write fault on the user page
    out = kvm.kvmclock_update()
    assert out.written and out.after.version > 0      # now hva_to_pfn_remapped() succeeds


def test_follows_the_page_after_dontneed(kvm):
    m = _clock_on(kvm, MappingKind.ANON_PRIVATE)
    kvm.kvmclock_enable(Gpa(PV))
    assert kvm.kvmclock_update().written
    assert kvm.host_madvise(m, Madv.MADV_DONTNEED).errno == 0
    assert kvm.host_read(m, 0x100).data == bytes(8)   # the old page is gone
    out = kvm.kvmclock_update()
    assert out.before.version == 0 and out.written    # the invalidated cache re-resolved the hva


def test_follows_a_remap_at_the_same_address(kvm):
    m = _clock_on(kvm, MappingKind.ANON_SHARED)
    kvm.kvmclock_enable(Gpa(PV))
    assert kvm.kvmclock_update().written
    kvm.host_munmap(m)
    assert kvm.kvmclock_update().after is None        # nothing to read through
    n = kvm.host_mmap(MappingKind.MEMFD, m.size, hva=m.hva).mapping
    assert kvm.host_read(n, 0x100).data == bytes(8)
    assert kvm.kvmclock_update().written              # the update landed in the new mapping
    assert kvm.host_read(n, 0x100).data != bytes(8)


def test_mprotect_read_only_drops_the_update(kvm):
    m = _clock_on(kvm, MappingKind.ANON_SHARED)
    kvm.kvmclock_enable(Gpa(PV))
    assert kvm.kvmclock_update().written
    kvm.host_mprotect(m, Prot.PROT_READ)
    out = kvm.kvmclock_update()
    assert out.exit.value == "ok" and not out.written
    kvm.host_mprotect(m, Prot.PROT_READ | Prot.PROT_WRITE)
    assert kvm.kvmclock_update().written


def test_io_uring_ring_through_gup(kvm):
    _clock_on(kvm, MappingKind.IO_URING_RING, npages=4)
    kvm.kvmclock_enable(Gpa(PV))
    assert kvm.kvmclock_update().written
