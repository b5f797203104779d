"""The seam between generic KVM and an architecture's stage-2 MMU (the ``kvm_arch_*`` MMU hooks).

Generic code (memslots, the mmu_notifier, dirty logging, vCPU accesses) calls only these methods;
:mod:`kvmsim.kvm.stage2` is a minimal 4 KiB implementation, :mod:`kvmsim.x86` the full x86 MMU,
:mod:`kvmsim.arm64` arm64's ``user_mem_abort()`` and :mod:`kvmsim.riscv` RISC-V's
``kvm_riscv_gstage_map()``, both on 4 KiB leaves; :mod:`kvmsim.s390` has no stage-2 tables (the
gmap uses the host page tables) and models the vSIE's pinning of guest 2's control blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

from kvmsim.errors import UsageError


@dataclass(frozen=True)
class Leaf:
    """One present leaf stage-2 mapping, as the checker sees it."""

    gfn: int
    pfn: int
    level: int
    writable: bool
    host_writable: bool
    mmu_writable: bool
    accessed: bool
    dirty: bool
    slot_id: int
    held_at_creation: bool      # the fault that created it had a refcounted page


class ArchMmu(Protocol):
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False): ...   # a kpath
    def guest_access(self, vcpu, gpa: int, write: bool, value: int | None): ...
    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool: ...
    def age_gfn(self, slot, start: int, end: int) -> bool: ...
    def test_age_gfn(self, slot, start: int, end: int) -> bool: ...
    def flush_on_age(self) -> bool: ...
    def flush_shadow_memslot(self, slot) -> None: ...
    def flush_shadow_all(self) -> None: ...
    def prepare_memory_region(self, old, new, change) -> None: ...   # kvm_arch_prepare_memory_region()
    def slot_apply_flags(self, old, new, change) -> None: ...
    def enable_log_dirty_pt_masked(self, slot, gfn_offset: int, mask) -> None: ...
    def leaves(self) -> Iterator[Leaf]: ...


def make_arch(kvm, name: str, **opts) -> ArchMmu:
    if name == "x86":
        try:
            from kvmsim.x86 import make_x86_mmu
        except ImportError:
            make_x86_mmu = None
        if make_x86_mmu is not None:
            return make_x86_mmu(kvm, **opts)
        name = "generic"
    if name == "arm64":
        from kvmsim.arm64 import Arm64Mmu
        return Arm64Mmu(kvm, **opts)
    if name == "riscv":
        from kvmsim.riscv import RiscvMmu
        return RiscvMmu(kvm, **opts)
    if name == "s390":
        from kvmsim.s390 import S390Gmap
        return S390Gmap(kvm, **opts)
    if name == "loongarch":
        from kvmsim.loongarch import LoongArchMmu
        return LoongArchMmu(kvm, **opts)
    if name == "mips":
        from kvmsim.mips import MipsMmu
        return MipsMmu(kvm, **opts)
    if name == "generic":
        from kvmsim.kvm.stage2 import GenericStage2
        return GenericStage2(kvm, **opts)
    raise UsageError(f"unknown architecture {name!r} (x86, arm64, riscv, loongarch, mips, s390, generic)")
