"""The VMM's address space: VMAs, the host page-fault handler and host operations (mm/mmap.c, mm/memory.c,
mm/mprotect.c, mm/madvise.c, mm/mremap.c, kernel/fork.c).

Every host operation that changes or removes host PTEs fires the mmu_notifier around the change,
and is a kernel path (:mod:`kvmsim.sched`): ``mm.munmap(...)`` runs it, ``mm.munmap.steps(...)``
gives the steps so a KVM fault can be interleaved between ``invalidate_range_start`` and ``_end``.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator

import numpy as np

from kvmsim.errors import ModelError
from kvmsim.mm.huge_memory import do_huge_zero_wp_pmd, pmd_index, split_huge_pmd
from kvmsim.mm.notifier import MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent
from kvmsim.mm.page import PG, PfnClass, PhysMem
from kvmsim.mm.vma import VM, AddressSpace, AnonVma, Pte, Vma, VmaKind
from kvmsim.sched import DEFAULT_SCHEDULER, Scheduler, Steps, Wait, kpath
from kvmsim.trace import Journal
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_2M, PMD_SIZE

_P, _W, _Y, _D, _S, _SW = (int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY),
                           int(Pte.SPECIAL), int(Pte.SWAP))
MMAP_BASE = 0x7F00_0000_0000
_PG_DIRTY = int(PG.dirty)


class MmapLock:
    """``mm->mmap_lock`` (an rw_semaphore), by holder thread name.

    Only the host operations that can race each other in an ``interleave`` take it: ``munmap()``,
    ``mprotect()`` and ``mremap()`` for write, ``madvise()`` for read (mm/mmap.c, mm/mprotect.c,
    mm/mremap.c, mm/madvise.c).  Taking a free lock is not a preemption point (no yield), so the
    steps of an uncontended operation are unchanged; a contended one yields :class:`Wait`.
    """

    def __init__(self, sched: Scheduler = DEFAULT_SCHEDULER) -> None:
        self.sched = sched                # holders are named by the world's active thread
        self.writer: str | None = None
        self.readers: list[str] = []

    @kpath
    def mmap_write_lock(self) -> Steps:
        while self.writer is not None or self.readers:
            yield Wait("mmap_write_lock", lambda: self.writer is None and not self.readers)
        self.writer = self.sched.active

    @kpath
    def mmap_read_lock(self) -> Steps:
        while self.writer is not None:
            yield Wait("mmap_read_lock", lambda: self.writer is None)
        self.readers.append(self.sched.active)

    def mmap_write_unlock(self) -> None:
        self.writer = None

    def mmap_read_unlock(self, holder: str) -> None:
        """Release ``holder``'s read hold (named: an abandoned thread's generator is closed from another)."""
        self.readers.remove(holder)
# the madvise() advice the model implements (include/uapi/asm-generic/mman-common.h names, no MADV_)
MADVISE_ADVICE = ("DONTNEED", "REMOVE", "COLD", "PAGEOUT")


class Mm:
    """Model of ``struct mm_struct``: the VMM process's address space."""

    def __init__(self, phys: PhysMem, journal: Journal, name: str = "vmm", sched: Scheduler = DEFAULT_SCHEDULER):
        self.phys = phys
        self.journal = journal
        self.name = name
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.notifiers: list[MmuNotifierOps] = []
        self._next_addr = MMAP_BASE
        self._next_vma_id = 1
        self.signal_pending = False          # a fatal signal is pending for the VMM thread
        self.mmap_lock_contended = False     # makes the killable mmap lock fail (GUP -EAGAIN)
        self.sched = sched
        self.mmap_lock = MmapLock(sched)
        # host-kernel settings: /sys/kernel/mm/transparent_hugepage/use_zero_page, total_swap_pages
        # (the model's swap is unbounded; 0 = no swap), and the write fault on a huge zero PMD, whose
        # behaviour changed in v6.13 (kvmsim.mm.huge_memory.set_host_kernel; default v6.13)
        self.thp_use_zero_page = True
        self.total_swap_pages = 1 << 40
        self.huge_zero_wp_fault = do_huge_zero_wp_pmd

    # ---- VMA tree ---------------------------------------------------------------------------
    def _insert(self, vma: Vma) -> Vma:
        vma.id = self._next_vma_id
        self._next_vma_id += 1
        i = bisect.bisect(self._starts, vma.start)
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.start)
        for owner in (vma.mapping, vma.anon):
            if owner is not None:
                owner.vmas.append(vma)
        return vma

    def _remove(self, vma: Vma) -> None:
        i = self.vmas.index(vma)
        del self.vmas[i]
        del self._starts[i]
        for owner in (vma.mapping, vma.anon):
            if owner is not None and vma in owner.vmas:
                owner.vmas.remove(vma)

    def vma_lookup(self, hva: int) -> Vma | None:
        """``vma_lookup()``: the VMA containing ``hva``, or None."""
        i = bisect.bisect(self._starts, hva) - 1
        if i >= 0:
            vma = self.vmas[i]
            if hva < vma.end:
                return vma
        return None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def get_unmapped_area(self, length: int, align: int = PAGE_SIZE) -> int:
        addr = (self._next_addr + align - 1) // align * align
        self._next_addr = addr + length + PMD_SIZE      # a guard gap keeps VMAs from merging
        return addr

    # ---- mmap ----------------------------------------------------------------------------------
    def mmap(self, length: int, kind: VmaKind, *, prot: str = "rw", addr: int | None = None,
             page_size: int = PAGE_SIZE, mapping: AddressSpace | None = None, pgoff: int = 0,
             driver=None, thp: bool = False, shared: bool | None = None, io: bool = False) -> Vma:
        """``mmap()`` of one of the :class:`VmaKind` backings; returns the new VMA."""
        if length <= 0 or length % page_size:
            raise ModelError(errno.EINVAL, f"mmap length {length:#x} is not a multiple of {page_size:#x}")
        flags = VM.MAYREAD | VM.MAYWRITE
        if "r" in prot:
            flags |= VM.READ
        if "w" in prot:
            flags |= VM.WRITE
        if shared is None:
            shared = kind not in (VmaKind.ANON,)
        if shared:
            flags |= VM.SHARED
        if kind == VmaKind.HUGETLB:
            flags |= VM.HUGETLB
        if kind == VmaKind.PFNMAP:
            flags |= VM.PFNMAP | VM.IO | VM.DONTCOPY
        if kind == VmaKind.MIXEDMAP:
            flags |= VM.MIXEDMAP | (VM.IO if io else 0)
        if thp:
            flags |= VM.HUGEPAGE
        if addr is None:
            addr = self.get_unmapped_area(length, align=max(page_size, PMD_SIZE if thp else PAGE_SIZE))
        elif addr % page_size:
            raise ModelError(errno.EINVAL, f"mmap address {addr:#x} not aligned to {page_size:#x}")
        elif self.vmas_in(addr, addr + length):
            self.munmap(addr, length)          # MAP_FIXED replaces what was there
        npages = length >> PAGE_SHIFT
        anon = None
        if kind in (VmaKind.ANON_SHARED, VmaKind.MEMFD, VmaKind.FILE, VmaKind.HUGETLB) and mapping is None:
            order = {1 << 21: 9, 1 << 30: 18}.get(page_size, 0)
            mapping = self.new_address_space(f"{kind.value}@{addr:#x}", npages,
                                             can_writeback=kind == VmaKind.FILE, folio_order=order)
        if kind == VmaKind.HUGETLB and not shared:
            anon = self.new_anon(f"hugetlb-private@{addr:#x}")
        if kind == VmaKind.ANON:
            anon = self.new_anon(f"anon@{addr:#x}")
            pgoff = addr >> PAGE_SHIFT
        vma = Vma(addr, addr + length, flags, kind, page_size=page_size, mapping=mapping, pgoff=pgoff,
                  anon=anon, driver=driver, writenotify=bool(mapping and mapping.can_writeback and shared))
        self._insert(vma)
        if driver is not None:
            driver.mmap(self, vma)
        self.journal.count("host_mmap")
        return vma

    def new_address_space(self, name: str, npages: int, *, can_writeback: bool = False,
                          folio_order: int = 0) -> AddressSpace:
        asp = AddressSpace(name, npages, can_writeback=can_writeback, folio_order=folio_order)
        asp.owner_id = self.phys.register_owner(asp)
        return asp

    def new_anon(self, name: str) -> AnonVma:
        anon = AnonVma(name)
        anon.owner_id = self.phys.register_owner(anon)
        return anon

    # ---- notifier plumbing --------------------------------------------------------------------
    def register_notifier(self, sub: MmuNotifierOps) -> None:
        self.notifiers.append(sub)

    def unregister_notifier(self, sub: MmuNotifierOps) -> None:
        if sub in self.notifiers:
            self.notifiers.remove(sub)

    @kpath
    def invalidate_range_start(self, rng: MmuNotifierRange) -> Steps:
        self.journal.count("mmu_notifier_invalidate")
        for sub in list(self.notifiers):
            yield from _steps(sub.invalidate_range_start, rng)
        yield f"mmu_notifier_invalidate_range_start done [{rng.start:#x}, {rng.end:#x}) {rng.event.value}"

    @kpath
    def invalidate_range_end(self, rng: MmuNotifierRange) -> Steps:
        for sub in list(self.notifiers):
            yield from _steps(sub.invalidate_range_end, rng)

    def clear_flush_young(self, start: int, end: int) -> bool:
        return any([sub.clear_flush_young(start, end) for sub in list(self.notifiers)])

    def clear_young(self, start: int, end: int) -> bool:
        return any([sub.clear_young(start, end) for sub in list(self.notifiers)])

    def test_young(self, addr: int) -> bool:
        return any(sub.test_young(addr) for sub in list(self.notifiers))

    # ---- PTE helpers ----------------------------------------------------------------------------
    def _zap_ptes(self, vma: Vma, lo: int, hi: int, *, drop_anon: bool) -> None:
        """Clear PTEs ``[lo, hi)`` (page indices); private anon pages lose this mapping's reference."""
        pfns = vma.pte_pfn[lo:hi]
        present = (vma.pte[lo:hi] & _P) != 0
        dirty = present & ((vma.pte[lo:hi] & _D) != 0)
        if vma.mapping is not None and dirty.any():
            # zap_pte_range: a dirty PTE of a file page makes the folio dirty before unmapping
            for pfn in np.unique(pfns[dirty]):
                self.phys.flags[self.phys.head[pfn]] |= _PG_DIRTY  # folio_mark_dirty()
        if drop_anon and vma.anon is not None:
            owned = present & (pfns != self.phys.zero_pfn) & ((vma.pte[lo:hi] & _S) == 0)
            if self.phys.huge_zero_pfn >= 0:
                owned &= self.phys.head[np.where(present, pfns, 0)] != self.phys.huge_zero_pfn
            if vma.kind == VmaKind.HUGETLB or (vma.pte_level[lo:hi] > 1).any():
                heads = np.unique(self.phys.head[pfns[owned]])
                for h in heads:
                    self.phys.put_page(int(h), "zap_pte_range")
            else:
                for pfn in pfns[owned]:
                    self.phys.put_page(int(pfn), "zap_pte_range")
            for i in range(lo, hi):
                vma.anon.swap.pop((vma.id, vma.pgoff + i), None)
        vma.pte_pfn[lo:hi] = -1
        vma.pte[lo:hi] = 0
        vma.pte_level[lo:hi] = 1

    def _split_straddled_pmds(self, vma: Vma, lo: int, hi: int) -> None:
        """``zap_pmd_range()`` (mm/memory.c): a THP (or huge zero) PMD the range ``[lo, hi)`` covers only
        in part is split first (``next - addr != HPAGE_PMD_SIZE`` → ``__split_huge_pmd()``), so only
        the covered PTEs go."""
        if vma.kind == VmaKind.HUGETLB:
            return
        for edge in (lo, hi - 1):
            if not 0 <= edge < vma.npages or vma.pte_level[edge] != PG_LEVEL_2M or not vma.pte[edge] & _P:
                continue
            first = pmd_index(vma, edge)
            if first < lo or first + LEVEL_PAGES[PG_LEVEL_2M] > hi:
                split_huge_pmd(self, vma, edge, reason="zap_pmd_range")

    def hva_range_of(self, vma: Vma, lo: int, hi: int) -> tuple[int, int]:
        return vma.start + (lo << PAGE_SHIFT), vma.start + (hi << PAGE_SHIFT)

    def _clip(self, start: int, length: int) -> Iterator[tuple[Vma, int, int]]:
        end = start + length
        for vma in self.vmas_in(start, end):
            lo = max(start, vma.start)
            hi = min(end, vma.end)
            yield vma, vma.idx(lo), vma.idx(hi)

    # ---- host operations ------------------------------------------------------------------------
    @kpath
    def munmap(self, start: int, length: int) -> Steps:
        """``munmap()``: zap the range under the notifier, then remove (or split) the VMAs."""
        if start % PAGE_SIZE or length <= 0:
            raise ModelError(errno.EINVAL, f"munmap({start:#x}, {length:#x}): bad range")
        end = start + (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        yield from self.mmap_lock.mmap_write_lock.steps()
        try:
            rng = MmuNotifierRange(start, end, MmuNotifyEvent.UNMAP, reason="munmap")
            yield from self.invalidate_range_start.steps(rng)
            for vma, lo, hi in list(self._clip(start, end - start)):
                self._split_straddled_pmds(vma, lo, hi)
                self._zap_ptes(vma, lo, hi, drop_anon=True)
                self._split_out(vma, lo, hi)
            yield "munmap: PTEs zapped, VMAs removed"
            yield from self.invalidate_range_end.steps(rng)
        finally:
            self.mmap_lock.mmap_write_unlock()
        self.journal.count("host_munmap")

    def _split_out(self, vma: Vma, lo: int, hi: int) -> None:
        """Remove pages ``[lo, hi)`` of ``vma``, keeping what is left on either side as VMAs."""
        self._remove(vma)
        for a, b in ((0, lo), (hi, vma.npages)):
            if b > a:
                part = Vma(vma.start + (a << PAGE_SHIFT), vma.start + (b << PAGE_SHIFT), vma.flags, vma.kind,
                           page_size=vma.page_size, mapping=vma.mapping, pgoff=vma.pgoff + a, anon=vma.anon,
                           driver=vma.driver, writenotify=vma.writenotify,
                           pte_pfn=vma.pte_pfn[a:b].copy(), pte=vma.pte[a:b].copy(),
                           pte_level=vma.pte_level[a:b].copy())
                self._insert(part)
                if vma.anon is not None:
                    for i in range(a, b):
                        if (vma.id, vma.pgoff + i) in vma.anon.swap:
                            vma.anon.swap[(part.id, vma.pgoff + i)] = vma.anon.swap.pop((vma.id, vma.pgoff + i))
                if vma.driver is not None:
                    vma.driver.vma_split(vma, part)

    @kpath
    def mprotect(self, start: int, length: int, prot: str) -> Steps:
        """``mprotect()``: change VM_READ/VM_WRITE; removing write write-protects present PTEs."""
        vmas = list(self._clip(start, length))
        if not vmas:
            raise ModelError(errno.ENOMEM, f"mprotect({start:#x}): no mapping")
        for vma, lo, hi in vmas:                     # refused before anything changes
            if lo != 0 or hi != vma.npages:
                raise ModelError(errno.EINVAL, "mprotect of part of a VMA is not modelled; map it separately")
        yield from self.mmap_lock.mmap_write_lock.steps()
        try:
            yield from self._mprotect_locked(start, length, prot)
        finally:
            self.mmap_lock.mmap_write_unlock()

    def _mprotect_locked(self, start: int, length: int, prot: str) -> Steps:
        vmas = list(self._clip(start, length))              # again: the VMAs may have changed meanwhile
        if not vmas:
            raise ModelError(errno.ENOMEM, f"mprotect({start:#x}): no mapping")
        if any(lo != 0 or hi != vma.npages for vma, lo, hi in vmas):
            raise ModelError(errno.EINVAL, "mprotect of part of a VMA is not modelled; map it separately")
        rng = MmuNotifierRange(start, start + length, MmuNotifyEvent.PROTECTION_VMA, reason="mprotect")
        yield from self.invalidate_range_start.steps(rng)
        for vma, lo, hi in vmas:
            new = vma.flags & ~(VM.READ | VM.WRITE)
            if "r" in prot:
                new |= VM.READ
            if "w" in prot:
                new |= VM.WRITE
            vma.flags = new
            if "w" not in prot:
                vma.pte[:] &= ~np.uint8(_W)
            if not prot or prot == "none":
                vma.pte[:] &= ~np.uint8(_P | _W)
                vma.pte_pfn[(vma.pte & _P) == 0] = -1
        yield "mprotect: PTEs changed"
        yield from self.invalidate_range_end.steps(rng)

    @kpath
    def madvise(self, start: int, length: int, advice: str) -> Steps:
        """``madvise()`` DONTNEED, REMOVE, COLD or PAGEOUT (:data:`MADVISE_ADVICE`)."""
        advice = advice.upper().removeprefix("MADV_")
        parts = list(self._clip(start, length))
        if not parts:
            raise ModelError(errno.ENOMEM, f"madvise({start:#x}): no mapping")
        if advice not in MADVISE_ADVICE:
            raise ModelError(errno.EINVAL, f"madvise advice {advice!r} is not modelled ({', '.join(MADVISE_ADVICE)})")
        for vma, _, _ in parts:
            if vma.flags & VM.PFNMAP:
                raise ModelError(errno.EINVAL, "madvise on a VM_PFNMAP mapping")
            if advice == "REMOVE" and (not vma.flags & VM.SHARED or vma.mapping is None):
                raise ModelError(errno.EINVAL, "MADV_REMOVE needs a shared file mapping")
            if advice in ("COLD", "PAGEOUT") and vma.flags & VM.HUGETLB:     # can_madv_lru_vma()
                raise ModelError(errno.EINVAL, f"MADV_{advice} on a VM_HUGETLB mapping")
        me = self.sched.active
        yield from self.mmap_lock.mmap_read_lock.steps()
        try:
            parts = list(self._clip(start, length))              # again: the VMAs may have changed
            if advice in ("COLD", "PAGEOUT"):
                # no notifier around the walk: only try_to_unmap() of each reclaimed folio fires one
                from kvmsim.mm.reclaim import madvise_cold_or_pageout
                n = madvise_cold_or_pageout(self, parts, pageout=advice == "PAGEOUT")
                yield f"madvise {advice}: {n} folios reclaimed"
                return
            rng = MmuNotifierRange(start, start + length, MmuNotifyEvent.CLEAR, reason=f"madvise {advice}")
            yield from self.invalidate_range_start.steps(rng)
            for vma, lo, hi in parts:
                self._split_straddled_pmds(vma, lo, hi)
                self._zap_ptes(vma, lo, hi, drop_anon=True)
                if advice == "REMOVE":
                    from kvmsim.mm.reclaim import remove_from_cache
                    remove_from_cache(self, vma.mapping, vma.pgoff + lo, vma.pgoff + hi, notify=False)
            yield f"madvise {advice}: PTEs zapped"
            yield from self.invalidate_range_end.steps(rng)
        finally:
            self.mmap_lock.mmap_read_unlock(me)

    @kpath
    def mremap(self, old: int, length: int, new_addr: int | None = None) -> Steps:
        """``mremap(MREMAP_MAYMOVE|FIXED)`` of a whole VMA: PTEs move, pages stay."""
        yield from self.mmap_lock.mmap_write_lock.steps()
        try:
            vma = self.vma_lookup(old)
            if vma is None or vma.start != old or vma.end != old + length:
                raise ModelError(errno.EFAULT, f"mremap({old:#x}): not a whole VMA")
            if new_addr is None:
                new_addr = self.get_unmapped_area(length, vma.page_size)
            rng = MmuNotifierRange(old, old + length, MmuNotifyEvent.UNMAP, reason="mremap")
            yield from self.invalidate_range_start.steps(rng)
            self._remove(vma)
            vma.start, vma.end = new_addr, new_addr + length
            self._insert(vma)
            yield "mremap: VMA moved"
            yield from self.invalidate_range_end.steps(rng)
        finally:
            self.mmap_lock.mmap_write_unlock()
        return new_addr

    def fork(self) -> "Mm":
        """``fork()``: private anonymous memory becomes copy-on-write in both processes."""
        child = Mm(self.phys, self.journal, name=f"{self.name}-child", sched=self.sched)
        child._next_addr = self._next_addr
        for vma in self.vmas:
            if vma.flags & VM.DONTCOPY:
                continue
            cvma = Vma(vma.start, vma.end, vma.flags, vma.kind, page_size=vma.page_size, mapping=vma.mapping,
                       pgoff=vma.pgoff, anon=vma.anon, driver=vma.driver, writenotify=vma.writenotify)
            if vma.anon is not None and not vma.flags & VM.SHARED:
                rng = MmuNotifierRange(vma.start, vma.end, MmuNotifyEvent.PROTECTION_PAGE, reason="fork COW")
                self.invalidate_range_start(rng)
                present = (vma.pte & _P) != 0
                vma.pte[present] &= ~np.uint8(_W)
                cvma.pte_pfn[:] = vma.pte_pfn
                cvma.pte[:] = vma.pte
                cvma.pte_level[:] = vma.pte_level
                owned = present & (vma.pte_pfn != self.phys.zero_pfn)
                if self.phys.huge_zero_pfn >= 0:
                    owned &= self.phys.head[np.where(present, vma.pte_pfn, 0)] != self.phys.huge_zero_pfn
                for head in np.unique(self.phys.head[vma.pte_pfn[owned]]) if owned.any() else []:
                    self.phys.get_page(int(head), "copy_page_range")
                self.invalidate_range_end(rng)
            child._insert(cvma)
        self.journal.count("host_fork")
        return child

    def exit_mmap(self) -> None:
        """The process exits: ``mmu_notifier_release`` then every VMA is torn down."""
        for sub in list(self.notifiers):
            sub.release()
        for vma in list(self.vmas):
            self._zap_ptes(vma, 0, vma.npages, drop_anon=True)
            self._remove(vma)

    # ---- userspace access --------------------------------------------------------------------
    def host_access(self, hva: int, write: bool, value: int | None = None) -> int:
        """A load or store by the VMM itself (or KVM's ``copy_{from,to}_user``); returns the value.

        Raises ``ModelError(EFAULT)`` where the access would SIGSEGV/SIGBUS.
        """
        from kvmsim.mm.fault import handle_mm_fault
        vma = self.vma_lookup(hva)
        if vma is None:
            raise ModelError(errno.EFAULT, f"no mapping at {hva:#x}")
        i = vma.idx(hva)
        need = _P | (_W if write else 0)
        if (int(vma.pte[i]) & need) != need:
            rc = handle_mm_fault(self, vma, hva, write)
            if rc:
                raise ModelError(rc, f"host {'write' if write else 'read'} at {hva:#x} faults")
        pfn = int(vma.pte_pfn[i])
        vma.pte[i] |= _Y | (_D if write else 0)
        if write:
            self.phys.write(pfn, int(value or 0), "copy_to_user")
            return int(value or 0)
        return self.phys.read(pfn, "copy_from_user")

    def pte_of(self, hva: int) -> tuple[Vma | None, int, int, int]:
        """(vma, pfn or -1, PTE bits, level) for ``hva``."""
        vma = self.vma_lookup(hva)
        if vma is None:
            return None, -1, 0, 1
        i = (hva - vma.start) >> PAGE_SHIFT
        return vma, vma.pte_pfn.item(i), vma.pte.item(i), vma.pte_level.item(i)



def _steps(fn, *args):
    """A subscriber's callback as steps, whether it is a ``@kpath`` or a plain generator function."""
    return fn.steps(*args) if hasattr(fn, "steps") else fn(*args)


def folio_pages(phys: PhysMem, pfn: int) -> range:
    head = phys.folio(pfn)
    return range(head, head + phys.folio_nr_pages(head))


__all__ = ["Mm", "folio_pages", "MMAP_BASE", "LEVEL_PAGES", "PG_LEVEL_2M", "PfnClass"]
