"""The CLI through click's CliRunner: output, JSON shape (checked against a hand-written schema), exit codes."""

import json

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.scenarios import library_names

# ---- the JSON schema of one run, checked by hand (no jsonschema dependency) -----------------------------

INT_OR_NONE = (int, type(None))
STR_OR_NONE = (str, type(None))
RUN_SCHEMA = {
    "scenario": str,
    "policy": ("legacy", "series", "pre-5.13", "series-rc1", "series-only", "current"),
    "verdict": ("clean", "violations", "error"),
    "violations": [{"invariant": str, "step": INT_OR_NONE, "pfn": INT_OR_NONE, "gfn": INT_OR_NONE, "detail": str}],
    "steps": [{"op": str, "result": str, "errno": STR_OR_NONE, "value": (int, str, type(None))}],
    "counters": {str: int},
    "expected_match": bool,
}
OPTIONAL = {"violations_by_invariant": {str: int}, "mismatches": [str], "violations_truncated": bool}


def check(value, schema, path="$"):
    """Raise AssertionError with a JSON path if ``value`` does not have ``schema``'s shape."""
    if isinstance(schema, tuple) and all(isinstance(s, str) for s in schema):
        assert value in schema, f"{path}: {value!r} not one of {schema}"
    elif isinstance(schema, (type, tuple)):
        assert isinstance(value, schema) and not (isinstance(value, bool) and schema in (int, INT_OR_NONE)), \
            f"{path}: {value!r} is not {schema}"
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{path}: not a list"
        for i, v in enumerate(value):
            check(v, schema[0], f"{path}[{i}]")
    elif isinstance(schema, dict) and set(schema) == {str}:
        assert isinstance(value, dict), f"{path}: not an object"
        for k, v in value.items():
            assert isinstance(k, str), f"{path}: key {k!r}"
            check(v, schema[str], f"{path}.{k}")
    else:
        assert isinstance(value, dict), f"{path}: not an object"
        for k, sub in schema.items():
            if path == "$" and k in OPTIONAL:
                continue
            assert k in value, f"{path}: missing {k!r}"
            check(value[k], sub, f"{path}.{k}")
        if path == "$":
            for k, v in value.items():
                if k not in RUN_SCHEMA:
                    assert k in OPTIONAL, f"{path}: unexpected key {k!r}"
                    check(v, OPTIONAL[k], f"{path}.{k}")


def test_schema_checker_rejects_wrong_shapes():
    good = {"scenario": "s", "policy": "series", "verdict": "clean", "violations": [], "steps": [],
            "counters": {}, "expected_match": True}
    check(good, RUN_SCHEMA)
    for bad in ({**good, "verdict": "fine"}, {**good, "expected_match": 1}, {**good, "counters": {"a": "1"}},
                {k: v for k, v in good.items() if k != "steps"}, {**good, "extra": 1},
                {**good, "steps": [{"op": "read", "result": "ok", "errno": 14, "value": None}]}):
        with pytest.raises(AssertionError):
            check(bad, RUN_SCHEMA)


@pytest.fixture
def runner():
    return CliRunner()


def test_list_names_every_bundled_scenario(runner):
    r = runner.invoke(cli, ["list"], terminal_width=200)
    assert r.exit_code == 0
    for name in library_names():
        assert name in r.output


def test_show(runner):
    r = runner.invoke(cli, ["show", "cve-2021-22543"], terminal_width=200)
    assert r.exit_code == 0
    assert "CVE-2021-22543" in r.output and "pre-5.13" in r.output


def test_run_json_both_policies_matches_schema(runner):
    r = runner.invoke(cli, ["run", "ttm-noncompound-pfnmap", "--policy", "both", "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)
    assert [x["policy"] for x in runs] == ["legacy", "series"]
    for x in runs:
        check(x, RUN_SCHEMA)
    legacy, series = runs
    assert legacy["verdict"] == "violations" and {v["invariant"] for v in legacy["violations"]} == {"INV-1", "INV-3"}
    assert legacy["steps"][0]["errno"] == "EFAULT" and legacy["steps"][0]["result"] == "ok,efault,efault,efault"
    assert series["verdict"] == "clean" and series["counters"].get("kvm_get", 0) == 0


def test_run_single_policy_json_is_one_object(runner):
    r = runner.invoke(cli, ["run", "cve-2021-22543", "--policy", "pre-5.13", "--json"])
    assert r.exit_code == 0
    x = json.loads(r.stdout)
    check(x, RUN_SCHEMA)
    assert x["policy"] == "pre-5.13" and x["expected_match"] is True


def test_run_trace_shows_references_and_sptes(runner):
    r = runner.invoke(cli, ["run", "ttm-noncompound-pfnmap", "--policy", "legacy", "--trace"], terminal_width=200)
    assert r.exit_code == 0
    assert "get pfn 0x" in r.output and "spte_set" in r.output and "get_unless_zero_failed" in r.output
    assert "INV-1" in r.output


def test_compare_json_lists_every_run_and_exits_0(runner):
    r = runner.invoke(cli, ["compare", "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    runs = json.loads(r.stdout)
    for x in runs:
        check(x, RUN_SCHEMA)
        assert x["expected_match"], (x["scenario"], x["policy"], x.get("mismatches"))
    seen = {(x["scenario"], x["policy"]) for x in runs}
    assert ("cve-2021-22543", "pre-5.13") in seen and ("ttm-noncompound-pfnmap", "series") in seen


MISMATCHING = """\
name = "wrong-claim"
[[vma]]
name = "ram"
kind = "anon"
size = "4K"
[[memslot]]
id = 0
gpa = 0
size = "4K"
vma = "ram"
[[step]]
op = "write"
gpa = 0
expect = { exit = "efault" }
[expect.series]
verdict = "violations"
"""


def test_mismatch_exits_1(runner, tmp_path):
    p = tmp_path / "wrong.toml"
    p.write_text(MISMATCHING)
    r = runner.invoke(cli, ["run", str(p), "--policy", "series"], terminal_width=200)
    assert r.exit_code == 1
    assert "mismatch" in r.output and "expected 'efault'" in r.output
    r = runner.invoke(cli, ["run", str(p), "--policy", "series", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["expected_match"] is False


@pytest.mark.parametrize("text,where", [
    ('name = "x"\n[vm\n', "bad.toml:2:"),
    ('name = "x"\n[[vma]]\nname = "a"\nkind = "anon"\nsize = "4K"\nshape = 1\n', "bad.toml:6:"),
])
def test_bad_input_exits_2_with_file_line_and_no_traceback(runner, tmp_path, text, where):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    for cmd in (["run", str(p)], ["show", str(p)]):
        r = runner.invoke(cli, cmd)
        assert r.exit_code == 2
        assert where in r.output
        assert "Traceback" not in r.output
        assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)


def test_unknown_scenario_exits_2(runner):
    r = runner.invoke(cli, ["run", "no-such-scenario"])
    assert r.exit_code == 2 and "no bundled scenario" in r.output


def test_other_modules_can_register_commands():
    import kvmsim.cli as mod
    assert callable(mod.cli.command)
    assert {"list", "show", "run", "compare"} <= set(mod.cli.commands)
