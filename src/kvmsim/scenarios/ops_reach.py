"""Scenario ops that reach the model's remaining knobs: hardware poison of a host page
(``memory_failure()``, mm/memory-failure.c), the dirty ring's enable with its size errno
(``kvm_vm_ioctl_enable_dirty_log_ring()``, virt/kvm/kvm_main.c) and ring-with-bitmap
(``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP``), and the per-fault conditions of a ``fault`` step: an
instruction fetch (``exec``: NX huge pages) and a fatal signal arriving during GUP (``signal_pending``:
patch 14).

``REACH_OP_ARGS`` / ``REACH_OPS`` are merged into :data:`kvmsim.scenarios.ops.OP_ARGS` / ``OPS``.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import REQUIRED, c_choice, c_int, c_size, c_str

REACH_OP_ARGS = {
    # memory_failure(pfn, 0) of the page mapped at vma + offset (madvise(MADV_HWPOISON) from the VMM)
    "memory_failure": {"vma": (c_str, REQUIRED), "offset": (c_size, 0)},
    # KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, size): the step's errno is the kernel's (EINVAL, E2BIG)
    "enable_dirty_ring": {"size": (c_int, REQUIRED)},
    # KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    "enable_dirty_ring_with_bitmap": {},
    # RISC-V fault injection: the next gstage_set_pte() fails (a page-table page allocation, a block leaf)
    "gstage_set_pte_error": {"errno": (c_choice("enomem", "eexist"), REQUIRED)},
}


def memory_failure(mm, hva: int) -> int:
    """Mirrors ``memory_failure()`` (mm/memory-failure.c) for a small page mapped at ``hva``: set
    PG_hwpoison, then ``try_to_unmap()`` every mapping under the mmu_notifier (KVM's SPTEs go), each PTE
    becoming a hwpoison entry, so the next access is ``VM_FAULT_HWPOISON`` (SIGBUS for the VMM,
    ``-EHWPOISON`` for GUP, ``KVM_PFN_ERR_HWPOISON`` for KVM).  The page is never freed."""
    from kvmsim.mm.notifier import MmuNotifyEvent
    from kvmsim.mm.page import PG
    from kvmsim.mm.reclaim import _notify, rmap_walk
    from kvmsim.mm.vma import Pte
    vma, pfn, bits, level = mm.pte_of(hva)
    if vma is None or pfn < 0 or not bits & int(Pte.PRESENT) or level > 1 or vma.driver is not None:
        raise ModelError(errno.EINVAL, f"memory_failure at {hva:#x}: not a present small page of anonymous "
                                       "or file memory")
    mm.phys.flags[pfn] |= int(PG.hwpoison)
    mm.journal.count("memory_failure")
    for v, i in rmap_walk(mm, pfn) or [(vma, vma.idx(hva))]:
        rng = _notify(mm, v, i, 1, MmuNotifyEvent.CLEAR, "memory_failure")
        mm.invalidate_range_start(rng)
        v.pte[i] = int(Pte.HWPOISON)
        mm.invalidate_range_end(rng)
    return pfn


def op_memory_failure(env: Env, a: dict):
    pfn = memory_failure(env.mm, env.hva(a["vma"], a["offset"]))
    yield from _done("memory_failure done")
    return Res("ok", value=pfn)


def op_enable_dirty_ring(env: Env, a: dict):
    from kvmsim.kvm.dirty import enable_dirty_ring
    if a["size"] < 0 or a["size"] >= 1 << 32:
        raise ModelError(errno.EINVAL, f"dirty ring size {a['size']} is not a u32")
    enable_dirty_ring(env.kvm, a["size"])
    yield from _done("KVM_CAP_DIRTY_LOG_RING enabled")
    return Res("ok")


def op_enable_dirty_ring_with_bitmap(env: Env, a: dict):
    from kvmsim.kvm.dirty import enable_dirty_ring_with_bitmap
    enable_dirty_ring_with_bitmap(env.kvm)
    yield from _done("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP enabled")
    return Res("ok")


def op_gstage_set_pte_error(env: Env, a: dict):
    """RISC-V: the next ``gstage_set_pte()`` returns -ENOMEM (``kvm_mmu_memory_cache_alloc()`` found the
    cache empty) or -EEXIST (a block leaf is in the way) (:attr:`kvmsim.riscv.mmu.RiscvMmu.inject_set_pte_error`)."""
    if not hasattr(env.kvm.arch, "inject_set_pte_error"):
        raise ModelError(errno.EINVAL, "gstage_set_pte_error is a RISC-V G-stage injection (arch = \"riscv\")")
    env.kvm.arch.inject_set_pte_error = -{"enomem": errno.ENOMEM, "eexist": errno.EEXIST}[a["errno"]]
    yield from _done("gstage_set_pte() error armed")
    return Res("ok")


@contextmanager
def fatal_signal_pending(mm, on: bool):
    """A fatal signal for the vCPU task arrives after KVM_RUN's entry check, before the fault's GUP:
    ``mmap_read_lock_killable()`` fails, so slow GUP returns -EAGAIN (legacy: KVM_PFN_ERR_FAULT; series,
    patch 14: KVM_PFN_ERR_SIGPENDING).  GUP-fast does not take mmap_lock and still succeeds.  A fatal
    signal goes to the whole thread group, so while the step runs (an ``interleave`` thread suspended
    inside it too) every thread's slow GUP sees it."""
    if not on:
        yield
        return
    saved = mm.mmap_lock_contended, mm.signal_pending
    mm.mmap_lock_contended = mm.signal_pending = True
    try:
        yield
    finally:
        mm.mmap_lock_contended, mm.signal_pending = saved


REACH_OPS = {"memory_failure": op_memory_failure, "enable_dirty_ring": op_enable_dirty_ring,
             "enable_dirty_ring_with_bitmap": op_enable_dirty_ring_with_bitmap,
             "gstage_set_pte_error": op_gstage_set_pte_error}
