"""Scalar and bulk accesses leave the same state and counters; INV-11 fires on a broken SPTE; prefetch."""

import numpy as np
from hypothesis import given, settings, strategies as st

from kvmsim.kvm.dirty import kvm_get_dirty_log
from kvmsim.mm.vma import VmaKind
from kvmsim.x86.spte import HW, P, W, spte_write
from tests.helpers import make_vm
from tests.strategies import policies, x86_access_ops
from tests.x86.conftest import LOG

KEYS = ("page_fault", "fast_page_fault", "spte_write", "tlb_flush", "mark_page_dirty_in_slot")

ops = x86_access_ops(1024, 600)


def run(policy, seq, bulk, kind, page_size):
    h, kvm, vma, v = make_vm(policy, size=4 << 20, kind=kind, page_size=page_size, arch="x86")
    flags = 0
    for op, g, n in seq:
        n = min(n, 1024 - g)
        if op in ("read", "write"):
            w = op == "write"
            if bulk:
                kvm.arch.guest_access_range(v, g << 12, n, w, np.arange(g, g + n) if w else None)
            else:
                for k in range(g, g + n):
                    assert v.access(k << 12, w, k if w else None).ok
        elif op in ("log_on", "log_off"):
            flags = LOG if op == "log_on" else 0
            kvm.set_user_memory_region(0, 0, 4 << 20, vma.start, flags)
        elif op == "getlog" and flags:
            kvm_get_dirty_log(kvm, 0)
        elif op == "age":
            kvm.notifier.clear_young(vma.start, vma.end)
    t = kvm.memslots[0].by_id[0].arch.get("x86")
    counters = {k: v for k, v in kvm.journal.counters.items()
                if k in KEYS or k.startswith(("set_dirty:", "mark_accessed:"))}
    flags_ = h.phys.flags[: h.phys.nr].copy()
    bm = kvm.memslots[0].by_id[0].dirty_bitmap
    return (t.bits.copy(), t.pfn.copy(), t.level.copy()) if t is not None else None, counters, flags_, \
        None if bm is None else bm.copy(), h.phys.data[: h.phys.nr].copy()


@settings(max_examples=30, deadline=None)
@given(policy=policies, seq=ops, huge=st.booleans())
def test_scalar_and_bulk_agree(policy, seq, huge):
    kind, ps = (VmaKind.HUGETLB, 1 << 21) if huge else (VmaKind.ANON, 4096)
    a = run(policy, seq, False, kind, ps)
    b = run(policy, seq, True, kind, ps)
    if a[0] is not None or b[0] is not None:
        for x, y in zip(a[0], b[0]):
            assert np.array_equal(x, y)
    assert a[1] == b[1]
    assert np.array_equal(a[2], b[2])
    assert (a[3] is None) == (b[3] is None) and (a[3] is None or np.array_equal(a[3], b[3]))
    assert np.array_equal(a[4], b[4])


def test_inv11_fires_on_a_broken_spte():
    h, kvm, vma, v = make_vm("series", size=64 << 12, kind=VmaKind.ANON, page_size=4096, arch="x86")
    assert v.write(0, 1).ok
    slot = kvm.memslots[0].by_id[0]
    assert not [f for f in h.journal.facts if f.kind == "inv11"]
    t = slot.arch["x86"]
    spte_write(kvm, slot, 0, 1, int(t.bits[0]) & ~HW, caller="test")          # Host-W flips while present
    spte_write(kvm, slot, 1, 2, P | W, 1234, 1, caller="test")                  # W without MMU-W/Host-W
    assert len([f for f in h.journal.facts if f.kind == "inv11"]) == 2
    assert kvm.journal.counters["inv11"] == 2


def test_shadow_prefetch_neighbours(policy):
    h, kvm, vma, v = make_vm(policy, size=64 << 12, kind=VmaKind.ANON, page_size=4096, mmu="shadow", arch="x86")
    for g in range(16):
        h.mm.host_access(vma.start + (g << 12), True, g)                      # host PTEs present
    assert v.read(3 << 12).ok
    leaves = sorted(l.gfn for l in kvm.arch.leaves())
    assert leaves == list(range(8))                                           # 1 fault + 7 prefetched
    pre = [l for l in kvm.arch.leaves() if l.gfn != 3]
    assert all(not l.accessed for l in pre)                                   # prefetch: no A bit
    assert kvm.host_refs == {}
    before = kvm.journal.snapshot()
    assert v.read(5 << 12).ok
    assert kvm.journal.since(before).get("page_fault", 0) == 0
