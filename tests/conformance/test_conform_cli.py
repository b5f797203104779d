"""``kvmsim conform``: says why it cannot run without /dev/kvm; runs and agrees with it."""

import json

import pytest
from click.testing import CliRunner

import kvmsim.cli_conform  # noqa: F401  (registers the command)
from kvmsim.cli import cli


def test_conform_without_kvm_says_why(monkeypatch):
    monkeypatch.setenv("KVMSIM_REAL_KVM", "0")
    r = CliRunner().invoke(cli, ["conform"])
    assert r.exit_code == 2
    assert "disabled by KVMSIM_REAL_KVM=0" in r.output
    r = CliRunner().invoke(cli, ["conform", "--json"])
    assert r.exit_code == 2 and "error" in json.loads(r.output)


@pytest.mark.kvm
def test_conform_json_on_this_host(real):
    r = CliRunner().invoke(cli, ["conform", "--json", "--group", "memslot", "--group", "dirty"])
    out = json.loads(r.output)
    assert r.exit_code == 0, out
    assert out["disagree"] == 0 and out["agree"] >= 20
    assert out["policy"] in ("legacy", "series")


@pytest.mark.parametrize("groups", [["--group", "bogus"], ["--group", "memslot,bogus"], ["--group", "memslot,"]])
def test_conform_unknown_group_is_a_usage_error_listing_the_groups(groups):
    """Checked before anything runs (no /dev/kvm needed): exit 2 and the known groups, no table."""
    r = CliRunner().invoke(cli, ["conform", *groups])
    assert r.exit_code == 2, r.output
    assert "known groups: memslot, access, dirty, ring, hostop, pfncache, gmem" in r.output
    assert "cases run" not in r.output and "Traceback" not in r.output


def test_conform_values_print_errno_names_not_numbers(model):
    from kvmsim.backend.conformance import CASES, Errno, format_value, json_value, run_case
    assert repr(Errno(14)) == "EFAULT" and Errno(0) == 0 and str(Errno(0)) == "ok"
    by_name = {c.name: c for c in CASES}
    got = run_case(by_name["memslot-overlap-eexist"], model)
    assert got == (0, 17)                         # still compares as numbers between backends
    assert format_value(got) == "ok, EEXIST"
    assert json_value(got) == ["ok", "EEXIST"]
    got = run_case(by_name["hostop-remove-private"], model)
    assert format_value(got) == "EINVAL, (ok ok ok ok), (17 17 17 17), (ok)"
    assert format_value((True, None, b"\x06\x00")) == "yes, -, 0x0600"


@pytest.mark.kvm
def test_conform_comma_list_is_the_same_as_repeating_the_option(real):
    a = json.loads(CliRunner().invoke(cli, ["conform", "--json", "--group", "memslot,gmem"]).output)
    b = json.loads(CliRunner().invoke(cli, ["conform", "--json", "--group", "gmem", "--group", "memslot"]).output)
    assert {r["group"] for r in a["rows"]} == {"memslot", "gmem"}
    assert [r["case"] for r in a["rows"]] == [r["case"] for r in b["rows"]]
    assert any(r["real"] == "EEXIST" for r in a["rows"])


@pytest.mark.kvm
def test_conform_table_is_not_cut_when_piped(real):
    """CliRunner's output is not a tty: the longest case name and its values come out whole."""
    r = CliRunner().invoke(cli, ["conform", "--group", "dirty"])
    assert r.exit_code == 0, r.output
    assert "dirty-manual-initially-set-anon-private" in r.output and "…" not in r.output
