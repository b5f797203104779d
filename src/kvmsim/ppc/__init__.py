"""PowerPC KVM (arch/powerpc/kvm/): the Book3S HV (hash), Radix and PR profiles."""

from kvmsim.ppc.book3s_64_mmu_hv import Book3sHvMmu
from kvmsim.ppc.book3s_64_mmu_radix import Book3sRadixMmu
from kvmsim.ppc.book3s_pr import Book3sPrMmu

__all__ = ["Book3sHvMmu", "Book3sRadixMmu", "Book3sPrMmu"]
