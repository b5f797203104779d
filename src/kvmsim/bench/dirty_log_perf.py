"""The dirty_log_perf_test flow (tools/testing/selftests/kvm/dirty_log_perf_test.c ``run_test()``) on
the model, with a wall-clock time and the model's cost counters for every phase.

Flow, as the selftest's: create the VM (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with
``MANUAL_PROTECT_ENABLE | INITIALLY_SET`` unless ``-g``) and the test memslots; the vCPUs populate
their regions with 100% writes; enable ``KVM_MEM_LOG_DIRTY_PAGES`` on every test slot; for each
iteration the vCPUs dirty their regions (``write_percent``), then ``KVM_GET_DIRTY_LOG`` (and
``KVM_CLEAR_DIRTY_LOG`` with manual protect) per slot; disable dirty logging.  With ``-e`` the vCPUs
keep running while logging is disabled; the model plays that as one pass just before the ioctls (the
pages dirtied since the last CLEAR, which the zap then finds D-set: legacy's per-4 KiB dirty marks)
and one pass just after (the faults that re-create huge mappings after zapping collapsible SPTEs,
gone with in-place recovery).  The printed disable time is the ioctls' alone, as in the selftest.

vCPUs run one after another (the model has no parallelism); a phase's time is the sum.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kvmsim.bench.memstress import TEST_GPA, create_test_slots, vcpu_pass, write_masks
from kvmsim.errors import UsageError
from kvmsim.kvm.dirty import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    enable_manual_protect,
    kvm_clear_dirty_log,
    kvm_get_dirty_log,
)
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.host import Host
from kvmsim.types import PAGE_SHIFT
from kvmsim.x86.dirty_log import gfn_aligned_pieces

#: The cost columns: struct-page operations by kind, then the MMU's own work.
STRUCT_PAGE_KINDS = ("set_dirty", "mark_accessed", "get_page", "put_page", "pin", "unpin")
MMU_COUNTERS = ("spte_write", "tlb_flush", "page_fault", "fast_page_fault")
COLUMNS = STRUCT_PAGE_KINDS + MMU_COUNTERS


@dataclass
class Options:
    """dirty_log_perf_test's ``struct test_params`` plus the model's knobs."""

    vcpu_memory: int = 1 << 30          # -b
    vcpus: int = 1                      # -v
    iterations: int = 2                 # -i
    backing: str = "anonymous"          # -s
    write_percent: int = 100            # -w
    slots: int = 1                      # -x
    manual_protect: bool = True         # not -g
    run_while_disabling: bool = False   # -e
    seed: int = 1                       # -r
    v613_other: bool = False
    pml: bool = True                    # False: AMD SVM (no PML), dirty logging write-protects
    teardown: bool = False              # also time the VM's destruction (kvm_destroy_vm), as "teardown"
    phase_stats: bool = False           # record pages_4k/2m/1g at the end of every phase

    def check(self) -> None:
        if self.iterations < 2:
            raise UsageError("-i: iterations must be >= 2 (dirty_log_perf_test's rule)")
        if self.vcpus < 1:
            raise UsageError("-v: at least one vCPU")
        if not 0 <= self.write_percent <= 100:
            raise UsageError("-w: write percent must be in 0..100")
        if self.vcpu_memory <= 0 or self.vcpu_memory % 4096:
            raise UsageError("-b: memory per vCPU must be a positive multiple of 4 KiB")

    @property
    def total(self) -> int:
        return self.vcpu_memory * self.vcpus


@dataclass
class Phase:
    """One printed phase: its selftest name, seconds and counter deltas."""

    name: str
    iteration: int | None
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)
    peak_rss_bytes: int = 0            # the process's peak RSS when the phase ended
    stats: dict[str, int] = field(default_factory=dict)   # leaf counts at its end (Options.phase_stats)

    def summary(self) -> dict[str, int]:
        return summarize(self.counters)


@dataclass
class RunResult:
    backend: str
    policy: str
    options: dict
    phases: list[Phase]
    peak_rss_bytes: int = 0
    wall_seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        for p, ph in zip(d["phases"], self.phases):
            p["summary"] = ph.summary()
        return d

    def phase(self, name: str, iteration: int | None = None) -> Phase:
        for p in self.phases:
            if p.name == name and p.iteration == iteration:
                return p
        raise KeyError((name, iteration))

    def total(self, name: str) -> float:
        return sum(p.seconds for p in self.phases if p.name == name)


def summarize(counters: dict[str, int]) -> dict[str, int]:
    """Fold ``set_dirty:<caller>`` etc. into one number per kind, plus the MMU counters."""
    out = dict.fromkeys(COLUMNS, 0)
    for k, v in counters.items():
        kind = k.split(":", 1)[0]
        if ":" in k and kind in STRUCT_PAGE_KINDS:
            out[kind] += v
        elif k in MMU_COUNTERS:
            out[k] += v
    return out


class _Clock:
    def __init__(self, journal, phases: list[Phase], stats_of=None):
        self.journal, self.phases, self.stats_of = journal, phases, stats_of

    def __call__(self, name: str, iteration: int | None = None):
        clock = self

        class _Ctx:
            def __enter__(self):
                self.before = clock.journal.snapshot()
                self.t0 = time.perf_counter_ns()

            def __exit__(self, *exc):
                dt = time.perf_counter_ns() - self.t0
                if exc[0] is None:
                    clock.phases.append(Phase(name, iteration, dt / 1e9, clock.journal.since(self.before),
                                              peak_rss(), clock.stats_of() if clock.stats_of else {}))
        return _Ctx()


def run_model(opts: Options, policy: str) -> RunResult:
    """Run the whole flow on a fresh host and VM under ``policy``; returns timings and counters."""
    opts.check()
    t_start = time.perf_counter()
    host = Host(recording=False)
    reserve_mem_map(host, opts.total >> PAGE_SHIFT)
    kvm = Kvm(host, policy=policy, arch="x86", mmu="tdp", v613_other=opts.v613_other, pml=opts.pml)
    if opts.manual_protect:
        enable_manual_protect(kvm, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
    slots = create_test_slots(kvm, opts.total, opts.backing, opts.slots)
    vcpus = [kvm.create_vcpu() for _ in range(opts.vcpus)]
    per = opts.vcpu_memory >> PAGE_SHIFT
    rng = np.random.default_rng(opts.seed)
    phases: list[Phase] = []
    clock = _Clock(kvm.journal, phases, (lambda: leaf_stats(kvm)) if opts.phase_stats else None)

    def all_vcpus(value: int, percent: int) -> None:
        for k, v in enumerate(vcpus):
            vcpu_pass(kvm, v, TEST_GPA + k * opts.vcpu_memory, per, write_masks(per, percent, rng), value)

    def set_logging(on: bool) -> None:
        for s in slots:
            kvm.set_user_memory_region(s.slot, s.gpa, s.size, s.vma.start, KVM_MEM.LOG_DIRTY_PAGES if on else 0)

    with clock("populate"):
        all_vcpus(0, 100)
    with clock("enable"):
        set_logging(True)
    for it in range(1, opts.iterations + 1):
        with clock("dirty", it):
            all_vcpus(it, opts.write_percent)
        logs = []
        with clock("get", it):
            for s in slots:
                logs.append(kvm_get_dirty_log(kvm, s.slot))
        if opts.manual_protect:
            with clock("clear", it):
                for s, log in zip(slots, logs):
                    kvm_clear_dirty_log(kvm, s.slot, 0, s.npages, log)
        del logs
    if opts.run_while_disabling:
        with clock("before-disable", opts.iterations + 1):
            all_vcpus(opts.iterations + 1, opts.write_percent)
    with clock("disable"):
        set_logging(False)
    if opts.run_while_disabling:
        with clock("after-disable", opts.iterations + 2):
            all_vcpus(opts.iterations + 2, opts.write_percent)
    stats = leaf_stats(kvm)
    if opts.teardown:
        with clock("teardown"):
            kvm.destroy()
    wall = time.perf_counter() - t_start
    return RunResult("model", policy, asdict(opts), phases, peak_rss(), wall, stats)


def leaf_stats(kvm) -> dict[str, int]:
    """The VM stats ``pages_4k`` / ``pages_2m`` / ``pages_1g`` (leaf counts), as ``X86Mmu.stats()``
    computes them, one 1 GiB piece at a time (no whole-slot temporaries)."""
    out = {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}
    for slots in kvm.memslots:
        for slot in slots:
            t = slot.arch.get("x86")
            if t is None:
                continue
            for lo, hi in gfn_aligned_pieces(slot, 0, slot.npages):
                lv = np.bincount(t.level[t.representatives(slot, lo, hi)], minlength=4)
                out["pages_4k"] += int(lv[1])
                out["pages_2m"] += int(lv[2])
                out["pages_1g"] += int(lv[3])
    return out


def reserve_mem_map(host, npages: int) -> None:
    """Size the host's ``mem_map`` for the guest up front (:meth:`PhysMem.reserve`)."""
    host.phys.reserve(npages)


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` (which :func:`reset_peak_rss` can
    reset), else ``getrusage(RUSAGE_SELF).ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


#: Peak RSS per guest 4 KiB page of the flow (mem_map, host PTEs, SPTEs, bitmaps), measured at 64 GiB
#: (1.12 GiB / 16 Mi pages), rounded up; sizes the warm-up.
BYTES_PER_GUEST_PAGE = 72


def warm_memory(nbytes: int) -> None:
    """Write ``nbytes`` of memory once and free it, before a timed run.

    The development machines are themselves VMs: the first write to guest memory the hypervisor has
    not backed yet costs microseconds per 4 KiB page, and memory freed long enough ago is handed
    back (free page reporting), so a warm-up at the start of a session decays.  Warming right before
    each run makes the numbers measure the model (kvm-on-these-machines.md §2: benchmarks must warm
    up).  Capped at three quarters of MemAvailable."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        nbytes = min(nbytes, avail * 3 // 4)
    except (OSError, StopIteration, ValueError):
        pass
    if nbytes >= 8:
        buf = np.ones(nbytes // 8, dtype=np.int64)
        del buf


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to
    the kernel (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``).

    The bulk paths allocate and free per-GiB temporaries (2 MiB for 256 Ki pages of int64) all the
    time.  By default each is a fresh mmap, and on these VM hosts free page reporting (virtio-balloon)
    hands freed 2 MiB blocks back to the hypervisor, so every temporary is faulted in again at
    several µs per 4 KiB page: measured, that doubled the 64 GiB flow.  A no-op (False) without glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def _run_warm(opts: Options, policy: str, warm: bool) -> RunResult:
    if warm:
        keep_freed_memory()
        if os.access("/proc/self/clear_refs", os.W_OK):  # else the warm-up would count as the run's peak
            warm_memory((opts.total >> PAGE_SHIFT) * BYTES_PER_GUEST_PAGE + (64 << 20))
            reset_peak_rss()
    return run_model(opts, policy)


def run_model_isolated(opts: Options, policy: str, *, warm: bool = True) -> RunResult:
    """:func:`run_model` in a forked child, so its peak RSS is its own (in-process without fork).

    ``warm``: the child first makes malloc keep freed temporaries (:func:`keep_freed_memory`), writes
    and frees as much memory as the run will use (:func:`warm_memory`) and resets its peak RSS,
    all outside the timed flow."""
    import multiprocessing as mp
    try:
        ctx = mp.get_context("fork")
    except ValueError:
        return run_model(opts, policy)
    with ctx.Pool(1) as pool:
        return pool.apply(_run_warm, (opts, policy, warm))
