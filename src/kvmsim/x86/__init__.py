"""The x86 KVM MMU (arch/x86/kvm/mmu/): SPTEs, the TDP MMU, the direct shadow MMU, dirty logging.

``make_x86_mmu(kvm, mmu="tdp"|"shadow", paging="direct"|"indirect", pml=, ad_enabled=, eager_split=)`` is
what :func:`kvmsim.kvm.arch.make_arch` calls for arch="x86"; ``paging="indirect"`` (shadow only) is
shadow paging with TDP off (:mod:`kvmsim.x86.paging_tmpl`).
"""

from __future__ import annotations

from kvmsim.errors import UsageError


def make_x86_mmu(kvm, *, mmu: str = "tdp", paging: str = "direct", **opts):
    from kvmsim.x86.mmu import X86Mmu
    from kvmsim.x86.shadow_mmu import ShadowMmu
    if paging not in ("direct", "indirect"):
        raise UsageError(f"unknown x86 paging {paging!r} (direct, indirect)")
    if paging == "indirect":
        if mmu != "shadow":
            raise UsageError("paging = \"indirect\" is shadow paging: it needs mmu = \"shadow\"")
        from kvmsim.x86.shadow_mmu import IndirectShadowMmu
        return IndirectShadowMmu(kvm, mmu=mmu, **opts)
    if mmu == "tdp":
        return X86Mmu(kvm, mmu=mmu, **opts)
    if mmu == "shadow":
        return ShadowMmu(kvm, mmu=mmu, **opts)
    raise UsageError(f"unknown x86 MMU {mmu!r} (tdp, shadow)")
