"""Invariant validators INV-1 .. INV-12 (reference/kvm-semantics.md §3), with stable ids.

Two kinds of evidence:

* **facts** the model records as it runs (``host.journal.facts``: every struct-page operation with
  its caller, where the page came from and whether ``mmu_lock`` was held; frees, uses after free,
  ``gfn_to_page`` results, lockdep complaints, ...).  Event invariants (INV-1, 2, 3, 7, 8, 9, 12)
  are judged from them;
* **state**: the stage-2 leaves, host PTEs, live ``kvm_host_map``s and KVM's ghost reference
  ledger.  State invariants (INV-1 leaks, 4, 5, 6, 10, 11) are judged from a snapshot.

What protects what (in Documentation/virt/kvm/locking.rst form):

==========  =======================================================  ===========================
invariant   statement                                                protected by
==========  =======================================================  ===========================
INV-1       every KVM reference comes from GUP/pin/gmem and is        ``refcounted_page`` (series)
            released once by the matching primitive; no refcount
            on follow_pfnmap pfns
INV-2       no struct-page access derived from a stage-2 PTE's pfn   deleting kvm_set_pfn_* (84)
INV-3       A/D marks of a held page under mmu_lock, after the       kvm_release_faultin_page
            invalidation re-check
INV-4       Host-writable SPTE on a held file folio ⇒ folio dirty    dirty at SPTE creation (8)
INV-5       no SPTE for a gfn being invalidated; none stale after    mmu_invalidate_seq re-check
INV-6       direct kernel access (kvm_host_map) holds a pin          FOLL_PIN + allow_unsafe (35)
INV-7       unused (RETRY) pages are put without marking accessed    release_unused (48)
INV-8       gfn_to_page returns only pages KVM holds a ref on        refcounted_page (75)
INV-9       PG_reserved pages are never dirtied or aged              kvm_is_ad_tracked_page
INV-10      read-only slots never get a Host-writable SPTE           gfn_to_hva RO check
INV-11      SPTE W ⇒ MMU-writable ⇒ Host-writable                    make_spte / mmu_spte_update
INV-12      A pushed to the folio only at map time                   no accessed-on-zap (82)
==========  =======================================================  ===========================

The legacy "Dirty bit is lost" race (INV-4) drawn as in locking.rst::

    CPU0 (zap, non-atomic)                    | CPU1 (fast page fault / hardware)
    old = *sptep  (read-only, accessed)       |
                                              | cmpxchg: set W; guest writes, hardware sets D
    *sptep = 0   (D dropped, never captured)  |
    legacy: folio never marked dirty → guest data lost at writeback

``Checker`` runs after every step and reports each violation once, with the step that caused it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvmsim.mm.page import PG
from kvmsim.mm.vma import Pte
from kvmsim.trace import Fact, FactKind, Src

_PTE_PRESENT = int(Pte.PRESENT)

INVARIANTS = {
    "INV-1": "acquire/release pairing",
    "INV-2": "no struct page access from a stage-2 PTE's pfn",
    "INV-3": "A/D marking under mmu_lock after the re-check",
    "INV-4": "writable-capable SPTE implies folio already dirty",
    "INV-5": "invalidation exclusion",
    "INV-6": "direct kernel access requires a pin",
    "INV-7": "unused pages are not aged",
    "INV-8": "gfn_to_page returns only held pages",
    "INV-9": "PG_reserved pages never dirtied or aged",
    "INV-10": "read-only slots",
    "INV-11": "SPTE well-formedness",
    "INV-12": "accessed information only at map time",
}

@dataclass
class Violation:
    invariant: str
    detail: str
    step: int | None = None
    pfn: int | None = None
    gfn: int | None = None
    objects: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.invariant, self.pfn, self.gfn, self.detail)

    def as_dict(self) -> dict:
        return {"invariant": self.invariant, "step": self.step, "pfn": self.pfn, "gfn": self.gfn,
                "detail": self.detail}

    def __str__(self) -> str:
        where = " ".join(x for x in (f"step {self.step}" if self.step is not None else "",
                                     f"pfn {self.pfn:#x}" if self.pfn is not None else "",
                                     f"gfn {self.gfn:#x}" if self.gfn is not None else "") if x)
        return f"{self.invariant} ({INVARIANTS[self.invariant]}): {self.detail}" + (f" [{where}]" if where else "")


# ---- event invariants: one validator per invariant, registered by id ---------------------------------

#: ``INV-N`` → its fact validator: ``validate(fact) -> [Violation]``.  :func:`check_fact` runs them all.
VALIDATORS: dict[str, Callable[[Fact], list[Violation]]] = {}


def validator(inv: str) -> Callable[[Callable[[Fact], list[Violation]]], Callable[[Fact], list[Violation]]]:
    """Register ``validate_inv_N`` as the fact validator of invariant ``inv`` (one per id)."""
    if inv not in INVARIANTS:
        raise ValueError(f"validator for unknown invariant {inv!r}")

    def register(fn: Callable[[Fact], list[Violation]]) -> Callable[[Fact], list[Violation]]:
        if inv in VALIDATORS:
            raise ValueError(f"{inv} already has a validator ({VALIDATORS[inv].__name__})")
        VALIDATORS[inv] = fn
        return fn
    return register


def _v(inv: str, f: Fact, detail: str) -> Violation:
    return Violation(inv, detail, f.step, f.pfn, f.gfn, {"caller": f.caller, "source": f.source.value})


K = FactKind
_MARKS = (K.SET_DIRTY, K.MARK_ACCESSED)
_REF_OPS = ("get", "put", "pin", "unpin")


def _what(f: Fact) -> str:
    return "SetPageDirty" if f.kind is K.SET_DIRTY else "mark_page_accessed"


def _kvm_uaf(f: Fact) -> bool:
    """A use after free by KVM judged here (map/gpc accesses are judged by their map_uaf/gpc_uaf fact)."""
    return f.kind is K.UAF and f.kvm and not f.caller.startswith(("kvm_host_map", "gpc "))


@validator("INV-1")
def validate_inv_1(f: Fact) -> list[Violation]:
    """Every KVM reference comes from GUP/pin/gmem, is released once, never on a follow_pfnmap pfn."""
    k = f.kind
    if k in (K.GET, K.PIN) and f.kvm and f.source == Src.REMAPPED:
        return [_v("INV-1", f, f"{f.caller} takes a reference on a VM_PFNMAP/VM_IO pfn KVM does not own")]
    if k is K.RELEASE_WITHOUT_ACQUIRE or k is K.PREMATURE_FREE:
        return [_v("INV-1", f, f"{f.caller}: {f.detail}")]
    if k is K.GUESS_MISMATCH:
        return [_v("INV-1", f, f"{f.caller}: kvm_pfn_to_refcounted_page() disagrees with what KVM acquired")]
    if k is K.UNDERFLOW and f.kvm:
        return [_v("INV-1", f, f"{f.caller}: put on a page with refcount 0")]
    if k is K.FREED_WHILE_REFERENCED:
        return [_v("INV-1", f, f"{f.detail} (a co-owner's reference now dangles)")]
    if _kvm_uaf(f) and f.detail.startswith(_REF_OPS):
        return [_v("INV-1", f, f"{f.caller}: {f.detail}")]
    return []


@validator("INV-2")
def validate_inv_2(f: Fact) -> list[Violation]:
    """No struct-page access derived from a stage-2 PTE's pfn."""
    if f.kind in _MARKS and f.kvm and f.source == Src.SPTE:
        return [_v("INV-2", f, f"{f.caller}: {_what(f)} on a pfn read back from a stage-2 PTE")]
    return []


@validator("INV-3")
def validate_inv_3(f: Fact) -> list[Violation]:
    """A/D marks of a held page happen under mmu_lock, after the invalidation re-check: a fault's
    release (``fact.by_fault_release``) that marks after dropping the lock breaks it, as does marking a
    freed or truncated page and a missing ``lockdep_assert_held``."""
    k = f.kind
    if _kvm_uaf(f) and f.detail.startswith(("SetPageDirty", "mark_page_accessed")):
        return [_v("INV-3", f, f"{f.caller}: {f.detail}")]
    if k is K.DIRTY_AFTER_TRUNCATE or k is K.DIRTY_AT_TRUNCATE:
        return [_v("INV-3", f, f.detail)]
    if k is K.LOCKDEP:
        return [_v("INV-3", f, f"{f.caller}: {f.detail}")]
    if (k in _MARKS and f.kvm and f.source != Src.SPTE and f.by_fault_release and not f.locked
            and not f.extra.get("unused")):
        return [_v("INV-3", f, f"{f.caller}: {_what(f)} after dropping mmu_lock")]
    return []


@validator("INV-4")
def validate_inv_4(f: Fact) -> list[Violation]:
    """Host-writable SPTE on a held file folio ⇒ folio dirty: the event half is data lost at reclaim."""
    return [_v("INV-4", f, f.detail)] if f.kind is K.DATA_LOST else []


@validator("INV-5")
def validate_inv_5(f: Fact) -> list[Violation]:
    """No access through a mapping an invalidation removed (guest via a stale SPTE, KVM via the gpc)."""
    if f.kind is K.GPC_UAF:
        return [_v("INV-5", f, f.detail)]
    if _kvm_uaf(f) and not f.detail.startswith(_REF_OPS + ("SetPageDirty", "mark_page_accessed")):
        return [_v("INV-5", f, f"{f.caller}: guest access through a stale mapping: {f.detail}")]
    return []


@validator("INV-6")
def validate_inv_6(f: Fact) -> list[Violation]:
    """Direct kernel access (kvm_host_map) holds a pin."""
    return [_v("INV-6", f, f.detail)] if f.kind is K.MAP_UAF else []


@validator("INV-7")
def validate_inv_7(f: Fact) -> list[Violation]:
    """Pages a fault releases unused (RETRY) are put without marking them accessed."""
    if f.kind is K.MARK_ACCESSED and f.kvm and f.extra.get("unused"):
        return [_v("INV-7", f, f"{f.caller}: page released unused (RETRY) is marked accessed")]
    return []


@validator("INV-8")
def validate_inv_8(f: Fact) -> list[Violation]:
    """gfn_to_page returns only pages KVM holds a reference on."""
    if f.kind is K.GFN_TO_PAGE and f.pfn is not None and (f.extra.get("remapped") or f.extra.get("held") != f.pfn):
        return [_v("INV-8", f, "gfn_to_page returned a page KVM holds no reference on"
                   + (" (VM_PFNMAP/VM_IO pfn)" if f.extra.get("remapped") else ""))]
    return []


@validator("INV-9")
def validate_inv_9(f: Fact) -> list[Violation]:
    """PG_reserved pages are never dirtied or aged by KVM."""
    if f.kind in _MARKS and f.kvm and f.extra.get("reserved"):
        return [_v("INV-9", f, f"{f.caller}: {_what(f)} on a PG_reserved page")]
    return []


@validator("INV-11")
def validate_inv_11(f: Fact) -> list[Violation]:
    """SPTE W ⇒ MMU-writable ⇒ Host-writable, as written (the state half is in check_state)."""
    return [_v("INV-11", f, f.detail or "malformed SPTE written")] if f.kind is K.INV11 else []


@validator("INV-12")
def validate_inv_12(f: Fact) -> list[Violation]:
    """Accessed information reaches the folio only at map time, never from a stage-2 PTE."""
    if f.kind is K.MARK_ACCESSED and f.kvm and f.source == Src.SPTE:
        return [_v("INV-12", f, f"{f.caller}: accessed pushed to the folio from a stage-2 PTE")]
    return []


#: Invariants judged from state only (no fact validator): INV-10 (read-only slots).
STATE_ONLY = frozenset(INVARIANTS) - set(VALIDATORS)


def check_fact(f: Fact) -> list[Violation]:
    """The violations one recorded fact proves: every registered validator, in id order."""
    out: list[Violation] = []
    for validate in _ORDERED:
        out.extend(validate(f))
    return out


_ORDERED = [VALIDATORS[k] for k in sorted(VALIDATORS, key=lambda i: int(i.split("-")[1]))]


# ---- state invariants -------------------------------------------------------------------------------

def check_state(kvm, *, quiescent: bool = True) -> list[Violation]:
    """Judge the current state of a VM (its stage-2 leaves, host maps, references)."""
    out: list[Violation] = []
    phys = kvm.phys
    mm = kvm.mm
    step = kvm.journal.step
    if not kvm.destroyed:
        if hasattr(kvm.arch, "leaf_arrays"):
            for slot, a in kvm.arch.leaf_arrays():
                out.extend(_check_slot_leaves(kvm, slot, a, step))
        else:
            for leaf in kvm.arch.leaves():
                slot = kvm.memslots[0].by_id.get(leaf.slot_id)
                a = {k: np.array([v]) for k, v in (("pfn", leaf.pfn), ("level", leaf.level), ("w", leaf.writable),
                                                    ("hw", leaf.host_writable), ("mw", leaf.mmu_writable),
                                                    ("held", leaf.held_at_creation))}
                a["idx"] = np.array([leaf.gfn - slot.base_gfn])
                out.extend(_check_slot_leaves(kvm, slot, a, step))
    for m in kvm.host_maps:
        if m.pinned_page is not None:
            continue
        _, hpfn, hbits, _ = mm.pte_of(m.hva)
        if phys.is_poisoned(m.pfn) or not hbits & _PTE_PRESENT or hpfn != m.pfn:
            out.append(Violation("INV-6", "kvm_host_map without a pin outlived its mapping "
                                 + ("(pfn freed)" if phys.is_poisoned(m.pfn) else "(host no longer maps it)"),
                                 step, m.pfn, m.gfn, {"remapped": m.remapped}))
    if quiescent:
        accounted: dict = {}
        for m in kvm.host_maps:
            if m.hold.value != "none":
                accounted[(m.pfn, m.hold)] = accounted.get((m.pfn, m.hold), 0) + 1
        for page, n in kvm.page_refs_out.items():
            from kvmsim.kvm.pfn import Hold
            accounted[(page, Hold.GET)] = accounted.get((page, Hold.GET), 0) + n
        for (pfn, hold), n in kvm.host_refs.items():
            extra = n - accounted.get((pfn, hold), 0)
            if extra > 0:
                out.append(Violation("INV-1", f"leak: KVM still holds {extra} {hold.value} reference(s) "
                                     "no live structure accounts for", step, pfn, None))
    return out


def _host_pfns(mm, slot, idx: np.ndarray) -> np.ndarray:
    """The pfn the host maps at each gfn's hva (-1 where nothing is present), vectorised over VMAs."""
    out = np.full(len(idx), -1, dtype=np.int64)
    hva = slot.userspace_addr + (idx.astype(np.int64) << 12)
    for vma in mm.vmas_in(slot.userspace_addr, slot.hva_end):
        inside = (hva >= vma.start) & (hva < vma.end)
        if inside.any():
            j = (hva[inside] - vma.start) >> 12
            out[inside] = np.where((vma.pte[j] & _PTE_PRESENT) != 0, vma.pte_pfn[j], -1)
    return out


def _check_slot_leaves(kvm, slot, a: dict, step) -> list[Violation]:
    """INV-4, 5, 10, 11 for one slot's present leaves, as array operations."""
    out: list[Violation] = []
    phys = kvm.phys
    idx, pfn = a["idx"], a["pfn"].astype(np.int64)
    if not len(idx):
        return out
    gfn = slot.base_gfn + idx
    objs = {"slot": slot.id}

    def emit(inv: str, mask, detail: str) -> None:
        for k in np.nonzero(mask)[0]:
            out.append(Violation(inv, detail, step, int(pfn[k]), int(gfn[k]), dict(objs, level=int(a["level"][k]))))

    emit("INV-11", (a["w"] & ~a["mw"]) | (a["mw"] & ~a["hw"]), "SPTE writable bits not nested (W ⇒ MMU-W ⇒ Host-W)")
    if slot.readonly:
        emit("INV-10", a["hw"] | a["w"], "Host-writable SPTE in a read-only memslot")
    valid = (pfn > 0) & (pfn < phys.nr)
    vp = np.where(valid, pfn, 0)
    poisoned = valid & ((phys.flags[vp] & int(PG.poisoned)) != 0)
    emit("INV-5", poisoned, "SPTE maps a freed page")
    if slot.gmem_file is not None:
        return out
    live = ~poisoned
    lo, hi = kvm.mmu_invalidate_range_start, kvm.mmu_invalidate_range_end
    if kvm.mmu_invalidate_in_progress:
        emit("INV-5", live & (gfn >= lo) & (gfn < hi), "SPTE present for a gfn inside an in-progress invalidation")
    else:
        host = _host_pfns(kvm.mm, slot, idx)
        stale = live & (host != pfn)
        for k in np.nonzero(stale)[0]:
            what = "nothing" if host[k] < 0 else hex(int(host[k]))
            out.append(Violation("INV-5", f"stale SPTE: host maps {what} at this gfn's hva", step, int(pfn[k]),
                                 int(gfn[k]), objs))
    cand = live & valid & a["hw"] & a["held"]
    if cand.any():
        wb = np.array([o for o, obj in phys.owners.items() if getattr(obj, "can_writeback", False)], dtype=np.int64)
        owner = phys.owner[vp]
        clean = (phys.flags[phys.head[vp]] & int(PG.dirty)) == 0
        emit("INV-4", cand & np.isin(owner, wb) & clean,
             "Host-writable SPTE maps a clean file folio: a guest write would land where writeback cannot see it")
    return out


def check_all(kvm, *, facts_since: int = 0, quiescent: bool = True) -> list[Violation]:
    """Every violation visible now: facts from ``facts_since`` on, plus the state."""
    out: list[Violation] = []
    for f in kvm.journal.facts[facts_since:]:
        out.extend(check_fact(f))
    out.extend(check_state(kvm, quiescent=quiescent))
    return out


class Checker:
    """Incremental checking after every step; each violation is reported once."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.cursor = 0
        self.seen: set[tuple] = set()
        self.violations: list[Violation] = []

    def run(self, *, quiescent: bool = True) -> list[Violation]:
        new: list[Violation] = []
        facts = self.kvm.journal.facts
        templates: dict[tuple, list[Violation]] = {}
        for f in facts[self.cursor:]:
            if f.kind is FactKind.GFN_TO_PAGE:
                new.extend(check_fact(f))
                continue
            # bulk paths record thousands of facts that differ only in pfn/gfn: judge one per shape
            sig = (f.kind, f.caller, f.source, f.locked, f.kvm, f.detail, f.extra.get("reserved"),
                   f.extra.get("unused"), f.fault_release)
            tpl = templates.get(sig)
            if tpl is None:
                tpl = templates[sig] = check_fact(f)
                new.extend(tpl)
                continue
            for v in tpl:
                new.append(Violation(v.invariant, v.detail, f.step, f.pfn, f.gfn, v.objects))
        self.cursor = len(facts)
        new.extend(check_state(self.kvm, quiescent=quiescent))
        fresh = []
        for v in new:
            if v.key() not in self.seen:
                self.seen.add(v.key())
                fresh.append(v)
        self.violations.extend(fresh)
        return fresh

    def by_invariant(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.invariant] = out.get(v.invariant, 0) + 1
        return out
