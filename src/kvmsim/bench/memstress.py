"""memstress (tools/testing/selftests/kvm/lib/memstress.c) on the model: backing sources, the test
memslots and each vCPU's region, and the guest's pass over its region.

The guest loop of ``memstress_guest_code()`` touches every 4 KiB page of the vCPU's region in order,
writing with probability ``write_percent`` (``guest_random_u32() % 100 < write_percent``) and
reading otherwise.  :func:`vcpu_pass` does one such pass through the x86 MMU's bulk paths; first
touches go through :func:`kvmsim.bench.prefault.host_prefault_range` first, so the result is the
scalar faults' result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kvmsim.bench.prefault import host_mapped_range, host_prefault_range
from kvmsim.errors import UsageError
from kvmsim.mm.vma import VmaKind
from kvmsim.types import PAGE_SHIFT

#: ``-s`` backing sources (lib/test_util.c ``vm_mem_backing_src_alias``) → (kind, page size, thp, shared)
BACKING = {
    "anonymous": (VmaKind.ANON, 4096, False, False),
    "anonymous_thp": (VmaKind.ANON, 4096, True, False),
    "anonymous_hugetlb": (VmaKind.HUGETLB, 1 << 21, False, False),
    "anonymous_hugetlb_2mb": (VmaKind.HUGETLB, 1 << 21, False, False),
    "anonymous_hugetlb_1gb": (VmaKind.HUGETLB, 1 << 30, False, False),
    "shmem": (VmaKind.ANON_SHARED, 4096, False, True),
    "shared_hugetlb": (VmaKind.HUGETLB, 1 << 21, False, True),
}

MEMSTRESS_MEM_SLOT_INDEX = 1
TEST_GPA = 1 << 32                  # the model places the test memory at 4 GiB (1 GiB aligned)
CHUNK = 1 << 18                     # pages per bulk call (1 GiB of guest memory)


def parse_size(text: str) -> int:
    """``parse_size()`` (lib/test_util.c): ``[0-9]+[kmgt]?`` (case-insensitive) in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise UsageError(f"size {text!r}: expected a number with an optional k/m/g/t suffix, e.g. 1G")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


@dataclass
class TestSlot:
    slot: int
    gpa: int
    size: int
    vma: object

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


def create_test_slots(kvm, total: int, backing: str, nslots: int) -> list[TestSlot]:
    """mmap the backing and add ``nslots`` memslots splitting ``total`` bytes evenly (``-x``)."""
    if backing not in BACKING:
        raise UsageError(f"unknown backing source {backing!r}; choose one of {', '.join(BACKING)}")
    kind, page_size, thp, shared = BACKING[backing]
    if nslots < 1 or total % nslots or (total // nslots) % page_size:
        from kvmsim.bench.report import size_name
        raise UsageError(f"{size_name(total)} of test memory does not split into {nslots} memslot(s) of whole "
                         f"{size_name(page_size)} pages (-s {backing}): use a multiple of "
                         f"{size_name(page_size * max(nslots, 1))}")
    per = total // nslots
    out = []
    for k in range(nslots):
        vma = kvm.mm.mmap(per, kind, page_size=page_size, thp=thp, shared=shared)
        gpa = TEST_GPA + k * per
        kvm.set_user_memory_region(MEMSTRESS_MEM_SLOT_INDEX + k, gpa, per, vma.start, 0)
        out.append(TestSlot(MEMSTRESS_MEM_SLOT_INDEX + k, gpa, per, vma))
    return out


def _pieces(kvm, gpa: int, npages: int):
    """(slot, slot-relative lo, hi) covering ``[gpa, +npages)``, in ``CHUNK``-page pieces."""
    gfn, end = gpa >> PAGE_SHIFT, (gpa >> PAGE_SHIFT) + npages
    while gfn < end:
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:
            raise UsageError(f"gfn {gfn:#x} is in no memslot")
        lo = gfn - slot.base_gfn
        hi = min(slot.npages, end - slot.base_gfn, (lo // CHUNK + 1) * CHUNK)
        yield slot, lo, hi
        gfn = slot.base_gfn + hi


def vcpu_pass(kvm, vcpu, gpa: int, npages: int, write_mask: np.ndarray | None, value: int) -> None:
    """One ``memstress_guest_code()`` pass: page k written if ``write_mask[k]`` (all when None)."""
    mmu = kvm.arch
    pos = 0
    for slot, lo, hi in _pieces(kvm, gpa, npages):
        n = hi - lo
        wm = None if write_mask is None else write_mask[pos:pos + n]
        if wm is None or wm.all():
            _writes(kvm, mmu, vcpu, slot, lo, hi, value)
        elif not wm.any():
            mmu.guest_access_range(vcpu, (slot.base_gfn + lo) << PAGE_SHIFT, n, False, None)
        else:
            _mixed(kvm, mmu, vcpu, slot, lo, wm, value)
        pos += n


def _writes(kvm, mmu, vcpu, slot, lo: int, hi: int, value: int) -> None:
    """Guest writes to ``[lo, hi)`` in gfn order: host prefault, then the MMU's bulk path, piece by piece."""
    while lo < hi:
        stop, irregular = host_prefault_range(kvm, slot, lo, hi)
        if not irregular:
            stop = hi                                  # done, or the rest is the MMU's to order
        elif stop == lo:
            stop = lo + 1                              # the odd page alone, then prefault again
        mmu.guest_access_range(vcpu, (slot.base_gfn + lo) << PAGE_SHIFT, stop - lo, True, value)
        lo = stop


def _mixed(kvm, mmu, vcpu, slot, lo: int, wm: np.ndarray, value: int) -> None:
    """Reads and writes interleaved, in gfn order: one bulk call with a kind per page where the host
    maps every page already (no prefault to order), else one bulk call per run of same-kind accesses."""
    if host_mapped_range(kvm, slot, lo, lo + len(wm)):
        mmu.guest_access_range(vcpu, (slot.base_gfn + lo) << PAGE_SHIFT, len(wm), wm, value)
        return
    brk = np.flatnonzero(np.diff(wm.view(np.int8))) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(wm)]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        if wm[s]:
            _writes(kvm, mmu, vcpu, slot, lo + s, lo + e, value)
        else:
            mmu.guest_access_range(vcpu, (slot.base_gfn + lo + s) << PAGE_SHIFT, e - s, False, None)


def write_masks(npages: int, write_percent: int, rng: np.random.Generator) -> np.ndarray | None:
    """Which pages of a pass are written (None: all, the default 100%)."""
    if write_percent >= 100:
        return None
    return rng.random(npages, dtype=np.float32) < np.float32(write_percent / 100)
