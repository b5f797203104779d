"""The Book3S profiles on the policy seam and the fault template: every per-version callable they
resolve cites its patch by number and exact title; the template hooks they added leave the other arches
as they were; no Book3S module branches on a policy."""

from __future__ import annotations

import dataclasses

import pytest

from kvmsim.kvm import fault as template
from kvmsim.policies import resolve
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.policies.series import SeriesPolicy
from tests.core.test_policy_seam import _titles, citations

BOOK3S = ("ppc-book3s-hv", "ppc-book3s-radix", "ppc-book3s-pr")


@pytest.mark.parametrize("arch", BOOK3S)
@pytest.mark.parametrize("policy", [LegacyPolicy(), SeriesPolicy()], ids=["legacy", "series"])
def test_every_resolved_book3s_callable_cites_its_patch(policy, arch):
    titles = _titles()
    ops = resolve(policy, arch)
    hooks = [ops.fault_release_locked, ops.fault_release_unlocked, ops.fault_dirty_before_map]
    hooks += [getattr(ops.arch_ops, f.name) for f in dataclasses.fields(ops.arch_ops)]
    for hook in hooks:
        if hook is None or hook in (template.release_faultin_page_locked, template.release_pfn_clean_after_unlock):
            continue                      # the generic ones, cited in kvm/fault.py (tests/core/test_policy_seam.py)
        cited = citations(hook.__doc__ or "")
        assert cited and all(titles.get(n) == t for n, t in cited), (policy.name, arch, hook.__name__)


def test_the_other_arches_resolve_no_arch_ops_and_keep_their_releases():
    for policy in (LegacyPolicy(), SeriesPolicy()):
        for arch in ("riscv", "generic", "mips"):
            assert resolve(policy, arch).arch_ops is None
    assert resolve(LegacyPolicy(), "x86").fault_release_unlocked is template.release_pfn_clean_after_unlock
    assert resolve(SeriesPolicy(), "arm64").fault_release_locked is template.release_faultin_page_locked


def test_the_optional_template_hooks_are_set_only_where_the_kernel_differs():
    """``fault_pfn_lookup`` / ``fault_before_lock`` are None on x86, arm64, RISC-V, LoongArch, MIPS and
    Book3S HV / Radix, so their faults run exactly the generic faultin and take the lock straight away;
    Book3S PR (``kvmppc_gpa_to_pfn()``, the HPTE cache) and e500 (the resolved lookup) set them."""
    from kvmsim.arm64 import Arm64Mmu
    from kvmsim.loongarch import LoongArchMmu
    from kvmsim.mips import MipsMmu
    from kvmsim.ppc import Book3sHvMmu, Book3sPrMmu, Book3sRadixMmu, E500Mmu
    from kvmsim.riscv import RiscvMmu
    from kvmsim.x86.mmu import X86Mmu
    for cls in (X86Mmu, Arm64Mmu, RiscvMmu, LoongArchMmu, MipsMmu, Book3sHvMmu, Book3sRadixMmu):
        assert cls.fault_pfn_lookup is None, cls
    for cls in (X86Mmu, RiscvMmu, LoongArchMmu, MipsMmu, Book3sHvMmu, Book3sRadixMmu):
        assert cls.fault_before_lock is None, cls
    # arm64: the resolved v6.17 cacheable-PFNMAP check (None under legacy / series: nothing before the lock)
    assert callable(Arm64Mmu.fault_before_lock)
    assert callable(Book3sPrMmu.fault_pfn_lookup) and callable(Book3sPrMmu.fault_before_lock)
    assert callable(E500Mmu.fault_pfn_lookup) and E500Mmu.fault_before_lock is None


@pytest.mark.parametrize("name,fn", [("ppc-book3s-hv-zero-page-leak", "kvmppc_book3s_hv_page_fault"),
                                     ("ppc-book3s-radix-zero-page-leak", "kvmppc_book3s_instantiate_page"),
                                     ("ppc-book3s-pr-marks-before-lock", "kvmppc_mmu_map_page"),
                                     ("ppc-book3s-pr-dcbz-leak", "kvmppc_patch_dcbz")])
def test_run_trace_shows_the_book3s_fault_path(name, fn):
    from click.testing import CliRunner

    from kvmsim.cli import cli
    r = CliRunner().invoke(cli, ["run", name, "--trace"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"by {fn}" in r.output and "✓ matches" in r.output and "MISMATCH" not in r.output
