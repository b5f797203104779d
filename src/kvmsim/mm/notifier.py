"""mmu_notifier: how the primary MMU tells secondary MMUs (KVM) about changes (include/linux/mmu_notifier.h).

Subscribers implement :class:`MmuNotifierOps`.  ``invalidate_range_start``/``_end`` are kernel
paths (see :mod:`kvmsim.sched`) so a fault can be interleaved with them; the aging callbacks and
``release`` are plain calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from kvmsim.sched import Steps


class MmuNotifyEvent(str, Enum):
    """``enum mmu_notifier_event``, with the host operation that fired it."""

    UNMAP = "unmap"                 # munmap, zap_page_range, driver teardown, truncate
    CLEAR = "clear"                 # madvise DONTNEED / reclaim / page replaced
    PROTECTION_VMA = "protection_vma"   # mprotect
    PROTECTION_PAGE = "protection_page"  # folio_mkclean (writeback)
    SOFT_DIRTY = "soft_dirty"
    RELEASE = "release"
    MIGRATE = "migrate"
    EXCLUSIVE = "exclusive"


@dataclass(frozen=True)
class MmuNotifierRange:
    """``struct mmu_notifier_range``."""

    start: int
    end: int
    event: MmuNotifyEvent
    blockable: bool = True
    reason: str = ""


class MmuNotifierOps(Protocol):
    def invalidate_range_start(self, rng: MmuNotifierRange) -> Steps: ...
    def invalidate_range_end(self, rng: MmuNotifierRange) -> Steps: ...
    def clear_flush_young(self, start: int, end: int) -> bool: ...
    def clear_young(self, start: int, end: int) -> bool: ...
    def test_young(self, addr: int) -> bool: ...
    def release(self) -> None: ...
