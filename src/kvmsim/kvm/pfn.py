"""gfn → pfn resolution and page release (virt/kvm/kvm_main.c, virt/kvm/kvm_mm.h, include/linux/kvm_host.h).

One implementation of ``hva_to_pfn()`` serves both protocols.  Where v6.12 and v6.13 diverge, it
calls a hook of the VM's :class:`~kvmsim.policies.Policy` (the remapped path's reference, GUP error
mapping, what a release acts on).  The model always knows which page KVM *actually* acquired
(``KvmFollowPfn.held``, ghost state for the checker); ``refcounted_page`` is what the API reports,
which only the series does.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum

from kvmsim.errors import EHWPOISON
from kvmsim.mm.gup import (FOLL, FollowPfnmapArgs, fixup_user_fault, follow_pfnmap_end, follow_pfnmap_start,
                           get_user_page_fast_only, get_user_pages_unlocked)
from kvmsim.mm.fault import access_permitted
from kvmsim.mm.vma import VM
from kvmsim.trace import Src

# include/linux/kvm_host.h
KVM_PFN_ERR_MASK = 0x7FF << 52
KVM_PFN_ERR_NOSLOT_MASK = 0xFFF << 52
KVM_PFN_NOSLOT = 1 << 63
KVM_PFN_ERR_FAULT = KVM_PFN_ERR_MASK
KVM_PFN_ERR_HWPOISON = KVM_PFN_ERR_MASK + 1
KVM_PFN_ERR_RO_FAULT = KVM_PFN_ERR_MASK + 2
KVM_PFN_ERR_SIGPENDING = KVM_PFN_ERR_MASK + 3
KVM_PFN_ERR_NEEDS_IO = KVM_PFN_ERR_MASK + 4

ERROR_PFN_NAMES = {KVM_PFN_ERR_FAULT: "FAULT", KVM_PFN_ERR_HWPOISON: "HWPOISON", KVM_PFN_ERR_RO_FAULT: "RO_FAULT",
                   KVM_PFN_ERR_SIGPENDING: "SIGPENDING", KVM_PFN_ERR_NEEDS_IO: "NEEDS_IO", KVM_PFN_NOSLOT: "NOSLOT"}

_FOLL_WRITE, _FOLL_PIN = int(FOLL.WRITE), int(FOLL.PIN)
_FOLL_SLOW = int(FOLL.HWPOISON | FOLL.HONOR_NUMA_FAULT)

KVM_HVA_ERR_BAD = -1
KVM_HVA_ERR_RO_BAD = -2


def is_error_pfn(pfn: int) -> bool:
    return bool(pfn & KVM_PFN_ERR_MASK)


def is_error_noslot_pfn(pfn: int) -> bool:
    return bool(pfn & KVM_PFN_ERR_NOSLOT_MASK)


def is_noslot_pfn(pfn: int) -> bool:
    return pfn == KVM_PFN_NOSLOT


def pfn_name(pfn: int) -> str:
    return ERROR_PFN_NAMES.get(pfn, f"{pfn:#x}")


class Hold(str, Enum):
    """How KVM holds the page it resolved (ghost state)."""

    NONE = "none"
    GET = "get"      # FOLL_GET, kvm_try_get_pfn, guest_memfd folio ref
    PIN = "pin"      # FOLL_PIN


#: The members for the per-fault code: Python 3.11 looks every ``Hold.X`` up through ``EnumType``'s
#: ``__getattr__`` hook (about 0.1 µs each; the enum lookups were 5% of a scalar fault).
_HOLD_NONE, _HOLD_GET, _HOLD_PIN = Hold.NONE, Hold.GET, Hold.PIN
_SRC_GUESS = Src.GUESS


@dataclass(slots=True)
class KvmFollowPfn:
    """Model of ``struct kvm_follow_pfn`` (series; legacy passed the same things positionally)."""

    slot: object
    gfn: int
    flags: FOLL = FOLL(0)
    pin: bool = False
    want_writable: bool = False          # map_writable pointer non-NULL: "try to get writable"
    atomic: bool = False                 # legacy @atomic (GUP-fast only); the series removed it
    hva: int | None = None
    caller: str = "kvm_follow_pfn"
    # outputs
    map_writable: bool = False
    refcounted_page: int | None = None   # what the API reports (series only)
    held: int | None = None              # ghost: the page KVM actually got a reference on
    hold: Hold = Hold.NONE
    remapped: bool = False               # resolved through follow_pfnmap
    async_: bool = False                 # legacy *async = true (I/O needed)


def gfn_to_hva_memslot_prot(slot, gfn: int, write: bool) -> int:
    """``__gfn_to_hva_many`` with a write check: BAD for no/invalid slot, RO_BAD for a write to RO (the
    kernel tests ``KVM_MEMSLOT_INVALID`` and ``memslot_is_readonly()``: the slot's ``invalid`` and
    ``readonly``)."""
    if slot is None or slot.invalid:
        return KVM_HVA_ERR_BAD
    if write and slot.readonly:
        return KVM_HVA_ERR_RO_BAD
    return slot.userspace_addr + ((gfn - slot.base_gfn) << 12)


# ---- acquisition bookkeeping (ghost ledger for INV-1) ------------------------------------------------

def kvm_acquired(kvm, pfn: int, hold: Hold, caller: str) -> None:
    refs, key = kvm.host_refs, (pfn, hold)
    refs[key] = refs.get(key, 0) + 1


def kvm_dropped(kvm, pfn: int, hold: Hold, caller: str) -> None:
    refs, key = kvm.host_refs, (pfn, hold)
    n = refs.get(key)
    head_key = None
    if n is None:
        # a put through a different page of the same folio still matches the folio's reference
        head = kvm.phys.folio(pfn) if kvm.phys.pfn_valid(pfn) else pfn
        for (p, h) in kvm.host_refs:
            if h == hold and kvm.phys.pfn_valid(p) and kvm.phys.folio(p) == head:
                head_key = (p, h)
                break
        if head_key is None:
            kvm.journal.fact("release_without_acquire", pfn=pfn, caller=caller, kvm=True,
                             detail=f"KVM releases ({hold.value}) a page it holds no reference on")
            return
        key = head_key
        n = refs[key]
    if n == 1:
        del refs[key]
    else:
        refs[key] = n - 1


# ---- hva_to_pfn ---------------------------------------------------------------------------------------

def _resolve(kvm, kfp: KvmFollowPfn, pfn: int, writable: bool, hold: Hold) -> int:
    """``kvm_resolve_pfn()``: set map_writable and the page KVM holds."""
    kfp.map_writable = writable if kfp.want_writable else False
    kfp.hold = hold
    if hold is _HOLD_NONE:
        kfp.held = None
    else:
        kfp.held = pfn
        kvm_acquired(kvm, pfn, hold, kfp.caller)
    kfp.refcounted_page = kvm.policy.reported_page(kfp)
    return pfn


def hva_to_pfn(kvm, kfp: KvmFollowPfn) -> int:
    """Mirrors ``hva_to_pfn()`` (virt/kvm/kvm_main.c): fast GUP, slow GUP, then the remapped path."""
    mm = kvm.mm
    hva = kfp.hva
    hold = _HOLD_PIN if kfp.pin else _HOLD_GET
    pin = _FOLL_PIN if kfp.pin else 0
    kflags = int(kfp.flags)
    kvm.journal.count("hva_to_pfn")
    if kflags & _FOLL_WRITE or kfp.want_writable:
        pfn = get_user_page_fast_only(mm, hva, _FOLL_WRITE | pin, caller=kfp.caller)
        if pfn is not None:
            return _resolve(kvm, kfp, pfn, True, hold)
    if kfp.atomic:
        return KVM_PFN_ERR_FAULT
    flags = _FOLL_SLOW | kflags | pin
    rc, pfn = get_user_pages_unlocked(mm, hva, flags, caller=kfp.caller)
    if rc == 1:
        writable = bool(flags & _FOLL_WRITE)
        if not writable and kfp.want_writable and not kfp.pin:
            wpfn = get_user_page_fast_only(mm, hva, _FOLL_WRITE, caller=kfp.caller)
            if wpfn is not None:
                mm.phys.put_page(pfn, kfp.caller, kvm=True, source=Src.HELD)
                pfn, writable = wpfn, True
        return _resolve(kvm, kfp, pfn, writable, hold)
    mapped = kvm.policy.gup_error_pfn(rc)
    if mapped is not None:
        return mapped
    if rc == -EHWPOISON:
        return KVM_PFN_ERR_HWPOISON
    vma = mm.vma_lookup(hva)
    if vma is None:
        return KVM_PFN_ERR_FAULT
    if vma.flags & (VM.IO | VM.PFNMAP):
        return hva_to_pfn_remapped(kvm, kfp, vma)
    if kflags & int(FOLL.NOWAIT) and access_permitted(vma, bool(kflags & _FOLL_WRITE)):
        return kvm.policy.needs_io_pfn(kfp)
    return KVM_PFN_ERR_FAULT


def hva_to_pfn_remapped(kvm, kfp: KvmFollowPfn, vma) -> int:
    """Mirrors ``hva_to_pfn_remapped()``: the pfn from the host PTE of a VM_IO/VM_PFNMAP VMA."""
    mm = kvm.mm
    write = bool(int(kfp.flags) & _FOLL_WRITE)
    if kfp.pin and kvm.policy.refuses_unpinned_direct_map(kvm):
        return KVM_PFN_ERR_FAULT
    args = FollowPfnmapArgs(vma, kfp.hva)
    if follow_pfnmap_start(mm, args):
        if fixup_user_fault(mm, kfp.hva, write):
            return KVM_PFN_ERR_FAULT
        if follow_pfnmap_start(mm, args):
            return KVM_PFN_ERR_FAULT
    try:
        if write and not args.writable:
            return KVM_PFN_ERR_RO_FAULT
        kfp.remapped = True
        ok, hold = kvm.policy.remapped_get_ref(kvm, args.pfn, kfp.caller)
        if not ok:
            return KVM_PFN_ERR_FAULT
        return _resolve(kvm, kfp, args.pfn, args.writable, hold)
    finally:
        follow_pfnmap_end(args)


def kvm_follow_pfn(kvm, kfp: KvmFollowPfn) -> int:
    """Mirrors ``kvm_follow_pfn()``: gfn → hva (with RO handling) → :func:`hva_to_pfn`."""
    write = bool(int(kfp.flags) & _FOLL_WRITE)
    hva = gfn_to_hva_memslot_prot(kfp.slot, kfp.gfn, write) if kfp.hva is None else kfp.hva
    if hva == KVM_HVA_ERR_RO_BAD:
        return KVM_PFN_ERR_RO_FAULT
    if hva < 0:
        return KVM_PFN_NOSLOT
    if kfp.slot is not None and kfp.slot.readonly:
        kfp.want_writable = False
    kfp.hva = hva
    return hva_to_pfn(kvm, kfp)


def _kvm_faultin_pfn(kvm, slot, gfn: int, foll: FOLL, *, want_writable: bool = True,
                     caller: str = "__kvm_faultin_pfn") -> tuple[int, KvmFollowPfn]:
    """Mirrors ``__kvm_faultin_pfn()``: returns (pfn, kfp) with ``kfp.map_writable`` and the page."""
    kfp = KvmFollowPfn(slot, gfn, flags=foll, want_writable=want_writable, caller=caller)
    return kvm_follow_pfn(kvm, kfp), kfp


# ---- release helpers ------------------------------------------------------------------------------------

def _locked(kvm) -> bool:
    """Whether this thread holds ``mmu_lock``, for the facts a struct-page operation records (only
    they use it, so it is not computed when the journal keeps no facts)."""
    return kvm.journal.recording and kvm.mmu_lock.held()


def kvm_is_ad_tracked_page(phys, pfn: int) -> bool:
    """``kvm_is_ad_tracked_page()``: KVM dirties/ages a page only if it is not PG_reserved."""
    return phys.pfn_valid(pfn) and not phys.PageReserved(pfn)


def kvm_release_page_unused(kvm, page: int | None, hold: Hold, caller: str) -> None:
    """Series ``kvm_release_page_unused()``: put (or unpin) only, no A/D."""
    if page is None:
        return
    _drop(kvm, page, hold, caller, Src.HELD)


def _drop(kvm, page: int, hold: Hold, caller: str, source: Src) -> None:
    kvm_dropped(kvm, page, hold, caller)
    if hold == Hold.PIN:
        kvm.phys.unpin_user_page(page, caller, kvm=True)
    else:
        kvm.phys.put_page(page, caller, kvm=True, source=source)


def _release_page(kvm, page: int, hold: Hold, caller: str, source: Src, *, dirty: bool, unused: bool = False,
                  gfn: int | None = None) -> None:
    """The body of ``kvm_release_page_dirty()`` / ``kvm_release_page_clean()`` with the static helpers
    inlined: ``kvm_set_page_dirty()`` (SetPageDirty if ``kvm_is_ad_tracked_page()``),
    ``kvm_set_page_accessed()`` (mark_page_accessed likewise), then ``put_page()`` (``unpin_user_page()``
    for a pin).  What the model keeps beside the kernel -- the ghost ledger (:func:`kvm_dropped`) and
    whether ``mmu_lock`` is held, for the facts -- is settled first, so the struct-page operations are
    one run of ``mm`` calls, as in the kernel."""
    phys = kvm.phys
    kvm_dropped(kvm, page, hold, caller)
    locked = _locked(kvm)
    if kvm_is_ad_tracked_page(phys, page):
        if dirty:
            phys.SetPageDirty(page, caller, kvm=True, source=source, locked=locked, gfn=gfn)
        phys.mark_page_accessed(page, caller, kvm=True, source=source, locked=locked, unused=unused, gfn=gfn)
    if hold == _HOLD_PIN:
        phys.unpin_user_page(page, caller, kvm=True)
    else:
        phys.put_page(page, caller, kvm=True, source=source)


def kvm_release_page_clean(kvm, page: int | None, hold: Hold, caller: str, *, source: Src = Src.HELD,
                           unused: bool = False, gfn: int | None = None) -> None:
    """``kvm_release_page_clean()``: ``kvm_set_page_accessed()`` (mark accessed if not reserved), then
    ``put_page()``."""
    if page is None:
        return
    _release_page(kvm, page, hold, caller, source, dirty=False, unused=unused, gfn=gfn)


def kvm_release_page_dirty(kvm, page: int | None, hold: Hold, caller: str, *, source: Src = Src.HELD,
                           gfn: int | None = None) -> None:
    """``kvm_release_page_dirty()``: ``kvm_set_page_dirty()`` (SetPageDirty if not reserved), then
    ``kvm_release_page_clean()`` -- inlined here, as the v6.13.7 build inlines it (the oracle's model
    kprobes count a v6.12 ``kvm_release_page_dirty()`` as a ``kvm_release_page_clean()`` call too)."""
    if page is None:
        return
    _release_page(kvm, page, hold, caller, source, dirty=True, gfn=gfn)


def kvm_pfn_to_refcounted_page(phys, pfn: int) -> int | None:
    """Legacy ``kvm_pfn_to_refcounted_page()`` (v6.12; deleted by the series): a *guess* from the pfn."""
    if is_error_noslot_pfn(pfn) or not phys.pfn_valid(pfn):
        return None
    if not phys.PageReserved(pfn):
        return pfn
    if phys.is_zero_pfn(pfn):
        return pfn
    if phys.is_zone_device(pfn):
        return pfn if phys.page_count(pfn) > 0 else None
    return None


def kvm_set_pfn_dirty(kvm, pfn: int, caller: str, *, source: Src = Src.SPTE, gfn: int | None = None) -> None:
    """Legacy ``kvm_set_pfn_dirty()``: SetPageDirty on any valid non-reserved pfn; no ownership check."""
    if is_error_noslot_pfn(pfn):
        return
    if kvm_is_ad_tracked_page(kvm.phys, pfn):
        kvm.phys.SetPageDirty(pfn, caller, kvm=True, source=source, locked=_locked(kvm), gfn=gfn)


def kvm_set_pfn_accessed(kvm, pfn: int, caller: str, *, source: Src = Src.SPTE, gfn: int | None = None,
                         unused: bool = False) -> None:
    """Legacy ``kvm_set_pfn_accessed()``; ``unused`` (ghost) says no mapping was made from the page (INV-7)."""
    if is_error_noslot_pfn(pfn):
        return
    if kvm_is_ad_tracked_page(kvm.phys, pfn):
        kvm.phys.mark_page_accessed(pfn, caller, kvm=True, source=source, locked=_locked(kvm), gfn=gfn,
                                    unused=unused)


def kvm_release_pfn(kvm, pfn: int, dirty: bool, caller: str, *, unused: bool = False,
                    gfn: int | None = None, kfp: KvmFollowPfn | None = None) -> None:
    """Legacy ``kvm_release_pfn_clean/dirty()``: guess the page from the pfn, then release it.  With
    the fault's ``kfp`` (ghost state), a page KVM holds that the guess calls not refcounted is
    journalled as a leak."""
    if is_error_noslot_pfn(pfn):
        return
    page = kvm_pfn_to_refcounted_page(kvm.phys, pfn)
    if page is None:
        if kfp is not None and kfp.held is not None:
            kvm.journal.fact("guess_mismatch", pfn=pfn, caller=caller, kvm=True,
                             detail="kvm_pfn_to_refcounted_page() says not refcounted, but KVM holds a reference: leak")
        return
    if dirty:
        kvm_set_pfn_dirty(kvm, page, caller, source=Src.GUESS, gfn=gfn)
    kvm_release_page_clean(kvm, page, _HOLD_GET, caller, source=_SRC_GUESS, unused=unused, gfn=gfn)


# ---- wrappers ---------------------------------------------------------------------------------------------

def gfn_to_page(kvm, gfn: int, write: bool = True, *, user: str | None = None) -> int | None:
    """``__gfn_to_page(kvm, gfn, write)`` / legacy ``gfn_to_page()``: a page KVM holds a reference on, or None.

    Series returns ``refcounted_page`` (NULL for any remapped pfn, patches 1, 75, 76); legacy
    returns ``kvm_pfn_to_refcounted_page(pfn)`` (BAD_PAGE→None) and always resolves for write.
    ``user`` names the caller in the fact (e.g. s390's ``pin_scb``).
    """
    slot = kvm.gfn_to_memslot(gfn)
    kfp = KvmFollowPfn(slot, gfn, flags=FOLL.WRITE if kvm.policy.gfn_to_page_write(write) else FOLL(0),
                       caller="gfn_to_page")
    pfn = kvm_follow_pfn(kvm, kfp)
    page = kvm.policy.gfn_to_page_result(kvm, pfn, kfp)
    kvm.journal.fact("gfn_to_page", pfn=page, gfn=gfn, kvm=True, caller="gfn_to_page",
                     extra={"remapped": kfp.remapped, "held": kfp.held, "pfn": pfn, **({"user": user} if user else {})})
    if page is not None:
        kvm.page_refs_out[page] = kvm.page_refs_out.get(page, 0) + 1
    return page


def gfn_to_page_released(kvm, page: int) -> None:
    """Ghost ledger: a page ``gfn_to_page()`` handed out is being released by its user."""
    n = kvm.page_refs_out.get(page, 0)
    if n <= 1:
        kvm.page_refs_out.pop(page, None)
    else:
        kvm.page_refs_out[page] = n - 1


def kvm_release_gfn_page(kvm, page: int, dirty: bool = False) -> None:
    """What a ``gfn_to_page()`` user does when done: ``kvm_release_page_clean/dirty(page)``."""
    gfn_to_page_released(kvm, page)
    if dirty:
        kvm_release_page_dirty(kvm, page, Hold.GET, "kvm_release_page_dirty")
    else:
        kvm_release_page_clean(kvm, page, Hold.GET, "kvm_release_page_clean")


def kvm_prefetch_pages(kvm, slot, gfn: int, npages: int) -> list[int]:
    """``kvm_prefetch_pages()`` (legacy ``gfn_to_page_many_atomic``): GUP-fast-only, writable, N pages;
    nothing when the run leaves the slot (``if (entry < nr_pages) return 0;``)."""
    out = []
    hva = gfn_to_hva_memslot_prot(slot, gfn, True)
    if hva < 0 or not slot.base_gfn <= gfn or gfn + npages > slot.base_gfn + slot.npages:
        return out
    for k in range(npages):
        pfn = get_user_page_fast_only(kvm.mm, hva + (k << 12), FOLL.WRITE, caller="kvm_prefetch_pages")
        if pfn is None:
            break
        kvm_acquired(kvm, pfn, Hold.GET, "kvm_prefetch_pages")
        out.append(pfn)
    return out


EFAULT = errno.EFAULT
