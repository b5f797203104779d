"""Issue 2's "what it must show": driver frees under legacy, vcpu_map on PFNMAP, fault vs invalidation."""

import errno

import pytest

from kvmsim.check import Checker
from kvmsim.errors import ModelError
from kvmsim.kvm.host_map import kvm_vcpu_map, kvm_vcpu_map_access, kvm_vcpu_unmap
from kvmsim.kvm.stage2 import RET_PF
from kvmsim.mm.vma import VmaKind
from kvmsim.sched import run_interleaved

from tests.helpers import make_vm

GPA = 1 << 30


def _pfnmap_vm(policy, cls="driver_refcounted", **kw):
    host, kvm, _, _ = make_vm(policy, **kw)
    drv = host.add_driver("gpu", 4, cls)
    vma = host.mm.mmap(4 * 4096, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(1, GPA, 4 * 4096, vma.start)
    return host, kvm, drv, vma


def _teardown(host, drv):
    drv.teardown(host.mm)
    yield "driver teardown: unmap_mapping_range + free pages"


def _fault_then_teardown(policy):
    host, kvm, drv, vma = _pfnmap_vm(policy)
    vcpu = kvm.create_vcpu()
    checker = Checker(kvm)
    # the vCPU resolves the pfn (legacy: kvm_try_get_pfn takes a reference), then the driver frees
    results = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, GPA, True),
                               "driver": _teardown(host, drv)},
                              ["vcpu", "vcpu", "driver"], sched=kvm.sched)
    return host, kvm, checker, results


def test_driver_frees_page_legacy_kvm_holds_reference_is_caught():
    host, kvm, checker, results = _fault_then_teardown("legacy")
    assert results["vcpu"] == RET_PF.RETRY
    found = checker.run()
    invs = {v.invariant for v in found}
    assert "INV-1" in invs
    kinds = {f.kind for f in host.journal.facts}
    assert "freed_while_referenced" in kinds
    assert any(f.kind == "uaf" and f.kvm and f.caller == "kvm_faultin_pfn" for f in host.journal.facts)


def test_driver_frees_page_series_is_clean():
    host, kvm, checker, results = _fault_then_teardown("series")
    assert results["vcpu"] == RET_PF.RETRY
    assert checker.run() == []
    assert not any(f.kind in ("uaf", "freed_while_referenced") for f in host.journal.facts)


def test_vcpu_map_pfnmap_legacy_maps_unprotected_and_sees_freed_pfn():
    host, kvm, drv, vma = _pfnmap_vm("legacy")
    vcpu = kvm.create_vcpu()
    checker = Checker(kvm)
    m = kvm_vcpu_map(vcpu, GPA >> 12)
    assert m.pinned_page is None and m.remapped
    drv.teardown(host.mm)
    kvm_vcpu_map_access(m, True, 0xdead)                  # e.g. nested VMX writes the vmcs12
    found = checker.run()
    inv6 = [v for v in found if v.invariant == "INV-6"]
    assert inv6 and inv6[0].pfn == m.pfn
    kvm_vcpu_unmap(vcpu, m, dirty=True)


def test_vcpu_map_pfnmap_series_refuses():
    host, kvm, drv, vma = _pfnmap_vm("series")
    vcpu = kvm.create_vcpu()
    with pytest.raises(ModelError) as e:
        kvm_vcpu_map(vcpu, GPA >> 12)
    assert e.value.errno == errno.EINVAL
    assert not kvm.host_maps


def test_vcpu_map_pfnmap_series_allow_unsafe_mappings():
    host, kvm, drv, vma = _pfnmap_vm("series", allow_unsafe_mappings=True)
    vcpu = kvm.create_vcpu()
    m = kvm_vcpu_map(vcpu, GPA >> 12)
    assert m.pinned_page is None                           # nothing to pin: the admin accepted the risk
    drv.teardown(host.mm)
    assert any(v.invariant == "INV-6" for v in Checker(kvm).run())


def test_vcpu_map_series_pins_normal_memory():
    host, kvm, _, _ = make_vm("series")
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    m = kvm_vcpu_map(vcpu, 1)
    pfn = m.pfn
    assert host.phys.folio_maybe_dma_pinned(pfn)
    host.mm.munmap(vma.start, 4 * 4096)                   # the pin keeps the page alive
    assert not host.phys.is_poisoned(pfn)
    assert Checker(kvm).run() == []
    kvm_vcpu_unmap(vcpu, m)
    assert not kvm.host_refs


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_fault_racing_invalidation_retries(policy):
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(4 * 4096, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    checker = Checker(kvm)
    results = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0x1000, True),
                               "host": host.mm.munmap.steps(vma.start, 4 * 4096)},
                              ["vcpu", "vcpu", "host", "host", "host", "host"], sched=kvm.sched)
    assert results["vcpu"] == RET_PF.RETRY
    assert list(kvm.arch.leaves()) == []                  # no SPTE for the invalidated range (INV-5)
    assert not kvm.host_refs
    kvm_puts = [f for f in host.journal.facts if f.kvm and f.kind == "put"]
    assert len(kvm_puts) == 1
    marks = [f for f in host.journal.facts if f.kvm and f.kind in ("mark_accessed", "set_dirty")]
    found = {v.invariant for v in checker.run()}
    assert "INV-5" not in found
    if policy == "series":
        assert marks == []                                 # released unused: put only
        assert found == set()
    else:
        assert [f.kind for f in marks] == ["mark_accessed"]   # legacy kvm_release_pfn_clean ages it
        assert "INV-7" in found


def test_fault_completes_end_to_end(policy):
    host, kvm, _, _ = make_vm(policy)
    vma = host.mm.mmap(4 * 4096, VmaKind.MEMFD)
    kvm.set_user_memory_region(0, 0, 4 * 4096, vma.start)
    vcpu = kvm.create_vcpu()
    assert vcpu.write(0x2000, 42).ok
    assert vcpu.read(0x2000).value == 42
    assert host.mm.host_access(vma.start + 0x2000, False) == 42   # the VMM sees the guest's write
    assert not kvm.host_refs
