"""Cloud Hypervisor live migration on the model (``ch-precopy``).

Cloud Hypervisor's flow, from the cloud-hypervisor tree:

* hypervisor/src/kvm/mod.rs ``KvmVm::start_dirty_log()``: ``KVM_SET_USER_MEMORY_REGION`` with
  ``KVM_MEM_LOG_DIRTY_PAGES`` on every slot; ``KvmVm::get_dirty_log()`` → kvm-ioctls
  ``VmFd::get_dirty_log()`` → ``KVM_GET_DIRTY_LOG``.  Cloud Hypervisor enables no
  ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` and issues no ``KVM_CLEAR_DIRTY_LOG`` (none in its tree), so each
  GET harvests and write-protects the whole slot.
* Up to v51.0, vmm/src/lib.rs ``Vmm::send_migration()``: ``vm.start_dirty_log()``, send all guest memory,
  then "Try at most 5 passes of dirty memory sending" (``MAX_DIRTY_MIGRATIONS = 5``), each
  ``vm_maybe_send_dirty_pages()`` (``vm.dirty_log()``, the table sent; an empty table ends the passes
  early), then ``vm.pause()``, one last batch and ``vm.stop_dirty_log()``: variant ``get, 5 passes``.
* From v52.0 (1f5c5093e "vmm: migration: refactor memory migration into iteration helpers"),
  ``do_memory_iterations()`` reads ``vm.dirty_log()`` each iteration and stops before sending it once
  ``is_precopy_converged()``: the table's transfer time (its estimated downtime) is within
  ``downtime_ms`` (``VmSendMigrationData::DEFAULT_DOWNTIME`` 300 ms, "Same as QEMU", vmm/src/api/mod.rs)
  or the one-hour ``DEFAULT_TIMEOUT`` has passed; the VM is paused and that table plus a last
  ``dirty_log()`` is the final batch: variant ``get, downtime``.  One that does not converge within
  ``max_iterations`` passes (or the hour) is finished here as ``timeout_strategy=ignore`` would, and
  reported ``converged: false``; Cloud Hypervisor's default ``cancel`` keeps the VM on the source.

Variant ``initially-set`` is the flow issue 18 asks about, what Cloud Hypervisor would do with
``KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET`` (not upstream): enabling logging
write-protects nothing, the first GET reports every page (that pass is the full copy), and each 1 GiB
chunk is cleared (``KVM_CLEAR_DIRTY_LOG`` with the GET's bits) just before its pages are sent, as QEMU
does; at most 5 passes.

The link runs at ``bandwidth`` (the replay's default is QEMU's 128 MiB/s: Cloud Hypervisor has no rate
limit of its own).  Bug ``clear-after-send`` (``initially-set`` only): the chunk is cleared after its
pages were sent, so writes in between are wiped.
"""

from __future__ import annotations

import numpy as np

from kvmsim.bench.replay.common import (Guest, Iteration, ReplayResult, Stopwatch, WriteOracle, build_vm,
                                        chunks, send_seconds, set_logging)
from kvmsim.kvm.dirty import kvm_clear_dirty_log, kvm_get_dirty_log
from kvmsim.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

MAX_DIRTY_MIGRATIONS = 5          # vmm/src/lib.rs send_migration(), up to v51.0
DEFAULT_DOWNTIME_MS = 300         # vmm/src/api/mod.rs VmSendMigrationData::DEFAULT_DOWNTIME, v52.0+
DEFAULT_TIMEOUT_S = 3600          # vmm/src/api/mod.rs VmSendMigrationData::DEFAULT_TIMEOUT, v52.0+
CHUNK_SHIFT = 18                  # the initially-set variant's lazy CLEAR chunk: 1 GiB of 4 KiB pages
BUGS = ("clear-after-send",)

SOURCES = [
    "cloud-hypervisor v51.0 vmm/src/lib.rs Vmm::send_migration() (MAX_DIRTY_MIGRATIONS = 5), vm_maybe_send_dirty_pages()",
    "cloud-hypervisor v52.0+ vmm/src/lib.rs do_memory_iterations(), is_precopy_converged(); vmm/src/api/mod.rs "
    "VmSendMigrationData::DEFAULT_DOWNTIME 300 ms, DEFAULT_TIMEOUT 1 h",
    "cloud-hypervisor hypervisor/src/kvm/mod.rs KvmVm::start_dirty_log() (KVM_MEM_LOG_DIRTY_PAGES), "
    "KvmVm::get_dirty_log() (kvm-ioctls VmFd::get_dirty_log: KVM_GET_DIRTY_LOG)",
]


VARIANTS = ("get, 5 passes", "get, downtime", "initially-set")


def ch_precopy(opts, policy: str) -> list[ReplayResult]:
    return [_run(opts, policy, v) for v in VARIANTS]


def _run(opts, policy: str, variant: str) -> ReplayResult:
    manual = variant == "initially-set"
    by_downtime = variant == "get, downtime"
    vm = build_vm(policy, opts.memory, 1, manual_flags=(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                                                        | KVM_DIRTY_LOG_INITIALLY_SET) if manual else 0,
                  pml=opts.pml)
    kvm, n, sid = vm.kvm, vm.slot.npages, vm.slot.slot
    res = ReplayResult("ch-precopy", variant, policy, "x86",
                       {"memory": opts.memory, "hot_bytes": opts.hot, "dirty_rate_bytes_per_s": opts.dirty_rate,
                        "bandwidth_bytes_per_s": opts.bandwidth,
                        **({"downtime_ms": DEFAULT_DOWNTIME_MS, "timeout_s": DEFAULT_TIMEOUT_S} if by_downtime
                           else {"max_dirty_migrations": MAX_DIRTY_MIGRATIONS}),
                        "manual_dirty_log_protect": "MANUAL_PROTECT_ENABLE|INITIALLY_SET" if manual else "off",
                        "pml": opts.pml, "seed": opts.seed, "bug": opts.bug},
                       SOURCES + (["issue 18: INITIALLY_SET with lazy per-chunk CLEAR (not upstream Cloud "
                                   "Hypervisor)"] if manual else []))
    oracle = WriteOracle(n, owed=True)
    guest = Guest(kvm, vm.slot, oracle, [(vm.vcpus[0], 0, opts.hot >> 12, opts.dirty_rate >> 12)],
                  np.random.default_rng(opts.seed))
    watch = Stopwatch(kvm)
    set_logging(vm, True)                                   # start_dirty_log()
    clock = [0.0]
    clears = [0]

    def send(table: np.ndarray, snap: np.ndarray | None) -> tuple[int, int, int, float]:
        """``send_memory_regions()`` of the table, chunk by chunk, the guest running meanwhile."""
        rep = over = wrote = 0
        t = 0.0
        for lo, hi in chunks(n, 1 << CHUNK_SHIFT):
            mask = table[lo:hi]
            if not mask.any():
                continue
            if snap is not None and opts.bug != "clear-after-send":
                kvm_clear_dirty_log(kvm, sid, lo, hi - lo, snap[lo:hi])
                clears[0] += 1
            over += oracle.send(lo, mask)
            k = int(np.count_nonzero(mask))
            dt = send_seconds(k, opts.bandwidth)
            wrote += guest.run(dt)
            if snap is not None and opts.bug == "clear-after-send":
                kvm_clear_dirty_log(kvm, sid, lo, hi - lo, snap[lo:hi])
                clears[0] += 1
            rep, t = rep + k, t + dt
        clock[0] += t
        return rep, over, wrote, t

    def dirty_pass(index: int, table=None, remaining=None) -> int:
        log = kvm_get_dirty_log(kvm, sid) if table is None else table      # vm.dirty_log()
        if remaining is not None:
            log = log | remaining                           # final_table.extend(remaining)
        rep, over, wrote, t = send(log, log if manual else None)
        res.per_iteration.append(Iteration(index, rep, over, wrote, t))
        return rep

    remaining = None
    if manual:
        dirty_pass(0)                                       # INITIALLY_SET: the first GET is all of memory
    else:
        dirty_pass(0, np.ones(n, dtype=bool))               # the whole guest memory
    passes = 0
    if by_downtime:
        converged = False
        while clock[0] < DEFAULT_TIMEOUT_S and passes < opts.max_iterations:
            table = kvm_get_dirty_log(kvm, sid)
            if send_seconds(int(np.count_nonzero(table)), opts.bandwidth) * 1000 <= DEFAULT_DOWNTIME_MS:
                remaining, converged = table, True          # is_precopy_converged(): sent after the pause
                break
            passes += 1
            dirty_pass(passes, table)
        res.converged = converged
    else:
        for i in range(MAX_DIRTY_MIGRATIONS):
            passes = i + 1
            if not dirty_pass(i + 1):
                break
        res.converged = None
    guest.paused = True                                     # vm.pause()
    dirty_pass(passes + 1, None, remaining)                 # the last batch
    set_logging(vm, False)                                  # stop_dirty_log()
    last = res.per_iteration[-1]
    res.iterations = passes
    res.downtime_ms = last.virtual_seconds * 1000
    res.pages_lost, res.pages_over_reported = oracle.lost(), oracle.over
    res.pages_sent, res.guest_writes, res.virtual_seconds = oracle.sent, oracle.writes, clock[0]
    res.extra["clear_dirty_log_calls"] = clears[0]
    return watch.finish(res)
