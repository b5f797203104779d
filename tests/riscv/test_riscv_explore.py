"""The explorer on RISC-V: v6.12 dirties under ``mmu_lock`` after the re-check, so no truncate slips in
before its ``kvm_set_pfn_dirty()``; v6.13's retry counts as used and dirties the truncated folio."""

from kvmsim.explore import SCENARIOS, Mutations, explore


def test_fault_vs_truncate_is_clean_on_legacy_riscv():
    sc = SCENARIOS["fault-vs-truncate"].on("riscv")
    assert explore(sc, "legacy", Mutations(), bound=2).violating is None


def test_fault_vs_truncate_series_riscv_dirties_the_truncated_folio_on_retry():
    """``mmu_invalidate_retry()`` → ``goto out_unlock`` with ret == 0 →
    ``kvm_release_faultin_page(kvm, page, false, writable)`` → SetPageDirty after the truncate."""
    res = explore(SCENARIOS["fault-vs-truncate"].on("riscv"), "series", Mutations(), bound=2)
    assert res.violating is not None
    v = res.violating.violation
    assert v.invariant == "INV-3" and "truncated" in v.detail
    labels = [s.label for s in res.violating.steps]
    assert any("removed from the page cache" in lb for lb in labels)
    assert labels[-1] == "kvm_riscv_gstage_map: spin_unlock(mmu_lock)"


def test_skip_retry_reopens_the_munmap_race_on_riscv():
    sc = SCENARIOS["fault-vs-munmap"].on("riscv")
    assert explore(sc, "series", Mutations(), bound=2).violating is None
    res = explore(sc, "series", Mutations(skip_retry=True), bound=2)
    assert res.violating is not None and res.violating.violation.invariant == "INV-5"
