"""Each mutation of the model makes at least one oracle case fail, against recorded kernel results.

The kernel side is recorded once per session (conftest.py); each mutation re-runs only the model side
of a few cases, after checking that those cases agree without it (so the failure is the mutation's).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvmsim.backend.oracle.cases import CASES
from kvmsim.backend.oracle.compare import compare_kernel
from tests.oracle.conftest import results_for

BY_NAME = {c.name: c for c in CASES}


def _zap_callers_only(fn, which: str):
    """Wrap LegacyPolicy.spte_ad_lost(_bulk): drop ``which`` ("dirty"/"accessed") marks for callers
    that zap (anything but the dirty-log write-protection of clear_dirty_*)."""
    def bulk(self, kvm, pfns, dirty_mask, accessed_mask, caller):
        if "clear_dirty" not in caller:
            if which == "dirty":
                dirty_mask = np.zeros_like(dirty_mask)
            else:
                accessed_mask = np.zeros_like(accessed_mask)
        return fn(self, kvm, pfns, dirty_mask, accessed_mask, caller)
    return bulk


def _mut_series_dirty_flag(mp):
    """``kvm_release_faultin_page(kvm, page, unused, !dirty)``: the series' release, as every fault calls it."""
    from kvmsim.kvm import fault
    orig = fault.kvm_release_faultin_page

    def flipped(kvm, page, unused, dirty, **kw):
        return orig(kvm, page, unused, not dirty, **kw)
    mp.setattr(fault, "kvm_release_faultin_page", flipped)


def _mut_legacy_zap(which):
    def apply(mp):
        from kvmsim.policies.legacy import LegacyPolicy
        mp.setattr(LegacyPolicy, "spte_ad_lost_bulk", _zap_callers_only(LegacyPolicy.spte_ad_lost_bulk, which))
        orig = LegacyPolicy.spte_ad_lost

        def scalar(self, kvm, pfn, *, dirty, accessed, caller, gfn=None, n=1):
            if "clear_dirty" not in caller:
                dirty = dirty and which != "dirty"
                accessed = accessed and which != "accessed"
            return orig(self, kvm, pfn, dirty=dirty, accessed=accessed, caller=caller, gfn=gfn, n=n)
        mp.setattr(LegacyPolicy, "spte_ad_lost", scalar)
    return apply


def _mut_read_faults_read_only(mp):
    from kvmsim.x86.mmu import X86Mmu
    orig = X86Mmu._map

    def read_only(self, vcpu, slot, gfn, pfn, kfp, write, *, prefetch=False):
        if not write:
            kfp.map_writable = False
        return orig(self, vcpu, slot, gfn, pfn, kfp, write, prefetch=prefetch)
    mp.setattr(X86Mmu, "_map", read_only)


def _mut_get_dirty_log_no_marks(mp):
    from kvmsim.policies.legacy import LegacyPolicy
    orig = LegacyPolicy.spte_ad_lost_bulk

    def bulk(self, kvm, pfns, dirty_mask, accessed_mask, caller):
        if "clear_dirty" in caller:
            dirty_mask = np.zeros_like(dirty_mask)
        return orig(self, kvm, pfns, dirty_mask, accessed_mask, caller)
    mp.setattr(LegacyPolicy, "spte_ad_lost_bulk", bulk)


def _mut_huge_while_logging(mp):
    from kvmsim.x86 import tdp_mmu
    lvl, lvls = tdp_mmu.max_mapping_level, tdp_mmu.max_mapping_levels

    class _Unlogged:
        def __init__(self, slot):
            self._slot = slot

        def __getattr__(self, name):
            return False if name == "logging" else getattr(self._slot, name)

    mp.setattr(tdp_mmu, "max_mapping_level", lambda kvm, slot, i, m: lvl(kvm, _Unlogged(slot), i, m))
    mp.setattr(tdp_mmu, "max_mapping_levels",
               lambda kvm, slot, lo, hi, m, *, logging=None: lvls(kvm, slot, lo, hi, m, logging=False))
    mp.setattr(tdp_mmu, "split_range", lambda *a, **k: 0)


def _mut_clear_32(mp):
    import kvmsim.kvm.dirty as dirty
    orig = dirty.kvm_clear_dirty_log

    def aligned32(kvm, slot_id, first_page, num_pages, bitmap=None):
        if first_page % 64 == 0 and num_pages % 64 == 0 or first_page % 32 or num_pages % 32:
            return orig(kvm, slot_id, first_page, num_pages, bitmap)
        lo = first_page // 64 * 64
        n = -(-(first_page + num_pages - lo) // 64) * 64
        mask = np.zeros(n, dtype=bool)
        sel = np.ones(num_pages, dtype=bool) if bitmap is None else np.asarray(bitmap, dtype=bool)[:num_pages]
        mask[first_page - lo:first_page - lo + num_pages] = sel
        return orig(kvm, slot_id, lo, n, mask)
    mp.setattr(dirty, "kvm_clear_dirty_log", aligned32)


MUTATIONS = [
    ("flip the series release dirty flag", "series", _mut_series_dirty_flag,
     ["first-write-anon-shared", "readme-table"]),
    ("stop legacy's dirty marks on zap", "legacy", _mut_legacy_zap("dirty"),
     ["dontneed-anon-shared", "readme-table"]),
    ("stop legacy's accessed marks on zap", "legacy", _mut_legacy_zap("accessed"),
     ["dontneed-anon-shared", "readme-table"]),
    ("make x86 read faults map read-only SPTEs", "series", _mut_read_faults_read_only,
     ["first-read-anon-shared", "first-read-memfd"]),
    ("drop legacy's dirty marks on GET_DIRTY_LOG write-protection", "legacy", _mut_get_dirty_log_no_marks,
     ["get-dirty-log"]),
    ("keep huge pages mapped while logging", "series", _mut_huge_while_logging,
     ["logging-thp-first-write", "disable-logging-hugetlb-2m"]),
    ("a 32-page CLEAR_DIRTY_LOG alignment", "series", _mut_clear_32, ["clear-dirty-log-alignment"]),
]


@pytest.mark.parametrize("title, policy, mutate, cases", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutation_makes_an_oracle_case_fail(oracle_results, monkeypatch, title, policy, mutate, cases):
    results = results_for(oracle_results, policy)
    chosen = [BY_NAME[n] for n in cases]
    clean = compare_kernel(results, policy, chosen)
    assert all(r.agree for r in clean), [(r.case, r.diffs, r.note) for r in clean if not r.agree]
    with monkeypatch.context() as mp:
        mutate(mp)
        mutated = compare_kernel(results, policy, chosen)
    failed = [r.case for r in mutated if r.agree is False]
    assert failed, f"no oracle case caught '{title}'"
