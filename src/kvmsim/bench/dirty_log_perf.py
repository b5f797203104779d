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

Before anything is allocated, :func:`check_memory` refuses a run whose estimated footprint
(:data:`BYTES_PER_GUEST_PAGE` per guest page plus :data:`BASE_BYTES`) exceeds ``MemAvailable``.
Model runs go to a forked worker (:func:`run_model_isolated`) that reports each phase back as it
starts and ends; SIGTERM or SIGINT to the parent stops the worker, and the worker dies with the
parent (``PR_SET_PDEATHSIG``) even if the parent is killed outright.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

import kvmsim.kvm.pfn_bulk  # noqa: F401  (imported lazily by the MMU's and policies' bulk paths:
import kvmsim.x86.bulk  # noqa: F401      imported here, their compilation is not timed as populate)
from kvmsim.bench.memstress import TEST_GPA, create_test_slots, vcpu_pass, write_masks
from kvmsim.errors import KvmsimError, UsageError
from kvmsim.kvm.dirty import enable_manual_protect, kvm_clear_dirty_log, kvm_get_dirty_log
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.types import PAGE_SHIFT
from kvmsim.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM
from kvmsim.x86.dirty_log import gfn_aligned_pieces
from kvmsim.x86.spte import tables

#: The cost columns: struct-page operations by kind, then the MMU's own work.
STRUCT_PAGE_KINDS = ("set_dirty", "mark_accessed", "get_page", "put_page", "pin", "unpin")
MMU_COUNTERS = ("spte_write", "tlb_flush", "page_fault", "fast_page_fault")
COLUMNS = STRUCT_PAGE_KINDS + MMU_COUNTERS

#: ``KVM_MAX_VCPUS`` on x86 (arch/x86/include/asm/kvm_host.h, v6.12 and v6.13): the largest ``-v``;
#: dirty_log_perf_test refuses more than ``KVM_CAP_MAX_VCPUS`` the same way.
KVM_MAX_VCPUS = 4096
#: ``-r`` is read with ``atoi_positive("Random seed", optarg)`` into a ``uint32_t``: 1 .. INT_MAX.
SEED_MAX = 2**31 - 1

#: Peak RSS per guest 4 KiB page of the flow (mem_map, host PTEs, SPTEs, bitmaps, per-GiB
#: temporaries), above :data:`BASE_BYTES`.  Measured with ``kvmsim bench dirty-log --json``
#: (``peak_rss_bytes``, both policies): 62 B/page anonymous at 2, 8 and 32 GiB; 68 THP; 70 shmem with
#: ``-v 4 -x 4``; 78 hugetlb-2M with ``-e``; rounded up.  Sizes the memory check and the warm-up.
BYTES_PER_GUEST_PAGE = 80
#: The interpreter, numpy and the model's fixed structures (~82 MiB measured), rounded up.
BASE_BYTES = 96 << 20

#: A phase's progress: ``(name, iteration, seconds)``, seconds None when the phase starts.
Progress = Callable[[str, "int | None", "float | None"], None]


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
    floor: bool = False                 # measure the copy bandwidth and each phase's memory floor (bench.floor)

    def check(self) -> None:
        if self.iterations < 2:
            raise UsageError("-i: iterations must be >= 2 (dirty_log_perf_test's rule)")
        if not 1 <= self.vcpus <= KVM_MAX_VCPUS:
            raise UsageError(f"-v: invalid number of vcpus, must be between 1 and {KVM_MAX_VCPUS}")
        if not 1 <= self.seed <= SEED_MAX:
            raise UsageError(f"-r: the random seed must be in 1..{SEED_MAX} (atoi_positive)")
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
    cpu_seconds: float = 0.0           # the process's CPU time (user + system) over the phase
    floor_bytes: int | None = None     # per-page state it must read plus write (bench.floor), if known
    floor_seconds: float | None = None  # floor_bytes over the run's copy bandwidth
    floor_cpu_seconds: float | None = None  # floor_bytes over the copy bandwidth per CPU second

    @property
    def floor_multiple(self) -> float | None:
        """The phase's time as a multiple of its memory floor."""
        return self.seconds / self.floor_seconds if self.floor_seconds else None

    @property
    def floor_multiple_cpu(self) -> float | None:
        """The phase's CPU time as a multiple of its floor in CPU time (robust on a shared machine)."""
        return self.cpu_seconds / self.floor_cpu_seconds if self.floor_cpu_seconds else None

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
    copy_bandwidth: float = 0.0        # bytes read + written per second, numpy copy of 1 GiB (Options.floor)
    copy_bandwidth_cpu: float = 0.0    # the same per second of CPU time
    state_bytes: dict = field(default_factory=dict)   # per-page state: bytes per guest page of each array
    timeline: dict | None = None       # --html: lanes x phases (kvmsim.report.bench.BenchTimeline)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("timeline")
        for p, ph in zip(d["phases"], self.phases):
            p["summary"] = ph.summary()
            p["floor_multiple"] = ph.floor_multiple
            p["floor_multiple_cpu"] = ph.floor_multiple_cpu
        d["floor_multiple"] = self.floor_multiple()
        d["floor_multiple_cpu"] = self.floor_multiple(cpu=True)
        return d

    def floor_seconds(self) -> float | None:
        """The floors of the timed phases, summed (None unless every phase has one)."""
        if not self.phases or any(p.floor_seconds is None for p in self.phases):
            return None
        return sum(p.floor_seconds for p in self.phases)

    def floor_multiple(self, *, cpu: bool = False) -> float | None:
        """The phases' time over their floors' sum: the whole flow as a multiple of its floor
        (``cpu``: CPU time over the floor at the CPU-time copy bandwidth)."""
        if cpu:
            if not self.phases or any(p.floor_cpu_seconds is None for p in self.phases):
                return None
            return sum(p.cpu_seconds for p in self.phases) / sum(p.floor_cpu_seconds for p in self.phases)
        f = self.floor_seconds()
        return sum(p.seconds for p in self.phases) / f if f else None

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
    def __init__(self, journal, phases: list[Phase], progress: Progress | None = None, stats_of=None):
        self.journal, self.phases, self.progress, self.stats_of = journal, phases, progress, stats_of

    def __call__(self, name: str, iteration: int | None = None):
        clock = self

        class _Ctx:
            def __enter__(self):
                if clock.progress:
                    clock.progress(name, iteration, None)
                self.before = clock.journal.snapshot()
                self.c0 = time.process_time_ns()
                self.t0 = time.perf_counter_ns()

            def __exit__(self, *exc):
                dt = time.perf_counter_ns() - self.t0
                cpu = time.process_time_ns() - self.c0
                if exc[0] is None:
                    clock.phases.append(Phase(name, iteration, dt / 1e9, clock.journal.since(self.before),
                                              peak_rss(), clock.stats_of() if clock.stats_of else {}, cpu / 1e9))
                    if clock.progress:
                        clock.progress(name, iteration, dt / 1e9)
        return _Ctx()


def run_model(opts: Options, policy: str, progress: Progress | None = None, *,
              bandwidth: tuple[float, float] | float | None = None, on_phase=None) -> RunResult:
    """Run the whole flow on a fresh host and VM under ``policy``; returns timings and counters.
    ``progress`` is called as each phase starts and ends.  With ``opts.floor`` each phase gets its
    memory floor (:mod:`kvmsim.bench.floor`) over ``bandwidth`` (measured here, before the flow, when
    None; a pair is wall and CPU-time bandwidth).  ``on_phase(kvm, name, iteration, ended)``, if given, is called outside the timed
    region as each phase starts and ends (tests inspect the model state there)."""
    opts.check()
    if opts.floor and bandwidth is None:
        from kvmsim.bench.floor import copy_bandwidths
        bandwidth = copy_bandwidths()
        reset_peak_rss()
    t_start = time.perf_counter()
    host = Host(recording=False)
    reserve_mem_map(host, opts.total >> PAGE_SHIFT)
    kvm = Kvm(host, policy=policy, arch="x86", mmu="tdp", v613_other=opts.v613_other, pml=opts.pml)
    if opts.manual_protect:
        enable_manual_protect(kvm, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
    slots = create_test_slots(kvm, opts.total, opts.backing, opts.slots)
    for s in slots:
        # the x86 leaf table of each slot, allocated with the slot (untimed), as the kernel allocates a
        # slot's per-page metadata (kvm_alloc_memslot_metadata(): rmaps, lpage_info) when it is
        # created; otherwise the first fault would page in its fresh arrays inside "populate"
        tables(kvm.memslots[0].by_id[s.slot])
    vcpus = [kvm.create_vcpu() for _ in range(opts.vcpus)]
    per = opts.vcpu_memory >> PAGE_SHIFT
    rng = np.random.default_rng(opts.seed)
    phases: list[Phase] = []
    observe = progress
    if on_phase is not None:
        def observe(name, iteration, seconds):
            on_phase(kvm, name, iteration, seconds is not None)
            if progress:
                progress(name, iteration, seconds)
    clock = _Clock(kvm.journal, phases, observe, (lambda: leaf_stats(kvm)) if opts.phase_stats else None)

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
    state = _state_bytes(kvm, slots) if opts.floor else {}
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
    if opts.teardown:
        with clock("teardown"):
            kvm.destroy()
    wall = time.perf_counter() - t_start
    stats = leaf_stats(kvm)                            # the VM's stats, read after the timed flow
    res = RunResult("model", policy, asdict(opts), phases, peak_rss(), wall, stats)
    if opts.floor:
        _set_floors(res, opts, state, bandwidth)
    return res


def _state_bytes(kvm, slots) -> dict[str, float]:
    from kvmsim.bench.floor import state_bytes
    s = slots[0]
    return state_bytes(kvm, kvm.memslots[0].by_id[s.slot], s.vma)


def _set_floors(res: RunResult, opts: Options, state: dict[str, float], bandwidth) -> None:
    """Each phase's floor (:func:`kvmsim.bench.floor.phase_floor_bytes`) when the flow is the one the
    floor table describes."""
    from kvmsim.bench.floor import floor_applies, phase_floor_bytes
    wall, cpu = bandwidth if isinstance(bandwidth, tuple) else (bandwidth, bandwidth)
    res.copy_bandwidth, res.copy_bandwidth_cpu, res.state_bytes = wall, cpu, state
    if not floor_applies(opts):
        return
    npages = opts.total >> PAGE_SHIFT
    for p in res.phases:
        p.floor_bytes = phase_floor_bytes(state, p.name, p.iteration, npages, p.summary()["set_dirty"])
        if p.floor_bytes is not None:
            p.floor_seconds, p.floor_cpu_seconds = p.floor_bytes / wall, p.floor_bytes / cpu


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


def estimate_bytes(opts: Options) -> int:
    """The model run's peak RSS, estimated before anything is allocated."""
    return (opts.total >> PAGE_SHIFT) * BYTES_PER_GUEST_PAGE + BASE_BYTES


def mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_memory(need: int, what: str, available: int | None = None) -> None:
    """Refuse (``UsageError``) a run that needs more than ``MemAvailable``, before it allocates."""
    avail = mem_available() if available is None else available
    if avail is not None and need > avail:
        raise UsageError(f"{what} needs about {_gib(need)} of memory ({BYTES_PER_GUEST_PAGE} B per guest "
                         f"4 KiB page plus {BASE_BYTES >> 20} MiB), but MemAvailable is {_gib(avail)}; "
                         "use a smaller -b or -v")


def _gib(n: int) -> str:
    return f"{n / 2**40:,.1f} TiB" if n >= 2**40 else f"{n / 2**30:,.2f} GiB"


def warm_memory(nbytes: int) -> None:
    """Write ``nbytes`` of memory once and free it, before a timed run.

    The development machines are themselves VMs: the first write to guest memory the hypervisor has
    not backed yet costs microseconds per 4 KiB page, and memory freed long enough ago is handed
    back (free page reporting), so a warm-up at the start of a session decays.  Warming right before
    each run makes the numbers measure the model (kvm-on-these-machines.md §2: benchmarks must warm
    up).  Capped at three quarters of MemAvailable."""
    avail = mem_available()
    if avail is not None:
        nbytes = min(nbytes, avail * 3 // 4)
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


def run_with_timeline(opts: Options, policy: str, progress: Progress | None = None, *, warm: bool = False,
                      bandwidth=None) -> RunResult:
    """:func:`run_model` observed after each phase (outside the timed region) for ``--html``: the
    result's ``timeline`` holds the lane sums per phase (:class:`kvmsim.report.bench.BenchTimeline`)."""
    from kvmsim.bench.report import size_name
    from kvmsim.report.bench import BenchTimeline
    bt = BenchTimeline()
    res = run_model(opts, policy, progress, bandwidth=bandwidth, on_phase=bt.on_phase)
    res.timeline = bt.data(res, f"dirty_log_perf_test -b {size_name(opts.vcpu_memory)} -v {opts.vcpus} "
                                f"-i {opts.iterations}")
    return res


def _run_warm(opts: Options, policy: str, warm: bool, progress: Progress | None = None,
              html: bool = False) -> RunResult:
    if warm:
        keep_freed_memory()
        if os.access("/proc/self/clear_refs", os.W_OK):  # else the warm-up would count as the run's peak
            if progress:
                progress("warm-up", None, None)
            warm_memory(estimate_bytes(opts))
    bandwidth = None
    if opts.floor:
        from kvmsim.bench.floor import copy_bandwidths
        bandwidth = copy_bandwidths()
    if warm or opts.floor:
        reset_peak_rss()
    if html:
        return run_with_timeline(opts, policy, progress, bandwidth=bandwidth)
    return run_model(opts, policy, progress, bandwidth=bandwidth)


class WorkerError(KvmsimError):
    """The forked benchmark worker failed or died; the message carries what it reported."""


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills this worker when the parent exits, even
    by SIGKILL; if the parent is already gone, exit now."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _worker(conn, parent: int, opts: Options, policy: str, warm: bool, html: bool = False) -> None:
    """The forked child: run, send ``("phase", ...)`` as phases go and ``("result", r)`` or an error."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides; it stops us with SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)   # blocked by the parent around fork
    try:
        res = _run_warm(opts, policy, warm, lambda *a: conn.send(("phase", a)), html)
        conn.send(("result", res))
    except UsageError as e:
        conn.send(("usage", str(e)))
    except KvmsimError as e:
        conn.send(("error", str(e)))
    except MemoryError:
        conn.send(("error", f"the model run ran out of memory (estimated {estimate_bytes(opts) >> 20} MiB)"))
    except BaseException:                               # a model bug: keep its traceback
        import traceback
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


#: Held off while the worker is forked, so a signal never lands between fork() and Process knowing
#: its child (a KeyboardInterrupt there left a started child that ``Process`` could not join).
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_model_isolated(opts: Options, policy: str, *, warm: bool = True,
                       progress: Progress | None = None, html: bool = False) -> RunResult:
    """:func:`run_model` in a forked child, so its peak RSS is its own (in-process without fork).

    ``warm``: the child first makes malloc keep freed temporaries (:func:`keep_freed_memory`), writes
    and frees as much memory as the run will use (:func:`warm_memory`) and resets its peak RSS,
    all outside the timed flow.  ``progress`` is called in this process as the child's phases start
    and end.  SIGTERM to this process (turned into ``SystemExit(143)`` while the child runs) and
    SIGINT (``KeyboardInterrupt``) terminate the child before they propagate.  ``html``: observe the
    model after each phase (:func:`run_with_timeline`); the child folds each observation into lane
    sums as it is taken and sends back only those (bounded by lanes x phases), through the same pipe."""
    import multiprocessing as mp
    try:
        ctx = mp.get_context("fork")
    except ValueError:
        return run_with_timeline(opts, policy, progress) if html else run_model(opts, policy, progress)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, os.getpid(), opts, policy, warm, html), daemon=True)
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:                                  # not the main thread: leave SIGTERM alone
        pass
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)     # a pending signal is raised here
        send.close()
        while True:
            try:
                kind, payload = recv.recv()
            except EOFError:
                proc.join()
                raise WorkerError(f"the benchmark worker died without a result (exit code {proc.exitcode})") from None
            if kind == "phase":
                if progress:
                    progress(*payload)
            elif kind == "result":
                return payload
            elif kind == "usage":
                raise UsageError(payload)
            elif kind == "error":
                raise WorkerError(payload)
            else:
                raise RuntimeError("the benchmark worker crashed:\n" + payload)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        proc.join()
        recv.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
