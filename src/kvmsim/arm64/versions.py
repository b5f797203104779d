"""arm64's per-policy callables, resolved once per VM into ``kvm.ops.arch_ops``
(:func:`kvmsim.policies.resolve`): what v6.12 and v6.13 do differently in arch/arm64/kvm/ beyond the
fault's release (which is the common ``fault_release`` choice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvmsim.arm64.mmu import transparent_hugepage_adjust_v612_transfer
from kvmsim.arm64.mte import MteTagPageV612, MteTagPageV613


@dataclass(frozen=True)
class Arm64Ops:
    """arm64's per-policy callables (``kvm.ops.arch_ops``)."""

    #: ``transparent_hugepage_adjust()`` under the read lock: ``(kvm, fault, head)``, v6.12's refcount
    #: transfer to the THP head page (patch 56); None: nothing.
    thp_adjust_refcount: Callable | None
    #: ``kvm_vm_ioctl_mte_copy_tags()``: the page of one gfn, ``.get(kvm, gfn, write)`` and
    #: ``.put(kvm, token, dirty, gfn)`` (patch 77, :mod:`kvmsim.arm64.mte`).
    mte_tag_page: type


ARM64_V612 = Arm64Ops(thp_adjust_refcount=transparent_hugepage_adjust_v612_transfer, mte_tag_page=MteTagPageV612)
ARM64_V613 = Arm64Ops(thp_adjust_refcount=None, mte_tag_page=MteTagPageV613)
