"""The bench's bulk paths (vectorised host prefault + ``guest_access_range``, mixed read/write passes,
CLEAR re-arm over a part or all of the slot, in pieces) leave exactly the state and counters of the scalar path: per-page guest
accesses in gfn order and ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` once per 64-page word, as
``kvm_clear_dirty_log_protect()`` calls it."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmsim.bench.memstress import BACKING, create_test_slots, vcpu_pass
from kvmsim.kvm import dirty as kvm_dirty
from kvmsim.kvm.dirty import (
    enable_manual_protect,
    kvm_clear_dirty_log,
    kvm_get_dirty_log,
)
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.host import Host
from kvmsim.x86 import dirty_log as x86_dirty_log

NPAGES = 2048                     # 8 MiB: four 2 MiB regions
SMALL_BACKINGS = [b for b in BACKING if b != "anonymous_hugetlb_1gb"]

op = st.one_of(
    st.tuples(st.just("pass"), st.integers(0, NPAGES - 1), st.integers(1, NPAGES), st.sampled_from([0, 30, 50, 100])),
    st.tuples(st.sampled_from(["log_on", "log_off", "get_clear", "get_clear_part", "age", "dontneed"]),
              st.integers(0, NPAGES - 1), st.integers(1, 600), st.just(0)),
)


def _scalar_clear(kvm, slot_id, first, num, log):
    """``kvm_clear_dirty_log_protect()`` word by word over ``[first, first + num)`` (``log`` is
    relative to ``first``): one arch re-arm per non-zero 64-page mask, one flush at the end."""
    slot = kvm.memslots[0].by_id[slot_id]
    full = np.zeros(slot.npages, dtype=bool)
    full[first:first + num] = np.asarray(log, dtype=bool)[:num] & slot.dirty_bitmap[first:first + num]
    if not full.any():
        return
    kvm.journal.count("clear_dirty_log")
    kvm.mmu_lock.write_lock()
    for w in range(0, slot.npages, 64):
        m = full[w:w + 64]
        if m.any():
            slot.dirty_bitmap[w:w + 64][m] = False
            word = np.zeros(slot.npages, dtype=bool)
            word[w:w + 64] = m
            kvm.arch.enable_log_dirty_pt_masked(slot, 0, word)
    kvm.mmu_lock.write_unlock()
    kvm.flush_remote_tlbs("clear_dirty_log")


def run(policy, backing, seq, bulk, manual, v613_other=False, ad_enabled=True, pml=True):
    host = Host(recording=False)
    kvm = Kvm(host, policy=policy, arch="x86", v613_other=v613_other, ad_enabled=ad_enabled, pml=pml)
    if manual:
        enable_manual_protect(kvm, 3)
    (ts,) = create_test_slots(kvm, NPAGES << 12, backing, 1)
    v = kvm.create_vcpu()
    rng = np.random.default_rng(7)
    logging = False
    for k, (name, g, n, pct) in enumerate(seq):
        n = min(n, NPAGES - g)
        if name == "pass":
            mask = rng.integers(0, 100, n) < pct
            if bulk:
                vcpu_pass(kvm, v, ts.gpa + (g << 12), n, mask, k + 1)
            else:
                for i in range(n):
                    a = v.access(ts.gpa + ((g + i) << 12), bool(mask[i]), k + 1 if mask[i] else None)
                    assert a.ok, a
        elif name in ("log_on", "log_off"):
            logging = name == "log_on"
            kvm.set_user_memory_region(ts.slot, ts.gpa, ts.size, ts.vma.start,
                                       KVM_MEM.LOG_DIRTY_PAGES if logging else 0)
        elif name in ("get_clear", "get_clear_part") and logging:
            log = kvm_get_dirty_log(kvm, ts.slot)
            if manual:
                first, num = 0, ts.npages
                if name == "get_clear_part":       # a 64-page aligned part: to the slot's end, or whole words
                    first = g // 64 * 64
                    num = ts.npages - first if n >= 300 else min(n // 64 * 64 or 64, ts.npages - first)
                part = log[first:first + num]
                if bulk:
                    kvm_clear_dirty_log(kvm, ts.slot, first, num, part)
                else:
                    _scalar_clear(kvm, ts.slot, first, num, part)
        elif name == "age":
            kvm.notifier.clear_flush_young(ts.vma.start + (g << 12), ts.vma.start + ((g + n) << 12))
        elif name == "dontneed" and backing in ("anonymous", "anonymous_thp"):
            g, n = g // 512 * 512, 512
            kvm.mm.madvise(ts.vma.start + (g << 12), n << 12, "dontneed")
    slot = kvm.memslots[0].by_id[ts.slot]
    t = slot.arch.get("x86")
    counters = {k: c for k, c in kvm.journal.counters.items() if k != "clear_dirty_log"}
    phys = host.phys
    return {
        "spte": None if t is None else (t.bits.copy(), t.pfn.copy(), t.level.copy()),
        "counters": counters,
        "flags": phys.flags[:phys.nr].copy(), "refcount": phys.refcount[:phys.nr].copy(),
        "data": phys.data[:phys.nr].copy(), "index": phys.index[:phys.nr].copy(),
        "head": phys.head[:phys.nr].copy(),
        "pte": (ts.vma.pte.copy(), ts.vma.pte_pfn.copy(), ts.vma.pte_level.copy()),
        "bitmap": None if slot.dirty_bitmap is None else slot.dirty_bitmap.copy(),
    }


def assert_same(a, b):
    assert a["counters"] == b["counters"]
    for key in ("flags", "refcount", "data", "index", "head"):
        assert np.array_equal(a[key], b[key]), key
    for x, y in zip(a["pte"], b["pte"]):
        assert np.array_equal(x, y)
    assert (a["spte"] is None) == (b["spte"] is None)
    if a["spte"] is not None:
        for x, y in zip(a["spte"], b["spte"]):
            assert np.array_equal(x, y)
    assert (a["bitmap"] is None) == (b["bitmap"] is None)
    if a["bitmap"] is not None:
        assert np.array_equal(a["bitmap"], b["bitmap"])


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(["legacy", "series"]), backing=st.sampled_from(SMALL_BACKINGS),
       manual=st.booleans(), v613=st.booleans(), seq=st.lists(op, min_size=1, max_size=8),
       small_pieces=st.booleans(), ad=st.sampled_from([True, True, False]), pml=st.booleans())
def test_bulk_and_scalar_agree_on_random_workloads(policy, backing, manual, v613, seq, small_pieces, ad, pml):
    seq = [("pass", 0, NPAGES, 100)] + seq if seq[0][0] != "pass" else seq
    scalar = run(policy, backing, seq, False, manual, v613, ad, pml)
    # small_pieces: the CLEAR walk and the arch's 1 GiB pieces cut the 8 MiB slot many times (pieces
    # stay multiples of 2 MiB, so no leaf of these backings crosses one)
    with mock.patch.object(kvm_dirty, "CLEAR_CHUNK", 128 if small_pieces else kvm_dirty.CLEAR_CHUNK), \
            mock.patch.object(x86_dirty_log, "PIECE", 1024 if small_pieces else x86_dirty_log.PIECE):
        bulk = run(policy, backing, seq, True, manual, v613, ad, pml)
    assert_same(scalar, bulk)


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", SMALL_BACKINGS)
def test_dirty_log_flow_agrees(policy, backing):
    """The selftest's flow itself: populate, enable, two dirty/get/clear iterations, -e, disable, -e."""
    seq = [("pass", 0, NPAGES, 100), ("log_on", 0, 1, 0), ("pass", 0, NPAGES, 100), ("get_clear", 0, 1, 0),
           ("pass", 0, NPAGES, 30), ("get_clear", 0, 1, 0), ("pass", 0, NPAGES, 100), ("log_off", 0, 1, 0),
           ("pass", 0, NPAGES, 100)]
    a, b = run(policy, backing, seq, False, True), run(policy, backing, seq, True, True)
    assert a["counters"].get("page_fault", 0) > 0
    assert_same(a, b)


def _count_mixed_calls(monkeypatch):
    """Count the bulk calls that carry one access kind per page (a whole mixed piece in one call)."""
    from kvmsim.x86 import bulk as x86_bulk
    calls = {"mixed": 0, "one_kind": 0}
    real = x86_bulk.guest_access_range

    def counted(mmu, vcpu, gpa, npages, write, values=None):
        calls["one_kind" if isinstance(write, bool) else "mixed"] += 1
        return real(mmu, vcpu, gpa, npages, write, values)
    monkeypatch.setattr(x86_bulk, "guest_access_range", counted)
    return calls


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", SMALL_BACKINGS)
@pytest.mark.parametrize("pml", [True, False])
def test_mixed_passes_are_one_call_and_agree(monkeypatch, policy, backing, pml):
    """``-w 50`` / ``-w 30`` passes over populated memory: one bulk call per piece, each page with its
    own kind (hits, fast faults after CLEAR, slow faults after the disable's zap, aging's
    access-tracked SPTEs), with the scalar path's state and counters."""
    seq = [("pass", 0, NPAGES, 100), ("log_on", 0, 1, 0), ("pass", 0, NPAGES, 50), ("get_clear", 0, 1, 0),
           ("pass", 0, NPAGES, 50), ("get_clear_part", 512, 300, 0), ("pass", 0, NPAGES, 30),
           ("age", 0, NPAGES, 0), ("pass", 0, NPAGES, 50), ("log_off", 0, 1, 0), ("pass", 0, NPAGES, 50),
           ("age", 100, 900, 0), ("pass", 0, NPAGES, 50)]
    scalar = run(policy, backing, seq, False, True, pml=pml)
    calls = _count_mixed_calls(monkeypatch)
    bulk = run(policy, backing, seq, True, True, pml=pml)
    assert calls["mixed"] == 6                      # every mixed pass, in one call each
    assert scalar["counters"].get("page_fault", 0) > 0
    assert_same(scalar, bulk)


def test_mixed_pass_over_unmapped_host_pages_keeps_runs(monkeypatch):
    """A first-touch mixed pass (the host maps nothing yet) keeps one call per run of same-kind
    accesses, so the host prefaults writes in gfn order; the state is still the scalar path's."""
    seq = [("pass", 0, NPAGES, 50), ("pass", 0, NPAGES, 50)]
    scalar = run("series", "anonymous", seq, False, True)
    calls = _count_mixed_calls(monkeypatch)
    bulk = run("series", "anonymous", seq, True, True)
    assert calls["mixed"] == 1 and calls["one_kind"] > 100
    assert_same(scalar, bulk)


def test_prefault_leaves_nothing_for_the_scalar_path():
    """A fresh anonymous populate goes entirely through the vectorised paths (no host fault left over)."""
    host = Host(recording=False)
    kvm = Kvm(host, policy="series", arch="x86")
    (ts,) = create_test_slots(kvm, NPAGES << 12, "anonymous", 1)
    v = kvm.create_vcpu()
    from kvmsim.bench.prefault import host_prefault_range
    slot = kvm.memslots[0].by_id[ts.slot]
    assert host_prefault_range(kvm, slot, 0, NPAGES) == (NPAGES, False)
    assert kvm.journal.counters["host_page_fault"] == NPAGES
    assert host_prefault_range(kvm, slot, 0, NPAGES) == (NPAGES, False)
    kvm.arch.guest_access_range(v, ts.gpa, NPAGES, True, 1)
    c = kvm.journal.counters
    assert c["host_page_fault"] == c["gup_slow"] == c["page_fault"] == NPAGES


# ---- the per-region kernel loops, as reference for the vectorised disable-dirty-logging paths ----------

def _ref_regions(kvm, slot, level):
    from kvmsim.types import LEVEL_PAGES
    from kvmsim.x86.spte import P, tables
    from kvmsim.x86.tdp_mmu import max_mapping_levels
    t = tables(slot)
    n = LEVEL_PAGES[level]
    first = (-slot.base_gfn) % n
    count = (slot.npages - first) // n
    if count <= 0:
        return []
    lvl = t.level[first:first + count * n].reshape(count, n)
    pres = (t.bits[first:first + count * n].reshape(count, n) & P) != 0
    starts = (first + np.arange(count) * n)[(pres & (lvl < level)).any(axis=1)]
    return [int(s) for s in starts
            if max_mapping_levels(kvm, slot, int(s), int(s) + 1, level, logging=False)[0] >= level]


def ref_zap_collapsible_sptes(kvm, slot, *, flush_per_region=True):
    """``kvm_mmu_zap_collapsible_sptes()`` region by region, one flush each (the TDP MMU)."""
    assert flush_per_region
    from kvmsim.types import LEVEL_PAGES
    from kvmsim.x86.tdp_mmu import zap_range
    zapped = 0
    for level in (3, 2):
        for s in _ref_regions(kvm, slot, level):
            zap_range(kvm, slot, s, s + LEVEL_PAGES[level], "zap_collapsible_spte_range")
            kvm.flush_remote_tlbs("zap_collapsible_sptes")
            zapped += 1
    kvm.journal.count("zap_collapsible", zapped)
    return zapped


def ref_recover_huge_pages(kvm, slot):
    """``kvm_tdp_mmu_recover_huge_pages()`` region by region, one flush for the slot."""
    from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT
    from kvmsim.x86.spte import P, spte_write, tables
    t = tables(slot)
    recovered = 0
    for level in (3, 2):
        n = LEVEL_PAGES[level]
        for s in _ref_regions(kvm, slot, level):
            child = s + int(np.nonzero(t.bits[s:s + n] & P)[0][0])
            base_pfn = int(t.pfn[child]) - (child - s)
            if kvm.mm.pte_of(slot.userspace_addr + (s << PAGE_SHIFT))[1] != base_pfn:
                continue
            spte_write(kvm, slot, s, s + n, int(t.bits[child]), base_pfn + np.arange(n), level, caller="make_huge_spte")
            recovered += 1
    if recovered:
        kvm.flush_remote_tlbs("recover_huge_pages")
    kvm.journal.count("recover", recovered)
    return recovered


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("backing", ["anonymous_hugetlb_2mb", "anonymous_thp", "shared_hugetlb", "anonymous"])
@pytest.mark.parametrize("v613", [False, True])
def test_disable_dirty_logging_matches_the_per_region_loops(monkeypatch, policy, backing, v613):
    seq = [("pass", 0, NPAGES, 100), ("log_on", 0, 1, 0), ("pass", 0, NPAGES, 100), ("get_clear", 0, 1, 0),
           ("pass", 0, 1200, 60), ("log_off", 0, 1, 0), ("pass", 0, NPAGES, 100)]
    fast = run(policy, backing, seq, True, True, v613)
    from kvmsim.x86 import tdp_mmu
    monkeypatch.setattr(tdp_mmu, "zap_collapsible_sptes", ref_zap_collapsible_sptes)
    monkeypatch.setattr(tdp_mmu, "recover_huge_pages", ref_recover_huge_pages)
    ref = run(policy, backing, seq, True, True, v613)
    if backing != "anonymous":
        assert ref["counters"].get("recover" if v613 else "zap_collapsible", 0) == NPAGES // 512
    assert_same(ref, fast)
