"""The per-world scheduler: it owns the active thread and resumes threads; strategies only choose."""

import pytest

from kvmsim.errors import KvmBug
from kvmsim.kvm.kvm import MmuLock
from kvmsim.sched import DEFAULT_SCHEDULER, MAIN, Scheduler, Wait, drive
from tests.helpers import make_vm


def _holder(lock, out):
    yield from lock.write_lock.steps()
    out.append((lock.writer, lock.held()))
    yield "critical section"
    lock.write_unlock()
    return lock.writer


def test_each_world_has_its_own_scheduler_and_locks_use_it():
    (h1, k1, _, _), (h2, k2, _, _) = make_vm(), make_vm()
    assert k1.sched is h1.sched and k1.mmu_lock.sched is h1.sched and h1.sched is not h2.sched
    seen = []
    res = k1.sched.run_interleaved({"vcpu0": _holder(k1.mmu_lock, seen)}, ["vcpu0"])
    assert seen == [("vcpu0", True)] and res == {"vcpu0": None}
    assert k1.sched.active == MAIN and h2.sched.active == MAIN     # restored; the other world untouched
    assert MmuLock().sched is DEFAULT_SCHEDULER


def test_a_lock_blocks_the_other_thread_until_released():
    _, kvm, _, _ = make_vm()
    seen = []
    kvm.sched.run_interleaved({"a": _holder(kvm.mmu_lock, seen), "b": _holder(kvm.mmu_lock, seen)},
                              ["a", "b"])
    assert seen == [("a", True), ("b", True)]


def test_a_script_stepping_a_blocked_thread_is_refused():
    _, kvm, _, _ = make_vm()
    seen = []
    with pytest.raises(KvmBug, match="schedule step 4 steps b while it blocks at 'write_lock\\(mmu_lock\\)'"):
        kvm.sched.run_interleaved({"a": _holder(kvm.mmu_lock, seen), "b": _holder(kvm.mmu_lock, seen)},
                                  ["a", "a", "b", "b"])
    # The impossible script is reported only after every thread ran to its end: no lock left held.
    assert seen == [("a", True), ("b", True)]
    assert kvm.mmu_lock.writer is None and not kvm.mmu_lock.readers


def test_deadlock_is_reported_not_spun():
    never = Wait("wait_event(never)", lambda: False)

    def stuck():
        yield never

    with pytest.raises(KvmBug, match=r"deadlock: \['x', 'y'\] all blocked"):
        Scheduler().run_interleaved({"x": stuck(), "y": stuck()}, [])
    with pytest.raises(KvmBug, match="deadlock: main blocks at 'wait_event\\(never\\)'"):
        Scheduler().drive(stuck())
    with pytest.raises(KvmBug, match="blocks at"):
        drive(stuck())


def test_round_robin_after_the_script():
    order = []

    def t(name, n):
        for _ in range(n):
            order.append(name)
            yield name

    Scheduler().run_interleaved({"a": t("a", 3), "b": t("b", 2)}, ["b"])
    assert order == ["b", "a", "b", "a", "a"]
