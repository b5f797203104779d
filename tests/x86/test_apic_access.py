"""The VMX APIC-access page (kvmsim.x86.vmx) under v6.12 and v6.13.

Kernel lines checked: v6.12 ``kvm_alloc_apic_access_page()``'s ``gfn_to_page()`` + ``put_page()``
(removed by patch 36 "KVM: x86: Don't fault-in APIC access page during initial allocation"), and
``vmx_set_apic_access_page_addr()``'s ``kvm_release_pfn_clean(pfn)`` after ``read_unlock()`` (moved before
it, as ``kvm_release_page_clean(refcounted_page)``, by patch 50 "KVM: VMX: Hold mmu_lock until page is
released when updating APIC access page" and patch 51 "KVM: VMX: Use __kvm_faultin_page() to get APIC
access page/pfn"); x86 ``kvm_unmap_gfn_range()`` requesting KVM_REQ_APIC_PAGE_RELOAD.
"""

from __future__ import annotations

import dataclasses
import errno
import pathlib

import pytest

from kvmsim.check import check_all
from kvmsim.errors import ModelError
from kvmsim.explore import SCENARIOS, Mutations, explore
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.mm.reclaim import migrate_page
from kvmsim.mm.vma import VmaKind
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.runner import run
from kvmsim.sched import Steps, kpath
from kvmsim.trace import FactKind
from kvmsim.x86.nested import Vmcs12, nested_vmx_enter_non_root_mode, nested_vmx_vmexit
from kvmsim.x86.vmx import (APIC_ACCESS_GFN, APIC_ACCESS_PAGE_PRIVATE_MEMSLOT, APIC_DEFAULT_PHYS_BASE, KvmReq,
                            kvm_alloc_apic_access_page, kvm_apic_access, kvm_vcpu_reload_apic_access_page, to_vmx,
                            vmx_set_apic_access_page_addr)

PAGE = 4096
LIBRARY = pathlib.Path(__file__).resolve().parents[2] / "src" / "kvmsim" / "scenarios" / "library"
POLICIES = ("legacy", "series")


def vm(policy: str):
    host = Host()
    kvm = Kvm(host, policy=policy, arch="x86")
    ram = host.mm.mmap(16 * PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, 16 * PAGE, ram.start)
    return host, kvm, kvm.create_vcpu()


def apic_pte(host, kvm) -> int:
    return host.mm.pte_of(kvm_apic_access(kvm).hva)[1]


def marks(kvm) -> list:
    """The A/D marks ``vmx_set_apic_access_page_addr()`` made, each with whether mmu_lock was held."""
    return [f for f in kvm.journal.facts if f.caller == "vmx_set_apic_access_page_addr"
            and f.kind in (FactKind.MARK_ACCESSED, FactKind.SET_DIRTY)]


@kpath
def migrate_thread(host, kvm, out: dict) -> Steps:
    try:
        out["pfn"] = migrate_page(host.mm, kvm_apic_access(kvm).hva)
    except ModelError as e:
        out["errno"] = e.errno
    yield "migrate"


# ---- patch 36: the page is faulted in at allocation only in v6.12 -----------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_kvm_alloc_apic_access_page_faults_in_only_in_legacy(policy):
    host, kvm, vcpu = vm(policy)
    assert kvm_alloc_apic_access_page(kvm) == 0
    slot = kvm.memslots[0].by_id[APIC_ACCESS_PAGE_PRIVATE_MEMSLOT]
    assert (slot.base_gfn, slot.npages) == (APIC_DEFAULT_PHYS_BASE >> 12, 1)
    present = apic_pte(host, kvm) >= 0
    assert present == (policy == "legacy")
    c = kvm.journal.counters
    assert (c["get_page:gfn_to_page"], c["put_page:kvm_alloc_apic_access_page"]) == ((1, 1) if present else (0, 0))
    if present:                                               # put_page() only: no reference kept, no marks
        assert kvm.phys.page_count(apic_pte(host, kvm)) == 1 and kvm.host_refs == {}
    # either way the first reload finds (or makes) the page and points vmcs01 at it
    assert kvm_vcpu_reload_apic_access_page(vcpu).result == "written"
    assert to_vmx(vcpu).apic_access_addr == apic_pte(host, kvm) >= 0
    assert kvm.journal.counters["host_page_fault"] == 1      # one fault-in, at allocation or at the reload


def test_alloc_prefault_is_the_resolved_hook():
    """A v6.12 VM without the v6.12 prefault allocates nothing: the fault-in is ``kvm.ops``'s, not the path's."""
    host, kvm, _ = vm("legacy")
    assert vm("series")[1].ops.arch_ops.apic_access_page_prefault is None
    kvm.ops = dataclasses.replace(kvm.ops, arch_ops=dataclasses.replace(kvm.ops.arch_ops, apic_access_page_prefault=None))
    kvm_alloc_apic_access_page(kvm)
    assert apic_pte(host, kvm) < 0


@pytest.mark.parametrize("policy", POLICIES)
def test_alloc_is_idempotent_and_the_slot_is_internal(policy):
    host, kvm, _ = vm(policy)
    kvm_alloc_apic_access_page(kvm)
    hva = kvm_apic_access(kvm).hva
    kvm_alloc_apic_access_page(kvm)
    assert kvm_apic_access(kvm).hva == hva and kvm.journal.counters["memslot_create"] == 2
    with pytest.raises(ModelError) as e:                      # userspace cannot name the internal id
        kvm.set_user_memory_region(APIC_ACCESS_PAGE_PRIVATE_MEMSLOT, 1 << 30, PAGE, host.mm.mmap(PAGE, VmaKind.ANON).start)
    assert e.value.errno == errno.EINVAL


def test_alloc_over_a_userspace_slot_is_eexist():
    host, kvm, _ = vm("series")
    v = host.mm.mmap(PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(3, APIC_DEFAULT_PHYS_BASE, PAGE, v.start)
    with pytest.raises(ModelError) as e:
        kvm_alloc_apic_access_page(kvm)
    assert e.value.errno == errno.EEXIST


def test_apic_access_ops_need_x86():
    host = Host()
    kvm = Kvm(host, policy="series", arch="arm64")
    with pytest.raises(ModelError, match='arch = "x86"'):
        kvm_alloc_apic_access_page(kvm)


# ---- patch 50: the release happens under mmu_lock only in v6.13 -------------------------------------------

@pytest.mark.parametrize("policy, locked", [("legacy", False), ("series", True)])
def test_reload_releases_before_or_after_read_unlock(policy, locked):
    host, kvm, vcpu = vm(policy)
    kvm_alloc_apic_access_page(kvm)
    kvm_vcpu_reload_apic_access_page(vcpu)
    m = marks(kvm)
    assert [(f.kind, f.locked, f.fault_release) for f in m] == [(FactKind.MARK_ACCESSED, locked, True)]
    assert m[0].pfn == apic_pte(host, kvm)
    assert kvm.host_refs == {} and kvm.phys.page_count(m[0].pfn) == 1   # not pinned: no reference kept
    assert [v.invariant for v in check_all(kvm)] == ([] if locked else ["INV-3"])


@pytest.mark.parametrize("policy", POLICIES)
def test_a_migration_before_the_lock_retries_and_releases_on_that_path_too(policy):
    """The invalidation bumps mmu_invalidate_seq after the sample: the retry check re-raises
    KVM_REQ_APIC_PAGE_RELOAD and the page is released on the retry path, then the reload loop writes the
    new pfn."""
    host, kvm, vcpu = vm(policy)
    kvm_alloc_apic_access_page(kvm)
    kvm_vcpu_reload_apic_access_page(vcpu)
    old = apic_pte(host, kvm)
    out: dict = {}
    res = kvm.sched.run_interleaved(
        {"vcpu": vmx_set_apic_access_page_addr.steps(vcpu), "host": migrate_thread.steps(host, kvm, out)},
        ["vcpu", "host"])
    assert res["vcpu"].result == "retry" and out["pfn"] != old
    assert KvmReq.KVM_REQ_APIC_PAGE_RELOAD in to_vmx(vcpu).requests
    retry_mark = marks(kvm)[-1]
    assert retry_mark.locked == (policy == "series")
    assert kvm_vcpu_reload_apic_access_page(vcpu, force=False).result == "written"
    assert to_vmx(vcpu).apic_access_addr == out["pfn"] == apic_pte(host, kvm)


@pytest.mark.parametrize("policy, migrated", [("legacy", False), ("series", True)])
def test_a_migration_right_after_read_unlock(policy, migrated):
    """v6.12 still holds its reference after ``read_unlock()``: the migration fails with -EAGAIN.  v6.13
    released it under the lock: the page moves and the invalidation requests a reload."""
    host, kvm, vcpu = vm(policy)
    kvm_alloc_apic_access_page(kvm)
    kvm_vcpu_reload_apic_access_page(vcpu)
    out: dict = {}
    res = kvm.sched.run_interleaved(
        {"vcpu": vmx_set_apic_access_page_addr.steps(vcpu), "host": migrate_thread.steps(host, kvm, out)},
        ["vcpu"] * 5 + ["host"])
    assert res["vcpu"].result == "written"
    assert ("pfn" in out) == migrated and out.get("errno") == (None if migrated else errno.EAGAIN)
    assert (KvmReq.KVM_REQ_APIC_PAGE_RELOAD in to_vmx(vcpu).requests) == migrated


def test_release_placement_is_the_resolved_hook():
    """The order comes from ``kvm.ops``: v6.12's release placed under the lock is clean.  v6.13's release
    needs v6.13's faultin (patch 51): on a v6.12 VM there is no refcounted page, so it WARNs and keeps the
    reference."""
    from kvmsim.x86.vmx import apic_access_release_v612_unlocked
    host, kvm, vcpu = vm("legacy")
    kvm.ops = dataclasses.replace(kvm.ops, arch_ops=dataclasses.replace(
        kvm.ops.arch_ops, apic_access_release_locked=apic_access_release_v612_unlocked, apic_access_release_unlocked=None))
    kvm_alloc_apic_access_page(kvm)
    kvm_vcpu_reload_apic_access_page(vcpu)
    assert [f.locked for f in marks(kvm)] == [True] and check_all(kvm) == []
    series = vm("series")[1].ops
    host, kvm, vcpu = vm("legacy")
    kvm.ops = dataclasses.replace(kvm.ops, arch_ops=dataclasses.replace(
        kvm.ops.arch_ops, apic_access_release_locked=series.arch_ops.apic_access_release_locked,
        apic_access_release_unlocked=series.arch_ops.apic_access_release_unlocked))
    kvm_alloc_apic_access_page(kvm)
    kvm_vcpu_reload_apic_access_page(vcpu)
    assert marks(kvm) == [] and kvm.journal.counters["WARN_ON:vmx_set_apic_access_page_addr"] == 1
    assert kvm.phys.page_count(apic_pte(host, kvm)) == 2       # the reference is never dropped


@pytest.mark.parametrize("policy", POLICIES)
def test_reload_in_guest_mode_is_deferred_to_the_nested_vmexit(policy):
    host, kvm, vcpu = vm(policy)
    kvm_alloc_apic_access_page(kvm)
    nested_vmx_enter_non_root_mode(vcpu, Vmcs12())
    assert kvm_vcpu_reload_apic_access_page(vcpu).result == "deferred"
    assert to_vmx(vcpu).apic_access_addr is None
    nested_vmx_vmexit(vcpu)
    assert kvm_vcpu_reload_apic_access_page(vcpu, force=False).result == "written"


# ---- explore and the bundled scenarios -----------------------------------------------------------------------

def test_explore_finds_inv3_under_legacy_only():
    sc = SCENARIOS["apic-access-reload-vs-migrate"]
    assert sc.arch == "x86"
    legacy = explore(sc, "legacy", Mutations(), bound=2)
    assert legacy.violating is not None and legacy.violating.violation.invariant == "INV-3"
    assert "vmx_set_apic_access_page_addr" in legacy.violating.violation.detail
    series = explore(sc, "series", Mutations(), bound=2)
    assert series.violating is None and series.explored >= 3


@pytest.mark.parametrize("name", ["x86-apic-access-alloc-lazy", "x86-apic-access-reload-vs-migrate"])
def test_bundled_scenarios_match_and_differ(name):
    sc = load_scenario(LIBRARY / f"{name}.toml")
    runs = {p: run(sc, p) for p in POLICIES}
    assert all(r.expected_match for r in runs.values()), {p: r.mismatches for p, r in runs.items()}
    assert runs["legacy"].verdict == "violations" and runs["series"].verdict == "clean"
    assert [(s.res.result, s.res.value) for s in runs["legacy"].steps] != \
        [(s.res.result, s.res.value) for s in runs["series"].steps]
