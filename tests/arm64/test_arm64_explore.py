"""The explorer on arm64: v6.12's dirty-after-unlock needs no mutation there (INV-3)."""

from kvmsim.explore import SCENARIOS, Mutations, explore


def test_fault_vs_truncate_dirties_a_truncated_folio_on_legacy_arm64_only():
    sc = SCENARIOS["fault-vs-truncate"].on("arm64")
    legacy = explore(sc, "legacy", Mutations(), bound=2)
    assert legacy.violating is not None
    v = legacy.violating.violation
    assert v.invariant == "INV-3" and "truncated" in v.detail
    labels = [s.label for s in legacy.violating.steps]
    assert any("read_unlock" in lb for lb in labels)
    assert explore(sc, "series", Mutations(), bound=2).violating is None


def test_skip_retry_reopens_the_munmap_race_on_arm64():
    sc = SCENARIOS["fault-vs-munmap"].on("arm64")
    assert explore(sc, "series", Mutations(), bound=2).violating is None
    res = explore(sc, "series", Mutations(skip_retry=True), bound=2)
    assert res.violating is not None and res.violating.violation.invariant == "INV-5"
