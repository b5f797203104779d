"""The VMX APIC-access page: KVM's internal memslot at ``APIC_DEFAULT_PHYS_BASE`` and the vmcs01
``APIC_ACCESS_ADDR`` that points at its pfn (arch/x86/kvm/lapic.c ``kvm_alloc_apic_access_page()``,
arch/x86/kvm/vmx/vmx.c ``vmx_set_apic_access_page_addr()``, arch/x86/kvm/mmu/mmu.c
``kvm_unmap_gfn_range()``'s ``KVM_REQ_APIC_PAGE_RELOAD``).

The page is not pinned: "the MMU notifier will call us again if it is migrated or swapped out".
``vmx_set_apic_access_page_addr()`` therefore follows a stage-2 fault's protocol, with a VMCS field in
place of an SPTE::

    CPU0 (vCPU: KVM_REQ_APIC_PAGE_RELOAD)       | CPU1 (migrate / swap the APIC page)
    mmu_seq = kvm->mmu_invalidate_seq           |
    pfn = gfn_to_pfn_memslot() (a reference)    |
    read_lock(mmu_lock)                         |
    mmu_invalidate_retry_gfn()? → request again |
    else vmcs_write64(APIC_ACCESS_ADDR, pfn)    |
    v6.13: kvm_release_page_clean(page)         |
    read_unlock(mmu_lock)                       |
                                                | invalidate_range_start → kvm_unmap_gfn_range:
                                                |   KVM_REQ_APIC_PAGE_RELOAD on every vCPU
    v6.12: kvm_release_pfn_clean(pfn)  ← marks  |
           accessed after the unlock (INV-3)    |

Two policy differences, both resolved into ``kvm.ops``:

* patch 36 "KVM: x86: Don't fault-in APIC access page during initial allocation": v6.12's
  ``kvm_alloc_apic_access_page()`` did ``gfn_to_page()`` + ``put_page()`` right after creating the
  memslot (allocating the page, or failing with -EFAULT); v6.13 leaves the page to the first reload;
* patch 50 "KVM: VMX: Hold mmu_lock until page is released when updating APIC access page" (and 51
  "KVM: VMX: Use __kvm_faultin_page() to get APIC access page/pfn", which releases the refcounted page
  rather than a guess from the pfn): v6.12 released after ``read_unlock()``, v6.13 before it, on the
  retry path too.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntEnum

from kvmsim.errors import ModelError
from kvmsim.kvm.pfn import KvmFollowPfn, is_error_noslot_pfn, kvm_follow_pfn
from kvmsim.mm.gup import FOLL
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE
from kvmsim.uapi import KVM_USER_MEM_SLOTS

#: arch/x86/include/asm/apicdef.h
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
#: arch/x86/include/asm/kvm_host.h: ``(KVM_USER_MEM_SLOTS + 1)``
APIC_ACCESS_PAGE_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 1
APIC_ACCESS_GFN = APIC_DEFAULT_PHYS_BASE >> PAGE_SHIFT


class KvmReq(IntEnum):
    """The vCPU requests this model raises (arch/x86/include/asm/kvm_host.h)."""

    KVM_REQ_APIC_PAGE_RELOAD = 17


@dataclass
class KvmArchApicAccess:
    """The APIC-access fields of ``struct kvm_arch``."""

    apic_access_memslot_enabled: bool = False
    apic_access_memslot_inhibited: bool = False
    hva: int = -1


@dataclass
class VcpuVmx:
    """What the model keeps of ``struct vcpu_vmx`` (vmcs01 and vmcs02 fields, the vCPU's requests)."""

    #: vmcs01 ``APIC_ACCESS_ADDR`` as a pfn (None: never written).
    apic_access_addr: int | None = None
    requests: set = field(default_factory=set)
    #: ``is_guest_mode()``: L2 runs on vmcs02 (:mod:`kvmsim.x86.nested`).
    guest_mode: bool = False
    #: ``vmx->nested.reload_vmcs01_apic_access_page``: a reload deferred until vmcs01 is current.
    reload_vmcs01_apic_access_page: bool = False
    #: ``vmx->nested`` (:class:`kvmsim.x86.nested.NestedVmx`), created by the first nested entry.
    nested: object = None


def _need_x86(kvm, what: str) -> None:
    if kvm.arch.family != "x86":
        raise ModelError(errno.EINVAL, f"{what} is x86 (VMX): it needs arch = \"x86\" in [vm], not {kvm.arch.family!r}")


def to_vmx(vcpu) -> VcpuVmx:
    """``to_vmx(vcpu)``."""
    vmx = vcpu.__dict__.get("vmx")
    if vmx is None:
        _need_x86(vcpu.kvm, "VMX")
        vmx = vcpu.__dict__["vmx"] = VcpuVmx()
    return vmx


def kvm_apic_access(kvm) -> KvmArchApicAccess:
    a = kvm.__dict__.get("apic_access")
    if a is None:
        a = kvm.__dict__["apic_access"] = KvmArchApicAccess()
    return a


def kvm_make_request(req: KvmReq, vcpu) -> None:
    to_vmx(vcpu).requests.add(req)


def kvm_check_request(req: KvmReq, vcpu) -> bool:
    """``kvm_check_request()``: test and clear."""
    reqs = to_vmx(vcpu).requests
    if req in reqs:
        reqs.discard(req)
        return True
    return False


def kvm_make_all_cpus_request(kvm, req: KvmReq) -> None:
    for vcpu in kvm.vcpus:
        kvm_make_request(req, vcpu)


def kvm_apic_access_page_unmapped(kvm, slot) -> None:
    """The tail of x86 ``kvm_unmap_gfn_range()``: ``if (kvm_x86_ops.set_apic_access_page_addr &&
    range->slot->id == APIC_ACCESS_PAGE_PRIVATE_MEMSLOT) kvm_make_all_cpus_request(kvm,
    KVM_REQ_APIC_PAGE_RELOAD)``."""
    if slot.id == APIC_ACCESS_PAGE_PRIVATE_MEMSLOT:
        kvm.journal.count("apic_page_reload_requested")
        kvm_make_all_cpus_request(kvm, KvmReq.KVM_REQ_APIC_PAGE_RELOAD)


def _x86_set_memory_region(kvm, sid: int, gpa: int, size: int) -> int:
    """Mirrors ``__x86_set_memory_region()`` (arch/x86/kvm/x86.c): ``vm_mmap(MAP_SHARED | MAP_ANONYMOUS)``
    and an internal memslot (an id above ``KVM_USER_MEM_SLOTS``, which the ioctl refuses).  Returns the hva."""
    from kvmsim.kvm.memslot import KvmMrChange, KvmUserspaceMemoryRegion2, kvm_prepare_memory_region, new_memslot
    from kvmsim.mm.vma import VmaKind
    slots = kvm.memslots[0]
    if slots.overlapping(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, sid):
        raise ModelError(errno.EEXIST, f"__x86_set_memory_region: gpa {gpa:#x} overlaps a userspace memslot")
    vma = kvm.mm.mmap(size, VmaKind.ANON_SHARED)
    mem = KvmUserspaceMemoryRegion2(sid, 0, gpa, size, vma.start, 0)
    new = new_memslot(mem, None, KvmMrChange.CREATE)
    kvm_prepare_memory_region(kvm, None, new, KvmMrChange.CREATE)
    slots.install(new)
    kvm.arch.slot_apply_flags(None, new, KvmMrChange.CREATE)
    kvm.journal.count("memslot_create")
    return vma.start


def kvm_alloc_apic_access_page(kvm) -> int:
    """Mirrors ``kvm_alloc_apic_access_page()`` (arch/x86/kvm/lapic.c): the internal memslot, then
    ``kvm.ops.arch_ops.apic_access_page_prefault`` (v6.12 ``gfn_to_page()`` + ``put_page()``; v6.13 nothing,
    patch 36 "KVM: x86: Don't fault-in APIC access page during initial allocation").  Returns 0 or raises
    ModelError(EFAULT) as the v6.12 prefault could."""
    _need_x86(kvm, "kvm_alloc_apic_access_page")
    a = kvm_apic_access(kvm)
    if a.apic_access_memslot_enabled or a.apic_access_memslot_inhibited:
        return 0
    if kvm.memslots[0].by_id.get(APIC_ACCESS_PAGE_PRIVATE_MEMSLOT) is None:
        a.hva = _x86_set_memory_region(kvm, APIC_ACCESS_PAGE_PRIVATE_MEMSLOT, APIC_DEFAULT_PHYS_BASE, PAGE_SIZE)
    if kvm.ops.arch_ops.apic_access_page_prefault is not None:
        kvm.ops.arch_ops.apic_access_page_prefault(kvm, APIC_ACCESS_GFN)
    a.apic_access_memslot_enabled = True
    return 0


def apic_access_page_prefault_v612(kvm, gfn: int) -> None:
    """v6.12 ``kvm_alloc_apic_access_page()``: ``page = gfn_to_page(kvm, gfn); if (is_error_page(page))
    return -EFAULT; put_page(page);`` ("Do not pin the page in memory, so that memory hot-unplug is able
    to migrate it"): the page is allocated (faulted in for write) at VM setup.  Removed by patch 36 "KVM:
    x86: Don't fault-in APIC access page during initial allocation"."""
    from kvmsim.kvm.pfn import Hold, gfn_to_page, gfn_to_page_released, kvm_dropped
    from kvmsim.trace import Src
    page = gfn_to_page(kvm, gfn, True, user="kvm_alloc_apic_access_page")
    if page is None:
        raise ModelError(errno.EFAULT, "kvm_alloc_apic_access_page: gfn_to_page() of the APIC-access page failed")
    gfn_to_page_released(kvm, page)
    kvm_dropped(kvm, page, Hold.GET, "kvm_alloc_apic_access_page")
    kvm.phys.put_page(page, "kvm_alloc_apic_access_page", kvm=True, source=Src.HELD)


@dataclass
class ApicReload:
    """What one ``vmx_set_apic_access_page_addr()`` did."""

    result: str          # "written", "retry" (request raised again), "deferred" (guest mode), "none"
    pfn: int | None = None


def apic_access_release_v612_unlocked(kvm, pfn: int, kfp) -> None:
    """v6.12: ``kvm_release_pfn_clean(pfn)`` after ``read_unlock(&vcpu->kvm->mmu_lock)``, on the retry
    path too (moved under the lock by patch 50 "KVM: VMX: Hold mmu_lock until page is released when
    updating APIC access page")."""
    from kvmsim.kvm.fault import kvm_release_pfn_clean_guess
    kvm_release_pfn_clean_guess(kvm, pfn, kfp, unused=False, caller="vmx_set_apic_access_page_addr")


def apic_access_release_v613_locked(kvm, pfn: int, kfp) -> None:
    """v6.13: ``if (!WARN_ON_ONCE(!refcounted_page)) kvm_release_page_clean(refcounted_page);`` before
    ``read_unlock()``, retry or not (patch 50 "KVM: VMX: Hold mmu_lock until page is released when
    updating APIC access page", patch 51 "KVM: VMX: Use __kvm_faultin_page() to get APIC access
    page/pfn")."""
    from kvmsim.kvm.pfn import kvm_release_page_clean
    if kfp.refcounted_page is None:
        kvm.journal.count("WARN_ON:vmx_set_apic_access_page_addr")
        return
    kvm_release_page_clean(kvm, kfp.refcounted_page, kfp.hold, "vmx_set_apic_access_page_addr")


@kpath
def vmx_set_apic_access_page_addr(vcpu) -> Steps:
    """Mirrors ``vmx_set_apic_access_page_addr()`` (arch/x86/kvm/vmx/vmx.c): seq sample, faultin of the
    internal memslot's page, ``read_lock``, ``mmu_invalidate_retry_gfn()`` (retry → request
    ``KVM_REQ_APIC_PAGE_RELOAD`` again) or ``vmcs_write64(APIC_ACCESS_ADDR)``, and the release
    ``kvm.ops`` places before or after ``read_unlock()``."""
    kvm = vcpu.kvm
    vmx = to_vmx(vcpu)
    if vmx.guest_mode:                                  # "Defer reload until vmcs01 is the current VMCS."
        vmx.reload_vmcs01_apic_access_page = True
        return ApicReload("deferred")
    slot = kvm.memslots[0].by_id.get(APIC_ACCESS_PAGE_PRIVATE_MEMSLOT)
    if slot is None or slot.invalid:
        return ApicReload("none")
    mmu_seq = kvm.mmu_invalidate_seq
    yield "vmx_set_apic_access_page_addr: mmu_invalidate_seq sampled"
    kfp = KvmFollowPfn(slot, APIC_ACCESS_GFN, flags=FOLL.WRITE, want_writable=True,
                       caller="vmx_set_apic_access_page_addr")
    pfn = kvm_follow_pfn(kvm, kfp)
    kvm.journal.count("apic_access_faultin")
    if is_error_noslot_pfn(pfn):
        return ApicReload("none")
    yield "vmx_set_apic_access_page_addr: pfn resolved (KVM holds a reference)"
    yield from kvm.mmu_lock.read_lock.steps()
    if kvm.mmu_invalidate_retry_gfn(mmu_seq, APIC_ACCESS_GFN):
        kvm_make_request(KvmReq.KVM_REQ_APIC_PAGE_RELOAD, vcpu)
        out = ApicReload("retry", pfn)
    else:
        vmx.apic_access_addr = pfn
        out = ApicReload("written", pfn)
    with kvm.journal.fault_release():
        if kvm.ops.arch_ops.apic_access_release_locked is not None:
            kvm.ops.arch_ops.apic_access_release_locked(kvm, pfn, kfp)
    yield f"vmx_set_apic_access_page_addr: {out.result} under read_lock(mmu_lock)"
    kvm.mmu_lock.read_unlock()
    yield "vmx_set_apic_access_page_addr: read_unlock(mmu_lock)"
    with kvm.journal.fault_release():
        if kvm.ops.arch_ops.apic_access_release_unlocked is not None:
            kvm.ops.arch_ops.apic_access_release_unlocked(kvm, pfn, kfp)
    return out


@kpath
def kvm_vcpu_reload_apic_access_page(vcpu, *, force: bool = True, max_tries: int = 4) -> Steps:
    """``vcpu_enter_guest()``'s ``if (kvm_check_request(KVM_REQ_APIC_PAGE_RELOAD, vcpu))
    kvm_vcpu_reload_apic_access_page(vcpu)``, repeated while a retry re-raises the request (bounded by
    ``max_tries``).  ``force`` reloads even with no request pending (as the first entry does)."""
    out = ApicReload("none")
    for _ in range(max_tries):
        if not kvm_check_request(KvmReq.KVM_REQ_APIC_PAGE_RELOAD, vcpu) and not force:
            break
        force = False
        out = yield from vmx_set_apic_access_page_addr.steps(vcpu)
        if out.result != "retry":
            break
    return out
