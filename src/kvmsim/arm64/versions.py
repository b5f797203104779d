"""arm64's per-policy callables, resolved once per VM into ``kvm.ops.arch_ops``
(:func:`kvmsim.policies.resolve`): what v6.12 and v6.13 do differently in arch/arm64/kvm/ beyond the
fault's release (which is the common ``fault_release`` choice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvmsim.arm64.mmu import transparent_hugepage_adjust_v612_transfer
from kvmsim.arm64.mte import MteTagPageV612, MteTagPageV613
from kvmsim.arm64.pfnmap import (cacheable_pfnmap_fault_check, cacheable_pfnmap_slot_check, s2_noncacheable_v613,
                                 s2_noncacheable_v617)


@dataclass(frozen=True)
class Arm64Ops:
    """arm64's per-policy callables (``kvm.ops.arch_ops``)."""

    #: ``transparent_hugepage_adjust()`` under the read lock: ``(kvm, fault, head)``, v6.12's refcount
    #: transfer to the THP head page (patch 56); None: nothing.
    thp_adjust_refcount: Callable | None
    #: ``kvm_vm_ioctl_mte_copy_tags()``: the page of one gfn, ``.get(kvm, gfn, write)`` and
    #: ``.put(kvm, token, dirty, gfn)`` (patch 77, :mod:`kvmsim.arm64.mte`).
    mte_tag_page: type
    #: ``(kvm, fault) -> bool``: map the pfn with Device attributes (v6.13 ``kvm_is_device_pfn()``, v6.17
    #: ``s2_force_noncacheable``; :mod:`kvmsim.arm64.pfnmap`).
    s2_noncacheable: Callable = s2_noncacheable_v613
    #: ``(kvm, fault) -> errno | None`` before ``mmu_lock`` (v6.17: a cacheable PFNMAP the host cannot map);
    #: None: nothing.
    pfnmap_fault_check: Callable | None = None
    #: ``(kvm, slot, vma)`` in ``kvm_arch_prepare_memory_region()`` for each VMA (v6.17: cacheable VM_PFNMAP
    #: needs FWB and DIC); None: nothing.
    pfnmap_slot_check: Callable | None = None


ARM64_V612 = Arm64Ops(thp_adjust_refcount=transparent_hugepage_adjust_v612_transfer, mte_tag_page=MteTagPageV612)
ARM64_V613 = Arm64Ops(thp_adjust_refcount=None, mte_tag_page=MteTagPageV613)
#: v6.18 ("current"): v6.13 plus the v6.17 cacheable-PFNMAP gating (:mod:`kvmsim.arm64.pfnmap`).
ARM64_V618 = Arm64Ops(thp_adjust_refcount=None, mte_tag_page=MteTagPageV613, s2_noncacheable=s2_noncacheable_v617,
                      pfnmap_fault_check=cacheable_pfnmap_fault_check, pfnmap_slot_check=cacheable_pfnmap_slot_check)
