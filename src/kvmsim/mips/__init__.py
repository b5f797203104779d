"""MIPS KVM (arch/mips/kvm/, VZ): the GPA page-table fault paths, aging and dirty logging of ``mmu.c``
and ``mips.c`` in Linux v6.12 (legacy) and v6.13 (series); see :mod:`kvmsim.mips.mmu`."""

from kvmsim.mips.mmu import MipsMmu

__all__ = ["MipsMmu"]
