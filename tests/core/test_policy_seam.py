"""The policy seam (STYLE.md): model code calls hooks; it never reads a policy attribute to branch on
and never compares policy names; each hook cites its series patch by number and exact title."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "kvmsim"
POLICY_NAMES = {"legacy", "series", "pre-5.13", "series-rc1", "series-only", "current"}
#: An upstream commit cited as ``"Title", 0123456789ab`` (the post-v6.13 differences of ``current``).
COMMIT_CITATION = re.compile(r'"[^"]+",\s+[0-9a-f]{12}\b')


def _model_files():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if not rel.startswith("policies/"):
            yield rel, ast.parse(path.read_text(), rel)


def _is_policy(node) -> bool:
    """``policy`` or ``<anything>.policy``."""
    return (isinstance(node, ast.Name) and node.id == "policy") or \
        (isinstance(node, ast.Attribute) and node.attr == "policy")


def policy_attribute_reads(tree) -> list[tuple[int, str]]:
    """``policy.<attr>`` that is not the function of a call."""
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return [(n.lineno, n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and _is_policy(n.value) and id(n) not in called]


def policy_name_comparisons(tree) -> list[int]:
    """A comparison with a policy name (``x == "legacy"``, ``p.name in ("series", ...)``)."""
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Compare):
            continue
        consts = [c for c in ast.walk(n) if isinstance(c, ast.Constant) and c.value in POLICY_NAMES]
        if consts and any(isinstance(s, ast.Attribute) and s.attr == "name" or _is_policy(s) or
                          (isinstance(s, ast.Name) and "policy" in s.id) for s in ast.walk(n)):
            out.append(n.lineno)
    return out


def test_the_checks_catch_what_they_forbid():
    tree = ast.parse("if kvm.policy.release_under_mmu_lock: pass\nkvm.policy.release_faultin(kvm)\n"
                     "if kvm.policy.name == 'legacy': pass\nif policy == 'series': pass\n")
    assert policy_attribute_reads(tree) == [(1, "release_under_mmu_lock"), (3, "name")]
    assert policy_name_comparisons(tree) == [3, 4]


def test_model_code_never_reads_a_policy_attribute():
    bad = [f"{rel}:{line}: policy.{attr}" for rel, tree in _model_files() for line, attr in policy_attribute_reads(tree)]
    assert bad == []


def test_model_code_never_compares_policy_names():
    bad = [f"{rel}:{line}" for rel, tree in _model_files()
           if not rel.startswith(("cli", "scenarios/", "backend/", "bench/", "explore/", "__main__"))
           for line in policy_name_comparisons(tree)]
    assert bad == []


def test_the_model_never_reads_the_explorers_mutations():
    """Mutations are installed by kvmsim.explore.mutations.install(); no model file reads ``.mutations``."""
    bad = []
    for rel, tree in _model_files():
        if rel.startswith(("explore/", "scenarios/", "cli")):
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr == "mutations" and isinstance(n.ctx, ast.Load):
                bad.append(f"{rel}:{n.lineno}")
    assert bad == []


def _titles() -> dict[int, str]:
    out = {}
    for line in (ROOT / "docs" / "series-patches.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| (.+) \|$", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def citations(text: str) -> list[tuple[int, str]]:
    """Each ``patch N "title"`` in ``text`` (line breaks folded): (N, the title if the text quotes patch
    N's exact title, else what follows the opening quote).  Titles may hold quotes ("struct page")."""
    titles = _titles()
    flat = re.sub(r"\s*\n\s*", " ", text)
    out = []
    for m in re.finditer(r'\b[Pp]atch (\d+),? "', flat):
        n, rest = int(m.group(1)), flat[m.end():]
        t = titles.get(n)
        out.append((n, t if t is not None and rest.startswith(t + '"') else rest[:60]))
    return out


def test_every_citation_quotes_the_exact_title():
    titles = _titles()
    assert len(titles) == 85
    assert citations('patch 83 "KVM: arm64: Don\'t mark "struct page" accessed when making SPTE young".') == \
        [(83, titles[83])]
    assert citations('patch 33 "KVM: Mark "struct page" pfns dirty only in kvm_release_pfn_dirty()"') != \
        [(33, titles[33])]                                  # the wrong title the old vcpu_map hook cited
    bad = []
    for path in SRC.rglob("*.py"):
        for n, t in citations(path.read_text()):
            if titles.get(n) != t:
                bad.append(f"{path.relative_to(SRC)}: patch {n} {t!r} (is {titles.get(n)!r})")
    assert bad == []


def bare_patch_numbers(text: str) -> list[int]:
    """Each ``patch N`` in ``text`` that is not followed by patch N's exact title in quotes."""
    titles = _titles()
    flat = re.sub(r"\s*\n\s*", " ", text)
    return [int(m.group(1)) for m in re.finditer(r"\b[Pp]atch (\d+)", flat)
            if not flat[m.end():].lstrip(",").startswith(f' "{titles.get(int(m.group(1)), "?")}"')]


def test_policies_and_resolved_hooks_never_cite_a_patch_by_number_alone():
    """Every ``patch N`` in policies/*.py, and in each hook ``resolve()`` hands the model, names the
    patch's exact title too (issue 12: "each citing its patch by number and exact title")."""
    from kvmsim.kvm.arch import ARCH_NAMES
    from kvmsim.policies import get_policy, resolve
    assert bare_patch_numbers('until patch 8; and patch 40 "x"') == [8, 40]
    bad = [f"policies/{p.name}: patch {n}" for p in sorted((SRC / "policies").glob("*.py"))
           for n in bare_patch_numbers(p.read_text())]
    for policy in (get_policy(name) for name in ("legacy", "series", "series-rc1", "pre-5.13")):
        for arch in ARCH_NAMES:
            for hook in vars(resolve(policy, arch)).values():
                if callable(hook) and getattr(hook, "__module__", "").startswith("kvmsim."):
                    bad += [f"{hook.__qualname__}: patch {n}" for n in bare_patch_numbers(hook.__doc__ or "")]
    assert bad == []


def test_every_policy_hook_cites_a_patch():
    """Each public hook of each policy, and each release it resolves, cites at least one patch by number
    and exact title (pre-5.13 cites the CVE-2021-22543 fix commit)."""
    from kvmsim.policies import resolve
    from kvmsim.policies.legacy import LegacyPolicy
    from kvmsim.policies.pre513 import Pre513Policy
    from kvmsim.policies.series import SeriesPolicy
    titles = _titles()
    from kvmsim.policies.current import CurrentPolicy
    for cls in (LegacyPolicy, SeriesPolicy, CurrentPolicy):
        for name, fn in vars(cls).items():
            if callable(fn) and not name.startswith("_"):
                cited = citations(fn.__doc__ or "")
                if not cited:                  # a post-v6.13 difference cites its upstream commit instead
                    assert COMMIT_CITATION.search(fn.__doc__ or ""), (cls, name)
                    continue
                assert all(titles.get(n) == t for n, t in cited), (cls, name)
    assert "f8be156be163" in Pre513Policy.remapped_get_ref.__doc__
    for policy in (LegacyPolicy(), SeriesPolicy()):
        for arch in ("x86", "arm64", "riscv", "generic"):
            ops = resolve(policy, arch)
            for hook in (ops.fault_release_locked, ops.fault_release_unlocked, ops.fault_dirty_before_map):
                if hook is None:
                    continue
                assert citations(hook.__doc__ or "") or "v6.12" in hook.__doc__, (policy.name, arch, hook)


def test_legacy_is_a_per_arch_choice_and_the_series_one_release():
    """v6.12's release order differs per arch; v6.13 has one (kvm_release_faultin_page under mmu_lock)."""
    from kvmsim.kvm import fault
    from kvmsim.policies import resolve
    from kvmsim.policies.legacy import LegacyPolicy
    from kvmsim.policies.series import SeriesPolicy
    legacy = {a: resolve(LegacyPolicy(), a) for a in ("x86", "arm64", "riscv", "generic")}
    assert legacy["x86"].fault_release_unlocked is fault.release_pfn_clean_after_unlock
    assert legacy["arm64"].fault_release_unlocked is fault.user_mem_abort_v612_after_unlock
    assert legacy["riscv"].fault_dirty_before_map is fault.gstage_map_v612_dirty_before_map
    assert all(o.fault_release_locked is None for o in legacy.values())
    for a in ("x86", "arm64", "riscv", "generic"):
        ops = resolve(SeriesPolicy(), a)
        assert ops.fault_release_locked is fault.release_faultin_page_locked
        assert ops.fault_release_unlocked is None and ops.fault_dirty_before_map is None
