"""Upstream as of Linux v6.18 ("current": the kernel the development hosts run): v6.13's protocol
(:class:`~kvmsim.policies.series.SeriesPolicy`) plus the observable MMU changes merged for v6.14 .. v6.18.

* Dirty-ring reset (v6.17, "KVM: Dirty ring fixes and cleanups"): ``kvm_dirty_ring_reset()`` resets at
  most INT_MAX entries per KVM_RESET_DIRTY_RINGS ("KVM: Bound the number of dirty ring entries in a single
  reset at INT_MAX", 530a8ba71b4c) and stops with -EINTR when a signal is pending ("KVM: Bail from the
  dirty ring reset flow if a signal is pending", 49005a2a3d2a); the ioctl still flushes once and returns
  the entries reset so far, and the gfns of the batch pending at the signal stay writable
  (:func:`kvmsim.kvm.dirty.kvm_dirty_ring_reset_v617`).
* guest_memfd mmap (v6.18): ``GUEST_MEMFD_FLAG_MMAP`` ("KVM: Allow and advertise support for host mmap()
  on guest_memfd files", 3d3a04fad25a; "KVM: Rework KVM_CAP_GUEST_MEMFD_MMAP into KVM_CAP_GUEST_MEMFD_FLAGS",
  d2042d8f96dd) and ``GUEST_MEMFD_FLAG_INIT_SHARED`` ("KVM: guest_memfd: Add INIT_SHARED flag, reject user
  page faults if not set", fe2bf6234e94; MMAP on VMs with private memory too, "KVM: guest_memfd: Allow
  mmap() on guest_memfd for x86 VMs with private memory", 44c6cb9fe988); KVM_MEM_GUEST_MEMFD on any x86-64
  VM ("KVM: x86: Enable KVM_GUEST_MEMFD for all 64-bit builds", d1e54dd08f16); a memslot bound to an mmap-able guest_memfd is
  "gmem only" ("KVM: guest_memfd: Track guest_memfd mmap support in memslot", 576d035e2aef) and its shared
  faults take the folio from ``kvm_gmem_get_pfn()``, not from GUP of ``userspace_addr`` ("KVM: x86/mmu:
  Handle guest page faults for guest_memfd with shared memory", f029f04ddbec).
* arm64 cacheable PFNMAP (v6.17): a VM_PFNMAP / VM_MIXEDMAP pfn outside the linear map is mapped
  cacheable at stage 2 when the VMA is cacheable and the CPUs have FWB and DIC
  (KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED), refused otherwise ("KVM: arm64: Block cacheable PFNMAP
  mapping", 2a8dfab26677; "KVM: arm64: Allow cacheable stage 2 mapping using VMA flags", 0c67288e0c8b;
  "KVM: arm64: Expose new KVM cap for cacheable PFNMAP", f55ce5a6cd33; the refusal releases the page,
  "KVM: arm64: Fix page leak in user_mem_abort()", 5f9466b50c1b) (:mod:`kvmsim.arm64.pfnmap`).

Not in v6.18, so not here: RISC-V THP G-stage leaves ("RISC-V: KVM: Transparent huge page support",
ed7ae7a34bea, merged after v6.18 with the RISC-V KVM pull for the next release).  docs/policies.md,
"current", lists each difference with its scenario.
"""

from __future__ import annotations

from kvmsim.policies.series import SeriesPolicy
from kvmsim.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP


class CurrentPolicy(SeriesPolicy):
    name = "current"
    title = "v6.18: v6.13 + bounded/interruptible dirty-ring reset, guest_memfd mmap, arm64 cacheable PFNMAP"

    #: arm64's v6.17 cacheable-PFNMAP gating; every other arch as v6.13.
    ARCH_OPS = {**SeriesPolicy.ARCH_OPS, "arm64": "kvmsim.arm64.versions:ARM64_V618"}

    def dirty_ring_reset(self):
        """v6.17 ``kvm_dirty_ring_reset()``: bounded at INT_MAX ("KVM: Bound the number of dirty ring entries
        in a single reset at INT_MAX", 530a8ba71b4c), -EINTR on a pending signal ("KVM: Bail from the dirty
        ring reset flow if a signal is pending", 49005a2a3d2a)."""
        from kvmsim.kvm.dirty import kvm_dirty_ring_reset_v617
        return kvm_dirty_ring_reset_v617

    def gmem_supported_flags(self, kvm):
        """v6.18 ``kvm_gmem_get_supported_flags()``: MMAP ("KVM: Allow and advertise support for host mmap()
        on guest_memfd files", 3d3a04fad25a) on any VM ("KVM: guest_memfd: Allow mmap() on guest_memfd for
        x86 VMs with private memory", 44c6cb9fe988), and INIT_SHARED ("KVM: guest_memfd: Add INIT_SHARED
        flag, reject user page faults if not set", fe2bf6234e94) where
        ``kvm_arch_supports_gmem_init_shared()``: x86, a VM without private memory."""
        return GUEST_MEMFD_FLAG_MMAP | (0 if kvm.has_private_mem else GUEST_MEMFD_FLAG_INIT_SHARED)

    def supports_gmem(self, kvm):
        """v6.18 ``kvm_arch_supports_gmem()``: any x86-64 VM ("KVM: x86: Enable KVM_GUEST_MEMFD for all
        64-bit builds", d1e54dd08f16).  (arm64's guest_memfd faults, "KVM: arm64: Handle guest_memfd-backed
        guest page faults", a7b57e099592, are not modelled: other arches keep v6.13's rule.)"""
        return kvm.arch.family == "x86" or kvm.has_private_mem
