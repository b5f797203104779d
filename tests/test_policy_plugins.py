"""``--policy FILE.py:CLASS`` / ``MODULE:CLASS``: a user's own patch as a policy plugin
(kvmsim.policies.plugin, docs/policies.md "Writing your own policy", docs/examples/)."""

import errno
import json
import pathlib
import textwrap

import pytest
from click.testing import CliRunner

from kvmsim.cli import cli
from kvmsim.errors import ModelError, UsageError
from kvmsim.policies import get_policy, shipped_policies
from kvmsim.policies.plugin import PluginError, check_policy_class, load_plugin
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.runner import run

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "release_after_unlock.py"
SPEC = f"{EXAMPLE}:ReleaseAfterUnlock"


def invoke(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    return r


def plugin(tmp_path, body: str, name: str = "mypatch.py") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


# ---- the worked example -------------------------------------------------------------------------------

def test_the_shipped_policies_pass_the_plugin_checks():
    for name, cls in shipped_policies().items():
        check_policy_class(cls, name)


def test_names_still_resolve_and_an_unknown_name_says_how_to_give_a_plugin():
    assert type(get_policy("series")).__name__ == "SeriesPolicy"
    with pytest.raises(UsageError, match="FILE.py:ClassName|file.py:ClassName"):
        get_policy("no-such-policy")


def test_the_example_breaks_inv3_where_series_does_not():
    name = load_plugin(SPEC)
    assert name == "series-unlocked-release"
    sc = load_scenario("dirty-after-writeback")
    series, mine = run(sc, "series"), run(sc, name)
    assert "INV-3" not in series.by_invariant()
    assert mine.by_invariant() == {"INV-3": 2}
    assert mine.policy == "series-unlocked-release"
    v = [v for v in mine.violations if v.invariant == "INV-3"]
    assert "after dropping mmu_lock" in str(v[0])


def test_run_shows_the_plugins_name_and_its_violations():
    r = invoke("run", "dirty-after-writeback", "--policy", SPEC)
    assert r.exit_code == 0
    assert "dirty-after-writeback under series-unlocked-release: violations INV-3×2" in r.output


def test_run_json_names_the_plugin():
    r = invoke("run", "dirty-after-writeback", "--policy", SPEC, "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["policy"] == "series-unlocked-release" and d["violations_by_invariant"] == {"INV-3": 2}


def test_module_colon_class(tmp_path, monkeypatch):
    plugin(tmp_path, """
        from kvmsim.policies.legacy import LegacyPolicy
        class QuietLegacy(LegacyPolicy):
            def spte_ad_lost(self, kvm, pfn, *, dirty, accessed, caller, gfn=None, n=1):
                return None
    """, "my_quiet_patch.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = invoke("run", "dirty-after-writeback", "--policy", "my_quiet_patch:QuietLegacy")
    assert r.exit_code == 0, r.output
    assert "under QuietLegacy:" in r.output           # no name of its own: the class name


def test_explore_finds_the_race_under_the_plugin_and_not_under_series():
    r = invoke("explore", "fault-vs-truncate", "--arch", "x86", "--policy", SPEC, "--json")
    s = invoke("explore", "fault-vs-truncate", "--arch", "x86", "--policy", "series", "--json")
    assert r.exit_code == 0 and s.exit_code == 0
    mine, series = json.loads(r.output)[0], json.loads(s.output)[0]
    assert mine["policy"] == "series-unlocked-release"
    assert mine["violation"]["invariant"] == "INV-3"
    assert series["violation"] is None and series["complete"]


def test_bench_runs_the_plugin_in_its_worker():
    r = invoke("bench", "dirty-log", "-b", "8M", "--policy", SPEC, "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    runs = json.loads(r.output)["runs"]
    assert [x["policy"] for x in runs] == ["series-unlocked-release"]


def test_compare_runs_the_plugin_beside_each_scenarios_policies():
    r = invoke("compare", "--policy", SPEC)
    assert r.exit_code == 0, r.output[-2000:]
    assert "series-unlocked-release: breaks where the reference policy does not" in r.output
    assert "dirty-after-writeback: INV-3×2 (not under series)" in r.output


# ---- bad plugins: exit 2, the file and the hook named, no traceback -----------------------------------

def test_missing_file(tmp_path):
    r = invoke("run", "dirty-after-writeback", "--policy", f"{tmp_path}/nope.py:X")
    assert r.exit_code == 2
    assert f"{tmp_path}/nope.py: no such file" in r.output


def test_syntax_error_names_file_and_line(tmp_path):
    p = plugin(tmp_path, "from kvmsim.policies.series import SeriesPolicy\n\nclass P(SeriesPolicy)\n    pass\n")
    r = invoke("run", "dirty-after-writeback", "--policy", f"{p}:P")
    assert r.exit_code == 2
    assert f"{p}:3: policy plugin has a syntax error" in r.output


def test_import_error_names_file_and_line(tmp_path):
    p = plugin(tmp_path, "import os\nfrom kvmsim.policies.series import NoSuchPolicy\n")
    r = invoke("run", "dirty-after-writeback", "--policy", f"{p}:P")
    assert r.exit_code == 2
    assert f"{p}:2: importing the policy plugin raised ImportError" in r.output


def test_missing_module():
    r = invoke("explore", "fault-vs-truncate", "--policy", "no_such_module_xyz:P")
    assert r.exit_code == 2
    assert "'no_such_module_xyz': no such module" in r.output


def test_missing_class_lists_the_classes(tmp_path):
    p = plugin(tmp_path, """
        from kvmsim.policies.series import SeriesPolicy
        class Mine(SeriesPolicy):
            name = "mine"
    """)
    r = invoke("run", "dirty-after-writeback", "--policy", f"{p}:Mne")
    assert r.exit_code == 2
    assert "no class 'Mne'" in r.output and "Mine" in r.output


def test_a_class_that_is_not_a_policy_names_the_missing_hooks(tmp_path):
    p = plugin(tmp_path, """
        class Half:
            name = "half"
            mmu_613_other = True
            def fault_release(self, arch):
                return None, None, None
    """)
    with pytest.raises(PluginError) as e:
        load_plugin(f"{p}:Half")
    msg = str(e.value)
    assert "Half is not a policy: missing" in msg
    for hook in ("release_faultin", "spte_ad_lost_bulk", "arch_ops", "vcpu_map_pins"):
        assert hook in msg
    assert "fault_release," not in msg.split("missing")[1]
    r = invoke("bench", "dirty-log", "-b", "8M", "--policy", f"{p}:Half")
    assert r.exit_code == 2 and "is not a policy" in r.output


def test_wrong_signature_names_the_hook_and_the_expected_parameters(tmp_path):
    p = plugin(tmp_path, """
        from kvmsim.policies.series import SeriesPolicy
        class Mine(SeriesPolicy):
            name = "mine-sig"
            def release_faultin(self, kvm, pfn, kfp, unused, dirty):
                return super().release_faultin(kvm, pfn, kfp, unused=unused, dirty=dirty, caller="x")
    """)
    r = invoke("run", "dirty-after-writeback", "--policy", f"{p}:Mine")
    assert r.exit_code == 2
    assert f"{p}:5: policy plugin hook Mine.release_faultin has parameters (kvm, pfn, kfp, unused, dirty)" in r.output
    assert "expects (kvm, pfn, kfp, *, unused, dirty, caller, gfn=None)" in r.output


def test_a_plugin_may_not_take_a_shipped_name(tmp_path):
    p = plugin(tmp_path, """
        from kvmsim.policies.series import SeriesPolicy
        class Mine(SeriesPolicy):
            name = "legacy"
    """)
    r = invoke("run", "dirty-after-writeback", "--policy", f"{p}:Mine")
    assert r.exit_code == 2 and "name 'legacy' is a shipped policy's" in r.output


# ---- a plugin that raises at run time ------------------------------------------------------------------

RAISES = """
    from kvmsim.policies.series import SeriesPolicy

    def release_after_unlock(kvm, mmu, fault):
        return 1 // 0

    class Broken(SeriesPolicy):
        name = "{name}"
        def fault_release(self, arch):
            return None, release_after_unlock, None
"""


def test_a_hook_that_raises_is_the_runs_error_naming_the_hook(tmp_path):
    p = plugin(tmp_path, RAISES.format(name="broken-run"))
    r = invoke("run", "dirty-after-writeback", "--policy", f"{p}:Broken")
    assert r.exit_code == 1                         # a run whose verdict is error: a mismatch, as a model crash
    assert "policy plugin 'broken-run' hook fault_release_unlocked raised ZeroDivisionError" in r.output
    assert f"{p}:5" in r.output


def test_explore_reports_a_raising_hook_as_bad_input(tmp_path):
    p = plugin(tmp_path, RAISES.format(name="broken-explore"))
    r = invoke("explore", "fault-vs-truncate", "--policy", f"{p}:Broken")
    assert r.exit_code == 2
    assert "hook fault_release_unlocked raised ZeroDivisionError" in r.output


def test_a_model_error_from_a_hook_keeps_its_errno_and_names_the_hook(tmp_path):
    p = plugin(tmp_path, """
        import errno
        from kvmsim.errors import ModelError
        from kvmsim.policies.series import SeriesPolicy
        class Refuses(SeriesPolicy):
            name = "refuses"
            def gfn_to_page_write(self, write):
                raise ModelError(errno.EFAULT, "gfn_to_page")
    """)
    pol = get_policy(load_plugin(f"{p}:Refuses"))
    with pytest.raises(ModelError) as e:
        pol.gfn_to_page_write(True)
    assert e.value.errno == errno.EFAULT
    assert "hook gfn_to_page_write" in str(e.value)


ARCH_OPS_RAISES = """
    import dataclasses
    from kvmsim.policies.series import SeriesPolicy
    from kvmsim.x86.versions import X86_V613

    def prefault(kvm, gfn):
        return {{}}[gfn]

    X86_MINE = dataclasses.replace(X86_V613, apic_access_page_prefault=prefault)

    class Prefaults(SeriesPolicy):
        name = "{name}"
        {body}
"""


@pytest.mark.parametrize("how", ["table", "method"])
def test_a_raising_callable_in_the_plugins_arch_ops_is_named(tmp_path, how):
    """The plugin's own namespace, whether named by an ``ARCH_OPS`` table or returned by an ``arch_ops``
    method: its callables are guarded like hooks, and the error names ``arch_ops(x86).FIELD``."""
    body = ('ARCH_OPS = {**SeriesPolicy.ARCH_OPS, "x86": __name__ + ":X86_MINE"}' if how == "table" else
            "def arch_ops(self, arch):\n            return X86_MINE if arch == 'x86' else super().arch_ops(arch)")
    p = plugin(tmp_path, ARCH_OPS_RAISES.format(name=f"prefaults-{how}", body=body), name=f"prefaults_{how}.py")
    r = invoke("run", "x86-apic-access-alloc-lazy", "--policy", f"{p}:Prefaults")
    assert r.exit_code == 1, r.output
    assert f"hook arch_ops(x86).apic_access_page_prefault raised KeyError" in r.output
    assert f"{p}:7" in r.output                      # the line of the raising callable
