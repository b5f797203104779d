"""Mutation switches: turn off one of the protocol's safety mechanisms to see what it protects.

The model never reads them: :func:`install` replaces one hook of the VM (an instance attribute of
the ``Kvm`` or its MMU, or a field of its resolved ``kvm.ops``) with the broken version, so that a VM
built without a mutation runs exactly the unmutated code.  Each mutation re-opens a race that Documentation/virt/kvm/locking.rst (or the series'
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

from dataclasses import dataclass, fields, replace

import numpy as np

from kvmsim.errors import UsageError
from kvmsim.kvm.stage2 import S2
from kvmsim.sched import Steps, kpath

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


def install(kvm, mutations: "Mutations | None") -> None:
    """Apply ``mutations`` to a VM (right after creating it); ``kvm.mutations`` records them."""
    kvm.mutations = mutations
    if mutations is None:
        return
    if mutations.skip_retry:
        _install_skip_retry(kvm)
    if mutations.nonatomic_spte and hasattr(kvm.arch, "zap_leaf"):
        kvm.arch.zap_leaf = _nonatomic_zap_leaf.__get__(kvm.arch)
    if mutations.mark_dirty_after_unlock and kvm.arch.family == "generic":
        _install_mark_dirty_after_unlock(kvm)


def _install_skip_retry(kvm) -> None:
    """``mmu_invalidate_retry_gfn()`` (and arm64 / RISC-V's whole-VM ``mmu_invalidate_retry()``, and the
    x86 bulk fault's vectorised check) answer "not stale" under the lock."""
    def mmu_invalidate_retry_gfn(mmu_seq, gfn):
        kvm.lockdep_assert_held_mmu_lock("mmu_invalidate_retry_gfn")
        return False

    kvm.mmu_invalidate_retry_gfn = mmu_invalidate_retry_gfn
    kvm.mmu_invalidate_retry = lambda mmu_seq: False
    kvm.mmu_invalidate_retry_gfns = lambda mmu_seq, gfns: np.zeros(len(gfns), dtype=bool)


@kpath
def _nonatomic_zap_leaf(mmu, slot, gfn: int) -> Steps:
    """``zap_leaf`` with a plain read, a step, then a plain store (``spte_has_volatile_bits()`` false)."""
    pfns, bits = mmu._tables(slot)
    i = gfn - slot.base_gfn
    old_pfn, old = int(pfns[i]), int(bits[i])
    yield "mmu_spte_clear_no_track: old_spte read, no volatile bits assumed"
    pfns[i], bits[i] = -1, 0
    if old & S2.PRESENT:
        mmu._leaf_zapped(old_pfn, old, "kvm_zap_gfn_range", gfn)
    yield "kvm_zap_gfn_range: SPTE cleared"
    return bool(old & S2.PRESENT)


def _install_mark_dirty_after_unlock(kvm) -> None:
    """``kvm_set_pfn_dirty()`` after ``write_unlock()`` for a writable fault that mapped (the v6.12
    arm64 order) in front of a release that happens after the unlock; nothing under the series."""
    from kvmsim.kvm.fault import FaultRet
    from kvmsim.kvm.pfn import kvm_set_pfn_dirty
    from kvmsim.trace import Src
    release = kvm.ops.fault_release_unlocked
    if release is None:
        return

    def fault_release_unlocked(kvm, mmu, fault):
        if fault.result != FaultRet.RETRY and fault.kfp.map_writable:
            kvm_set_pfn_dirty(kvm, fault.pfn, "user_mem_abort", source=Src.HELD, gfn=fault.gfn)
        release(kvm, mmu, fault)

    kvm.ops = replace(kvm.ops, fault_release_unlocked=fault_release_unlocked)
