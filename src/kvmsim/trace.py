"""Cost counters and the fact journal that the checker and ``--trace`` read.

Counters are kept for every operation at every scale (bulk paths add ``n`` at once).  Facts are
one record per struct-page operation or notable event, kept only while ``journal.recording`` is on
(scenario runs and tests; off for GiB-scale benchmarks, where only the counters matter).

A fact names the kernel function that did it (``caller``), where the page came from (``source``:
a page KVM holds, a pfn read back from a stage-2 PTE, a pfn guessed by legacy
``kvm_pfn_to_refcounted_page()``, ...), whether the current thread held ``mmu_lock``, and the
scenario step that was running.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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

    kind: str                     # "get", "put", "pin", "unpin", "set_dirty", "mark_accessed", "uaf", ...
    pfn: int | None = None
    caller: str = ""
    source: Src = Src.NONE
    locked: bool = False          # current thread held kvm->mmu_lock
    kvm: bool = False             # done by KVM (vs the host / a driver)
    step: int | None = None
    gfn: int | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Journal:
    """Counters plus (optionally) the list of facts."""

    def __init__(self, recording: bool = True):
        self.recording = recording
        self.counters: Counter[str] = Counter()
        self.facts: list[Fact] = []
        self.step: int | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def fact(self, kind: str, **kw: Any) -> None:
        if self.recording:
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
