"""Issue 11, "Hangs and crashes in the model": each case found by random scenarios, pinned.

Every step either does what the kernel does or returns the kernel's errno; a scripted interleaving
that cannot happen is refused without leaving a lock or an invalidation behind; a fault that keeps
retrying is a livelock, never EFAULT.
"""

from __future__ import annotations

import errno

import pytest

from kvmsim.scenarios.runner import build, run
from kvmsim.scenarios.spec import Scenario

ARCHES = [("x86", "tdp"), ("x86", "shadow"), ("arm64", "tdp"), ("riscv", "tdp"), ("generic", "tdp")]


def _ram(name: str, size: str = "16K", **vm):
    return (Scenario.builder(name).vma("ram", kind="anon", size=size).vm(policy="series", **vm)
            .memslot(id=0, gpa=0, size=size, vma="ram"))


def _results(rr):
    return [(s.res.result, s.res.errno) for s in rr.steps]


# ---- the hang ------------------------------------------------------------------------------------------

def test_an_impossible_schedule_leaves_no_lock_behind_and_the_next_bulk_write_completes():
    """``order`` names gfn_to_page after it finished while mprotect held mmu_lock for write: the
    interleave is refused (EIO) but mprotect runs to its end, so the 100-page write afterwards takes
    the bulk path and completes instead of spinning on the lock."""
    sc = (_ram("hang", "1M")
          .step("interleave", threads={"a": {"op": "gfn_to_page", "gpa": 0x1000, "write": True},
                                        "b": {"op": "mprotect", "vma": "ram", "prot": "rw"}},
                order=["b", "a", "a", "a"])
          .step("write", gpa=0, count=100).build())
    env = build(sc, "series")
    rr = run(sc, "series")
    assert rr.error is None
    assert rr.steps[0].res.errno == errno.EIO
    assert "schedule step 4 names 'a', which has finished" in rr.steps[0].res.value
    assert rr.steps[1].res.result == "ok"
    # and on a fresh build, the same interleave leaves mmu_lock free and no invalidation running
    from kvmsim.errors import KvmBug
    from kvmsim.scenarios.ops import make_gen
    from kvmsim.sched import drive
    with pytest.raises(KvmBug):
        drive(make_gen(env, "interleave", sc.steps[0].args))
    assert env.kvm.mmu_lock.writer is None and not env.kvm.mmu_lock.readers
    assert env.kvm.mmu_invalidate_in_progress == 0 and env.kvm.mn_active_invalidate_count == 0


def test_a_partial_mprotect_is_refused_before_the_invalidation_starts():
    sc = _ram("mprotect-part").step("mprotect", vma="ram", offset=0x1000, size=0x1000, prot="r").build()
    env = build(sc, "series")
    rr = run(sc, "series")
    assert _results(rr) == [("error", errno.EINVAL)]
    from kvmsim.errors import ModelError
    with pytest.raises(ModelError):
        env.mm.mprotect(env.hva("ram", 0x1000), 0x1000, "r")
    assert env.kvm.mmu_invalidate_in_progress == 0 and env.kvm.mn_active_invalidate_count == 0


# ---- RET_PF_RETRY is re-entry; no progress is a livelock --------------------------------------------------

@pytest.mark.parametrize("arch,mmu", ARCHES)
def test_a_fault_that_keeps_retrying_is_a_livelock_not_efault(arch, mmu):
    """munmap is between invalidate_range_start and _end (its thread paused) while the vCPU writes:
    every fault retries.  The kernel re-enters the guest (it never turns RET_PF_RETRY into -EFAULT);
    within one model step nothing can end the invalidation, so the access reports a livelock."""
    sc = (_ram("livelock", arch=arch, mmu=mmu).step("write", gpa=0, count=4)
          .step("interleave", threads={"vcpu": {"op": "write", "gpa": 0x1000}, "host": {"op": "munmap", "vma": "ram"}},
                order=["host", "host", "vcpu"])
          .step("write", gpa=0x1000).build())
    rr = run(sc, "series")
    assert rr.error is None and rr.verdict == "clean"
    assert rr.steps[1].res.result == "vcpu:livelock host:ok"
    assert rr.steps[1].counters["guest_livelock"] == 1
    assert rr.steps[1].counters["fault_retry"] >= 2
    assert "livelock at gpa 0x1000" in rr.steps[1].res.value["vcpu"]
    assert _results(rr)[2] == ("efault", errno.EFAULT)          # after munmap: the hva is gone


@pytest.mark.parametrize("arch,mmu", ARCHES)
def test_a_retry_that_makes_progress_is_not_a_livelock(arch, mmu):
    """A retry whose invalidation ended by the next entry maps on re-entry: one fault more, no exit."""
    from kvmsim.kvm.stage2 import RET_PF
    sc = _ram("retry-once", arch=arch, mmu=mmu).build()
    env = build(sc, "series")
    kvm, vcpu = env.kvm, env.kvm.vcpus[0]
    real = kvm.arch.page_fault
    calls = []

    def flaky(vcpu, gpa, write, exec=False):
        calls.append(gpa)
        if len(calls) == 1:
            kvm.mmu_invalidate_seq += 1                   # an invalidation ended meanwhile
            return RET_PF.RETRY
        return real(vcpu, gpa, write)
    kvm.arch.page_fault = flaky
    acc = vcpu.access(0x1000, True, 5)
    assert acc.ok and len(calls) == 2
    assert kvm.journal.counters.get("guest_livelock", 0) == 0


# ---- crashes from valid scenarios -------------------------------------------------------------------------

def test_thp_collapse_of_a_mixedmap_vma_is_einval():
    sc = (Scenario.builder("thp-mixed").driver("d", pfn_class="normal").vma("m", kind="mixedmap", size="4M", driver="d")
          .vm(policy="series").memslot(id=0, gpa=0, size="4M", vma="m")
          .step("write", gpa=0, count=4).step("thp_collapse", vma="m").build())
    rr = run(sc, "series")
    assert rr.error is None
    assert _results(rr)[1] == ("error", errno.EINVAL)


def test_folio_referenced_of_an_mmio_pfn_is_no_page():
    sc = (Scenario.builder("ref-nopage").driver("d", pfn_class="no_page").vma("m", kind="pfnmap", size="16K", driver="d")
          .vm(policy="series").memslot(id=0, gpa=0, size="16K", vma="m")
          .step("folio_referenced", vma="m", count=4).build())
    rr = run(sc, "series")
    assert rr.error is None
    assert rr.steps[0].res.per_page == ["no_page"] * 4


def test_reclaim_refuses_pfnmap_and_skips_driver_pages_of_a_mixedmap():
    sc = (Scenario.builder("reclaim-drv").driver("p", pfn_class="normal").driver("m", pfn_class="normal", mixed=True)
          .vma("pfn", kind="pfnmap", size="4K", driver="p").vma("mix", kind="mixedmap", size="4K", driver="m")
          .vm(policy="series").step("reclaim", vma="pfn").step("reclaim", vma="mix").step("migrate", vma="mix").build())
    rr = run(sc, "series")
    assert rr.error is None
    assert _results(rr)[0] == ("error", errno.EINVAL)
    assert rr.steps[1].res.value == {"young": 0, "reclaimed": 0, "busy": 0}
    assert _results(rr)[2] == ("error", errno.EBUSY)


@pytest.mark.parametrize("arch,mmu", ARCHES)
def test_every_op_on_a_destroyed_vm_is_ebadf_on_every_arch(arch, mmu):
    """``kvm_destroy_vm()`` runs once the last VM and vCPU fd is closed: whatever the VMM then asks
    of the VM fails alike on every arch (no "model raised" on arm64/RISC-V/generic)."""
    ops = [("zap", {"gpa": 0}), ("store", {"gpa": 0}), ("write", {"gpa": 0}), ("read", {"gpa": 0, "count": 100}),
           ("fault", {"gpa": 0}), ("vcpu_map", {"gpa": 0}), ("gfn_to_page", {"gpa": 0}),
           ("pfncache_activate", {"gpa": 0}), ("memslot_set", {"id": 1, "gpa": 0x100000, "size": "4K", "vma": "ram"}),
           ("get_dirty_log", {"slot": 0}), ("ring_reset", {}), ("vm_destroy", {})]
    b = _ram("destroyed", "1M", arch=arch, mmu=mmu).step("write", gpa=0).step("vm_destroy")
    for op, args in ops:
        b.step(op, **args)
    b.step("host_write", vma="ram", value=3)                     # the host itself goes on
    rr = run(b.build(), "series")
    assert rr.error is None
    assert _results(rr)[:2] == [("ok", 0), ("ok", 0)]
    assert _results(rr)[2:-1] == [("error", errno.EBADF)] * len(ops)
    assert "vm_destroy" in rr.steps[2].res.value
    assert _results(rr)[-1] == ("ok", 0)


def test_vm_destroy_cannot_interleave_with_an_ioctl_on_the_vm():
    sc = (_ram("destroy-il").step("interleave", threads={"a": {"op": "vm_destroy"}, "b": {"op": "write", "gpa": 0}},
                                  order=["b", "a"]).build())
    rr = run(sc, "series")
    assert rr.error is None and _results(rr) == [("error", errno.EINVAL)]


@pytest.mark.parametrize("order", [["a", "b", "a", "b", "a", "b"], ["b", "a", "b", "a", "b", "a"],
                                   ["a", "a", "a", "b", "b", "b"]])
def test_mremap_and_a_partial_munmap_of_the_vma_serialise_on_mmap_lock(order):
    """The kernel takes mmap_write_lock for both: whichever starts first runs to its end.  A schedule
    that steps the one waiting for the lock is refused (EIO) after both finished; the VMAs are then
    consistent either way: munmap first leaves a hole and mremap of the whole VMA is EFAULT; mremap
    first moves the VMA, and the munmap of the old address then finds nothing there (the VMM passed an
    address; it does not follow the move)."""
    sc = (_ram("mremap-munmap").step("write", gpa=0, count=4)
          .step("interleave", threads={"a": {"op": "mremap", "vma": "ram"},
                                       "b": {"op": "munmap", "vma": "ram", "offset": 0x1000, "size": 0x1000}},
                order=order).build())
    env = build(sc, "series")
    rr = run(sc, "series")
    assert rr.error is None
    assert rr.steps[1].res.errno in (0, errno.EIO)
    from kvmsim.scenarios.ops import guarded, make_gen
    from kvmsim.sched import drive
    for step in sc.steps:
        drive(guarded(make_gen(env, step.op, step.args)))
    mm = env.mm
    assert mm.mmap_lock.writer is None and not mm.mmap_lock.readers
    assert env.kvm.mmu_invalidate_in_progress == 0
    assert mm._starts == [v.start for v in mm.vmas] == sorted(mm._starts)
    total = sum(v.npages for v in mm.vmas)
    if order[0] == "b":                  # munmap first: the hole makes mremap EFAULT ("not a whole VMA")
        assert total == 3
    else:                                # mremap first: munmap of the old address finds nothing there
        assert total == 4 and [v.npages for v in mm.vmas if v.start == env.hva("ram")] == [4]


def test_a_guest_store_and_zap_where_no_memslot_is():
    sc = (_ram("noslot", arch="generic").step("store", gpa=0x100000).step("zap", gpa=0x100000)
          .step("interleave", threads={"s": {"op": "store", "gpa": 0x1000}, "d": {"op": "memslot_delete", "id": 0}},
                order=["s", "d"]).build())
    rr = run(sc, "series")
    assert rr.error is None
    assert _results(rr)[:2] == [("mmio", 0), ("ok", 0)]


@pytest.mark.parametrize("arch,mmu", ARCHES)
def test_a_memslot_move_waits_for_a_fault_in_flight(arch, mmu):
    """A fault holds its memslot under kvm->srcu; KVM_SET_USER_MEMORY_REGION publishes the moved slot
    only after synchronize_srcu, so the fault completes on the old layout first (the model used to
    move the slot under the fault: a negative index into its tables)."""
    sc = (_ram("move-vs-fault", arch=arch, mmu=mmu)
          .step("interleave", threads={"f": {"op": "fault", "gpa": 0, "write": True},
                                       "m": {"op": "memslot_move", "id": 0, "gpa": 0x80000000}}, order=["f", "m"])
          .step("read", gpa=0x80000000).build())
    rr = run(sc, "series")
    assert rr.error is None
    assert _results(rr) == [("f:fixed m:move", 0), ("ok", 0)]    # the fault ended first, then the move
    sc.steps[0].args["order"] = ["f", "m", "m"]                   # steps m while it waits: impossible
    rr = run(sc, "series")
    assert rr.error is None
    assert rr.steps[0].res.errno == errno.EIO and "synchronize_srcu" in rr.steps[0].res.value
    assert _results(rr)[1] == ("ok", 0)
