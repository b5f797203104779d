"""Indirect shadow paging: the guest's own page tables shadowed by KVM (arch/x86/kvm/mmu/paging_tmpl.h
``FNAME(walk_addr)``, ``FNAME(page_fault)``, ``FNAME(fetch)``, ``FNAME(pte_prefetch)``,
``FNAME(prefetch_gpte)``, ``FNAME(sync_spte)``, expanded for 64-bit paging as ``paging64_*``; mmu.c
``mmu_try_to_unsync_pages()``, ``account_shadowed()``, ``kvm_mmu_sync_roots()``, ``kvm_mmu_invalidate_addr()``;
v6.12 and v6.13).

With TDP off (``tdp_enabled=0``, ``paging = "indirect"``) a guest address is a *gva*: the guest's page
tables (:class:`GuestPageTables`, in guest memory: each 2 MiB of gva has a page-table page at a gfn, a gva
whose block has none is identity-mapped by the guest's boot tables) translate it to a gfn, and an SPTE
maps gva → pfn with the guest PTE's access (``ACC_WRITE_MASK`` from the gPTE's W, and only once the gPTE
is dirty: ``FNAME(protect_clean_gpte)``; ``ACC_USER_MASK``, ``ACC_EXEC_MASK`` kept per entry in the
shadow page, ``kvm_mmu_page_get_access()``).  A shadow page (:class:`KvmMmuPage`; the MMU is :class:`kvmsim.x86.shadow_mmu.IndirectShadowMmu`) shadows one guest
page-table page; creating it write-protects that gfn (``account_shadowed()``), so the guest's next store
to its own page table faults: ``mmu_try_to_unsync_pages()`` then marks the shadow page *unsync* and lets
the store through, and the SPTEs stay stale until the guest flushes -- ``INVLPG``
(:func:`kvm_mmu_invalidate_addr`) or a CR3 load (:func:`kvm_mmu_sync_roots`) -- which re-derives each SPTE
from its gPTE with :func:`paging64_sync_spte`.

Model limits: one guest paging level (the shadow pages are level-1, never write-tracked), 4 KiB guest pages,
and SPTEs kept in the per-memslot table by gfn (the rmap): one SPTE per gfn, so a second gva faulting on a
gfn takes the SPTE over (``drop_spte()`` first when the access differs).

Legacy and series differ in four places, each a VM hook: the sync keeps A (patch 7 "KVM: x86/mmu: Mark new
SPTE as Accessed when synchronizing existing SPTE"; legacy's ``mmu_spte_update()`` then marks the folio
accessed and flushes), the prefetched gPTE's release (patches 10, 11, 41), a prefetch over a present SPTE
(patch 5, :func:`kvmsim.x86.mmu.mmu_set_spte`), and the writable-old-SPTE shortcut of ``make_spte()`` (patch 4).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntFlag

from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import mark_page_dirty_in_slot
from kvmsim.kvm.fault import KvmPageFault, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, KvmFollowPfn, kvm_prefetch_pages
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT
from kvmsim.x86 import tdp_mmu
from kvmsim.x86.mmu import ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK, mmu_set_spte
from kvmsim.x86.mmu_internal import RET_PF
from kvmsim.x86.spte import D, HELD, HW, MMIO, MW, P, W, is_accessed_spte, is_dirty_spte, make_spte, spte_write, tables

#: gPTEs per guest page-table page (``PT64_ENT_PER_PAGE``).
PT64_ENT_PER_PAGE = 512
#: ``PTE_PREFETCH_NUM`` (mmu.c): SPTEs a fault prefetches around it, direct or indirect.
PTE_PREFETCH_NUM = 8


class PT(IntFlag):
    """Guest PTE bits (arch/x86/kvm/mmu/mmu.c ``PT_*_MASK``, ``PT64_NX_MASK``)."""

    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    NX = 1 << 63


_BOOT_GPTE = PT.PRESENT | PT.WRITABLE | PT.USER | PT.ACCESSED | PT.DIRTY


def make_gpte(gfn: int, flags: PT) -> int:
    return (gfn << PAGE_SHIFT) | int(flags)


def gpte_to_gfn(gpte: int) -> int:
    """``gpte_to_gfn()``: bits 51:12."""
    return (gpte & ((1 << 52) - 1)) >> PAGE_SHIFT


class GuestPageTables:
    """The guest's page tables as guest memory holds them: gvn → gPTE, and per 2 MiB gva block the gfn of
    the page-table page holding its gPTEs (None: the guest's identity boot tables, which it never writes)."""

    def __init__(self):
        self.gptes: dict[int, int] = {}
        self.table: dict[int, int] = {}

    def table_gfn(self, gvn: int) -> int | None:
        return self.table.get(gvn // PT64_ENT_PER_PAGE)

    def read_gpte(self, gvn: int) -> int:
        """``kvm_vcpu_read_guest_atomic(pte_gpa)``: the gPTE, or the boot tables' identity entry."""
        if gvn in self.gptes:
            return self.gptes[gvn]
        if self.table_gfn(gvn) is None:
            return make_gpte(gvn, _BOOT_GPTE)
        return 0


@dataclass(eq=False)
class KvmMmuPage:
    """Model of ``struct kvm_mmu_page`` for an indirect level-1 shadow page: ``gfn`` (the guest page-table
    page, None for the boot tables), ``unsync``, and per shadowed gvn the gfn and access of its SPTE
    (``kvm_mmu_page_get_gfn()`` / ``kvm_mmu_page_get_access()``)."""

    key: object
    gfn: int | None
    role_level: int = 1
    unsync: bool = False
    spt: dict[int, int] = field(default_factory=dict)
    access: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class GuestWalker:
    """Model of ``struct guest_walker``: the translated gfn, the gPTE, its ``pte_access``, or a guest #PF."""

    gvn: int
    gfn: int = -1
    gpte: int = 0
    pte_access: int = 0
    fault: bool = False


@dataclass(slots=True)
class IndirectPageFault(KvmPageFault):
    """``struct kvm_page_fault`` of a shadow-paging fault: ``addr`` is the gva, with its walker."""

    walker: GuestWalker | None = None
    prefetch: bool = False


# ---- FNAME(...) ---------------------------------------------------------------------------------------

def paging64_gpte_access(gpte: int) -> int:
    """``FNAME(gpte_access)``: ACC_* from the gPTE's W, U and NX."""
    return (ACC_WRITE_MASK if gpte & PT.WRITABLE else 0) | (ACC_USER_MASK if gpte & PT.USER else 0) | \
        (0 if gpte & PT.NX else ACC_EXEC_MASK)


def paging64_protect_clean_gpte(access: int, gpte: int) -> int:
    """``FNAME(protect_clean_gpte)``: no write access through a gPTE the guest has not dirtied yet (the first
    write must fault, so the walker sets D)."""
    return access if gpte & PT.DIRTY else access & ~ACC_WRITE_MASK


def paging64_prefetch_invalid_gpte(gpte: int) -> bool:
    """``FNAME(prefetch_invalid_gpte)``: not present, or not Accessed (``PT_HAVE_ACCESSED_DIRTY``)."""
    return not gpte & PT.PRESENT or not gpte & PT.ACCESSED


def paging64_walk_addr(mmu, vcpu, gvn: int, write: bool, *, update: bool = True) -> GuestWalker:
    """``FNAME(walk_addr)``: the gPTE of ``gvn``; a guest #PF (``walker->fault``) if it is not present or a
    write meets a read-only gPTE.  ``FNAME(update_accessed_dirty_bits)`` sets A (and D on a write) in guest
    memory with a user-space cmpxchg, which dirties the page-table gfn in the dirty log."""
    gpt = mmu.guest_pt
    gpte = gpt.read_gpte(gvn)
    w = GuestWalker(gvn, gpte=gpte)
    if not gpte & PT.PRESENT or (write and not gpte & PT.WRITABLE):
        w.fault = True
        return w
    want = PT.ACCESSED | (PT.DIRTY if write else 0)
    if update and gpte & want != want and gvn in gpt.gptes:
        gpte |= int(want)
        gpt.gptes[gvn] = gpte
        w.gpte = gpte
        pt = gpt.table_gfn(gvn)
        slot = mmu.kvm.gfn_to_memslot(pt) if pt is not None else None
        if slot is not None:
            mark_page_dirty_in_slot(mmu.kvm, slot, pt, vcpu)
    w.gfn = gpte_to_gfn(gpte)
    w.pte_access = paging64_protect_clean_gpte(paging64_gpte_access(gpte), gpte)
    return w


@kpath
def paging64_page_fault(mmu, vcpu, gva: int, write: bool, exec: bool = False) -> Steps:
    """Mirrors ``FNAME(page_fault)``: walk the guest's tables (a guest #PF is injected and the fault
    retried: RET_PF_RETRY), ``page_fault_handle_page_track()`` (a write to a write-tracked gfn:
    RET_PF_WRITE_PROTECTED, emulated), no memslot → MMIO, then the template with :func:`paging64_fetch`
    as its map.  The fast page fault serves direct MMUs only."""
    kvm = mmu.kvm
    kvm.journal.count("page_fault")
    w = paging64_walk_addr(mmu, vcpu, gva >> PAGE_SHIFT, write)
    if w.fault:
        kvm.journal.count("inject_page_fault")
        return RET_PF.RETRY
    slot = kvm.gfn_to_memslot(w.gfn)
    if slot is None:
        kvm.journal.count("mmio")
        return RET_PF.EMULATE
    if slot.invalid:
        return RET_PF.RETRY
    if write and slot.readonly:
        return RET_PF.EMULATE
    from kvmsim.x86.page_track import kvm_gfn_is_write_tracked
    if write and kvm_gfn_is_write_tracked(kvm, slot, w.gfn):
        return RET_PF.EMULATE
    yield "FNAME(page_fault): walked"
    r = yield from kvm_stage2_fault.steps(mmu, IndirectPageFault(vcpu, w.gfn, slot, write, exec, walker=w))
    return r


def kvm_mmu_get_child_sp(mmu, gvn: int) -> KvmMmuPage:
    """``kvm_mmu_get_child_sp()`` → ``kvm_mmu_get_shadow_page()`` for the level-1 shadow page of ``gvn``'s
    page-table page; a new one is ``account_shadowed()``: its gfn write-protected (``kvm_mmu_slot_gfn_
    write_protect()``: W and MMU-writable cleared) and a TLB flush if that changed an SPTE."""
    kvm = mmu.kvm
    pt = mmu.guest_pt.table_gfn(gvn)
    key = pt if pt is not None else ("boot", gvn // PT64_ENT_PER_PAGE)
    sp = mmu.mmu_page_hash.get(key)
    if sp is not None:
        return sp
    sp = mmu.mmu_page_hash[key] = KvmMmuPage(key, pt)
    kvm.journal.count("mmu_shadow_pages")
    if pt is not None and kvm_mmu_slot_gfn_write_protect(mmu, pt):
        kvm.flush_remote_tlbs("account_shadowed")
    return sp


def kvm_mmu_slot_gfn_write_protect(mmu, gfn: int) -> bool:
    """``kvm_mmu_slot_gfn_write_protect()`` → ``rmap_write_protect()`` → ``spte_write_protect(pt_protect=true)``:
    clear W and MMU-writable of the gfn's SPTE through ``mmu_spte_update()``; True if one changed."""
    kvm = mmu.kvm
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None or "x86" not in slot.arch:
        return False
    t = tables(slot)
    i = gfn - slot.base_gfn
    b = int(t.bits[i])
    if not b & P or b & MMIO or not b & (W | MW):
        return False
    spte_write(kvm, slot, i, i + 1, b & ~(W | MW), caller="spte_write_protect")
    return True


def drop_spte(mmu, sp: KvmMmuPage, gvn: int) -> None:
    """``drop_spte()``: zap the SPTE of ``gvn`` (``mmu_spte_clear_track_bits()``) and forget it in the page."""
    kvm = mmu.kvm
    gfn = sp.spt.pop(gvn, None)
    sp.access.pop(gvn, None)
    if gfn is None or mmu.rmap_owner.get(gfn) != gvn:
        return
    del mmu.rmap_owner[gfn]
    slot = kvm.gfn_to_memslot(gfn)
    if slot is not None:
        tdp_mmu.zap_range(kvm, slot, gfn - slot.base_gfn, gfn - slot.base_gfn + 1, "drop_spte")


def _link(mmu, sp: KvmMmuPage, gvn: int, gfn: int, pte_access: int) -> None:
    sp.spt[gvn] = gfn
    sp.access[gvn] = pte_access
    mmu.rmap_owner[gfn] = gvn


def _take_over(mmu, gvn: int, gfn: int, pte_access: int) -> None:
    """One SPTE per gfn: another gva's SPTE for ``gfn`` with another access is dropped first."""
    other = mmu.rmap_owner.get(gfn)
    if other is None or other == gvn:
        return
    osp = mmu.sp_of(other)
    if osp is not None and osp.access.get(other) != pte_access:
        drop_spte(mmu, osp, other)
        mmu.kvm.flush_remote_tlbs("drop_spte")
    elif osp is not None:
        osp.spt.pop(other, None)
        osp.access.pop(other, None)


def paging64_fetch(mmu, fault: IndirectPageFault) -> RET_PF:
    """Mirrors ``FNAME(fetch)`` at level 1: the shadow page of the gPTE's page table, ``mmu_set_spte()`` with
    the walker's ``pte_access``, then ``FNAME(pte_prefetch)``; the template's ``fault_map`` hook."""
    w = fault.walker
    sp = kvm_mmu_get_child_sp(mmu, w.gvn)
    _take_over(mmu, w.gvn, fault.gfn, w.pte_access)
    r = mmu_set_spte(mmu, fault.vcpu, fault.slot, fault.gfn, fault.pfn, fault.kfp, fault.write,
                     prefetch=fault.prefetch, pte_access=w.pte_access)
    _link(mmu, sp, w.gvn, fault.gfn, w.pte_access)
    if r != RET_PF.SPURIOUS and not fault.prefetch:
        paging64_pte_prefetch(mmu, fault.vcpu, sp, w.gvn)
    return r


def paging64_pte_prefetch(mmu, vcpu, sp: KvmMmuPage, gvn: int) -> int:
    """Mirrors ``FNAME(pte_prefetch)``: not while an invalidation is in progress; the gPTEs of the
    ``PTE_PREFETCH_NUM``-aligned group around ``gvn`` whose SPTEs are not present, each through
    :func:`paging64_prefetch_gpte`.  Returns how many were mapped."""
    kvm = mmu.kvm
    if kvm.mmu_invalidate_in_progress or not mmu.ad_enabled:
        return 0
    start = gvn // PTE_PREFETCH_NUM * PTE_PREFETCH_NUM
    done = 0
    for g in range(start, start + PTE_PREFETCH_NUM):
        if g == gvn or mmu.spte_present(g):
            continue
        if paging64_prefetch_gpte(mmu, vcpu, sp, g, mmu.guest_pt.read_gpte(g)):
            done += 1
    kvm.journal.count("prefetch", done)
    return done


def paging64_prefetch_gpte(mmu, vcpu, sp: KvmMmuPage, gvn: int, gpte: int) -> bool:
    """Mirrors ``FNAME(prefetch_gpte)``: skip an invalid gPTE; the slot from
    ``gfn_to_memslot_dirty_bitmap()`` (none for a write-enabled gPTE into a dirty-logged slot); one page
    GUP-fast only (v6.12 ``gfn_to_pfn_memslot_atomic()``, v6.13 ``kvm_prefetch_pages()`` -- patch 10 "KVM:
    x86/mmu: Use gfn_to_page_many_atomic() when prefetching indirect PTEs" calls the two "subtly
    equivalent"); ``mmu_set_spte(prefetch=true)``; then the VM's ``release_prefetched_gpte`` (legacy
    ``kvm_release_pfn_clean()``, series ``kvm_release_page_dirty()``: patch 41 "KVM: x86/mmu: Mark
    pages/folios dirty at the origin of make_spte()")."""
    kvm = mmu.kvm
    if paging64_prefetch_invalid_gpte(gpte):
        return False
    gfn = gpte_to_gfn(gpte)
    pte_access = paging64_protect_clean_gpte(paging64_gpte_access(gpte), gpte)
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None or slot.invalid or (pte_access & ACC_WRITE_MASK and slot.logging):
        return False
    if mmu.rmap_owner.get(gfn) not in (None, gvn) and int(tables(slot).bits[gfn - slot.base_gfn]) & P:
        return False                     # the model's one SPTE per gfn belongs to another gva
    pfns = kvm_prefetch_pages(kvm, slot, gfn, 1)
    if not pfns:
        return False
    pfn = pfns[0]
    kfp = KvmFollowPfn(slot, gfn, map_writable=True, hold=Hold.GET, held=pfn)
    mmu_set_spte(mmu, vcpu, slot, gfn, pfn, kfp, False, prefetch=True, pte_access=pte_access)
    _link(mmu, sp, gvn, gfn, pte_access)
    kvm.ops.arch_ops.release_prefetched_gpte(kvm, pfn, kfp, "paging64_prefetch_gpte")
    return True


def paging64_sync_spte(mmu, vcpu, sp: KvmMmuPage, gvn: int) -> bool:
    """Mirrors ``FNAME(sync_spte)``: re-read the gPTE; drop the SPTE if the gPTE is invalid or now maps another
    gfn; nothing if the access is unchanged; else ``make_spte(prefetch=true, synchronizing=true)`` from the
    old SPTE's pfn and Host-writable bit, written by ``mmu_spte_update()``.  Returns whether a TLB flush is
    needed.

    Accessed is the VM's ``make_spte_accessed(prefetch=True, synchronizing=True)``: v6.12 clears it, and
    ``mmu_spte_update()`` then reports the loss (``kvm_set_pfn_accessed()``, and ``kvm_set_pfn_dirty()``
    for a lost D, through the VM's ``spte_ad_lost`` hooks) and forces a flush; v6.13 keeps it (patch 7).
    ``mmu_spte_update()``'s flush: MMU-writable → not writable, or A or D lost (v6.12; the [6.13-other]
    "Don't force flush if SPTE update clears Accessed bit" keeps only the first)."""
    kvm = mmu.kvm
    gfn_old = sp.spt.get(gvn)
    if gfn_old is None or mmu.rmap_owner.get(gfn_old) != gvn:
        return False
    gpte = mmu.guest_pt.read_gpte(gvn)
    if paging64_prefetch_invalid_gpte(gpte) or gpte_to_gfn(gpte) != gfn_old:
        drop_spte(mmu, sp, gvn)
        return True
    pte_access = paging64_protect_clean_gpte(paging64_gpte_access(gpte), gpte)
    if sp.access.get(gvn) == pte_access:
        return False
    sp.access[gvn] = pte_access
    slot = kvm.gfn_to_memslot(gfn_old)
    if slot is None or "x86" not in slot.arch:
        return False
    t = tables(slot)
    i = gfn_old - slot.base_gfn
    old = int(t.bits[i])
    if not old & P or old & MMIO:
        return False
    host_w = bool(old & HW)
    writable = host_w and bool(pte_access & ACC_WRITE_MASK)
    dirty = True
    if writable:
        old_writable = bool(old & W)
        if old_writable and kvm.ops.arch_ops.make_spte_skip_unsync(old_writable, True):
            dirty = False
        elif mmu.mmu_try_to_unsync_pages(slot, gfn_old, True, True):
            writable = False
    accessed = kvm.ops.arch_ops.make_spte_accessed(True, True)
    new = make_spte(host_writable=host_w, writable=writable, prefetch=not accessed,
                    ad_disabled=not mmu.ad_enabled, held=bool(old & HELD))
    if not writable:
        new &= ~MW
    elif not dirty:
        new &= ~D
    kvm.journal.count("sync_spte")
    spte_write(kvm, slot, i, i + 1, new, caller="mmu_spte_update")
    flush = bool(old & MW) and not new & W
    if not kvm.v613_other:
        flush |= bool(is_accessed_spte(old)) and not bool(is_accessed_spte(new))
        flush |= bool(is_dirty_spte(old)) and not bool(is_dirty_spte(new))
    return flush


def kvm_sync_page(mmu, vcpu, sp: KvmMmuPage) -> bool:
    """``kvm_sync_page()`` → ``__kvm_sync_page()``: :func:`paging64_sync_spte` for every shadowed entry."""
    flush = False
    for gvn in sorted(sp.spt):
        flush |= paging64_sync_spte(mmu, vcpu, sp, gvn)
    return flush


@kpath
def kvm_mmu_sync_roots(mmu, vcpu) -> Steps:
    """Mirrors ``kvm_mmu_sync_roots()`` → ``mmu_sync_children()`` (a CR3 load without the fast path, or
    KVM_REQ_MMU_SYNC): under ``mmu_lock`` for write, each unsync page's gfn is write-protected again, the
    page marked sync (``kvm_unlink_unsync_page()``) and synchronized; one remote flush if anything needs it."""
    kvm = mmu.kvm
    yield from kvm.mmu_lock.write_lock.steps()
    flush = False
    for sp in [s for s in mmu.mmu_page_hash.values() if s.unsync]:
        flush |= kvm_mmu_slot_gfn_write_protect(mmu, sp.gfn)
        sp.unsync = False
        kvm.journal.count("mmu_sync_page")
        for gvn in sorted(sp.spt):
            flush |= paging64_sync_spte(mmu, vcpu, sp, gvn)
            yield "mmu_sync_children: FNAME(sync_spte)"
    if flush:
        kvm.flush_remote_tlbs("kvm_mmu_sync_roots")
    kvm.mmu_lock.write_unlock()
    yield "kvm_mmu_sync_roots: mmu_lock released"
    return flush


@kpath
def kvm_mmu_invalidate_addr(mmu, vcpu, gva: int) -> Steps:
    """Mirrors ``kvm_mmu_invalidate_addr()`` → ``__kvm_mmu_invalidate_addr()`` (INVLPG): under ``mmu_lock``,
    if the leaf shadow page of ``gva`` is unsync, :func:`paging64_sync_spte` for that one entry and a
    flush if it asks; the guest's TLB entry for the gva is flushed either way."""
    kvm = mmu.kvm
    gvn = gva >> PAGE_SHIFT
    yield from kvm.mmu_lock.write_lock.steps()
    sp = mmu.sp_of(gvn)
    flush = False
    if sp is not None and sp.unsync:
        flush = paging64_sync_spte(mmu, vcpu, sp, gvn)
        yield "__kvm_mmu_invalidate_addr: FNAME(sync_spte)"
    if flush:
        kvm.flush_remote_tlbs("kvm_mmu_invalidate_addr")
    kvm.mmu_lock.write_unlock()
    yield "kvm_mmu_invalidate_addr: mmu_lock released"
    return flush


def guest_pte_write(mmu, vcpu, gva: int, gpa: int, flags: PT, pt: int | None) -> Access:
    """The guest stores a gPTE: ``gva`` → ``gpa`` with ``flags``, in the page-table page at gpa ``pt`` (which
    the block keeps once given).  The store is a guest write to that page, through its identity-mapped gva
    and the MMU: write-protected while a sync shadow page shadows it, so it faults and
    ``mmu_try_to_unsync_pages()`` unsyncs the page.  The SPTE of ``gva`` stays as it was until INVLPG or a
    CR3 load."""
    gpt = mmu.guest_pt
    gvn = gva >> PAGE_SHIFT
    block = gvn // PT64_ENT_PER_PAGE
    have = gpt.table.get(block)
    if pt is None and have is None:
        raise ModelError(errno.EINVAL, f"guest_pte_write at gva {gva:#x}: the first gPTE of its 2 MiB block "
                                       "needs pt, the guest page-table page's gpa")
    pt_gfn = have if pt is None else pt >> PAGE_SHIFT
    if have is not None and pt_gfn != have:
        raise ModelError(errno.EINVAL, f"guest_pte_write at gva {gva:#x}: its block's page table is at gpa "
                                       f"{have << PAGE_SHIFT:#x}, not {pt:#x}")
    if mmu.kvm.gfn_to_memslot(pt_gfn) is None:
        raise ModelError(errno.EINVAL, f"guest_pte_write: page table at gpa {pt_gfn << PAGE_SHIFT:#x} is not "
                                       "guest RAM (no memslot)")
    if pt_gfn // PT64_ENT_PER_PAGE == block:
        raise ModelError(errno.EINVAL, f"guest_pte_write: the page table at gpa {pt_gfn << PAGE_SHIFT:#x} "
                                       "would map itself; put it in another 2 MiB block")
    if have is None:
        boot = mmu.mmu_page_hash.pop(("boot", block), None)   # the guest replaced its boot table there
        if boot is not None:
            for g in list(boot.spt):
                drop_spte(mmu, boot, g)
            mmu.kvm.flush_remote_tlbs("kvm_mmu_prepare_zap_page")
        gpt.table[block] = pt_gfn
    gpte = make_gpte(gpa >> PAGE_SHIFT, flags)
    acc = mmu.guest_access(vcpu, pt_gfn << PAGE_SHIFT, True, gpte & 0xFFFFFFFF)
    if acc.exit is Exit.OK:
        gpt.gptes[gvn] = gpte
    return acc


__all__ = ["PT", "GuestPageTables", "KvmMmuPage", "paging64_walk_addr", "paging64_page_fault",
           "paging64_fetch", "paging64_pte_prefetch", "paging64_prefetch_gpte", "paging64_sync_spte",
           "kvm_mmu_sync_roots", "kvm_mmu_invalidate_addr", "guest_pte_write"]
