"""VMAs, host PTEs and the objects behind them (include/linux/mm_types.h, mm/shmem.c, mm/filemap.c).

A :class:`Vma` covers ``[start, end)`` of the VMM's address space.  Its host PTEs are two numpy
arrays, one entry per 4 KiB page: ``pte_pfn`` (-1 when not present) and ``pte`` (:class:`Pte`
bits), plus ``pte_level`` (the mapping level: a THP or hugetlb mapping sets 2M/1G on every covered
entry).  Shared and file mappings look their pages up in an :class:`AddressSpace`; private
anonymous memory owns its pages through an :class:`AnonVma`; VM_PFNMAP / VM_MIXEDMAP mappings get
their PTEs from a :class:`~kvmsim.mm.driver.Driver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntFlag
from typing import TYPE_CHECKING

import numpy as np

from kvmsim.types import PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

if TYPE_CHECKING:
    from kvmsim.mm.driver import Driver


class VM(IntFlag):
    """``vm_flags`` (include/linux/mm.h)."""

    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4
    SHARED = 0x8
    MAYREAD = 0x10
    MAYWRITE = 0x20
    PFNMAP = 0x400
    IO = 0x4000
    DONTCOPY = 0x20000
    HUGETLB = 0x400000
    MIXEDMAP = 0x10000000
    HUGEPAGE = 0x20000000
    NOHUGEPAGE = 0x40000000


class Pte(IntFlag):
    """Host PTE bits the model keeps (arch/x86/include/asm/pgtable_types.h, by meaning)."""

    PRESENT = 1 << 0
    WRITE = 1 << 1
    YOUNG = 1 << 2
    DIRTY = 1 << 3
    SPECIAL = 1 << 4       # pte_special(): pfnmap / zero page, no struct page to GUP
    SWAP = 1 << 5          # not present, contents in swap: faulting it in needs I/O
    PROTNONE = 1 << 6      # NUMA hinting
    HWPOISON = 1 << 7


class VmaKind(str, Enum):
    """What backs a VMA; the scenario vocabulary."""

    ANON = "anon"                  # MAP_PRIVATE|MAP_ANONYMOUS (THP with VM_HUGEPAGE)
    ANON_SHARED = "anon_shared"    # MAP_SHARED|MAP_ANONYMOUS (shmem)
    MEMFD = "memfd"                # memfd_create / shmem file
    FILE = "file"                  # regular file with writeback
    HUGETLB = "hugetlb"            # MAP_HUGETLB / hugetlbfs, 2M or 1G
    PFNMAP = "pfnmap"              # driver memory, remap_pfn_range / vmf_insert_pfn
    MIXEDMAP = "mixedmap"          # driver memory, vm_insert_page (normal pages) / special


@dataclass(eq=False)
class AddressSpace:
    """Model of ``struct address_space`` of a shmem/memfd/hugetlbfs/regular file.

    ``pages[index]`` is the pfn caching page ``index`` (-1 if not cached).  ``disk`` holds what
    writeback stored, for regular files: a clean folio whose content differs from ``disk`` is data
    that reclaim will lose.
    """

    name: str
    npages: int
    can_writeback: bool = False           # mapping_can_writeback(): regular files
    folio_order: int = 0                  # hugetlbfs: 9 or 18
    owner_id: int = 0
    pages: np.ndarray = field(default=None)  # type: ignore[assignment]
    disk: dict[int, int] = field(default_factory=dict)
    truncated_from: int | None = None     # set by truncate: pages >= this index are gone
    needs_io: set[int] = field(default_factory=set)   # indices whose data must be read from disk
    removed: set[int] = field(default_factory=set)    # indices truncated / hole-punched
    vmas: list["Vma"] = field(default_factory=list)   # i_mmap: the VMAs mapping this file

    def __post_init__(self) -> None:
        if self.pages is None:
            self.pages = np.full(self.npages, -1, dtype=np.int64)

    def truncated(self, index: int) -> bool:
        """Was page ``index`` removed by truncate / hole punch? (for the dirty-after-truncate check)"""
        return index in self.removed or (self.truncated_from is not None and index >= self.truncated_from)


@dataclass(eq=False)
class AnonVma:
    """Owner of private anonymous pages (``struct anon_vma``); shared between parent and child after fork."""

    name: str
    owner_id: int = 0
    swap: dict[tuple[int, int], int] = field(default_factory=dict)   # (vma id, page index) → data
    vmas: list["Vma"] = field(default_factory=list)


@dataclass(eq=False)
class Vma:
    """Model of ``struct vm_area_struct`` with its host PTEs."""

    start: int
    end: int
    flags: VM
    kind: VmaKind
    page_size: int = PAGE_SIZE            # hugetlb 2M/1G; THP uses 4K with VM_HUGEPAGE
    mapping: AddressSpace | None = None
    pgoff: int = 0                        # page offset of ``start`` in ``mapping``
    anon: AnonVma | None = None
    driver: "Driver | None" = None
    writenotify: bool = False             # vma_wants_writenotify(): file mappings with dirty accounting
    id: int = 0
    pte_pfn: np.ndarray = field(default=None, repr=False)   # type: ignore[assignment]
    pte: np.ndarray = field(default=None, repr=False)       # type: ignore[assignment]
    pte_level: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.npages
        if self.pte_pfn is None:
            self.pte_pfn = np.full(n, -1, dtype=np.int64)
            self.pte = np.zeros(n, dtype=np.uint8)
            self.pte_level = np.full(n, PG_LEVEL_4K, dtype=np.uint8)

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    def idx(self, hva: int) -> int:
        return (hva - self.start) >> PAGE_SHIFT

    def contains(self, hva: int) -> bool:
        return self.start <= hva < self.end

    @property
    def huge_level(self) -> int:
        if self.page_size == 1 << 30:
            return PG_LEVEL_1G
        if self.page_size == 1 << 21:
            return PG_LEVEL_2M
        return PG_LEVEL_4K

    def vm_page_prot_writable(self) -> bool:
        """Does ``vm_page_prot`` allow writes (shared writable mapping without writenotify)?"""
        return bool(self.flags & VM.WRITE) and bool(self.flags & VM.SHARED) and not self.writenotify

    def describe(self) -> str:
        names = [f.name for f in VM if f in self.flags and f.name]
        return f"{self.kind.value} [{self.start:#x}-{self.end:#x}) {'|'.join(n for n in names if n)}"
