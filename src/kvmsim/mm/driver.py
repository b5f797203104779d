"""Device drivers that export memory through ``mmap`` (VM_PFNMAP / VM_MIXEDMAP / VM_IO).

Models what the series is about: memory KVM does not own.  A :class:`Driver` allocates its pages
with one pfn class (spec §1.1) and maps them either eagerly (``remap_pfn_range`` at mmap time) or
lazily from its fault handler (``vmf_insert_pfn`` / ``vm_insert_page``).  ``teardown()`` zaps every
mapping (the mmu_notifier fires) and then frees the memory *by the driver's own rules*:

* ``free_rule="free"``: the driver returns the pages to its pool/the allocator whatever their
  refcount (``__free_pages()`` of a non-compound allocation, a TTM pool, a dma-buf exporter).  A
  reference somebody else still holds now points at a freed page.
* ``free_rule="put"``: the driver drops its own reference; whoever holds the last one frees it.

Examples: amdgpu TTM non-compound high-order pages (``pfn_class="nonrefcounted"``), a driver's
refcounted pages (``"driver_refcounted"``), an MMIO BAR (``"no_page"``), reserved RAM
(``"reserved"``), compound pages behind VM_PFNMAP (``"normal"`` with ``order>0``), io_uring rings
behind VM_MIXEDMAP (``"normal"``, ``mixed=True``: normal, non-special PTEs that GUP accepts).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.mm.notifier import MmuNotifierRange, MmuNotifyEvent
from kvmsim.mm.page import PfnClass, PhysMem
from kvmsim.mm.vma import VM, Pte, Vma

_P, _W, _Y, _D, _S = int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY), int(Pte.SPECIAL)


class Driver:
    """A device driver owning ``npages`` of memory of one pfn class."""

    def __init__(self, phys: PhysMem, name: str, npages: int, pfn_class: PfnClass, *, order: int = 0,
                 compound: bool = True, prefault: bool = True, pte_write: str = "always",
                 mixed: bool = False, free_rule: str = "free", pfn_mkwrite=None, cacheable: bool = False):
        if pte_write not in ("always", "on_write_fault", "never"):
            raise ValueError(f"pte_write must be always, on_write_fault or never, not {pte_write!r}")
        if free_rule not in ("free", "put"):
            raise ValueError(f"free_rule must be free or put, not {free_rule!r}")
        self.phys = phys
        self.name = name
        self.pfn_class = PfnClass(pfn_class)
        self.prefault = prefault
        self.pte_write = pte_write
        self.mixed = mixed
        self.free_rule = free_rule
        #: The driver's ``vm_ops->pfn_mkwrite`` as ``pgoff -> accepted``, asked on a write fault to a
        #: present read-only PTE (mm/memory.c ``wp_pfn_shared()``); None accepts as ``pte_write`` says.
        #: perf's ``perf_mmap_pfn_mkwrite()`` accepts only the user page, pgoff 0.
        self.pfn_mkwrite = pfn_mkwrite
        #: The driver's ``vm_page_prot`` memory type: cacheable (Normal, e.g. vfio nvgrace-gpu's device
        #: memory) or not (``pgprot_noncached()`` / ``pgprot_writecombine()``, the usual MMIO BAR).
        self.cacheable = cacheable
        self.owner_id = phys.register_owner(self)
        self.torn_down = False
        self.vmas: list[Vma] = []
        self.order = order
        chunk = 1 << order
        nchunks = max(1, (npages + chunk - 1) // chunk)
        first = phys.alloc(order, cls=self.pfn_class, compound=compound, count=nchunks,
                           reserved=self.pfn_class in (PfnClass.RESERVED, PfnClass.ZONE_DEVICE),
                           owner=self.owner_id)
        self.pfns = np.arange(first, first + npages, dtype=np.int64)
        self.chunk_heads = list(range(first, first + nchunks * chunk, chunk))

    # ---- mmap and faults ----------------------------------------------------------------------
    def _pte_bits(self, vma: Vma, write_fault: bool) -> int:
        bits = _P | _Y | (0 if self.mixed and self.pfn_class != PfnClass.NO_PAGE else _S)
        if vma.flags & VM.WRITE and (self.pte_write == "always" or (self.pte_write == "on_write_fault" and write_fault)):
            bits |= _W | (_D if write_fault else 0)
        return bits

    def mmap(self, mm, vma: Vma) -> None:
        """The driver's ``->mmap``: remap_pfn_range everything now, or leave it to ``fault``."""
        if vma.npages + vma.pgoff > len(self.pfns):
            raise ValueError(f"{self.name}: mapping {vma.npages} pages past the {len(self.pfns)} it owns")
        self.vmas.append(vma)
        if self.prefault:
            sl = slice(0, vma.npages)
            vma.pte_pfn[sl] = self.pfns[vma.pgoff: vma.pgoff + vma.npages]
            vma.pte[sl] = self._pte_bits(vma, write_fault=False)

    def vma_split(self, old: Vma, part: Vma) -> None:
        if old in self.vmas:
            self.vmas.remove(old)
        self.vmas.append(part)

    def fault(self, mm, vma: Vma, i: int, write: bool) -> int:
        """The driver's ``->fault`` / ``->pfn_mkwrite``: insert the pfn, writable if allowed."""
        if self.torn_down:
            return errno.EFAULT                                  # VM_FAULT_SIGBUS
        index = vma.pgoff + i
        if index >= len(self.pfns):
            return errno.EFAULT
        if write and int(vma.pte[i]) & _P and self.pfn_mkwrite is not None and not self.pfn_mkwrite(index):
            return errno.EFAULT                                  # pfn_mkwrite: VM_FAULT_SIGBUS
        bits = self._pte_bits(vma, write)
        if write and not bits & _W:
            return errno.EFAULT
        vma.pte_pfn[i] = self.pfns[index]
        vma.pte[i] = bits
        return 0

    # ---- teardown ---------------------------------------------------------------------------------
    def teardown(self, mm) -> None:
        """Zap every user mapping (``unmap_mapping_range``), then free the memory by the driver's rule."""
        for vma in list(self.vmas):
            if vma not in mm.vmas:
                continue
            rng = MmuNotifierRange(vma.start, vma.end, MmuNotifyEvent.UNMAP, reason=f"{self.name} teardown")
            mm.invalidate_range_start(rng)
            vma.pte_pfn[:] = -1
            vma.pte[:] = 0
            mm.invalidate_range_end(rng)
        self.torn_down = True
        if self.pfn_class in (PfnClass.NO_PAGE, PfnClass.RESERVED, PfnClass.ZONE_DEVICE):
            return
        phys = self.phys
        for pfn in self.pfns:
            pfn = int(pfn)
            head = phys.folio(pfn)
            if head != pfn or phys.is_poisoned(pfn):
                continue
            if self.free_rule == "put" and phys.page_ref_count(pfn) > 0:
                phys.put_page(pfn, f"{self.name}:teardown")
                continue
            expected = 1 if phys.page_ref_count(pfn) > 0 else 0
            if phys.page_count(pfn) > expected:
                phys.journal.fact("freed_while_referenced", pfn=pfn, caller=f"{self.name}:teardown",
                                  detail=f"driver frees a page whose refcount is {phys.page_count(pfn)} "
                                         f"(expected {expected}): another holder keeps a dangling reference")
            phys.free_folio(pfn, f"{self.name}:teardown")
