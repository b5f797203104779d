"""arm64 stage-2 memory type of VM_PFNMAP / VM_MIXEDMAP memory (arch/arm64/kvm/mmu.c ``user_mem_abort()``,
``kvm_arch_prepare_memory_region()``), v6.13 and v6.17+.

v6.13: a pfn outside the kernel's linear map (``kvm_is_device_pfn()``, ``!pfn_is_map_memory()``) is mapped
with Device attributes at stage 2, whatever the VMA's ``vm_page_prot`` says, and never as a THP block.

v6.17 ("KVM: arm64: Block cacheable PFNMAP mapping", 2a8dfab26677; "KVM: arm64: Allow cacheable stage 2
mapping using VMA flags", 0c67288e0c8b; "KVM: arm64: Expose new KVM cap for cacheable PFNMAP",
f55ce5a6cd33): the VMA decides.  For a VM_PFNMAP / VM_MIXEDMAP pfn outside the linear map:

    VMA cacheable (kvm_vma_is_cacheable)   FWB && DIC (kvm_supports_cacheable_pfnmap)   stage 2
    no                                     -                                            Device (s2_force_noncacheable)
    yes                                    yes                                          Normal, cacheable
    yes                                    no                                           -EFAULT, page released unused

and a memslot over a cacheable VM_PFNMAP VMA is -EINVAL at ``kvm_arch_prepare_memory_region()`` without
FWB and DIC.  The -EFAULT path releases the faulted-in page ("KVM: arm64: Fix page leak in
user_mem_abort()", 5f9466b50c1b, v6.18).  KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED reports
``kvm_supports_cacheable_pfnmap()``; the model's ``Arm64Mmu(cacheable_pfnmap_supported=...)`` is the host's
answer (scenario key ``cacheable_pfnmap_supported``).
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.mm.vma import VM


def kvm_vma_is_cacheable(vma) -> bool:
    """Mirrors ``kvm_vma_is_cacheable()``: false for a Normal-NC or Device ``vm_page_prot`` (a driver's
    mapping unless the driver maps cacheable), true otherwise."""
    drv = getattr(vma, "driver", None)
    return True if drv is None else bool(drv.cacheable)


def kvm_supports_cacheable_pfnmap(kvm) -> bool:
    """Mirrors ``kvm_supports_cacheable_pfnmap()``: ``ARM64_HAS_STAGE2_FWB && ARM64_HAS_CACHE_DIC``."""
    return kvm.arch.cacheable_pfnmap_supported


def s2_noncacheable_v613(kvm, fault) -> bool:
    """v6.13 ``user_mem_abort()``: ``device = kvm_is_device_pfn(pfn)``."""
    return not kvm.phys.pfn_valid(fault.pfn)


def s2_noncacheable_v617(kvm, fault) -> bool:
    """v6.17 ``s2_force_noncacheable``: a VM_PFNMAP / VM_MIXEDMAP pfn outside the linear map whose VMA is
    not cacheable (a cacheable one was refused before the lock if the hardware cannot map it)."""
    return fault.vm_pfnmap and not kvm.phys.pfn_valid(fault.pfn) and not fault.vma_cacheable


def cacheable_pfnmap_fault_check(kvm, fault) -> int | None:
    """v6.17 ``user_mem_abort()`` before taking ``mmu_lock``: -EFAULT for a cacheable VM_PFNMAP /
    VM_MIXEDMAP pfn outside the linear map on a host without FWB and DIC (the template then releases the
    page unused, 5f9466b50c1b); None to go on."""
    if fault.vm_pfnmap and not kvm.phys.pfn_valid(fault.pfn) and fault.vma_cacheable \
            and not kvm_supports_cacheable_pfnmap(kvm):
        kvm.journal.count("cacheable_pfnmap_refused")
        return -errno.EFAULT
    return None


def cacheable_pfnmap_slot_check(kvm, slot, vma) -> None:
    """v6.17 ``kvm_arch_prepare_memory_region()``: "Cacheable PFNMAP is allowed only if the hardware
    supports it" -- EINVAL for a cacheable VM_PFNMAP VMA without FWB and DIC."""
    if vma.flags & VM.PFNMAP and kvm_vma_is_cacheable(vma) and not kvm_supports_cacheable_pfnmap(kvm):
        raise ModelError(errno.EINVAL, f"slot {slot.id}: cacheable VM_PFNMAP VMA at {vma.start:#x} and the host "
                                       "lacks stage-2 FWB / DIC (KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 0)")
