"""virtio-gpu blob churn on the model (``virtio-gpu-blobs``), per protocol and arch.

What the VMM does, from its tree: QEMU hw/display/virtio-gpu-virgl.c ``virgl_cmd_resource_map_blob()``
→ ``virtio_gpu_virgl_map_resource_blob()`` maps the host renderer's buffer
(``virgl_renderer_resource_map()``) into the device's host-visible region (``hostmem``) with
``memory_region_init_ram_ptr()`` + ``memory_region_add_subregion()``, which the KVM memory listener
turns into a memslot (accel/kvm/kvm-all.c ``kvm_set_phys_mem()``); ``virgl_cmd_resource_unmap_blob()``
deletes the subregion (the memslot) and the renderer unmaps the buffer
(``virgl_renderer_resource_unmap()``).  crosvm and libkrun map blobs the same way.  Blob sizes here are 16 KiB to 2 MiB (powers of
two, the renderer's buffer sizes issue 18 names); the guest reads every page of a blob before it
writes it.

The buffers, as the host's drivers export them (:class:`kvmsim.mm.driver.Driver`):

* ``dmabuf``: a dma-buf exporter's VM_PFNMAP mapping prefaulted with read-only PTEs that its
  ``pfn_mkwrite`` makes writable on a host write fault (no struct page); KVM's
  ``hva_to_pfn_remapped()`` returns KVM_PFN_ERR_RO_FAULT for a write: x86 emulates the write
  (``kvm_handle_error_pfn()`` → RET_PF_EMULATE), arm64 and RISC-V fail KVM_RUN with EFAULT (libkrun
  #803), in both protocols;
* ``ttm``: amdgpu/TTM's non-compound higher-order pages (drivers/gpu/drm/ttm/ttm_pool.c
  ``ttm_pool_alloc_page()`` without __GFP_COMP) behind VM_PFNMAP|VM_IO: legacy ``kvm_try_get_pfn()``
  refs the head page it does not own (INV-1a) and every tail page is EFAULT (INV-1b); the series maps
  them all without touching a refcount ("KVM: Stop grabbing references to PFNMAP'd pages");
* ``gem-shmem``: a GEM object of shmem pages inserted on fault into a VM_PFNMAP mapping
  (drivers/gpu/drm/drm_gem_shmem_helper.c ``drm_gem_shmem_fault()`` → ``vmf_insert_pfn()``): refcounted
  pages the driver owns; legacy ``kvm_try_get_pfn()`` takes and drops a reference on every one of
  them (INV-1a), the series none;
* ``memfd``: shared memory pages (udmabuf's memfd, or a VMM's shm blob): GUP'd normally in both.

Per run: accesses by exit, struct-page operations, the checker's violations by invariant, time.
"""

from __future__ import annotations

import time

import numpy as np

from kvmsim.bench.dirty_log_perf import summarize
from kvmsim.bench.replay.common import ReplayResult
from kvmsim.types import PAGE_SHIFT

BACKINGS = ("dmabuf", "ttm", "gem-shmem", "memfd")
BLOB_SLOT = 10
BLOB_GPA = 1 << 32                      # the device's host-visible region
MIN_ORDER, MAX_ORDER = 2, 9             # 16 KiB .. 2 MiB

SOURCES = [
    "qemu hw/display/virtio-gpu-virgl.c virgl_cmd_resource_map_blob() -> virtio_gpu_virgl_map_resource_blob(), "
    "virgl_cmd_resource_unmap_blob(); "
    "accel/kvm/kvm-all.c kvm_set_phys_mem()",
    "linux drivers/gpu/drm/ttm/ttm_pool.c ttm_pool_alloc_page() (no __GFP_COMP); drivers/gpu/drm/"
    "drm_gem_shmem_helper.c drm_gem_shmem_fault() (vmf_insert_pfn); virt/kvm/kvm_main.c "
    "hva_to_pfn_remapped(), v6.12 kvm_try_get_pfn()",
    "series cover letter (Collabora: virtio-gpu blobs on amdgpu); libkrun #803 (arm64 dma-buf RO PTE -EFAULT)",
]


def blob_orders(count: int, seed: int) -> list[int]:
    """The churn: ``count`` blob sizes as page orders in MIN_ORDER..MAX_ORDER."""
    rng = np.random.default_rng(seed)
    return [int(o) for o in rng.integers(MIN_ORDER, MAX_ORDER + 1, count)]


def virtio_gpu_blobs(opts, policy: str) -> list[ReplayResult]:
    orders = blob_orders(opts.blobs, opts.seed)
    return [_run(policy, arch, backing, orders, opts) for arch in opts.arches for backing in BACKINGS]


def _map_blob(host, backing: str, name: str, order: int):
    """The renderer allocates and mmaps the buffer: (vma, driver or None)."""
    from kvmsim.mm.vma import VmaKind
    size = 4096 << order
    if backing == "memfd":
        return host.mm.mmap(size, VmaKind.MEMFD), None
    if backing == "dmabuf":
        drv = host.add_driver(name, 1 << order, "no_page", pte_write="on_write_fault", prefault=True)
    elif backing == "gem-shmem":
        drv = host.add_driver(name, 1 << order, "driver_refcounted", prefault=False)
    else:
        drv = host.add_driver(name, 1 << order, "driver_refcounted", order=order, compound=False)
    return host.mm.mmap(size, VmaKind.PFNMAP, driver=drv), drv


def _run(policy: str, arch: str, backing: str, orders: list[int], opts) -> ReplayResult:
    from kvmsim.check import Checker
    from kvmsim.kvm.kvm import Kvm
    from kvmsim.mm.host import Host
    t0 = time.perf_counter()
    host = Host()
    kvm = Kvm(host, policy=policy, arch=arch)
    vcpu = kvm.create_vcpu()
    checker = Checker(kvm)
    before = kvm.journal.snapshot()
    exits: dict[str, dict[str, int]] = {"read": {}, "write": {}}
    failed_blobs = 0
    for b, order in enumerate(orders):
        size = 4096 << order
        vma, drv = _map_blob(host, backing, f"blob{b}", order)
        kvm.set_user_memory_region(BLOB_SLOT, BLOB_GPA, size, vma.start, 0)    # map_blob: the subregion
        bad = False
        for kind, write in (("read", False), ("write", True)):
            for k in range(1 << order):
                a = vcpu.access(BLOB_GPA + (k << PAGE_SHIFT), write, 0x5A00 + b if write else None)
                e = a.exit.value
                exits[kind][e] = exits[kind].get(e, 0) + 1
                bad |= e != "ok"
        failed_blobs += bad
        kvm.set_user_memory_region(BLOB_SLOT, BLOB_GPA, 0, vma.start, 0)       # unmap_blob: memslot deleted
        host.mm.munmap(vma.start, size)
        if drv is not None:
            drv.teardown(host.mm)                           # the renderer frees the buffer by its own rules
        checker.run()
    res = ReplayResult("virtio-gpu-blobs", backing, policy, arch,
                       {"blobs": len(orders), "blob_bytes_min": 4096 << MIN_ORDER,
                        "blob_bytes_max": 4096 << MAX_ORDER, "blob_bytes_total": sum(4096 << o for o in orders),
                        "access_order": "read every page, then write every page", "seed": opts.seed},
                       SOURCES)
    res.iterations = len(orders)
    res.wall_seconds = time.perf_counter() - t0
    res.counters = summarize(kvm.journal.since(before))
    res.extra.update({"exits": exits, "failed_blobs": failed_blobs, "violations": checker.by_invariant(),
                      "efault": exits["read"].get("efault", 0) + exits["write"].get("efault", 0),
                      "foreign_refs": checker.by_invariant().get("INV-1", 0)})
    return res
