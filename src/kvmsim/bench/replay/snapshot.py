"""Firecracker-style diff snapshot chains on the model (``snapshot-chain``).

Firecracker's flow, from the firecracker tree:

* src/vmm/src/vstate/vm.rs: with ``track_dirty_pages`` (machine config, default false) every memslot
  is registered with ``KVM_MEM_LOG_DIRTY_PAGES``; ``Vm::get_dirty_bitmap()`` is one
  ``KVM_GET_DIRTY_LOG`` per slot (kvm-ioctls ``VmFd::get_dirty_log``); ``Vm::reset_dirty_bitmap()`` is
  the same ioctl with the result dropped.  Firecracker enables no ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``,
  so each GET harvests and write-protects.
* src/vmm/src/persist.rs ``create_snapshot()`` (the VM is paused) → src/vmm/src/vstate/vm.rs
  ``Vm::snapshot_memory_to_file()``: a ``Full`` snapshot ``dump()``s all memory, then
  ``reset_dirty_bitmap()``; a ``Diff`` snapshot ``dump_dirty()``s the pages of ``get_dirty_bitmap()``
  (with the VMM's own vm-memory bitmap for its writes).  One GET per snapshot epoch.

The chain: a full base (epoch 0), then ``epochs`` diff snapshots, the guest running ``epoch_seconds``
at ``dirty_rate`` between them.  Oracle: every page written since epoch k is in a later delta, i.e.
at each epoch every page written since the previous capture is in this delta.  Variants:

* ``get``: Firecracker as it is (GET harvests);
* ``get+clear``: ``KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE``, each GET followed by ``KVM_CLEAR_DIRTY_LOG``
  of the bits it returned (the base's reset is GET+CLEAR too);
* ``initially-set``: ``MANUAL_PROTECT_ENABLE | INITIALLY_SET``: enabling logging write-protects nothing,
  the bitmap starts all set, the base's GET+CLEAR write-protects lazily;
* ``initially-set, no clear``: the same capability with Firecracker's harvest unchanged (GET only): with
  manual protect a GET neither clears nor re-arms, so every delta is the whole memory (over-reported,
  nothing lost).

Bug ``resume-before-reset``: after the full snapshot the VM is resumed and runs a little before the
bitmap is reset, so writes in that window are wiped from the log (the order persist.rs avoids by
resetting while paused).
"""

from __future__ import annotations

import numpy as np

from kvmsim.bench.replay.common import Guest, Iteration, ReplayResult, Stopwatch, WriteOracle, build_vm
from kvmsim.kvm.dirty import kvm_clear_dirty_log, kvm_get_dirty_log
from kvmsim.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

VARIANTS = {"get": 0, "get+clear": KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
            "initially-set": KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
            "initially-set, no clear": KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET}
BUGS = ("resume-before-reset",)

SOURCES = [
    "firecracker src/vmm/src/vstate/vm.rs Vm::get_dirty_bitmap(), Vm::reset_dirty_bitmap() (KVM_GET_DIRTY_LOG), "
    "track_dirty_pages -> KVM_MEM_LOG_DIRTY_PAGES",
    "firecracker src/vmm/src/persist.rs create_snapshot(); src/vmm/src/vstate/vm.rs Vm::snapshot_memory_to_file() "
    "(Full: dump + reset_dirty_bitmap; Diff: get_dirty_bitmap + dump_dirty)",
]


def snapshot_chain(opts, policy: str) -> list[ReplayResult]:
    return [_run(opts, policy, v) for v in VARIANTS]


def _run(opts, policy: str, variant: str) -> ReplayResult:
    flags = VARIANTS[variant]
    vm = build_vm(policy, opts.memory, 1, manual_flags=flags, log_from_start=True, pml=opts.pml)
    kvm, n, sid = vm.kvm, vm.slot.npages, vm.slot.slot
    res = ReplayResult("snapshot-chain", variant, policy, "x86",
                       {"memory": opts.memory, "hot_bytes": opts.hot, "dirty_rate_bytes_per_s": opts.dirty_rate,
                        "epochs": opts.epochs, "epoch_seconds": opts.epoch_seconds, "pml": opts.pml, "seed": opts.seed,
                        "bug": opts.bug},
                       SOURCES + ([] if variant == "get" else ["Documentation/virt/kvm/api.rst "
                                                               "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"]))
    oracle = WriteOracle(n, owed=True)                      # the boot's writes: the base must capture them
    guest = Guest(kvm, vm.slot, oracle, [(vm.vcpus[0], 0, opts.hot >> 12, opts.dirty_rate >> 12)],
                  np.random.default_rng(opts.seed))
    watch = Stopwatch(kvm)

    def harvest() -> np.ndarray:
        log = kvm_get_dirty_log(kvm, sid)
        if flags and variant != "initially-set, no clear":
            kvm_clear_dirty_log(kvm, sid, 0, n, log)
        return log

    # epoch 0: pause, full snapshot (every page), reset the dirty bitmap, resume
    oracle.send(0, np.ones(n, dtype=bool))
    lost_per_epoch = []
    if opts.bug == "resume-before-reset":
        guest.run(opts.epoch_seconds / 10)
    harvest()                                               # reset_dirty_bitmap()
    res.per_iteration.append(Iteration(0, n, 0, 0, 0.0))
    clock = 0.0
    over_before = oracle.over
    for k in range(1, opts.epochs + 1):
        wrote = guest.run(opts.epoch_seconds)
        clock += opts.epoch_seconds
        delta = harvest()                                   # pause; get_dirty_bitmap(); dump dirty pages
        over = oracle.send(0, delta)
        lost = oracle.lost()
        lost_per_epoch.append(lost)
        oracle.owed[:] = False                              # each lost page counted once, at its epoch
        res.per_iteration.append(Iteration(k, int(np.count_nonzero(delta)), over, wrote, opts.epoch_seconds))
    res.iterations = opts.epochs
    res.pages_lost = sum(lost_per_epoch)
    res.pages_over_reported = oracle.over - over_before
    res.pages_sent, res.guest_writes, res.virtual_seconds = oracle.sent, oracle.writes, clock
    res.extra["lost_per_epoch"] = lost_per_epoch
    return watch.finish(res)
