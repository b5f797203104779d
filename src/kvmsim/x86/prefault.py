"""KVM_PRE_FAULT_MEMORY on x86 (virt/kvm/kvm_main.c ``kvm_vcpu_pre_fault_memory()``; arch/x86/kvm/mmu/mmu.c
``kvm_arch_vcpu_pre_fault_memory()``, ``kvm_tdp_map_page()``; v6.12 and v6.13).

The ioctl maps guest memory ahead of the guest, one fault at a time, as a *prefetch* fault
(``__kvm_mmu_do_page_fault(vcpu, gpa, PFERR_GUEST_FINAL_MASK, prefetch=true)``): a read, never the lockless
fast path (``page_fault_can_be_fast()`` is false for a not-present, non-write fault with A/D bits on),
through the one template :func:`kvmsim.kvm.fault.kvm_stage2_fault` with ``fault->prefetch`` set.  The SPTE
it makes is not Accessed; over a shadow-present SPTE v6.12 rewrote it that way (A and, for a writable
leaf, D lost: ``handle_changed_spte()`` / ``mmu_spte_update()`` then marked the old pfn's folio), v6.13
returns RET_PF_SPURIOUS (patch 5 "KVM: x86/mmu: Don't overwrite shadow-present MMU SPTEs when
prefaulting"; the VM's ``prefetch_present_spte`` hook in :func:`kvmsim.x86.mmu.mmu_set_spte`).

Errnos: -EINVAL (flags, unaligned gpa/size, a wrapping range), -EOPNOTSUPP (``vcpu->arch.mmu->page_fault !=
kvm_tdp_page_fault``: shadow paging, i.e. TDP off), -ENOENT (RET_PF_EMULATE: no memslot, or MMIO),
-EIO (an unexpected RET_PF_*), -EINTR (a signal pending, also while a fault keeps retrying), and the
fault's own -EFAULT / -EHWPOISON.  RET_PF_WRITE_PROTECTED is 0 like FIXED and SPURIOUS (an -EPERM for it was
proposed in review and dropped before v6.12: "it was nevertheless prefaulted as much as possible"); a
read prefault never meets it in the model.  (-EAGAIN for RET_PF_RETRY is a later kernel's, not v6.12/v6.13's.)  Userspace sees 0 with ``range`` advanced if at least one page was
mapped, else the error.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from kvmsim.errors import ModelError
from kvmsim.kvm.fault import retry_state
from kvmsim.sched import Steps, kpath
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT, PAGE_SIZE
from kvmsim.x86.mmu import kvm_tdp_page_fault
from kvmsim.x86.mmu_internal import RET_PF, X86PageFault
from kvmsim.x86.spte import MMIO, P


@dataclass
class KvmPreFaultMemory:
    """Model of ``struct kvm_pre_fault_memory`` (include/uapi/linux/kvm.h): ``gpa`` and ``size`` are
    updated in place as pages are mapped."""

    gpa: int
    size: int
    flags: int = 0


#: Re-entries of a retried prefault before the model stops waiting: nothing else runs within one
#: model step, so an invalidation in progress never ends (the kernel loops on ``cond_resched()`` until a
#: signal arrives; the model reports that signal's -EINTR).
PREFAULT_RETRY_BOUND = 1000


@kpath
def kvm_tdp_map_page(mmu, vcpu, gpa: int) -> Steps:
    """Mirrors ``kvm_tdp_map_page()``: -EOPNOTSUPP unless the MMU's page fault is ``kvm_tdp_page_fault``;
    the prefetch fault, RET_PF_RETRY again (-EINTR with a signal pending), FIXED / SPURIOUS → 0,
    EMULATE → -ENOENT, anything else -EIO.  Returns ``(r, level)``."""
    kvm = mmu.kvm
    if not mmu.tdp_enabled:
        return -errno.EOPNOTSUPP, 1
    gfn = gpa >> PAGE_SHIFT
    stuck = None
    for _ in range(PREFAULT_RETRY_BOUND):
        if kvm.mm.signal_pending:
            return -errno.EINTR, 1
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:                         # kvm_handle_noslot_fault() → RET_PF_EMULATE
            kvm.journal.count("mmio")
            return -errno.ENOENT, 1
        if slot.invalid:                         # is_page_fault_stale(): an obsolete root
            r = RET_PF.RETRY
        else:
            r = yield from kvm_tdp_page_fault(mmu, X86PageFault(vcpu, gfn, slot, False, prefetch=True))
        r = int(r)
        if r < 0:
            return r, 1
        if r == RET_PF.RETRY:
            state = retry_state(kvm)
            if state == stuck:
                break
            stuck = state
            continue
        if r in (RET_PF.FIXED, RET_PF.SPURIOUS, RET_PF.WRITE_PROTECTED):
            t = slot.arch.get("x86")
            b = int(t.bits[gfn - slot.base_gfn]) if t is not None else 0
            return 0, (int(t.level[gfn - slot.base_gfn]) if b & P and not b & MMIO else 1)
        if r == RET_PF.EMULATE:
            return -errno.ENOENT, 1
        kvm.journal.count("WARN_ON:kvm_tdp_map_page")   # WARN_ON_ONCE(r)
        return -errno.EIO, 1
    kvm.journal.count("prefault_retry_livelock")
    return -errno.EINTR, 1


@kpath
def kvm_arch_vcpu_pre_fault_memory(vcpu, range_: KvmPreFaultMemory) -> Steps:
    """Mirrors ``kvm_arch_vcpu_pre_fault_memory()``: map ``range->gpa`` and return the bytes the mapping
    covers from there (a huge leaf may end past the range: ``min(range->size, end - range->gpa)``)."""
    mmu = vcpu.kvm.arch
    r, level = yield from kvm_tdp_map_page.steps(mmu, vcpu, range_.gpa)
    if r < 0:
        return r
    n = LEVEL_PAGES[level] << PAGE_SHIFT
    end = (range_.gpa & ~(n - 1)) + n
    return min(range_.size, end - range_.gpa)


@kpath
def kvm_vcpu_pre_fault_memory(vcpu, range_: KvmPreFaultMemory) -> Steps:
    """Mirrors ``kvm_vcpu_pre_fault_memory()`` (virt/kvm/kvm_main.c): -EINVAL for flags, an unaligned or
    wrapping range; then :func:`kvm_arch_vcpu_pre_fault_memory` chunk by chunk (-EINTR on a pending
    signal between chunks), advancing ``range``.  Returns 0 if at least one page was mapped, else the
    error; ``range`` says how far it got."""
    kvm = vcpu.kvm
    if range_.flags:
        return -errno.EINVAL
    if range_.gpa % PAGE_SIZE or range_.size % PAGE_SIZE or range_.gpa + range_.size <= range_.gpa \
            or range_.gpa + range_.size > 1 << 64:
        return -errno.EINVAL
    if not hasattr(kvm.arch, "tdp_enabled"):
        raise ModelError(errno.ENOTTY, "KVM_PRE_FAULT_MEMORY is modelled for arch = \"x86\" only")
    full = range_.size
    kvm.journal.count("pre_fault_memory")
    r = 0
    while range_.size:
        if kvm.mm.signal_pending:
            r = -errno.EINTR
            break
        r = yield from kvm_arch_vcpu_pre_fault_memory.steps(vcpu, range_)
        if r == 0 or r == -errno.EIO:            # WARN_ON_ONCE(r == 0 || r == -EIO)
            break
        if r < 0:
            break
        range_.size -= r
        range_.gpa += r
        yield "kvm_vcpu_pre_fault_memory: cond_resched"
    return r if full == range_.size else 0
