"""arm64 KVM (arch/arm64/kvm/): the stage-2 fault, access-flag fault, aging and dirty-logging paths of
``mmu.c`` in Linux v6.12 (legacy) and v6.13 (series); see :mod:`kvmsim.arm64.mmu`."""

from kvmsim.arm64.mmu import Arm64Mmu, memslot_is_logging

__all__ = ["Arm64Mmu", "memslot_is_logging"]
