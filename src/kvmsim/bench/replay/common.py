"""What every dirty-tracking replay shares: the VM (memstress's slots and guest pass, as
:mod:`kvmsim.bench.dirty_log_perf` builds it), the guest's workload on a virtual clock, the
lost-write oracle and the result record.

The oracle (:class:`WriteOracle`) keeps one bit per guest page: "written since it was last sent
(migration) or captured (snapshot)".  A guest write sets it, the VMM sending or capturing the page
clears it; a page sent whose bit was clear was over-reported.  At the end of a migration (after the
stop-and-copy pass) or of each snapshot epoch, every bit still set is a lost write: the destination
or the snapshot chain holds an older copy of that page.  The bits come from the guest's own write
masks, never from KVM's bitmap or ring, so a harvest that misses a write is caught.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kvmsim.bench.dirty_log_perf import reserve_mem_map, summarize
from kvmsim.bench.memstress import create_test_slots, vcpu_pass
from kvmsim.errors import KvmsimError, UsageError
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE

class ReplayError(KvmsimError):
    """A replay could not run as its VMM would (a guest access exited, an ioctl failed)."""


@dataclass
class Iteration:
    """One pass of the VMM: what it harvested and sent, and the guest's writes meanwhile."""

    index: int
    reported: int            # pages the harvest reported dirty (sent / captured)
    over_reported: int       # of those, pages not written since last sent
    guest_writes: int        # pages the guest wrote during the pass
    virtual_seconds: float   # the pass's length on the VMM's clock (send time)


@dataclass
class ReplayResult:
    """One replay run: one variant of the VMM flow under one protocol (and arch)."""

    replay: str
    variant: str
    policy: str
    arch: str
    params: dict
    sources: list[str]
    pages_lost: int = 0
    pages_over_reported: int = 0
    pages_sent: int = 0
    guest_writes: int = 0
    iterations: int = 0
    converged: bool | None = None
    downtime_ms: float | None = None
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    per_iteration: list[Iteration] = field(default_factory=list)

    @property
    def faults(self) -> int:
        """Stage-2 faults taken (``page_fault`` counts every one; ``fast_page_fault`` those of them the
        fast path fixed)."""
        return self.counters.get("page_fault", 0)

    def to_json(self) -> dict:
        d = asdict(self)
        d["faults"] = self.faults
        return d


def counters_of(journal, before: dict[str, int]) -> dict[str, int]:
    """The cost columns (struct-page operations by kind, SPTE writes, TLB flushes, faults) since ``before``."""
    return summarize(journal.since(before))


class WriteOracle:
    """One bit per guest page of a slot: written since last sent/captured (see the module docstring)."""

    def __init__(self, npages: int, *, owed: bool):
        self.owed = np.full(npages, owed, dtype=bool)
        self.writes = 0
        self.over = 0
        self.sent = 0

    def wrote(self, lo: int, mask: np.ndarray) -> None:
        self.owed[lo:lo + len(mask)] |= mask
        self.writes += int(np.count_nonzero(mask))

    def send(self, lo: int, mask: np.ndarray) -> int:
        """The VMM sends/captures the pages ``lo + k`` with ``mask[k]``; returns how many were over-reported."""
        seg = self.owed[lo:lo + len(mask)]
        n = int(np.count_nonzero(mask))
        over = n - int(np.count_nonzero(seg & mask))
        seg &= ~mask
        self.over += over
        self.sent += n
        return over

    def lost(self) -> int:
        return int(np.count_nonzero(self.owed))


class Guest:
    """The guest's writes on the VMM's virtual clock: each vCPU writes ``rate`` pages per second of
    its region (random pages, ``memstress_guest_code()`` with the matching write percentage; the pages
    it does not write it reads, as memstress does), through :func:`kvmsim.bench.memstress.vcpu_pass`.

    ``regions``: ``(vcpu, first page, npages, pages per second)`` relative to the slot.
    ``budget(vcpu)``: the most pages the vCPU may write before its next exit (None: unbounded);
    ``on_exit(vcpu)`` is called when it ran out (KVM_EXIT_DIRTY_RING_FULL)."""

    def __init__(self, kvm, slot, oracle: WriteOracle, regions, rng: np.random.Generator,
                 budget=None, on_exit=None):
        self.kvm, self.slot, self.oracle, self.regions, self.rng = kvm, slot, oracle, regions, rng
        self.budget, self.on_exit = budget, on_exit
        self.carry = [0.0] * len(regions)
        self.value = 1
        self.paused = False

    def run(self, seconds: float) -> int:
        """Let the guest run for ``seconds`` of virtual time; returns the pages it wrote."""
        if self.paused or seconds <= 0:
            return 0
        total = 0
        for k, (vcpu, lo, n, rate) in enumerate(self.regions):
            want = self.carry[k] + rate * seconds
            count = min(n, int(want))
            self.carry[k] = want - int(want)
            if not count:
                continue
            mask = np.zeros(n, dtype=bool)
            mask[self.rng.choice(n, count, replace=False)] = True
            total += self._write(vcpu, lo, mask)
        return total

    def _write(self, vcpu, lo: int, mask: np.ndarray) -> int:
        pos = np.flatnonzero(mask)
        done = 0
        while done < len(pos):
            room = len(pos) - done if self.budget is None else self.budget(vcpu)
            if room <= 0:
                self.on_exit(vcpu)
                continue
            a = int(pos[done])
            last = int(pos[min(done + room, len(pos)) - 1])
            sub = mask[a:last + 1]
            self._pass(vcpu, lo + a, sub)
            done += int(np.count_nonzero(sub))
        return done

    def _pass(self, vcpu, lo: int, mask: np.ndarray) -> None:
        journal = self.kvm.journal
        before = journal.counters.get("range_access_exit", 0)
        vcpu_pass(self.kvm, vcpu, self.slot.gpa + (lo << PAGE_SHIFT), len(mask), mask, self.value)
        if journal.counters.get("range_access_exit", 0) != before:
            raise ReplayError(f"a guest access in pages [{lo}, +{len(mask)}) exited; the replay expects RAM")
        self.oracle.wrote(lo, mask)
        self.value += 1


@dataclass
class DirtyVm:
    """A VM built as dirty_log_perf_test builds it, with one test memslot."""

    host: object
    kvm: object
    slot: object           # kvmsim.bench.memstress.TestSlot
    vcpus: list


def build_vm(policy: str, memory: int, nvcpus: int, *, manual_flags: int = 0, ring_bytes: int = 0,
             log_from_start: bool = False, backing: str = "anonymous", pml: bool = True) -> DirtyVm:
    """Host, x86 TDP VM, capabilities, one memslot of ``memory`` bytes and ``nvcpus`` vCPUs; the guest
    then touches all of its memory (boot), before or (``log_from_start``) after logging is on.
    ``pml``: Intel PML (dirty logging clears D bits, writes do not fault); False: AMD SVM, where
    dirty logging write-protects and every first write after a harvest takes a fast page fault."""
    from kvmsim.kvm.dirty import enable_dirty_ring, enable_manual_protect
    from kvmsim.kvm.kvm import Kvm
    from kvmsim.mm.host import Host
    if memory <= 0 or memory % (2 << 20):
        raise UsageError(f"--memory {memory}: must be a positive multiple of 2 MiB")
    host = Host(recording=False)
    reserve_mem_map(host, memory >> PAGE_SHIFT)
    kvm = Kvm(host, policy=policy, arch="x86", mmu="tdp", pml=pml)
    if manual_flags:
        enable_manual_protect(kvm, manual_flags)
    if ring_bytes:
        enable_dirty_ring(kvm, ring_bytes)
    vcpus = [kvm.create_vcpu() for _ in range(nvcpus)]
    (slot,) = create_test_slots(kvm, memory, backing, 1)
    vm = DirtyVm(host, kvm, slot, vcpus)
    if log_from_start:
        set_logging(vm, True)
    vcpu_pass(kvm, vcpus[0], slot.gpa, slot.npages, None, 0)     # the guest boots: every page written
    return vm


def set_logging(vm: DirtyVm, on: bool) -> None:
    """``KVM_SET_USER_MEMORY_REGION`` toggling ``KVM_MEM_LOG_DIRTY_PAGES`` on the test slot."""
    from kvmsim.uapi import KVM_MEM
    s = vm.slot
    vm.kvm.set_user_memory_region(s.slot, s.gpa, s.size, s.vma.start, KVM_MEM.LOG_DIRTY_PAGES if on else 0)


def send_seconds(npages: int, bandwidth: int) -> float:
    """Time to put ``npages`` guest pages on a link of ``bandwidth`` bytes per second."""
    return npages * PAGE_SIZE / bandwidth


class Stopwatch:
    """Wall time and the journal's counters over a replay's migration/snapshot flow."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.before = kvm.journal.snapshot()
        self.t0 = time.perf_counter()

    def finish(self, res: ReplayResult) -> ReplayResult:
        res.wall_seconds = time.perf_counter() - self.t0
        res.counters = counters_of(self.kvm.journal, self.before)
        return res


def chunks(npages: int, chunk: int):
    """``[lo, hi)`` pieces of ``chunk`` pages."""
    for lo in range(0, npages, chunk):
        yield lo, min(npages, lo + chunk)
