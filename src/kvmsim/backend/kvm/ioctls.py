"""ioctl numbers (include/uapi/asm-generic/ioctl.h, include/uapi/linux/kvm.h) and the raw ioctl call.

The numbers are computed with ``_IO``/``_IOR``/``_IOW``/``_IOWR`` from the struct sizes in ``uapi``, as the C
headers do; tests/backend/test_uapi.py asserts them against the values a C compiler produces.
"""

from __future__ import annotations

import ctypes
import errno
from ctypes import sizeof

from kvmsim.backend.kvm import abi
from kvmsim.errors import KvmIoctlError

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
            | (size << _IOC_SIZESHIFT))


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, type_, nr, sizeof(struct))


def _IOW(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, type_, nr, sizeof(struct))


def _IOWR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(struct))


# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, abi.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, abi.kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, abi.kvm_userspace_memory_region2)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, abi.kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, abi.kvm_clock_data)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, abi.kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, abi.kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, abi.kvm_create_guest_memfd)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, abi.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, abi.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, abi.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, abi.kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, abi.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, abi.kvm_msrs)

IOCTL_NAMES = {v: k for k, v in list(globals().items()) if k.startswith("KVM_") and isinstance(v, int)}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def raw_ioctl(fd: int, request: int, arg=None) -> tuple[int, int]:
    """``ioctl(fd, request, arg)`` returning ``(ret, errno)``; ``arg`` is an int, a ctypes object or None.

    ctypes drops the GIL for the call, so another thread may run during a long KVM_RUN.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def ioctl(fd: int, request: int, arg=None, *, name: str | None = None) -> int:
    """``raw_ioctl`` that raises ``KvmIoctlError(name, errno)`` on failure."""
    ret, err = raw_ioctl(fd, request, arg)
    if ret < 0:
        raise KvmIoctlError(name or IOCTL_NAMES.get(request, hex(request)), err)
    return ret


def errno_of(fn, *args) -> int:
    """Run ``fn(*args)`` and map an ``OSError`` to its errno (0 on success)."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno or 0
    return 0



def kvm_create_vm(kvm_fd: int, vm_type: int = 0) -> int:
    """``KVM_CREATE_VM`` on ``/dev/kvm``, retried while it fails with EINTR; the new VM fd.

    ``kvm_create_vm()`` (virt/kvm/kvm_main.c) registers the VM's mmu_notifier, and
    ``__mmu_notifier_register()`` (mm/mmu_notifier.c) takes ``mm_take_all_locks()``, which gives up
    with -EINTR when a signal is pending.  Nothing was created, so the call is simply repeated, as
    QEMU's ``kvm_init()`` does (``do { ret = kvm_ioctl(s, KVM_CREATE_VM, type); } while (ret ==
    -EINTR);``).  A pending Python signal handler (Ctrl-C) still runs between two attempts.  Any
    other error raises ``KvmIoctlError("KVM_CREATE_VM", errno)``.
    """
    while True:
        ret, err = raw_ioctl(kvm_fd, KVM_CREATE_VM, vm_type)
        if ret >= 0:
            return ret
        if err != errno.EINTR:
            raise KvmIoctlError("KVM_CREATE_VM", err)
