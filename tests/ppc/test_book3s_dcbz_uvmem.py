"""Book3S PR ``kvmppc_patch_dcbz()`` (arch/powerpc/kvm/book3s_pr.c) and the Ultravisor lookups of
``kvmppc_share_page()`` / ``kvmppc_send_page_to_uv()`` (book3s_hv_uvmem.c) under v6.12 and v6.13:
patch 73 "KVM: PPC: Remove extra get_page() to fix page refcount leak", patch 74 "KVM: PPC: Use
kvm_vcpu_map() to map guest memory to patch dcbz instructions", patch 78 "KVM: PPC: Explicitly
require struct page memory for Ultravisor sharing".
"""

from __future__ import annotations

import errno

import pytest

from kvmsim.check import check_all
from kvmsim.errors import ModelError
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.pfn import Hold
from kvmsim.mm.page import PfnClass
from kvmsim.mm.vma import VmaKind
from kvmsim.ppc.book3s_hv_uvmem import H_PARAMETER, H_SUCCESS, kvmppc_send_page_to_uv, kvmppc_share_page
from kvmsim.ppc.book3s_pr import INS_DCBZ, kvmppc_patch_dcbz, kvmppc_patch_dcbz_v612
from kvmsim.trace import FactKind

from tests.helpers import PAGE, make_vm

PATCHED = INS_DCBZ & 0xFFFFFFF7


def _facts(kvm, kind, caller=None):
    return [f for f in kvm.journal.facts if f.kind == kind and (caller is None or f.caller == caller)]


def _dcbz_vm(policy, pages=1, flags=0, **kw):
    host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-pr", pages=pages, flags=flags, **kw)
    for k in range(pages):
        host.mm.host_access(vma.start + k * PAGE, True, INS_DCBZ)
    return host, kvm, vma, vcpu


# ---- dcbz (73, 74) -------------------------------------------------------------------------------------

def test_the_policy_picks_the_dcbz_function():
    _, legacy, _, _ = make_vm("legacy", arch="ppc-book3s-pr")
    _, series, _, _ = make_vm("series", arch="ppc-book3s-pr")
    assert legacy.ops.arch_ops.kvmppc_patch_dcbz is kvmppc_patch_dcbz_v612
    assert series.ops.arch_ops.kvmppc_patch_dcbz is kvmppc_patch_dcbz


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_both_versions_patch_dcbz_and_leave_other_words_alone(policy):
    host, kvm, vma, vcpu = _dcbz_vm(policy, pages=2)
    host.mm.host_access(vma.start + PAGE, True, 0x60000000)          # a nop
    for k in range(2):
        kvm.ops.arch_ops.kvmppc_patch_dcbz(vcpu, k * PAGE)
    assert host.mm.host_access(vma.start, False) == PATCHED
    assert host.mm.host_access(vma.start + PAGE, False) == 0x60000000


def test_legacy_leaks_one_reference_per_patched_page():
    """v6.12: ``gfn_to_page()`` (+1), ``get_page()`` (+1), one ``put_page()``: each page keeps one
    reference KVM never drops; the checker reports one INV-1 leak per page."""
    host, kvm, vma, vcpu = _dcbz_vm("legacy", pages=3)
    pfns = [host.mm.pte_of(vma.start + k * PAGE)[1] for k in range(3)]
    counts = [host.phys.page_count(p) for p in pfns]
    for k in range(3):
        kvmppc_patch_dcbz_v612(vcpu, k * PAGE)
    assert [host.phys.page_count(p) for p in pfns] == [c + 1 for c in counts]
    assert kvm.host_refs == {(p, Hold.GET): 1 for p in pfns}
    leaks = [v for v in check_all(kvm) if v.invariant == "INV-1"]
    assert sorted(v.pfn for v in leaks) == sorted(pfns)


def test_series_pins_and_unpins_balanced():
    host, kvm, vma, vcpu = _dcbz_vm("series", pages=3)
    pfns = [host.mm.pte_of(vma.start + k * PAGE)[1] for k in range(3)]
    counts = [host.phys.page_count(p) for p in pfns]
    for k in range(3):
        kvmppc_patch_dcbz(vcpu, k * PAGE)
    assert [host.phys.page_count(p) for p in pfns] == counts
    assert len(_facts(kvm, FactKind.PIN, "kvm_vcpu_map")) == 3
    assert kvm.host_refs == {} and check_all(kvm) == []


@pytest.mark.parametrize("policy,dirty", [("legacy", False), ("series", True)])
def test_only_the_series_dirties_the_patched_page_and_its_gfn(policy, dirty):
    """Patch 74: ``kvm_vcpu_unmap()`` marks the gfn dirty and ``SetPageDirty()`` s the page; v6.12's
    ``kmap_atomic()`` write dirtied neither."""
    host, kvm, vma, vcpu = _dcbz_vm(policy, flags=int(KVM_MEM.LOG_DIRTY_PAGES))
    slot = kvm.gfn_to_memslot(0)
    kvm.ops.arch_ops.kvmppc_patch_dcbz(vcpu, 0)
    assert bool(slot.dirty_bitmap[0]) is dirty
    assert bool([f for f in _facts(kvm, FactKind.SET_DIRTY) if f.kvm]) is dirty


def test_series_refuses_pfnmap_memory_and_legacy_patches_through_its_reference():
    """kvm_vcpu_map() refuses remapped memory unless allow_unsafe_mappings (patch 74 uses it); v6.12's
    gfn_to_page() returned a VM_PFNMAP page it had grabbed with kvm_try_get_pfn() and patched it."""
    out = {}
    for policy in ("legacy", "series"):
        host, kvm, _, _ = make_vm(policy, arch="ppc-book3s-pr", size=0)
        drv = host.add_driver("gpu", 1, PfnClass.DRIVER_REFCOUNTED)
        vma = host.mm.mmap(PAGE, VmaKind.PFNMAP, driver=drv)
        kvm.set_user_memory_region(0, 0, PAGE, vma.start, 0)
        vcpu = kvm.create_vcpu()
        kvm.ops.arch_ops.kvmppc_patch_dcbz(vcpu, 0)
        out[policy] = kvm.journal.counters["host_map_access"], len(_facts(kvm, FactKind.GET, "kvmppc_patch_dcbz"))
    assert out["series"] == (0, 0)
    assert out["legacy"][1] == 1


# ---- uvmem (78) ------------------------------------------------------------------------------------------

def _uv_vm(policy, pfn_class):
    host, kvm, _, _ = make_vm(policy, arch="ppc-book3s-radix", size=0)
    drv = host.add_driver("dev", 1, pfn_class)
    vma = host.mm.mmap(PAGE, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(0, 0, PAGE, vma.start, 0)
    return host, kvm


@pytest.mark.parametrize("policy,share,page_in", [("legacy", H_SUCCESS, 0), ("series", H_PARAMETER, -errno.EFAULT)])
def test_pfnmap_memory_without_struct_page_is_refused_only_by_the_series(policy, share, page_in):
    """v6.12 ``gfn_to_pfn()`` hands ``uv_page_in()`` a pfn with no struct page; v6.13 ``gfn_to_page()`` is
    NULL: H_PARAMETER from the share, -EFAULT from the page-in."""
    host, kvm = _uv_vm(policy, PfnClass.NO_PAGE)
    assert kvmppc_share_page(kvm, 0) == share
    assert kvmppc_send_page_to_uv(kvm, 0) == page_in
    n = kvm.journal.counters["uv_page_in"]
    assert n == (2 if policy == "legacy" else 0)
    assert kvm.journal.counters["uv_page_in_no_struct_page"] == n
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_normal_memory_is_shared_and_released_clean_in_both(policy):
    host, kvm, vma, vcpu = make_vm(policy, arch="ppc-book3s-radix")
    host.mm.host_access(vma.start, True, 1)
    assert kvmppc_share_page(kvm, 0) == H_SUCCESS
    assert kvmppc_send_page_to_uv(kvm, 0) == 0
    assert kvm.journal.counters["kvmppc_gfn_shared"] == 1
    assert kvm.host_refs == {} and kvm.page_refs_out == {}
    assert len([f for f in _facts(kvm, FactKind.MARK_ACCESSED) if f.kvm]) == 2
    assert check_all(kvm) == []


def test_uvmem_ops_need_radix():
    from kvmsim.scenarios.env import Env
    from kvmsim.scenarios.ops_ppc_book3s import op_uv_share
    host, kvm, _, _ = make_vm("series", arch="ppc-book3s-pr")
    with pytest.raises(ModelError, match="ppc-book3s-radix"):
        next(op_uv_share(Env(host, kvm, {}), {"gpa": 0}))


# ---- the XIVE queue page (gfn_to_page, patch 85) ---------------------------------------------------------

@pytest.mark.parametrize("policy,ret", [("legacy", 0), ("series", -errno.EINVAL)])
def test_xive_queue_on_pfnmap_memory_is_taken_by_v612_refused_by_v613(policy, ret):
    """``kvmppc_xive_native_set_queue_config()``: v6.12 ``gfn_to_page()`` returns the driver's page it
    grabbed (INV-8); v6.13 returns NULL for remapped memory: -EINVAL, nothing held."""
    from kvmsim.ppc.book3s_xive_native import kvmppc_xive_native_cleanup_queue, kvmppc_xive_native_set_queue_config
    host, kvm = _uv_vm(policy, PfnClass.DRIVER_REFCOUNTED)
    assert kvmppc_xive_native_set_queue_config(kvm, 0, 0) == ret
    assert bool(kvm.arch.xive_queues) is (policy == "legacy")
    assert bool([v for v in check_all(kvm) if v.invariant == "INV-8"]) is (policy == "legacy")
    kvmppc_xive_native_cleanup_queue(kvm, 0)
    assert kvm.host_refs == {} and kvm.page_refs_out == {}


def test_xive_queue_page_is_held_until_the_queue_is_reset():
    from kvmsim.ppc.book3s_xive_native import kvmppc_xive_native_cleanup_queue, kvmppc_xive_native_set_queue_config
    host, kvm, vma, vcpu = make_vm("series", arch="ppc-book3s-hv")
    host.mm.host_access(vma.start, True, 1)
    pfn = host.mm.pte_of(vma.start)[1]
    n = host.phys.page_count(pfn)
    assert kvmppc_xive_native_set_queue_config(kvm, 0, 0) == 0
    assert host.phys.page_count(pfn) == n + 1 and check_all(kvm) == []
    assert kvmppc_xive_native_set_queue_config(kvm, 0, 0) == 0      # reconfigured: the old page is put first
    assert host.phys.page_count(pfn) == n + 1
    kvmppc_xive_native_cleanup_queue(kvm, 0)
    assert host.phys.page_count(pfn) == n and kvm.host_refs == {}
