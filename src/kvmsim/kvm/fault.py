"""The one stage-2 page fault every architecture takes, and its release (virt/kvm/kvm_main.c
``__kvm_faultin_pfn()``, include/linux/kvm_host.h ``kvm_release_faultin_page()``; the shape shared by
arch/x86/kvm/mmu/mmu.c ``kvm_mmu_page_fault()``, arch/arm64/kvm/mmu.c ``user_mem_abort()`` and
arch/riscv/kvm/mmu.c ``kvm_riscv_gstage_map()``; Linux v6.12 and v6.13).

:func:`kvm_stage2_fault` is the template: ``mmu_seq`` snapshot, faultin (``__kvm_faultin_pfn()``,
FOLL_NOWAIT then FOLL_INTERRUPTIBLE where the arch does that), error pfns, ``mmu_lock``, the retry
check, the map, the release, the unlock, and what the arch does after the unlock.  An architecture
supplies the hooks (class attributes and methods of its MMU):

* ``fault_labels``: the three step labels (snapshot, pfn resolved, unlocked);
* ``fault_lock_read``: ``mmu_lock`` for read (x86 TDP, arm64) or write (shadow MMU, RISC-V, generic);
* ``fault_faultin_nowait``: x86's two attempts and lockless ``mmu_invalidate_retry_gfn_unsafe()``
  checks, or one blocking ``__kvm_faultin_pfn()`` (arm64, RISC-V);
* ``fault_logging_write_only``: "writable only on write faults while logging" (arm64, RISC-V);
* ``fault_retry_ret``: the kernel's ``ret`` on the retry path (arm64 ``-EAGAIN``, RISC-V 0);
* the retry check under the lock: ``fault_retry_per_gfn`` (x86 and generic ``mmu_invalidate_retry_gfn()``;
  arm64 and RISC-V check the whole VM, ``mmu_invalidate_retry()``) and ``fault_stale_invalid_slot``
  (x86 ``is_page_fault_stale()`` also retries on an obsolete root, a memslot being deleted or moved);
* ``handle_error_pfn(pfn)``, ``fault_map(fault)``, ``fault_unused(fault)``, ``fault_after_unlock(fault)``
  (None: nothing after the unlock);
* ``fault_pfn_lookup(fault) -> (pfn, kfp)``: the arch's own pfn lookup in place of the generic
  ``__kvm_faultin_pfn()`` attempts (None on x86, arm64, RISC-V, LoongArch, MIPS, Book3S HV / Radix):
  PowerPC Book3S PR ``kvmppc_gpa_to_pfn()``, which serves the magic page itself, and PowerPC e500,
  whose lookup is a protocol difference of its own (v6.12 and v6.13-rc1 bypass ``__kvm_faultin_pfn()``
  for TLB1 over VM_PFNMAP, v6.13-rc1 calls it with a NULL ``writable``: the resolved
  ``kvm.ops.arch_ops.faultin``);
* ``fault_before_lock(fault)`` (None: nothing): what the arch does between the faultin and taking
  ``mmu_lock`` (Book3S PR's PTE flags, ``mark_page_dirty()`` and ``kvmppc_mmu_hpte_cache_next()``); an
  errno it returns ends the fault with the page released unused (arm64 v6.17's cacheable-PFNMAP refusal);
* x86 only (the one arch with private memory): ``fault_private_mismatch(fault)``, the private vs shared
  check of ``kvm_mmu_faultin_pfn()``, and ``fault_faultin_private(fault)``, ``kvm_mmu_faultin_pfn_private()``
  (the pfn from guest_memfd), called only on a VM with memory attributes, a private fault or (v6.18) a
  "gmem only" memslot
  (:mod:`kvmsim.x86.private_mem`).

The legacy / series difference is not here: the VM's ``kvm.ops`` (:func:`kvmsim.policies.resolve`,
one set of callables per policy × architecture) releases under the lock, after it, or marks the page
before mapping (a hook that is None does nothing at its point).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum

from kvmsim.errors import EHWPOISON
from kvmsim.kvm.pfn import (KVM_PFN_ERR_HWPOISON, KVM_PFN_ERR_NEEDS_IO, KVM_PFN_ERR_RO_FAULT, KVM_PFN_ERR_SIGPENDING,
                            Hold, KvmFollowPfn, _kvm_faultin_pfn, is_error_noslot_pfn,
                            kvm_release_page_clean, kvm_release_page_dirty, kvm_release_page_unused, kvm_release_pfn,
                            kvm_set_pfn_accessed, kvm_set_pfn_dirty)
from kvmsim.kvm.async_pf import kvm_arch_setup_async_pf, kvm_can_do_async_pf
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.mm.gup import FOLL
from kvmsim.sched import Steps, kpath
from kvmsim.trace import Src
from kvmsim.types import PAGE_SHIFT



class FaultRet(IntEnum):
    """What the template returns (the values of x86's ``RET_PF_*``, which compare equal)."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6


@dataclass(slots=True)
class KvmPageFault:
    """``struct kvm_page_fault`` (arch/x86/kvm/mmu/mmu_internal.h) reduced to what every arch's fault
    carries: the gfn and memslot, the access, ``mmu_seq``, the pfn and the ``kvm_follow_pfn`` result
    (its refcounted page and hold), ``map_writable``, and the outcome (``ret`` is the arch's own
    return code, ``retry`` the ``mmu_invalidate_retry*()`` verdict)."""

    vcpu: object
    gfn: int
    slot: object
    write: bool
    exec: bool = False
    perm: bool = False                  # arm64: a permission fault on a valid leaf
    is_private: bool = False            # x86: PFERR_PRIVATE_ACCESS (kvmsim.x86.private_mem)
    mmu_seq: int = 0
    pfn: int = -1
    kfp: KvmFollowPfn | None = None
    map_writable: bool = False
    ret: int = 0
    retry: bool = False
    result: int = 0


def kvm_handle_error_pfn(pfn: int) -> int:
    """x86 ``kvm_handle_error_pfn()``: an error pfn → RET_PF_EMULATE or -errno."""
    if pfn == KVM_PFN_ERR_RO_FAULT:
        return FaultRet.EMULATE
    if pfn == KVM_PFN_ERR_SIGPENDING:
        return -errno.EINTR
    if pfn == KVM_PFN_ERR_HWPOISON:
        return -EHWPOISON
    return -errno.EFAULT


def abort_error_pfn(pfn: int) -> int:
    """arm64 ``user_mem_abort()`` / RISC-V ``kvm_riscv_gstage_map()``: ``KVM_PFN_ERR_HWPOISON`` sends
    SIGBUS (``kvm_send_hwpoison_signal()``), any other error pfn is -EFAULT."""
    return -EHWPOISON if pfn == KVM_PFN_ERR_HWPOISON else -errno.EFAULT


def ret_to_access(r: int, gpa: int, write: bool, value) -> Access | None:
    """The vCPU exit a fault's result becomes (None: re-enter the guest)."""
    if r == FaultRet.EMULATE:
        return Access(Exit.MMIO, gpa, write, value)
    if r == -errno.EINTR:
        return Access(Exit.EINTR, gpa, write, value, errno.EINTR)
    if r == -EHWPOISON:
        return Access(Exit.HWPOISON, gpa, write, value, EHWPOISON)
    if r < 0:
        return Access(Exit.EFAULT, gpa, write, value, -r)
    return None


def kvm_fault_memslot(kvm, gpa: int) -> tuple[int, object]:
    """The start of an arch's stage-2 fault handler: the fault counted (``page_fault``), its gfn and
    ``gfn_to_memslot()`` (None: no memslot).  arm64 ``kvm_handle_guest_abort()`` and RISC-V
    ``gstage_page_fault()`` then test ``gfn_to_hva_memslot_prot()`` for an MMIO exit."""
    gfn = gpa >> PAGE_SHIFT
    kvm.journal.count("page_fault")
    return gfn, kvm.gfn_to_memslot(gfn)


#: Guest re-entries for one access that make no progress before the model reports a livelock.  The
#: kernel never turns RET_PF_RETRY into an error: x86 ``kvm_mmu_page_fault()`` returns 1 and
#: ``vcpu_enter_guest()`` re-enters; arm64 ``user_mem_abort()`` returns 0 for -EAGAIN and
#: ``kvm_handle_guest_abort()`` returns 1 (arch/arm64/kvm/mmu.c); RISC-V ``gstage_page_fault()`` returns
#: 1 likewise.  In a model step nothing else runs, so a fault that keeps retrying would spin forever.
RETRY_LIVELOCK_BOUND = 1000


def retry_state(kvm) -> tuple:
    """What a RET_PF_RETRY depends on.  A guest access runs within one model step, so no other thread
    changes this while the vCPU re-enters: if a second retry sees the same state as the first, every
    further re-entry would retry the same way, and the access is a livelock without spinning to the bound."""
    return (kvm.mmu_invalidate_seq, kvm.mmu_invalidate_in_progress, kvm.mmu_invalidate_range_start,
            kvm.mmu_invalidate_range_end, tuple(s.generation for s in kvm.memslots))


def livelock_access(kvm, gpa: int, write: bool, value) -> Access:
    """The access after :data:`RETRY_LIVELOCK_BOUND` re-entries without progress: a livelock, not EFAULT."""
    kvm.journal.count("guest_livelock")
    return Access(Exit.LIVELOCK, gpa, write, value)


def kvm_guest_access(mmu, vcpu, gpa: int, write: bool, value: int | None, *, translate=None,
                     guest_fault=None) -> Access:
    """A guest load/store (``vcpu_enter_guest()`` / ``kvm_arch_vcpu_ioctl_run()`` re-entering on
    RET_PF_RETRY): through the leaf if the arch's ``leaf_access`` lets it (it returns the pfn, having
    set what hardware sets), else the arch's stage-2 fault; ``emulate`` is what the arch does with
    RET_PF_EMULATE (x86 ``x86_emulate_instruction()``), None for an MMIO exit.

    An access by guest virtual address (x86 indirect shadow paging) passes ``translate(vcpu, gva,
    write) -> pfn | None`` (the hardware walk through the shadow page tables) in place of the memslot
    and leaf lookup, and ``guest_fault(vcpu, gva, write, value) -> Access | None``, the exception the guest's
    own page tables raise before any KVM fault."""
    kvm = mmu.kvm
    gfn = gpa >> PAGE_SHIFT
    stuck = None
    leaf_access, page_fault, emulate = mmu.leaf_access, mmu.page_fault, mmu.emulate
    for _ in range(RETRY_LIVELOCK_BOUND):
        if translate is None:
            slot = kvm.gfn_to_memslot(gfn)
            pfn = leaf_access(vcpu, slot, gfn - slot.base_gfn, write) \
                if slot is not None and not slot.invalid else None
        else:
            pfn = translate(vcpu, gpa, write)
        if pfn is not None:
            if write:
                kvm.phys.write(pfn, int(value or 0), "guest write", kvm=True)
                return Access(Exit.OK, gpa, True, value)
            return Access(Exit.OK, gpa, False, kvm.phys.read(pfn, "guest read", kvm=True))
        if guest_fault is not None:
            out = guest_fault(vcpu, gpa, write, value)
            if out is not None:
                return out
        r = page_fault(vcpu, gpa, write)
        if r == FaultRet.EMULATE and emulate is not None:
            return emulate(vcpu, gpa, write, value)
        out = ret_to_access(int(r), gpa, write, value)
        if out is not None:
            return out
        if r == FaultRet.RETRY:
            state = retry_state(kvm)
            if state == stuck:
                break
            stuck = state
    return livelock_access(kvm, gpa, write, value)


# The two GUP attempts' flags, by write (IntFlag arithmetic costs a µs per fault).
_FOLL_NOWAIT = {False: FOLL.NOWAIT, True: FOLL.WRITE | FOLL.NOWAIT}
_FOLL_INTERRUPTIBLE = {False: FOLL.INTERRUPTIBLE, True: FOLL.WRITE | FOLL.INTERRUPTIBLE}
_FOLL_BLOCKING = {False: FOLL(0), True: FOLL.WRITE}


def kvm_faultin_pfn(mmu, fault: KvmPageFault) -> int | None:
    """The pfn half of the template's faultin, between its ``mmu_seq`` snapshot and its re-check: x86's
    lockless ``mmu_invalidate_retry_gfn_unsafe()`` pre-check, the generic ``__kvm_faultin_pfn()``
    (FOLL_NOWAIT then FOLL_INTERRUPTIBLE on x86, one blocking attempt on arm64 / RISC-V), the arch's
    error-pfn result and ``map_writable``.  None when the fault goes on."""
    kvm = mmu.kvm
    gfn, slot, write = fault.gfn, fault.slot, fault.write
    if (fault.is_private or kvm.mem_attr_array) and mmu.fault_private_mismatch(fault):
        return -errno.EFAULT               # x86 private memory: KVM_EXIT_MEMORY_FAULT (kvmsim.x86.private_mem)
    nowait = mmu.fault_faultin_nowait
    if nowait and kvm.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, gfn):
        kvm.journal.count("fault_retry")
        return FaultRet.RETRY
    if fault.is_private or (slot is not None and slot.gmem_only):          # v6.18 fault_from_gmem(): shared gfns of a gmem-only slot too
        return mmu.fault_faultin_private(fault)      # x86 kvm_mmu_faultin_pfn_private(): guest_memfd
    lookup = mmu.fault_pfn_lookup
    if lookup is not None:                 # the arch's own lookup (PPC e500, Book3S PR)
        pfn, kfp = lookup(fault)
    elif nowait:
        pfn, kfp = _kvm_faultin_pfn(kvm, slot, gfn, _FOLL_NOWAIT[write], caller="kvm_faultin_pfn")
        if pfn == KVM_PFN_ERR_NEEDS_IO or kfp.async_:
            if kvm_can_do_async_pf(fault.vcpu) and kvm_arch_setup_async_pf(fault.vcpu, fault):
                return FaultRet.RETRY              # kvmsim.kvm.async_pf: "page not present" to the guest
            pfn, kfp = _kvm_faultin_pfn(kvm, slot, gfn, _FOLL_INTERRUPTIBLE[write], caller="kvm_faultin_pfn")
    else:
        pfn, kfp = _kvm_faultin_pfn(kvm, slot, gfn, _FOLL_BLOCKING[write])
    fault.pfn, fault.kfp = pfn, kfp
    if is_error_noslot_pfn(pfn):
        return mmu.handle_error_pfn(pfn)
    writable = kfp.map_writable
    if writable and mmu.fault_logging_write_only and not write and slot.dirty_bitmap is not None \
            and not slot.readonly:
        writable = False                   # arm64 "Only actually map the page as writable if this was a write fault."
    fault.map_writable = writable
    return None


def _release(journal, release, kvm, mmu, fault: KvmPageFault) -> None:
    """``release(kvm, mmu, fault)`` inside ``journal.fault_release()`` (its counter, without a context object)."""
    journal.releasing += 1
    try:
        release(kvm, mmu, fault)
    finally:
        journal.releasing -= 1


@kpath
def kvm_stage2_fault(mmu, fault: KvmPageFault) -> Steps:
    """The template: ``mmu_seq`` snapshot, :func:`kvm_faultin_pfn`, x86's lockless re-check (releasing the
    page unused when stale), ``mmu_lock``, retry check, map, release, unlock (module docstring).  The
    releases run inside ``journal.fault_release()`` (its counter, without a context object)."""
    kvm = mmu.kvm
    labels = mmu.fault_labels
    fault.mmu_seq = kvm.mmu_invalidate_seq
    yield labels[0]
    r = kvm_faultin_pfn(mmu, fault)
    if r is not None:
        return r
    yield labels[1]
    journal = kvm.journal
    ops = kvm.ops
    read = mmu.fault_lock_read
    if mmu.fault_faultin_nowait and kvm.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
        journal.releasing += 1
        try:
            ops.release_faultin(kvm, fault.pfn, fault.kfp, unused=True, dirty=False, caller="kvm_faultin_pfn",
                                gfn=fault.gfn)
        finally:
            journal.releasing -= 1
        journal.count("fault_retry")
        return FaultRet.RETRY
    before_lock = mmu.fault_before_lock
    if before_lock is not None and (r := before_lock(fault)) is not None:
        journal.releasing += 1                      # an arch's error before the lock: the page goes unused
        try:
            ops.release_faultin(kvm, fault.pfn, fault.kfp, unused=True, dirty=False, caller="kvm_faultin_pfn",
                                gfn=fault.gfn)
        finally:
            journal.releasing -= 1
        return r
    lock = kvm.mmu_lock
    yield from (lock.read_lock if read else lock.write_lock).steps()
    if (mmu.fault_stale_invalid_slot and fault.slot.invalid) or \
            (kvm.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn) if mmu.fault_retry_per_gfn
             else kvm.mmu_invalidate_retry(fault.mmu_seq)):
        journal.count("fault_retry")
        fault.retry = True
        fault.ret = mmu.fault_retry_ret
        fault.result = FaultRet.RETRY
    else:
        fault.result = mmu.fault_map(fault)
    if ops.fault_release_locked is not None:
        _release(journal, ops.fault_release_locked, kvm, mmu, fault)
    if read:
        lock.read_unlock()
    else:
        lock.write_unlock()
    yield labels[2]
    if ops.fault_release_unlocked is not None:
        _release(journal, ops.fault_release_unlocked, kvm, mmu, fault)
    after = mmu.fault_after_unlock
    if after is not None:
        after(fault)
    return fault.result


# ---- the release --------------------------------------------------------------------------------------

def kvm_release_faultin_page(kvm, page: int | None, unused: bool, dirty: bool, *, hold: Hold = Hold.GET,
                             caller: str = "kvm_release_faultin_page", gfn: int | None = None) -> None:
    """``kvm_release_faultin_page(kvm, page, unused, dirty)`` (include/linux/kvm_host.h, v6.13; patch 49
    "KVM: Move x86's API to release a faultin page to common KVM"): ``lockdep_assert_once(
    lockdep_is_held(&kvm->mmu_lock) || unused)`` (before the NULL check); no page, nothing; unused →
    ``kvm_release_page_unused()``; dirty → ``kvm_release_page_dirty()``; else ``kvm_release_page_clean()``."""
    if not unused:
        kvm.lockdep_assert_held_mmu_lock(caller)
    if page is None:
        return
    if unused:
        kvm_release_page_unused(kvm, page, hold, caller)
    elif dirty:
        kvm_release_page_dirty(kvm, page, hold, caller, gfn=gfn)
    else:
        kvm_release_page_clean(kvm, page, hold, caller, gfn=gfn)


def kvm_release_pfn_clean_guess(kvm, pfn: int, kfp, *, unused: bool, caller: str, gfn: int | None = None) -> None:
    """v6.12 ``kvm_release_pfn_clean(pfn)`` of a faulted-in pfn: guess the page with
    ``kvm_pfn_to_refcounted_page()``, mark it accessed and put it; a page KVM holds that the guess
    calls not refcounted is journalled as a leak."""
    kvm_release_pfn(kvm, pfn, False, caller, unused=unused, gfn=gfn, kfp=kfp)


def _held_src(kfp) -> Src:
    """Where a v6.12 ``kvm_set_pfn_*(pfn)`` page came from: a reference the fault holds, a remapped pfn,
    or the guess."""
    return Src.HELD if kfp.held is not None else Src.REMAPPED if kfp.remapped else Src.GUESS


def release_faultin_page_locked(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.13, every arch: ``kvm_release_faultin_page(kvm, page, unused, writable)`` before dropping
    ``mmu_lock`` (x86: patch 40 "KVM: x86/mmu: Add helper to "finish" handling a guest page fault", patch 41
    "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()", patch 48 "KVM: x86/mmu: Don't mark
    unused faultin pages as accessed"; arm64: patch 55 "KVM: arm64: Mark "struct page" pfns accessed/dirty
    before dropping mmu_lock", patch 56 "KVM: arm64: Use __kvm_faultin_pfn() to handle memory aborts";
    RISC-V: patch 58 "KVM: RISC-V: Mark "struct page" pfns accessed before dropping mmu_lock", patch 59
    "KVM: RISC-V: Use kvm_faultin_pfn() when mapping pfns into the guest"; LoongArch: patch 68 "KVM: LoongArch:
    Use kvm_faultin_pfn() to map pfns into the guest"; MIPS: patch 72 "KVM: MIPS: Use kvm_faultin_pfn() to map
    pfns into the guest")."""
    kfp = fault.kfp
    kvm_release_faultin_page(kvm, kfp.refcounted_page, mmu.fault_unused(fault), fault.map_writable,
                             hold=kfp.hold, gfn=fault.gfn)


def release_pfn_clean_after_unlock(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.12 x86 (and the generic stage-2): ``kvm_release_pfn_clean(fault->pfn)`` after unlocking, on
    every outcome, RETRY included; never dirty (SPTE D bits carried that until patch 8 "KVM: x86/mmu: Mark
    folio dirty when creating SPTE, not when zapping/modifying")."""
    kvm_release_pfn(kvm, fault.pfn, False, "kvm_release_pfn_clean", unused=mmu.fault_unused(fault), gfn=fault.gfn,
                    kfp=fault.kfp)


def user_mem_abort_v612_after_unlock(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.12 arm64 ``user_mem_abort()``: after ``read_unlock(&kvm->mmu_lock)``, ``if (writable && !ret)
    kvm_set_pfn_dirty(pfn)``, then ``kvm_release_pfn_clean(pfn)`` (also on -EAGAIN)."""
    pfn, gfn = fault.pfn, fault.gfn
    if fault.map_writable and fault.ret == 0:
        kvm_set_pfn_dirty(kvm, pfn, "user_mem_abort", source=_held_src(fault.kfp), gfn=gfn)
    kvm_release_pfn_clean_guess(kvm, pfn, fault.kfp, unused=fault.ret != 0, caller="kvm_release_pfn_clean", gfn=gfn)


def gstage_map_v612_dirty_before_map(kvm, fault: KvmPageFault) -> None:
    """v6.12 RISC-V ``kvm_riscv_gstage_map()``: ``kvm_set_pfn_dirty(hfn)`` under the lock but before
    ``gstage_map_page()``, also when the map then fails."""
    kvm_set_pfn_dirty(kvm, fault.pfn, "kvm_riscv_gstage_map", source=_held_src(fault.kfp), gfn=fault.gfn)


def gstage_map_v612_after_unlock(kvm, mmu, fault: KvmPageFault) -> None:
    """v6.12 RISC-V ``kvm_riscv_gstage_map()``: ``kvm_set_pfn_accessed(hfn)`` and
    ``kvm_release_pfn_clean(hfn)`` after ``spin_unlock()`` (accessed twice; ``unused`` is ghost truth
    for INV-7: no leaf maps the page after a retry or a failed map)."""
    pfn, gfn, kfp = fault.pfn, fault.gfn, fault.kfp
    unmapped = fault.retry or mmu.fault_unused(fault)
    kvm_set_pfn_accessed(kvm, pfn, "kvm_riscv_gstage_map", source=_held_src(kfp), gfn=gfn, unused=unmapped)
    kvm_release_pfn_clean_guess(kvm, pfn, kfp, unused=unmapped, caller="kvm_release_pfn_clean", gfn=gfn)
