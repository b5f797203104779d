"""``ModelBackend``: the simulator behind the :class:`~kvmsim.backend.base.Backend` protocol.

One host (``kvmsim.mm.host.Host``) per backend, one ``Kvm`` per ``create_vm``.  The host-execution
mode decides how guest accesses reach memory, and the differences it causes are modelled, not
papered over:

=========================  ===========================================  =========================================
observable                 ``execution="emulated"`` (these machines)     ``execution="hardware"`` (VMX/SVM)
=========================  ===========================================  =========================================
access to unmapped hva     KVM_EXIT_MMIO (the emulator's uaccess fails)  KVM_RUN -EFAULT (stage-2 fault, FAULT pfn)
write to RO host VMA       KVM_EXIT_MMIO                                  KVM_RUN -EFAULT (mmu_stress_test)
dirty ring                 one entry per emulated write                   one entry per page until reset
stage-2 SPTEs              never created                                  created by faults
=========================  ===========================================  =========================================

Contract limits of the model (documented, checked): guest accesses and host reads/writes are 8-byte
values at offset 0 of a page, because the model keeps one content token per page.
"""

from __future__ import annotations

import errno
import signal
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from kvmsim.backend import base
from kvmsim.backend.base import (Access, DirtyGfn, DirtyLogOutcome, Exit, Falloc, GuestAccessOutcome, GuestMemfd,
                                 GuestMemfdFlags, GuestMemfdOutcome, HostAccess, HostMapping, Madv, MapOutcome,
                                 MappingKind, MemoryRegion, MemoryRegionApi, Outcome, Prot, PvclockOutcome,
                                 PvclockVcpuTimeInfo, VmOptions)
from kvmsim.errors import BackendError, ModelError, UsageError
from kvmsim.mm.host import Host
from kvmsim.policies import DEFAULT_POLICY
from kvmsim.mm.vma import Pte, VmaKind
from kvmsim.types import PAGE_SIZE, Gpa, Hva

BOOT_SLOT = getattr(base, "BOOT_SLOT", 0)

# What KVM_RUN shows a VMM for each exit of the model's vCPU: EINTR, HWPOISON and a full dirty ring
# end the run with an error, which the backend contract reports as EFAULT.
_EXITS = {Exit.OK: Exit.OK, Exit.MMIO: Exit.MMIO, Exit.EFAULT: Exit.EFAULT,
          Exit.EINTR: Exit.EFAULT, Exit.HWPOISON: Exit.EFAULT, Exit.DIRTY_RING_FULL: Exit.EFAULT}


class _Child:
    def __init__(self, mm):
        self.pid = id(mm) & 0x7FFFFFFF
        self._mm = mm

    def release(self) -> None:
        if self._mm is not None:
            self._mm.exit_mmap()
            self._mm = None


class ModelBackend:
    """The model as a Backend: ``policy`` legacy|series, ``execution`` emulated|hardware."""

    def __init__(self, policy: str = DEFAULT_POLICY, execution: str = "emulated", *, arch: str = "x86",
                 hugetlb_pages: int = 64):
        if execution not in ("emulated", "hardware"):
            raise UsageError(f"execution must be emulated or hardware, not {execution!r}")
        self.name = f"model-{policy}-{execution}"
        self.policy = policy
        self.execution = execution
        self.arch = arch
        self.host = Host()
        self.kvm = None
        self.vcpu = None
        self._slots: dict[int, MemoryRegion] = {}
        self._maps: dict[int, tuple[HostMapping, object]] = {}
        self._gmems: dict[int, object] = {}
        self._next_id = 1
        self._hugetlb_free = hugetlb_pages
        self._gpc = None
        self._pvclock_version = 0
        self._boot = self.host.mm.mmap(int(base.BOOT_GPA_END), VmaKind.ANON_SHARED)

    # ---- VM ------------------------------------------------------------------------------------
    def _kvm_options(self) -> dict:
        """Extra ``Kvm(...)`` options a subclass sets (the oracle's: no PML, the other 6.13 changes)."""
        return {}

    def create_vm(self, options: VmOptions = VmOptions()) -> None:
        from kvmsim.kvm.dirty import enable_dirty_ring, enable_manual_protect
        from kvmsim.kvm.kvm import Kvm
        if self.kvm is not None:
            self.kvm.destroy()
        # KVM_CREATE_VM(0), as the real backend does: KVM_X86_DEFAULT_VM has no private memory
        self.kvm = Kvm(self.host, policy=self.policy, arch=self.arch, execution=self.execution,
                       **{"has_private_mem": False, **self._kvm_options()})
        try:
            if options.dirty_ring_entries:
                enable_dirty_ring(self.kvm, options.dirty_ring_entries * 16)
            if options.manual_protect:
                enable_manual_protect(self.kvm, int(options.manual_protect))
        except ModelError as e:
            raise UsageError(f"create_vm: {e}") from None
        self.vcpu = self.kvm.create_vcpu()
        self._slots = {}
        self._gpc = None
        self.kvm.set_user_memory_region(BOOT_SLOT, 0, int(base.BOOT_GPA_END), self._boot.start)

    def close(self) -> None:
        if self.kvm is not None:
            self.kvm.destroy()
            self.kvm = None

    def _need_vm(self):
        if self.kvm is None:
            raise UsageError("create_vm() first")
        return self.kvm

    # ---- memslots ------------------------------------------------------------------------------
    def set_memory_region(self, region: MemoryRegion, api: MemoryRegionApi = MemoryRegionApi.V2) -> Outcome:
        kvm = self._need_vm()
        gmem = self._gmems.get(region.guest_memfd.id) if region.guest_memfd else None
        try:
            kvm.set_user_memory_region(region.slot, int(region.guest_phys_addr), region.memory_size,
                                       int(region.userspace_addr), int(region.flags), v1=api is MemoryRegionApi.V1,
                                       guest_memfd=gmem, guest_memfd_offset=region.guest_memfd_offset)
        except ModelError as e:
            return Outcome(e.errno)
        if region.memory_size == 0:
            self._slots.pop(region.slot, None)
        else:
            self._slots[region.slot] = region
        return Outcome(0)

    def memslots(self) -> Mapping[int, MemoryRegion]:
        return dict(self._slots)

    def create_guest_memfd(self, size: int, flags: GuestMemfdFlags = GuestMemfdFlags(0)) -> GuestMemfdOutcome:
        from kvmsim.kvm.gmem import GuestMemfd as ModelGmem
        kvm = self._need_vm()
        try:
            g = ModelGmem(kvm, size, int(flags))
        except ModelError as e:
            return GuestMemfdOutcome(e.errno)
        gid = self._next_id
        self._next_id += 1
        self._gmems[gid] = g
        return GuestMemfdOutcome(0, GuestMemfd(gid, size, GuestMemfdFlags(int(flags))))

    # ---- host mappings ----------------------------------------------------------------------------
    def host_mmap(self, kind: MappingKind, size: int, *, hva: Hva | None = None,
                  gmem: GuestMemfd | None = None) -> MapOutcome:
        mm = self.host.mm
        addr = int(hva) if hva is not None else None
        try:
            if kind is MappingKind.ANON_PRIVATE:
                vma = mm.mmap(size, VmaKind.ANON, addr=addr)
            elif kind is MappingKind.ANON_SHARED:
                vma = mm.mmap(size, VmaKind.ANON_SHARED, addr=addr)
            elif kind is MappingKind.MEMFD:
                vma = mm.mmap(size, VmaKind.MEMFD, addr=addr)
            elif kind is MappingKind.HUGETLB_2M:
                need = size // (2 << 20)
                if size % (2 << 20) or need > self._hugetlb_free:
                    return MapOutcome(errno.ENOMEM if need > self._hugetlb_free else errno.EINVAL)
                self._hugetlb_free -= need
                vma = mm.mmap(size, VmaKind.HUGETLB, page_size=2 << 20, addr=addr)
            elif kind is MappingKind.THP_ANON:
                vma = mm.mmap(size, VmaKind.ANON, thp=True, addr=addr)
            elif kind is MappingKind.PERF_RING:
                drv = self.host.add_driver(f"perf{self._next_id}", size // PAGE_SIZE, "driver_refcounted",
                                           pte_write="on_write_fault",
                                           pfn_mkwrite=lambda pgoff: pgoff == 0)   # perf_mmap_pfn_mkwrite()
                vma = mm.mmap(size, VmaKind.PFNMAP, driver=drv, addr=addr)
            elif kind is MappingKind.VVAR:
                drv = self.host.add_driver(f"vvar{self._next_id}", size // PAGE_SIZE, "reserved", pte_write="never")
                vma = mm.mmap(size, VmaKind.PFNMAP, driver=drv, prot="r", addr=addr)
            elif kind is MappingKind.IO_URING_RING:
                drv = self.host.add_driver(f"io_uring{self._next_id}", size // PAGE_SIZE, "normal", mixed=True)
                vma = mm.mmap(size, VmaKind.MIXEDMAP, driver=drv, addr=addr)
            elif kind is MappingKind.GUEST_MEMFD:
                g = self._gmems.get(gmem.id) if gmem else None
                if g is None:
                    return MapOutcome(errno.EBADF)
                if not g.flags & GuestMemfdFlags.GUEST_MEMFD_FLAG_MMAP:
                    return MapOutcome(errno.ENODEV)
                if g.flags & GuestMemfdFlags.GUEST_MEMFD_FLAG_INIT_SHARED:   # the file's own folios
                    vma = mm.mmap(size, VmaKind.MEMFD, addr=addr, mapping=g.host_address_space(mm))
                else:                                   # private by default: host faults SIGBUS
                    drv = self.host.add_driver(f"gmem{gmem.id}", size // PAGE_SIZE, "normal", mixed=True,
                                               prefault=False)
                    drv.torn_down = True
                    vma = mm.mmap(size, VmaKind.MIXEDMAP, driver=drv, addr=addr)
            else:
                return MapOutcome(errno.ENOSYS)
        except ModelError as e:
            return MapOutcome(e.errno)
        mid = self._next_id
        self._next_id += 1
        m = HostMapping(mid, kind, Hva(vma.start), size)
        self._maps[mid] = (m, vma)
        return MapOutcome(0, m)

    def _vma_of(self, m: HostMapping):
        if m.id not in self._maps:
            raise UsageError(f"mapping {m.id} is not live")
        return self._maps[m.id][1]

    def host_munmap(self, m: HostMapping) -> Outcome:
        self._vma_of(m)
        try:
            self.host.mm.munmap(int(m.hva), m.size)
        except ModelError as e:
            return Outcome(e.errno)
        del self._maps[m.id]
        return Outcome(0)

    def host_mprotect(self, m: HostMapping, prot: Prot, offset: int = 0, length: int | None = None) -> Outcome:
        self._vma_of(m)
        text = ("r" if prot & Prot.PROT_READ else "") + ("w" if prot & Prot.PROT_WRITE else "")
        try:
            self.host.mm.mprotect(int(m.hva) + offset, length or m.size - offset, text or "none")
        except ModelError as e:
            return Outcome(e.errno)
        return Outcome(0)

    def host_madvise(self, m: HostMapping, advice: Madv, offset: int = 0, length: int | None = None) -> Outcome:
        from kvmsim.mm.reclaim import thp_collapse
        vma = self._vma_of(m)
        start, n = int(m.hva) + offset, length or m.size - offset
        try:
            if advice in (Madv.MADV_DONTNEED, Madv.MADV_REMOVE, Madv.MADV_COLD, Madv.MADV_PAGEOUT):
                self.host.mm.madvise(start, n, advice.name)
            elif advice is Madv.MADV_HUGEPAGE:
                from kvmsim.mm.vma import VM
                vma.flags |= VM.HUGEPAGE
            elif advice is Madv.MADV_POPULATE_WRITE:
                for a in range(start, start + n, PAGE_SIZE):
                    self.host.mm.host_access(a, True, self.host.mm.host_access(a, False))
            elif advice is Madv.MADV_COLLAPSE:
                thp_collapse(self.host.mm, start)
        except ModelError as e:
            return Outcome(e.errno)
        return Outcome(0)

    def host_mremap(self, m: HostMapping) -> MapOutcome:
        self._vma_of(m)
        new = self.host.mm.mremap(int(m.hva), m.size)
        nm = HostMapping(m.id, m.kind, Hva(new), m.size)
        self._maps[m.id] = (nm, self.host.mm.vma_lookup(new))
        return MapOutcome(0, nm)

    def host_fallocate(self, target, offset: int, length: int,
                       mode: Falloc = Falloc.FALLOC_FL_PUNCH_HOLE | Falloc.FALLOC_FL_KEEP_SIZE) -> Outcome:
        from kvmsim.mm.reclaim import punch_hole
        if isinstance(target, GuestMemfd):
            from kvmsim.kvm.gmem import kvm_gmem_punch_hole
            kvm_gmem_punch_hole(self._need_vm(), self._gmems[target.id], offset // PAGE_SIZE, length // PAGE_SIZE)
            return Outcome(0)
        vma = self._vma_of(target)
        if vma.mapping is None or target.kind in (MappingKind.ANON_PRIVATE, MappingKind.THP_ANON):
            return Outcome(errno.EBADF)
        punch_hole(self.host.mm, vma.mapping, vma.pgoff + offset // PAGE_SIZE, length // PAGE_SIZE)
        return Outcome(0)

    def host_fork(self):
        return _Child(self.host.mm.fork())

    def host_read(self, m: HostMapping, offset: int, length: int = 8) -> HostAccess:
        self._vma_of(m)
        if offset % PAGE_SIZE or length != 8:
            raise UsageError("the model keeps one 8-byte value per page: host reads at page offset 0 only")
        try:
            v = self.host.mm.host_access(int(m.hva) + offset, False)
        except ModelError:
            return HostAccess(None, self._signal_for(int(m.hva) + offset, False))
        return HostAccess(struct.pack("<q", v))

    def _signal_for(self, hva: int, write: bool) -> int:
        """SIGSEGV for no mapping or a protection fault, SIGBUS when the backing cannot be faulted in."""
        from kvmsim.mm.fault import access_permitted
        vma = self.host.mm.vma_lookup(hva)
        if vma is None or not access_permitted(vma, write):
            return signal.SIGSEGV
        return signal.SIGBUS

    def host_write(self, m: HostMapping, offset: int, data: bytes) -> HostAccess:
        self._vma_of(m)
        if offset % PAGE_SIZE or len(data) != 8:
            raise UsageError("the model keeps one 8-byte value per page: host writes at page offset 0 only")
        try:
            self.host.mm.host_access(int(m.hva) + offset, True, struct.unpack("<q", data)[0])
        except ModelError:
            return HostAccess(None, self._signal_for(int(m.hva) + offset, True))
        return HostAccess(b"")

    # ---- guest accesses ---------------------------------------------------------------------------
    def _guest(self, gpas: Sequence[int], values) -> GuestAccessOutcome:
        self._need_vm()
        write = values is not None
        if write and isinstance(values, int):
            values = [values] * len(gpas)
        out = []
        for i, gpa in enumerate(gpas):
            if gpa < base.BOOT_GPA_END or base.APIC_GPA <= gpa < base.APIC_GPA + PAGE_SIZE:
                raise UsageError(f"gpa {gpa:#x} is outside the guest-access contract")
            if gpa % PAGE_SIZE:
                raise UsageError("the model keeps one 8-byte value per page: guest accesses at page offset 0 only")
            v = int(np.int64(np.uint64(values[i] & (2**64 - 1)))) if write else None
            r = self.vcpu.access(gpa, write, v)
            if r.exit is Exit.LIVELOCK:
                # KVM_RUN would re-enter the guest forever: no exit a VMM could be shown
                raise BackendError(f"guest {'write' if write else 'read'} at gpa {gpa:#x} livelocks: KVM_RUN "
                                   f"would never return (every re-entry retries the same stage-2 fault)")
            ex = _EXITS[r.exit]
            val = (values[i] if write else (int(np.uint64(np.int64(r.value))) if r.value is not None else None))
            if ex is Exit.MMIO and not write:
                val = None
            out.append(Access(ex, Gpa(gpa), write, val))
            if ex in base.TERMINAL_EXITS:
                break
        return GuestAccessOutcome(tuple(out), len(gpas))

    def guest_read(self, gpas: Sequence[int]) -> GuestAccessOutcome:
        return self._guest(gpas, None)

    def guest_write(self, gpas: Sequence[int], values: int | Sequence[int]) -> GuestAccessOutcome:
        return self._guest(gpas, values)

    # ---- dirty tracking ---------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> DirtyLogOutcome:
        from kvmsim.kvm.dirty import kvm_get_dirty_log
        try:
            bits = kvm_get_dirty_log(self._need_vm(), slot)
        except ModelError as e:
            return DirtyLogOutcome(e.errno)
        return DirtyLogOutcome(0, frozenset(int(i) for i in np.nonzero(bits)[0]))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        pages: Iterable[int] | None = None) -> Outcome:
        from kvmsim.kvm.dirty import kvm_clear_dirty_log
        mask = None
        if pages is not None:
            mask = np.zeros(max(num_pages, 0), dtype=bool)
            for p in pages:
                if first_page <= p < first_page + num_pages:
                    mask[p - first_page] = True
        try:
            kvm_clear_dirty_log(self._need_vm(), slot, first_page, num_pages, mask)
        except ModelError as e:
            return Outcome(e.errno)
        return Outcome(0)

    def dirty_ring_harvest(self) -> list[DirtyGfn]:
        from kvmsim.kvm.dirty import kvm_dirty_ring_harvest
        return [DirtyGfn(s, o) for s, o in kvm_dirty_ring_harvest(self._need_vm(), self.vcpu)]

    def dirty_ring_reset(self) -> int:
        from kvmsim.kvm.dirty import kvm_reset_dirty_rings
        try:
            return kvm_reset_dirty_rings(self._need_vm())
        except ModelError:
            return 0

    # ---- kvmclock pfncache ------------------------------------------------------------------------
    def kvmclock_enable(self, gpa: Gpa) -> Outcome:
        from kvmsim.kvm.pfncache import GfnToPfnCache
        kvm = self._need_vm()
        if self._gpc is not None:
            self._gpc.deactivate()
        self._gpc = GfnToPfnCache(kvm)
        self._gpc.active, self._gpc.gpa = True, int(gpa)
        return Outcome(0)

    def _pvclock_now(self) -> PvclockVcpuTimeInfo | None:
        kvm = self.kvm
        gfn = self._gpc.gpa >> 12
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:
            return None
        _, pfn, bits, _ = self.host.mm.pte_of(slot.gfn_to_hva(gfn))
        if pfn < 0 or not bits & Pte.PRESENT:
            return PvclockVcpuTimeInfo(0, 0, 0, 0, 0, 0)
        v = self.host.phys.read(pfn, "pvclock probe")
        return PvclockVcpuTimeInfo(v if 0 <= v < 1 << 32 else 0, 0, 0, 0, 0, 0)

    def kvmclock_update(self) -> PvclockOutcome:
        if self._gpc is None:
            raise UsageError("kvmclock_enable() first")
        before = self._pvclock_now()
        self._pvclock_version += 2
        self._gpc.write(self._pvclock_version)
        return PvclockOutcome(before, self._pvclock_now())
