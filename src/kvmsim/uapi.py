"""The KVM userspace API's names, defined once (include/uapi/linux/kvm.h, v6.13; caps up to v6.18).

Everything that speaks ``KVM_*`` imports its constants from here: the pure model (``kvm/``), the
scenario loader, the conformance suite and both backends (``backend/model.py`` and the real
``/dev/kvm`` backend, whose ctypes mirrors of the uapi structs live in ``backend/kvm/abi.py`` under
their exact C names).  This module imports nothing from kvmsim, so the model never reaches the
real-KVM backend through it.

Flags are ``IntFlag`` (``KVM_MEM.READONLY``); the kernel's ``#define`` names are also bound at
module level, as plain ints derived from the flag (``KVM_MEM_READONLY == int(KVM_MEM.READONLY)``), for
hot paths where an ``IntFlag`` operation would cost more than the test it makes.  Exit reasons and
capabilities are plain ints, as the kernel compares them.  ``Exit`` and ``Access`` describe how one
guest access ended, in KVM_RUN terms; the model's vCPU and both backends return them.  ``EHWPOISON``
lives in :mod:`kvmsim.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntFlag

# --- capabilities (KVM_CAP_*) -------------------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_SYNC_MMU = 16
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

# --- exit reasons (struct kvm_run.exit_reason) --------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


# --- memslots (struct kvm_userspace_memory_region{,2}.flags) ------------------------------------
class KVM_MEM(IntFlag):
    """``KVM_MEM_*`` memslot flags, plus the kernel-internal ``KVM_MEMSLOT_INVALID``.

    ``INVALID`` is ``KVM_MEMSLOT_INVALID`` of include/linux/kvm_host.h: never accepted from userspace
    (``check_memory_region_flags()`` refuses it like any unknown bit); the model sets it on a slot
    being deleted or moved, so a ``struct kvm_memory_slot``'s flags stay one type.
    """

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2
    INVALID = 1 << 16


KVM_MEM_LOG_DIRTY_PAGES = int(KVM_MEM.LOG_DIRTY_PAGES)
KVM_MEM_READONLY = int(KVM_MEM.READONLY)
KVM_MEM_GUEST_MEMFD = int(KVM_MEM.GUEST_MEMFD)
KVM_MEMSLOT_INVALID = int(KVM_MEM.INVALID)

# include/linux/kvm_host.h limits a memslot ioctl is checked against
KVM_USER_MEM_SLOTS = 32764      # x86: KVM_MEM_SLOTS_NUM (SHRT_MAX) - KVM_INTERNAL_MEM_SLOTS (3)
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


class KvmMrChange(str, Enum):
    """``enum kvm_mr_change`` (include/linux/kvm_host.h): what a ``KVM_SET_USER_MEMORY_REGION`` does."""

    CREATE = "create"           # KVM_MR_CREATE
    DELETE = "delete"           # KVM_MR_DELETE
    MOVE = "move"               # KVM_MR_MOVE
    FLAGS_ONLY = "flags_only"   # KVM_MR_FLAGS_ONLY


KVM_MR_CREATE = KvmMrChange.CREATE
KVM_MR_DELETE = KvmMrChange.DELETE
KVM_MR_MOVE = KvmMrChange.MOVE
KVM_MR_FLAGS_ONLY = KvmMrChange.FLAGS_ONLY


# --- dirty logging --------------------------------------------------------------------------------
class ManualProtect(IntFlag):
    """Arguments of ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``."""

    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
    KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = int(ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
KVM_DIRTY_LOG_INITIALLY_SET = int(ManualProtect.KVM_DIRTY_LOG_INITIALLY_SET)

# struct kvm_dirty_gfn.flags
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # arch/x86/include/uapi/asm/kvm.h: the ring's mmap offset, in pages


# --- guest_memfd (struct kvm_create_guest_memfd.flags) --------------------------------------------
class GuestMemfdFlags(IntFlag):
    """``GUEST_MEMFD_FLAG_*`` of ``struct kvm_create_guest_memfd``."""

    GUEST_MEMFD_FLAG_MMAP = 1 << 0
    GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1


GUEST_MEMFD_FLAG_MMAP = int(GuestMemfdFlags.GUEST_MEMFD_FLAG_MMAP)
GUEST_MEMFD_FLAG_INIT_SHARED = int(GuestMemfdFlags.GUEST_MEMFD_FLAG_INIT_SHARED)

# --- memory attributes (struct kvm_memory_attributes, KVM_SET_MEMORY_ATTRIBUTES) --------------------
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# struct kvm_run.memory_fault.flags (KVM_EXIT_MEMORY_FAULT)
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# --- binary stats (KVM_GET_STATS_FD) --------------------------------------------------------------
KVM_STATS_NAME_SIZE = 48


# --- how one guest access ended -------------------------------------------------------------------
class Exit(str, Enum):
    """How one guest access ended, in KVM_RUN terms.

    The model's vCPU produces OK, MMIO, EFAULT, EINTR, HWPOISON, DIRTY_RING_FULL and LIVELOCK (a scenario's
    ``exits`` are spelled with these values); the real backend also sees the terminal exits of a
    whole guest run (MEMORY_FAULT, SHUTDOWN, INTERNAL_ERROR, EXCEPTION), and the model backend reports
    EINTR, HWPOISON and DIRTY_RING_FULL as KVM_RUN's EFAULT, which is what a VMM would see.
    """

    OK = "ok"
    MMIO = "mmio"                      # KVM_EXIT_MMIO (no slot, RO slot write, emulated fault)
    EFAULT = "efault"                  # KVM_RUN returned -EFAULT
    EINTR = "eintr"                    # KVM_RUN returned -EINTR (signal pending)
    HWPOISON = "hwpoison"              # -EHWPOISON: SIGBUS to the VMM
    DIRTY_RING_FULL = "dirty_ring_full"  # KVM_EXIT_DIRTY_RING_FULL
    LIVELOCK = "livelock"              # model-only: the guest re-entered RETRY_LIVELOCK_BOUND times, no progress
    MEMORY_FAULT = "memory-fault"      # KVM_EXIT_MEMORY_FAULT (terminal)
    SHUTDOWN = "shutdown"              # KVM_EXIT_SHUTDOWN, triple fault (terminal)
    INTERNAL_ERROR = "internal-error"  # KVM_EXIT_INTERNAL_ERROR (terminal)
    EXCEPTION = "exception"            # the guest took an exception (terminal)


@dataclass(slots=True)
class Access:
    """One guest access: ``value`` written, or read (``None`` if the read was not satisfied).

    ``errno`` is what KVM_RUN returned for an EFAULT/EINTR/HWPOISON exit (0 otherwise, and always 0
    from a backend, which compares accesses by value).  Not frozen: a frozen dataclass costs three
    times as much to create, and the model creates one per guest access.
    """

    exit: Exit
    gpa: int
    write: bool
    value: int | None = None
    errno: int = 0

    @property
    def ok(self) -> bool:
        return self.exit is Exit.OK
