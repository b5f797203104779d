"""Hypothesis mutates the bundled scenario files: every input is a result or a ScenarioError (exit 2).

Three levels: the parsed document (drop a key, give it a random value, change its type, repeat an
array item), the TOML text (drop, repeat or rewrite a line), and the command line (``kvmsim run`` on
a mutated file exits 0, 1 or 2 with no traceback).  ``KVMSIM_FUZZ_EXAMPLES`` raises the budget.
"""

import copy
import os
import tomllib

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmsim.cli import cli
from kvmsim.errors import ScenarioError
from kvmsim.scenarios import library_names, library_path
from kvmsim.scenarios.loader import loads, scenario_from_dict
from kvmsim.scenarios.runner import RunResult, run

BUDGET = int(os.environ.get("KVMSIM_FUZZ_EXAMPLES", "120"))
TEXTS = {n: library_path(n).read_text() for n in library_names()}
DOCS = {n: tomllib.loads(t) for n, t in TEXTS.items()}
FUZZ = settings(max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_values = st.one_of(
    st.integers(-5, 70), st.sampled_from([0, 1, 4096, 0x1000_0000, 2**40, -1, 2**64]), st.booleans(),
    st.sampled_from(["4K", "2M", "1G", "0", "-4K", "1Q", "", "x", "ram", "gpu", "vcpu", "host", "ok", "efault",
                     "EFAULT", "INV-1", "legacy", "series", "both", "anon", "pfnmap", "hugetlb", "memfd",
                     "a[/]b", "\x1b[31m", "[bold]"]),
    st.just([]), st.just({}), st.lists(st.integers(-1, 3), max_size=2),
    st.fixed_dictionaries({"min": st.integers(-1, 3), "max": st.integers(-1, 3)}),
)


def _paths(d, pre=()):
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        out.append(pre + (k,))
        out += _paths(v, pre + (k,))
    return out


def _retype(v):
    if isinstance(v, str):
        return int(v) if v.isdigit() else [v]
    return str(v)


@st.composite
def mutated_docs(draw):
    name = draw(st.sampled_from(sorted(DOCS)))
    doc = copy.deepcopy(DOCS[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        action = draw(st.sampled_from(["drop", "value", "retype", "repeat", "add"]))
        if action == "drop":
            del parent[key]
        elif action == "value":
            parent[key] = draw(_values)
        elif action == "retype":
            parent[key] = _retype(parent[key])
        elif action == "repeat" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["colour", "vcpu", "name", "size", "order", "expect"]))] = draw(_values)
    return name, doc


def _check_runs(sc):
    for p in sc.policies:
        rr = run(sc, p)                      # a model error is a result (verdict error), never an exception
        assert isinstance(rr, RunResult) and rr.verdict in ("clean", "violations", "error")


@FUZZ
@given(mutated_docs())
def test_mutated_bundled_documents_load_and_run_or_fail_cleanly(case):
    name, doc = case
    try:
        sc = scenario_from_dict(doc, file=f"{name}.toml")
    except ScenarioError as e:
        assert e.file == f"{name}.toml" and e.message
        return
    _check_runs(sc)


@st.composite
def mutated_texts(draw):
    name = draw(st.sampled_from(sorted(TEXTS)))
    lines = TEXTS[name].splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "repeat", "value"]))
        if action == "drop":
            del lines[i]
        elif action == "repeat":
            lines.insert(i, lines[i])
        elif "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            val = draw(st.sampled_from(["0", "-1", '"x"', "[]", "{}", "true", '"4K"', "{ min = 2, max = 1 }",
                                        '"a[/]"', "99", '"EFAULT"', '["INV-1"]']))
            lines[i] = f"{key}= {val}"
        if not lines:
            break
    return name, "\n".join(lines) + "\n"


@FUZZ
@given(mutated_texts())
def test_mutated_bundled_texts_load_and_run_or_fail_cleanly(case):
    name, text = case
    try:
        sc = loads(text, f"{name}.toml")
    except ScenarioError as e:
        assert str(e).startswith(f"{name}.toml")
        return
    _check_runs(sc)


@settings(max_examples=max(10, BUDGET // 6), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                      HealthCheck.function_scoped_fixture])
@given(mutated_texts())
def test_mutated_files_through_the_cli_exit_0_1_or_2(tmp_path, case):
    name, text = case
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    res = CliRunner().invoke(cli, ["run", str(path)])
    assert res.exit_code in (0, 1, 2), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if res.exit_code == 2:
        assert f"kvmsim: error: {path}" in res.output
