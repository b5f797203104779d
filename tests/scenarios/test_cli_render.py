"""What the CLI prints: scenario text verbatim (never rich markup), control characters escaped,
tables uncut when piped, bad files exit 2."""

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli, safe
from kvmsim.scenarios import library, load_scenario
from kvmsim.scenarios.runner import KEY_COUNTERS, run

MARKUP = """\
name = "a [/] b [bold]x[/bold] :thumbs_up: \\u001b[31mred"
description = "the slot's [as_id] and [expect.legacy] are text \\u0007 \\u202e"
[[vma]]
name = "ram[/]"
kind = "anon"
size = "16K"
[[memslot]]
id = 0
gpa = 0
size = "16K"
vma = "ram[/]"
[[step]]
op = "interleave"
order = ["a", "b", "a"]
threads.a = { op = "fault", gpa = 0x1000, write = true }
threads.b = { op = "munmap", vma = "ram[/]" }
expect.series = { result = "a:retry b:ok", violations = [] }
[expect.series]
verdict = "clean"
counters = { "put_page:kvm_faultin_pfn" = 1 }
"""


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def markup_file(tmp_path):
    p = tmp_path / "markup.toml"
    p.write_text(MARKUP)
    return p


def test_the_markup_scenario_matches_under_series(markup_file):
    sc = load_scenario(str(markup_file))
    rr = run(sc, "series")
    assert rr.expected_match, rr.mismatches


def test_show_keeps_bracketed_text_verbatim(runner, markup_file):
    r = runner.invoke(cli, ["show", str(markup_file)])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "a [/] b [bold]x[/bold] :thumbs_up: \\x1b[31mred" in out
    assert "the slot's [as_id] and [expect.legacy] are text \\x07 \\u202e" in out
    assert "interleave threads=a,b order=[a b a]" in out
    assert "thread b: munmap vma=ram[/]" in out
    assert 'expect.series: result = "a:retry b:ok", violations = []' in out
    assert '[expect.series] verdict = "clean", counters = { "put_page:kvm_faultin_pfn" = 1 }' in out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out


def test_show_of_a_bundled_scenario_keeps_policy_labels(runner):
    r = runner.invoke(cli, ["show", "cve-2021-22543"])
    assert r.exit_code == 0
    assert '[expect.pre-5.13] verdict = "violations", violations = ["INV-1", "INV-3", "INV-5"]' in r.output
    assert "[expect.legacy]" in r.output and "[expect.series]" in r.output
    assert 'expect.legacy: exit = "efault", errno = "EFAULT", violations = []' in r.output


def test_run_prints_markup_names_and_escapes_controls(runner, markup_file):
    r = runner.invoke(cli, ["run", str(markup_file), "--policy", "series", "--trace"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("a [/] b [bold]x[/bold] :thumbs_up: \\x1b[31mred under series: clean")
    assert "\x1b" not in r.output


def test_compare_piped_is_not_truncated(runner):
    r = runner.invoke(cli, ["compare"])
    assert r.exit_code == 0, r.output[-2000:]
    assert "…" not in r.output
    assert max(len(line) for line in r.output.splitlines()) > 80
    for sc in library():
        assert sc.name in r.output
    # every key counter of every run is printed whole
    rr = run(load_scenario("access-tracking-after-zap"), "legacy")
    want = " ".join(f"{k}={rr.counters[k]}" for k in KEY_COUNTERS if rr.counters.get(k))
    assert want in r.output


def test_list_piped_prints_whole_descriptions(runner):
    r = runner.invoke(cli, ["list"])
    assert r.exit_code == 0
    for sc in library():
        assert " ".join(sc.description.split()) in r.output


def test_columns_still_limits_width(runner, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    r = runner.invoke(cli, ["compare"])
    assert r.exit_code == 0
    assert max(len(line) for line in r.output.splitlines()) == 100


def test_error_text_escapes_control_characters(runner, tmp_path):
    p = tmp_path / "ctl.toml"
    p.write_text('name = "x"\n"\\u001b[2J" = 1\n')
    r = runner.invoke(cli, ["run", str(p)])
    assert r.exit_code == 2
    assert f"{p}: [\\x1b[2J] unknown key '\\x1b[2J'" in r.output
    assert "\x1b" not in r.output


@pytest.mark.parametrize("text,words", [
    ('name = "x"\nrequires = ["arm_mmu"]\n', ":2: [requires] unknown requirement 'arm_mmu'"),
    ('name = "x"\n[[vma]]\nname = "r"\nkind = "anon"\nsize = "4K"\npage_size = 0\n',
     ":6: [vma#1.page_size] expected 4K, 2M or 1G"),
])
def test_refused_files_exit_2_through_the_cli(runner, tmp_path, text, words):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    for cmd in ("run", "show"):
        r = runner.invoke(cli, [cmd, str(p)])
        assert r.exit_code == 2, r.output
        assert f"kvmsim: error: {p}{words}" in r.output


def test_dev_zero_and_directories_exit_2(runner, tmp_path):
    for path, words in (("/dev/zero", "larger than"), (str(tmp_path), "is a directory")):
        r = runner.invoke(cli, ["run", path])
        assert r.exit_code == 2 and words in r.output, r.output


def test_help_states_the_exit_contract(runner):
    r = runner.invoke(cli, ["--help"])
    assert r.exit_code == 0
    assert "0  every run matched" in r.output and "1  a mismatch" in r.output and "2  bad input" in r.output
    assert 'verdict = "error"' in r.output


def test_safe_escapes_every_control_character():
    assert safe("a\x00b\x1b\x7f\x9b\u2028\u202e\u2069c") == "a\\x00b\\x1b\\x7f\\x9b\\u2028\\u202e\\u2069c"
    assert safe("plain [x] é ✓") == "plain [x] é ✓"
