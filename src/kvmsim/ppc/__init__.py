"""PowerPC KVM (arch/powerpc/kvm/): the e500 shadow TLB (:mod:`kvmsim.ppc.e500_mmu_host`, with the
per-protocol pieces in :mod:`kvmsim.ppc.e500_versions`)."""

from kvmsim.ppc.e500_mmu_host import E500Mmu

__all__ = ["E500Mmu"]
