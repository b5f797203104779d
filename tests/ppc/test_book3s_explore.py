"""The explorer on the Book3S profiles (``kvmsim explore --arch ppc-book3s-*``).

PR, v6.12: the page is dirtied before ``spin_lock()`` and before the retry check, so a truncate that
lands between the faultin and the lock leaves a folio dirtied after its mapping was truncated (patch
63 "KVM: PPC: Book3S: Mark "struct page" pfns dirty/accessed after installing PTE").  v6.13 dirties
under the lock, but its "FIXME" ``unused = false`` dirties the retried page too, so the search still
ends in INV-3, on a later step (under the lock, after the truncate).  HV / Radix call
``set_page_dirty_lock()`` after the unlock in both versions: a truncate in that window is found in both.
"""

import pytest

from kvmsim.explore import SCENARIOS, Mutations, explore


def _found(arch, policy):
    res = explore(SCENARIOS["fault-vs-truncate"].on(arch), policy, Mutations(), bound=2)
    assert res.violating is not None
    v = res.violating.violation
    assert v.invariant == "INV-3" and "truncated" in v.detail
    return [s.label for s in res.violating.steps]


def test_pr_legacy_dirties_the_truncated_folio_before_taking_mmu_lock():
    """The violating step is the vCPU's next one after the truncate: the marks run before it acquires
    ``mmu_lock``, so the schedule ends at that acquisition, before any retry check or unlock."""
    labels = _found("ppc-book3s-pr", "legacy")
    assert labels[-1] == "write_lock(mmu_lock) acquired"
    assert "kvmppc_mmu_map_page: spin_unlock(mmu_lock)" not in labels
    vcpu = [lb for lb in labels if lb.startswith("kvmppc_mmu_map_page")]
    assert vcpu == ["kvmppc_mmu_map_page: mmu_seq snapshot", "kvmppc_mmu_map_page: pfn resolved"]


def test_pr_series_dirties_it_only_under_the_lock_after_the_retry():
    labels = _found("ppc-book3s-pr", "series")
    assert labels[-1] == "kvmppc_mmu_map_page: spin_unlock(mmu_lock)"
    assert any("removed from the page cache" in lb for lb in labels)


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("arch,unlock", [("ppc-book3s-hv", "kvmppc_book3s_hv_page_fault: unlock_rmap, preempt_enable"),
                                         ("ppc-book3s-radix", "kvmppc_create_pte: spin_unlock(mmu_lock)")])
def test_hv_and_radix_set_page_dirty_lock_after_the_unlock_in_both_versions(arch, unlock, policy):
    labels = _found(arch, policy)
    assert unlock in labels
    assert labels.index(unlock) < max(i for i, lb in enumerate(labels) if "removed from the page cache" in lb)


def test_munmap_race_is_closed_by_the_retry_check_on_every_book3s_profile():
    for arch in ("ppc-book3s-hv", "ppc-book3s-radix", "ppc-book3s-pr"):
        for policy in ("legacy", "series"):
            assert explore(SCENARIOS["fault-vs-munmap"].on(arch), policy, Mutations(), bound=2).violating is None
