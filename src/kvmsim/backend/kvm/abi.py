"""ctypes mirrors of the KVM uapi structs (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h, v6.18).

Struct names are the C names: they are the ABI.  Only what kvmsim drives is mirrored.  The uapi's
constants (``KVM_CAP_*``, ``KVM_EXIT_*``, ``KVM_MEM_*``, ...) are defined once, in :mod:`kvmsim.uapi`;
only the x86 register bits the backend's guest setup needs are here.  Layouts are asserted in
tests/backend/test_uapi.py (e.g. ``sizeof(kvm_userspace_memory_region2) == 160``).
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int8, c_int16, c_uint8, c_uint16, c_uint32, c_uint64

# --- x86 MSRs and control bits ------------------------------------------------------------------
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
X86_CR0_PE = 1 << 0
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


class kvm_userspace_memory_region2(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64),
                ("guest_memfd_offset", c_uint64), ("guest_memfd", c_uint32), ("pad1", c_uint32),
                ("pad2", c_uint64 * 14)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("num_pages", c_uint32), ("first_page", c_uint64),
                ("dirty_bitmap", c_uint64)]


class kvm_dirty_gfn(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("slot", c_uint32), ("offset", c_uint64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = [("size", c_uint64), ("flags", c_uint64), ("reserved", c_uint64 * 6)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32), ("realtime", c_uint64),
                ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """``struct kvm_msrs`` with a flexible ``entries[]``; see :func:`kvm_msrs_with`."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def kvm_msrs_with(n: int) -> type[ctypes.Structure]:
    """A ``struct kvm_msrs`` followed by ``n`` ``kvm_msr_entry`` (the C flexible array)."""
    return type(f"kvm_msrs_{n}", (ctypes.Structure,),
                {"_fields_": [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]})


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16), ("type", c_uint8),
                ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8), ("s", c_uint8),
                ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8), ("unusable", c_uint8),
                ("padding", c_uint8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
                ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
                ("interrupt_bitmap", c_uint64 * 4)]


# --- struct kvm_run and its exit union ----------------------------------------------------------
class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_memory_fault(ctypes.Structure):
    _fields_ = [("flags", c_uint64), ("gpa", c_uint64), ("size", c_uint64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("io", _kvm_run_io), ("mmio", _kvm_run_mmio), ("internal", _kvm_run_internal),
                ("memory_fault", _kvm_run_memory_fault), ("fail_entry", _kvm_run_fail_entry),
                ("padding", c_char * 256)]


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8),
                ("padding1", c_uint8 * 6), ("exit_reason", c_uint32),
                ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8), ("flags", c_uint16),
                ("cr8", c_uint64), ("apic_base", c_uint64), ("u", _kvm_run_exit),
                ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64),
                ("s", c_char * 2048)]


# --- binary stats (KVM_GET_STATS_FD) ------------------------------------------------------------
class kvm_stats_header(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("name_size", c_uint32), ("num_desc", c_uint32),
                ("id_offset", c_uint32), ("desc_offset", c_uint32), ("data_offset", c_uint32)]


class kvm_stats_desc(ctypes.Structure):
    """The fixed part of ``struct kvm_stats_desc``; ``name[name_size]`` follows."""

    _fields_ = [("flags", c_uint32), ("exponent", c_int16), ("size", c_uint16), ("offset", c_uint32),
                ("bucket_size", c_uint32)]


# --- struct pvclock_vcpu_time_info (arch/x86/include/asm/pvclock-abi.h) --------------------------
class pvclock_vcpu_time_info(ctypes.Structure):
    _fields_ = [("version", c_uint32), ("pad0", c_uint32), ("tsc_timestamp", c_uint64),
                ("system_time", c_uint64), ("tsc_to_system_mul", c_uint32), ("tsc_shift", c_int8),
                ("flags", c_uint8), ("pad", c_uint8 * 2)]
