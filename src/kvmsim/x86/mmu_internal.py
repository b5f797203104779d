"""x86 MMU internals (arch/x86/kvm/mmu/mmu_internal.h, v6.12 and v6.13): the ``RET_PF_*`` codes and x86's
``struct kvm_page_fault``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from kvmsim.kvm.fault import FaultRet, KvmPageFault

#: ``RET_PF_CONTINUE``, ``RET_PF_RETRY``, ``RET_PF_EMULATE``, ``RET_PF_WRITE_PROTECTED``, ``RET_PF_INVALID``,
#: ``RET_PF_FIXED``, ``RET_PF_SPURIOUS``: what ``kvm_mmu_do_page_fault()`` and its helpers return.  The
#: generic template's :class:`~kvmsim.kvm.fault.FaultRet` has the same names and values (it returns
#: them to every arch), so the two compare equal.
RET_PF = IntEnum("RET_PF", [(m.name, m.value) for m in FaultRet], module=__name__)

#: The codes under the kernel's own names, for the per-fault returns: Python 3.11 looks every
#: ``RET_PF.X`` up through ``EnumType``'s ``__getattr__`` hook (about 0.1 µs each).
RET_PF_RETRY, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS = RET_PF.RETRY, RET_PF.EMULATE, RET_PF.FIXED, RET_PF.SPURIOUS


@dataclass(slots=True)
class X86PageFault(KvmPageFault):
    """``struct kvm_page_fault`` with x86's ``prefetch`` (KVM_PRE_FAULT_MEMORY, async #PF completion): the
    fault every x86 MMU path builds, so ``fault->prefetch`` is a field read."""

    prefetch: bool = False
