"""s390 KVM (arch/s390/kvm/): guest memory through the gmap (:mod:`kvmsim.s390.gmap`) and the vSIE's
pinning of guest 2's control blocks (:mod:`kvmsim.s390.vsie`) in Linux v6.12 (legacy) and v6.13
(series)."""

from kvmsim.s390.gmap import S390Gmap

__all__ = ["S390Gmap"]
