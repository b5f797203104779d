"""Host capability discovery (``KVM_CHECK_EXTENSION``, include/uapi/linux/kvm.h ``KVM_CAP_*``; hugepage and
THP state from /proc/meminfo and /sys/kernel/mm) and the host's refcounting policy.

The policy cannot be probed: the series "KVM: Stop grabbing references to PFNMAP'd pages" (merged for
v6.13) added no capability and changed no uapi.  kvmsim therefore decides from the kernel release:
``>= 6.13`` runs the series policy, anything older the legacy one; a caller who knows better (a distribution
kernel with a backport, a revert) passes ``policy=`` to ``KvmBackend``, which always wins.
"""

from __future__ import annotations

import os
import re

from kvmsim import uapi
from kvmsim.backend.kvm import ioctls
from kvmsim.errors import UsageError
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.policies.series import SeriesPolicy

POLICIES = (LegacyPolicy.name, SeriesPolicy.name)
SERIES_FIRST_RELEASE = (6, 13)

_DEV_CAPS = {
    "user_memory": uapi.KVM_CAP_USER_MEMORY,
    "nr_vcpus": uapi.KVM_CAP_NR_VCPUS,
    "max_vcpus": uapi.KVM_CAP_MAX_VCPUS,
    "sync_mmu": uapi.KVM_CAP_SYNC_MMU,
    "adjust_clock": uapi.KVM_CAP_ADJUST_CLOCK,
    "binary_stats_fd": uapi.KVM_CAP_BINARY_STATS_FD,
    "vm_types": uapi.KVM_CAP_VM_TYPES,
}
_VM_CAPS = {
    "nr_memslots": uapi.KVM_CAP_NR_MEMSLOTS,
    "readonly_mem": uapi.KVM_CAP_READONLY_MEM,
    "user_memory2": uapi.KVM_CAP_USER_MEMORY2,
    "manual_dirty_log_protect2": uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    "dirty_log_ring": uapi.KVM_CAP_DIRTY_LOG_RING,
    "dirty_log_ring_acq_rel": uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    "dirty_log_ring_with_bitmap": uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    "memory_fault_info": uapi.KVM_CAP_MEMORY_FAULT_INFO,
    "memory_attributes": uapi.KVM_CAP_MEMORY_ATTRIBUTES,
    "guest_memfd": uapi.KVM_CAP_GUEST_MEMFD,
    "guest_memfd_flags": uapi.KVM_CAP_GUEST_MEMFD_FLAGS,
    "pre_fault_memory": uapi.KVM_CAP_PRE_FAULT_MEMORY,
}


def check_extension(fd: int, cap: int) -> int:
    ret, _ = ioctls.raw_ioctl(fd, ioctls.KVM_CHECK_EXTENSION, cap)
    return max(ret, 0)


def kvm_capabilities(kvm_fd: int) -> dict:
    """Everything kvmsim needs to know about this /dev/kvm, from /dev/kvm and a scratch VM."""
    caps: dict = {
        "api_version": ioctls.ioctl(kvm_fd, ioctls.KVM_GET_API_VERSION),
        "vcpu_mmap_size": ioctls.ioctl(kvm_fd, ioctls.KVM_GET_VCPU_MMAP_SIZE),
    }
    caps.update({name: check_extension(kvm_fd, cap) for name, cap in _DEV_CAPS.items()})
    vm_fd = ioctls.kvm_create_vm(kvm_fd)
    try:
        caps.update({name: check_extension(vm_fd, cap) for name, cap in _VM_CAPS.items()})
    finally:
        os.close(vm_fd)
    caps.update(host_memory_state())
    caps["kernel_release"] = os.uname().release
    return caps


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def selected(value: str | None) -> str | None:
    """The bracketed choice of a sysfs enum such as ``always [madvise] never``."""
    if value is None:
        return None
    m = re.search(r"\[([^\]]+)\]", value)
    return m.group(1) if m else value


def meminfo() -> dict[str, int]:
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def host_memory_state() -> dict:
    """Hugepage pool and THP settings (read only)."""
    mi = meminfo()
    return {
        "hugepages_2m_total": mi.get("HugePages_Total", 0) if mi.get("Hugepagesize") == 2048 else 0,
        "hugepages_2m_free": mi.get("HugePages_Free", 0) if mi.get("Hugepagesize") == 2048 else 0,
        "thp_enabled": selected(_read("/sys/kernel/mm/transparent_hugepage/enabled")),
        "thp_shmem_enabled": selected(_read("/sys/kernel/mm/transparent_hugepage/shmem_enabled")),
    }


def parse_release(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise UsageError(f"cannot read a kernel version from {release!r}")
    return int(m.group(1)), int(m.group(2))


def host_policy(release: str | None = None, override: str | None = None) -> str:
    """``override`` if given, else the series policy for kernels >= 6.13 and the legacy one before."""
    if override is not None:
        if override not in POLICIES:
            raise UsageError(f"policy must be one of {', '.join(POLICIES)}, got {override!r}")
        return override
    version = parse_release(release or os.uname().release)
    return SeriesPolicy.name if version >= SERIES_FIRST_RELEASE else LegacyPolicy.name
