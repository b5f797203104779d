"""Host THP and reclaim paths the oracle kernels showed (docs/oracle.md): the huge zero folio on a THP
read fault and its write fault (v6.12 split vs v6.13 THP), PMD splitting on a partial zap, and
MADV_COLD / MADV_PAGEOUT with and without swap."""

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.mm.host import Host
from kvmsim.mm.huge_memory import set_host_kernel
from kvmsim.mm.page import PG
from kvmsim.mm.vma import Pte, VmaKind
from kvmsim.types import PMD_SIZE

from tests.core.test_mm import Recorder

M2 = 2 << 20


@pytest.fixture
def host():
    h = Host()
    h.rec = Recorder()
    h.mm.register_notifier(h.rec)
    return h



def _host_level(mm, hva: int) -> int:
    """The level the host page tables map ``hva`` at, 1 when nothing is mapped (what x86's
    ``host_pfn_mapping_level()`` reads, :func:`kvmsim.x86.tdp_mmu.host_pfn_mapping_level`)."""
    vma, pfn, bits, level = mm.pte_of(hva)
    return 1 if vma is None or not bits & int(Pte.PRESENT) or pfn < 0 else level

def _starts(host):
    return [(e[1], e[3] - e[2]) for e in host.rec.events if e[0] == "start"]


# ---- the huge zero folio -----------------------------------------------------------------------------

def test_thp_read_fault_maps_the_huge_zero_folio_read_only(host):
    mm, phys = host.mm, host.phys
    t = mm.mmap(2 * M2, VmaKind.ANON, thp=True)
    assert mm.host_access(t.start + 5 * 4096, False) == 0
    vma, pfn, bits, level = mm.pte_of(t.start)
    assert level == 2 and phys.is_huge_zero_pfn(pfn) and not bits & Pte.WRITE
    assert mm.pte_of(t.start + M2 - 4096)[1] == pfn + 511       # the whole PMD, subpage by subpage
    assert not phys.is_huge_zero_pfn(phys.zero_pfn) and phys.PageReserved(pfn) is False
    assert mm.pte_of(t.start + M2)[1] == -1                      # the other PMD untouched
    # a second THP VMA shares the same folio
    u = mm.mmap(M2, VmaKind.ANON, thp=True)
    mm.host_access(u.start, False)
    assert phys.folio(mm.pte_of(u.start)[1]) == phys.folio(pfn)


def test_use_zero_page_off_allocates_a_thp_on_read(host):
    mm = host.mm
    mm.thp_use_zero_page = False
    t = mm.mmap(M2, VmaKind.ANON, thp=True)
    mm.host_access(t.start, False)
    _, pfn, bits, level = mm.pte_of(t.start)
    assert level == 2 and bits & Pte.WRITE and not host.phys.is_huge_zero_pfn(pfn)


def test_huge_zero_write_fault_v613_maps_a_new_thp(host):
    mm, phys = host.mm, host.phys
    t = mm.mmap(M2, VmaKind.ANON, thp=True)
    mm.host_access(t.start, False)
    host.rec.events.clear()
    mm.host_access(t.start + 7 * 4096, True, 9)                  # default: v6.13 do_huge_zero_wp_pmd()
    _, pfn, bits, level = mm.pte_of(t.start)
    assert level == 2 and bits & Pte.WRITE and not phys.is_huge_zero_pfn(pfn)
    assert _starts(host) == [("clear", PMD_SIZE)]
    assert mm.host_access(t.start + 7 * 4096, False) == 9 and mm.host_access(t.start, False) == 0


def test_huge_zero_write_fault_v612_splits_and_copies_4k(host):
    mm, phys = host.mm, host.phys
    set_host_kernel(mm, (6, 12))
    t = mm.mmap(M2, VmaKind.ANON, thp=True)
    mm.host_access(t.start, False)
    host.rec.events.clear()
    mm.host_access(t.start + 7 * 4096, True, 9)
    _, pfn, bits, level = mm.pte_of(t.start + 7 * 4096)
    assert level == 1 and bits & Pte.WRITE and phys.folio_nr_pages(pfn) == 1
    _, other, obits, olevel = mm.pte_of(t.start)
    assert olevel == 1 and other == phys.zero_pfn and not obits & Pte.WRITE
    assert _starts(host) == [("clear", PMD_SIZE), ("clear", 4096)]      # __split_huge_pmd, then COW
    assert mm.host_access(t.start + 7 * 4096, False) == 9


def test_huge_zero_mapping_teardown_keeps_the_folio(host):
    mm, phys = host.mm, host.phys
    t = mm.mmap(M2, VmaKind.ANON, thp=True)
    mm.host_access(t.start, False)
    zero = phys.huge_zero_pfn
    child = mm.fork()
    child.exit_mmap()
    mm.madvise(t.start, 4096, "dontneed")                        # a partial zap splits the zero PMD
    assert mm.pte_of(t.start + 4096)[1] == phys.zero_pfn
    mm.munmap(t.start, M2)
    assert phys.page_count(zero) == 1 and not phys.is_poisoned(zero)


# ---- PMD split on a partial zap -------------------------------------------------------------------------

def test_dontneed_of_4k_inside_a_thp_splits_the_pmd(host):
    mm, phys = host.mm, host.phys
    t = mm.mmap(2 * M2, VmaKind.ANON, thp=True)
    for a in (t.start, t.start + M2):
        mm.host_access(a + 4096, True, 7)
    head = phys.folio(mm.pte_of(t.start)[1])
    host.rec.events.clear()
    mm.madvise(t.start + 4096, 4096, "dontneed")
    assert _starts(host) == [("clear", 4096), ("clear", PMD_SIZE)]     # madvise's range, then the split
    assert mm.pte_of(t.start + 4096)[1] == -1
    assert _host_level(mm, t.start) == 1 and _host_level(mm, t.start + 2 * 4096) == 1
    assert mm.pte_of(t.start + 2 * 4096)[1] == head + 2 and phys.page_count(head + 2) == 1
    assert phys.is_poisoned(head + 1)                                   # the zapped subpage is freed
    assert _host_level(mm, t.start + M2) == 2                     # the other PMD is whole
    assert mm.host_access(t.start + 4096, False) == 0


def test_dontneed_of_a_whole_pmd_does_not_split(host):
    mm = host.mm
    t = mm.mmap(2 * M2, VmaKind.ANON, thp=True)
    mm.host_access(t.start, True, 1)
    host.rec.events.clear()
    mm.madvise(t.start, M2, "dontneed")
    assert _starts(host) == [("clear", M2)] and mm.journal.counters.get("thp_split", 0) == 0


def test_partial_munmap_of_a_thp_splits_the_pmd(host):
    mm = host.mm
    t = mm.mmap(M2, VmaKind.ANON, thp=True)
    mm.host_access(t.start, True, 3)
    mm.munmap(t.start + M2 - 4096, 4096)
    assert _host_level(mm, t.start) == 1 and mm.host_access(t.start, False) == 3


# ---- MADV_COLD / MADV_PAGEOUT ---------------------------------------------------------------------------

def _memfd(host, npages=4):
    mm = host.mm
    v = mm.mmap(npages * 4096, VmaKind.MEMFD)
    for k in range(npages):
        mm.host_access(v.start + k * 4096, True, 10 + k)
    return v


def test_pageout_shmem_without_swap_unmaps_and_keeps_the_cache(host):
    mm, phys = host.mm, host.phys
    mm.total_swap_pages = 0
    v = _memfd(host)
    cached = v.mapping.pages.copy()
    host.rec.events.clear()
    mm.madvise(v.start, 4 * 4096, "pageout")
    assert _starts(host) == [("clear", 4096)] * 4                       # try_to_unmap, page by page
    assert (v.pte_pfn == -1).all() and (v.mapping.pages == cached).all()
    assert all(phys.flags[int(p)] & PG.dirty for p in cached)          # shmem_writepage: redirty
    assert [mm.host_access(v.start + k * 4096, False) for k in range(4)] == [10, 11, 12, 13]
    assert (v.pte_pfn == cached).all()


def test_pageout_shmem_with_swap_evicts(host):
    mm, phys = host.mm, host.phys
    v = _memfd(host)
    old = int(v.mapping.pages[0])
    mm.madvise(v.start, 4 * 4096, "MADV_PAGEOUT")
    assert (v.mapping.pages == -1).all() and phys.is_poisoned(old)
    assert mm.host_access(v.start, False) == 10


def test_pageout_ignores_references_reclaim_does_not(host):
    from kvmsim.mm.reclaim import reclaim
    mm = host.mm
    v = _memfd(host, 1)
    assert reclaim(mm, v.start, 4096)["young"] == 1                     # the aging reclaim keeps it
    mm.host_access(v.start, False)
    mm.madvise(v.start, 4096, "pageout")
    assert v.pte_pfn[0] == -1 and v.mapping.pages[0] == -1


def test_pageout_private_anon(host):
    mm, phys = host.mm, host.phys
    a = mm.mmap(2 * 4096, VmaKind.ANON)
    mm.host_access(a.start, True, 5)
    mm.total_swap_pages = 0
    host.rec.events.clear()
    mm.madvise(a.start, 2 * 4096, "pageout")                            # add_to_swap() fails
    assert host.rec.events == [] and a.pte[0] & Pte.PRESENT
    mm.total_swap_pages = 1 << 20
    pfn = int(a.pte_pfn[0])
    mm.madvise(a.start, 2 * 4096, "pageout")
    assert a.pte[0] == Pte.SWAP and phys.is_poisoned(pfn) and mm.host_access(a.start, False) == 5


def test_cold_makes_old_without_the_notifier(host):
    mm, phys = host.mm, host.phys
    v = _memfd(host, 2)
    phys.mark_page_accessed(int(v.pte_pfn[0]), "t")
    host.rec.events.clear()
    mm.madvise(v.start, 2 * 4096, "cold")
    assert host.rec.events == [] and (v.pte & Pte.PRESENT).all() and not (v.pte & Pte.YOUNG).any()
    assert not phys.folio_test_referenced(int(v.pte_pfn[0]))


def test_pageout_errors(host):
    mm = host.mm
    h = mm.mmap(M2, VmaKind.HUGETLB, page_size=M2)
    with pytest.raises(ModelError) as e:
        mm.madvise(h.start, M2, "pageout")
    assert e.value.errno == errno.EINVAL and "VM_HUGETLB" in str(e.value)
    with pytest.raises(ModelError) as e:
        mm.madvise(h.start, M2, "willneed")
    assert e.value.errno == errno.EINVAL and "PAGEOUT" in str(e.value)


def test_pageout_in_a_scenario():
    from kvmsim.scenarios.loader import ScenarioError, loads
    from kvmsim.scenarios.runner import run
    text = """
name = "pageout"
description = "MADV_PAGEOUT of written memfd memory under a memslot: the zap, then the read faults back in"
[[vma]]
name = "ram"
kind = "memfd"
size = "16K"
[vm]
policy = "both"
[[memslot]]
id = 0
gpa = 0
size = "16K"
vma = "ram"
[[step]]
op = "write"
gpa = 0x1000
value = 7
[[step]]
op = "madvise"
vma = "ram"
advice = "madv_pageout"
[[step]]
op = "read"
gpa = 0x1000
expect = { value = 7 }
"""
    sc = loads(text)
    legacy, series = run(sc, "legacy"), run(sc, "series")
    assert series.verdict == "clean"
    # legacy's zap of the writable SPTE dirties the folio from the SPTE's pfn, at the pageout step
    assert ("INV-2", 2) in {(v.invariant, v.step) for v in legacy.violations}
    with pytest.raises(ScenarioError, match="pageout"):
        loads(text.replace("madv_pageout", "willneed"))
