"""x86 dirty logging (arch/x86/kvm/x86.c ``kvm_mmu_slot_apply_flags()``, mmu.c
``kvm_arch_mmu_enable_log_dirty_pt_masked()``, v6.13).

Enable: eager split (unless manual-protect + INITIALLY_SET, which defers everything to the first
CLEAR), then with PML clear D on 4 KiB leaves and write-protect >= 2 MiB leaves, without PML
write-protect everything.  Disable: zap collapsible SPTEs (v6.12 / the series), or with
[6.13-other] recover huge pages in place with one flush for the slot.
"""

from __future__ import annotations

import numpy as np

from kvmsim.kvm.dirty import KVM_DIRTY_LOG_INITIALLY_SET
from kvmsim.kvm.memslot import KvmMrChange
from kvmsim.types import PAGES_PER_PMD
from kvmsim.x86 import tdp_mmu


def manual_protect_and_init_set(kvm) -> bool:
    """``kvm_dirty_log_manual_protect_and_init_set()``."""
    return bool(kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)


def kvm_mmu_slot_apply_flags(mmu, old, new, change) -> None:
    """Mirrors ``kvm_mmu_slot_apply_flags()``."""
    kvm = mmu.kvm
    if change not in (KvmMrChange.FLAGS_ONLY,) or new is None or old is None:
        return
    if old.logging == new.logging:
        return
    if not new.logging:
        if not new.readonly:
            if kvm.v613_other:
                tdp_mmu.recover_huge_pages(kvm, new)
            else:
                tdp_mmu.zap_collapsible_sptes(kvm, new)
        return
    if manual_protect_and_init_set(kvm):
        return
    if mmu.eager_split:
        tdp_mmu.split_range(kvm, new, 0, new.npages)
    if mmu.pml:
        f = tdp_mmu.clear_dirty_range(kvm, new, 0, new.npages, "kvm_mmu_slot_leaf_clear_dirty")
        f |= tdp_mmu.wrprot_range(kvm, new, 0, new.npages, 2, "kvm_mmu_slot_remove_write_access")
    else:
        f = tdp_mmu.wrprot_range(kvm, new, 0, new.npages, 1, "kvm_mmu_slot_remove_write_access")
    if f or mmu.eager_split:
        kvm.flush_remote_tlbs("enable_dirty_logging")


def kvm_arch_mmu_enable_log_dirty_pt_masked(mmu, slot, gfn_offset: int, mask) -> None:
    """Mirrors ``kvm_arch_mmu_enable_log_dirty_pt_masked()``, for each 64-page word of ``mask``."""
    kvm = mmu.kvm
    if "x86" not in slot.arch:
        return
    t = slot.arch["x86"]
    mask = np.asarray(mask, dtype=bool)
    idx = gfn_offset + np.nonzero(mask)[0]
    if not len(idx):
        return
    full = np.zeros(slot.npages, dtype=bool)
    full[idx] = True
    if manual_protect_and_init_set(kvm):
        words = np.unique(idx // 64)
        for w in words.tolist():
            lo, hi = w * 64, min(w * 64 + 64, slot.npages)
            sel = np.nonzero(full[lo:hi])[0]
            start, end = lo + int(sel[0]), lo + int(sel[-1])
            if not (t.level[start:end + 1] > 1).any() and not (t.level[[start, end]] > 1).any():
                continue
            if mmu.eager_split:
                tdp_mmu.split_range(kvm, slot, start, end + 1)
            for g in {start, end}:                         # kvm_mmu_slot_gfn_write_protect(.., PG_LEVEL_2M)
                tdp_mmu.wrprot_range(kvm, slot, g, g + 1, 2, "kvm_mmu_slot_gfn_write_protect")
    if mmu.pml:
        tdp_mmu.clear_dirty_range(kvm, slot, 0, slot.npages, "clear_dirty_pt_masked", mask=full)
    else:
        tdp_mmu.wrprot_range(kvm, slot, 0, slot.npages, 1, "kvm_mmu_write_protect_pt_masked",
                             mask=full & (t.level == 1))


__all__ = ["kvm_mmu_slot_apply_flags", "kvm_arch_mmu_enable_log_dirty_pt_masked", "PAGES_PER_PMD"]
