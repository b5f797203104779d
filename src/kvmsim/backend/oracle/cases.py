"""The hardware-mode conformance suite: cases run on every oracle kernel (agent.py) and on the model in
hardware mode under that kernel's protocol (model_side.py), compared phase by phase (compare.py).

Every case runs on a fresh VM with one vCPU, its data memslot at guest physical 1 GiB (slot 1), and
names what it compares (``compare``): always ``out`` (errnos, exits, values, dirty bitmaps, ring
entries the VMM saw), then stats deltas and kernel-function call counts by name.  The default is
:data:`STRUCT_PAGE_CALLS` + :data:`MMU_STATS`.  ``phases`` limits counting comparisons to some phases
(setup phases that only create mappings are still compared on ``out``).

Sizes are small (64-256 pages) because a slow-path NPT fault costs 70-90 us under TCG; the README
table case uses 1,000 pages as ../shared/oracle/README.md does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmsim.backend.base import (Falloc, KvmMemFlags, Madv, ManualProtect, MappingKind, Prot, VmOptions,
                                 delete_memory_region, move_memory_region, page_gpas,
                                 update_memory_region_flags)
from kvmsim.backend.oracle.side import HUGETLB_1G, Side

GPA = 1 << 30
LOG = KvmMemFlags.KVM_MEM_LOG_DIRTY_PAGES
M2 = 2 << 20
G1 = 1 << 30
MADV_PAGEOUT = 21
MADV_COLLAPSE = 25

# The kernel functions whose call counts the cases compare by default (docs/oracle.md maps each to
# the model's counters); a function a kernel lacks must have 0 calls in the model.
STRUCT_PAGE_CALLS = ("kvm_set_pfn_dirty", "kvm_set_pfn_accessed", "kvm_release_pfn_clean",
                     "kvm_release_pfn_dirty", "kvm_release_page_clean", "kvm_release_page_dirty",
                     "kvm_release_page_unused")
MMU_STATS = ("pages_4k", "pages_2m", "pages_1g", "pf_taken", "pf_fast")
DEFAULT_COMPARE = ("out",) + MMU_STATS + STRUCT_PAGE_CALLS


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    fn: Callable[[Side], None]
    compare: tuple[str, ...] = DEFAULT_COMPARE
    doc: str = ""


CASES: list[Case] = []


def case(group: str, compare: tuple[str, ...] = DEFAULT_COMPARE, name: str | None = None):
    def deco(fn):
        CASES.append(Case(name or fn.__name__.replace("_", "-"), group, fn, compare,
                          (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""))
        return fn
    return deco


def _kind_case(kind, size: int, stride: int, first: str):
    """first-touch and repeated faults on one kind of backing: ``first`` is "write" or "read"."""
    def fn(s: Side) -> None:
        s.begin()
        with s.phase("map"):
            m = s.map(kind, size)
            s.note("slot", s.slot(m))
        gpas = page_gpas(GPA, size // 4096)[::stride]
        with s.phase(f"first {first}"):
            s.write(gpas, 0x11) if first == "write" else s.read(gpas)
        with s.phase("write"):
            s.write(gpas, 0x22)
        with s.phase("write again"):
            s.write(gpas, 0x33)
        with s.phase("read"):
            s.read(gpas)
    return fn


_KINDS = [("anon-private", MappingKind.ANON_PRIVATE, 256 * 4096, 1),
          ("anon-shared", MappingKind.ANON_SHARED, 256 * 4096, 1),
          ("memfd", MappingKind.MEMFD, 256 * 4096, 1),
          ("thp", MappingKind.THP_ANON, 4 * M2, 64),
          ("hugetlb-2M", MappingKind.HUGETLB_2M, 4 * M2, 64),
          ("hugetlb-1G", HUGETLB_1G, G1, 4096)]
for _label, _kind, _size, _stride in _KINDS:
    for _first in ("write", "read"):
        case("fault", name=f"first-{_first}-{_label}")(_kind_case(_kind, _size, _stride, _first))


# ---- host mm operations under a live slot -----------------------------------------------------------------

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


# ---- dirty logging --------------------------------------------------------------------------------------

def _logged(s: Side, kind=MappingKind.ANON_SHARED, npages: int = 256, flags=LOG, **opts):
    s.begin(VmOptions(**opts))
    with s.phase("map"):
        m = s.map(kind, npages * 4096)
        s.note("slot", s.slot(m, flags=flags))
    return m, page_gpas(GPA, npages)


def _bits(o):
    return {"errno": o.errno, "dirty": len(o.dirty), "first": min(o.dirty) if o.dirty else None,
            "last": max(o.dirty) if o.dirty else None}


@case("dirty")
def get_dirty_log(s: Side) -> None:
    """Classic GET_DIRTY_LOG: exact bitmap, write-protection (no PML under SVM), faults on the next pass."""
    m, gpas = _logged(s)
    with s.phase("first write"):
        s.write(gpas[:200], 1)
    with s.phase("GET_DIRTY_LOG"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write again"):
        s.write(gpas[:200], 2)
    with s.phase("GET_DIRTY_LOG 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("GET_DIRTY_LOG 3"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def dirty_log_reads_not_logged(s: Side) -> None:
    """Guest reads are never logged; a read fault maps a logged page read-only... then a write faults."""
    m, gpas = _logged(s)
    with s.phase("read"):
        s.read(gpas[:100])
    with s.phase("GET_DIRTY_LOG"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write"):
        s.write(gpas[:100], 3)
    with s.phase("GET_DIRTY_LOG 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def manual_protect(s: Side) -> None:
    """MANUAL_DIRTY_LOG_PROTECT2: GET does not re-protect, CLEAR does; a GET without CLEAR repeats."""
    m, gpas = _logged(s, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    with s.phase("write"):
        s.write(gpas[:192], 1)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("GET again"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write before CLEAR"):
        s.write(gpas[:192], 2)
    with s.phase("CLEAR 0..128"):
        s.note("errno", s.b.clear_dirty_log(1, 0, 128).errno)
    with s.phase("GET after CLEAR"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write after CLEAR"):
        s.write(gpas[:192], 3)


@case("dirty")
def manual_initially_set(s: Side) -> None:
    """INITIALLY_SET: all bits set, nothing write-protected until CLEAR; CLEAR protects exactly its range."""
    m, gpas = _logged(s, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                      | ManualProtect.KVM_DIRTY_LOG_INITIALLY_SET)
    with s.phase("write"):
        s.write(gpas, 1)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("CLEAR 64..192"):
        s.note("errno", s.b.clear_dirty_log(1, 64, 128).errno)
    with s.phase("GET after CLEAR"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write again"):
        s.write(gpas, 2)
    with s.phase("GET 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def clear_dirty_log_alignment(s: Side) -> None:
    """KVM_CLEAR_DIRTY_LOG: first_page and num_pages must be 64-aligned except a final partial chunk."""
    m, gpas = _logged(s, npages=200, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    with s.phase("write"):
        s.write(gpas, 1)
        s.note("get", _bits(s.b.get_dirty_log(1)))
    with s.phase("CLEARs"):
        s.note("errnos", [s.b.clear_dirty_log(1, f, n).errno
                          for f, n in ((1, 63), (0, 63), (32, 32), (0, 32), (0, 64), (64, 64), (192, 8),
                                       (128, 72), (192, 16))])
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write"):
        s.write(gpas, 2)


@case("dirty")
def clear_dirty_log_partial_mask(s: Side) -> None:
    """CLEAR of selected pages inside a 64-page chunk: only those are re-protected."""
    m, gpas = _logged(s, npages=128, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    with s.phase("write"):
        s.write(gpas, 1)
        s.note("get", _bits(s.b.get_dirty_log(1)))
    with s.phase("CLEAR odd pages"):
        s.note("errno", s.b.clear_dirty_log(1, 0, 128, range(1, 128, 2)).errno)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write"):
        s.write(gpas, 2)


@case("dirty")
def dirty_ring(s: Side) -> None:
    """The dirty ring: one entry per page until reset (hardware), reset re-protects, re-write faults."""
    m, gpas = _logged(s, npages=256, dirty_ring_entries=4096)
    with s.phase("write"):
        s.write(gpas[:200], 1)
    with s.phase("write again"):
        s.write(gpas[:200], 2)
    with s.phase("harvest+reset"):
        got = s.b.dirty_ring_harvest()
        s.note("harvest", {"entries": len(got), "distinct": len(set(got))})
        s.note("reset", s.b.dirty_ring_reset())
    with s.phase("write after reset"):
        s.write(gpas[:200], 3)
        got = s.b.dirty_ring_harvest()
        s.note("harvest", {"entries": len(got), "distinct": len(set(got))})
        s.note("reset", s.b.dirty_ring_reset())


@case("dirty")
def dirty_ring_get_dirty_log(s: Side) -> None:
    """With the dirty ring on, KVM_GET_DIRTY_LOG is refused (ENXIO)."""
    m, gpas = _logged(s, npages=64, dirty_ring_entries=4096)
    with s.phase("write"):
        s.write(gpas, 1)
    with s.phase("GET_DIRTY_LOG"):
        s.note("errno", s.b.get_dirty_log(1).errno)


def _huge_logging(s: Side, kind, size: int, stride: int, manual: bool) -> None:
    opts = {"manual_protect": ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE} if manual else {}
    s.begin(VmOptions(**opts))
    npages = size // 4096
    with s.phase("map+touch"):
        m = s.map(kind, size)
        s.note("slot", s.slot(m))
        s.write(page_gpas(GPA, npages)[::stride], 1)
    with s.phase("enable logging"):
        s.note("errno", update_memory_region_flags(s.b, 1, LOG).errno)
    with s.phase("write all 4K pages"):
        s.write(page_gpas(GPA, npages), 2)
    with s.phase("disable logging"):
        s.note("errno", update_memory_region_flags(s.b, 1, KvmMemFlags(0)).errno)
    with s.phase("touch again"):
        s.write(page_gpas(GPA, npages)[::stride], 3)


@case("dirty")
def logging_thp_first_write(s: Side) -> None:
    """A dirty-logged slot over THP: faults map 4K only (no huge page while logging), every write logged."""
    m, gpas = _logged(s, MappingKind.THP_ANON, npages=1024)
    with s.phase("write"):
        s.write(gpas[::64], 1)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def disable_logging_thp(s: Side) -> None:
    """Dirty logging over THP: split to 4K while logging, huge pages recovered after logging stops."""
    _huge_logging(s, MappingKind.THP_ANON, 2 * M2, 512, False)


@case("dirty")
def disable_logging_hugetlb_2m(s: Side) -> None:
    """Dirty logging over hugetlb 2M: eager split, then 2M back in pages_2m after disabling."""
    _huge_logging(s, MappingKind.HUGETLB_2M, 2 * M2, 512, False)


@case("dirty")
def disable_logging_hugetlb_2m_manual(s: Side) -> None:
    """As disable-logging-hugetlb-2m with manual protect (no eager split at enable without INITIALLY_SET)."""
    _huge_logging(s, MappingKind.HUGETLB_2M, 2 * M2, 512, True)


@case("dirty")
def disable_logging_hugetlb_1g(s: Side) -> None:
    """The series' own example: 1 GiB hugetlb, logging on, every 4K page written (512x512 SPTEs), off."""
    _huge_logging(s, HUGETLB_1G, G1, 262144, False)


# ---- memslots -------------------------------------------------------------------------------------------

@case("memslot")
def delete_slot_live(s: Side) -> None:
    """Deleting a slot with live writable SPTEs (KVM_X86_QUIRK_SLOT_ZAP_ALL: zap all, fast)."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 128)
    with s.phase("delete"):
        s.note("errno", delete_memory_region(s.b, 1).errno)
    with s.phase("read"):
        s.read(gpas[:1])


@case("memslot")
def delete_recreate_slot(s: Side) -> None:
    """Delete then re-create the same slot: data kept by the host, faults again."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 128)
    with s.phase("delete"):
        s.note("errno", delete_memory_region(s.b, 1).errno)
    with s.phase("recreate"):
        s.note("slot", s.slot(m))
    with s.phase("read"):
        s.read(gpas)


@case("memslot")
def move_slot_live(s: Side) -> None:
    """KVM_MR_MOVE with live SPTEs: the old range becomes MMIO, the new one faults in the same data."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 128)
    with s.phase("move"):
        s.note("errno", move_memory_region(s.b, 1, 2 * GPA).errno)
    with s.phase("read new"):
        s.read(page_gpas(2 * GPA, 128))
    with s.phase("read old"):
        s.read(gpas[:1])


@case("memslot")
def readonly_slot(s: Side) -> None:
    """KVM_MEM_READONLY: reads map, writes exit to userspace as MMIO."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.ANON_SHARED, 64 * 4096)
        s.note("host write", s.b.host_write(m, 0, (7).to_bytes(8, "little")).signal)
        s.note("slot", s.slot(m, flags=KvmMemFlags.KVM_MEM_READONLY))
    with s.phase("read"):
        s.read(page_gpas(GPA, 64))
    with s.phase("write"):
        s.write(page_gpas(GPA, 8), 9)


@case("memslot")
def overlap_and_bad_args(s: Side) -> None:
    """Memslot argument checks: overlap EEXIST, misaligned EINVAL, bad flags EINVAL."""
    s.begin()
    with s.phase("slots"):
        m = s.map(MappingKind.ANON_SHARED, 64 * 4096)
        s.note("first", s.slot(m))
        s.note("overlap", s.slot(m, slot=2, gpa=GPA + 4096 * 8))
        s.note("misaligned gpa", s.slot(m, slot=3, gpa=GPA * 3 + 8))
        s.note("bad flags", s.slot(m, slot=4, gpa=GPA * 4, flags=KvmMemFlags(1 << 8)))


# ---- pfncache (kvmclock) ------------------------------------------------------------------------------

@case("pfncache", compare=("out",))
def pfncache_anon_dontneed(s: Side) -> None:
    """kvmclock gfn_to_pfn_cache over private anon: invalidated by MADV_DONTNEED, refreshed to the new page."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE, 16)
    with s.phase("enable"):
        s.note("errno", s.b.kvmclock_enable(gpas[0]).errno)
        s.note("written", s.b.kvmclock_update().written)
    with s.phase("DONTNEED+update"):
        s.b.host_madvise(m, Madv.MADV_DONTNEED)
        s.note("written", s.b.kvmclock_update().written)


@case("pfncache", compare=("out",))
def pfncache_perf_ring(s: Side) -> None:
    """kvmclock over a VM_PFNMAP perf ring: hva_to_pfn_remapped once the PTE is writable."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.PERF_RING, 8 * 4096)
        s.info("vm_flags", s.vm_flags(m))
        s.require_vm_flag(m, "pf", "the perf ring of this kernel is not VM_PFNMAP (perf_mmap() serves "
                                   "struct pages from perf_mmap_fault(), so KVM uses GUP, not hva_to_pfn_remapped)")
        s.note("slot", s.slot(m, size=8 * 4096))
    with s.phase("guest write"):
        s.write(page_gpas(GPA, 1), 5)
    with s.phase("kvmclock"):
        s.note("errno", s.b.kvmclock_enable(GPA).errno)
        s.note("written", s.b.kvmclock_update().written)


@case("pfncache", compare=("out",))
def pfncache_io_uring_ring(s: Side) -> None:
    """kvmclock over a VM_MIXEDMAP io_uring ring: GUP works; MADV_DONTNEED zaps it and updates stop."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.IO_URING_RING, 4 * 4096)
        s.info("vm_flags", s.vm_flags(m))
        s.note("slot", s.slot(m))
    with s.phase("kvmclock"):
        s.note("errno", s.b.kvmclock_enable(GPA).errno)
        s.note("written", s.b.kvmclock_update().written)


# ---- pre-fault ----------------------------------------------------------------------------------------

@case("prefault")
def pre_fault_memory(s: Side) -> None:
    """KVM_PRE_FAULT_MEMORY over a populated shared range: SPTEs without guest accesses, then no faults."""
    s.begin()
    with s.phase("map+populate"):
        m = s.map(MappingKind.ANON_SHARED, 128 * 4096)
        s.note("slot", s.slot(m))
        s.note("populate", s.b.host_madvise(m, Madv.MADV_POPULATE_WRITE).errno)
    with s.phase("pre-fault"):
        s.note("errno", s.pre_fault(GPA, 128 * 4096))
    with s.phase("write"):
        s.write(page_gpas(GPA, 128), 4)


@case("prefault")
def pre_fault_no_slot(s: Side) -> None:
    """KVM_PRE_FAULT_MEMORY outside any memslot fails (ENOENT)."""
    s.begin()
    with s.phase("pre-fault"):
        s.note("errno", s.pre_fault(3 * GPA, 4096))


# ---- the README table (../shared/oracle/README.md), 1,000 pages ------------------------------------------------

TABLE_CASE = "readme-table"


@case("table", name=TABLE_CASE,
      compare=DEFAULT_COMPARE + ("mark_page_accessed",))
def readme_table(s: Side) -> None:
    """First write of 1,000 pages, MADV_DONTNEED, GET_DIRTY_LOG after a write pass, slot delete."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.ANON_SHARED, 16 << 20)
        s.note("slot", s.slot(m))
    gpas = page_gpas(GPA, 1000)
    with s.phase("first write"):
        s.write(gpas, 1)
    with s.phase("MADV_DONTNEED"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_DONTNEED).errno)
    with s.phase("write, enable logging"):
        s.write(gpas, 2)
        s.note("flags", update_memory_region_flags(s.b, 1, LOG).errno)
    with s.phase("write pass"):
        s.write(gpas, 3)
    with s.phase("GET_DIRTY_LOG"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write pass 2"):
        s.write(gpas, 4)
    with s.phase("GET_DIRTY_LOG 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write pass 3"):
        s.write(gpas, 5)
    with s.phase("delete slot"):
        s.note("errno", delete_memory_region(s.b, 1).errno)
