"""GUP as KVM uses it, and ``follow_pfnmap_start/end`` (mm/gup.c, mm/memory.c).

Return codes follow spec §1.1: the slow path returns 1 (and the page) on success, 0 when I/O is
needed with FOLL_NOWAIT, -EINTR when a fatal signal is pending (checked before each page, whatever
the flags), -EAGAIN when the killable mmap lock fails, -EHWPOISON,
and -EFAULT for no VMA, a protection error or a VM_IO/VM_PFNMAP VMA (``check_vma_flags``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntFlag

from kvmsim.errors import EHWPOISON
from kvmsim.mm.fault import access_permitted, handle_mm_fault
from kvmsim.mm.page import PfnClass
from kvmsim.mm.vma import VM, Pte
from kvmsim.types import PAGE_SHIFT

_P, _W, _Y, _D, _S, _SW, _PN = (int(Pte.PRESENT), int(Pte.WRITE), int(Pte.YOUNG), int(Pte.DIRTY),
                                int(Pte.SPECIAL), int(Pte.SWAP), int(Pte.PROTNONE))


class FOLL(IntFlag):
    """``FOLL_*`` (include/linux/mm_types.h)."""

    WRITE = 0x01
    GET = 0x02
    DUMP = 0x08
    FORCE = 0x10
    NOWAIT = 0x20
    HWPOISON = 0x100
    TOUCH = 0x400
    PIN = 0x40000
    INTERRUPTIBLE = 0x800000
    HONOR_NUMA_FAULT = 0x1000000


_FW, _FNOWAIT, _FPIN = int(FOLL.WRITE), int(FOLL.NOWAIT), int(FOLL.PIN)


def _normal_page(phys, pfn: int, bits: int) -> bool:
    return pfn >= 0 and not bits & _S and phys.pfn_valid(pfn) and not phys.is_poisoned(pfn)


def get_user_page_fast_only(mm, hva: int, flags: FOLL, *, caller: str, kvm: bool = True) -> int | None:
    """``get_user_page_fast_only()`` / ``pin_user_pages_fast()`` without fallback: lockless, never faults.

    Succeeds only for a present PTE (writable if FOLL_WRITE) mapping a normal page; takes FOLL_GET
    or FOLL_PIN; touches neither young nor dirty.  Returns the pfn or None.
    """
    flags = int(flags)
    mm.journal.count("gup_fast")
    vma = mm.vma_lookup(hva)                          # the lockless walk: the VMA's PTE arrays
    if vma is None:
        return None
    i = (hva - vma.start) >> PAGE_SHIFT
    bits = vma.pte.item(i)
    if not bits & _P or bits & _PN:
        return None
    if flags & _FW and not bits & _W:
        return None
    pfn = vma.pte_pfn.item(i)
    if not _normal_page(mm.phys, pfn, bits):
        return None
    mm.phys.try_grab_folio(pfn, bool(flags & _FPIN), caller, kvm=kvm)
    return pfn


def get_user_pages_unlocked(mm, hva: int, flags: FOLL, *, caller: str, kvm: bool = True) -> tuple[int, int | None]:
    """``get_user_pages_unlocked()`` / ``pin_user_pages_unlocked()`` for one page: (rc, pfn).

    Implies FOLL_TOUCH: through a PTE (follow_page_pte) it marks the folio accessed and, for FOLL_WRITE,
    dirty if neither the PTE nor the folio was; through a huge PMD/PUD only the entry is made young/dirty.
    """
    flags = int(flags)
    mm.journal.count("gup_slow")
    if mm.mmap_lock_contended:
        return -errno.EAGAIN, None
    vma = mm.vma_lookup(hva)
    if vma is None:
        return -errno.EFAULT, None
    if vma.flags & (VM.IO | VM.PFNMAP):                         # check_vma_flags
        return -errno.EFAULT, None
    if not access_permitted(vma, bool(flags & _FW)):
        return -errno.EFAULT, None
    i = vma.idx(hva)
    for _ in range(3):
        if mm.signal_pending:       # __get_user_pages(): "If we have a pending SIGKILL, don't keep faulting"
            return -errno.EINTR, None
        bits = int(vma.pte[i])
        pfn = int(vma.pte_pfn[i])
        need = _P | (_W if flags & _FW else 0)
        if (bits & need) == need and not bits & _PN:
            break
        if flags & _FNOWAIT and _needs_io(vma, i):
            return 0, None
        rc = handle_mm_fault(mm, vma, hva, bool(flags & _FW))
        if rc == EHWPOISON:
            return -EHWPOISON, None
        if rc:
            return -errno.EFAULT, None
    else:
        return -errno.EFAULT, None
    if bits & _S and pfn != mm.phys.zero_pfn:                   # special PTE in a MIXEDMAP: vm_normal_page() NULL
        return -errno.EFAULT, None
    phys = mm.phys
    phys.try_grab_folio(pfn, bool(flags & _FPIN), caller, kvm=kvm)
    level = int(vma.pte_level[i])
    if level > 1:
        # follow_huge_pmd()/follow_huge_pud() (mm/gup.c): FOLL_TOUCH is touch_pmd()/touch_pud(), the
        # PMD/PUD made young (and dirty for FOLL_WRITE), never mark_page_accessed() on the folio.
        n = 1 << (9 * (level - 1))
        s = i - ((hva >> 12) & (n - 1))
        vma.pte[max(s, 0):s + n] |= _Y | (_D if flags & _FW else 0)
    elif pfn != phys.zero_pfn:        # FOLL_TOUCH: the folio only ("pte_mkyoung() would be more correct")
        if flags & _FW and not bits & _D and not phys.folio_test_dirty(pfn):
            phys.SetPageDirty(pfn, "follow_page_pte:FOLL_TOUCH")
        phys.mark_page_accessed(pfn, "follow_page_pte:FOLL_TOUCH")
    return 1, pfn


def _needs_io(vma, i: int) -> bool:
    if vma.pte[i] & _SW:
        return True
    if vma.anon is not None and (vma.id, vma.pgoff + i) in vma.anon.swap:
        return True
    if vma.mapping is not None:
        index = vma.pgoff + i
        return index in vma.mapping.needs_io or (vma.mapping.pages[index] < 0 and index in vma.mapping.disk)
    return False


@dataclass
class FollowPfnmapArgs:
    """``struct follow_pfnmap_args`` (include/linux/mm.h, v6.12+)."""

    vma: object
    address: int
    pfn: int = -1
    writable: bool = False
    special: bool = False
    level: int = 1


def follow_pfnmap_start(mm, args: FollowPfnmapArgs) -> int:
    """Read pfn, writable and special from the host PTE of a VM_IO/VM_PFNMAP VMA; 0 or -EINVAL."""
    vma = args.vma
    i = vma.idx(args.address)
    bits = int(vma.pte[i])
    if not bits & _P:
        return -errno.EINVAL
    args.pfn = int(vma.pte_pfn[i])
    args.writable = bool(bits & _W)
    args.special = bool(bits & _S)
    args.level = int(vma.pte_level[i])
    mm.journal.count("follow_pfnmap")
    return 0


def follow_pfnmap_end(args: FollowPfnmapArgs) -> None:
    """Drop the page-table lock taken by :func:`follow_pfnmap_start` (nothing to model)."""


def fixup_user_fault(mm, hva: int, write: bool) -> int:
    """``fixup_user_fault()``: fault the address in; 0 or -EFAULT.  The kernel can also report that
    mmap_lock was dropped (``*unlocked``, then ``hva_to_pfn_remapped()`` returns -EAGAIN and the VMA is
    looked up again); the model's faults never drop the lock, so that retry is not modelled."""
    vma = mm.vma_lookup(hva)
    if vma is None:
        return -errno.EFAULT
    rc = handle_mm_fault(mm, vma, hva, write)
    return -errno.EFAULT if rc else 0


def pfn_class_name(phys, pfn: int) -> str:
    return PfnClass(phys.pfn_class(pfn)).name
