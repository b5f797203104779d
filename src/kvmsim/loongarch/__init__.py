"""LoongArch KVM (arch/loongarch/kvm/): the GPA page-table fault paths, aging and dirty logging of
``mmu.c`` in Linux v6.12 (legacy) and v6.13 (series); see :mod:`kvmsim.loongarch.mmu`."""

from kvmsim.loongarch.mmu import LoongArchMmu

__all__ = ["LoongArchMmu"]
