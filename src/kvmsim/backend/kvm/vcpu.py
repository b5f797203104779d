"""The single vCPU and its KVM_RUN loop (arch/x86/kvm/x86.c ``kvm_arch_vcpu_ioctl_run``; exit protocol of
Documentation/virt/kvm/api.rst §5 "The kvm_run structure").

The loop handles KVM_EXIT_IO (the guest's done/exception ports), KVM_EXIT_MMIO (recorded, then resumed
with zeroed read data), KVM_EXIT_HLT (program end), KVM_EXIT_DIRTY_RING_FULL (the ring is harvested into
the VM's pending list and reset), KVM_EXIT_INTR/EINTR (resumed), and turns SHUTDOWN, INTERNAL_ERROR,
MEMORY_FAULT and -EFAULT into terminal outcomes.  An exit that is not resumed is completed first with
``immediate_exit = 1`` (KVM finishes the pending emulation and returns -EINTR) so the next KVM_SET_REGS is
not undone by the pending instruction (kvm-on-these-machines.md, gotcha 2).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmsim import uapi
from kvmsim.backend.base import Exit
from kvmsim.backend.kvm import abi, guest, ioctls, libc
from kvmsim.errors import BackendError, KvmIoctlError


@dataclass
class RunEvent:
    """A non-OK event during one guest program: the access index it belongs to and what happened."""

    index: int
    exit: Exit
    gpa: int = 0
    is_write: bool = False
    detail: str = ""


@dataclass
class RunResult:
    events: list[RunEvent] = field(default_factory=list)
    terminal: RunEvent | None = None


def _code_segment() -> abi.kvm_segment:
    return abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=guest.SEL_CODE, type=0xB, present=1,
                            dpl=0, db=0, s=1, l=1, g=1)


def _data_segment() -> abi.kvm_segment:
    return abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=guest.SEL_DATA, type=0x3, present=1,
                            dpl=0, db=1, s=1, l=0, g=1)


class KvmVcpu:
    """vCPU 0 of a VM: the ``kvm_run`` mapping, long-mode registers and the run loop."""

    def __init__(self, vm_fd: int, mmap_size: int, closer: libc.Closer):
        self.fd = closer.fd(ioctls.ioctl(vm_fd, ioctls.KVM_CREATE_VCPU, 0))
        addr, err = libc.mmap(None, mmap_size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED,
                              self.fd, 0)
        if addr < 0:
            raise KvmIoctlError("mmap(vcpu fd)", err, "mapping struct kvm_run")
        closer.mapping(addr, mmap_size)
        libc.madvise(addr, mmap_size, libc.MADV_DONTFORK)   # a fork child must not pin the vCPU
        self.run = abi.kvm_run.from_address(addr)
        self._run_addr = addr
        self.needs_reset = True         # sregs must be (re)loaded before the next program
        self.needs_completion = False   # an exit is pending completion

    # --- registers ------------------------------------------------------------------------------
    def setup_long_mode(self) -> None:
        """Load the 64-bit segment/paging state of the boot image (guest.py)."""
        sregs = abi.kvm_sregs()
        ioctls.ioctl(self.fd, ioctls.KVM_GET_SREGS, sregs)
        sregs.cs = _code_segment()
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _data_segment())
        sregs.gdt.base, sregs.gdt.limit = guest.BOOT_GDT, 3 * 8 - 1
        sregs.idt.base, sregs.idt.limit = guest.BOOT_IDT, 256 * 16 - 1
        sregs.cr3 = guest.BOOT_PML4
        sregs.cr4 = abi.X86_CR4_PAE
        sregs.cr0 = abi.X86_CR0_PE | abi.X86_CR0_PG
        sregs.efer = abi.EFER_LME | abi.EFER_LMA
        ioctls.ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)
        self.needs_reset = False

    def set_regs(self, rip: int, **values: int) -> None:
        regs = abi.kvm_regs(rip=rip, rflags=2, rsp=guest.BOOT_STACK_TOP)
        for name, v in values.items():
            setattr(regs, name, v)
        ioctls.ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctls.ioctl(self.fd, ioctls.KVM_GET_REGS, regs)
        return regs

    def cr2(self) -> int:
        sregs = abi.kvm_sregs()
        ioctls.ioctl(self.fd, ioctls.KVM_GET_SREGS, sregs)
        return sregs.cr2

    def set_msr(self, index: int, data: int) -> int:
        """KVM_SET_MSRS with one entry; returns the number of MSRs KVM accepted (0 or 1)."""
        msrs = abi.kvm_msrs_with(1)()
        msrs.nmsrs = 1
        msrs.entries[0].index = index
        msrs.entries[0].data = data
        return ioctls.ioctl(self.fd, ioctls.KVM_SET_MSRS, msrs)

    # --- running --------------------------------------------------------------------------------
    def complete_pending(self) -> None:
        """KVM_RUN with ``immediate_exit = 1``: finish a pending MMIO/PIO without entering the guest."""
        if not self.needs_completion:
            return
        self.run.immediate_exit = 1
        try:
            ret, err = ioctls.raw_ioctl(self.fd, ioctls.KVM_RUN)
        finally:
            self.run.immediate_exit = 0
        if ret < 0 and err not in (errno.EINTR, errno.EAGAIN):
            raise KvmIoctlError("KVM_RUN(immediate_exit)", err)
        self.needs_completion = False

    def run_program(self, entry: int, rsi: int,
                    on_ring_full: Callable[[], None] | None = None) -> RunResult:
        """Run a boot-image program until its final HLT (or a terminal exit)."""
        self.complete_pending()
        if self.needs_reset:
            self.setup_long_mode()
        self.set_regs(entry, rsi=rsi)
        result = RunResult()
        try:
            self._loop(result, on_ring_full)
        except BaseException:
            self.needs_completion = True     # e.g. KeyboardInterrupt between two KVM_RUNs
            self.needs_reset = True
            raise
        if result.terminal is not None:
            self.needs_reset = True
        return result

    def _index(self) -> int:
        return (self.get_regs().rbx - guest.BOOT_ADDRS) // 8

    def _terminal(self, result: RunResult, ex: Exit, detail: str, *, pending: bool) -> None:
        try:
            idx = self._index()
        except KvmIoctlError:
            idx = -1
        result.terminal = RunEvent(idx, ex, detail=detail)
        self.needs_completion = pending

    def _loop(self, result: RunResult, on_ring_full) -> None:
        run = self.run
        while True:
            ret, err = ioctls.raw_ioctl(self.fd, ioctls.KVM_RUN)
            if ret < 0:
                if err in (errno.EINTR, errno.EAGAIN):
                    continue                 # KVM_EXIT_INTR: a signal; Python runs its handler now
                if err == errno.EFAULT:
                    self._terminal(result, Exit.EFAULT, "KVM_RUN returned -EFAULT", pending=False)
                    return
                raise KvmIoctlError("KVM_RUN", err)
            reason = run.exit_reason
            if reason == uapi.KVM_EXIT_HLT:
                return
            if reason == uapi.KVM_EXIT_IO:
                port = run.io.port
                if port == guest.PORT_DONE:
                    continue                 # the next exit is the program's HLT
                data = ctypes.c_uint8.from_address(self._run_addr + run.io.data_offset).value
                if port == guest.PORT_EXCEPTION:
                    detail = f"guest exception vector {data}, cr2={self.cr2():#x}"
                    self._terminal(result, Exit.EXCEPTION, detail, pending=True)
                    return
                raise BackendError(f"guest did OUT to unexpected port {port:#x}")
            if reason == uapi.KVM_EXIT_MMIO:
                mmio = run.mmio
                result.events.append(RunEvent(self._index(), Exit.MMIO, gpa=mmio.phys_addr,
                                              is_write=bool(mmio.is_write)))
                if not mmio.is_write:
                    ctypes.memset(ctypes.addressof(mmio.data), 0, 8)
                continue
            if reason == uapi.KVM_EXIT_DIRTY_RING_FULL:
                if on_ring_full is None:
                    raise BackendError("KVM_EXIT_DIRTY_RING_FULL without a dirty ring")
                on_ring_full()
                continue
            if reason == uapi.KVM_EXIT_INTR:
                continue
            if reason == uapi.KVM_EXIT_SHUTDOWN:
                self._terminal(result, Exit.SHUTDOWN, "KVM_EXIT_SHUTDOWN (triple fault)", pending=False)
                return
            if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
                detail = f"KVM_EXIT_INTERNAL_ERROR suberror {run.internal.suberror}"
                self._terminal(result, Exit.INTERNAL_ERROR, detail, pending=False)
                return
            if reason == uapi.KVM_EXIT_MEMORY_FAULT:
                mf = run.memory_fault
                detail = f"KVM_EXIT_MEMORY_FAULT gpa={mf.gpa:#x} size={mf.size:#x} flags={mf.flags:#x}"
                self._terminal(result, Exit.MEMORY_FAULT, detail, pending=False)
                return
            self._terminal(result, Exit.INTERNAL_ERROR, f"unexpected exit reason {reason}", pending=True)
            return
