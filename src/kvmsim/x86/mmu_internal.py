"""x86 MMU internals (arch/x86/kvm/mmu/mmu_internal.h, v6.12 and v6.13): the ``RET_PF_*`` codes."""

from __future__ import annotations

from enum import IntEnum


class RET_PF(IntEnum):
    """``RET_PF_*``: what ``kvm_mmu_do_page_fault()`` and its helpers return.  The values are those of
    the generic :class:`kvmsim.kvm.fault.FaultRet`, so the two compare equal."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6
