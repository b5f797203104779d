"""``KvmBackend``: the ``Backend`` protocol (backend/base.py) over the real ``/dev/kvm``, in pure Python.

It composes ``KvmVm`` (vm.py: memslots, dirty log/ring, guest_memfd, kvmclock, guest accesses through
the vCPU of vcpu.py) and ``HostMemory`` (host.py: mappings and host mm operations).  Use it as a context
manager; every fd, mapping and child is also released by finalizers if it is dropped or the
interpreter exits (Ctrl-C included).  Host settings are never touched here (see settings.py).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence

from kvmsim.backend.availability import KVM_DEV, kvm_available
from kvmsim.backend.base import (
    DirtyGfn, DirtyLogOutcome, Falloc, GuestAccessOutcome, GuestMemfd, GuestMemfdFlags,
    GuestMemfdOutcome, HostAccess, HostMapping, Madv, MapOutcome, MappingKind,
    MemoryRegion, MemoryRegionApi, Outcome, Prot, PvclockOutcome, PvclockVcpuTimeInfo, VmOptions,
)
from kvmsim.backend.kvm import caps as _caps
from kvmsim.backend.kvm import abi, libc
from kvmsim.backend.kvm.host import HostMemory, KvmForkedChild
from kvmsim.backend.kvm.vm import KvmVm
from kvmsim.errors import BackendUnavailable, UsageError
from kvmsim.types import Gpa

_NO_GUEST_MEMFD = 0xFFFFFFFF


class KvmBackend:
    """The real KVM.  ``policy`` overrides the kernel-version guess of caps.host_policy()."""

    name = "kvm"

    def __init__(self, *, policy: str | None = None, path: str = KVM_DEV):
        ok, reason = kvm_available(path)
        if not ok:
            raise BackendUnavailable(reason)
        self.policy = _caps.host_policy(override=policy)
        self._closer = libc.Closer()
        self._finalizer = weakref.finalize(self, self._closer.close)
        self._kvm_fd = self._closer.fd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        self._caps: dict | None = None
        self.host = HostMemory()
        self.vm: KvmVm | None = None
        self._slots: dict[int, MemoryRegion] = {}
        self._gmems: dict[int, int] = {}          # GuestMemfd.id -> fd (owned by the VM)
        self._next_gmem = 1

    def __enter__(self) -> KvmBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._drop_vm()
        self.host.close()
        self._finalizer()

    def capabilities(self) -> dict:
        """API version, NR_MEMSLOTS, USER_MEMORY2, dirty ring sizes, manual protect, GUEST_MEMFD flags,
        hugepages and THP state, kernel release and the policy in use."""
        if self._caps is None:
            self._caps = _caps.kvm_capabilities(self._kvm_fd)
        out = dict(self._caps)
        out.update(_caps.host_memory_state())
        out["policy"] = self.policy
        return out

    # --- VM lifecycle ---------------------------------------------------------------------------
    def create_vm(self, options: VmOptions = VmOptions()) -> None:
        self._drop_vm()
        self.vm = KvmVm(self._kvm_fd, options, self.capabilities())

    def _drop_vm(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self._slots.clear()
        self._gmems.clear()

    def _need_vm(self) -> KvmVm:
        if self.vm is None:
            raise UsageError("no VM: call create_vm() first")
        return self.vm

    # --- memslots and guest_memfd ---------------------------------------------------------------
    def set_memory_region(self, region: MemoryRegion,
                          api: MemoryRegionApi = MemoryRegionApi.V2) -> Outcome:
        vm = self._need_vm()
        if region.slot == vm.boot_slot:
            raise UsageError(f"memslot {region.slot} is the backend's boot slot; use another id")
        gmem_fd = _NO_GUEST_MEMFD
        if region.guest_memfd is not None:
            gmem_fd = self._gmem_fd(region.guest_memfd)
        err = vm.set_user_memory_region(region.slot, region.guest_phys_addr, region.memory_size,
                                        region.userspace_addr, int(region.flags), api, gmem_fd,
                                        region.guest_memfd_offset)
        if err == 0:
            if region.memory_size == 0:
                self._slots.pop(region.slot, None)
            else:
                self._slots[region.slot] = region
        return Outcome(err)

    def memslots(self) -> Mapping[int, MemoryRegion]:
        return dict(self._slots)

    def create_guest_memfd(self, size: int, flags: GuestMemfdFlags = GuestMemfdFlags(0)
                           ) -> GuestMemfdOutcome:
        fd, err = self._need_vm().create_guest_memfd(size, int(flags))
        if err:
            return GuestMemfdOutcome(err)
        gmem = GuestMemfd(self._next_gmem, size, GuestMemfdFlags(flags))
        self._next_gmem += 1
        self._gmems[gmem.id] = fd
        return GuestMemfdOutcome(0, gmem)

    def _gmem_fd(self, gmem: GuestMemfd) -> int:
        fd = self._gmems.get(gmem.id)
        if fd is None:
            raise UsageError(f"guest_memfd {gmem.id} does not belong to the current VM")
        return fd

    # --- host -----------------------------------------------------------------------------------
    def host_mmap(self, kind: MappingKind, size: int, *, hva: int | None = None,
                  gmem: GuestMemfd | None = None) -> MapOutcome:
        gmem_fd = self._gmem_fd(gmem) if gmem is not None else -1
        return self.host.mmap(kind, size, hva, gmem_fd)

    def host_munmap(self, m: HostMapping) -> Outcome:
        return self.host.munmap(m)

    def host_mprotect(self, m: HostMapping, prot: Prot, offset: int = 0,
                      length: int | None = None) -> Outcome:
        return self.host.mprotect(m, prot, offset, length)

    def host_madvise(self, m: HostMapping, advice: Madv, offset: int = 0,
                     length: int | None = None) -> Outcome:
        return self.host.madvise(m, advice, offset, length)

    def host_mremap(self, m: HostMapping) -> MapOutcome:
        return self.host.mremap(m)

    def host_fallocate(self, target: HostMapping | GuestMemfd, offset: int, length: int,
                       mode: Falloc = Falloc.FALLOC_FL_PUNCH_HOLE | Falloc.FALLOC_FL_KEEP_SIZE
                       ) -> Outcome:
        fd = self._gmem_fd(target) if isinstance(target, GuestMemfd) else self.host.fd_of(target)
        return self.host.fallocate(fd, mode, offset, length)

    def host_fork(self) -> KvmForkedChild:
        return self.host.fork()

    def host_read(self, m: HostMapping, offset: int, length: int = 8) -> HostAccess:
        return self.host.read(m, offset, length)

    def host_write(self, m: HostMapping, offset: int, data: bytes) -> HostAccess:
        return self.host.write(m, offset, bytes(data))

    def host_pfn(self, m: HostMapping, offset: int = 0) -> int | None:
        """The pfn behind ``m + offset`` in /proc/self/pagemap (not part of the protocol)."""
        return self.host.pfn(m.hva + offset)

    # --- guest ----------------------------------------------------------------------------------
    def guest_read(self, gpas: Sequence[int]) -> GuestAccessOutcome:
        return self._need_vm().guest_access(list(gpas), None)

    def guest_write(self, gpas: Sequence[int], values: int | Sequence[int]) -> GuestAccessOutcome:
        gpas = list(gpas)
        vals = [values] * len(gpas) if isinstance(values, int) else list(values)
        return self._need_vm().guest_access(gpas, vals)

    # --- dirty tracking -------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> DirtyLogOutcome:
        region = self._slots.get(slot)
        err, dirty = self._need_vm().get_dirty_log(slot, region.npages if region else None)
        return DirtyLogOutcome(err, dirty)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        pages: Iterable[int] | None = None) -> Outcome:
        return Outcome(self._need_vm().clear_dirty_log(slot, first_page, num_pages, pages))

    def dirty_ring_harvest(self) -> list[DirtyGfn]:
        return self._need_vm().dirty_ring_harvest()

    def dirty_ring_reset(self) -> int:
        return self._need_vm().dirty_ring_reset()

    # --- kvmclock -------------------------------------------------------------------------------
    def kvmclock_enable(self, gpa: Gpa) -> Outcome:
        return Outcome(self._need_vm().kvmclock_enable(int(gpa)))

    def kvmclock_update(self) -> PvclockOutcome:
        vm = self._need_vm()
        if vm.kvmclock_gpa is None:
            raise UsageError("kvmclock is not enabled: call kvmclock_enable(gpa) first")
        before = self._read_pvclock(vm.kvmclock_gpa)
        ex = vm.kvmclock_update()
        return PvclockOutcome(before, self._read_pvclock(vm.kvmclock_gpa), ex)

    def _read_pvclock(self, gpa: int) -> PvclockVcpuTimeInfo | None:
        size = ctypes.sizeof(abi.pvclock_vcpu_time_info)
        for r in self._slots.values():
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                got = self.host.read_hva(r.userspace_addr + gpa - r.guest_phys_addr, size)
                if got is None or got.data is None:
                    return None
                p = abi.pvclock_vcpu_time_info.from_buffer_copy(got.data)
                return PvclockVcpuTimeInfo(p.version, p.tsc_timestamp, p.system_time,
                                           p.tsc_to_system_mul, p.tsc_shift, p.flags)
        return None

    # --- extras (not in the protocol) -----------------------------------------------------------
    def stats(self) -> dict:
        """VM binary stats plus vCPU stats prefixed ``vcpu.`` (``pages_4k``, ``mmu_pte_write``,
        ``vcpu.insn_emulation``, ...)."""
        return self._need_vm().stats()

