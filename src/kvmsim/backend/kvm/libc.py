"""The few libc and raw syscalls the backend needs, through ctypes (mm/mmap.c, mm/madvise.c,
mm/mprotect.c, mm/mremap.c, fs/open.c ``fallocate``, kernel/events ``perf_event_open``,
io_uring/io_uring.c ``io_uring_setup``), each returning ``(result, errno)`` instead of raising.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import c_int, c_long, c_size_t, c_void_p

_libc = ctypes.CDLL(None, use_errno=True)

_libc.mmap.restype = c_void_p
_libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, c_long]
_libc.munmap.restype = c_int
_libc.munmap.argtypes = [c_void_p, c_size_t]
_libc.mprotect.restype = c_int
_libc.mprotect.argtypes = [c_void_p, c_size_t, c_int]
_libc.madvise.restype = c_int
_libc.madvise.argtypes = [c_void_p, c_size_t, c_int]
_libc.mremap.restype = c_void_p
_libc.mremap.argtypes = [c_void_p, c_size_t, c_size_t, c_int, c_void_p]
_libc.fallocate.restype = c_int
_libc.fallocate.argtypes = [c_int, c_int, c_long, c_long]
_libc.syscall.restype = c_long

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DOFORK, MADV_DONTFORK = 11, 10
MFD_CLOEXEC = 0x1
MFD_HUGETLB = 0x4
MFD_HUGE_2MB = 21 << 26
MAP_FAILED = ctypes.c_void_p(-1).value

SYS_perf_event_open = 298
SYS_io_uring_setup = 425


def mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0
         ) -> tuple[int, int]:
    """``(address, 0)`` or ``(-1, errno)``."""
    ctypes.set_errno(0)
    p = _libc.mmap(addr, length, prot, flags, fd, offset)
    if p is None or p == MAP_FAILED:
        return -1, ctypes.get_errno()
    return p, 0


def munmap(addr: int, length: int) -> int:
    return 0 if _libc.munmap(addr, length) == 0 else ctypes.get_errno()


def mprotect(addr: int, length: int, prot: int) -> int:
    return 0 if _libc.mprotect(addr, length, prot) == 0 else ctypes.get_errno()


def madvise(addr: int, length: int, advice: int) -> int:
    return 0 if _libc.madvise(addr, length, advice) == 0 else ctypes.get_errno()


def mremap(old: int, old_size: int, new_size: int, flags: int, new: int = 0) -> tuple[int, int]:
    p = _libc.mremap(old, old_size, new_size, flags, new)
    if p is None or p == MAP_FAILED:
        return -1, ctypes.get_errno()
    return p, 0


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def syscall(nr: int, *args) -> tuple[int, int]:
    r = _libc.syscall(c_long(nr), *args)
    return (r, 0) if r >= 0 else (-1, ctypes.get_errno())


def memfd_create(name: str, flags: int) -> tuple[int, int]:
    try:
        return os.memfd_create(name, flags), 0
    except OSError as e:
        return -1, e.errno or 0


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Closer:
    """Releases fds, mappings and child processes in LIFO order, exactly once.

    An owner registers ``weakref.finalize(owner, closer.close)`` so that resources go away on ``close()``,
    on garbage collection and at interpreter exit (including after Ctrl-C); the closer never refers back
    to its owner.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, tuple]] = []

    def fd(self, fd: int) -> int:
        self._items.append(("fd", (fd,)))
        return fd

    def mapping(self, addr: int, length: int) -> int:
        self._items.append(("map", (addr, length)))
        return addr

    def forget_fd(self, fd: int) -> None:
        self._forget(("fd", (fd,)))

    def forget_mapping(self, addr: int, length: int) -> None:
        self._forget(("map", (addr, length)))

    def _forget(self, item) -> None:
        try:
            self._items.remove(item)
        except ValueError:
            pass

    def close(self) -> None:
        while self._items:
            kind, args = self._items.pop()
            try:
                if kind == "fd":
                    close_quietly(*args)
                elif kind == "map":
                    munmap(*args)
            except Exception:   # noqa: BLE001 - release the rest whatever happens
                pass

