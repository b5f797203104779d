"""Mutation switches: turn off one of the protocol's safety mechanisms to see what it protects.

The model consults ``kvm.mutations`` (a :class:`Mutations`, None by default) at three hook points,
each guarded by ``kvm.mutations is not None`` so that a VM built without one behaves exactly as
before.  Each mutation re-opens a race that Documentation/virt/kvm/locking.rst (or the series'
changelogs) describes; drawn here in locking.rst form.

``skip-retry``: ``mmu_invalidate_retry_gfn()`` (virt/kvm/kvm_main.c, include/linux/kvm_host.h)
always answers "not stale", so the locked re-check after taking ``mmu_lock`` is gone (INV-5)::

    CPU0 (vCPU fault)                        | CPU1 (munmap)
    mmu_seq = kvm->mmu_invalidate_seq        |
    pfn = __kvm_faultin_pfn(gfn)  (page P)   |
                                             | invalidate_range_start: zap SPTEs
                                             | zap host PTEs, drop P from the mm
                                             | invalidate_range_end: seq++
    write_lock(mmu_lock)                     |
    mmu_invalidate_retry_gfn() → "no"        |
    install SPTE → P   (stale: the host maps nothing there; P freed once KVM drops its ref)

``nonatomic-spte``: a leaf zap under ``mmu_lock`` reads the SPTE, then clears it with a plain
store instead of ``xchg`` (``spte_has_volatile_bits()`` wrongly false).  locking.rst, "Dirty bit
is lost" (INV-4 under legacy)::

    CPU0 (zap, mmu_lock held)                | CPU1 (vCPU, no mmu_lock)
    old = *sptep  (present, R/O, Host-W, !D) |
                                             | fast page fault: cmpxchg sets W
                                             | guest writes, hardware sets D
    *sptep = 0                               |
    legacy: D never reaches the folio (kvm_set_pfn_dirty skipped) → writeback skips it,
    reclaim evicts a clean folio whose contents were never written: data lost.
    series: the folio was dirtied when the Host-writable SPTE was created (patch 8): no loss.

``mark-dirty-after-unlock``: the v6.12 arm64/RISC-V/MIPS order, ``kvm_set_pfn_dirty()`` after
``read_unlock(&kvm->mmu_lock)`` (INV-3; the series moved it under the lock,
``kvm_release_faultin_page``).  It only changes a policy that releases after unlocking, on the generic
stage-2; ``arch="arm64"`` (:mod:`kvmsim.arm64`) has this order under legacy without it::

    CPU0 (vCPU fault, holds a ref on folio F) | CPU1 (truncate / hole punch)
    install SPTE → F; write_unlock(mmu_lock)  |
                                              | invalidate_range_start: zap SPTE
                                              | remove F from the page cache
    kvm_set_pfn_dirty(F)                      |
    → WARN in filemap_unaccount_folio: folio dirtied after truncate ("loss of unwritten data")
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kvmsim.errors import UsageError

#: CLI name → attribute of :class:`Mutations`.
MUTATIONS = {"skip-retry": "skip_retry", "nonatomic-spte": "nonatomic_spte",
             "mark-dirty-after-unlock": "mark_dirty_after_unlock"}


@dataclass(frozen=True)
class Mutations:
    """Which safety mechanisms are switched off (all on by default)."""

    skip_retry: bool = False
    nonatomic_spte: bool = False
    mark_dirty_after_unlock: bool = False

    @classmethod
    def parse(cls, names) -> "Mutations":
        kw = {}
        for n in names:
            if n not in MUTATIONS:
                raise UsageError(f"unknown mutation {n!r}; choose from {', '.join(MUTATIONS)}")
            kw[MUTATIONS[n]] = True
        return cls(**kw)

    def names(self) -> list[str]:
        back = {v: k for k, v in MUTATIONS.items()}
        return [back[f.name] for f in fields(self) if getattr(self, f.name)]
