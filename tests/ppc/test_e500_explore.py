"""The explorer on PPC e500: a retried ``kvmppc_e500_shadow_map()`` (-EAGAIN) is unused, so v6.13 only puts
the page under the lock; v6.12 marks it accessed after ``spin_unlock()`` (INV-7).  Unlike RISC-V, whose
retry counts as used, the series is clean on the truncate race."""

from kvmsim.explore import SCENARIOS, Mutations, explore


def test_tlbwe_vs_truncate_legacy_ages_the_unused_page():
    res = explore(SCENARIOS["tlbwe-vs-truncate"], "legacy", Mutations(), bound=2)
    assert res.violating is not None
    v = res.violating.violation
    assert v.invariant == "INV-7" and v.detail.startswith("kvm_release_pfn_clean")
    labels = [s.label for s in res.violating.steps]
    assert "kvmppc_e500_shadow_map: spin_unlock(mmu_lock)" in labels


def test_tlbwe_vs_truncate_series_is_clean():
    assert explore(SCENARIOS["tlbwe-vs-truncate"], "series", Mutations(), bound=2).violating is None


def test_fault_vs_truncate_series_e500_is_clean_unlike_riscv():
    sc = SCENARIOS["fault-vs-truncate"].on("ppc-e500")
    assert explore(sc, "series", Mutations(), bound=2).violating is None
    assert explore(SCENARIOS["fault-vs-truncate"].on("riscv"), "series", Mutations(), bound=2).violating is not None


def test_skip_retry_reopens_the_munmap_race_on_e500():
    sc = SCENARIOS["fault-vs-munmap"].on("ppc-e500")
    assert explore(sc, "series", Mutations(), bound=2).violating is None
    res = explore(sc, "series", Mutations(skip_retry=True), bound=2)
    assert res.violating is not None and res.violating.violation.invariant == "INV-5"
    assert any(s.label.startswith("kvmppc_e500_shadow_map") for s in res.violating.steps)
