"""Real /dev/kvm: dirty bitmap (classic and manual protect) and the dirty ring."""

from __future__ import annotations

import errno
import random

import pytest

from kvmsim.backend.base import (
    DirtyGfn, KVM_MEM, ManualProtect, MappingKind, MemoryRegion, VmOptions, page_gpas,
)
from kvmsim.errors import UsageError
from kvmsim.types import Gpa

pytestmark = pytest.mark.kvm

G = 1 << 30
NPAGES = 1024                      # a 4 MiB slot
LOG = KVM_MEM.LOG_DIRTY_PAGES
MANUAL = ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INITIALLY_SET = ManualProtect.KVM_DIRTY_LOG_INITIALLY_SET


def _logged_slot(kvm, kind=MappingKind.ANON_SHARED, options=None):
    kvm.create_vm(options or VmOptions())
    m = kvm.host_mmap(kind, NPAGES * 4096).mapping
    assert kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva, LOG)).errno == 0
    return m


def _random_writes(rng, k):
    """k distinct pages, some written twice, at random 8-byte offsets inside the page."""
    pages = sorted(rng.sample(range(NPAGES), k))
    gpas = [G + p * 4096 + 8 * rng.randrange(512) for p in pages]
    gpas += rng.sample(gpas, k // 4)
    rng.shuffle(gpas)
    return set(pages), gpas


@pytest.mark.parametrize("kind", [MappingKind.ANON_SHARED, MappingKind.ANON_PRIVATE, MappingKind.MEMFD])
def test_dirty_log_is_exact_and_get_resets_it(kvm, kind):
    m = _logged_slot(kvm, kind)
    rng = random.Random(5)
    for trial in range(3):
        pages, gpas = _random_writes(rng, rng.randrange(50, 300))
        kvm.guest_write(gpas, trial)
        kvm.guest_read(page_gpas(G, 64))                    # reads are not logged
        kvm.host_write(m, 4096 * rng.randrange(NPAGES), b"x")  # nor are host writes
        got = kvm.get_dirty_log(1)
        assert got.errno == 0 and got.dirty == pages
        assert kvm.get_dirty_log(1).dirty == frozenset()    # the second GET gives 0


def test_get_dirty_log_without_logging_is_enoent(kvm):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, 16 * 4096).mapping
    kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva))
    assert kvm.get_dirty_log(1).errno == errno.ENOENT
    assert kvm.get_dirty_log(9).errno == errno.ENOENT       # no such slot (NULL bitmap never touched)


def test_manual_protect_initially_set_then_clear(kvm):
    _logged_slot(kvm, options=VmOptions(manual_protect=MANUAL | INITIALLY_SET))
    assert kvm.get_dirty_log(1).dirty == frozenset(range(NPAGES))       # all ones
    assert kvm.clear_dirty_log(1, 0, NPAGES).errno == 0
    assert kvm.get_dirty_log(1).dirty == frozenset()
    pages, gpas = _random_writes(random.Random(9), 200)
    kvm.guest_write(gpas, 1)
    assert kvm.get_dirty_log(1).dirty == pages
    assert kvm.get_dirty_log(1).dirty == pages                        # GET does not clear
    low = {p for p in pages if p < NPAGES // 2}
    assert kvm.clear_dirty_log(1, 0, NPAGES // 2, low).errno == 0     # clear only the lower half
    assert kvm.get_dirty_log(1).dirty == pages - low
    again = min(low)
    kvm.guest_write([G + again * 4096], 2)                            # a rewrite reappears
    assert kvm.get_dirty_log(1).dirty == (pages - low) | {again}


def test_manual_protect_without_initially_set_starts_empty(kvm):
    _logged_slot(kvm, options=VmOptions(manual_protect=MANUAL))
    assert kvm.get_dirty_log(1).dirty == frozenset()
    kvm.guest_write([G + 5 * 4096], 1)
    assert kvm.get_dirty_log(1).dirty == {5}


@pytest.mark.parametrize("first,num,expected", [
    (1, 64, errno.EINVAL), (0, 63, errno.EINVAL), (64, 64, 0), (NPAGES - 64, 64, 0), (0, NPAGES, 0),
    (NPAGES - 64, 128, errno.EINVAL),
])
def test_clear_dirty_log_alignment(kvm, first, num, expected):
    _logged_slot(kvm, options=VmOptions(manual_protect=MANUAL | INITIALLY_SET))
    assert kvm.clear_dirty_log(1, first, num).errno == expected


def test_dirty_ring_exact_harvest_and_reset_count(kvm):
    _logged_slot(kvm, options=VmOptions(dirty_ring_entries=4096))
    pages, gpas = _random_writes(random.Random(3), 300)
    kvm.guest_write(gpas, 1)
    got = kvm.dirty_ring_harvest()
    # one entry per emulated write: duplicates included, in write order
    assert [g.offset for g in got] == [(a - G) // 4096 for a in gpas]
    assert {g.slot for g in got} == {1} and {g.offset for g in got} == pages
    assert kvm.dirty_ring_reset() == len(gpas)
    assert kvm.dirty_ring_harvest() == [] and kvm.dirty_ring_reset() == 0
    kvm.guest_write([G] * 10, 2)                      # 10 writes to one page: 10 entries
    assert kvm.dirty_ring_harvest() == [DirtyGfn(1, 0)] * 10
    assert kvm.dirty_ring_reset() == 10
    assert kvm.get_dirty_log(1).errno == errno.ENXIO  # the bitmap is unavailable with a ring


def test_dirty_ring_budget_and_size_are_enforced(kvm):
    _logged_slot(kvm, options=VmOptions(dirty_ring_entries=4096))
    kvm.guest_write(page_gpas(G, 1000), 1)
    with pytest.raises(UsageError, match="harvest and reset"):
        kvm.guest_write(page_gpas(G, 100), 1)        # 1100 > 4096 / 4
    kvm.dirty_ring_harvest()
    assert kvm.dirty_ring_reset() == 1000
    assert kvm.guest_write(page_gpas(G, 100), 1).complete
    for entries in (1024, 5000):
        with pytest.raises(UsageError, match="power of two"):
            kvm.create_vm(VmOptions(dirty_ring_entries=entries))
    with pytest.raises(UsageError, match="without a dirty ring"):
        kvm.create_vm()
        kvm.dirty_ring_harvest()
