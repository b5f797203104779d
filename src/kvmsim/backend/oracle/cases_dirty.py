"""Oracle cases: dirty logging (virt/kvm/kvm_main.c ``kvm_get_dirty_log_protect()``,
``kvm_clear_dirty_log_protect()``, virt/kvm/dirty_ring.c; arch/x86/kvm/mmu/tdp_mmu.c write-protection,
eager splitting and huge-page recovery in arch/x86/kvm/x86.c ``kvm_mmu_slot_apply_flags()``).
"""

from __future__ import annotations

from kvmsim.uapi import KVM_MEM
from kvmsim.backend.base import (ManualProtect, MappingKind, VmOptions, page_gpas,
                                 update_memory_region_flags)
from kvmsim.backend.oracle.cases import G1, GPA, LOG, M2, case
from kvmsim.backend.oracle.side import HUGETLB_1G, Side

def _logged(s: Side, kind=MappingKind.ANON_SHARED, npages: int = 256, flags=LOG, **opts):
    s.begin(VmOptions(**opts))
    with s.phase("map"):
        m = s.map(kind, npages * 4096)
        s.note("slot", s.slot(m, flags=flags))
    return m, page_gpas(GPA, npages)


def _bits(o):
    return {"errno": o.errno, "dirty": len(o.dirty), "first": min(o.dirty) if o.dirty else None,
            "last": max(o.dirty) if o.dirty else None}


@case("dirty")
def get_dirty_log(s: Side) -> None:
    """Classic GET_DIRTY_LOG: exact bitmap, write-protection (no PML under SVM), faults on the next pass."""
    m, gpas = _logged(s)
    with s.phase("first write"):
        s.write(gpas[:200], 1)
    with s.phase("GET_DIRTY_LOG"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write again"):
        s.write(gpas[:200], 2)
    with s.phase("GET_DIRTY_LOG 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("GET_DIRTY_LOG 3"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def dirty_log_reads_not_logged(s: Side) -> None:
    """Guest reads are never logged; a read fault maps a logged page read-only... then a write faults."""
    m, gpas = _logged(s)
    with s.phase("read"):
        s.read(gpas[:100])
    with s.phase("GET_DIRTY_LOG"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write"):
        s.write(gpas[:100], 3)
    with s.phase("GET_DIRTY_LOG 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def manual_protect(s: Side) -> None:
    """MANUAL_DIRTY_LOG_PROTECT2: GET does not re-protect, CLEAR does; a GET without CLEAR repeats."""
    m, gpas = _logged(s, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    with s.phase("write"):
        s.write(gpas[:192], 1)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("GET again"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write before CLEAR"):
        s.write(gpas[:192], 2)
    with s.phase("CLEAR 0..128"):
        s.note("errno", s.b.clear_dirty_log(1, 0, 128).errno)
    with s.phase("GET after CLEAR"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write after CLEAR"):
        s.write(gpas[:192], 3)


@case("dirty")
def manual_initially_set(s: Side) -> None:
    """INITIALLY_SET: all bits set, nothing write-protected until CLEAR; CLEAR protects exactly its range."""
    m, gpas = _logged(s, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                      | ManualProtect.KVM_DIRTY_LOG_INITIALLY_SET)
    with s.phase("write"):
        s.write(gpas, 1)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("CLEAR 64..192"):
        s.note("errno", s.b.clear_dirty_log(1, 64, 128).errno)
    with s.phase("GET after CLEAR"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write again"):
        s.write(gpas, 2)
    with s.phase("GET 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def clear_dirty_log_alignment(s: Side) -> None:
    """KVM_CLEAR_DIRTY_LOG: first_page and num_pages must be 64-aligned except a final partial chunk."""
    m, gpas = _logged(s, npages=200, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    with s.phase("write"):
        s.write(gpas, 1)
        s.note("get", _bits(s.b.get_dirty_log(1)))
    with s.phase("CLEARs"):
        s.note("errnos", [s.b.clear_dirty_log(1, f, n).errno
                          for f, n in ((1, 63), (0, 63), (32, 32), (0, 32), (0, 64), (64, 64), (192, 8),
                                       (128, 72), (192, 16))])
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write"):
        s.write(gpas, 2)


@case("dirty")
def clear_dirty_log_partial_mask(s: Side) -> None:
    """CLEAR of selected pages inside a 64-page chunk: only those are re-protected."""
    m, gpas = _logged(s, npages=128, manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    with s.phase("write"):
        s.write(gpas, 1)
        s.note("get", _bits(s.b.get_dirty_log(1)))
    with s.phase("CLEAR odd pages"):
        s.note("errno", s.b.clear_dirty_log(1, 0, 128, range(1, 128, 2)).errno)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write"):
        s.write(gpas, 2)


@case("dirty")
def dirty_ring(s: Side) -> None:
    """The dirty ring: one entry per page until reset (hardware), reset re-protects, re-write faults."""
    m, gpas = _logged(s, npages=256, dirty_ring_entries=4096)
    with s.phase("write"):
        s.write(gpas[:200], 1)
    with s.phase("write again"):
        s.write(gpas[:200], 2)
    with s.phase("harvest+reset"):
        got = s.b.dirty_ring_harvest()
        s.note("harvest", {"entries": len(got), "distinct": len(set(got))})
        s.note("reset", s.b.dirty_ring_reset())
    with s.phase("write after reset"):
        s.write(gpas[:200], 3)
        got = s.b.dirty_ring_harvest()
        s.note("harvest", {"entries": len(got), "distinct": len(set(got))})
        s.note("reset", s.b.dirty_ring_reset())


@case("dirty")
def dirty_ring_get_dirty_log(s: Side) -> None:
    """With the dirty ring on, KVM_GET_DIRTY_LOG is refused (ENXIO)."""
    m, gpas = _logged(s, npages=64, dirty_ring_entries=4096)
    with s.phase("write"):
        s.write(gpas, 1)
    with s.phase("GET_DIRTY_LOG"):
        s.note("errno", s.b.get_dirty_log(1).errno)


def _huge_logging(s: Side, kind, size: int, stride: int, manual: bool) -> None:
    opts = {"manual_protect": ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE} if manual else {}
    s.begin(VmOptions(**opts))
    npages = size // 4096
    with s.phase("map+touch"):
        m = s.map(kind, size)
        s.note("slot", s.slot(m))
        s.write(page_gpas(GPA, npages)[::stride], 1)
    with s.phase("enable logging"):
        s.note("errno", update_memory_region_flags(s.b, 1, LOG).errno)
    with s.phase("write all 4K pages"):
        s.write(page_gpas(GPA, npages), 2)
    with s.phase("disable logging"):
        s.note("errno", update_memory_region_flags(s.b, 1, KVM_MEM(0)).errno)
    with s.phase("touch again"):
        s.write(page_gpas(GPA, npages)[::stride], 3)


@case("dirty")
def logging_thp_first_write(s: Side) -> None:
    """A dirty-logged slot over THP: faults map 4K only (no huge page while logging), every write logged."""
    m, gpas = _logged(s, MappingKind.THP_ANON, npages=1024)
    with s.phase("write"):
        s.write(gpas[::64], 1)
    with s.phase("GET"):
        s.note("log", _bits(s.b.get_dirty_log(1)))


@case("dirty")
def disable_logging_thp(s: Side) -> None:
    """Dirty logging over THP: split to 4K while logging, huge pages recovered after logging stops."""
    _huge_logging(s, MappingKind.THP_ANON, 2 * M2, 512, False)


@case("dirty")
def disable_logging_hugetlb_2m(s: Side) -> None:
    """Dirty logging over hugetlb 2M: eager split, then 2M back in pages_2m after disabling."""
    _huge_logging(s, MappingKind.HUGETLB_2M, 2 * M2, 512, False)


@case("dirty")
def disable_logging_hugetlb_2m_manual(s: Side) -> None:
    """As disable-logging-hugetlb-2m with manual protect (no eager split at enable without INITIALLY_SET)."""
    _huge_logging(s, MappingKind.HUGETLB_2M, 2 * M2, 512, True)


@case("dirty")
def disable_logging_hugetlb_1g(s: Side) -> None:
    """The series' own example: 1 GiB hugetlb, logging on, every 4K page written (512x512 SPTEs), off."""
    _huge_logging(s, HUGETLB_1G, G1, 262144, False)



