"""The x86 KVM MMU (arch/x86/kvm/mmu/): SPTEs, the TDP MMU, the direct shadow MMU, dirty logging.

``make_x86_mmu(kvm, mmu="tdp"|"shadow", pml=, ad_enabled=, eager_split=)`` is what
:func:`kvmsim.kvm.arch.make_arch` calls for arch="x86".
"""

from __future__ import annotations

from kvmsim.errors import UsageError


def make_x86_mmu(kvm, *, mmu: str = "tdp", **opts):
    from kvmsim.x86.mmu import X86Mmu
    from kvmsim.x86.shadow_mmu import ShadowMmu
    if mmu == "tdp":
        return X86Mmu(kvm, mmu=mmu, **opts)
    if mmu == "shadow":
        return ShadowMmu(kvm, mmu=mmu, **opts)
    raise UsageError(f"unknown x86 MMU {mmu!r} (tdp, shadow)")
