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


#: The stage-2 MMU each ``[vm] arch`` name builds: module and class (``x86`` goes through
#: :func:`kvmsim.x86.make_x86_mmu`, which picks the TDP or the shadow MMU).
ARCH_PROFILES: dict[str, tuple[str, str]] = {
    "x86": ("kvmsim.x86", "make_x86_mmu"),
    "arm64": ("kvmsim.arm64", "Arm64Mmu"),
    "riscv": ("kvmsim.riscv", "RiscvMmu"),
    "loongarch": ("kvmsim.loongarch", "LoongArchMmu"),
    "mips": ("kvmsim.mips", "MipsMmu"),
    "s390": ("kvmsim.s390", "S390Gmap"),
    "ppc-book3s-hv": ("kvmsim.ppc", "Book3sHvMmu"),
    "ppc-book3s-radix": ("kvmsim.ppc", "Book3sRadixMmu"),
    "ppc-book3s-pr": ("kvmsim.ppc", "Book3sPrMmu"),
    "ppc-e500": ("kvmsim.ppc", "E500Mmu"),
    "generic": ("kvmsim.kvm.stage2", "GenericStage2"),
}
ARCH_NAMES = tuple(ARCH_PROFILES)


def make_arch(kvm, name: str, **opts) -> ArchMmu:
    """The VM's stage-2 MMU for ``name`` (:data:`ARCH_PROFILES`)."""
    import importlib
    try:
        module, factory = ARCH_PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r} ({', '.join(ARCH_NAMES)})") from None
    return getattr(importlib.import_module(module), factory)(kvm, **opts)
