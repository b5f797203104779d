"""dirty_log_test, dirty_log_page_splitting_test, mmu_stress_test rules and [6.13-other] recovery."""

import numpy as np
from hypothesis import given, settings, strategies as st

from kvmsim.kvm.dirty import (enable_dirty_ring, enable_manual_protect, kvm_clear_dirty_log, kvm_dirty_ring_harvest,
                              kvm_get_dirty_log, kvm_reset_dirty_rings)
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind
from tests.helpers import make_vm
from tests.x86.conftest import LOG

NP = 256


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(["legacy", "series"]), mode=st.sampled_from(["get", "clear", "ring"]),
       pml=st.booleans(), shadow=st.booleans(),
       iters=st.lists(st.sets(st.integers(0, NP - 1), max_size=40), min_size=1, max_size=5))
def test_dirty_log_reports_exactly_the_written_pages(policy, mode, pml, shadow, iters):
    h = Host()
    vma = h.mm.mmap(NP << 12, VmaKind.ANON)
    kvm = Kvm(h, policy=policy, pml=pml, mmu="shadow" if shadow else "tdp")
    if mode == "ring":
        enable_dirty_ring(kvm, 1 << 16)
    if mode == "clear":
        enable_manual_protect(kvm, 1)
    v = kvm.create_vcpu()
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, 0)
    kvm.arch.populate(v, 0, NP, True)                       # mapped writable before logging starts
    kvm.set_user_memory_region(0, 0, NP << 12, vma.start, LOG)
    kvm_get_dirty_log(kvm, 0) if mode != "ring" else None
    if mode == "clear":
        kvm_clear_dirty_log(kvm, 0, 0, NP)
    for it, written in enumerate(iters):
        for g in sorted(written):
            assert v.write(g << 12, it * 1000 + g).ok
        if mode == "ring":
            got = {off for _, off in kvm_dirty_ring_harvest(kvm, v)}
            kvm_reset_dirty_rings(kvm)
        else:
            bm = kvm_get_dirty_log(kvm, 0)
            if mode == "clear":
                kvm_clear_dirty_log(kvm, 0, 0, NP, bm)
            got = set(np.nonzero(bm)[0].tolist())
        assert got == written


def test_page_splitting_at_enable(policy):
    h, kvm, vma, v = make_vm(policy, size=1 << 30, page_size=1 << 30, recording=False, arch="x86")
    kvm.arch.populate(v, 0, 1 << 18, True)
    assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 0, "pages_1g": 1}
    kvm.set_user_memory_region(0, 0, 1 << 30, vma.start, LOG)
    assert kvm.arch.stats() == {"pages_4k": 1 << 18, "pages_2m": 0, "pages_1g": 0}
    kvm.set_user_memory_region(0, 0, 1 << 30, vma.start, 0)
    if kvm.v613_other:          # full v6.13 (the series policy's default): huge pages recovered in place
        assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 0, "pages_1g": 1}
        return
    assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}      # zapped collapsible (v6.12)
    kvm.arch.populate(v, 0, 1 << 18, False)
    assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 0, "pages_1g": 1}


def test_page_splitting_at_first_clear_with_initially_set():
    h = Host()
    vma = h.mm.mmap(8 << 20, VmaKind.HUGETLB, page_size=1 << 21)
    kvm = Kvm(h, policy="series")
    enable_manual_protect(kvm, 3)
    v = kvm.create_vcpu()
    kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, 0)
    kvm.arch.populate(v, 0, 2048, True)
    assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 4, "pages_1g": 0}
    kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, LOG)
    assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 4, "pages_1g": 0}       # nothing at enable
    kvm_clear_dirty_log(kvm, 0, 0, 512)                                              # first 2M region only
    assert kvm.arch.stats() == {"pages_4k": 512, "pages_2m": 3, "pages_1g": 0}
    kvm_clear_dirty_log(kvm, 0, 512, 2048 - 512)
    assert kvm.arch.stats() == {"pages_4k": 2048, "pages_2m": 0, "pages_1g": 0}
    kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, 0)
    kvm.arch.populate(v, 0, 2048, False)
    assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 4, "pages_1g": 0}


def test_613_other_recovers_in_place_with_one_flush():
    for other in (False, True):
        h, kvm, vma, v = make_vm("series", size=8 << 20, page_size=1 << 21, v613_other=other, arch="x86")
        kvm.arch.populate(v, 0, 2048, True)
        kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, LOG)
        assert kvm.arch.stats()["pages_4k"] == 2048
        before = kvm.journal.snapshot()
        kvm.set_user_memory_region(0, 0, 8 << 20, vma.start, 0)
        d = kvm.journal.since(before)
        assert d.get("tlb_flush") == (1 if other else 4)
        assert kvm.arch.stats()["pages_2m"] == (4 if other else 0)
        before = kvm.journal.snapshot()
        kvm.arch.populate(v, 0, 2048, False)
        assert kvm.journal.since(before).get("page_fault", 0) == (0 if other else 4)
        assert kvm.arch.stats() == {"pages_4k": 0, "pages_2m": 4, "pages_1g": 0}


def test_mmu_stress_readonly_vma_and_teardown(policy):
    h, kvm, vma, v = make_vm(policy, size=4 << 20, kind=VmaKind.ANON, page_size=4096, arch="x86")
    kvm.arch.populate(v, 0, 1024, True)
    h.mm.mprotect(vma.start, 4 << 20, "r")
    a = v.write(0x5000, 1)
    assert a.exit == Exit.EFAULT
    assert v.read(0x5000).ok
    kvm.set_user_memory_region(0, 0, 0, vma.start, 0)
    h.mm.munmap(vma.start, 4 << 20)
    assert kvm.host_refs == {}
    assert list(kvm.arch.leaves()) == []
