"""``kvmsim explore vsie-vs-driver-teardown``: the vSIE pin is not tracked by the mmu_notifier."""

from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.explore import SCENARIOS, Mutations, explore


def test_legacy_pin_races_the_driver_teardown_and_the_series_has_nothing_to_race():
    """v6.12: pin (kvm_try_get_pfn) → teardown frees the page → unshadow_scb()/unpin_guest_page() on it.
    v6.13: gfn_to_page() NULL, no pin: every schedule is clean."""
    sc = SCENARIOS["vsie-vs-driver-teardown"].on("s390")
    legacy = explore(sc, "legacy", Mutations(), bound=2)
    assert legacy.violating is not None
    assert legacy.violating.violation.invariant in ("INV-3", "INV-5")
    assert [s.thread for s in legacy.violating.steps][:2] == ["vcpu0", "driver"]
    assert "pin_scb" in legacy.violating.steps[0].label
    series = explore(sc, "series", Mutations(), bound=2)
    assert series.violating is None and series.explored >= 3


def test_cli_defaults_to_the_races_own_arch():
    r = CliRunner().invoke(cli, ["explore", "vsie-vs-driver-teardown", "--policy", "legacy"])
    assert r.exit_code == 0 and "[legacy, s390]" in r.output and "VIOLATION" in r.output
    r = CliRunner().invoke(cli, ["explore", "vsie-vs-driver-teardown", "--arch", "x86"])
    assert r.exit_code == 2 and "runs on s390" in r.output
