"""Test helpers shared by every test folder: the one way to build a VM under test.

``make_vm(policy, arch=...)`` builds a :class:`~kvmsim.mm.host.Host` and a VM on it; with a
``size`` (each arch has a default: a 4 MiB hugetlb slot on x86, one file page on arm64 and RISC-V,
none for the generic MMU) it also maps a VMA, registers it as memslot 0 at gpa 0 and creates one
vCPU.  The result unpacks as ``host, kvm, vma, vcpu`` (``vma``/``vcpu`` are None without a slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

PAGE = 4096

#: Per-arch defaults of the VM under test (what each folder's tests were written against).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "generic": {"size": 0, "kind": VmaKind.ANON, "page_size": None},
    "x86": {"size": 4 << 20, "kind": VmaKind.HUGETLB, "page_size": 1 << 21},
    "arm64": {"size": PAGE, "kind": VmaKind.FILE, "page_size": None},
    "riscv": {"size": PAGE, "kind": VmaKind.FILE, "page_size": None},
    "loongarch": {"size": PAGE, "kind": VmaKind.FILE, "page_size": None},
    "mips": {"size": PAGE, "kind": VmaKind.FILE, "page_size": None},
    "ppc-book3s-hv": {"size": PAGE, "kind": VmaKind.ANON, "page_size": None},
    "ppc-book3s-radix": {"size": PAGE, "kind": VmaKind.ANON, "page_size": None},
    "ppc-book3s-pr": {"size": PAGE, "kind": VmaKind.ANON, "page_size": None},
    "ppc-e500": {"size": PAGE, "kind": VmaKind.ANON, "page_size": None},
}

_UNSET: Any = object()


@dataclass
class VmUnderTest:
    """What :func:`make_vm` built; unpacks as ``host, kvm, vma, vcpu``."""

    host: Host
    kvm: Kvm
    vma: Any = None
    vcpu: Any = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.host, self.kvm, self.vma, self.vcpu))


def make_vm(policy: str = "series", *, arch: str = "generic", size: int = _UNSET, pages: int | None = None,
            kind: VmaKind = _UNSET, page_size: int | None = _UNSET, flags: int = 0, recording: bool = True,
            ring: int = 0, manual_protect: int = 0, **kvm_kw: Any) -> VmUnderTest:
    """Host + VM (+ one memslot over one VMA and one vCPU when ``size``/``pages`` is non-zero).

    ``ring`` enables the dirty ring and ``manual_protect`` KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 before
    the memslot is created; other keywords go to :class:`Kvm` (``mmu=``, ``ad_enabled=``, ...)."""
    d = ARCH_DEFAULTS[arch]
    size = d["size"] if size is _UNSET else size
    if pages is not None:
        size = pages * PAGE
    kind = d["kind"] if kind is _UNSET else kind
    page_size = d["page_size"] if page_size is _UNSET else page_size
    host = Host(recording=recording)
    kvm = Kvm(host, policy=policy, arch=arch, **kvm_kw)
    if ring:
        from kvmsim.kvm.dirty import enable_dirty_ring
        enable_dirty_ring(kvm, ring)
    if manual_protect:
        from kvmsim.kvm.dirty import enable_manual_protect
        enable_manual_protect(kvm, manual_protect)
    if not size:
        return VmUnderTest(host, kvm)
    vma = host.mm.mmap(size, kind, **({"page_size": page_size} if page_size else {}))
    kvm.set_user_memory_region(0, 0, size, vma.start, flags)
    return VmUnderTest(host, kvm, vma, kvm.create_vcpu())
