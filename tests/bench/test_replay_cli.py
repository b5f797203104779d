"""``kvmsim bench replay``: --list, the printed table, the JSON schema, the plot, exit status 1 on lost
pages and 2 on bad input (never a traceback)."""

import json

import pytest
from click.testing import CliRunner

import kvmsim.cli_bench  # noqa: F401  (registers the command on the group)
from kvmsim.bench.replay import NAMES
from kvmsim.cli import cli

SMALL = ["--memory", "64M", "--hot", "16M", "--dirty-rate", "8M", "--epochs", "2", "--blobs", "3"]


def invoke(*args):
    return CliRunner().invoke(cli, ["bench", "replay", *args], catch_exceptions=False)


def test_list_names_every_replay():
    r = invoke("--list")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.output.splitlines()] == list(NAMES)


def test_table_shows_both_protocols_parameters_and_sources():
    r = invoke("qemu-precopy", *SMALL)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "legacy" in out and "series" in out
    assert "clear_bitmap_shift=18" in out and "downtime_limit_ms=300" in out
    assert "migration/ram.c" in out and "CLEAR_BITMAP_SHIFT_DEFAULT 18" in out
    assert "pages lost: 0 in every run" in out


RUN_KEYS = {"replay", "variant", "policy", "arch", "params", "sources", "pages_lost", "pages_over_reported",
            "pages_sent", "guest_writes", "iterations", "converged", "downtime_ms", "virtual_seconds",
            "wall_seconds", "counters", "extra", "per_iteration", "faults"}


@pytest.mark.parametrize("name", NAMES)
def test_json_schema(name):
    r = invoke(name, *SMALL, "--json", "--ring-entries", "4096", "--arch", "x86,riscv")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["schema"] == 1 and d["replay"] == name and d["pages_lost"] == 0
    assert d["options"]["memory"] == 64 << 20
    assert d["runs"] and {run["policy"] for run in d["runs"]} == {"legacy", "series"}
    for run in d["runs"]:
        assert set(run) == RUN_KEYS
        assert run["replay"] == name and run["sources"]
        assert set(run["counters"]) >= {"set_dirty", "mark_accessed", "get_page", "put_page", "pin", "tlb_flush",
                                        "page_fault", "spte_write"}
        assert run["faults"] == run["counters"]["page_fault"] >= run["counters"]["fast_page_fault"]
        for it in run["per_iteration"]:
            assert set(it) == {"index", "reported", "over_reported", "guest_writes", "virtual_seconds"}
    if name == "virtio-gpu-blobs":
        assert {run["arch"] for run in d["runs"]} == {"x86", "riscv"}
        assert all({"exits", "efault", "foreign_refs", "violations", "failed_blobs"} <= set(run["extra"])
                   for run in d["runs"])


def test_a_lost_write_exits_1_and_says_so():
    r = invoke("qemu-precopy", *SMALL, "--bug", "send-before-clear", "--policy", "series")
    assert r.exit_code == 1
    assert "LOST WRITES" in r.output


def test_plot_is_written(tmp_path):
    path = tmp_path / "replay.png"
    r = invoke("snapshot-chain", *SMALL, "--plot", str(path))
    assert r.exit_code == 0, r.output
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("args,words", [
    ([], "name a replay"),
    (["qemu-postcopy"], "unknown replay"),
    (["qemu-precopy", "--memory", "3x"], "--memory"),
    (["qemu-precopy", "--memory", "3M"], "multiple of 2 MiB"),
    (["qemu-precopy", "--hot", "2G"], "--hot"),
    (["qemu-dirty-ring", "--ring-entries", "4096,abc"], "--ring-entries"),
    (["qemu-dirty-ring", "--ring-entries", "100"], "--ring-entries"),
    (["virtio-gpu-blobs", "--arch", "s390"], "--arch"),
    (["ch-precopy", "--bug", "nonsense"], "--bug"),
    (["qemu-precopy", "--policy", "nope"], "--policy"),
    (["qemu-precopy", "--plot", "/nonexistent/dir/x.png"], "does not exist"),
    (["qemu-precopy", "--plot", "x.unknownfmt"], "not supported"),
    (["qemu-precopy", "--memory", "64T", "--hot", "1G"], "MemAvailable"),
])
def test_bad_arguments_exit_2_without_a_traceback(args, words):
    r = CliRunner().invoke(cli, ["bench", "replay", *args])
    assert r.exit_code == 2, r.output
    assert words in r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)


def test_bad_arguments_with_json_print_an_error_object():
    r = CliRunner().invoke(cli, ["bench", "replay", "qemu-precopy", "--hot", "2G", "--json"])
    assert r.exit_code == 2
    assert "--hot" in json.loads(r.output)["error"]


def test_a_policy_plugin_runs_under_the_replay():
    """``--policy FILE.py:CLASS``: the docs' worked example (release the pfncache page after unlocking)
    runs the replay like a shipped protocol and is named in the runs."""
    from pathlib import Path
    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "release_after_unlock.py"
    r = invoke("snapshot-chain", *SMALL, "--policy", f"{example}:ReleaseAfterUnlock", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert len({run["policy"] for run in d["runs"]}) == 1
    assert d["runs"][0]["policy"] not in ("legacy", "series") and d["pages_lost"] == 0
