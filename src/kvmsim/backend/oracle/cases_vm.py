"""Oracle cases: memslots with live SPTEs (virt/kvm/kvm_main.c ``kvm_set_memslot()``, arch/x86/kvm/mmu
``kvm_arch_flush_shadow_memslot()``), the kvmclock pfncache (virt/kvm/pfncache.c), KVM_PRE_FAULT_MEMORY
(``kvm_vcpu_pre_fault_memory()``) and the README table of ../shared/oracle.
"""

from __future__ import annotations

from kvmsim.uapi import KVM_MEM
from kvmsim.backend.base import (Madv, MappingKind, delete_memory_region, move_memory_region,
                                 page_gpas, update_memory_region_flags)
from kvmsim.backend.oracle.cases import DEFAULT_COMPARE, GPA, LOG, TABLE_CASE, case
from kvmsim.backend.oracle.side import Side
from kvmsim.backend.oracle.cases_dirty import _bits
from kvmsim.backend.oracle.cases_hostops import _written

# ---- memslots -------------------------------------------------------------------------------------------

@case("memslot")
def delete_slot_live(s: Side) -> None:
    """Deleting a slot with live writable SPTEs (KVM_X86_QUIRK_SLOT_ZAP_ALL: zap all, fast)."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 128)
    with s.phase("delete"):
        s.note("errno", delete_memory_region(s.b, 1).errno)
    with s.phase("read"):
        s.read(gpas[:1])


@case("memslot")
def delete_recreate_slot(s: Side) -> None:
    """Delete then re-create the same slot: data kept by the host, faults again."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 128)
    with s.phase("delete"):
        s.note("errno", delete_memory_region(s.b, 1).errno)
    with s.phase("recreate"):
        s.note("slot", s.slot(m))
    with s.phase("read"):
        s.read(gpas)


@case("memslot")
def move_slot_live(s: Side) -> None:
    """KVM_MR_MOVE with live SPTEs: the old range becomes MMIO, the new one faults in the same data."""
    m, gpas = _written(s, MappingKind.ANON_SHARED, 128)
    with s.phase("move"):
        s.note("errno", move_memory_region(s.b, 1, 2 * GPA).errno)
    with s.phase("read new"):
        s.read(page_gpas(2 * GPA, 128))
    with s.phase("read old"):
        s.read(gpas[:1])


@case("memslot")
def readonly_slot(s: Side) -> None:
    """KVM_MEM_READONLY: reads map, writes exit to userspace as MMIO."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.ANON_SHARED, 64 * 4096)
        s.note("host write", s.b.host_write(m, 0, (7).to_bytes(8, "little")).signal)
        s.note("slot", s.slot(m, flags=KVM_MEM.READONLY))
    with s.phase("read"):
        s.read(page_gpas(GPA, 64))
    with s.phase("write"):
        s.write(page_gpas(GPA, 8), 9)


@case("memslot")
def overlap_and_bad_args(s: Side) -> None:
    """Memslot argument checks: overlap EEXIST, misaligned EINVAL, bad flags EINVAL."""
    s.begin()
    with s.phase("slots"):
        m = s.map(MappingKind.ANON_SHARED, 64 * 4096)
        s.note("first", s.slot(m))
        s.note("overlap", s.slot(m, slot=2, gpa=GPA + 4096 * 8))
        s.note("misaligned gpa", s.slot(m, slot=3, gpa=GPA * 3 + 8))
        s.note("bad flags", s.slot(m, slot=4, gpa=GPA * 4, flags=KVM_MEM(1 << 8)))


# ---- pfncache (kvmclock) ------------------------------------------------------------------------------

@case("pfncache", compare=("out",))
def pfncache_anon_dontneed(s: Side) -> None:
    """kvmclock gfn_to_pfn_cache over private anon: invalidated by MADV_DONTNEED, refreshed to the new page."""
    m, gpas = _written(s, MappingKind.ANON_PRIVATE, 16)
    with s.phase("enable"):
        s.note("errno", s.b.kvmclock_enable(gpas[0]).errno)
        s.note("written", s.b.kvmclock_update().written)
    with s.phase("DONTNEED+update"):
        s.b.host_madvise(m, Madv.MADV_DONTNEED)
        s.note("written", s.b.kvmclock_update().written)


@case("pfncache", compare=("out",))
def pfncache_perf_ring(s: Side) -> None:
    """kvmclock over a VM_PFNMAP perf ring: hva_to_pfn_remapped once the PTE is writable."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.PERF_RING, 8 * 4096)
        s.info("vm_flags", s.vm_flags(m))
        s.require_vm_flag(m, "pf", "the perf ring of this kernel is not VM_PFNMAP (perf_mmap() serves "
                                   "struct pages from perf_mmap_fault(), so KVM uses GUP, not hva_to_pfn_remapped)")
        s.note("slot", s.slot(m, size=8 * 4096))
    with s.phase("guest write"):
        s.write(page_gpas(GPA, 1), 5)
    with s.phase("kvmclock"):
        s.note("errno", s.b.kvmclock_enable(GPA).errno)
        s.note("written", s.b.kvmclock_update().written)


@case("pfncache", compare=("out",))
def pfncache_io_uring_ring(s: Side) -> None:
    """kvmclock over a VM_MIXEDMAP io_uring ring: GUP works; MADV_DONTNEED zaps it and updates stop."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.IO_URING_RING, 4 * 4096)
        s.info("vm_flags", s.vm_flags(m))
        s.note("slot", s.slot(m))
    with s.phase("kvmclock"):
        s.note("errno", s.b.kvmclock_enable(GPA).errno)
        s.note("written", s.b.kvmclock_update().written)


# ---- pre-fault ----------------------------------------------------------------------------------------

@case("prefault")
def pre_fault_memory(s: Side) -> None:
    """KVM_PRE_FAULT_MEMORY over a populated shared range: SPTEs without guest accesses, then no faults."""
    s.begin()
    with s.phase("map+populate"):
        m = s.map(MappingKind.ANON_SHARED, 128 * 4096)
        s.note("slot", s.slot(m))
        s.note("populate", s.b.host_madvise(m, Madv.MADV_POPULATE_WRITE).errno)
    with s.phase("pre-fault"):
        s.note("errno", s.pre_fault(GPA, 128 * 4096))
    with s.phase("write"):
        s.write(page_gpas(GPA, 128), 4)


@case("prefault")
def pre_fault_no_slot(s: Side) -> None:
    """KVM_PRE_FAULT_MEMORY outside any memslot fails (ENOENT)."""
    s.begin()
    with s.phase("pre-fault"):
        s.note("errno", s.pre_fault(3 * GPA, 4096))


# ---- the README table (../shared/oracle/README.md), 1,000 pages ------------------------------------------------



@case("table", name=TABLE_CASE,
      compare=DEFAULT_COMPARE + ("mark_page_accessed",))
def readme_table(s: Side) -> None:
    """First write of 1,000 pages, MADV_DONTNEED, GET_DIRTY_LOG after a write pass, slot delete."""
    s.begin()
    with s.phase("map"):
        m = s.map(MappingKind.ANON_SHARED, 16 << 20)
        s.note("slot", s.slot(m))
    gpas = page_gpas(GPA, 1000)
    with s.phase("first write"):
        s.write(gpas, 1)
    with s.phase("MADV_DONTNEED"):
        s.note("errno", s.b.host_madvise(m, Madv.MADV_DONTNEED).errno)
    with s.phase("write, enable logging"):
        s.write(gpas, 2)
        s.note("flags", update_memory_region_flags(s.b, 1, LOG).errno)
    with s.phase("write pass"):
        s.write(gpas, 3)
    with s.phase("GET_DIRTY_LOG"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write pass 2"):
        s.write(gpas, 4)
    with s.phase("GET_DIRTY_LOG 2"):
        s.note("log", _bits(s.b.get_dirty_log(1)))
    with s.phase("write pass 3"):
        s.write(gpas, 5)
    with s.phase("delete slot"):
        s.note("errno", delete_memory_region(s.b, 1).errno)

