"""Huge leaves per leaf (kvmsim.x86.huge_leaves) leave the state and counters of the generic per-entry
writes, and the bulk flow on 1 GiB hugetlb leaves those of the scalar path.

* The dirty-log flow on 2 MiB and 1 GiB hugetlb, run once with the per-leaf helpers and once with
  each of them declined (so every write takes the generic :func:`spte_write` path): the same SPTEs
  (bits, pfns, levels), struct pages, guest data, counters and leaf counts, over policies, eager
  split on/off, A/D bits on/off, PML on/off, in-place recovery on/off and ``-e``.
* 1 GiB hugetlb, bulk against scalar: per-page accesses in gfn order and a CLEAR per 64-page word
  (``kvm_arch_mmu_enable_log_dirty_pt_masked()`` as ``kvm_clear_dirty_log_protect()`` calls it);
  the levels after populate, the first CLEAR and the disable are checked too.
"""

import collections
import functools

import numpy as np
import pytest

from kvmsim.bench import dirty_log_perf
from kvmsim.bench.dirty_log_perf import Options, run_model
from kvmsim.bench.memstress import create_test_slots, vcpu_pass
from kvmsim.kvm.dirty import enable_manual_protect, kvm_clear_dirty_log, kvm_get_dirty_log
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.host import Host
from kvmsim.x86 import huge_leaves, tdp_mmu

GiB = 1 << 30
FAST = ("install_leaves", "split_run", "zap_small_span", "recover_span", "uniform_leaves", "inv11_clean",
        "max_mapping_levels_span")


def _decline(monkeypatch):
    """Every per-leaf helper declines: the callers take their generic paths."""
    for name in ("install_leaves", "split_run", "zap_small_span", "inv11_clean"):
        monkeypatch.setattr(huge_leaves, name, lambda *a, **k: False)
    for name in ("recover_span", "uniform_leaves"):
        monkeypatch.setattr(huge_leaves, name, lambda *a, **k: None)
    monkeypatch.setattr(huge_leaves, "max_mapping_levels_span", tdp_mmu.max_mapping_levels)


def _count_taken(monkeypatch) -> collections.Counter:
    """How often each helper did the work itself (returned something other than False / None)."""
    taken = collections.Counter()
    for name in FAST:
        f = getattr(huge_leaves, name)

        def wrap(*a, _f=f, _name=name, **k):
            r = _f(*a, **k)
            if r is not False and r is not None:
                taken[_name] += 1
            return r
        monkeypatch.setattr(huge_leaves, name, wrap)
    return taken


def _flow(monkeypatch, policy, opts, **kvm_opts):
    """The flow's end state: SPTE tables, struct pages, guest data, counters, leaf counts."""
    seen = {}

    def make_kvm(*a, **k):
        seen["kvm"] = kvm = Kvm(*a, **{**k, **kvm_opts})
        return kvm
    monkeypatch.setattr(dirty_log_perf, "Kvm", make_kvm)
    r = run_model(opts, policy)
    kvm = seen["kvm"]
    tables = [(t.bits.copy(), t.pfn.copy(), t.level.copy()) for slots in kvm.memslots for s in slots
              if (t := s.arch.get("x86")) is not None]
    ph = kvm.phys
    return {"tables": tables, "flags": ph.flags[:ph.nr].copy(), "refcount": ph.refcount[:ph.nr].copy(),
            "data": ph.data[:ph.nr].copy(), "counters": dict(kvm.journal.counters), "stats": r.stats,
            "phases": [(p.name, p.iteration, p.counters) for p in r.phases]}


def _same(a, b):
    assert a["counters"] == b["counters"]
    assert a["phases"] == b["phases"]
    assert a["stats"] == b["stats"]
    for key in ("flags", "refcount", "data"):
        assert np.array_equal(a[key], b[key]), key
    assert len(a["tables"]) == len(b["tables"]) == 1
    for x, y in zip(a["tables"][0], b["tables"][0]):
        assert np.array_equal(x, y)


CASES = [
    # (backing, write %, -e, v613_other, kvm options)
    ("anonymous_hugetlb_1gb", 100, True, False, {}),
    ("anonymous_hugetlb_1gb", 100, True, True, {}),
    ("anonymous_hugetlb_1gb", 100, False, False, {"ad_enabled": False}),
    ("anonymous_hugetlb_1gb", 0, False, False, {"eager_split": False}),      # reads: the first CLEAR write-protects
    ("anonymous_hugetlb_1gb", 100, False, False, {"pml": False}),
    ("anonymous_hugetlb_2mb", 100, True, False, {}),
    ("anonymous_hugetlb_2mb", 100, True, True, {}),
    ("anonymous_hugetlb_2mb", 30, False, True, {"ad_enabled": False}),
    ("anonymous_hugetlb_2mb", 0, False, False, {"eager_split": False}),
]


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing,percent,e,v613,kvm_opts", CASES)
def test_per_leaf_helpers_match_the_generic_writes(monkeypatch, policy, backing, percent, e, v613, kvm_opts):
    pml = kvm_opts.pop("pml", True)
    opts = functools.partial(Options, vcpu_memory=GiB, backing=backing, write_percent=percent,
                             run_while_disabling=e, v613_other=v613, pml=pml)
    with monkeypatch.context() as m:
        taken = _count_taken(m)
        fast = _flow(m, policy, opts(), **kvm_opts)
    with monkeypatch.context() as m:
        _decline(m)
        generic = _flow(m, policy, opts(), **kvm_opts)
    assert taken["install_leaves"] >= 1                       # populate: the huge leaves in slices
    if kvm_opts.get("eager_split", True):
        assert taken["split_run"] >= 1                        # the first CLEAR splits per leaf
        assert fast["counters"]["split"] > 0
        # the disable: the 4 KiB leaves of whole regions zapped or recovered with slices
        assert taken["recover_span" if v613 else "zap_small_span"] >= 1
    else:
        assert taken["inv11_clean"] >= 1                      # ... or write-protects a run of leaves at once
        assert fast["stats"]["pages_4k"] == 0                 # read-only passes: the huge leaves stay
    _same(fast, generic)


# ---- 1 GiB hugetlb: the bulk flow against the scalar path ----------------------------------------------

NPAGES = 1 << 18                                        # one 1 GiB leaf
RANGES = [(0, 700), (3000, 200), (NPAGES - 900, 900)]   # the pages the guest touches


def _scalar_clear(kvm, slot, log):
    """``kvm_clear_dirty_log_protect()``: one arch re-arm per non-zero 64-page word, one flush if any."""
    full = np.asarray(log, dtype=bool) & slot.dirty_bitmap
    words = np.flatnonzero(full.reshape(-1, 64).any(axis=1)).tolist()
    if not words:
        return
    kvm.mmu_lock.write_lock()
    for w in words:
        m = full[w * 64:(w + 1) * 64].copy()
        slot.dirty_bitmap[w * 64:(w + 1) * 64] &= ~m
        kvm.arch.enable_log_dirty_pt_masked(slot, w * 64, m)
    kvm.mmu_lock.write_unlock()
    kvm.flush_remote_tlbs("clear_dirty_log")


def _run_1g(policy, bulk: bool, v613: bool, ad: bool):
    host = Host(recording=False)
    kvm = Kvm(host, policy=policy, arch="x86", v613_other=v613, ad_enabled=ad)
    enable_manual_protect(kvm, 3)
    (ts,) = create_test_slots(kvm, NPAGES << 12, "anonymous_hugetlb_1gb", 1)
    slot = kvm.memslots[0].by_id[ts.slot]
    v = kvm.create_vcpu()
    levels = []

    def guest(value, write=True):
        for g, n in RANGES:
            if bulk:
                vcpu_pass(kvm, v, ts.gpa + (g << 12), n, np.full(n, write), value)
            else:
                for i in range(g, g + n):
                    assert v.access(ts.gpa + (i << 12), write, value if write else None).ok

    def level_counts():
        t = slot.arch["x86"]
        reps = t.representatives(slot, 0, slot.npages)
        levels.append(np.bincount(t.level[reps], minlength=4).tolist())

    guest(1)
    level_counts()
    # aging clears A (or access-tracks the leaf without A/D bits): the next loads set A on the huge
    # leaf once (or fast-fault it once), then a store marks it dirty
    kvm.notifier.clear_flush_young(ts.vma.start, ts.vma.end)
    guest(5, write=False)
    guest(6)
    kvm.set_user_memory_region(ts.slot, ts.gpa, ts.size, ts.vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    for it in (2, 3):
        guest(it, write=it == 2)
        log = kvm_get_dirty_log(kvm, ts.slot)
        if bulk:
            kvm_clear_dirty_log(kvm, ts.slot, 0, ts.npages, log)
        else:
            _scalar_clear(kvm, slot, log)
        level_counts()
    bitmap = slot.dirty_bitmap.copy()
    kvm.set_user_memory_region(ts.slot, ts.gpa, ts.size, ts.vma.start, 0)
    level_counts()
    guest(4)
    level_counts()
    t = slot.arch["x86"]
    counters = {k: c for k, c in kvm.journal.counters.items() if k != "clear_dirty_log"}
    ph = host.phys
    return {"tables": [(t.bits.copy(), t.pfn.copy(), t.level.copy())], "counters": counters,
            "flags": ph.flags[:ph.nr].copy(), "refcount": ph.refcount[:ph.nr].copy(),
            "data": ph.data[:ph.nr].copy(), "levels": levels, "bitmap": bitmap}


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("v613,ad", [(False, True), (True, True), (False, False)])
def test_1g_hugetlb_bulk_and_scalar_agree(policy, v613, ad):
    scalar = _run_1g(policy, False, v613, ad)
    bulk = _run_1g(policy, True, v613, ad)
    # populate: one 1 GiB leaf; the first CLEAR splits it to 4 KiB; the disable zaps or recovers
    assert scalar["levels"][0] == [0, 0, 0, 1]
    assert scalar["levels"][1] == [0, NPAGES, 0, 0]
    assert scalar["levels"][3] == ([0, 0, 0, 1] if v613 else [0, 0, 0, 0])
    assert scalar["levels"][4] == [0, 0, 0, 1]
    assert scalar["levels"] == bulk["levels"]
    assert scalar["counters"] == bulk["counters"]
    for key in ("flags", "refcount", "data", "bitmap"):
        assert np.array_equal(scalar[key], bulk[key]), key
    for x, y in zip(scalar["tables"][0], bulk["tables"][0]):
        assert np.array_equal(x, y)
