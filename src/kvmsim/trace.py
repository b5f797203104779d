"""Cost counters and the fact journal that the checker and ``--trace`` read.

Counters are kept for every operation at every scale (bulk paths add ``n`` at once).  Facts are
one record per struct-page operation or notable event, kept only while ``journal.recording`` is on
(scenario runs and tests; off for GiB-scale benchmarks, where only the counters matter).

A fact names the kernel function that did it (``caller``), where the page came from (``source``:
a page KVM holds, a pfn read back from a stage-2 PTE, a pfn guessed by legacy
``kvm_pfn_to_refcounted_page()``, ...), whether the current thread held ``mmu_lock``, and the
scenario step that was running.  What kind of event a fact records is a :class:`FactKind`; the
validators (:mod:`kvmsim.check`) are registered per invariant over these kinds, and the journal
refuses a kind it does not know.

A fact also says whether it was recorded *by a stage-2 fault's release of the page it resolved*
(``fault_release``: ``kvm_release_faultin_page()`` and the legacy release/marking it replaced).
The release function says so by recording inside ``with journal.fault_release():``; INV-3 and
INV-7 are judged from that flag, not from caller names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FactKind(str, Enum):
    """What a :class:`Fact` records.  A ``str`` enum, so ``journal.fact("spte_set", …)`` keeps working;
    the enum is the source of truth (:meth:`Journal.fact` rejects any other kind)."""

    # struct page operations (mm/page.py)
    GET = "get"
    PUT = "put"
    PIN = "pin"
    UNPIN = "unpin"
    GET_UNLESS_ZERO_FAILED = "get_unless_zero_failed"
    UNDERFLOW = "underflow"
    SET_DIRTY = "set_dirty"
    MARK_ACCESSED = "mark_accessed"
    FREE = "free"
    DOUBLE_FREE = "double_free"
    FREED_DIRTY = "freed_dirty"
    PREMATURE_FREE = "premature_free"
    FREED_WHILE_REFERENCED = "freed_while_referenced"
    UAF = "uaf"
    # the page cache and reclaim (mm/reclaim.py)
    WRITEBACK = "writeback"
    DIRTY_AFTER_TRUNCATE = "dirty_after_truncate"
    DIRTY_AT_TRUNCATE = "dirty_at_truncate"
    DATA_LOST = "data_lost"
    # KVM (kvm/, x86/, arm64/, riscv/, policies/)
    RELEASE_WITHOUT_ACQUIRE = "release_without_acquire"
    GUESS_MISMATCH = "guess_mismatch"
    GFN_TO_PAGE = "gfn_to_page"
    VCPU_MAP = "vcpu_map"
    MAP_UAF = "map_uaf"
    GPC_UAF = "gpc_uaf"
    SPTE_SET = "spte_set"
    INV11 = "inv11"
    LOCKDEP = "lockdep"
    DIRTY_RING_OVERFLOW = "dirty_ring_overflow"
    #: v6.17 kvm_dirty_ring_reset(): -EINTR left a consumed batch without kvm_reset_dirty_gfn() (kvm/dirty.py)
    DIRTY_RING_RESET_PENDING_DROPPED = "dirty_ring_reset_pending_dropped"


_KINDS = {k.value: k for k in FactKind}


class Src(str, Enum):
    """Where the page a struct-page operation acts on came from."""

    HELD = "held"            # a page KVM got from GUP / pin / guest_memfd and still holds
    GUESS = "guess"          # legacy kvm_pfn_to_refcounted_page(pfn)
    REMAPPED = "remapped"    # a pfn read from a VM_PFNMAP/VM_IO host PTE (follow_pfnmap)
    SPTE = "spte"            # a pfn read back from a stage-2 PTE
    HOST = "host"            # the primary MMU, GUP users, drivers: not KVM
    NONE = "none"


@dataclass
class Fact:
    """One recorded event."""

    kind: FactKind                # a str enum: compares equal to "get", "set_dirty", ...
    pfn: int | None = None
    caller: str = ""
    source: Src = Src.NONE
    locked: bool = False          # current thread held kvm->mmu_lock
    kvm: bool = False             # done by KVM (vs the host / a driver)
    step: int | None = None
    gfn: int | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Recorded by a stage-2 fault's release of the page it resolved (see :meth:`Journal.fault_release`).
    fault_release: bool = False

    def __post_init__(self) -> None:
        kind = _KINDS.get(self.kind)
        if kind is None:
            raise ValueError(f"unknown fact kind {self.kind!r}: add it to kvmsim.trace.FactKind")
        self.kind = kind

    @property
    def by_fault_release(self) -> bool:
        """Whether a stage-2 fault's release did this (the INV-3 / INV-7 sites)."""
        return bool(self.fault_release)


class _FaultRelease:
    """The ``with journal.fault_release():`` context (re-entrant; no allocation per use)."""

    __slots__ = ("journal",)

    def __init__(self, journal: "Journal"):
        self.journal = journal

    def __enter__(self) -> None:
        self.journal.releasing += 1

    def __exit__(self, *exc: object) -> None:
        self.journal.releasing -= 1


class Counters(dict):
    """The journal's counters by name: a dict in which a name never counted reads 0, as in a
    ``collections.Counter`` (whose item update costs about twice a plain dict subclass's, and every
    page fault counts several names)."""

    __slots__ = ()

    def __missing__(self, name: str) -> int:
        return 0


class Journal:
    """Counters plus (optionally) the list of facts."""

    def __init__(self, recording: bool = True):
        self.recording = recording
        self.counters = Counters()
        self.facts: list[Fact] = []
        self.step: int | None = None
        self.releasing = 0                # > 0 inside a stage-2 fault's release (fault_release())
        self._fault_release = _FaultRelease(self)

    def fault_release(self) -> _FaultRelease:
        """Context for a stage-2 fault's release of the page it resolved (``kvm_release_faultin_page()``,
        legacy ``kvm_release_pfn_clean()`` after a fault, arm64/RISC-V v6.12 marking in the fault): every
        fact recorded inside says ``fault_release=True``."""
        return self._fault_release

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def fact(self, kind: FactKind | str, **kw: Any) -> None:
        """Record one fact (when recording); an unknown ``kind`` raises ValueError."""
        if self.recording:
            if self.releasing:
                kw["fault_release"] = True
            self.facts.append(Fact(kind, step=self.step, **kw))

    def snapshot(self) -> dict[str, int]:
        return dict(self.counters)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Counter deltas since ``before`` (a :meth:`snapshot`), zero entries dropped."""
        out = {}
        for k, v in self.counters.items():
            d = v - before.get(k, 0)
            if d:
                out[k] = d
        return out
