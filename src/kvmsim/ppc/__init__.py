"""PowerPC KVM (arch/powerpc/kvm/): the e500 shadow TLB (:mod:`kvmsim.ppc.e500_mmu_host`, with the
per-protocol pieces in :mod:`kvmsim.ppc.e500_versions`) and the Book3S HV (hash), Radix and PR profiles."""

from kvmsim.ppc.book3s_64_mmu_hv import Book3sHvMmu
from kvmsim.ppc.book3s_64_mmu_radix import Book3sRadixMmu
from kvmsim.ppc.book3s_pr import Book3sPrMmu
from kvmsim.ppc.e500_mmu_host import E500Mmu

__all__ = ["Book3sHvMmu", "Book3sRadixMmu", "Book3sPrMmu", "E500Mmu"]
