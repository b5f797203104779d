"""``kvmsim bench replay NAME``: real VMM workloads replayed on the model.

Each replay drives the same model paths as :mod:`kvmsim.bench.dirty_log_perf` (the VM, memstress's
memslots and guest pass, ``KVM_GET_DIRTY_LOG`` / ``KVM_CLEAR_DIRTY_LOG`` / the dirty ring in
virt/kvm/kvm_main.c and virt/kvm/dirty_ring.c as :mod:`kvmsim.kvm.dirty` mirrors them, and the scalar
fault path for the blob replay) the way that VMM does, with the VMM's parameters cited in the module
that plays it:

* ``qemu-precopy``, ``qemu-dirty-ring``: :mod:`kvmsim.bench.replay.qemu`
* ``ch-precopy``: :mod:`kvmsim.bench.replay.ch`
* ``snapshot-chain``: :mod:`kvmsim.bench.replay.snapshot`
* ``virtio-gpu-blobs``: :mod:`kvmsim.bench.replay.gpu`

The dirty-tracking replays share a lost-write oracle (:class:`kvmsim.bench.replay.common.WriteOracle`):
pages lost must be zero.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from kvmsim.bench.replay.common import ReplayError, ReplayResult  # noqa: F401 (re-exported)
from kvmsim.errors import UsageError

__all__ = ["ARCHES", "NAMES", "Replay", "ReplayError", "ReplayOptions", "ReplayResult", "replays", "run_replay"]

ARCHES = ("x86", "arm64", "riscv")


@dataclass
class ReplayOptions:
    """The knobs of every replay; each replay reads the ones it names in its result's ``params``."""

    memory: int = 1 << 30                  # guest RAM (one memslot)
    hot: int = 256 << 20                   # the guest's working set (the hot vCPU's region)
    dirty_rate: int = 32 << 20             # bytes/s the guest (hot vCPU) dirties
    bandwidth: int = 128 << 20             # link bytes/s (QEMU max-bandwidth default MAX_THROTTLE)
    downtime_ms: int = 300                 # QEMU downtime-limit default
    max_iterations: int = 30               # passes before the replay gives up on converging
    clear_bitmap_shift: int = 18           # QEMU x-clear-bitmap-shift default
    ring_entries: tuple[int, ...] = (4096, 65536)
    epochs: int = 5                        # snapshot-chain: diff snapshots after the base
    epoch_seconds: float = 2.0             # snapshot-chain: guest run time per epoch
    blobs: int = 24                        # virtio-gpu-blobs: map/unmap cycles per backing
    arches: tuple[str, ...] = ARCHES
    pml: bool = True                       # Intel PML; False: AMD SVM (dirty logging write-protects)
    seed: int = 1
    bug: str | None = None                 # a deliberately broken harvest (the oracle's negative tests)

    def check(self, name: str) -> None:
        if self.memory <= 0 or self.memory % (2 << 20):
            raise UsageError(f"--memory: {self.memory} bytes is not a positive multiple of 2 MiB")
        if not 0 < self.hot <= self.memory or self.hot % 4096:
            raise UsageError("--hot: the working set must be a positive multiple of 4 KiB, at most --memory")
        if self.dirty_rate < 0 or self.bandwidth <= 0:
            raise UsageError("--dirty-rate must be >= 0 and --bandwidth > 0")
        if not 6 <= self.clear_bitmap_shift <= 31:
            raise UsageError("--clear-bitmap-shift: QEMU accepts 6..31 (CLEAR_BITMAP_SHIFT_MIN/MAX)")
        for e in self.ring_entries:
            if e & (e - 1) or not 1024 <= e <= 65536:
                raise UsageError(f"--ring-entries {e}: a power of two in 1024..65536 "
                                 "(KVM: >= a page, <= KVM_DIRTY_RING_MAX_ENTRIES)")
        for a in self.arches:
            if a not in ARCHES:
                raise UsageError(f"--arch {a!r}: choose from {', '.join(ARCHES)}")
        bugs = replays()[name].bugs
        if self.bug is not None and self.bug not in bugs:
            raise UsageError(f"--bug {self.bug!r}: {name} knows " + (", ".join(bugs) or "no harvest bugs"))


@dataclass
class Replay:
    name: str
    summary: str
    run: object                      # (ReplayOptions, policy) -> list[ReplayResult]
    bugs: tuple[str, ...] = ()


@functools.cache
def replays() -> dict[str, Replay]:
    """name → :class:`Replay` (imported on first use)."""
    from kvmsim.bench.replay import ch, gpu, qemu, snapshot
    return {r.name: r for r in (
        Replay("qemu-precopy", "QEMU precopy: GET_DIRTY_LOG + lazy CLEAR_DIRTY_LOG per 1 GiB chunk, "
               "until the rest fits 300 ms at 128 MiB/s", qemu.qemu_precopy, qemu.PRECOPY_BUGS),
        Replay("qemu-dirty-ring", "QEMU precopy over the dirty ring (4096 and 65536 entries), reaper every 1 s "
               "and on KVM_EXIT_DIRTY_RING_FULL, a hot vCPU", qemu.qemu_dirty_ring),
        Replay("ch-precopy", "Cloud Hypervisor: GET_DIRTY_LOG passes, at most 5 (v51) or until 300 ms (v52+), "
               "then pause; and the INITIALLY_SET variant with lazy per-chunk CLEAR", ch.ch_precopy, ch.BUGS),
        Replay("snapshot-chain", "Firecracker diff snapshots: one GET_DIRTY_LOG per epoch; oracle: every page "
               "written since epoch k is in the delta chain (GET, GET+CLEAR, INITIALLY_SET)",
               snapshot.snapshot_chain, snapshot.BUGS),
        Replay("virtio-gpu-blobs", "virtio-gpu blob churn: map/unmap 16 KiB-2 MiB blobs (dma-buf VM_PFNMAP with "
               "read-only PTEs, TTM non-compound, GEM shmem, memfd), guest reads then writes, per protocol and arch",
               gpu.virtio_gpu_blobs),
    )}


NAMES = ("qemu-precopy", "qemu-dirty-ring", "ch-precopy", "snapshot-chain", "virtio-gpu-blobs")


def run_replay(name: str, opts: ReplayOptions, policy: str) -> list[ReplayResult]:
    """Run replay ``name`` under ``policy`` (a shipped protocol or a loaded plugin's name)."""
    if name not in replays():
        raise UsageError(f"unknown replay {name!r}; choose one of {', '.join(NAMES)} (or --list)")
    opts.check(name)
    if name != "virtio-gpu-blobs":
        check_replay_memory(opts)
    return replays()[name].run(opts, policy)


#: Per guest 4 KiB page above the dirty-log flow's (kvmsim.bench.dirty_log_perf.BYTES_PER_GUEST_PAGE):
#: the oracle's bit array, QEMU's ``bmap`` and GET snapshot, the guest's write masks, rounded up.
REPLAY_BYTES_PER_PAGE = 16


def check_replay_memory(opts: ReplayOptions, available: int | None = None) -> None:
    """Refuse (``UsageError``) a run whose model would not fit in ``MemAvailable``, before it allocates."""
    from kvmsim.bench.dirty_log_perf import BASE_BYTES, BYTES_PER_GUEST_PAGE, mem_available
    need = (opts.memory >> 12) * (BYTES_PER_GUEST_PAGE + REPLAY_BYTES_PER_PAGE) + BASE_BYTES
    avail = mem_available() if available is None else available
    if avail is not None and need > avail:
        raise UsageError(f"--memory {opts.memory >> 20} MiB needs about {need / 2**30:.2f} GiB for the model "
                         f"({BYTES_PER_GUEST_PAGE + REPLAY_BYTES_PER_PAGE} B per guest 4 KiB page), but "
                         f"MemAvailable is {avail / 2**30:.2f} GiB; use a smaller --memory")
