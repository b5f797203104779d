"""The conformance suite: one set of cases run against every backend, compared on observable outcomes.

A case is a function ``case(b: Backend) -> observable`` (plain data: tuples, ints, strings, frozensets)
that creates its own VM and mappings and releases them.  ``run_suite(backends)`` runs every case on
each backend and reports, per case, each backend's observable and whether they agree.  Cases that
need something a host lacks (hugetlb pages, io_uring, ...) raise :class:`Skip` with the reason.

The model runs with ``execution="emulated"``, the way KVM runs guests on the development machines
(kvm-on-these-machines.md §0); the cases only assert what both can observe there.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvmsim.backend.base import (BOOT_GPA_END, Exit, Falloc, GuestMemfdFlags, Madv, ManualProtect, MappingKind,
                                 MemoryRegion, MemoryRegionApi, Prot, VmOptions, delete_memory_region,
                                 move_memory_region, page_gpas, update_memory_region_flags)
from kvmsim.errors import KvmsimError, errno_name
from kvmsim.types import Gpa
from kvmsim.uapi import KVM_MEM, KVM_USER_MEM_SLOTS

F_LOG, F_RO, F_GMEM = KVM_MEM.LOG_DIRTY_PAGES, KVM_MEM.READONLY, KVM_MEM.GUEST_MEMFD
GPA = 1 << 30
MB = 1 << 20


class Errno(int):
    """An errno observable: equal to the number, printed as its name (``EFAULT``; 0 as ``ok``)."""

    def __repr__(self) -> str:
        return "ok" if self == 0 else errno_name(int(self))

    __str__ = __repr__


def format_value(v, top: bool = True) -> str:
    """An observable as a reader wants it: errno names, exit names, ``yes``/``no``, ``-`` for None,
    bytes as hex; a case's tuple as ``a, b, c`` with nested tuples in parentheses, space-separated."""
    if isinstance(v, Errno):
        return repr(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "-"
    if isinstance(v, (bytes, bytearray)):
        return "0x" + bytes(v).hex() if len(v) <= 16 else f"0x{bytes(v[:16]).hex()}... ({len(v)} bytes)"
    if isinstance(v, (tuple, list, frozenset, set)):
        items = sorted(v) if isinstance(v, (frozenset, set)) else v
        parts = [format_value(x, False) for x in items]
        return ", ".join(parts) if top else "(" + " ".join(parts) + ")"
    return str(v)


def json_value(v):
    """An observable as JSON: errnos by name, tuples as lists, bytes as hex."""
    if isinstance(v, Errno):
        return repr(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, (tuple, list, frozenset, set)):
        return [json_value(x) for x in (sorted(v) if isinstance(v, (frozenset, set)) else v)]
    return v


class Skip(Exception):
    """The backend cannot run this case here (the message says why)."""


@dataclass
class Case:
    name: str
    fn: Callable
    group: str
    doc: str = ""


CASES: list[Case] = []


def case(name: str, group: str):
    def deco(fn):
        CASES.append(Case(name, fn, group, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""))
        return fn
    return deco


class _Vm:
    """A fresh VM plus the mappings a case made, released on exit."""

    def __init__(self, b, options: VmOptions = VmOptions()):
        self.b = b
        self.options = options
        self.maps = []

    def __enter__(self):
        self.b.create_vm(self.options)
        return self

    def map(self, kind: MappingKind, size: int, **kw):
        out = self.b.host_mmap(kind, size, **kw)
        if out.errno:
            if kind in (MappingKind.HUGETLB_2M, MappingKind.IO_URING_RING, MappingKind.PERF_RING):
                raise Skip(f"{kind.value} mapping not available here ({errno.errorcode.get(out.errno)})")
            raise Skip(f"mmap {kind.value}: {errno_name(out.errno)}")
        self.maps.append(out.mapping)
        return out.mapping

    def slot(self, slot: int, gpa: int, m, flags: int = 0, size: int | None = None, offset: int = 0,
             api: MemoryRegionApi = MemoryRegionApi.V2) -> int:
        return Errno(self.b.set_memory_region(MemoryRegion(slot, Gpa(gpa), size if size is not None else m.size - offset,
                                                           m.at(offset), flags), api).errno)

    def __exit__(self, *exc):
        for m in self.maps:
            try:
                self.b.host_munmap(m)
            except KvmsimError:
                pass
        return False


def _exits(out) -> tuple:
    return tuple(a.exit.value for a in out.accesses)


# ---- memslot validation ---------------------------------------------------------------------------

def _errno_case(name: str, setup: Callable, doc: str):
    def fn(b):
        with _Vm(b) as vm:
            m = vm.map(MappingKind.ANON_SHARED, 4 * MB)
            out = setup(vm, m)                   # every number a memslot case returns is an errno
            return tuple(map(Errno, out)) if isinstance(out, tuple) else Errno(out)
    fn.__doc__ = doc
    case(f"memslot-{name}", "memslot")(fn)


_errno_case("create-ok", lambda vm, m: vm.slot(1, GPA, m), "a plain slot is accepted")
_errno_case("overlap-eexist", lambda vm, m: (vm.slot(1, GPA, m, size=MB), vm.slot(2, GPA + 4096, m, size=MB, offset=MB)),
            "overlapping gfn ranges give EEXIST")
_errno_case("overlap-boot-eexist", lambda vm, m: vm.slot(1, 0, m, size=MB), "overlapping the boot slot gives EEXIST")
_errno_case("unaligned-gpa", lambda vm, m: vm.slot(1, GPA + 0x800, m, size=MB), "unaligned gpa gives EINVAL")
_errno_case("unaligned-size", lambda vm, m: vm.slot(1, GPA, m, size=MB + 100), "unaligned size gives EINVAL")
_errno_case("unaligned-uaddr", lambda vm, m: vm.b.set_memory_region(
    MemoryRegion(1, Gpa(GPA), MB, m.at(0x10))).errno, "unaligned userspace_addr gives EINVAL")
_errno_case("unknown-flag", lambda vm, m: vm.slot(1, GPA, m, flags=1 << 8), "an unknown flag gives EINVAL")
_errno_case("v1-gmem-flag", lambda vm, m: vm.slot(1, GPA, m, flags=F_GMEM, api=MemoryRegionApi.V1),
            "KVM_MEM_GUEST_MEMFD through the v1 ioctl gives EINVAL")
_errno_case("v1-ok", lambda vm, m: vm.slot(1, GPA, m, api=MemoryRegionApi.V1), "the v1 ioctl installs a slot")
_errno_case("toggle-readonly", lambda vm, m: (vm.slot(1, GPA, m), vm.slot(1, GPA, m, flags=F_RO)),
            "changing READONLY of a live slot gives EINVAL")
_errno_case("resize", lambda vm, m: (vm.slot(1, GPA, m, size=MB), vm.slot(1, GPA, m, size=2 * MB)),
            "changing npages of a live slot gives EINVAL")
_errno_case("change-uaddr", lambda vm, m: (vm.slot(1, GPA, m, size=MB), vm.slot(1, GPA, m, size=MB, offset=MB)),
            "changing userspace_addr of a live slot gives EINVAL")
_errno_case("too-many-slots", lambda vm, m: vm.slot(KVM_USER_MEM_SLOTS, GPA, m),
            f"slot id {KVM_USER_MEM_SLOTS} is past KVM_USER_MEM_SLOTS")
_errno_case("delete-missing", lambda vm, m: vm.b.set_memory_region(MemoryRegion(7, Gpa(0), 0, m.hva)).errno,
            "deleting a slot that does not exist gives EINVAL")
_errno_case("flags-only-log", lambda vm, m: (vm.slot(1, GPA, m), update_memory_region_flags(vm.b, 1, F_LOG).errno),
            "toggling LOG_DIRTY_PAGES is allowed")
_errno_case("move", lambda vm, m: (vm.slot(1, GPA, m, size=MB), move_memory_region(vm.b, 1, 2 * GPA).errno),
            "moving a slot is allowed")
_errno_case("delete-recreate", lambda vm, m: (vm.slot(1, GPA, m, size=MB), delete_memory_region(vm.b, 1).errno,
                                             vm.slot(1, GPA, m, size=MB)),
            "a deleted slot id can be reused")



@case("memslot-move-keeps-dirty-log", "memslot")
def _move_dirty(b):
    """KVM_MR_MOVE of a logged slot keeps its dirty bitmap (kvm_prepare_memory_region reuses old->dirty_bitmap)"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        vm.slot(1, GPA, m, flags=F_LOG)
        b.guest_write([GPA + p * 4096 for p in (3, 17, 100)], 1)
        moved = Errno(move_memory_region(b, 1, 2 * GPA).errno)
        kept = b.get_dirty_log(1)
        b.guest_write([2 * GPA + 5 * 4096], 2)
        after = b.get_dirty_log(1)
        return moved, Errno(kept.errno), tuple(sorted(kept.dirty)), tuple(sorted(after.dirty))


@case("memslot-gpa-width", "memslot")
def _gpa_width(b):
    """a slot may end at 2^52 (x86 kvm_mmu_max_gfn() without TDP); one page further, or at 2^57, is EINVAL"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        out = []
        for gpa in ((1 << 52) - MB + 4096, 1 << 57, (1 << 52) - MB):
            out.append(vm.slot(1, gpa, m))
        return tuple(out)

# ---- guest accesses and read-only slots -------------------------------------------------------------

@case("guest-rw-roundtrip", "access")
def _rw(b):
    """guest writes are read back by the guest and seen by the host"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        vm.slot(1, GPA, m)
        gp = page_gpas(GPA, 8)
        w = b.guest_write(gp, list(range(100, 108)))
        r = b.guest_read(gp)
        return _exits(w), tuple(r.values), b.host_read(m, 3 * 4096).data


@case("readonly-slot-write-mmio", "access")
def _ro(b):
    """a guest write to a READONLY slot is an MMIO exit; reads work"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        b.host_write(m, 0, (7).to_bytes(8, "little"))
        vm.slot(1, GPA, m, flags=F_RO)
        return _exits(b.guest_write([GPA], 1)), tuple(b.guest_read([GPA]).values)


@case("pfnmap-readonly-pte-guest-write", "access")
def _ro_pfnmap_write(b):
    """guest writes to a perf ring's read-only VM_PFNMAP PTEs: perf_mmap_pfn_mkwrite() accepts the user page
    (the store lands) and refuses the data pages (KVM_EXIT_MMIO)"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.PERF_RING, 2 * 4096)
        vm.slot(1, GPA, m, size=2 * 4096)
        gp = page_gpas(GPA, 2)
        w = b.guest_write(gp, 0x77)
        return _exits(w), tuple(b.guest_read(gp).values)


@case("no-slot-mmio", "access")
def _noslot(b):
    """an access outside every slot is an MMIO exit"""
    with _Vm(b):
        return _exits(b.guest_read([8 * GPA])), _exits(b.guest_write([8 * GPA], 1))


for _kind in (MappingKind.ANON_PRIVATE, MappingKind.MEMFD, MappingKind.THP_ANON, MappingKind.HUGETLB_2M):
    def _backing_rw(b, kind=_kind):
        with _Vm(b) as vm:
            m = vm.map(kind, 4 * MB)
            vm.slot(1, GPA, m)
            gp = page_gpas(GPA, 16)
            b.guest_write(gp[::2], 5)
            return tuple(b.guest_read(gp).values)
    _backing_rw.__doc__ = f"{_kind.value}: written pages read back, untouched pages read 0"
    case(f"backing-{_kind.value}", "access")(_backing_rw)


# ---- dirty logging -----------------------------------------------------------------------------------

def _random_pages(seed: int, n: int, k: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(n), k))


for _mode in ("bitmap", "manual", "manual-initially-set"):
    for _kind in (MappingKind.ANON_SHARED, MappingKind.ANON_PRIVATE, MappingKind.MEMFD):
        def _dirty(b, mode=_mode, kind=_kind):
            mp = {"bitmap": ManualProtect(0),
                  "manual": ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                  "manual-initially-set": ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                  | ManualProtect.KVM_DIRTY_LOG_INITIALLY_SET}[mode]
            with _Vm(b, VmOptions(manual_protect=mp)) as vm:
                m = vm.map(kind, MB)
                vm.slot(1, GPA, m, flags=F_LOG)
                n = m.size // 4096
                first = b.get_dirty_log(1)
                if mp:
                    b.clear_dirty_log(1, 0, n)
                pages = _random_pages(len(mode) + n, n, 40)
                b.guest_write([GPA + p * 4096 for p in pages], 3)
                b.guest_read(page_gpas(GPA, 16))
                got = b.get_dirty_log(1)
                again = b.get_dirty_log(1)
                return (len(first.dirty), tuple(sorted(got.dirty)) == tuple(pages), len(again.dirty))
        _dirty.__doc__ = f"{_mode} dirty log on {_kind.value}: exactly the written pages"
        case(f"dirty-{_mode}-{_kind.value}", "dirty")(_dirty)


@case("clear-log-alignment", "dirty")
def _clear_align(b):
    """KVM_CLEAR_DIRTY_LOG: first_page and num_pages must be 64-aligned (unless reaching the end)"""
    with _Vm(b, VmOptions(manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        vm.slot(1, GPA, m, flags=F_LOG)
        return tuple(Errno(b.clear_dirty_log(1, f, n).errno)
                     for f, n in ((1, 64), (0, 63), (64, 64), (192, 64), (0, 256),
                                  (32, 64), (0, 32), (0, 96), (64, 192), (64, 200)))


@case("clear-log-partial", "dirty")
def _clear_partial(b):
    """clearing part of the log leaves exactly the rest, and a rewrite re-reports the page"""
    with _Vm(b, VmOptions(manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        vm.slot(1, GPA, m, flags=F_LOG)
        b.guest_write([GPA + p * 4096 for p in (1, 70, 130, 200)], 1)
        b.clear_dirty_log(1, 64, 128)
        mid = tuple(sorted(b.get_dirty_log(1).dirty))
        b.guest_write([GPA + 70 * 4096], 2)
        return mid, tuple(sorted(b.get_dirty_log(1).dirty))


@case("dirty-log-no-slot", "dirty")
def _nolog(b):
    """GET_DIRTY_LOG on a slot without LOG_DIRTY_PAGES gives ENOENT"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        vm.slot(1, GPA, m)
        return Errno(b.get_dirty_log(1).errno)


@case("dirty-ring-exact", "ring")
def _ring(b):
    """the dirty ring harvests every write once per write (emulated), reset returns the count"""
    with _Vm(b, VmOptions(dirty_ring_entries=4096)) as vm:
        m = vm.map(MappingKind.ANON_SHARED, MB)
        vm.slot(1, GPA, m, flags=F_LOG)
        pages = _random_pages(7, 256, 50)
        b.guest_write([GPA + p * 4096 for p in pages], 1)
        got = b.dirty_ring_harvest()
        n = b.dirty_ring_reset()
        return tuple(sorted({g.offset for g in got})) == tuple(pages), len(got) == n, Errno(b.get_dirty_log(1).errno)


# ---- host operations under a live slot ------------------------------------------------------------------

def _host_op_case(name: str, kind: MappingKind, op: Callable, doc: str):
    def fn(b):
        with _Vm(b) as vm:
            m = vm.map(kind, 16 * 4096)
            vm.slot(1, GPA, m)
            gp = page_gpas(GPA, 4)
            b.guest_write(gp, 0x11)
            res = Errno(op(vm, m))
            r = b.guest_read(gp)
            w = b.guest_write([GPA + 4096], 0x22)
            return res, _exits(r), tuple(r.values), _exits(w)
    fn.__doc__ = doc
    case(f"hostop-{name}", "hostop")(fn)


_host_op_case("dontneed-private", MappingKind.ANON_PRIVATE,
              lambda vm, m: vm.b.host_madvise(m, Madv.MADV_DONTNEED).errno, "MADV_DONTNEED on private anon: zeros")
_host_op_case("dontneed-shared", MappingKind.ANON_SHARED,
              lambda vm, m: vm.b.host_madvise(m, Madv.MADV_DONTNEED).errno, "MADV_DONTNEED on shared anon: old data")
_host_op_case("dontneed-memfd", MappingKind.MEMFD,
              lambda vm, m: vm.b.host_madvise(m, Madv.MADV_DONTNEED).errno, "MADV_DONTNEED on memfd: old data")
_host_op_case("remove-shared", MappingKind.ANON_SHARED,
              lambda vm, m: vm.b.host_madvise(m, Madv.MADV_REMOVE).errno, "MADV_REMOVE on shared anon: zeros")
_host_op_case("remove-private", MappingKind.ANON_PRIVATE,
              lambda vm, m: vm.b.host_madvise(m, Madv.MADV_REMOVE).errno, "MADV_REMOVE on private anon: EINVAL")
_host_op_case("punch-hole-memfd", MappingKind.MEMFD,
              lambda vm, m: vm.b.host_fallocate(m, 0, 2 * 4096).errno, "PUNCH_HOLE on memfd: zeros in the hole")
_host_op_case("mprotect-read", MappingKind.ANON_SHARED,
              lambda vm, m: vm.b.host_mprotect(m, Prot.PROT_READ).errno, "mprotect(PROT_READ): reads ok, write MMIO")
_host_op_case("mprotect-none", MappingKind.ANON_SHARED,
              lambda vm, m: vm.b.host_mprotect(m, Prot.PROT_NONE).errno, "mprotect(PROT_NONE): every access MMIO")


@case("hostop-munmap", "hostop")
def _munmap(b):
    """munmap under a live slot: every access becomes an MMIO exit"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, 16 * 4096)
        vm.slot(1, GPA, m)
        b.guest_write([GPA], 1)
        b.host_munmap(m)
        vm.maps.remove(m)
        return _exits(b.guest_read(page_gpas(GPA, 2))), _exits(b.guest_write([GPA], 2))


@case("hostop-remap-same-address", "hostop")
def _remap(b):
    """munmap + mmap at the same hva: the guest sees the new memory"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_SHARED, 16 * 4096)
        vm.slot(1, GPA, m)
        b.guest_write([GPA], 0x11)
        b.host_munmap(m)
        vm.maps.remove(m)
        n = vm.map(MappingKind.ANON_SHARED, 16 * 4096, hva=m.hva)
        b.host_write(n, 0, (0x33).to_bytes(8, "little"))
        return tuple(b.guest_read([GPA, GPA + 4096]).values)


@case("hostop-fork-cow", "hostop")
def _fork(b):
    """fork keeps private pages COW-shared; a guest write still lands and reads back"""
    with _Vm(b) as vm:
        m = vm.map(MappingKind.ANON_PRIVATE, 16 * 4096)
        vm.slot(1, GPA, m)
        b.guest_write([GPA], 5)
        child = b.host_fork()
        try:
            w = b.guest_write([GPA], 6)
            return _exits(w), tuple(b.guest_read([GPA]).values), b.host_read(m, 0).data
        finally:
            child.release()


# ---- pfncache (kvmclock) -----------------------------------------------------------------------------------

def _pv_case(name: str, kind: MappingKind, between: Callable | None, doc: str, prewrite: bool = False):
    def fn(b):
        with _Vm(b) as vm:
            m = vm.map(kind, 16 * 4096)
            vm.slot(1, GPA, m)
            if prewrite:
                b.guest_write([GPA], 0)
            b.kvmclock_enable(Gpa(GPA))
            first = b.kvmclock_update().written
            extra = Errno(between(vm, m)) if between else None
            second = b.kvmclock_update().written
            return first, extra, second
    fn.__doc__ = doc
    case(f"pfncache-{name}", "pfncache")(fn)


_pv_case("anon", MappingKind.ANON_SHARED, None, "kvmclock through the pfncache is written on anon memory")
_pv_case("perf-ring-fresh", MappingKind.PERF_RING, None,
         "perf ring (VM_PFNMAP): not written while the PTE is read-only (RO_FAULT)")
_pv_case("perf-ring-after-write", MappingKind.PERF_RING, None,
         "perf ring: written once a write fault made the PTE writable", prewrite=True)
_pv_case("after-dontneed", MappingKind.ANON_PRIVATE,
         lambda vm, m: vm.b.host_madvise(m, Madv.MADV_DONTNEED).errno,
         "after MADV_DONTNEED the pfncache follows the new page")
_pv_case("after-mprotect-read", MappingKind.ANON_SHARED,
         lambda vm, m: vm.b.host_mprotect(m, Prot.PROT_READ).errno,
         "after mprotect(PROT_READ) the update is dropped")
_pv_case("io-uring", MappingKind.IO_URING_RING, None, "io_uring ring (VM_MIXEDMAP): written through GUP")


# ---- guest_memfd --------------------------------------------------------------------------------------------

for _flags in (0, 1, 3, 2, 4):
    def _gmem(b, flags=_flags):
        with _Vm(b):
            return Errno(b.create_guest_memfd(2 * MB, GuestMemfdFlags(flags)).errno)
    _gmem.__doc__ = f"KVM_CREATE_GUEST_MEMFD flags {_flags:#x}"
    case(f"gmem-create-flags-{_flags}", "gmem")(_gmem)


@case("gmem-slot-log-dirty", "gmem")
def _gmem_log(b):
    """a GUEST_MEMFD slot cannot log dirty pages or be READONLY"""
    with _Vm(b) as vm:
        g = b.create_guest_memfd(2 * MB).gmem
        m = vm.map(MappingKind.ANON_SHARED, 2 * MB)
        out = []
        for fl in (F_GMEM | F_LOG, F_GMEM | F_RO):
            out.append(Errno(b.set_memory_region(MemoryRegion(1, Gpa(GPA), 2 * MB, m.hva, fl, g)).errno))
        return tuple(out)


@case("gmem-mmap", "gmem")
def _gmem_mmap(b):
    """mmap() of a guest_memfd (v6.18): ENODEV without MMAP; MMAP alone faults SIGBUS; MMAP|INIT_SHARED
    reads back what the host wrote"""
    with _Vm(b) as vm:
        out = []
        for flags in (0, 1, 3):
            g = b.create_guest_memfd(2 * MB, GuestMemfdFlags(flags))
            if g.errno:
                out.append(("create", Errno(g.errno)))
                continue
            mo = b.host_mmap(MappingKind.GUEST_MEMFD, 2 * MB, gmem=g.gmem)
            if mo.errno:
                out.append(Errno(mo.errno))
                continue
            vm.maps.append(mo.mapping)
            w = b.host_write(mo.mapping, 4096, (0x5A).to_bytes(8, "little"))
            r = b.host_read(mo.mapping, 4096)
            out.append((w.signal, r.signal, r.data))
        return tuple(out)


@case("gmem-shared-memslot", "gmem")
def _gmem_shared_slot(b):
    """a default VM's memslot served from an INIT_SHARED guest_memfd (v6.18): the guest's writes are in
    the file, seen through its mmap(), and the host's writes reach the guest"""
    with _Vm(b) as vm:
        g = b.create_guest_memfd(2 * MB, GuestMemfdFlags(3))
        if g.errno:
            return ("create", Errno(g.errno))
        mo = b.host_mmap(MappingKind.GUEST_MEMFD, 2 * MB, gmem=g.gmem)
        if mo.errno:
            return ("mmap", Errno(mo.errno))
        m = mo.mapping
        vm.maps.append(m)
        r = Errno(b.set_memory_region(MemoryRegion(1, Gpa(GPA), 2 * MB, m.hva, F_GMEM, g.gmem)).errno)
        if r:
            return ("memslot", r)
        w = b.guest_write([GPA, GPA + 4096], [0x77, 0x78])
        b.host_write(m, 2 * 4096, (0x99).to_bytes(8, "little"))
        return (_exits(w), b.host_read(m, 0).data, b.host_read(m, 4096).data,
                tuple(b.guest_read([GPA + 2 * 4096]).values))


# ---- running ------------------------------------------------------------------------------------------------

@dataclass
class Row:
    case: str
    group: str
    results: dict = field(default_factory=dict)      # backend name → observable or "skip: ..."/"error: ..."

    @property
    def agree(self) -> bool | None:
        vals = [v for v in self.results.values() if not (isinstance(v, str) and v.startswith("skip:"))]
        if len(vals) < 2:
            return None
        return all(v == vals[0] for v in vals[1:])


def run_case(c: Case, b):
    try:
        return c.fn(b)
    except Skip as s:
        return f"skip: {s}"
    except KvmsimError as e:
        return f"error: {e}"


def run_suite(backends: Iterable, cases: Iterable[Case] | None = None, progress: Callable | None = None) -> list[Row]:
    rows = []
    for c in cases or CASES:
        row = Row(c.name, c.group)
        for b in backends:
            row.results[b.name] = run_case(c, b)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def real_backend():
    """The real ``/dev/kvm`` backend, or ``(None, reason)`` when it cannot run here."""
    from kvmsim.backend.availability import kvm_available
    ok, why = kvm_available()
    if not ok:
        return None, why
    try:
        from kvmsim.backend.kvm import KvmBackend
    except ImportError as e:                       # pragma: no cover - a broken install
        return None, f"the real backend cannot be imported: {e}"
    try:
        return KvmBackend(), ""
    except KvmsimError as e:
        return None, str(e)


#: The first release of each protocol, newest first: ``current`` (upstream v6.18's MMU) from v6.14 on --
#: the release after the series; the v6.14 .. v6.18 differences it models each landed by v6.18, so
#: v6.14 .. v6.17 hosts are modelled with their newest neighbour -- ``series`` (v6.13) and ``legacy`` before.
PROTOCOL_FIRST_RELEASE = (("current", (6, 14)), ("series", (6, 13)), ("legacy", (0, 0)))


def host_protocol(release: str | None = None) -> str:
    """The protocol the model runs to conform with a host kernel ``release`` (default: this host's
    ``uname -r``): >= 6.14 ``current``, 6.13 ``series``, <= 6.12 ``legacy``."""
    import os
    from kvmsim.backend.kvm.caps import parse_release
    version = parse_release(release or os.uname().release)
    return next(name for name, first in PROTOCOL_FIRST_RELEASE if version >= first)


def model_backend(policy: str | None = None):
    """The model as a conformance backend, under ``policy`` (default: :func:`host_protocol`)."""
    from kvmsim.backend.model import ModelBackend
    return ModelBackend(policy or host_protocol(), "emulated")
