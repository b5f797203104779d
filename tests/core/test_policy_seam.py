"""Model code calls policy hooks; it never compares policy names (STYLE.md, the policy seam)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2] / "src" / "kvmsim"
ALLOWED = ("policies", "cli", "scenarios", "__main__", "explore", "backend", "bench")


def test_no_policy_name_branches_in_model_code():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ALLOWED):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"[\"'](legacy|series)[\"']", line) and "policy" in line and "==" in line:
                bad.append(f"{rel}:{n}: {line.strip()}")
    assert bad == []


def test_every_policy_hook_cites_a_patch():
    from kvmsim.policies.legacy import LegacyPolicy
    from kvmsim.policies.series import SeriesPolicy
    for cls in (LegacyPolicy, SeriesPolicy):
        for name, fn in vars(cls).items():
            if callable(fn) and not name.startswith("_"):
                assert fn.__doc__ and re.search(r"patch|\d{2,}|f8be156|before|x86", fn.__doc__, re.I), (cls, name)
