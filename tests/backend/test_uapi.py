"""ctypes mirrors of include/uapi/linux/kvm.h: sizes, offsets and ioctl numbers.

The expected numbers are what ``gcc`` prints for the macros of linux/kvm.h (v6.18 uapi) on x86-64.
"""

from __future__ import annotations

import ctypes
from ctypes import sizeof

import pytest

from kvmsim.backend.kvm import abi, ioctls

SIZES = {
    "kvm_userspace_memory_region": 32,
    "kvm_userspace_memory_region2": 160,
    "kvm_dirty_log": 16,
    "kvm_clear_dirty_log": 24,
    "kvm_dirty_gfn": 16,
    "kvm_enable_cap": 104,
    "kvm_create_guest_memfd": 64,
    "kvm_clock_data": 48,
    "kvm_msrs": 8,
    "kvm_msr_entry": 16,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_run": 2352,
    "kvm_stats_header": 24,
    "kvm_stats_desc": 16,
    "pvclock_vcpu_time_info": 32,
}


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_sizes(name, size):
    assert sizeof(getattr(abi, name)) == size


def test_kvm_run_layout():
    run = abi.kvm_run
    assert run.immediate_exit.offset == 1
    assert run.exit_reason.offset == 8
    assert run.u.offset == 32
    assert run.kvm_valid_regs.offset == 32 + 256
    assert run.s.offset == 304
    # KVM_EXIT_IO: direction, size, port, count, data_offset
    io = abi._kvm_run_io
    assert [io.direction.offset, io.size.offset, io.port.offset, io.count.offset,
            io.data_offset.offset] == [0, 1, 2, 4, 8]
    # KVM_EXIT_MMIO: phys_addr, data[8], len, is_write
    mmio = abi._kvm_run_mmio
    assert [mmio.phys_addr.offset, mmio.data.offset, mmio.len.offset, mmio.is_write.offset] == [0, 8, 16, 20]
    # KVM_EXIT_MEMORY_FAULT: flags, gpa, size
    assert abi._kvm_run_memory_fault.gpa.offset == 8


def test_region2_and_friends_offsets():
    r2 = abi.kvm_userspace_memory_region2
    assert [r2.guest_phys_addr.offset, r2.userspace_addr.offset, r2.guest_memfd_offset.offset,
            r2.guest_memfd.offset, r2.pad2.offset] == [8, 24, 32, 40, 48]
    assert abi.kvm_clear_dirty_log.first_page.offset == 8
    assert abi.kvm_dirty_gfn.offset.offset == 8
    assert abi.kvm_sregs.cr0.offset == 8 * 24 + 2 * 16
    assert abi.kvm_regs.rip.offset == 16 * 8
    assert sizeof(abi.kvm_msrs_with(3)) == 8 + 3 * 16


IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
}


@pytest.mark.parametrize("name,value", sorted(IOCTLS.items()))
def test_ioctl_numbers(name, value):
    assert getattr(ioctls, name) == value
    assert ioctls.IOCTL_NAMES[value] == name


def test_ioctl_helpers_encode_direction_and_size():
    assert ioctls._IO(0xAE, 0x80) == 0xAE80
    assert ioctls._IOR(0xAE, 0x7C, abi.kvm_clock_data) >> 30 == 2
    assert ioctls._IOW(0xAE, 0x7B, abi.kvm_clock_data) >> 30 == 1
    assert ioctls._IOWR(0xAE, 0xC0, abi.kvm_clear_dirty_log) >> 30 == 3
    assert (ioctls._IOW(0xAE, 0x49, abi.kvm_userspace_memory_region2) >> 16) & 0x3FFF == 160


def test_failed_ioctl_raises_with_name_and_errno():
    from kvmsim.errors import KvmIoctlError

    with pytest.raises(KvmIoctlError) as e:
        ioctls.ioctl(-1, ioctls.KVM_RUN)
    assert e.value.ioctl == "KVM_RUN" and e.value.errno == 9       # EBADF
    assert "EBADF" in str(e.value)
    assert ctypes.get_errno() == 9
