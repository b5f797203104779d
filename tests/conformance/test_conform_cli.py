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
