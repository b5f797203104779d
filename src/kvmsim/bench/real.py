"""The dirty_log_perf_test flow on the real ``/dev/kvm`` through the Backend protocol
(:mod:`kvmsim.backend.base`), for a side-by-side run with the model.

On the development machines KVM emulates every guest instruction (kvm-on-these-machines.md §0, §2):
a guest write costs about 3 µs per page steady state and 6 µs on first touch, so 1 GiB takes 1–2 s
per pass.  Real runs are therefore limited to ``REAL_MAX_BYTES`` (1 GiB) of test memory.  The real
backend only reports wall-clock times; its cost counters are the model's business.
"""

from __future__ import annotations

import time

from kvmsim.bench.dirty_log_perf import BASE_BYTES, Options, Phase, Progress, RunResult, peak_rss
from kvmsim.errors import BackendError, BackendUnavailable, KvmsimError, UsageError, errno_name
from kvmsim.types import PAGE_SHIFT

REAL_MAX_BYTES = 1 << 30
#: Per guest page on the real side, besides the page itself: the Python list of gpas and the dirty
#: log sets (measured: 112 B per page at -b 1G, peak RSS 1134 MiB), rounded up.
REAL_BYTES_PER_PAGE = 128


def real_estimate_bytes(opts: Options) -> int:
    """The real run's footprint: its guest memory, which every pass touches, plus this process."""
    return opts.total + (opts.total >> PAGE_SHIFT) * REAL_BYTES_PER_PAGE + BASE_BYTES


def real_backend_or_reason():
    """``(backend, "")`` or ``(None, why)``: the real backend (``kvmsim.backend.kvm.KvmBackend``)."""
    from kvmsim.backend.availability import kvm_available
    ok, why = kvm_available()
    if not ok:
        return None, why
    try:
        from kvmsim.backend.kvm import KvmBackend  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"the real /dev/kvm backend is not ready (kvmsim.backend.kvm has no KvmBackend: {e})"
    try:
        return KvmBackend(), ""
    except (KvmsimError, OSError) as e:                       # BackendUnavailable, KvmIoctlError
        return None, str(e)


def check_real(opts: Options) -> None:
    """The real side's limits, checked before anything runs: size and backing."""
    opts.check()
    if opts.total > REAL_MAX_BYTES:
        raise UsageError(f"the real backend emulates every guest write (~3 µs/page): keep -b x -v at or "
                         f"below {REAL_MAX_BYTES >> 30} GiB (asked {opts.total >> 20} MiB)")
    if opts.backing not in REAL_BACKINGS:
        raise UsageError(f"the real side runs {', '.join(REAL_BACKINGS)} backing, not {opts.backing!r}")


REAL_BACKINGS = ("anonymous", "anonymous_thp", "shmem", "shared_hugetlb")


def run_real(opts: Options, backend=None, progress: Progress | None = None) -> RunResult:
    """The selftest flow on the real backend: populate, enable, iterations of dirty/get/clear, disable."""
    from kvmsim.backend.base import (
        KVM_MEM,
        ManualProtect,
        MappingKind,
        MemoryRegion,
        VmOptions,
        page_gpas,
        update_memory_region_flags,
    )
    check_real(opts)
    kinds = {"anonymous": MappingKind.ANON_PRIVATE, "anonymous_thp": MappingKind.THP_ANON,
             "shmem": MappingKind.ANON_SHARED, "shared_hugetlb": MappingKind.HUGETLB_2M}
    if backend is None:
        backend, why = real_backend_or_reason()
        if backend is None:
            raise BackendUnavailable(why)
    t_start = time.perf_counter()
    mp = (ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | ManualProtect.KVM_DIRTY_LOG_INITIALLY_SET
          if opts.manual_protect else ManualProtect(0))
    backend.create_vm(VmOptions(manual_protect=mp))
    per_slot = opts.total // opts.slots
    kind = kinds[opts.backing]
    base = 1 << 32
    regions = []
    for k in range(opts.slots):
        out = backend.host_mmap(kind, per_slot)
        if out.mapping is None:
            backend.close()
            raise BackendError(f"real host mmap of {per_slot >> 20} MiB {kind.value} failed: {errno_name(out.errno)}")
        r = MemoryRegion(1 + k, base + k * per_slot, per_slot, out.mapping.hva)
        res = backend.set_memory_region(r)
        if res.errno:
            backend.close()
            raise BackendError(f"real KVM_SET_USER_MEMORY_REGION of slot {r.slot} failed: {errno_name(res.errno)}")
        regions.append(r)
    npages = opts.total >> PAGE_SHIFT
    phases: list[Phase] = []

    def timed(name, it, fn):
        if progress:
            progress(name, it, None)
        t0 = time.perf_counter_ns()
        fn()
        phases.append(Phase(name, it, (time.perf_counter_ns() - t0) / 1e9, {}))
        if progress:
            progress(name, it, phases[-1].seconds)

    gpas = page_gpas(base, npages)
    timed("populate", None, lambda: backend.guest_write(gpas, 0))
    flags = lambda on: KVM_MEM.LOG_DIRTY_PAGES if on else KVM_MEM(0)
    timed("enable", None, lambda: [update_memory_region_flags(backend, r.slot, flags(True)) for r in regions])
    for it in range(1, opts.iterations + 1):
        timed("dirty", it, lambda it=it: backend.guest_write(gpas, it))
        logs: dict = {}
        timed("get", it, lambda logs=logs: logs.update({r.slot: backend.get_dirty_log(r.slot).dirty for r in regions}))
        if opts.manual_protect:
            timed("clear", it, lambda logs=logs: [backend.clear_dirty_log(r.slot, 0, r.npages, sorted(logs[r.slot]))
                                                  for r in regions])
    timed("disable", None, lambda: [update_memory_region_flags(backend, r.slot, flags(False)) for r in regions])
    backend.close()
    return RunResult(getattr(backend, "name", "kvm"), getattr(backend, "policy", "host"), opts.__dict__.copy(),
                     phases, peak_rss(), time.perf_counter() - t_start)
