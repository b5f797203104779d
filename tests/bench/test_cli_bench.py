"""``kvmsim bench dirty-log``: the selftest's printed lines, JSON, errors without tracebacks."""

import json
import re
import sys

import pytest
from click.testing import CliRunner

import kvmsim.cli_bench  # noqa: F401  (registers the command on the group)
from kvmsim.bench.dirty_log_perf import Options
from kvmsim.errors import UsageError
from kvmsim.cli import cli

SMALL = ["bench", "dirty-log", "-b", "8M", "-v", "2", "--no-isolate"]


def invoke(*args):
    return CliRunner().invoke(cli, [*SMALL, *args], catch_exceptions=False)


def test_prints_the_selftest_lines_for_each_policy():
    r = invoke("-s", "anonymous_hugetlb_2mb", "-e")
    assert r.exit_code == 0, r.output
    out = r.output
    for line in ("Test iterations: 2", "Random seed: 1"):
        assert line in out
    sec = r"\d+\.\d{9}s"
    for pat in (rf"Populate memory time: {sec}", rf"Enabling dirty logging time: {sec}",
                rf"Iteration 2 dirty memory time: {sec}", rf"Iteration 1 get dirty log time: {sec}",
                rf"Iteration 2 clear dirty log time: {sec}", rf"Disabling dirty logging time: {sec}",
                rf"Get dirty log over 2 iterations took {sec}\. \(Avg {sec}/iteration\)",
                rf"Clear dirty log over 2 iterations took {sec}\. \(Avg {sec}/iteration\)"):
        assert len(re.findall(pat, out)) == 2, pat          # legacy and series
    assert "model: legacy" in out and "model: series" in out


def test_no_manual_protect_prints_no_clear_lines():
    r = invoke("-g", "--policy", "series")
    assert r.exit_code == 0
    assert "clear dirty log" not in r.output.lower()


def test_json_has_phases_and_counters():
    r = invoke("--json", "--policy", "legacy", "-s", "anonymous_hugetlb_2mb", "-e")
    data = json.loads(r.output)
    (run,) = data["runs"]
    assert run["policy"] == "legacy" and run["backend"] == "model"
    disable = next(p for p in run["phases"] if p["name"] == "disable")
    assert disable["summary"]["set_dirty"] == 2 * 8 * 256
    assert disable["summary"]["tlb_flush"] == 8


@pytest.mark.parametrize("args,msg", [(["-i", "1"], "-i"), (["-b", "lots"], "size"), (["-x", "3"], "memslot(s)")])
def test_bad_input_is_a_message_not_a_traceback(args, msg):
    r = invoke(*args)
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


def test_real_backend_refuses_more_than_1_gib_or_reports_why():
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "2G", "--backend", "kvm"])
    assert r.exit_code == 2
    assert "kvmsim bench dirty-log:" in r.output


def test_plot_without_matplotlib_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # "import matplotlib" raises ImportError
    r = invoke("--policy", "series", "--plot", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "pip install" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.png").exists()


def test_several_sizes_run_each_and_print_the_scaling_table():
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "16M,4M", "--no-isolate", "--policy", "legacy"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("Populate memory time:") == 2
    assert "model: legacy, -b 4M" in r.output and "model: legacy, -b 16M" in r.output
    assert "scaling over sizes" in r.output


def test_several_sizes_in_json_and_counts_scale_with_size():
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M,16M", "--no-isolate", "--policy", "series",
                                 "--json"], catch_exceptions=False)
    runs = json.loads(r.output)["runs"]
    assert [run["options"]["vcpu_memory"] for run in runs] == [4 << 20, 16 << 20]
    faults = [next(p for p in run["phases"] if p["name"] == "populate")["summary"]["page_fault"] for run in runs]
    assert faults == [1024, 4096]


@pytest.mark.parametrize("sizes,msg", [("4M,4M", "twice"), ("4M,,8M", "size")])
def test_bad_size_lists_are_messages(sizes, msg):
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", sizes, "--no-isolate"])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_plot_over_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sizes.png"
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M,8M", "--no-isolate", "--plot", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_one_size(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "one.png"
    r = invoke("--plot", str(out))
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


# ---- checked before the first run ---------------------------------------------------------------------

@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if any run starts: every refusal below must come before anything is allocated."""
    from kvmsim.bench import dirty_log_perf, real

    def boom(*a, **k):
        raise AssertionError("a run started")
    for mod, name in ((dirty_log_perf, "run_model"), (dirty_log_perf, "run_model_isolated"), (real, "run_real")):
        monkeypatch.setattr(mod, name, boom)


def test_a_run_that_cannot_fit_is_refused_with_the_size_it_needs(monkeypatch, no_run):
    from kvmsim.bench import dirty_log_perf as dlp
    monkeypatch.setattr(dlp, "mem_available", lambda: 1 << 30)
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "64G", "-v", "2", "--policy", "series"])
    assert r.exit_code == 2, r.output
    need = (128 << 30 >> 12) * dlp.BYTES_PER_GUEST_PAGE + 2 * dlp.BASE_BYTES
    assert f"needs about {need / 2**30:,.2f} GiB" in r.output and "MemAvailable is 1.00 GiB" in r.output
    assert "Traceback" not in r.output


def test_estimate_is_the_per_page_footprint_times_pages():
    from kvmsim.bench import dirty_log_perf as dlp
    o = Options(vcpu_memory=1 << 30, vcpus=3)
    assert dlp.estimate_bytes(o) == 3 * 262144 * dlp.BYTES_PER_GUEST_PAGE + dlp.BASE_BYTES
    dlp.check_memory(dlp.estimate_bytes(o), "x", available=dlp.estimate_bytes(o))      # exactly fits
    with pytest.raises(UsageError, match="needs about"):
        dlp.check_memory(dlp.estimate_bytes(o), "x", available=dlp.estimate_bytes(o) - 1)


@pytest.mark.parametrize("args,msg", [
    (["-v", "100000"], "'-v': 100000 is not in the range 1<=x<=4096"),
    (["-v", "0"], "'-v'"), (["-r", "0"], "'-r'"), (["-r", "-5"], "'-r'"), (["-r", "x"], "'-r'"),
    (["-i", "1"], "-i"), (["-w", "101"], "'-w'"), (["-b", "0"], "-b"), (["-x", "0"], "'-x'"),
    (["--plot", "/nonexistent-dir/x.png"], "does not exist"),
    (["--plot", "PLOTDIR/x.xyz"], "format 'xyz' is not supported"),
    (["--plot", "PLOTDIR/noext"], "name the format with an extension"),
    (["--plot", "PLOTDIR"], "is a directory"),
])
def test_bad_options_exit_2_before_any_run(args, msg, tmp_path, no_run):
    if any("PLOTDIR" in a for a in args):
        pytest.importorskip("matplotlib")
    args = [a.replace("PLOTDIR", str(tmp_path)) for a in args]
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M", *args])
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output


def test_progress_reports_every_phase_on_stderr():
    r = CliRunner().invoke(cli, [*SMALL, "--policy", "series", "--progress", "--json"], catch_exceptions=False)
    assert r.exit_code == 0
    json.loads(r.stdout)                                       # stdout is still pure JSON
    err = r.stderr.splitlines()
    for label in ("Populate memory", "Enabling dirty logging", "Iteration 2 clear dirty log",
                  "Disabling dirty logging"):
        assert any(line.startswith(f"model series -b 8M: {label} ") and line.endswith(" s") for line in err), label
    assert err[-1].startswith("model series -b 8M: done in")


def test_progress_is_off_when_not_a_terminal_and_from_the_worker_when_isolated():
    r = CliRunner().invoke(cli, [*SMALL, "--policy", "series"], catch_exceptions=False)
    assert r.exit_code == 0 and "done in" not in r.stderr
    r = CliRunner().invoke(cli, ["bench", "dirty-log", "-b", "4M", "--policy", "legacy", "--progress", "--json"],
                           catch_exceptions=False)                     # isolated: phases come over the pipe
    assert r.exit_code == 0
    assert "model legacy -b 4M: Iteration 1 dirty memory" in r.stderr


def test_tables_are_whole_when_piped():
    r = invoke("--policy", "series")
    table = [line for line in r.output.splitlines() if line.startswith("│populate")]
    assert table and all("…" not in line for line in table)
    assert "fast PF" in r.output
