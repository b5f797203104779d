"""The seam between kvmsim and something that behaves like KVM: the ``Backend`` protocol.

A backend is one host process's view of one VM: the ioctls of include/uapi/linux/kvm.h that touch guest
memory (memslots, dirty log, dirty ring, guest_memfd, the kvmclock MSR), the host mm operations a VMM
performs on the memory behind a memslot (mm/mmap.c, mm/madvise.c, mm/mprotect.c, mm/mremap.c,
kernel/fork.c, fallocate), and guest loads and stores.  ``KvmBackend`` (``kvmsim.backend.kvm``) drives
the real ``/dev/kvm``; a ``ModelBackend`` over the simulator implements the same protocol, so one test
suite can run both in lock-step and compare outcomes.

How the observable outcome of each operation is defined
-------------------------------------------------------

Every operation returns a plain value; two backends agree when those values are equal.

* ``create_vm(options)``: no value.  Replaces the current VM (all memslots gone; host mappings stay).
  ``GuestMemfd`` handles of the old VM become stale.  Invalid options raise ``UsageError``.
* ``set_memory_region(region, api)``: ``Outcome(errno)``, ``errno == 0`` when the ioctl succeeded, else
  the errno ``KVM_SET_USER_MEMORY_REGION``/``KVM_SET_USER_MEMORY_REGION2`` returned (EEXIST for an
  overlap, EINVAL for bad alignment/flags, ...).  ``memory_size == 0`` deletes the slot; a new
  ``guest_phys_addr`` for an existing slot moves it; new flags only updates the flags (the helpers
  :func:`delete_memory_region`, :func:`move_memory_region`, :func:`update_memory_region_flags`).
  ``memslots()`` lists the regions the backend believes installed (successful calls only).
* ``create_guest_memfd(size, flags)``: ``GuestMemfdOutcome(errno, gmem)``.
* ``host_mmap(kind, size, ...)``: ``MapOutcome(errno, mapping)``; ``errno`` is mmap's (ENOMEM for an
  empty hugetlb pool, ENODEV for a guest_memfd without MMAP, ...) or ENOSYS for a kind the host cannot
  create at all (no io_uring, ...).  A PERF_RING maps the smallest ``1 + 2^n`` pages covering ``size``
  and an IO_URING_RING the smallest ring covering it; the handle always covers exactly ``size`` bytes.
  VVAR borrows the process's ``[vvar]`` (``size`` is ignored) and can never be unmapped or changed.
* ``host_munmap``/``host_mprotect``/``host_madvise``/``host_mremap``/``host_fallocate``: ``Outcome(errno)``
  of the syscall (MADV_REMOVE on private anon: EINVAL; fallocate on a mapping without a file: EBADF).
  ``host_mremap`` moves the mapping to a fresh address; the handle then describes the new range.  After
  a successful ``host_munmap`` the handle is dead: passing it again raises ``UsageError``.
* ``host_fork()``: a ``ForkedChild`` that keeps every copy-on-write page of the parent shared until
  ``release()``.
* ``host_read``/``host_write``: ``HostAccess(data, signal)``: the bytes read (or ``b""`` for a write) and
  ``signal == 0``, or ``data is None`` and the signal the access raised (SIGBUS, SIGSEGV).  A host access
  never kills the caller: backends perform accesses that may fault in a child process.
* ``guest_read(gpas)``/``guest_write(gpas, values)``: ``GuestAccessOutcome``, one ``Access`` per address,
  in order.  Each access is an 8-byte load or store at an 8-byte aligned gpa, made by the guest's
  instruction stream (on the development hosts: KVM's instruction emulator).  ``Access.exit`` is
  ``Exit.OK`` (value read or written), ``Exit.MMIO`` (KVM reported ``KVM_EXIT_MMIO`` for that gpa with
  ``write``; a read then returns ``value is None`` and the guest goes on with the next address) or a
  terminal exit (``EFAULT`` from KVM_RUN, ``MEMORY_FAULT``, ``SHUTDOWN``, ``INTERNAL_ERROR``,
  ``EXCEPTION``) after which the remaining accesses are not made (``outcome.complete`` is false).
  Addresses below ``BOOT_GPA_END`` and in the APIC page ``APIC_GPA`` are outside the contract (refused
  with ``UsageError``).
* ``get_dirty_log(slot)``: ``DirtyLogOutcome(errno, dirty)`` with the set of page offsets (relative to
  the slot's base gfn) whose bit was set.  ``clear_dirty_log(slot, first_page, num_pages, pages)``:
  ``Outcome(errno)``; ``pages`` (offsets inside the range) defaults to all of them.
* ``dirty_ring_harvest()``: every ``DirtyGfn(slot, offset)`` pushed since the last harvest, in ring order,
  duplicates included (KVM pushes one entry per emulated write).  ``dirty_ring_reset()``: the count
  ``KVM_RESET_DIRTY_RINGS`` returned (entries harvested and now recycled).  A caller keeps the guest
  writes between two resets at or below ``options.dirty_ring_entries // 4``; backends refuse more with
  ``UsageError`` so that the real ring can never overflow.
* ``kvmclock_enable(gpa)``: ``Outcome(errno)`` of writing ``MSR_KVM_SYSTEM_TIME_NEW = gpa | 1``.
  ``kvmclock_update()``: forces a clock update (KVM_GET_CLOCK + KVM_SET_CLOCK, then one guest entry) and
  returns ``PvclockOutcome``: the ``pvclock_vcpu_time_info`` seen through the host mapping at the gpa
  before and after, and ``written`` (the version changed).  "Where" is the page the gpa's hva maps *now*:
  a pfncache that still points at an old page shows up as ``written == False``.

Errors: a backend raises ``KvmIoctlError`` only for ioctls that are plumbing (KVM_CREATE_VCPU,
KVM_SET_REGS, ...) failing unexpectedly, ``BackendUnavailable`` when it cannot run at all and
``UsageError`` for calls outside the contract.  An errno that *is* the behaviour under test is returned
in the outcome, never raised.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from kvmsim.types import PAGE_SIZE, Gpa, Hva
from kvmsim.uapi import KVM_MEM, Access, Exit, GuestMemfdFlags, ManualProtect  # noqa: F401 (the backend API)

# The backend's own boot memslot (code, page tables, IDT, buffers) occupies guest physical
# [0, BOOT_GPA_END); user memslots must stay above it (KVM returns EEXIST otherwise).
BOOT_GPA_END = Gpa(0x400000)
# The emulator treats this page as the local APIC even without an in-kernel irqchip
# (kvm-on-these-machines.md §9); keep data out of it.
APIC_GPA = Gpa(0xFEE00000)
# Guest accesses are identity-mapped below this address (one PML4 entry of 2 MiB pages).
GUEST_GPA_LIMIT = Gpa(1 << 39)


class MemoryRegionApi(enum.Enum):
    """Which ioctl installs a memslot."""

    V1 = "KVM_SET_USER_MEMORY_REGION"
    V2 = "KVM_SET_USER_MEMORY_REGION2"


class MappingKind(enum.Enum):
    """Kinds of host memory a memslot can be backed by (and the VMA flags that matter)."""

    ANON_PRIVATE = "anon-private"          # MAP_PRIVATE|MAP_ANONYMOUS
    ANON_SHARED = "anon-shared"            # MAP_SHARED|MAP_ANONYMOUS (shmem)
    MEMFD = "memfd"                        # memfd_create + MAP_SHARED
    HUGETLB_2M = "hugetlb-2M"              # memfd_create(MFD_HUGETLB|MFD_HUGE_2MB) + MAP_SHARED
    THP_ANON = "thp-anon"                  # 2M-aligned MAP_PRIVATE anon + MADV_HUGEPAGE
    PERF_RING = "perf-ring"                # perf_event mmap: VM_PFNMAP|VM_IO, writable
    VVAR = "vvar"                          # the process's [vvar]: read-only VM_PFNMAP (never unmapped)
    IO_URING_RING = "io_uring-ring"        # io_uring SQ/CQ ring: VM_MIXEDMAP
    GUEST_MEMFD = "guest_memfd"            # mmap of a guest_memfd (needs GUEST_MEMFD_FLAG_MMAP)


class Prot(enum.IntFlag):
    """``PROT_*`` (include/uapi/asm-generic/mman-common.h)."""

    PROT_NONE = 0
    PROT_READ = 1
    PROT_WRITE = 2


class Madv(enum.IntEnum):
    """The ``MADV_*`` advice values a backend supports."""

    MADV_DONTNEED = 4
    MADV_REMOVE = 9
    MADV_HUGEPAGE = 14
    MADV_COLD = 20
    MADV_PAGEOUT = 21
    MADV_POPULATE_WRITE = 23
    MADV_COLLAPSE = 25


class Falloc(enum.IntFlag):
    """``FALLOC_FL_*`` (include/uapi/linux/falloc.h)."""

    FALLOC_FL_KEEP_SIZE = 0x01
    FALLOC_FL_PUNCH_HOLE = 0x02


TERMINAL_EXITS = frozenset({Exit.EFAULT, Exit.MEMORY_FAULT, Exit.SHUTDOWN, Exit.INTERNAL_ERROR,
                            Exit.EXCEPTION})


@dataclass(frozen=True)
class VmOptions:
    """Options of ``create_vm``.

    ``dirty_ring_entries``: enable KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) with that many ``kvm_dirty_gfn``
    entries (a power of two, >= 4096), or ``None`` for the bitmap.  ``manual_protect``: flags for
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (0 = off).
    """

    dirty_ring_entries: int | None = None
    manual_protect: ManualProtect = ManualProtect(0)


@dataclass(frozen=True)
class GuestMemfd:
    """A guest_memfd created by ``create_guest_memfd`` (the fd number is backend-private)."""

    id: int
    size: int
    flags: GuestMemfdFlags


@dataclass(frozen=True)
class MemoryRegion:
    """The fields of ``struct kvm_userspace_memory_region2`` a caller chooses."""

    slot: int
    guest_phys_addr: Gpa
    memory_size: int
    userspace_addr: Hva
    flags: KVM_MEM = KVM_MEM(0)
    guest_memfd: GuestMemfd | None = None
    guest_memfd_offset: int = 0

    @property
    def npages(self) -> int:
        return self.memory_size // PAGE_SIZE


@dataclass(frozen=True)
class HostMapping:
    """One host mapping the backend created (or, for VVAR, found).  ``id`` is stable across mremap."""

    id: int
    kind: MappingKind
    hva: Hva
    size: int

    def at(self, offset: int) -> Hva:
        return Hva(self.hva + offset)


@dataclass(frozen=True)
class Outcome:
    """The result of an operation whose only observable is an errno (0 = success)."""

    errno: int = 0

    @property
    def ok(self) -> bool:
        return self.errno == 0


@dataclass(frozen=True)
class MapOutcome(Outcome):
    mapping: HostMapping | None = None


@dataclass(frozen=True)
class GuestMemfdOutcome(Outcome):
    gmem: GuestMemfd | None = None


@dataclass(frozen=True)
class HostAccess:
    """A host (VMM) load or store through a mapping: ``data`` or the signal it raised."""

    data: bytes | None
    signal: int = 0


@dataclass(frozen=True)
class GuestAccessOutcome:
    accesses: tuple[Access, ...]
    requested: int
    detail: str = ""

    @property
    def complete(self) -> bool:
        return len(self.accesses) == self.requested and not any(
            a.exit in TERMINAL_EXITS for a in self.accesses)

    @property
    def values(self) -> list[int | None]:
        return [a.value for a in self.accesses]

    @property
    def exits(self) -> list[Exit]:
        return [a.exit for a in self.accesses]

    @property
    def mmio_gpas(self) -> list[Gpa]:
        return [a.gpa for a in self.accesses if a.exit is Exit.MMIO]


@dataclass(frozen=True)
class DirtyLogOutcome(Outcome):
    dirty: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True, order=True)
class DirtyGfn:
    """One harvested ``struct kvm_dirty_gfn``: slot id (as_id << 16 | id) and page offset in the slot."""

    slot: int
    offset: int


@dataclass(frozen=True)
class PvclockVcpuTimeInfo:
    """``struct pvclock_vcpu_time_info`` (arch/x86/include/asm/pvclock-abi.h)."""

    version: int
    tsc_timestamp: int
    system_time: int
    tsc_to_system_mul: int
    tsc_shift: int
    flags: int


@dataclass(frozen=True)
class PvclockOutcome:
    """What a forced kvmclock update did: the pvclock at the gpa, through the host, before and after."""

    before: PvclockVcpuTimeInfo | None
    after: PvclockVcpuTimeInfo | None
    exit: Exit = Exit.OK

    @property
    def written(self) -> bool:
        if self.after is None:
            return False
        if self.before is None:
            return self.after.version != 0
        return self.after.version != self.before.version or (
            self.after.system_time != self.before.system_time)


@runtime_checkable
class ForkedChild(Protocol):
    """A forked child keeping the parent's pages copy-on-write shared until released."""

    pid: int

    def release(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """What both the real KVM and the model can do and observe; see the module docstring."""

    name: str
    policy: str                         # "legacy" or "series"

    def create_vm(self, options: VmOptions = VmOptions()) -> None: ...
    def close(self) -> None: ...

    # memslots and guest_memfd
    def set_memory_region(self, region: MemoryRegion,
                          api: MemoryRegionApi = MemoryRegionApi.V2) -> Outcome: ...
    def memslots(self) -> Mapping[int, MemoryRegion]: ...
    def create_guest_memfd(self, size: int, flags: GuestMemfdFlags = GuestMemfdFlags(0)
                           ) -> GuestMemfdOutcome: ...

    # host mappings and host mm operations
    def host_mmap(self, kind: MappingKind, size: int, *, hva: Hva | None = None,
                  gmem: GuestMemfd | None = None) -> MapOutcome: ...
    def host_munmap(self, m: HostMapping) -> Outcome: ...
    def host_mprotect(self, m: HostMapping, prot: Prot, offset: int = 0,
                      length: int | None = None) -> Outcome: ...
    def host_madvise(self, m: HostMapping, advice: Madv, offset: int = 0,
                     length: int | None = None) -> Outcome: ...
    def host_mremap(self, m: HostMapping) -> MapOutcome: ...
    def host_fallocate(self, target: HostMapping | GuestMemfd, offset: int, length: int,
                       mode: Falloc = Falloc.FALLOC_FL_PUNCH_HOLE | Falloc.FALLOC_FL_KEEP_SIZE
                       ) -> Outcome: ...
    def host_fork(self) -> ForkedChild: ...
    def host_read(self, m: HostMapping, offset: int, length: int = 8) -> HostAccess: ...
    def host_write(self, m: HostMapping, offset: int, data: bytes) -> HostAccess: ...

    # guest accesses
    def guest_read(self, gpas: Sequence[int]) -> GuestAccessOutcome: ...
    def guest_write(self, gpas: Sequence[int], values: int | Sequence[int]) -> GuestAccessOutcome: ...

    # dirty tracking
    def get_dirty_log(self, slot: int) -> DirtyLogOutcome: ...
    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        pages: Iterable[int] | None = None) -> Outcome: ...
    def dirty_ring_harvest(self) -> list[DirtyGfn]: ...
    def dirty_ring_reset(self) -> int: ...

    # kvmclock gfn_to_pfn_cache
    def kvmclock_enable(self, gpa: Gpa) -> Outcome: ...
    def kvmclock_update(self) -> PvclockOutcome: ...


def page_gpas(gpa: int, npages: int, offset: int = 0) -> list[Gpa]:
    """The gpas of ``npages`` consecutive pages from ``gpa`` (plus ``offset`` inside each page)."""
    return [Gpa(gpa + i * PAGE_SIZE + offset) for i in range(npages)]


def delete_memory_region(b: Backend, slot: int) -> Outcome:
    """Delete ``slot``: KVM_SET_USER_MEMORY_REGION2 with ``memory_size == 0``."""
    old = b.memslots().get(slot)
    if old is None:
        return b.set_memory_region(MemoryRegion(slot, Gpa(0), 0, Hva(0)))
    return b.set_memory_region(replace(old, memory_size=0))


def move_memory_region(b: Backend, slot: int, guest_phys_addr: int) -> Outcome:
    """Move ``slot`` to a new base gpa (KVM_MR_MOVE), keeping size, hva and flags."""
    old = _installed(b, slot)
    return b.set_memory_region(replace(old, guest_phys_addr=Gpa(guest_phys_addr)))


def update_memory_region_flags(b: Backend, slot: int, flags: KVM_MEM) -> Outcome:
    """Change only the flags of ``slot`` (KVM_MR_FLAGS_ONLY)."""
    old = _installed(b, slot)
    return b.set_memory_region(replace(old, flags=KVM_MEM(flags)))


def _installed(b: Backend, slot: int) -> MemoryRegion:
    from kvmsim.errors import UsageError

    old = b.memslots().get(slot)
    if old is None:
        raise UsageError(f"memslot {slot} is not installed")
    return old
