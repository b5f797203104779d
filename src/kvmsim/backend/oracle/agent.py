"""The in-guest agent: runs inside an oracle kernel (``python -m kvmsim.backend.oracle.agent OUT``) and
drives that kernel's real KVM, with real NPT faults, through kvmsim's own pure-Python client
(``kvmsim.backend.kvm``), recording per case and phase what ``probes`` observes; writes
``OUT/results.json``.

Two things the client does not do by itself, done here: KVM_SET_CPUID2 (KVM_GET_SUPPORTED_CPUID's
table) before KVM_SET_SREGS, which 6.12.117's stable backports require, and pre-faulting the client's
boot memslot with KVM_PRE_FAULT_MEMORY (virt/kvm/kvm_main.c ``kvm_vcpu_pre_fault_memory()``, v6.10+)
so that a case's first phase counts only its own faults, not the guest's code, page tables and
address lists.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
import time
import traceback

from kvmsim.backend.base import BOOT_GPA_END, HostMapping, MappingKind, VmOptions
from kvmsim.backend.kvm import ioctls, libc
from kvmsim.backend.kvm.backend import KvmBackend
from kvmsim.backend.kvm.vcpu import KvmVcpu
from kvmsim.backend.oracle import probes
from kvmsim.backend.oracle.kernels import policy_for_release
from kvmsim.backend.oracle.side import CaseSkipped, Side

MFD_HUGE_1GB = 30 << 26
KVM_GET_SUPPORTED_CPUID = 0xC008AE05          # _IOWR(KVMIO, 0x05, struct kvm_cpuid2)
KVM_SET_CPUID2 = 0x4008AE90                   # _IOW(KVMIO, 0x90, struct kvm_cpuid2)


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("padding", ctypes.c_uint64 * 5)]


KVM_PRE_FAULT_MEMORY = ioctls._IOWR(ioctls.KVMIO, 0xD5, kvm_pre_fault_memory)


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32), ("ecx", ctypes.c_uint32),
                ("edx", ctypes.c_uint32), ("padding", ctypes.c_uint32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("entries", kvm_cpuid_entry2 * 256)]


_SUPPORTED_CPUID: kvm_cpuid2 | None = None
_original_setup_long_mode = KvmVcpu.setup_long_mode


def _setup_long_mode_with_cpuid(self: KvmVcpu) -> None:
    """KVM_SET_CPUID2 once per vCPU, then the client's own SREGS setup."""
    if not getattr(self, "_oracle_cpuid_set", False) and _SUPPORTED_CPUID is not None:
        ioctls.ioctl(self.fd, KVM_SET_CPUID2, _SUPPORTED_CPUID, name="KVM_SET_CPUID2")
        self._oracle_cpuid_set = True
    _original_setup_long_mode(self)


def _load_supported_cpuid() -> None:
    global _SUPPORTED_CPUID
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        c = kvm_cpuid2(nent=256)
        ioctls.ioctl(fd, KVM_GET_SUPPORTED_CPUID, c, name="KVM_GET_SUPPORTED_CPUID")
        _SUPPORTED_CPUID = c
    finally:
        os.close(fd)
    KvmVcpu.setup_long_mode = _setup_long_mode_with_cpuid


class RealSide(Side):
    """The kernel this agent runs in: KvmBackend + kprobes + binary stats + kpageflags."""

    name = "real"

    def __init__(self, policy: str, kprobes: probes.Kprobes):
        super().__init__()
        self.policy = policy
        self.kprobes = kprobes

    def new_backend(self, options: VmOptions) -> KvmBackend:
        return KvmBackend(policy=self.policy)

    def settle(self) -> None:
        """Populate the boot memory writable (MADV_POPULATE_WRITE) and pre-fault the boot slot, so all
        its 1,024 SPTEs exist, writable, before the first phase (ModelSide.settle does the same)."""
        vm = self.b.vm
        libc.madvise(vm.boot, int(BOOT_GPA_END), 23)       # MADV_POPULATE_WRITE
        err = self.pre_fault(0, int(BOOT_GPA_END))
        if err:
            raise CaseSkipped(f"KVM_PRE_FAULT_MEMORY of the boot slot failed: errno {err}")
        self._touch_boot()

    def _touch_boot(self) -> None:
        """A guest read of every boot page: pre-faulted SPTEs are made without the Accessed bit
        (prefetch), the model's read faults set it; after this every boot SPTE is accessed on both
        sides, so a zap-all marks the same pages (legacy ``kvm_set_pfn_accessed``)."""
        vm = self.b.vm
        out: list = []
        done, detail = vm._run_chunk(list(range(0, int(BOOT_GPA_END), 4096)), None, out)
        if not done:
            raise CaseSkipped(f"reading the boot slot from the guest failed: {detail}")

    def resettle(self) -> None:
        """One guest entry first: after kvm_mmu_zap_all_fast() the vCPU's root is obsolete, and
        KVM_PRE_FAULT_MEMORY on v6.12/v6.13 only retries against it (kvm_tdp_map_page() loops on
        RET_PF_RETRY from is_page_fault_stale(); kvm_mmu_reload() does not free obsolete roots):
        KVM_RUN processes KVM_REQ_MMU_FREE_OBSOLETE_ROOTS and loads a new root."""
        vm = self.b.vm
        vm.vcpu.run_program(vm.entries["hlt"], 0)
        err = self.pre_fault(0, int(BOOT_GPA_END))
        if err:
            raise CaseSkipped(f"KVM_PRE_FAULT_MEMORY of the boot slot failed: errno {err}")
        self._touch_boot()

    def counts(self) -> dict:
        out = dict(probes.pick_stats(self.b.stats()))
        out.update(self.kprobes.hits())
        return out

    def map_hugetlb_1g(self, size: int) -> HostMapping:
        host = self.b.host
        fd, err = libc.memfd_create("kvmsim-hugetlb-1G", libc.MFD_CLOEXEC | libc.MFD_HUGETLB | MFD_HUGE_1GB)
        if fd < 0:
            raise CaseSkipped(f"memfd_create(MFD_HUGE_1GB): errno {err}")
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise CaseSkipped(f"ftruncate of a 1 GiB hugetlb memfd: {os.strerror(e.errno or 0)}") from None
        host._closer.fd(fd)
        addr, err = host._map_fd_or_anon(size, libc.MAP_SHARED, fd, None, 0)
        if err:
            raise CaseSkipped(f"mmap of a 1 GiB hugetlb memfd: errno {err}")
        return host._add(MappingKind.MEMFD, addr, size, size, fd=fd, fds=[fd]).handle()

    def madvise_raw(self, m: HostMapping, advice: int, offset: int = 0, length: int | None = None) -> int:
        return libc.madvise(m.hva + offset, length if length is not None else m.size - offset, advice)

    def pre_fault(self, gpa: int, size: int) -> int:
        arg = kvm_pre_fault_memory(gpa=gpa, size=size)
        fd = self.b.vm.vcpu.fd
        while arg.size:
            ret, err = ioctls.raw_ioctl(fd, KVM_PRE_FAULT_MEMORY, arg)
            if ret < 0 and err not in (errno.EINTR, errno.EAGAIN):
                return err
        return 0

    def page_flags(self, m: HostMapping, npages: int) -> dict:
        return probes.page_flag_counts(m.hva, npages)

    def idle_after(self, m: HostMapping, npages: int, touch) -> dict | None:
        if not probes.PageIdle.available():
            touch()
            return None
        pfns = [p for p in probes.pagemap_pfns(m.hva, npages) if p]
        probes.PageIdle.mark_idle(pfns)
        before = probes.PageIdle.still_idle(pfns)
        touch()
        return {"pages": len(pfns), "idle_before": before, "idle_after": probes.PageIdle.still_idle(pfns)}

    def vm_flags(self, m: HostMapping) -> str:
        cur = None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    cur = lo <= m.hva < hi
                elif cur and line.startswith("VmFlags:"):
                    return line.split(":", 1)[1].strip()
        return ""


CASE_TIMEOUT = 240          # seconds of guest time per case before the agent gives up on it


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"the case did not finish within {CASE_TIMEOUT} s")


def run_cases(names: list[str] | None = None) -> dict:
    from kvmsim.backend.oracle.cases import CASES

    release = os.uname().release
    policy = policy_for_release(release)
    try:
        _load_supported_cpuid()
    except Exception as e:                       # noqa: BLE001 - recorded, the cases will then say more
        print(f"agent: KVM_GET_SUPPORTED_CPUID failed: {e}", file=sys.stderr)
    kp = probes.Kprobes()
    side = RealSide(policy, kp)
    nrec, _ = probes.new_problems(0)
    results = {}
    t0 = time.monotonic()
    for case in CASES:
        if names and case.name not in names:
            continue
        tc = time.monotonic()
        print(f"agent: {case.name}", flush=True)             # progress, in $OUT/cmd.log
        rec = {"phases": [], "error": None, "skipped": None, "warnings": []}
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_TIMEOUT)
        try:
            case.fn(side)
        except CaseSkipped as e:
            rec["skipped"] = str(e)
        except Exception as e:                   # noqa: BLE001 - one case's failure must not stop the batch
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
        finally:
            signal.alarm(0)
            try:
                side.end()
            except Exception as e:               # noqa: BLE001
                rec["error"] = rec["error"] or f"close: {e}"
        rec["phases"] = [{"name": p.name, "out": p.out, "counts": p.counts, "info": p.info}
                          for p in side.phases]
        nrec, warns = probes.new_problems(nrec)
        rec["warnings"] = warns
        rec["seconds"] = round(time.monotonic() - tc, 4)
        results[case.name] = rec
    kp.clear()
    return {"release": release, "policy": policy, "absent": kp.absent, "present": sorted(kp.present),
            "page_idle": probes.PageIdle.available(), "seconds": round(time.monotonic() - t0, 3),
            "cases": results}


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m kvmsim.backend.oracle.agent OUT_DIR [CASE ...]", file=sys.stderr)
        return 2
    out = argv[0]
    res = run_cases(argv[1:] or None)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "results.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
