"""The loader refuses what is wrong at load time: each rule, with file:line and the key in the error.

Every case edits one line of a good file and asserts the error names that line and key; the clean
file loads (and matches) first, so a rule that refused everything would fail here too.
"""

import re

import pytest

from kvmsim.errors import ScenarioError
from kvmsim.scenarios import library_path, load_scenario
from kvmsim.scenarios.loader import MAX_FILE_BYTES, load, loads
from kvmsim.scenarios.runner import run
from kvmsim.scenarios.validate import counter_problem

GOOD = """\
name = "refs"
description = "every kind of name a step can use"

[[driver]]
name = "gpu"
pfn_class = "driver_refcounted"

[[vma]]
name = "ram"
kind = "memfd"
size = "16K"

[[vma]]
name = "anon"
kind = "anon"
size = "16K"

[[vma]]
name = "bar"
kind = "pfnmap"
size = "8K"
driver = "gpu"

[vm]
policy = "both"
vcpus = 2

[[memslot]]
id = 0
gpa = 0
size = "16K"
vma = "ram"

[[step]]
op = "write"
gpa = 0x1000
vcpu = 1
expect.exit = "ok"
expect.errno = "0"
expect.counters = { spte_write = 1, "get_page:kvm_faultin_pfn" = { min = 0, max = 1 } }
expect.series = { violations = [] }

[[step]]
op = "vcpu_map"
gpa = 0x2000
name = "m"

[[step]]
op = "map_access"
name = "m"
write = true

[[step]]
op = "vcpu_unmap"
name = "m"

[[step]]
op = "gfn_to_page"
gpa = 0x3000
name = "p"

[[step]]
op = "release_page"
name = "p"

[[step]]
op = "pfncache_activate"
gpa = 0x1000
name = "gpc"

[[step]]
op = "pfncache_check"
name = "gpc"

[[step]]
op = "truncate"
vma = "ram"
size = "8K"

[[step]]
op = "interleave"
order = ["vcpu", "host"]
threads.vcpu = { op = "fault", gpa = 0, write = true, vcpu = 0 }
threads.host = { op = "munmap", vma = "anon" }

[[step]]
op = "driver_teardown"
driver = "gpu"

[expect.legacy]
verdict = "violations"
violations = { "INV-3" = 2 }     # kvm_release_pfn_clean() marks accessed after the unlock (patch 55/56)

[expect.series]
verdict = "clean"
violations = []
counters = { kvm_get = { min = 1 } }
"""


def test_good_file_loads_and_runs():
    sc = loads(GOOD, "refs.toml")
    for p in sc.policies:
        rr = run(sc, p)
        assert rr.error is None and rr.expected_match, rr.mismatches


def _err(text: str, marker: str) -> tuple[ScenarioError, int]:
    line = text[:text.index(marker)].count("\n") + 1
    with pytest.raises(ScenarioError) as e:
        loads(text, "refs.toml")
    return e.value, line


CASES = [
    # (what, old, new, marker, key, words)
    ("counter typo, step", "spte_write = 1", "spte_wrtie = 1", "spte_wrtie", "step#1.expect.counters",
     "unknown counter 'spte_wrtie'; did you mean spte_write"),
    ("counter typo, final", "counters = { kvm_get = { min = 1 } }", "counters = { kvm_gets = 0 }", "kvm_gets",
     "expect.series.counters", "unknown counter 'kvm_gets'"),
    ("counter family without a function", '"get_page:kvm_faultin_pfn"', '"get_page:"', '"get_page:"',
     "step#1.expect.counters", "needs a function name"),
    ("unknown requires", 'description = "every', 'requires = ["arm_mmu"]\ndescription = "every', "requires",
     "requires", "unknown requirement 'arm_mmu'"),
    ("vcpu beyond the VM", "vcpu = 1\n", "vcpu = 5\n", "vcpu = 5", "step#1.vcpu", "no vCPU 5: the VM has 2"),
    ("negative vcpu", "vcpu = 1\n", "vcpu = -1\n", "vcpu = -1", "step#1.vcpu", "no vCPU -1"),
    ("vcpu in a thread", "write = true, vcpu = 0", "write = true, vcpu = 2", "write = true, vcpu = 2",
     "step#10.threads.vcpu.vcpu", "no vCPU 2"),
    ("undefined VMA", 'op = "truncate"\nvma = "ram"', 'op = "truncate"\nvma = "rom"', 'vma = "rom"', "step#9.vma",
     "no [[vma]] named 'rom'"),
    ("undefined VMA in a thread", 'vma = "anon" }', 'vma = "nope" }', 'vma = "nope"', "step#10.threads.host.vma",
     "no [[vma]] named 'nope'"),
    ("VMA without a mapping", 'op = "truncate"\nvma = "ram"', 'op = "truncate"\nvma = "anon"',
     'vma = "anon"\nsize = "8K"', "step#9.vma", "truncate needs a VMA with a file mapping"),
    ("undefined driver", 'driver = "gpu"\n\n[expect', 'driver = "gpo"\n\n[expect', 'driver = "gpo"',
     "step#11.driver", "no [[driver]] named 'gpo'"),
    ("undefined kvm_vcpu_map", 'op = "map_access"\nname = "m"', 'op = "map_access"\nname = "n"', 'name = "n"',
     "step#3.name", "no kvm_vcpu_map named 'n'"),
    ("released page", 'op = "release_page"\nname = "p"', 'op = "release_page"\nname = "p"\n\n[[step]]\n'
     'op = "release_page"\nname = "p"\n#2', 'name = "p"\n#2', "step#7.name", "it was released at step 6"),
    ("undefined pfncache", 'op = "pfncache_check"\nname = "gpc"', 'op = "pfncache_check"\nname = "gpd"',
     'name = "gpd"', "step#8.name", "no pfncache named 'gpd'"),
    ("min > max", "{ min = 0, max = 1 }", "{ min = 3, max = 1 }", "{ min = 3", "step#1.expect.counters",
     "min 3 is greater than max 1"),
    ("negative count", "spte_write = 1", "spte_write = -1", "spte_write = -1", "step#1.expect.counters",
     "cannot be negative"),
    ("negative violation count", '"INV-3" = 2', '"INV-3" = -2', '"INV-3" = -2', "expect.legacy.violations",
     "cannot be negative"),
    ("unknown exit", 'exit = "ok"', 'exit = "okay"', 'exit = "okay"', "step#1.expect.exit",
     "expected a KVM_RUN exit"),
    ("unknown errno", 'errno = "0"', 'errno = "EFAUL"', 'errno = "EFAUL"', "step#1.expect.errno",
     "expected an errno name"),
    ("clean with violations", 'verdict = "clean"\nviolations = []', 'verdict = "clean"\nviolations = ["INV-1"]',
     'verdict = "clean"', "expect.series.verdict", 'verdict = "clean" means no violation'),
    ("violations allowing none", 'verdict = "clean"\nviolations = []', 'verdict = "violations"\nviolations = []',
     'verdict = "violations"\nviolations = []', "expect.series.verdict", "allows none"),
    ("duplicate driver", '[[vma]]\nname = "ram"', '[[driver]]\nname = "gpu"\npfn_class = "normal"\n\n'
     '[[vma]]\nname = "ram"', 'name = "gpu"\npfn_class = "normal"',
     "driver#2.name", "a second [[driver]] named 'gpu'"),
    ("duplicate VMA", 'name = "anon"', 'name = "ram"', 'name = "ram"\nkind = "anon"', "vma#2.name",
     "a second [[vma]] named 'ram'"),
    ("duplicate memslot id", '[[step]]\nop = "write"', '[[memslot]]\nid = 0\ngpa = "1G"\nsize = "8K"\n'
     'vma = "bar"\n\n[[step]]\nop = "write"', 'id = 0\ngpa = "1G"', "memslot#2.id", "a second [[memslot]] with id = 0"),
    ("empty interleave order", 'order = ["vcpu", "host"]', "order = []", "order = []", "step#10.order",
     "expected at least one thread name"),
    ("order naming an unknown thread", 'order = ["vcpu", "host"]', 'order = ["vcpu", "guest"]', "order = [",
     "step#10.order", "names 'guest'"),
    ("page_size 0", 'kind = "anon"\nsize = "16K"', 'kind = "anon"\nsize = "16K"\npage_size = 0', "page_size = 0",
     "vma#2.page_size", "expected 4K, 2M or 1G, got 0x0"),
    ("VMA size not a multiple of its page size", 'kind = "memfd"\nsize = "16K"', 'kind = "hugetlb"\nsize = "16K"\n'
     'page_size = "2M"', 'size = "16K"\npage_size = "2M"', "vma#1.size", "multiple of page_size 0x200000"),
    ("hugetlb with 4K pages", 'kind = "memfd"', 'kind = "hugetlb"', 'kind = "hugetlb"', "vma#1.kind",
     "a hugetlb VMA has 2M or 1G pages"),
    ("2M pages on a memfd", 'kind = "memfd"\nsize = "16K"', 'kind = "memfd"\nsize = "4M"\npage_size = "2M"',
     'page_size = "2M"', "vma#1.page_size", "every other kind 4K"),
    ("negative clear_dirty_log first", 'op = "truncate"', 'op = "clear_dirty_log"\nslot = 0\nfirst = -64\n\n'
     '[[step]]\nop = "truncate"', "first = -64", "step#9.first", "expected 0 .. 0xffffffffffffffff"),
    ("unaligned memslot gpa", "id = 0\ngpa = 0\n", "id = 0\ngpa = 0x800\n", "gpa = 0x800", "memslot#1.gpa",
     "expected a multiple of 4K"),
    ("driver size not page-sized", 'pfn_class = "driver_refcounted"', 'pfn_class = "driver_refcounted"\n'
     "size = 5000", "size = 5000", "driver#1.size", "expected a multiple of 4K"),
    ("step expectation for a policy never run", 'op = "pfncache_check"\nname = "gpc"',
     'op = "pfncache_check"\nname = "gpc"\nexpect."pre-5.13" = { result = "valid" }', 'expect."pre-5.13"',
     "step#8.expect.pre-5.13", "which this scenario never runs"),
]


@pytest.mark.parametrize("what,old,new,marker,key,words", CASES, ids=[c[0] for c in CASES])
def test_rule_is_a_load_error_with_file_line_key(what, old, new, marker, key, words):
    assert GOOD.count(old) == 1, f"{what}: the edit must hit exactly one place"
    text = GOOD.replace(old, new)
    err, line = _err(text, marker)
    assert err.key == key, str(err)
    assert err.line == line, str(err)
    assert str(err).startswith(f"refs.toml:{line}: [{key}] "), str(err)
    assert words in err.message, str(err)


def test_a_released_map_may_be_made_again():
    text = GOOD.replace('op = "vcpu_unmap"\nname = "m"', 'op = "vcpu_unmap"\nname = "m"\n\n[[step]]\n'
                        'op = "vcpu_map"\ngpa = 0\nname = "m"\n\n[[step]]\nop = "map_access"\nname = "m"')
    sc = loads(text, "refs.toml")
    assert [s.op for s in sc.steps][3:6] == ["vcpu_unmap", "vcpu_map", "map_access"]


def test_a_handle_made_by_a_sibling_thread_is_known():
    text = GOOD.replace('threads.host = { op = "munmap", vma = "anon" }',
                        'threads.host = { op = "gfn_to_page", gpa = 0, name = "q" }\n\n[[step]]\n'
                        'op = "release_page"\nname = "q"')
    assert loads(text, "refs.toml").steps[10].op == "release_page"


# ---- step-level violations = [] is live -----------------------------------------------------------------

def test_step_violations_empty_list_is_checked():
    text = library_path("cve-2021-22543").read_text()
    assert run(loads(text, "cve.toml"), "pre-5.13").expected_match
    old = 'expect."pre-5.13" = { exit = "ok", violations = ["INV-1", "INV-3", "INV-5"]'
    assert old in text
    sc = loads(text.replace(old, 'expect."pre-5.13" = { exit = "ok", violations = []'), "cve.toml")
    assert sc.steps[0].expect["pre-5.13"]["violations"] == {}
    rr = run(sc, "pre-5.13")
    assert not rr.expected_match
    assert any(m.startswith("step 1 (write): unexpected INV-1") for m in rr.mismatches), rr.mismatches


def test_library_step_violation_assertions_are_kept():
    live = sum(1 for n in ("access-tracking-after-zap", "arm64-dirty-after-unlock", "cve-2021-22543",
                           "dirty-after-writeback", "driver-refcounted-pfnmap", "fault-vs-invalidate-retry",
                           "mmu-stress-readonly-vma", "slot-delete-drops-references")
               for st in load_scenario(n).steps for e in st.expect.values() if e.get("violations") == {})
    assert live == 11


def test_step_counters_empty_table_is_kept():
    sc = loads(GOOD.replace('op = "vcpu_unmap"\nname = "m"', 'op = "vcpu_unmap"\nname = "m"\n'
                            'expect = { counters = {} }'), "refs.toml")
    assert sc.steps[3].expect["*"] == {"counters": {}}


# ---- counters -------------------------------------------------------------------------------------------

def test_every_counter_the_library_produces_is_known():
    seen = set()
    for name in ("access-tracking-after-zap", "arm64-dirty-after-unlock", "riscv-retry-counts-as-used",
                 "dirty-after-writeback", "slot-delete-drops-references", "vcpu-map-pfnmap",
                 "pfncache-pfnmap-readonly-pte", "hugetlb-1g-disable-dirty-log", "ttm-noncompound-pfnmap"):
        sc = load_scenario(name)
        for p in sc.policies:
            seen |= set(run(sc, p).counters)
    assert {"spte_write", "kvm_get", "page_fault"} <= seen
    assert [n for n in sorted(seen) if counter_problem(n)] == []


def test_every_counter_the_model_source_names_is_known():
    """A ``journal.count("name")`` (or a ``count(f"family:{...}")``) in the model must be a known counter."""
    from pathlib import Path

    import kvmsim
    root = Path(kvmsim.__file__).parent
    fixed, families = set(), set()
    for f in root.rglob("*.py"):
        if "backend" in f.parts or "bench" in f.parts:
            continue
        src = f.read_text()
        fixed |= set(re.findall(r"\b(?:journal|j)\.count\(\s*\"([^\"]+)\"", src))
        families |= set(re.findall(r"\b(?:journal|j)\.count\(\s*f\"([^\"{:]+:)\{", src))
    assert len(fixed) > 30
    assert sorted(n for n in fixed if counter_problem(n)) == []
    assert sorted(f for f in families if counter_problem(f + "x")) == []


# ---- reading files --------------------------------------------------------------------------------------

def test_dev_zero_is_refused_without_reading_it_all():
    with pytest.raises(ScenarioError, match=f"larger than {MAX_FILE_BYTES >> 10} KiB"):
        load("/dev/zero")


def test_directory_is_refused(tmp_path):
    with pytest.raises(ScenarioError, match="is a directory") as e:
        load(tmp_path)
    assert e.value.file == str(tmp_path)


def test_non_utf8_is_refused_with_its_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b'name = "x"\n\ndescription = "\xff"\n')
    with pytest.raises(ScenarioError, match="not UTF-8") as e:
        load(p)
    assert e.value.line == 3


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read scenario file"):
        load(tmp_path / "nope.toml")
