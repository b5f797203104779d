"""Host memory behind memslots and the host mm operations a VMM performs on it (mm/mmap.c, mm/madvise.c,
mm/mprotect.c, mm/mremap.c, kernel/fork.c, mm/memfd.c, mm/hugetlb.c, kernel/events/core.c
``perf_mmap``, io_uring/memmap.c, arch/x86/entry/vdso ``[vvar]``).

Every mapping kvmsim creates is tracked by id and released by a ``Closer`` finalizer; ``[vvar]`` is only
borrowed and can never be unmapped, protected or advised.  Host accesses that may raise SIGBUS/SIGSEGV
(guest_memfd, io_uring rings, [vvar], protected ranges) run in a forked child so the caller survives; the
parent's private anonymous mappings are marked MADV_DONTFORK around that fork so the probe does not
write-protect them (which would fire mmu_notifier invalidations into KVM).
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import os
import resource
import signal
import struct
import weakref
from dataclasses import dataclass, field

from kvmsim.backend.base import (
    Falloc, HostAccess, HostMapping, Madv, MapOutcome, MappingKind, Outcome, Prot,
)
from kvmsim.backend.kvm import libc
from kvmsim.errors import UsageError
from kvmsim.types import PAGE_SIZE, PMD_SIZE, Hva

RW = libc.PROT_READ | libc.PROT_WRITE
PERF_TYPE_SOFTWARE, PERF_COUNT_SW_DUMMY = 1, 9
PERF_FLAG_FD_CLOEXEC = 1 << 3
IORING_FEAT_SINGLE_MMAP = 1 << 0
_PRIVATE_KINDS = (MappingKind.ANON_PRIVATE, MappingKind.THP_ANON)
_FAULTY_KINDS = (MappingKind.GUEST_MEMFD, MappingKind.IO_URING_RING, MappingKind.VVAR)


@dataclass
class _Map:
    id: int
    kind: MappingKind
    hva: int
    size: int
    map_len: int                      # what is really mapped (perf rings round up to 1 + 2^n pages)
    fd: int = -1                      # the file behind it (memfd, hugetlb memfd), for fallocate
    fds: list[int] = field(default_factory=list)   # fds owned by the mapping
    mapped: bool = True
    prot: dict[int, int] = field(default_factory=dict)   # page index -> PROT_* where not RW
    owned: bool = True

    def handle(self) -> HostMapping:
        return HostMapping(self.id, self.kind, Hva(self.hva), self.size)


class KvmForkedChild:
    """A child of ``fork()`` that holds the parent's pages copy-on-write until ``release()``.

    The child blocks on a pipe and exits when the write end closes: on ``release()``, or when the parent
    dies (Ctrl-C included), so it can never outlive its parent.
    """

    def __init__(self) -> None:
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # child: wait, then leave without cleanup
            try:
                _close_all_but(r, ready_w)
                os.write(ready_w, b"!")
                os.close(ready_w)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        os.close(ready_w)
        try:
            os.read(ready_r, 1)                        # the child has dropped its VM fds
        finally:
            os.close(ready_r)
        self.pid = pid
        self._w = w
        self._finalizer = weakref.finalize(self, _reap, pid, w)

    def release(self) -> None:
        self._finalizer()


def _close_all_but(*keep: int) -> None:
    """In a fork child: drop every inherited fd (VM, vCPU, guest_memfd, ...) except ``keep``, so the
    child never keeps a VM alive (a VM outliving its fd number makes KVM warn "debugfs: duplicate
    directory" when the next VM gets the same number)."""
    low = 0
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _reap(pid: int, w: int) -> None:
    libc.close_quietly(w)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _in_child(fn) -> HostAccess:
    """Run ``fn() -> bytes`` in a forked child; a fatal signal there becomes ``HostAccess(None, sig)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _close_all_but(w)
            faulthandler.disable()                    # die quietly: no Python traceback, no core
            for sig in (signal.SIGBUS, signal.SIGSEGV):
                signal.signal(sig, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            data = fn()
            os.write(w, struct.pack("<I", len(data)) + data)
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(w)
    chunks = []
    try:
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return HostAccess(None, int(os.WTERMSIG(status)))
    blob = b"".join(chunks)
    if os.WEXITSTATUS(status) != 0 or len(blob) < 4:
        return HostAccess(None, int(signal.SIGSEGV))
    return HostAccess(blob[4:4 + struct.unpack_from("<I", blob)[0]])


class HostMemory:
    """The backend's host mappings."""

    def __init__(self) -> None:
        self._closer = libc.Closer()
        self._finalizer = weakref.finalize(self, self._closer.close)
        self._maps: dict[int, _Map] = {}
        self._next_id = 1
        self.children: list[KvmForkedChild] = []

    def close(self) -> None:
        for c in self.children:
            c.release()
        self.children.clear()
        self._finalizer()
        self._maps.clear()

    # --- lookup ---------------------------------------------------------------------------------
    def get(self, m: HostMapping) -> _Map:
        rec = self._maps.get(m.id)
        if rec is None:
            raise UsageError(f"host mapping {m.id} ({m.kind.value}) is not one of this backend's mappings")
        return rec

    def find(self, hva: int) -> _Map | None:
        for rec in self._maps.values():
            if rec.mapped and rec.hva <= hva < rec.hva + rec.size:
                return rec
        return None

    def fd_of(self, m: HostMapping) -> int:
        return self.get(m).fd

    # --- creation -------------------------------------------------------------------------------
    def mmap(self, kind: MappingKind, size: int, hva: int | None = None, gmem_fd: int = -1) -> MapOutcome:
        if kind is MappingKind.VVAR:
            return self._vvar()
        if size <= 0 or size % PAGE_SIZE:
            raise UsageError(f"mapping size must be a positive multiple of {PAGE_SIZE}, got {size}")
        fixed = libc.MAP_FIXED_NOREPLACE if hva is not None else 0
        maker = {
            MappingKind.ANON_PRIVATE: self._anon, MappingKind.ANON_SHARED: self._anon,
            MappingKind.MEMFD: self._memfd, MappingKind.HUGETLB_2M: self._memfd,
            MappingKind.THP_ANON: self._thp, MappingKind.PERF_RING: self._perf,
            MappingKind.IO_URING_RING: self._io_uring, MappingKind.GUEST_MEMFD: self._gmem,
        }[kind]
        rec_or_err = maker(kind, size, hva, fixed, gmem_fd)
        if isinstance(rec_or_err, int):
            return MapOutcome(rec_or_err)
        return MapOutcome(0, rec_or_err.handle())

    def _add(self, kind, hva, size, map_len, fd=-1, fds=(), owned=True) -> _Map:
        rec = _Map(self._next_id, kind, hva, size, map_len, fd, list(fds), owned=owned)
        self._next_id += 1
        self._maps[rec.id] = rec
        return rec

    def _map_fd_or_anon(self, length, flags, fd, hva, fixed, prot=RW):
        addr, err = libc.mmap(hva, length, prot, flags | fixed, fd, 0)
        if addr < 0:
            return None, err
        if hva is not None and addr != hva:             # a kernel without MAP_FIXED_NOREPLACE
            libc.munmap(addr, length)
            return None, errno.EEXIST
        self._closer.mapping(addr, length)
        return addr, 0

    def _anon(self, kind, size, hva, fixed, _gmem) -> _Map | int:
        share = libc.MAP_PRIVATE if kind is MappingKind.ANON_PRIVATE else libc.MAP_SHARED
        addr, err = self._map_fd_or_anon(size, share | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE, -1, hva,
                                         fixed)
        return err or self._add(kind, addr, size, size)

    def _memfd(self, kind, size, hva, fixed, _gmem) -> _Map | int:
        flags = libc.MFD_CLOEXEC
        if kind is MappingKind.HUGETLB_2M:
            if size % PMD_SIZE:
                raise UsageError(f"a hugetlb-2M mapping must be a multiple of 2 MiB, got {size}")
            flags |= libc.MFD_HUGETLB | libc.MFD_HUGE_2MB
        fd, err = libc.memfd_create(f"kvmsim-{kind.value}", flags)
        if fd < 0:
            return err
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            return e.errno or errno.EINVAL
        self._closer.fd(fd)
        addr, err = self._map_fd_or_anon(size, libc.MAP_SHARED, fd, hva, fixed)
        if err:
            self._closer.forget_fd(fd)
            os.close(fd)
            return err
        return self._add(kind, addr, size, size, fd=fd, fds=[fd])

    def _thp(self, kind, size, hva, fixed, _gmem) -> _Map | int:
        if hva is not None and hva % PMD_SIZE:
            raise UsageError(f"a THP mapping must be 2 MiB aligned, got {hva:#x}")
        flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
        if hva is not None:
            addr, err = self._map_fd_or_anon(size, flags, -1, hva, fixed)
            if err:
                return err
        else:
            raw, err = libc.mmap(None, size + PMD_SIZE, RW, flags)
            if raw < 0:
                return err
            addr = (raw + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
            if addr > raw:
                libc.munmap(raw, addr - raw)
            tail = raw + size + PMD_SIZE - (addr + size)
            if tail:
                libc.munmap(addr + size, tail)
            self._closer.mapping(addr, size)
        err = libc.madvise(addr, size, Madv.MADV_HUGEPAGE)
        if err:
            self._closer.forget_mapping(addr, size)
            libc.munmap(addr, size)
            return err
        return self._add(kind, addr, size, size)

    def _perf(self, kind, size, hva, fixed, _gmem) -> _Map | int:
        pages = size // PAGE_SIZE
        data_pages = 1
        while 1 + data_pages < pages:
            data_pages *= 2
        map_len = (1 + data_pages) * PAGE_SIZE
        attr = bytearray(128)
        struct.pack_into("<IIQ", attr, 0, PERF_TYPE_SOFTWARE, len(attr), PERF_COUNT_SW_DUMMY)
        struct.pack_into("<Q", attr, 40, 1 | (1 << 5) | (1 << 6))   # disabled, exclude_kernel/hv
        buf = ctypes.create_string_buffer(bytes(attr))
        fd, err = libc.syscall(libc.SYS_perf_event_open, buf, ctypes.c_int(0), ctypes.c_int(-1),
                               ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
        if fd < 0:
            return err
        self._closer.fd(fd)
        addr, err = self._map_fd_or_anon(map_len, libc.MAP_SHARED, fd, hva, fixed)
        if err:
            self._closer.forget_fd(fd)
            os.close(fd)
            return err
        return self._add(kind, addr, size, map_len, fds=[fd])

    def _io_uring(self, kind, size, hva, fixed, _gmem) -> _Map | int:
        entries = 1
        while True:
            params = bytearray(120)
            buf = ctypes.create_string_buffer(bytes(params), len(params))
            ring_fd, err = libc.syscall(libc.SYS_io_uring_setup, ctypes.c_uint(entries), buf)
            if ring_fd < 0:
                return err
            p = buf.raw
            sq_entries, cq_entries = struct.unpack_from("<II", p, 0)
            features = struct.unpack_from("<I", p, 20)[0]
            sq_array = struct.unpack_from("<I", p, 40 + 24)[0]
            cqes = struct.unpack_from("<I", p, 80 + 20)[0]
            ring = max(sq_array + sq_entries * 4, cqes + cq_entries * 16)
            if not features & IORING_FEAT_SINGLE_MMAP:
                os.close(ring_fd)
                return errno.ENOSYS
            if ring >= size or entries >= 32768:
                break
            os.close(ring_fd)
            entries *= 2
        if ring < size:
            os.close(ring_fd)
            raise UsageError(f"an io_uring ring cannot be {size} bytes large")
        self._closer.fd(ring_fd)
        addr, err = self._map_fd_or_anon(size, libc.MAP_SHARED | libc.MAP_POPULATE, ring_fd, hva, fixed)
        if err:
            self._closer.forget_fd(ring_fd)
            os.close(ring_fd)
            return err
        return self._add(kind, addr, size, size, fds=[ring_fd])

    def _gmem(self, kind, size, hva, fixed, gmem_fd) -> _Map | int:
        if gmem_fd < 0:
            raise UsageError("a guest_memfd mapping needs gmem= (from create_guest_memfd)")
        addr, err = self._map_fd_or_anon(size, libc.MAP_SHARED, gmem_fd, hva, fixed)
        return err or self._add(kind, addr, size, size, fd=gmem_fd)

    def _vvar(self) -> MapOutcome:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("[vvar]"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    rec = self._add(MappingKind.VVAR, lo, hi - lo, hi - lo, owned=False)
                    return MapOutcome(0, rec.handle())
        return MapOutcome(errno.ENOENT)

    # --- operations -----------------------------------------------------------------------------
    def _owned(self, m: HostMapping, what: str) -> _Map:
        rec = self.get(m)
        if not rec.owned:
            raise UsageError(f"refusing to {what} {rec.kind.value}: kvmsim only borrows it")
        return rec

    def _range(self, rec: _Map, offset: int, length: int | None) -> tuple[int, int]:
        length = rec.size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > rec.size:
            raise UsageError(f"range +{offset:#x}/{length:#x} is outside mapping {rec.id} "
                             f"({rec.size:#x} bytes)")
        return rec.hva + offset, length

    def munmap(self, m: HostMapping) -> Outcome:
        rec = self._owned(m, "munmap")
        if not rec.mapped:
            return Outcome(0)
        err = libc.munmap(rec.hva, rec.map_len)
        if err == 0:
            self._closer.forget_mapping(rec.hva, rec.map_len)
            rec.mapped = False
            for fd in rec.fds:
                self._closer.forget_fd(fd)
                libc.close_quietly(fd)
            rec.fds.clear()
            del self._maps[rec.id]
        return Outcome(err)

    def mprotect(self, m: HostMapping, prot: Prot, offset: int, length: int | None) -> Outcome:
        rec = self._owned(m, "mprotect")
        addr, n = self._range(rec, offset, length)
        err = libc.mprotect(addr, n, int(prot))
        if err == 0:
            first = (addr - rec.hva) // PAGE_SIZE
            for page in range(first, first + (n + PAGE_SIZE - 1) // PAGE_SIZE):
                if int(prot) == RW:
                    rec.prot.pop(page, None)
                else:
                    rec.prot[page] = int(prot)
        return Outcome(err)

    def madvise(self, m: HostMapping, advice: Madv, offset: int, length: int | None) -> Outcome:
        rec = self._owned(m, "madvise")
        addr, n = self._range(rec, offset, length)
        return Outcome(libc.madvise(addr, n, int(advice)))

    def mremap(self, m: HostMapping) -> MapOutcome:
        """Move the whole mapping to a fresh address (MREMAP_MAYMOVE|MREMAP_FIXED)."""
        rec = self._owned(m, "mremap")
        dest, err = libc.mmap(None, rec.map_len, libc.PROT_NONE,
                              libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
        if dest < 0:
            return MapOutcome(err)
        new, err = libc.mremap(rec.hva, rec.map_len, rec.map_len,
                               libc.MREMAP_MAYMOVE | libc.MREMAP_FIXED, dest)
        if new < 0:
            libc.munmap(dest, rec.map_len)
            return MapOutcome(err)
        self._closer.forget_mapping(rec.hva, rec.map_len)
        self._closer.mapping(new, rec.map_len)
        rec.hva = new
        return MapOutcome(0, rec.handle())

    def fallocate(self, fd: int, mode: Falloc, offset: int, length: int) -> Outcome:
        if fd < 0:
            return Outcome(errno.EBADF)
        return Outcome(libc.fallocate(fd, int(mode), offset, length))

    def fork(self) -> KvmForkedChild:
        child = KvmForkedChild()
        self.children.append(child)
        return child

    # --- host accesses --------------------------------------------------------------------------
    def read(self, m: HostMapping, offset: int, length: int) -> HostAccess:
        rec = self.get(m)
        addr, n = self._range(rec, offset, length)
        return self._access(rec, addr, n, lambda: ctypes.string_at(addr, n), write=False)

    def write(self, m: HostMapping, offset: int, data: bytes) -> HostAccess:
        rec = self.get(m)
        addr, n = self._range(rec, offset, len(data))

        def store() -> bytes:
            ctypes.memmove(addr, data, n)
            return b""
        return self._access(rec, addr, n, store, write=True)

    def read_hva(self, hva: int, length: int) -> HostAccess | None:
        """Read through whichever tracked mapping holds ``hva`` (None if none does)."""
        rec = self.find(hva)
        if rec is None or hva + length > rec.hva + rec.size:
            return None
        return self.read(rec.handle(), hva - rec.hva, length)

    def _access(self, rec: _Map, addr: int, n: int, fn, *, write: bool) -> HostAccess:
        """Protection faults are decided from the tracked PROT_* (x86: write implies read) without
        touching memory; accesses that may still fault (SIGBUS) run in a child."""
        if not rec.mapped:
            return HostAccess(None, int(signal.SIGSEGV))
        need = libc.PROT_WRITE if write else libc.PROT_READ
        first, last = (addr - rec.hva) // PAGE_SIZE, (addr + max(n, 1) - 1 - rec.hva) // PAGE_SIZE
        for page in range(first, last + 1):
            prot = rec.prot.get(page, RW)
            if not prot & need and not (need == libc.PROT_READ and prot & libc.PROT_WRITE):
                return HostAccess(None, int(signal.SIGSEGV))
        if write and rec.kind is MappingKind.VVAR:
            return HostAccess(None, int(signal.SIGSEGV))
        if write and rec.kind is MappingKind.PERF_RING and last >= 1:
            # perf_mmap_pfn_mkwrite(): only the user page (pgoff 0) may become writable; the data pages
            # SIGBUS.  The ring is VM_DONTCOPY, so this cannot be tried in a child: report it.
            return HostAccess(None, int(signal.SIGBUS))
        if rec.kind in _FAULTY_KINDS:
            return self._child_access(fn)
        return HostAccess(fn())

    def _child_access(self, fn) -> HostAccess:
        private = [r for r in self._maps.values() if r.mapped and r.kind in _PRIVATE_KINDS]
        for r in private:
            libc.madvise(r.hva, r.map_len, libc.MADV_DONTFORK)
        try:
            return _in_child(fn)
        finally:
            for r in private:
                libc.madvise(r.hva, r.map_len, libc.MADV_DOFORK)

    def pfn(self, hva: int) -> int | None:
        """The pfn /proc/self/pagemap reports for ``hva`` (None if not present or not readable)."""
        try:
            with open("/proc/self/pagemap", "rb") as f:
                f.seek((hva // PAGE_SIZE) * 8)
                entry = struct.unpack("<Q", f.read(8))[0]
        except OSError:
            return None
        if not entry >> 63 & 1:
            return None
        pfn = entry & ((1 << 55) - 1)
        return pfn or None
