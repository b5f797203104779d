"""Worked example of a policy plugin: v6.13 with patch 40 undone on x86.

Patch 40 of "KVM: Stop grabbing references to PFNMAP'd pages", "KVM: x86/mmu: Add helper to "finish"
handling a guest page fault" (arch/x86/kvm/mmu/mmu.c, ``kvm_mmu_finish_page_fault()``), moved x86's
release of the faulted-in page under ``mmu_lock``: ``kvm_release_faultin_page()`` runs before
``write_unlock(&vcpu->kvm->mmu_lock)`` in ``direct_page_fault()`` / ``kvm_tdp_mmu_page_fault()``.
This plugin is the "what if" a patch author would write: keep everything else of v6.13, but release
the page (``kvm_release_page_dirty()`` / ``_clean()`` / ``_unused()``) *after* dropping the lock, as
v6.12 did.  Between the unlock and the release an mmu_notifier invalidation (writeback, truncate)
can run, so the page is marked dirty/accessed with no mapping left: INV-3.

    kvmsim run dirty-after-writeback --policy docs/examples/release_after_unlock.py:ReleaseAfterUnlock
    kvmsim compare --policy docs/examples/release_after_unlock.py:ReleaseAfterUnlock
"""

from kvmsim.kvm.pfn import kvm_release_page_clean, kvm_release_page_dirty, kvm_release_page_unused
from kvmsim.policies.series import SeriesPolicy


def release_faultin_page_after_unlock(kvm, mmu, fault):
    """v6.13's ``kvm_release_faultin_page(kvm, page, unused, dirty=map_writable)``, called after
    ``write_unlock(&kvm->mmu_lock)`` (and so without its ``lockdep_assert_once``)."""
    kfp = fault.kfp
    page, hold = kfp.refcounted_page, kfp.hold
    if page is None:
        return
    if mmu.fault_unused(fault):
        kvm_release_page_unused(kvm, page, hold, "kvm_release_faultin_page")
    elif fault.map_writable:
        kvm_release_page_dirty(kvm, page, hold, "kvm_release_faultin_page", gfn=fault.gfn)
    else:
        kvm_release_page_clean(kvm, page, hold, "kvm_release_faultin_page", gfn=fault.gfn)


class ReleaseAfterUnlock(SeriesPolicy):
    name = "series-unlocked-release"
    title = "v6.13 with patch 40 undone: x86 releases the faulted-in page after dropping mmu_lock"

    def fault_release(self, arch):
        """x86 (and the generic stage-2): release after the unlock; every other arch as v6.13."""
        if arch in ("x86", "generic"):
            return None, release_faultin_page_after_unlock, None
        return super().fault_release(arch)

    def fault_release_bulk(self):
        """The x86 bulk fault releases after unlocking too (``False``: not under ``mmu_lock``)."""
        return self.release_faultin_bulk, False, "kvm_release_faultin_page"
