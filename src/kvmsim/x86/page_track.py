"""x86 write tracking of guest frames (arch/x86/kvm/mmu/page_track.c ``__kvm_write_track_add_gfn()``,
``__kvm_write_track_remove_gfn()``, ``kvm_gfn_is_write_tracked()``; mmu.c ``account_shadowed()``; v6.12 and
v6.13, untouched by the series).

A gfn is write-tracked while something must see every guest write to it: the shadow MMU for a guest
page-table page shadowed by a *non-leaf* shadow page (``account_shadowed()``: "the non-leaf shadow pages
are keeping readonly"), or an external tracker (KVMGT's ``kvm_write_track_add_gfn()``).  A write-tracked
gfn never gets a writable SPTE (``mmu_try_to_unsync_pages()`` returns -EPERM) and never a huge page
(``update_gfn_disallow_lpage_count()``).  The count lives per memslot in ``slot->arch.gfn_write_track``;
here in ``slot.arch["x86-write-track"]``, gfn → count.
"""

from __future__ import annotations


def _counts(slot) -> dict[int, int]:
    wt = slot.arch.get("x86-write-track")
    if wt is None:
        wt = slot.arch["x86-write-track"] = {}
    return wt


def kvm_write_track_add_gfn(kvm, slot, gfn: int) -> None:
    """Mirrors ``__kvm_write_track_add_gfn()``: count++ (the caller then write-protects the gfn's SPTEs)."""
    wt = _counts(slot)
    wt[gfn] = wt.get(gfn, 0) + 1
    kvm.journal.count("write_track_add")


def kvm_write_track_remove_gfn(kvm, slot, gfn: int) -> None:
    """Mirrors ``__kvm_write_track_remove_gfn()``: count--, WARN on underflow."""
    wt = _counts(slot)
    n = wt.get(gfn, 0)
    if n <= 0:                          # WARN_ON_ONCE(count < 0)
        kvm.journal.count("WARN_ON:__kvm_write_track_remove_gfn")
        return
    if n == 1:
        del wt[gfn]
    else:
        wt[gfn] = n - 1


def kvm_gfn_is_write_tracked(kvm, slot, gfn: int) -> bool:
    """Mirrors ``kvm_gfn_is_write_tracked()``."""
    wt = slot.arch.get("x86-write-track") if slot is not None else None
    return bool(wt) and wt.get(gfn, 0) > 0
