"""Scenario files: errors with file:line:key, the builder, and a Hypothesis fuzz of the loader."""

import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmsim.errors import ScenarioError
from kvmsim.scenarios import library_names, library_path, load_scenario
from kvmsim.scenarios.loader import loads, scenario_from_dict
from kvmsim.scenarios.runner import run
from kvmsim.scenarios.spec import Scenario

GOOD = """\
name = "demo"
description = "anon memory, one write"

[[vma]]
name = "ram"
kind = "anon"
size = "16K"

[vm]
policy = "both"

[[memslot]]
id = 0
gpa = 0
size = "16K"
vma = "ram"

[[step]]
op = "write"
gpa = 0x1000
value = 7
expect = { exit = "ok" }

[[step]]
op = "read"
gpa = 0x1000
expect = { value = 7 }

[expect.series]
verdict = "clean"
"""


def test_good_file_runs_and_matches():
    sc = loads(GOOD, "demo.toml")
    assert sc.policies == ("legacy", "series")
    rr = run(sc, "series")
    assert rr.expected_match and rr.verdict == "clean"
    assert [s.res.result for s in rr.steps] == ["ok", "ok"]


@pytest.mark.parametrize("old,new,marker,key,words", [
    ('gpa = 0x1000\nvalue = 7', 'gpa = "12Q"\nvalue = 7', 'gpa = "12Q"', "step#1.gpa", "size such as 4K"),
    ('kind = "anon"', 'kind = "anonymous"', 'kind = "anonymous"', "vma#1.kind", "expected one of"),
    ('op = "read"', 'op = "read"\ncolour = 3', "colour = 3", "step#2.colour", "unknown key 'colour'"),
    ('policy = "both"', 'policy = "newest"', 'policy = "newest"', "vm.policy", "expected a policy"),
    ('vma = "ram"', 'vma = "rom"', 'vma = "rom"', "memslot#1.vma", "no [[vma]] named 'rom'"),
    ('verdict = "clean"', 'verdict = "fine"', 'verdict = "fine"', "expect.series.verdict", "expected one of"),
    ('op = "write"', 'op = "scribble"', 'op = "scribble"', "step#1.op", "unknown op"),
])
def test_errors_name_file_line_key(old, new, marker, key, words):
    text = GOOD.replace(old, new, 1)
    line = text[:text.index(marker)].count("\n") + 1
    with pytest.raises(ScenarioError) as e:
        loads(text, "demo.toml")
    err = e.value
    assert err.file == "demo.toml"
    assert err.key == key
    assert words in err.message
    assert err.line == line, str(err)
    assert str(err).startswith(f"demo.toml:{line}: ")


def test_toml_syntax_error_has_line():
    with pytest.raises(ScenarioError) as e:
        loads('name = "x"\n[vm\n', "x.toml")
    assert e.value.line == 2


def test_missing_required_key():
    with pytest.raises(ScenarioError, match="missing required key 'size'"):
        loads('name = "x"\n[[vma]]\nname = "a"\nkind = "anon"\n', "x.toml")


def test_interleave_order_must_name_threads():
    text = GOOD + '\n[[step]]\nop = "interleave"\norder = ["a", "z"]\nthreads.a = { op = "fault", gpa = 0 }\n'
    with pytest.raises(ScenarioError, match="names 'z'"):
        loads(text, "x.toml")


def test_builder_produces_the_same_scenario_as_the_file():
    built = (Scenario.builder("demo", description="anon memory, one write")
             .vma("ram", kind="anon", size="16K")
             .vm(policy="both")
             .memslot(id=0, gpa=0, size="16K", vma="ram")
             .step("write", gpa=0x1000, value=7, expect={"exit": "ok"})
             .step("read", gpa=0x1000, expect={"value": 7})
             .expect("series", verdict="clean")
             .build())
    loaded = loads(GOOD, "<builder>")
    strip = lambda sc: [(s.op, s.args, s.expect) for s in sc.steps]
    assert strip(built) == strip(loaded)
    assert (built.vmas[0].name, built.vmas[0].size, built.vm, built.expect["series"].verdict) == \
        (loaded.vmas[0].name, loaded.vmas[0].size, loaded.vm, loaded.expect["series"].verdict)
    assert run(built, "series").expected_match


def test_builder_validates():
    with pytest.raises(ScenarioError, match="unknown key"):
        Scenario.builder("x").vma("ram", kind="anon", size="4K", colour=1).build()


@pytest.mark.parametrize("name", library_names())
def test_library_files_round_trip_through_dict(name):
    text = library_path(name).read_text()
    a = loads(text, name)
    b = scenario_from_dict(tomllib.loads(text), file=name)
    assert [(s.op, s.args) for s in a.steps] == [(s.op, s.args) for s in b.steps]
    assert load_scenario(name).name == name


# ---- fuzz --------------------------------------------------------------------------------------------

_scalar = st.one_of(st.integers(-2**40, 2**40), st.integers(0, 64), st.booleans(), st.text(max_size=8),
                    st.sampled_from(["4K", "2M", "1G", "anon", "pfnmap", "both", "legacy", "ok", "INV-1",
                                     "write", "read", "fault", "munmap", "interleave", "ram"]))
_keys = st.sampled_from(["name", "op", "gpa", "size", "kind", "vma", "id", "policy", "count", "value", "expect",
                         "exit", "violations", "threads", "order", "driver", "pfn_class", "flags", "verdict",
                         "offset", "prot", "x"])
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)
_doc = st.fixed_dictionaries({"name": st.text(min_size=1, max_size=5)}, optional={
    "vma": st.lists(st.fixed_dictionaries({"name": st.just("ram"), "kind": st.sampled_from(["anon", "memfd", "x"]),
                                           "size": st.sampled_from(["16K", "4K", 0, "1Q"])}), max_size=2),
    "memslot": st.lists(st.dictionaries(_keys, _value, max_size=5), max_size=2),
    "vm": st.dictionaries(_keys, _value, max_size=3),
    "step": st.lists(st.dictionaries(_keys, _value, max_size=5), max_size=4),
    "expect": st.dictionaries(st.sampled_from(["legacy", "series", "nope"]), _value, max_size=2),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_doc)
def test_fuzz_structured_documents_load_and_run_or_fail_cleanly(doc):
    try:
        sc = scenario_from_dict(doc, file="fuzz.toml")
    except ScenarioError:
        return
    for p in sc.policies:
        run(sc, p)                      # a result, whatever the steps do: never another exception


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_text_is_a_result_or_a_scenario_error(text):
    try:
        loads(text, "fuzz.toml")
    except ScenarioError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.text(max_size=6))
def test_fuzz_mutated_good_file(pos, junk):
    text = GOOD[:pos] + junk + GOOD[pos:]
    try:
        sc = loads(text, "fuzz.toml")
    except ScenarioError:
        return
    for p in sc.policies:
        run(sc, p)


def test_readme_scenario_example_loads_and_matches():
    import re
    from pathlib import Path
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```toml\n(.*?)```", readme.read_text(), re.DOTALL)
    assert blocks, "README has a scenario example"
    sc = loads(blocks[0], "README.md")
    for p in sc.policies:
        rr = run(sc, p)
        assert rr.expected_match, rr.mismatches
