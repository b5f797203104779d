"""The x86 bulk guest access (count > 64) against the scalar path, interleaved with host operations.

The same scenario runs twice: once with the bulk path (``guest_access_range``), once with every page
through ``vcpu.access``.  A write or read of more than 64 pages is a thread of an ``interleave``
with ``munmap``, ``mprotect`` or ``madvise(MADV_DONTNEED)`` of the same VMA, in any schedule.  Both
runs must leave the same SPTEs, page data and flags, the same MMU counters, the same exits and the
same invariant violations: the bulk path is the scalar fault's rules over a range, including
``mmu_invalidate_seq`` / ``mmu_invalidate_in_progress`` and ``mmu_lock``.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmsim.scenarios import ops
from kvmsim.scenarios.runner import build
from kvmsim.scenarios.spec import Scenario

PAGE = 4096
# Counters both paths keep (the bulk path counts GUP's get/put, not per-page facts)
KEYS = ("page_fault", "fast_page_fault", "spte_write", "spte_zap", "tlb_flush", "mark_page_dirty_in_slot",
        "fault_retry", "guest_livelock", "hva_to_pfn", "gup_fast")


def _exits(result: str, count: int) -> int:
    """Pages that did not complete: ``exit×N`` (bulk), or the scalar path's per-page words (one word
    when every page ended alike)."""
    if result.startswith("exit×"):
        return int(result[len("exit×"):])
    words = result.split(",")
    if len(words) == 1:
        return 0 if result == "ok" else count
    return sum(word != "ok" for word in words)


def _thread_exits(step) -> dict[str, int]:
    out = {}
    for part in step[1].split():
        name, result = part.split(":", 1)
        out[name] = _exits(result, step[0].args["threads"][name].args.get("count", 1))
    return out


@st.composite
def interleaved(draw):
    npages = draw(st.integers(65, 200))
    kind = draw(st.sampled_from(["anon", "anon_shared", "memfd"]))
    logging = draw(st.booleans())
    b = (Scenario.builder("bulk-vs-scalar").vma("ram", kind=kind, size=npages * PAGE)
         .vm(policy=draw(st.sampled_from(["legacy", "series"])), arch="x86", mmu=draw(st.sampled_from(["tdp", "shadow"])))
         .memslot(id=0, gpa=0, size=npages * PAGE, vma="ram", flags=["log_dirty_pages"] if logging else []))
    if draw(st.booleans()):                                     # some pages already mapped
        b.step("write", gpa=0, count=draw(st.integers(1, npages)), value=3)
    first = draw(st.integers(0, npages - 65))
    access = {"op": draw(st.sampled_from(["write", "read"])), "gpa": first * PAGE,
              "count": draw(st.integers(65, npages - first))}
    host_op = draw(st.sampled_from(["munmap", "mprotect", "madvise"]))
    if host_op == "mprotect":
        host = {"op": "mprotect", "vma": "ram", "prot": draw(st.sampled_from(["r", "none", "rw"]))}
    else:
        off = draw(st.integers(0, npages - 1))
        host = {"op": host_op, "vma": "ram", "offset": off * PAGE, "size": draw(st.integers(1, npages - off)) * PAGE}
        if host_op == "madvise":
            host["advice"] = "dontneed"
    k = draw(st.integers(0, 6))                                 # the access runs after k host steps
    b.step("interleave", threads={"vcpu": access, "host": host}, order=["host"] * k + ["vcpu"])
    b.step("read", gpa=0, count=npages)
    return b.build()


def _run(sc, threshold: int):
    with mock.patch.object(ops, "BULK_THRESHOLD", threshold):
        return _run_steps(sc)


def _run_steps(sc):
    from kvmsim.check import Checker
    from kvmsim.scenarios.ops import guarded, make_gen
    from kvmsim.sched import drive
    env = build(sc, sc.vm.policies[0])
    kvm = env.kvm
    checker = Checker(kvm)
    checker.run()
    checker.violations.clear()
    steps = []
    for step in sc.steps:
        before = kvm.journal.snapshot()
        res = drive(guarded(make_gen(env, step.op, step.args)))
        found = sorted(v.invariant for v in checker.run())
        delta = kvm.journal.since(before)
        counters = {k: v for k, v in delta.items()
                    if k in KEYS or k.startswith(("set_dirty:", "mark_accessed:"))}
        exits = _thread_exits((step, res.result)) if step.op == "interleave" else \
            _exits(res.result, step.args.get("count", 1))
        steps.append((step.op, exits, res.errno if step.op != "interleave" else None, counters, found))
    slot = kvm.memslots[0].by_id.get(0)
    t = slot.arch.get("x86") if slot is not None else None
    if t is None:                                   # never faulted: no tables yet, i.e. nothing present
        sptes = (np.zeros(slot.npages if slot else 0, np.uint16), np.full(slot.npages if slot else 0, -1),
                 np.ones(slot.npages if slot else 0, np.uint8))
    else:
        sptes = (t.bits.copy(), np.where(t.bits & 1, t.pfn, -1), np.where(t.bits & 1, t.level, 1))
    n = kvm.phys.nr
    return steps, sptes, kvm.phys.data[:n].copy(), kvm.phys.flags[:n].copy()


@settings(max_examples=60, deadline=None)
@given(sc=interleaved())
def test_bulk_and_scalar_agree_under_interleaved_host_ops(sc):
    bulk = _run(sc, 64)
    scalar = _run(sc, 1 << 30)
    for a, b in zip(bulk[0], scalar[0]):
        assert a[:2] == b[:2], (a, b)                             # op and exits
        assert a[3] == b[3], (a[0], a[3], b[3])                   # counters
        assert a[4] == b[4], (a[0], a[4], b[4])                   # violations
    for x, y in zip(bulk[1], scalar[1]):
        assert np.array_equal(x, y)
    assert np.array_equal(bulk[2], scalar[2])
    assert np.array_equal(bulk[3], scalar[3])


def test_a_100_page_write_during_munmap_is_retried_not_installed():
    """The issue's case: a 100-page write runs between munmap's invalidate_range_start and the host
    PTE zap.  The bulk path leaves the pages to the retrying scalar fault (no SPTE for the unmapped
    range, so no INV-5), exactly as 60 pages do; it used to install all 100 and report 100 INV-5."""
    for count in (60, 100):
        sc = (Scenario.builder("inv5").vma("ram", kind="anon", size=128 * PAGE).vm(policy="series")
              .memslot(id=0, gpa=0, size=128 * PAGE, vma="ram")
              .step("write", gpa=0, count=count)
              .step("interleave", threads={"vcpu": {"op": "write", "gpa": 0, "count": count},
                                           "host": {"op": "munmap", "vma": "ram"}}, order=["host", "host", "vcpu"])
              .build())
        steps, sptes, _, _ = _run(sc, 64)
        op, exits, _, counters, found = steps[1]
        assert found == []
        assert exits == {"vcpu": count, "host": 0}                 # each page livelocks: the step runs alone
        assert counters["guest_livelock"] == count
        assert not (sptes[0] & 1).any()                            # nothing mapped


def test_the_bulk_fault_does_not_spin_on_a_held_mmu_lock():
    """The issue's hang: mmu_lock held by another thread (here: taken for write and never released)
    made ``for _ in mmu._lock(): pass`` spin forever.  Now the bulk path leaves the pages to the
    scalar fault, which reports the deadlock as the scalar path alone does."""
    from kvmsim.errors import KvmBug
    sc = (Scenario.builder("held").vma("ram", kind="anon", size=100 * PAGE).vm(policy="series")
          .memslot(id=0, gpa=0, size=100 * PAGE, vma="ram").build())
    env = build(sc, "series")
    sched = env.kvm.sched
    prev, sched.active = sched.active, "other"
    env.kvm.mmu_lock.write_lock()
    sched.active = prev
    with pytest.raises(KvmBug, match="deadlock"):
        env.kvm.arch.guest_access_range(env.kvm.vcpus[0], 0, 100, True, None)


@pytest.mark.parametrize("pfn_class", ["no_page", "normal", "driver_refcounted"])
def test_bulk_hits_on_driver_memory_match_the_scalar_path(pfn_class):
    """Hits on SPTEs of a VM_PFNMAP VMA: an MMIO pfn has no struct page (the model keeps its data
    aside), so the bulk path stores and loads through ``phys.write``/``read`` exactly as the scalar
    access does (it used to index the page array with the 2^40 pfn)."""
    sc = (Scenario.builder("pfnmap-hits").driver("d", pfn_class=pfn_class).vma("bar", kind="pfnmap", size=100 * PAGE,
                                                                              driver="d")
          .vm(policy="series").memslot(id=0, gpa=0, size=100 * PAGE, vma="bar")
          .step("fault", gpa=0, write=True).step("write", gpa=0, count=100, value=7)
          .step("write", gpa=0, count=100, value=9).step("read", gpa=0, count=100).build())
    bulk, scalar = _run(sc, 64), _run(sc, 1 << 30)
    assert [s[:2] for s in bulk[0]] == [s[:2] for s in scalar[0]]
    assert [s[4] for s in bulk[0]] == [s[4] for s in scalar[0]]
    for x, y in zip(bulk[1], scalar[1]):
        assert np.array_equal(x, y)
    assert np.array_equal(bulk[2], scalar[2])
    assert bulk[0][3][1] == 0                                      # the read: no page exited
