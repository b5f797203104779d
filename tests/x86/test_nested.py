"""Nested VMX / SVM users of ``kvm_vcpu_map()`` (kvmsim.x86.nested) under v6.12 and v6.13.

Kernel lines checked: v6.12 ``nested_put_vmcs12_pages()``'s ``kvm_vcpu_unmap(vcpu,
&vmx->nested.apic_access_page_map, false)`` (patch 32 "KVM: nVMX: Mark vmcs12's APIC access page dirty
when unmapping" made it true), ``nested_vmx_prepare_msr_bitmap()``'s ``kvm_vcpu_map()`` (patch 34 "KVM:
Get writable mapping for __kvm_vcpu_map() only when necessary" made it ``kvm_vcpu_map_readonly()``), and
FOLL_GET vs FOLL_PIN for every map (patch 31 "KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()").
"""

from __future__ import annotations

import dataclasses
import errno
import pathlib

import pytest

from kvmsim.check import check_all
from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import kvm_get_dirty_log
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.pfn import Hold
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.runner import run
from kvmsim.trace import FactKind
from kvmsim.uapi import KVM_MEM
from kvmsim.x86.nested import (INVALID_GPA, Vmcs12, nested_svm_vmexit, nested_svm_vmrun,
                               nested_vmx_enter_non_root_mode, nested_vmx_vmexit, to_nested)
from kvmsim.x86.vmx import to_vmx

PAGE = 4096
ROM_GPA = 1 << 20
LOG = KVM_MEM.LOG_DIRTY_PAGES
APIC, VAPIC, PI = 1, 2, 3                      # gfns of L1's APIC-access, virtual-APIC and PI pages
LIBRARY = pathlib.Path(__file__).resolve().parents[2] / "src" / "kvmsim" / "scenarios" / "library"


def vm(policy: str, *, touch: bool = True, arch: str = "x86"):
    """16 KiB of dirty-logged L1 RAM at gpa 0 (touched by the VMM unless ``touch`` is false) and a 4 KiB
    read-only slot at 1 MiB."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch=arch)
    ram = host.mm.mmap(16 * PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, 16 * PAGE, ram.start, LOG)
    rom = host.mm.mmap(PAGE, VmaKind.ANON)
    host.mm.host_access(rom.start, True, 0xFF)
    kvm.set_user_memory_region(1, ROM_GPA, PAGE, rom.start, KVM_MEM.READONLY)
    if touch:
        for i in range(16):
            host.mm.host_access(ram.start + i * PAGE, True, i)
    return host, kvm, kvm.create_vcpu(), ram


def all_three() -> Vmcs12:
    return Vmcs12(apic_access_addr=APIC * PAGE, virtual_apic_page_addr=VAPIC * PAGE,
                  posted_intr_desc_addr=PI * PAGE)


def dirty_gfns(kvm, slot: int = 0) -> set[int]:
    return {int(g) for g in kvm_get_dirty_log(kvm, slot).nonzero()[0]}


def unmap_dirtied(kvm) -> set[int]:
    """pfns ``kvm_vcpu_unmap()`` SetPageDirty'd."""
    return {f.pfn for f in kvm.journal.facts if f.kind is FactKind.SET_DIRTY and f.caller == "kvm_vcpu_unmap"}


# ---- patch 32: the APIC-access page is unmapped dirty ----------------------------------------------------

@pytest.mark.parametrize("policy, logged", [("legacy", {VAPIC, PI}), ("series", {APIC, VAPIC, PI})])
def test_nested_put_vmcs12_pages_dirties_the_apic_access_page_only_in_the_series(policy, logged):
    host, kvm, vcpu, ram = vm(policy)
    dirty_gfns(kvm)                                            # start from a clean log
    r = nested_vmx_enter_non_root_mode(vcpu, all_three())
    assert r.result == "entered" and r.posted_intr
    apic_pfn = to_nested(vcpu).apic_access_page_map.pfn
    vapic_pfn = to_nested(vcpu).virtual_apic_map.pfn
    nested_vmx_vmexit(vcpu)
    assert dirty_gfns(kvm) == logged                           # KVM_GET_DIRTY_LOG
    assert (apic_pfn in unmap_dirtied(kvm)) == (policy == "series")   # SetPageDirty on the folio
    assert vapic_pfn in unmap_dirtied(kvm)
    assert kvm.host_maps == [] and check_all(kvm) == []


def test_legacy_path_reads_the_unmap_dirty_from_kvm_ops():
    """The legacy clean unmap comes from ``kvm.ops.arch_ops.nested_apic_access_unmap_dirty`` (resolved once): a
    legacy VM given the series' value logs the APIC-access page too; the series' value is true."""
    _, kvm, vcpu, _ = vm("legacy")
    assert kvm.ops.arch_ops.nested_apic_access_unmap_dirty is False
    assert vm("series")[1].ops.arch_ops.nested_apic_access_unmap_dirty is True
    kvm.ops = dataclasses.replace(kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops,
                                                                       nested_apic_access_unmap_dirty=True))
    dirty_gfns(kvm)
    nested_vmx_enter_non_root_mode(vcpu, all_three())
    nested_vmx_vmexit(vcpu)
    assert dirty_gfns(kvm) == {APIC, VAPIC, PI}


# ---- patch 31 (through nVMX and nSVM): FOLL_GET vs FOLL_PIN ---------------------------------------------

@pytest.mark.parametrize("policy, hold", [("legacy", Hold.GET), ("series", Hold.PIN)])
def test_vmcs12_pages_are_held_while_l2_runs(policy, hold):
    host, kvm, vcpu, ram = vm(policy)
    pfn = host.mm.pte_of(ram.start + APIC * PAGE)[1]
    before = kvm.phys.page_count(pfn)
    nested_vmx_enter_non_root_mode(vcpu, all_three())
    n = to_nested(vcpu)
    assert [m.hold for m in (n.apic_access_page_map, n.virtual_apic_map, n.pi_desc_map)] == [hold] * 3
    assert kvm.phys.folio_maybe_dma_pinned(pfn) == (hold is Hold.PIN)
    assert kvm.phys.page_count(pfn) > before
    nested_vmx_vmexit(vcpu)
    assert kvm.phys.page_count(pfn) == before and not kvm.phys.folio_maybe_dma_pinned(pfn)
    assert to_vmx(vcpu).guest_mode is False and n.apic_access_page_map is None


@pytest.mark.parametrize("policy, hold", [("legacy", Hold.GET), ("series", Hold.PIN)])
def test_svm_vmrun_and_vmexit_map_the_vmcb12_and_log_it(policy, hold):
    host, kvm, vcpu, ram = vm(policy)
    dirty_gfns(kvm)
    assert nested_svm_vmrun(vcpu, 5 * PAGE).result == "entered"
    held = [f for f in kvm.journal.facts if f.kind is FactKind.VCPU_MAP]
    assert [f.extra["hold"] for f in held] == [hold.value]
    assert nested_svm_vmexit(vcpu, exit_code=0x7B) == 0
    assert kvm.phys.read(host.mm.pte_of(ram.start + 5 * PAGE)[1], "test") == 0x7B   # exit code in vmcb12
    assert dirty_gfns(kvm) == {5} and kvm.host_maps == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_svm_vmrun_of_a_vmcb12_kvm_cannot_map_injects_gp(policy):
    """``kvm_vcpu_map()`` -EINVAL (read-only slot: the vmcb12 map is writable under both; no slot) → #GP."""
    _, kvm, vcpu, _ = vm(policy)
    for gpa in (ROM_GPA, 1 << 30):
        r = nested_svm_vmrun(vcpu, gpa)
        assert (r.result, r.errno) == ("gp", errno.EINVAL)
    assert kvm.host_maps == []                                 # patch 21: nothing left to unmap


# ---- patch 34: the MSR bitmap is mapped read-only ----------------------------------------------------------

@pytest.mark.parametrize("policy, used", [("legacy", "intercept_all"), ("series", "merged")])
def test_msr_bitmap_in_a_read_only_slot(policy, used):
    _, kvm, vcpu, _ = vm(policy)
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(msr_bitmap=ROM_GPA))
    assert (r.result, r.msr_bitmap) == ("entered", used)
    assert to_nested(vcpu).use_msr_bitmaps02 == (policy == "series")
    assert kvm.journal.counters["nested_map_failed"] == (policy == "legacy")
    assert kvm.host_maps == []                                 # unmapped at once, clean
    nested_vmx_vmexit(vcpu)
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_msr_bitmap_in_writable_ram_is_merged_and_never_logged(policy):
    """In a writable slot both map it; v6.12 resolved it for write (breaking nothing here, but asking for
    a writable page), v6.13 without FOLL_WRITE: an untouched anonymous page maps the zero page."""
    host, kvm, vcpu, ram = vm(policy, touch=False)
    dirty_gfns(kvm)
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(msr_bitmap=7 * PAGE))
    assert r.msr_bitmap == "merged"
    pfn = host.mm.pte_of(ram.start + 7 * PAGE)[1]
    assert kvm.phys.is_zero_pfn(pfn) == (policy == "series")
    assert dirty_gfns(kvm) == set()


def test_a_readonly_map_that_took_the_write_path_would_fail():
    """The path asks for a read-only map: a v6.13 VM given v6.12's always-write resolution fails the
    read-only slot as v6.12 did (so the series' merge comes from ``kvm_vcpu_map_readonly()``)."""
    _, kvm, vcpu, _ = vm("series")
    kvm.policy.vcpu_map_write = lambda writable: True
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(msr_bitmap=ROM_GPA))
    assert r.msr_bitmap == "intercept_all"


# ---- patches 31 / 35 through the PI descriptor: a direct map of driver memory ------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pi_descriptor_in_driver_memory(policy):
    """v6.12 maps the driver's VM_PFNMAP page and, after the driver frees it, posts interrupts into it;
    v6.13 refuses the map (no pin possible), so L2 runs without posted interrupts."""
    from kvmsim.x86.nested import vmx_deliver_nested_posted_interrupt
    host = Host()
    kvm = Kvm(host, policy=policy, arch="x86")
    drv = host.add_driver("nic", 1, "driver_refcounted", free_rule="free")
    bar = host.mm.mmap(PAGE, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(1, 1 << 30, PAGE, bar.start)
    vcpu = kvm.create_vcpu()
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(posted_intr_desc_addr=1 << 30))
    assert r.result == "entered" and r.posted_intr == (policy == "legacy")
    drv.teardown(host.mm)
    assert vmx_deliver_nested_posted_interrupt(vcpu, 0x40) == (policy == "legacy")
    found = {v.invariant for v in check_all(kvm)}
    assert ("INV-6" in found) == (policy == "legacy") and (found == set()) == (policy == "series")


# ---- failures, eVMCS, guest mode ------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_vmcs12_pages_that_cannot_be_mapped(policy):
    _, kvm, vcpu, _ = vm(policy)
    nowhere = 1 << 30
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(apic_access_addr=nowhere, virtual_apic_page_addr=VAPIC * PAGE))
    assert (r.result, r.errno) == ("internal_error", errno.EINVAL)      # KVM_EXIT_INTERNAL_ERROR
    assert to_vmx(vcpu).guest_mode is False
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(virtual_apic_page_addr=nowhere))
    assert r.result == "vmentry_failed" and to_nested(vcpu).virtual_apic_page_addr02 == INVALID_GPA
    r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(posted_intr_desc_addr=nowhere))
    assert r.result == "entered" and not r.posted_intr                   # posted interrupts off
    nested_vmx_vmexit(vcpu)
    assert kvm.host_maps == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_evmcs_stays_mapped_until_vmxoff_and_is_unmapped_dirty(policy):
    _, kvm, vcpu, _ = vm(policy)
    dirty_gfns(kvm)
    assert nested_vmx_enter_non_root_mode(vcpu, Vmcs12(), evmcs=9 * PAGE).result == "entered"
    nested_vmx_vmexit(vcpu)
    assert to_nested(vcpu).hv_evmcs_map is not None and dirty_gfns(kvm) == set()
    assert nested_vmx_enter_non_root_mode(vcpu, Vmcs12(), evmcs=9 * PAGE).result == "entered"
    assert len(kvm.host_maps) == 1                             # the same eVMCS is not mapped twice
    nested_vmx_vmexit(vcpu, free=True)
    assert to_nested(vcpu).hv_evmcs_map is None and kvm.host_maps == [] and dirty_gfns(kvm) == {9}
    assert nested_vmx_enter_non_root_mode(vcpu, Vmcs12(), evmcs=1 << 30).result == "evmptrld_error"


def test_bad_input_is_a_clear_error():
    _, kvm, vcpu, _ = vm("series")
    with pytest.raises(ModelError, match="does not run L2"):
        nested_vmx_vmexit(vcpu)
    nested_vmx_enter_non_root_mode(vcpu, Vmcs12())
    with pytest.raises(ModelError, match="already runs L2"):
        nested_vmx_enter_non_root_mode(vcpu, Vmcs12())
    with pytest.raises(ModelError, match="does not run L2"):
        nested_svm_vmexit(vcpu)
    _, _, vcpu, _ = vm("series", arch="arm64")
    with pytest.raises(ModelError, match='arch = "x86"') as e:
        nested_vmx_enter_non_root_mode(vcpu, Vmcs12())
    assert e.value.errno == errno.EINVAL


# ---- bundled scenarios ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x86-nested-apic-access-dirty", "x86-nested-msr-bitmap-readonly",
                                  "x86-nested-svm-vmcb12-pin", "x86-nested-pi-desc-driver-pfnmap"])
def test_bundled_scenarios_match_and_differ(name):
    sc = load_scenario(LIBRARY / f"{name}.toml")
    runs = {p: run(sc, p) for p in ("legacy", "series")}
    assert all(r.expected_match for r in runs.values()), {p: r.as_dict() for p, r in runs.items()}
    steps = {p: [(s.res.result, s.res.value) for s in r.steps] for p, r in runs.items()}
    assert steps["legacy"] != steps["series"] or runs["legacy"].counters != runs["series"].counters


def test_scenario_ops_refuse_mixed_modes(tmp_path):
    from kvmsim.scenarios.loader import loads
    sc = loads('name = "t"\n[vm]\npolicy = "series"\n[[step]]\nop = "nested_vmenter"\nmode = "svm"\n'
               'expect.series = { result = "error", errno = "EINVAL" }\n')
    r = run(sc, "series")
    assert r.expected_match and "needs vmcb12" in str(r.as_dict())
