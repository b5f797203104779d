"""The host-execution option of ModelBackend: the differences it causes are modelled and named."""

from kvmsim.backend.base import Exit, MappingKind, MemoryRegion, Prot, VmOptions
from kvmsim.backend.model import ModelBackend
from kvmsim.types import Gpa

GPA = 1 << 30


def _vm(execution, **opts):
    b = ModelBackend("series", execution)
    b.create_vm(VmOptions(**opts))
    m = b.host_mmap(MappingKind.ANON_SHARED, 16 * 4096).mapping
    return b, m


def test_unmapped_backing_mmio_when_emulated_efault_with_hardware():
    out = {}
    for ex in ("emulated", "hardware"):
        b, m = _vm(ex)
        b.set_memory_region(MemoryRegion(1, Gpa(GPA), m.size, m.hva))
        b.host_munmap(m)
        out[ex] = b.guest_read([GPA]).exits[0]
    assert out == {"emulated": Exit.MMIO, "hardware": Exit.EFAULT}


def test_readonly_vma_write_mmio_when_emulated_efault_with_hardware():
    out = {}
    for ex in ("emulated", "hardware"):
        b, m = _vm(ex)
        b.set_memory_region(MemoryRegion(1, Gpa(GPA), m.size, m.hva))
        b.host_mprotect(m, Prot.PROT_READ)
        out[ex] = b.guest_write([GPA], 1).exits[0]
    assert out == {"emulated": Exit.MMIO, "hardware": Exit.EFAULT}      # mmu_stress_test's EFAULT


def test_dirty_ring_entries_per_write_vs_per_page():
    got = {}
    for ex in ("emulated", "hardware"):
        b, m = _vm(ex, dirty_ring_entries=4096)
        b.set_memory_region(MemoryRegion(1, Gpa(GPA), m.size, m.hva, 1))
        b.guest_write([GPA] * 10, 1)
        got[ex] = len(b.dirty_ring_harvest())
    assert got == {"emulated": 10, "hardware": 1}
