"""Host memory: folios, pins, allocator poisoning, VMAs, GUP return codes, notifier-firing operations."""

import errno

import pytest

from kvmsim.errors import EHWPOISON, ModelError
from kvmsim.mm.gup import FOLL, get_user_page_fast_only, get_user_pages_unlocked
from kvmsim.mm.host import Host
from kvmsim.mm.page import GUP_PIN_COUNTING_BIAS, PG, PfnClass
from kvmsim.mm.reclaim import folio_referenced, migrate_page, punch_hole, reclaim, thp_collapse, thp_split, writeback
from kvmsim.mm.vma import Pte, VmaKind


class Recorder:
    def __init__(self):
        self.events = []

    def invalidate_range_start(self, rng):
        self.events.append(("start", rng.event.value, rng.start, rng.end))
        yield "rec"

    def invalidate_range_end(self, rng):
        self.events.append(("end", rng.event.value))
        yield "rec"

    def clear_flush_young(self, s, e):
        return False

    clear_young = clear_flush_young

    def test_young(self, a):
        return False

    def release(self):
        self.events.append(("release",))


@pytest.fixture
def host():
    h = Host()
    h.rec = Recorder()
    h.mm.register_notifier(h.rec)
    return h


def test_pin_bias_small_vs_large_and_zero(host):
    phys = host.phys
    small = phys.alloc()
    large = phys.alloc(9)
    phys.try_grab_folio(small, True, "t")
    phys.try_grab_folio(large + 3, True, "t")
    phys.try_grab_folio(phys.zero_pfn, True, "t")
    assert phys.page_count(small) == 1 + GUP_PIN_COUNTING_BIAS
    assert phys.page_count(large) == 2 and phys.pincount[large] == 1
    assert phys.page_count(phys.zero_pfn) == 1                       # pinning the zero page is a no-op
    phys.unpin_user_page(large + 3, "t")
    assert phys.pincount[large] == 0 and phys.page_count(large) == 1


def test_tail_refcount_field_is_zero(host):
    head = host.phys.alloc(2)
    assert host.phys.page_ref_count(head + 1) == 0 and host.phys.page_count(head + 1) == 1
    assert not host.phys.get_page_unless_zero(head + 1, "t")


def test_freed_page_use_is_reported(host):
    pfn = host.phys.alloc()
    host.phys.put_page(pfn, "t")
    host.phys.SetPageDirty(pfn, "late", kvm=True)
    assert any(f.kind == "uaf" and f.caller == "late" for f in host.journal.facts)


def test_has_freed_pages_follows_the_poisoned_pages(host):
    """The range paths skip the use-after-free flag check while no page is freed: the answer must be
    exactly "some page is poisoned", through a freed folio and its reuse page by page."""
    phys = host.phys
    poisoned = lambda: bool((phys.flags[:phys.nr] & int(PG.poisoned)).any())     # noqa: E731
    head = phys.alloc(1)
    assert not phys.has_freed_pages() and not poisoned()
    phys.put_page(head, "t")                         # an order-1 folio: two freed pages
    assert phys.has_freed_pages() and poisoned()
    reused = [phys.alloc(), phys.alloc()]
    assert sorted(reused) == [head, head + 1]
    assert not phys.has_freed_pages() and not poisoned()


def test_gup_return_codes(host):
    mm = host.mm
    anon = mm.mmap(4 * 4096, VmaKind.ANON)
    ro = mm.mmap(4 * 4096, VmaKind.ANON, prot="r")
    drv = host.add_driver("d", 2, "no_page")
    pf = mm.mmap(2 * 4096, VmaKind.PFNMAP, driver=drv)
    assert get_user_pages_unlocked(mm, 0x1000, FOLL.WRITE, caller="t") == (-errno.EFAULT, None)   # no VMA
    assert get_user_pages_unlocked(mm, ro.start, FOLL.WRITE, caller="t")[0] == -errno.EFAULT      # protection
    assert get_user_pages_unlocked(mm, pf.start, FOLL(0), caller="t")[0] == -errno.EFAULT         # VM_PFNMAP
    assert get_user_page_fast_only(mm, anon.start, FOLL.WRITE, caller="t") is None                  # never faults
    rc, pfn = get_user_pages_unlocked(mm, anon.start, FOLL.WRITE, caller="t")
    assert rc == 1 and get_user_page_fast_only(mm, anon.start, FOLL.WRITE, caller="t") == pfn
    mm.signal_pending = True
    assert get_user_pages_unlocked(mm, anon.start + 4096, FOLL.WRITE | FOLL.INTERRUPTIBLE, caller="t")[0] == -errno.EINTR
    mm.signal_pending = False
    mm.mmap_lock_contended = True
    assert get_user_pages_unlocked(mm, anon.start + 4096, FOLL.WRITE, caller="t")[0] == -errno.EAGAIN
    mm.mmap_lock_contended = False
    anon.pte[2] = int(Pte.HWPOISON)
    assert get_user_pages_unlocked(mm, anon.start + 2 * 4096, FOLL.WRITE, caller="t")[0] == -EHWPOISON


def test_nowait_needs_io_after_swap_out(host):
    mm = host.mm
    anon = mm.mmap(4 * 4096, VmaKind.ANON)
    mm.host_access(anon.start, True, 5)
    assert reclaim(mm, anon.start, 4096)["young"] == 1              # just touched: rotated
    assert reclaim(mm, anon.start, 4096)["reclaimed"] == 1
    assert get_user_pages_unlocked(mm, anon.start, FOLL.NOWAIT, caller="t") == (0, None)
    assert mm.host_access(anon.start, False) == 5                    # swap-in restores the data


def test_munmap_mprotect_madvise_fire_notifier(host):
    mm = host.mm
    v = mm.mmap(8 * 4096, VmaKind.ANON)
    mm.host_access(v.start, True, 1)
    mm.mprotect(v.start, 8 * 4096, "r")
    mm.madvise(v.start, 4096, "DONTNEED")
    mm.munmap(v.start + 4096, 4096)
    kinds = [e[1] for e in host.rec.events if e[0] == "start"]
    assert kinds == ["protection_vma", "clear", "unmap"]
    assert mm.vma_lookup(v.start + 4096) is None and mm.vma_lookup(v.start + 2 * 4096) is not None


def test_dontneed_private_zeroes_shared_keeps(host):
    mm = host.mm
    priv = mm.mmap(4096, VmaKind.ANON)
    shared = mm.mmap(4096, VmaKind.ANON_SHARED)
    for v in (priv, shared):
        mm.host_access(v.start, True, 0x11)
        mm.madvise(v.start, 4096, "DONTNEED")
    assert mm.host_access(priv.start, False) == 0
    assert mm.host_access(shared.start, False) == 0x11
    with pytest.raises(ModelError) as e:
        mm.madvise(priv.start, 4096, "REMOVE")
    assert e.value.errno == errno.EINVAL


def test_fork_cow_break_changes_pfn(host):
    mm = host.mm
    v = mm.mmap(4096, VmaKind.ANON)
    mm.host_access(v.start, True, 3)
    before = mm.pte_of(v.start)[1]
    child = mm.fork()
    mm.host_access(v.start, True, 4)
    assert mm.pte_of(v.start)[1] != before
    assert child.host_access(v.start, False) == 3


def test_writeback_cleans_and_truncate_detects_late_dirty(host):
    mm = host.mm
    f = mm.mmap(4 * 4096, VmaKind.FILE)
    mm.host_access(f.start, True, 9)
    pfn = mm.pte_of(f.start)[1]
    host.phys.get_page(pfn, "holder")                                  # somebody keeps the folio alive
    assert writeback(mm, f.mapping) == 1 and f.mapping.disk[0] == 9
    assert not host.phys.folio_test_dirty(pfn)
    assert not mm.pte_of(f.start)[2] & int(Pte.WRITE)                  # mkclean write-protected it
    punch_hole(mm, f.mapping, 0, 1)
    host.phys.SetPageDirty(pfn, "late_marker", kvm=True)
    assert any(x.kind == "dirty_after_truncate" for x in host.journal.facts)


def test_reclaim_loses_data_of_a_clean_but_written_folio(host):
    mm = host.mm
    f = mm.mmap(4096, VmaKind.FILE)
    mm.host_access(f.start, True, 1)
    writeback(mm, f.mapping)
    pfn = mm.pte_of(f.start)[1]
    host.phys.data[pfn] = 2                                            # a write the primary MMU never saw
    folio_referenced(mm, pfn)
    reclaim(mm, f.start, 4096)
    assert any(x.kind == "data_lost" for x in host.journal.facts)


def test_migration_refused_with_extra_reference(host):
    mm = host.mm
    v = mm.mmap(4096, VmaKind.ANON)
    mm.host_access(v.start, True, 1)
    pfn = mm.pte_of(v.start)[1]
    host.phys.get_page(pfn, "gup")
    with pytest.raises(ModelError) as e:
        migrate_page(mm, v.start)
    assert e.value.errno == errno.EAGAIN
    host.phys.put_page(pfn, "gup")
    new = migrate_page(mm, v.start)
    assert new != pfn and host.phys.is_poisoned(pfn) and mm.host_access(v.start, False) == 1


def test_thp_and_hugetlb_levels(host):
    mm = host.mm
    t = mm.mmap(4 << 20, VmaKind.ANON, thp=True)
    mm.host_access(t.start, True, 1)
    assert mm.pte_of(t.start + 4096)[3] == 2
    thp_split(mm, t.start)
    assert mm.pte_of(t.start)[3] == 1
    thp_collapse(mm, t.start)
    assert mm.pte_of(t.start)[3] == 2 and mm.host_access(t.start, False) == 1
    g = mm.mmap(1 << 30, VmaKind.HUGETLB, page_size=1 << 30)
    mm.host_access(g.start + 123 * 4096, True, 5)
    pfn = mm.pte_of(g.start)[1]
    assert mm.pte_of(g.start)[3] == 3 and host.phys.folio_nr_pages(pfn) == 512 * 512


def test_driver_classes(host):
    ttm = host.add_driver("ttm", 4, "nonrefcounted", order=2, compound=False)
    cls = [host.phys.pfn_class(int(p)) for p in ttm.pfns]
    assert cls == [PfnClass.DRIVER_REFCOUNTED] + [PfnClass.NONREFCOUNTED] * 3
    bar = host.add_driver("bar", 2, "no_page")
    assert not host.phys.pfn_valid(int(bar.pfns[0]))
