"""One KVM VM over ctypes: memslots, guest_memfd, dirty log/ring, kvmclock and guest accesses
(virt/kvm/kvm_main.c ``kvm_vm_ioctl``, virt/kvm/dirty_ring.c, virt/kvm/guest_memfd.c, arch/x86/kvm/x86.c).

The VM owns the boot memslot (id ``nr_memslots - 1``, guest physical ``[0, BOOT_GPA_END)``, anon
MAP_SHARED, never dirty-logged) that holds the guest programs, page tables, IDT and the address/value
lists of guest.py.  Every fd and mapping it creates is registered with a ``Closer`` finalizer.
"""

from __future__ import annotations

import array
import ctypes
import errno
import weakref
from collections.abc import Iterable, Sequence

from kvmsim import uapi
from kvmsim.backend.base import (
    APIC_GPA, BOOT_GPA_END, GUEST_GPA_LIMIT, Access, DirtyGfn, Exit, GuestAccessOutcome,
    MemoryRegionApi, VmOptions,
)
from kvmsim.backend.kvm import abi, guest, ioctls, libc
from kvmsim.backend.kvm.stats import StatsFd
from kvmsim.backend.kvm.vcpu import KvmVcpu
from kvmsim.errors import KvmIoctlError, UsageError
from kvmsim.types import PAGE_SIZE, Gpa

MIN_DIRTY_RING_ENTRIES = 4096


class KvmVm:
    """A VM with one vCPU, created from an open ``/dev/kvm`` fd."""

    def __init__(self, kvm_fd: int, options: VmOptions, caps: dict):
        self._closer = libc.Closer()
        self._finalizer = weakref.finalize(self, self._closer.close)
        self._stats: dict[str, StatsFd] = {}   # before anything can fail: close() clears it
        try:
            self._setup(kvm_fd, options, caps)
        except BaseException:
            self.close()
            raise

    def _setup(self, kvm_fd: int, options: VmOptions, caps: dict) -> None:
        self.options = options
        self.fd = self._closer.fd(ioctls.kvm_create_vm(kvm_fd))
        self.boot_slot = caps["nr_memslots"] - 1
        self._ring = None
        self.ring_entries = 0
        self._ring_fetch = 0
        self._ring_pending: list[DirtyGfn] = []
        self._ring_reset_pending = 0
        self._ring_budget_used = 0
        self.kvmclock_gpa: int | None = None
        if options.manual_protect:
            self.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, int(options.manual_protect))
        if options.dirty_ring_entries is not None:
            self._enable_dirty_ring(options.dirty_ring_entries, caps)
        self._setup_boot_memory()
        self.vcpu = KvmVcpu(self.fd, caps["vcpu_mmap_size"], self._closer)
        if self.ring_entries:
            size = self.ring_entries * ctypes.sizeof(abi.kvm_dirty_gfn)
            addr, err = libc.mmap(None, size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED,
                                  self.vcpu.fd, uapi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
            if addr < 0:
                raise KvmIoctlError("mmap(dirty ring)", err)
            self._closer.mapping(addr, size)
            libc.madvise(addr, size, libc.MADV_DONTFORK)
            self._ring = (abi.kvm_dirty_gfn * self.ring_entries).from_address(addr)

    def close(self) -> None:
        self._stats.clear()                 # their fds belong to the closer
        self._finalizer()

    # --- setup ----------------------------------------------------------------------------------
    def enable_cap(self, cap: int, *args: int) -> int:
        ec = abi.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        ret, err = ioctls.raw_ioctl(self.fd, ioctls.KVM_ENABLE_CAP, ec)
        return 0 if ret >= 0 else err

    def check_extension(self, cap: int) -> int:
        ret, _ = ioctls.raw_ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap)
        return max(ret, 0)

    def _enable_dirty_ring(self, entries: int, caps: dict) -> None:
        max_bytes = caps.get("dirty_log_ring_acq_rel") or caps.get("dirty_log_ring") or 0
        nbytes = entries * ctypes.sizeof(abi.kvm_dirty_gfn)
        if not max_bytes:
            raise UsageError("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")
        if entries < MIN_DIRTY_RING_ENTRIES or entries & (entries - 1) or nbytes > max_bytes:
            raise UsageError(f"dirty_ring_entries must be a power of two in "
                             f"[{MIN_DIRTY_RING_ENTRIES}, {max_bytes // 16}], got {entries}")
        cap = (uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if caps.get("dirty_log_ring_acq_rel")
               else uapi.KVM_CAP_DIRTY_LOG_RING)
        err = self.enable_cap(cap, nbytes)
        if err:
            raise KvmIoctlError("KVM_ENABLE_CAP(DIRTY_LOG_RING)", err)
        self.ring_entries = entries

    def _setup_boot_memory(self) -> None:
        size = guest.BOOT_SIZE
        addr, err = libc.mmap(None, size, libc.PROT_READ | libc.PROT_WRITE,
                              libc.MAP_SHARED | libc.MAP_ANONYMOUS, -1, 0)
        if addr < 0:
            raise KvmIoctlError("mmap(boot memory)", err)
        self._closer.mapping(addr, size)
        self.boot = addr
        code, self.entries = guest.programs()
        self._poke(guest.BOOT_CODE, code)
        self._poke(guest.BOOT_STUBS, guest.exception_stubs())
        self._poke(guest.BOOT_IDT, guest.idt())
        self._poke(guest.BOOT_GDT, guest.gdt())
        self._poke(guest.BOOT_PML4, (guest.BOOT_PDPT | 3).to_bytes(8, "little"))
        self._pds: dict[int, int] = {}
        self._ensure_mapped([0])
        err = self.set_user_memory_region(self.boot_slot, 0, size, addr, 0, MemoryRegionApi.V1)
        if err:
            raise KvmIoctlError("KVM_SET_USER_MEMORY_REGION(boot slot)", err)

    def _poke(self, gpa: int, data: bytes) -> None:
        ctypes.memmove(self.boot + gpa, data, len(data))

    def _ensure_mapped(self, gpas: Iterable[int]) -> None:
        """Install identity 2 MiB mappings for every GiB that ``gpas`` touch."""
        for gib in sorted({g >> 30 for g in gpas} - self._pds.keys()):
            if len(self._pds) >= guest.PD_POOL:
                raise UsageError(f"guest accesses span more than {guest.PD_POOL} distinct GiB of gpa")
            pd = guest.BOOT_PD_POOL + len(self._pds) * PAGE_SIZE
            entries = array.array("Q", (guest.pde_2m((gib << 30) + (i << 21)) for i in range(512)))
            self._poke(pd, entries.tobytes())
            self._poke(guest.BOOT_PDPT + 8 * gib, (pd | 3).to_bytes(8, "little"))
            self._pds[gib] = pd

    # --- memslots and guest_memfd ---------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, uaddr: int, flags: int,
                               api: MemoryRegionApi, gmem_fd: int = 0, gmem_offset: int = 0) -> int:
        if api is MemoryRegionApi.V1:
            r = abi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                 memory_size=size, userspace_addr=uaddr)
            req = ioctls.KVM_SET_USER_MEMORY_REGION
        else:
            r = abi.kvm_userspace_memory_region2(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                  memory_size=size, userspace_addr=uaddr,
                                                  guest_memfd_offset=gmem_offset, guest_memfd=gmem_fd)
            req = ioctls.KVM_SET_USER_MEMORY_REGION2
        _, err = ioctls.raw_ioctl(self.fd, req, r)
        return err

    def create_guest_memfd(self, size: int, flags: int) -> tuple[int, int]:
        """``(fd, 0)`` or ``(-1, errno)``; the fd is owned by the VM's closer."""
        arg = abi.kvm_create_guest_memfd(size=size, flags=flags)
        ret, err = ioctls.raw_ioctl(self.fd, ioctls.KVM_CREATE_GUEST_MEMFD, arg)
        if ret < 0:
            return -1, err
        return self._closer.fd(ret), 0

    # --- dirty log ------------------------------------------------------------------------------
    def get_dirty_log(self, slot: int, npages: int | None) -> tuple[int, frozenset[int]]:
        """KVM_GET_DIRTY_LOG; ``npages is None`` (a slot kvmsim never installed) passes a NULL bitmap."""
        buf = (ctypes.c_uint64 * max(1, ((npages or 0) + 63) // 64))()
        log = abi.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(buf) if npages else 0)
        _, err = ioctls.raw_ioctl(self.fd, ioctls.KVM_GET_DIRTY_LOG, log)
        if err:
            return err, frozenset()
        return 0, _bits(buf, npages or 0)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        pages: Iterable[int] | None) -> int:
        nwords = max(1, (num_pages + 63) // 64)
        buf = (ctypes.c_uint64 * nwords)()
        offsets = range(num_pages) if pages is None else (p - first_page for p in pages)
        for off in offsets:
            if not 0 <= off < num_pages:
                raise UsageError(f"page {off + first_page} is outside the CLEAR range "
                                 f"[{first_page}, {first_page + num_pages})")
            buf[off // 64] |= 1 << (off % 64)
        log = abi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                       dirty_bitmap=ctypes.addressof(buf))
        _, err = ioctls.raw_ioctl(self.fd, ioctls.KVM_CLEAR_DIRTY_LOG, log)
        return err

    # --- dirty ring -----------------------------------------------------------------------------
    def _ring_collect(self) -> None:
        """Harvest every entry KVM published (flags DIRTY) into the pending list; mark them RESET."""
        if self._ring is None:
            return
        n = self.ring_entries
        while True:
            e = self._ring[self._ring_fetch % n]
            if not e.flags & uapi.KVM_DIRTY_GFN_F_DIRTY:
                break
            self._ring_pending.append(DirtyGfn(e.slot, e.offset))
            e.flags = uapi.KVM_DIRTY_GFN_F_RESET
            self._ring_fetch += 1

    def dirty_ring_harvest(self) -> list[DirtyGfn]:
        if self._ring is None:
            raise UsageError("the VM was created without a dirty ring (VmOptions.dirty_ring_entries)")
        self._ring_collect()
        out, self._ring_pending = self._ring_pending, []
        return out

    def dirty_ring_reset(self) -> int:
        if self._ring is None:
            raise UsageError("the VM was created without a dirty ring (VmOptions.dirty_ring_entries)")
        count = ioctls.ioctl(self.fd, ioctls.KVM_RESET_DIRTY_RINGS)
        total, self._ring_reset_pending = count + self._ring_reset_pending, 0
        self._ring_budget_used = max(0, self._ring_budget_used - total)
        return total

    def _on_ring_full(self) -> None:
        self._ring_collect()
        self._ring_reset_pending += ioctls.ioctl(self.fd, ioctls.KVM_RESET_DIRTY_RINGS)

    # --- guest accesses -------------------------------------------------------------------------
    def guest_access(self, gpas: Sequence[int], values: Sequence[int] | None) -> GuestAccessOutcome:
        """Loads (``values is None``) or stores of 8 bytes at each gpa, in order."""
        gpas = [int(g) for g in gpas]
        for g in gpas:
            if g % 8 or g < BOOT_GPA_END or g >= GUEST_GPA_LIMIT or APIC_GPA <= g < APIC_GPA + PAGE_SIZE:
                raise UsageError(f"guest access at {g:#x}: gpas must be 8-byte aligned, in "
                                 f"[{BOOT_GPA_END:#x}, {GUEST_GPA_LIMIT:#x}) and outside the APIC page")
        is_write = values is not None
        if is_write:
            values = [v & (2**64 - 1) for v in values]
            if len(values) != len(gpas):
                raise UsageError(f"{len(gpas)} gpas but {len(values)} values")
            self._charge_ring(len(gpas))
        self._ensure_mapped(gpas)
        accesses: list[Access] = []
        detail = ""
        for start in range(0, len(gpas), guest.BOOT_LIST_MAX):
            chunk = gpas[start:start + guest.BOOT_LIST_MAX]
            vals = values[start:start + len(chunk)] if is_write else None
            done, detail = self._run_chunk(chunk, vals, accesses)
            if not done:
                break
        return GuestAccessOutcome(tuple(accesses), len(gpas), detail)

    def _charge_ring(self, writes: int) -> None:
        if self._ring is None:
            return
        budget = self.ring_entries // 4
        if self._ring_budget_used + writes > budget:
            raise UsageError(f"{writes} guest writes would exceed the dirty-ring budget "
                             f"({self._ring_budget_used} of {budget} used); harvest and reset first")
        self._ring_budget_used += writes

    def _run_chunk(self, gpas: list[int], vals: list[int] | None, out: list[Access]
                   ) -> tuple[bool, str]:
        n = len(gpas)
        self._poke(guest.BOOT_ADDRS, array.array("Q", gpas).tobytes())
        if vals is not None:
            self._poke(guest.BOOT_VALS, array.array("Q", vals).tobytes())
        entry = self.entries["write" if vals is not None else "read"]
        res = self.vcpu.run_program(entry, guest.BOOT_ADDRS + 8 * n,
                                    self._on_ring_full if self._ring is not None else None)
        mmio = {}
        for ev in res.events:
            if not 0 <= ev.index < n or ev.gpa != gpas[ev.index]:
                raise KvmIoctlError("KVM_RUN", errno.EIO,
                                    f"MMIO exit at {ev.gpa:#x} matches no guest access (index {ev.index})")
            mmio[ev.index] = ev
        stop = n if res.terminal is None else max(0, min(res.terminal.index, n))
        read_back = (ctypes.c_uint64 * n).from_address(self.boot + guest.BOOT_VALS)
        for i in range(stop):
            if i in mmio:
                out.append(Access(Exit.MMIO, Gpa(gpas[i]), vals is not None,
                                  vals[i] if vals is not None else None))
            else:
                out.append(Access(Exit.OK, Gpa(gpas[i]), vals is not None,
                                  vals[i] if vals is not None else int(read_back[i])))
        if res.terminal is not None:
            if stop < n:
                out.append(Access(res.terminal.exit, Gpa(gpas[stop]), vals is not None, None))
            return False, res.terminal.detail
        return True, ""

    # --- kvmclock -------------------------------------------------------------------------------
    def kvmclock_enable(self, gpa: int) -> int:
        """Write ``MSR_KVM_SYSTEM_TIME_NEW = gpa | 1``; EINVAL when KVM accepted no MSR."""
        accepted = self.vcpu.set_msr(abi.MSR_KVM_SYSTEM_TIME_NEW, gpa | 1)
        if accepted != 1:
            return errno.EINVAL
        self.kvmclock_gpa = gpa
        return 0

    def kvmclock_update(self) -> Exit:
        """KVM_GET_CLOCK + KVM_SET_CLOCK (KVM_REQ_CLOCK_UPDATE on every vCPU), then one guest entry."""
        self._charge_ring(2)                # the pvclock write marks its page dirty
        data = abi.kvm_clock_data()
        ioctls.ioctl(self.fd, ioctls.KVM_GET_CLOCK, data)
        ioctls.ioctl(self.fd, ioctls.KVM_SET_CLOCK, abi.kvm_clock_data(clock=data.clock))
        res = self.vcpu.run_program(self.entries["hlt"], 0,
                                    self._on_ring_full if self._ring is not None else None)
        return Exit.OK if res.terminal is None else res.terminal.exit

    # --- stats ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | tuple[int, ...]]:
        """VM stats and vCPU stats (the latter prefixed ``vcpu.``)."""
        if not self._stats:
            for key, fd in (("vm", self.fd), ("vcpu", self.vcpu.fd)):
                self._stats[key] = StatsFd(fd, key)
                self._closer.fd(self._stats[key].fd)
        out = dict(self._stats["vm"].read())
        out.update({f"vcpu.{k}": v for k, v in self._stats["vcpu"].read().items()})
        return out


def _bits(buf, npages: int) -> frozenset[int]:
    out = []
    for w, word in enumerate(buf):
        while word:
            low = word & -word
            bit = w * 64 + low.bit_length() - 1
            if bit < npages:
                out.append(bit)
            word ^= low
    return frozenset(out)

