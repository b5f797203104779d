"""RISC-V KVM (arch/riscv/kvm/): the G-stage fault, aging and dirty-logging paths of ``mmu.c`` and the
guest page-fault exit of ``vcpu_exit.c`` in Linux v6.12 (legacy) and v6.13 (series); see
:mod:`kvmsim.riscv.mmu`."""

from kvmsim.riscv.mmu import RiscvMmu

__all__ = ["RiscvMmu"]
