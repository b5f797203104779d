"""Oracle cases: host mm operations under a live memslot (mm/madvise.c, mm/mprotect.c, mm/mremap.c,
kernel/fork.c, mm/khugepaged.c MADV_COLLAPSE, mm/huge_memory.c THP split, mm/vmscan.c reclaim) and what
KVM's mmu_notifier does about them (virt/kvm/kvm_main.c ``kvm_mmu_notifier_invalidate_range_start()``).
"""

from __future__ import annotations

from kvmsim.backend.base import Madv, MappingKind, Prot, VmOptions, page_gpas
from kvmsim.backend.oracle.cases import GPA, M2, MADV_COLLAPSE, MADV_PAGEOUT, case
from kvmsim.backend.oracle.side import Side


def _written(s: Side, kind, npages: int = 128, **opts):
    s.begin(VmOptions(**opts))
    with s.phase("populate"):
        m = s.map(kind, npages * 4096)
        s.note("slot", s.slot(m))
        s.write(page_gpas(GPA, npages), 0x5A)
    return m, page_gpas(GPA, npages)


@case("hostop")
def dontneed_anon_private(s: Side) -> None:
    """MADV_DONTNEED of written private pages: notifier zap, then zeros on re-read."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE)
    with s.phase("MADV_DONTNEED"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_DONTNEED).errno)
    with s.phase("read back"):
        s.read(gpas)


@case("hostop")
def dontneed_anon_shared(s: Side) -> None:
    """MADV_DONTNEED of shmem pages: the page stays in the page cache, the data survives."""
    m, gpas = _written(s, MappingKind.ANON_SHARED)
    with s.phase("MADV_DONTNEED"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_DONTNEED).errno)
    with s.phase("read back"):
        s.read(gpas)


@case("hostop")
def remove_memfd(s: Side) -> None:
    """MADV_REMOVE on a memfd: pages freed, guest reads zeros."""
    m, gpas = _written(s, MappingKind.MEMFD)
    with s.phase("MADV_REMOVE"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_REMOVE).errno)
    with s.phase("read back"):
        s.read(gpas)


@case("hostop")
def punch_hole_memfd(s: Side) -> None:
    """fallocate(PUNCH_HOLE) of half a memfd under the slot."""
    m, gpas = _written(s, MappingKind.MEMFD)
    with s.phase("PUNCH_HOLE"):
        s.note("errno", s.b.host_fallocate(m, 0, 64 * 4096).errno)
    with s.phase("read back"):
        s.read(gpas)


@case("hostop")
def dontneed_hugetlb_2m(s: Side) -> None:
    """MADV_DONTNEED of a hugetlb 2M range: the 2M SPTEs go, pages_2m drops, data survives (shared)."""
    m, _ = _written(s, MappingKind.HUGETLB_2M, npages=1024)
    with s.phase("MADV_DONTNEED"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_DONTNEED).errno)
    with s.phase("read back"):
        s.read(page_gpas(GPA, 1024)[::512])


@case("hostop")
def munmap_then_access(s: Side) -> None:
    """munmap of the backing: zap, then guest accesses fail with -EFAULT (hardware mode)."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 64)
    with s.phase("munmap"):
        s.note("errno", s.b.host_munmap(m).errno)
    with s.phase("read"):
        s.read(gpas[:1])


@case("hostop")
def mprotect_ro_then_write(s: Side) -> None:
    """mprotect(PROT_READ) of the backing: reads work, a write gets -EFAULT (mmu_stress_test)."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 64)
    with s.phase("mprotect"):
        s.note("errno", s.b.host_mprotect(m, Prot.PROT_READ).errno)
    with s.phase("read"):
        s.read(gpas)
    with s.phase("write"):
        s.write(gpas[:1], 0x77)


@case("hostop")
def mprotect_ro_private_then_write(s: Side) -> None:
    """mprotect(PROT_READ) of private anon: the change_protection notifier zaps writable SPTEs."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE, 64)
    with s.phase("mprotect"):
        s.note("errno", s.b.host_mprotect(m, Prot.PROT_READ).errno)
    with s.phase("read"):
        s.read(gpas)
    with s.phase("write"):
        s.write(gpas[:1], 0x77)


@case("hostop")
def fork_cow_private(s: Side) -> None:
    """fork with private pages: the parent's PTEs go read-only (notifier), a guest write breaks COW."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE, 64)
    with s.phase("fork"):
        child = s.b.host_fork()
    with s.phase("guest write"):
        s.write(gpas, 0x66)
    with s.phase("read"):
        s.read(gpas)
    child.release()


@case("hostop")
def fork_shared(s: Side) -> None:
    """fork with shared pages: nothing to break, guest writes need no new fault."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 64)
    with s.phase("fork"):
        child = s.b.host_fork()
    with s.phase("guest write"):
        s.write(gpas, 0x66)
    child.release()


@case("hostop")
def thp_collapse(s: Side) -> None:
    """MADV_COLLAPSE of 4K-mapped private memory: notifier zap, then one 2M SPTE on re-access."""
    s.begin()
    with s.phase("populate"):
        m = s.map(MappingKind.ANON_PRIVATE, 2 * M2)     # no MADV_HUGEPAGE: 4K pages first
        s.note("slot", s.slot(m))
        s.write(page_gpas(GPA, 1024), 0x42)
    with s.phase("MADV_COLLAPSE"):
        s.note("errno", s.madvise_raw(m, MADV_COLLAPSE))
    with s.phase("read back"):
        s.read(page_gpas(GPA, 1024)[::512])


@case("hostop")
def thp_split(s: Side) -> None:
    """MADV_DONTNEED of one 4K page inside a THP: the PMD is split, the 2M SPTE zapped, 4K on re-access."""
    s.begin()
    with s.phase("populate"):
        m = s.map(MappingKind.THP_ANON, 2 * M2)
        s.note("slot", s.slot(m))
        s.write(page_gpas(GPA, 1024)[::512], 0x42)
    with s.phase("split"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_DONTNEED, 4096, 4096).errno)
    with s.phase("read back"):
        s.read(page_gpas(GPA, 1024)[::64])


@case("hostop")
def pageout_anon(s: Side) -> None:
    """MADV_PAGEOUT of private anon pages with no swap: nothing can be reclaimed, SPTEs stay."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE, 64)
    with s.phase("MADV_PAGEOUT"):
        s.note("errno", s.madvise_raw(m, MADV_PAGEOUT))
    with s.phase("read"):
        s.read(gpas)


@case("hostop")
def pageout_memfd(s: Side) -> None:
    """MADV_PAGEOUT of memfd pages with no swap: unmapped (notifier), kept in the page cache."""
    m, gpas = _written(s, MappingKind.MEMFD, 64)
    with s.phase("MADV_PAGEOUT"):
        s.note("errno", s.madvise_raw(m, MADV_PAGEOUT))
    with s.phase("read"):
        s.read(gpas)


@case("hostop")
def mremap_away(s: Side) -> None:
    """mremap of the backing to a new address: the old hva is gone, guest accesses -EFAULT."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 64)
    with s.phase("mremap"):
        s.note("errno", s.b.host_mremap(m).errno)
    with s.phase("read"):
        s.read(gpas[:1])


@case("hostop")
def page_flags_after_write(s: Side) -> None:
    """PG_dirty of private anon pages after the first guest write (/proc/kpageflags vs the model's flag)."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE, 64)
    with s.phase("flags"):
        s.note("flags", {k: v for k, v in s.page_flags(m, 64).items() if k in ("present", "pg_dirty")})
    with s.phase("page_idle, guest reads half"):
        # recorded only: the model has no page_idle; the kernel ages SPTEs through the notifier
        # (mm/page_idle.c → folio_referenced() → mmu_notifier_clear_young → kvm_age_gfn)
        s.info("idle", s.idle_after(m, 64, lambda: s.read(gpas[:32])))


