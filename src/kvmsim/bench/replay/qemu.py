"""QEMU live migration on the model: precopy over the dirty bitmap with ``KVM_CLEAR_DIRTY_LOG`` per
1 GiB chunk (``qemu-precopy``), and over the dirty ring (``qemu-dirty-ring``).

QEMU's flow and parameters, from the QEMU tree (v9.x):

* migration/ram.c ``ram_init_bitmaps()``: the migration bitmap ``bmap`` starts all set, then the first
  ``migration_bitmap_sync_precopy()``; ``ram_save_iterate()`` sends the pages of ``bmap`` in ram order;
  ``migration_bitmap_clear_dirty()`` calls ``migration_clear_memory_region_dirty_bitmap()`` before a
  page is sent, which issues ``memory_region_clear_dirty_bitmap()`` → accel/kvm/kvm-all.c
  ``kvm_log_clear()`` → ``kvm_log_clear_one_slot()`` → ``KVM_CLEAR_DIRTY_LOG`` for the whole chunk of
  ``1 << clear_bitmap_shift`` pages the first time a page of it is sent after a sync, with the bits of
  the slot's last ``KVM_GET_DIRTY_LOG`` (``mem->dirty_bmap``) only, so that writes after the GET stay
  dirty.  ``clear_bitmap_shift`` defaults to ``CLEAR_BITMAP_SHIFT_DEFAULT`` 18 (migration/options.c
  property ``x-clear-bitmap-shift``): 1 GiB of 4 KiB pages.
* accel/kvm/kvm-all.c ``kvm_init()``: ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled with
  ``KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET`` when offered, and not with the
  dirty ring ("KVM_DIRTY_LOG_INITIALLY_SET will not wr-protect all the pages initially, which is against
  how kvm dirty ring is used").
* migration/migration.c ``migration_iteration_run()`` / ``migration_update_counters()``: switch to
  stop-and-copy once the pending dirty memory fits ``threshold_size = bandwidth × downtime-limit``;
  ``downtime-limit`` defaults to ``DEFAULT_MIGRATE_SET_DOWNTIME`` 300 ms and ``max-bandwidth`` to
  ``MAX_THROTTLE`` ``(128 << 20)`` (migration/options.c; migration/migration.c before QEMU 8.1).  The
  model's link runs at ``max-bandwidth``.
* Dirty ring (accel/kvm/kvm-all.c): ``-accel kvm,dirty-ring-size=N`` entries (4096 and 65536 here;
  ``KVM_DIRTY_RING_MAX_ENTRIES`` is 65536); ``kvm_dirty_ring_reaper_thread()`` wakes every second
  (``sleep(1)``) and ``kvm_dirty_ring_reap()``s every vCPU's ring into the slot bitmaps, then
  ``KVM_RESET_DIRTY_RINGS``; ``kvm_cpu_exec()`` reaps the same way on ``KVM_EXIT_DIRTY_RING_FULL``;
  a migration sync flushes (``kvm_dirty_ring_flush()``) before it reads the slot bitmaps.

The model's linearisation: a chunk is cleared, its dirty pages are sent, and the guest runs for the
time the send took; a pass ends with a sync.  QEMU checks the threshold on an estimate before it
syncs; here the pending count after the sync decides.  QEMU never gives up on a migration that does
not converge (auto-converge is off by default): the replay stops after ``max_iterations`` passes and
reports ``converged: false``.

Harvest bugs (``bug=``), each through the real ioctls, for the oracle's negative tests:
``send-before-clear`` sends a chunk and only then clears it (the order ram.c's comment in
``migration_bitmap_clear_dirty()`` exists to avoid); ``clear-unmasked`` clears the whole chunk instead of
the GET snapshot's bits (writes between GET and CLEAR are wiped).
"""

from __future__ import annotations

import numpy as np

from kvmsim.bench.replay.common import (Guest, Iteration, ReplayResult, Stopwatch, WriteOracle, build_vm,
                                        chunks, send_seconds, set_logging)
from kvmsim.kvm.dirty import (KVM_DIRTY_GFN_SIZE, KVM_DIRTY_RING_RSVD_ENTRIES, kvm_clear_dirty_log,
                              kvm_dirty_ring_harvest, kvm_get_dirty_log, kvm_reset_dirty_rings)
from kvmsim.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

CLEAR_BITMAP_SHIFT_DEFAULT = 18          # migration/options.c: 1 << 18 pages = 1 GiB of 4 KiB pages
DEFAULT_MIGRATE_SET_DOWNTIME_MS = 300    # migration/options.c
MAX_THROTTLE = 128 << 20                 # migration/options.c: max-bandwidth default, bytes/s
REAPER_PERIOD_S = 1.0                    # accel/kvm/kvm-all.c kvm_dirty_ring_reaper_thread(): sleep(1)

PRECOPY_SOURCES = [
    "qemu migration/ram.c ram_init_bitmaps(), ram_save_iterate(), migration_bitmap_clear_dirty(), "
    "migration_clear_memory_region_dirty_bitmap()",
    "qemu migration/options.c CLEAR_BITMAP_SHIFT_DEFAULT 18, DEFAULT_MIGRATE_SET_DOWNTIME 300 ms, MAX_THROTTLE 128 MiB/s",
    "qemu migration/migration.c migration_iteration_run(), migration_update_counters() (threshold_size)",
    "qemu accel/kvm/kvm-all.c kvm_init() (MANUAL_PROTECT_ENABLE | INITIALLY_SET), kvm_log_clear_one_slot()",
]
RING_SOURCES = [
    "qemu accel/kvm/kvm-all.c kvm_dirty_ring_reaper_thread() (sleep(1)), kvm_dirty_ring_reap(), "
    "kvm_dirty_ring_flush(), kvm_cpu_exec() (KVM_EXIT_DIRTY_RING_FULL)",
    "qemu accel/kvm/kvm-all.c kvm_init(): no MANUAL_DIRTY_LOG_PROTECT2 with the dirty ring; dirty-ring-size in entries",
    "qemu migration/ram.c ram_save_iterate(); migration/migration.c migration_iteration_run()",
]

PRECOPY_BUGS = ("send-before-clear", "clear-unmasked")


class _Migration:
    """QEMU's side: ``bmap`` (the RAMBlock's migration bitmap) and the link's clock."""

    def __init__(self, vm, guest: Guest, oracle: WriteOracle, opts, res: ReplayResult):
        self.vm, self.guest, self.oracle, self.opts, self.res = vm, guest, oracle, opts, res
        n = vm.slot.npages
        self.bmap = np.ones(n, dtype=bool)         # ram_init_bitmaps(): bitmap_set(block->bmap, 0, pages)
        self.clock = 0.0

    def send(self, lo: int, hi: int, mask: np.ndarray) -> tuple[int, int, float]:
        """``ram_save_host_page()`` for the dirty pages of ``[lo, hi)``: to the link, the guest runs meanwhile."""
        over = self.oracle.send(lo, mask)
        self.bmap[lo:hi] &= ~mask
        n = int(np.count_nonzero(mask))
        t = send_seconds(n, self.opts.bandwidth)
        wrote = self.run_guest(t)
        return over, wrote, t

    def run_guest(self, seconds: float) -> int:
        self.clock += seconds
        return self.guest.run(seconds)

    def threshold_pages(self) -> int:
        """``threshold_size`` = bandwidth × downtime-limit, in pages."""
        return int(self.opts.bandwidth * self.opts.downtime_ms / 1000) >> 12

    def iterate(self, one_pass, sync) -> None:
        """``migration_iteration_run()`` until the pending dirty memory fits the downtime, then stop-and-copy."""
        res, opts = self.res, self.opts
        sync()                                              # ram_init_bitmaps(): the first sync
        converged = False
        for it in range(1, opts.max_iterations + 1):
            rep, over, wrote, t = one_pass()
            res.per_iteration.append(Iteration(it, rep, over, wrote, t))
            sync()
            res.iterations = it
            if int(np.count_nonzero(self.bmap)) <= self.threshold_pages():
                converged = True
                break
        res.converged = converged
        self.guest.paused = True                            # vm_stop_force_state(RUN_STATE_FINISH_MIGRATE)
        sync()
        rep, over, wrote, t = one_pass()
        res.per_iteration.append(Iteration(res.iterations + 1, rep, over, wrote, t))
        res.downtime_ms = t * 1000
        res.pages_lost = self.oracle.lost()
        res.pages_over_reported = self.oracle.over
        res.pages_sent = self.oracle.sent
        res.guest_writes = self.oracle.writes
        res.virtual_seconds = self.clock


def _params(opts, **more) -> dict:
    return {"memory": opts.memory, "hot_bytes": opts.hot, "dirty_rate_bytes_per_s": opts.dirty_rate,
            "bandwidth_bytes_per_s": opts.bandwidth, "downtime_limit_ms": opts.downtime_ms,
            "max_iterations": opts.max_iterations, "pml": opts.pml, "seed": opts.seed, "bug": opts.bug,
            **more}


def qemu_precopy(opts, policy: str) -> list[ReplayResult]:
    """``migrate`` with ``KVM_GET_DIRTY_LOG`` + lazy ``KVM_CLEAR_DIRTY_LOG`` per ``clear_bitmap_shift`` chunk."""
    vm = build_vm(policy, opts.memory, 1,
                  manual_flags=KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET, pml=opts.pml)
    n = vm.slot.npages
    chunk = 1 << opts.clear_bitmap_shift
    res = ReplayResult("qemu-precopy", "bitmap+clear", policy, "x86",
                       _params(opts, clear_bitmap_shift=opts.clear_bitmap_shift,
                               manual_dirty_log_protect="MANUAL_PROTECT_ENABLE|INITIALLY_SET"),
                       PRECOPY_SOURCES)
    oracle = WriteOracle(n, owed=True)
    rng = np.random.default_rng(opts.seed)
    guest = Guest(vm.kvm, vm.slot, oracle, [(vm.vcpus[0], 0, opts.hot >> 12, opts.dirty_rate >> 12)], rng)
    watch = Stopwatch(vm.kvm)
    set_logging(vm, True)                                   # memory_global_dirty_log_start()
    mig = _Migration(vm, guest, oracle, opts, res)
    sid = vm.slot.slot
    state = {"snap": np.zeros(n, dtype=bool), "clear": np.zeros((n + chunk - 1) // chunk, dtype=bool)}
    clears = {"n": 0}

    def sync():
        """``migration_bitmap_sync()``: KVM_GET_DIRTY_LOG into ``mem->dirty_bmap``, OR into ``bmap``;
        every chunk of the block is marked for a clear (``clear_bmap_set()``)."""
        log = kvm_get_dirty_log(vm.kvm, sid)
        state["snap"] = log
        mig.bmap |= log
        state["clear"][:] = True

    def clear(c: int, lo: int, hi: int):
        if not state["clear"][c]:
            return
        state["clear"][c] = False
        mask = None if opts.bug == "clear-unmasked" else state["snap"][lo:hi]
        kvm_clear_dirty_log(vm.kvm, sid, lo, hi - lo, mask)
        state["snap"][lo:hi] = False
        clears["n"] += 1

    def one_pass():
        rep = over = wrote = 0
        t = 0.0
        for c, (lo, hi) in enumerate(chunks(n, chunk)):
            mask = mig.bmap[lo:hi].copy()
            if not mask.any():
                continue
            if opts.bug != "send-before-clear":
                clear(c, lo, hi)
            o, w, dt = mig.send(lo, hi, mask)
            if opts.bug == "send-before-clear":
                clear(c, lo, hi)
            rep += int(np.count_nonzero(mask))
            over, wrote, t = over + o, wrote + w, t + dt
        return rep, over, wrote, t

    mig.iterate(one_pass, sync)
    set_logging(vm, False)                                  # memory_global_dirty_log_stop()
    res.extra["clear_dirty_log_calls"] = clears["n"]
    return [watch.finish(res)]


def qemu_dirty_ring(opts, policy: str) -> list[ReplayResult]:
    """Migration over the dirty ring, one run per ring size, with a hot vCPU and a cold one."""
    return [_ring_run(opts, policy, entries) for entries in opts.ring_entries]


def _ring_run(opts, policy: str, entries: int) -> ReplayResult:
    vm = build_vm(policy, opts.memory, 2, ring_bytes=entries * KVM_DIRTY_GFN_SIZE, pml=opts.pml)
    kvm, n = vm.kvm, vm.slot.npages
    hot = opts.hot >> 12
    res = ReplayResult("qemu-dirty-ring", f"ring {entries}", policy, "x86",
                       _params(opts, dirty_ring_size=entries, reaper_period_s=REAPER_PERIOD_S,
                               hot_vcpu="vCPU 0 writes the hot set at dirty_rate; vCPU 1 the rest at 1/16 of it"),
                       RING_SOURCES)
    oracle = WriteOracle(n, owed=True)
    rng = np.random.default_rng(opts.seed)
    slot_bmap = np.zeros(n, dtype=bool)                     # KVMSlot.dirty_bmap, filled by the reaper
    stats = {"ring_full_exits": 0, "reaps": 0, "reaped_entries": 0, "reaper_wakeups": 0}
    limit = entries - KVM_DIRTY_RING_RSVD_ENTRIES

    def reap():
        """``kvm_dirty_ring_reap_locked()``: every vCPU's ring into the slot bitmaps, then reset."""
        got = 0
        for v in kvm.vcpus:
            for _slot_id, off in kvm_dirty_ring_harvest(kvm, v):
                slot_bmap[off] = True
                got += 1
        kvm_reset_dirty_rings(kvm)
        stats["reaps"] += 1
        stats["reaped_entries"] += got

    def budget(vcpu):
        # kvm_dirty_ring_check_request(): the vCPU exits before entering the guest once its ring is
        # soft-full; a guest entry writes at most the room left, so no entry is ever dropped
        return limit - len(vcpu.dirty_ring)         # harvested entries hold their slot until reset

    def ring_full(vcpu):
        stats["ring_full_exits"] += 1                       # KVM_EXIT_DIRTY_RING_FULL in kvm_cpu_exec()
        reap()

    cold_rate = max(1, (opts.dirty_rate >> 12) // 16)
    regions = [(vm.vcpus[0], 0, hot, opts.dirty_rate >> 12), (vm.vcpus[1], hot, n - hot, cold_rate)]
    guest = Guest(kvm, vm.slot, oracle, regions, rng, budget=budget, on_exit=ring_full)
    watch = Stopwatch(kvm)
    set_logging(vm, True)
    mig = _Migration(vm, guest, oracle, opts, res)
    tick = {"next": REAPER_PERIOD_S}

    def run_guest(seconds: float) -> int:
        """The guest runs; the reaper thread wakes at every whole second of the clock."""
        wrote = 0
        end = mig.clock + seconds
        while mig.clock < end:
            step = min(end, tick["next"]) - mig.clock
            wrote += guest.run(step)
            mig.clock += step
            if mig.clock >= tick["next"]:
                tick["next"] += REAPER_PERIOD_S
                stats["reaper_wakeups"] += 1
                reap()
        return wrote

    mig.run_guest = run_guest

    def sync():
        """``migration_bitmap_sync()``: ``kvm_dirty_ring_flush()`` reaps, then the slot bitmap into ``bmap``."""
        reap()
        mig.bmap |= slot_bmap
        slot_bmap[:] = False

    def one_pass():
        rep = over = wrote = 0
        t = 0.0
        for lo, hi in chunks(n, 1 << CLEAR_BITMAP_SHIFT_DEFAULT):
            mask = mig.bmap[lo:hi].copy()
            if not mask.any():
                continue
            o, w, dt = mig.send(lo, hi, mask)
            rep += int(np.count_nonzero(mask))
            over, wrote, t = over + o, wrote + w, t + dt
        return rep, over, wrote, t

    mig.iterate(one_pass, sync)
    set_logging(vm, False)
    res.extra.update(stats)
    return watch.finish(res)
