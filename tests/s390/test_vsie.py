"""s390 vSIE pinning (arch/s390/kvm/vsie.c) under v6.12 and v6.13, and the gmap stand-in for guest accesses.

Each test names the kernel line it checks.  v6.12 lines: ``pin_guest_page()`` = ``gfn_to_page()``
with ``is_error_page()`` and ``unpin_guest_page()`` = ``kvm_release_pfn_dirty(hpa >> PAGE_SHIFT)``;
v6.13 lines: ``if (!page) return -EINVAL`` (patch 1 "KVM: Drop KVM_ERR_PTR_BAD_PAGE and instead
return NULL to indicate an error"), ``kvm_release_page_dirty(pfn_to_page(hpa >> PAGE_SHIFT))``
(patch 80 "KVM: s390: Use kvm_release_page_dirty() to unpin "struct page" memory"), and NULL from
``gfn_to_page()`` for any remapped pfn (patch 85 "KVM: Don't grab reference on VM_MIXEDMAP pfns that
have a "struct page"").
"""

from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from kvmsim.check import check_all
from kvmsim.cli import cli
from kvmsim.errors import UsageError
from kvmsim.kvm.arch import make_arch
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.pfn import Hold
from kvmsim.mm.host import Host
from kvmsim.mm.page import PG
from kvmsim.mm.vma import VmaKind
from kvmsim.s390 import S390Gmap
from kvmsim.s390.vsie import (Icpt, Pgm, ScbFields, VsieOutcome, kvm_s390_handle_vsie, unpin_guest_page_release_v612,
                              unpin_guest_page_release_v613, vsie_enter, vsie_exit)
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.runner import run
from kvmsim.trace import Src
from kvmsim.uapi import Exit

PAGE = 4096
RAM_GPA = 0
DEV_GPA = 1 << 30
LOG = int(KVM_MEM.LOG_DIRTY_PAGES)


def s390_vm(policy: str, pfn_class: str | None = "driver_refcounted", *, ram_pages: int = 16, dev_pages: int = 4,
            kind: VmaKind = VmaKind.PFNMAP, **drv_kw):
    """An s390 VM with RAM (anonymous, slot 0 at gpa 0) and, if ``pfn_class``, a driver's VM_PFNMAP|VM_IO
    memory (or ``kind`` MIXEDMAP: VM_MIXEDMAP|VM_IO with special PTEs) at slot 1, 1 GiB, both
    dirty-logged, and one vCPU."""
    host = Host()
    kvm = Kvm(host, policy=policy, arch="s390")
    ram = host.mm.mmap(ram_pages * PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(0, RAM_GPA, ram_pages * PAGE, ram.start, LOG)
    drv = None
    if pfn_class is not None:
        drv = host.add_driver("gpu", dev_pages, pfn_class, **drv_kw)
        bar = host.mm.mmap(dev_pages * PAGE, kind, driver=drv, **({"io": True} if kind == VmaKind.MIXEDMAP else {}))
        kvm.set_user_memory_region(1, DEV_GPA, dev_pages * PAGE, bar.start, LOG)
    return host, kvm, kvm.create_vcpu(), drv


def vsie(vcpu, scb: int, **blocks):
    return kvm_s390_handle_vsie(vcpu, scb, ScbFields(**blocks))


def kvm_facts(kvm, kind, caller=None):
    return [f for f in kvm.journal.facts if f.kvm and f.kind == kind and (caller is None or f.caller == caller)]


def dirty_gfns(kvm, slot_id: int) -> list[int]:
    s = kvm.memslots[0].by_id[slot_id]
    return [s.base_gfn + int(i) for i in s.dirty_bitmap.nonzero()[0]]


def invariants(kvm) -> set[str]:
    return {v.invariant for v in check_all(kvm)}


# ---- the arch ---------------------------------------------------------------------------------------------

def test_s390_is_an_arch_with_no_kvm_leaves_and_listed_in_the_error():
    host, kvm, _, _ = s390_vm("series", None)
    assert isinstance(kvm.arch, S390Gmap) and kvm.ops.vsie_unpin_release is unpin_guest_page_release_v613
    assert list(kvm.arch.leaves()) == []
    with pytest.raises(UsageError, match="s390"):
        make_arch(kvm, "sparc")


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_guest_access_goes_through_the_host_page_tables_without_touching_struct_pages(policy):
    """gmap_fault() → fixup_user_fault(): no __kvm_faultin_pfn(), no reference, no mark, in either version;
    the gfn reaches the dirty log (kvm_arch_sync_dirty_log()'s effect)."""
    host, kvm, vcpu, _ = s390_vm(policy, None)
    before = host.journal.counters["host_page_fault"]
    assert vcpu.write(0x3000, 9).exit == Exit.OK
    assert vcpu.read(0x3000).value == 9
    assert host.journal.counters["host_page_fault"] == before + 1
    assert host.journal.counters["hva_to_pfn"] == 0
    assert [f for f in host.journal.facts if f.kvm] == []
    assert dirty_gfns(kvm, 0) == [3]
    assert vcpu.read(0x100000).exit == Exit.EFAULT          # no memslot: __gmap_translate() -EFAULT


# ---- patch 85: the SCB in driver memory ------------------------------------------------------------------

DRIVER_KINDS = pytest.mark.parametrize("kind", [VmaKind.PFNMAP, VmaKind.MIXEDMAP], ids=["pfnmap", "mixedmap-io"])


@DRIVER_KINDS
def test_legacy_pins_a_driver_scb_with_a_reference_it_does_not_own_and_dirties_it(kind):
    """v6.12: hva_to_pfn_remapped() → kvm_try_get_pfn() (+1, Src.REMAPPED), gfn_to_page() returns the
    guessed page, unpin: kvm_release_pfn_dirty() = SetPageDirty, mark accessed, put; mark_page_dirty()."""
    host, kvm, vcpu, drv = s390_vm("legacy", kind=kind)
    page = int(drv.pfns[0])
    ref = host.phys.page_count(page)
    r = vsie(vcpu, DEV_GPA)
    assert (r.outcome, r.code, r.errno) == (VsieOutcome.RAN, Icpt.INST, 0)
    [get] = kvm_facts(kvm, "get")
    assert (get.pfn, get.source) == (page, Src.REMAPPED)
    [dirty] = kvm_facts(kvm, "set_dirty")
    assert (dirty.pfn, dirty.caller, dirty.source) == (page, "kvm_release_pfn_dirty", Src.GUESS)
    assert [f.pfn for f in kvm_facts(kvm, "put", "kvm_release_pfn_dirty")] == [page]
    assert host.phys.page_count(page) == ref and host.phys.flags[page] & PG.dirty
    assert host.phys.read(page, "test") == Icpt.INST               # unshadow_scb() stored the intercept
    assert dirty_gfns(kvm, 1) == [DEV_GPA >> 12]
    assert {"INV-1", "INV-8"} <= invariants(kvm)


@DRIVER_KINDS
def test_series_refuses_a_driver_scb_pin_scb_injects_an_addressing_exception(kind):
    """v6.13: gfn_to_page() is NULL for the remapped pfn → pin_guest_page() -EINVAL → pin_scb():
    kvm_s390_inject_program_int(vcpu, PGM_ADDRESSING); nothing pinned, marked, stored or logged."""
    host, kvm, vcpu, drv = s390_vm("series", kind=kind)
    page = int(drv.pfns[0])
    ref = host.phys.page_count(page)
    r = vsie(vcpu, DEV_GPA)
    assert (r.outcome, r.code, r.errno) == (VsieOutcome.PROGRAM, Pgm.ADDRESSING, errno.EINVAL)
    [g2p] = kvm_facts(kvm, "gfn_to_page")
    assert g2p.pfn is None and g2p.extra["remapped"] and g2p.extra["user"] == "pin_scb"
    assert not any(kvm_facts(kvm, k) for k in ("get", "put", "set_dirty", "mark_accessed"))
    assert host.phys.page_count(page) == ref and not host.phys.flags[page] & PG.dirty
    assert host.phys.read(page, "test") == 0
    assert dirty_gfns(kvm, 1) == []
    assert invariants(kvm) == set()
    assert kvm.arch.vsie_pages == {}                                # put_vsie_page() on out_put


@pytest.mark.parametrize("pfn_class,legacy_get_failed", [("nonrefcounted", True), ("no_page", False),
                                                          ("reserved", False)])
def test_remapped_scb_without_a_refcounted_page_fails_in_both_by_different_routes(pfn_class, legacy_get_failed):
    """v6.12: refcount 0 → get_page_unless_zero() fails → KVM_PFN_ERR_FAULT → KVM_ERR_PTR_BAD_PAGE; no
    struct page / PG_reserved → kvm_pfn_to_refcounted_page() NULL → KVM_ERR_PTR_BAD_PAGE.  v6.13: NULL.
    Both -EINVAL → PGM_ADDRESSING, and no reference anywhere."""
    for policy in ("legacy", "series"):
        host, kvm, vcpu, drv = s390_vm(policy, pfn_class)
        r = vsie(vcpu, DEV_GPA)
        assert (r.outcome, r.code, r.errno) == (VsieOutcome.PROGRAM, Pgm.ADDRESSING, errno.EINVAL)
        failed = [f for f in host.journal.facts if f.kind == "get_unless_zero_failed"]
        assert bool(failed) == (legacy_get_failed and policy == "legacy"), policy
        assert not kvm_facts(kvm, "get") and kvm.host_refs == {} and dirty_gfns(kvm, 1) == []


def test_a_gupd_reserved_scb_leaks_in_legacy_and_is_pinned_by_the_series():
    """VM_MIXEDMAP (no VM_IO), PG_reserved pages with normal PTEs: GUP takes a reference in both.  v6.12
    gfn_to_page(): kvm_pfn_to_refcounted_page() NULL → KVM_ERR_PTR_BAD_PAGE, the reference leaks;
    v6.13 (patch 75): refcounted_page, pinned, released by kvm_release_page_dirty() without a mark."""
    for policy in ("legacy", "series"):
        host = Host()
        kvm = Kvm(host, policy=policy, arch="s390")
        drv = host.add_driver("fw", 1, "reserved", mixed=True)
        vma = host.mm.mmap(PAGE, VmaKind.MIXEDMAP, driver=drv)
        kvm.set_user_memory_region(1, DEV_GPA, PAGE, vma.start, LOG)
        r = vsie(kvm.create_vcpu(), DEV_GPA)
        page = int(drv.pfns[0])
        assert [f.source for f in kvm_facts(kvm, "get")] == [Src.HELD]
        if policy == "legacy":
            assert (r.outcome, r.code, r.errno) == (VsieOutcome.PROGRAM, Pgm.ADDRESSING, errno.EINVAL)
            assert kvm.host_refs == {(page, Hold.GET): 1} and kvm_facts(kvm, "put") == []
            assert invariants(kvm) == {"INV-1"} and dirty_gfns(kvm, 1) == []
        else:
            assert r.outcome == VsieOutcome.RAN and kvm.host_refs == {}
            assert [f.caller for f in kvm_facts(kvm, "put")] == ["kvm_release_page_dirty"]
            assert kvm_facts(kvm, "set_dirty") == [] and kvm_facts(kvm, "mark_accessed") == []
            assert invariants(kvm) == set() and dirty_gfns(kvm, 1) == [DEV_GPA >> 12]


# ---- patch 85: a satellite block in driver memory ----------------------------------------------------------

@pytest.mark.parametrize("block,gpa,reason", [("sca", DEV_GPA, 0x0034), ("itdba", DEV_GPA, 0x0080),
                                              ("gvrd", DEV_GPA, 0x1310), ("riccbd", DEV_GPA, 0x0043),
                                              ("sdnxo", DEV_GPA | 6, 0x10B0)])
def test_a_satellite_in_driver_memory_is_a_validity_intercept_under_series_only(block, gpa, reason):
    """pin_blocks(): ``rc = pin_guest_page(); if (rc) rc = set_validity_icpt(scb_s, reason)``; the
    failure unwinds through unshadow_scb() (ICPT_VALIDITY into guest 2's SCB) and unpin_scb()."""
    legacy = s390_vm("legacy")
    r = vsie(legacy[2], 0x2000, **{block: gpa})
    assert (r.outcome, r.errno) == (VsieOutcome.RAN, 0)
    assert dirty_gfns(legacy[1], 0) == [2] and dirty_gfns(legacy[1], 1) == [DEV_GPA >> 12]
    host, kvm, vcpu, drv = s390_vm("series")
    r = vsie(vcpu, 0x2000, **{block: gpa})
    assert (r.outcome, r.code, r.errno) == (VsieOutcome.VALIDITY, reason, errno.EINVAL)
    assert vcpu.read(0x2000).value == Icpt.VALIDITY
    assert [f.pfn for f in kvm_facts(kvm, "set_dirty", "kvm_release_page_dirty")] == \
        [f.pfn for f in kvm_facts(kvm, "gfn_to_page") if f.pfn is not None]       # the SCB, unpinned
    assert dirty_gfns(kvm, 0) == [2] and dirty_gfns(kvm, 1) == []
    assert kvm.host_refs == {} and invariants(kvm) == set()


def test_blocks_pinned_before_the_failing_one_are_unpinned():
    """``unpin: unpin_blocks(vcpu, vsie_page)``: an SCA in RAM was pinned, the GVRD in driver memory fails."""
    host, kvm, vcpu, _ = s390_vm("series")
    r = vsie(vcpu, 0x2000, sca=0x3000, gvrd=DEV_GPA)
    assert (r.outcome, r.code) == (VsieOutcome.VALIDITY, 0x1310)
    assert sorted(dirty_gfns(kvm, 0)) == [2, 3]
    assert kvm.host_refs == {} and kvm.page_refs_out == {}


# ---- patch 80: how the unpin finds the page ------------------------------------------------------------------

@pytest.mark.parametrize("policy,caller,source", [("legacy", "kvm_release_pfn_dirty", Src.GUESS),
                                                  ("pre-5.13", "kvm_release_pfn_dirty", Src.GUESS),
                                                  ("series", "kvm_release_page_dirty", Src.HELD)])
def test_unpin_release_path_is_the_policys_and_the_effect_the_same(policy, caller, source):
    """v6.12 ``kvm_release_pfn_dirty(hpa >> PAGE_SHIFT)`` re-guesses the page; v6.13
    ``kvm_release_page_dirty(pfn_to_page(...))`` releases the one it holds.  Six pages (SCB + five
    satellites), each dirtied, aged, put and logged the same way in both; only the path differs."""
    host, kvm, vcpu, _ = s390_vm(policy, None)
    want = unpin_guest_page_release_v613 if policy == "series" else unpin_guest_page_release_v612
    assert kvm.ops.vsie_unpin_release is want
    r = vsie(vcpu, 0x2000, sca=0x3000, itdba=0x4000, gvrd=0x5000, riccbd=0x6000, sdnxo=0x7006)
    assert r.outcome == VsieOutcome.RAN
    pinned = [f.pfn for f in kvm_facts(kvm, "gfn_to_page")]
    assert [f.extra["user"] for f in kvm_facts(kvm, "gfn_to_page")] == \
        ["pin_scb"] + [f"pin_blocks({b})" for b in ("sca", "itdba", "gvrd", "riccbd", "sdnx")]
    for kind in ("set_dirty", "mark_accessed", "put"):
        facts = kvm_facts(kvm, kind)
        assert {f.caller for f in facts} == {caller} and {f.source for f in facts} == {source}, kind
        assert sorted(f.pfn for f in facts) == sorted(pinned), kind
    assert all(host.phys.flags[p] & PG.dirty and host.phys.page_count(p) == 1 for p in pinned)
    assert sorted(dirty_gfns(kvm, 0)) == [2, 3, 4, 5, 6, 7]
    assert kvm.host_refs == {} and kvm.page_refs_out == {} and invariants(kvm) == set()


def test_unpin_marks_the_running_vcpus_dirty_ring():
    """mark_page_dirty() → mark_page_dirty_in_slot() with kvm_get_running_vcpu(): the ring of the vCPU in SIE."""
    host = Host()
    kvm = Kvm(host, policy="series", arch="s390")
    from kvmsim.kvm.dirty import enable_dirty_ring
    enable_dirty_ring(kvm, 1 << 16)
    ram = host.mm.mmap(8 * PAGE, VmaKind.ANON)
    kvm.set_user_memory_region(0, 0, 8 * PAGE, ram.start, LOG)
    v0, v1 = kvm.create_vcpu(), kvm.create_vcpu()
    assert vsie(v1, 0x2000).outcome == VsieOutcome.RAN
    assert v0.dirty_ring == [] and v1.dirty_ring == [(0, 2)]


# ---- the checks before and around the pins (the same in both versions) ----------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("blocks,outcome,code", [
    ({"sca": 0x1000}, VsieOutcome.VALIDITY, 0x0038),          # gpa < 2 * PAGE_SIZE
    ({"sca": 0x3C00}, VsieOutcome.VALIDITY, 0x003B),          # a bsca_block (0x440 bytes) crossing a page
    ({"itdba": 0x1000}, VsieOutcome.VALIDITY, 0x0080),
    ({"sdnxo": 0x3000 | 5}, VsieOutcome.VALIDITY, 0x10B1),    # size class below 6
    ({"sdnxo": 0x3040 | 7}, VsieOutcome.VALIDITY, 0x10B2),    # origin not aligned to 1 << sdnxc
    ({"sdnxo": 0}, VsieOutcome.VALIDITY, 0x10B0),             # enabled without an origin
    ({"gvrd": 0}, VsieOutcome.RAN, Icpt.INST),                # an origin of 0: the block is not used
])
def test_pin_blocks_checks(policy, blocks, outcome, code):
    host, kvm, vcpu, _ = s390_vm(policy, None)
    r = vsie(vcpu, 0x2000, **blocks)
    assert (r.outcome, r.code) == (outcome, code)
    assert len(kvm_facts(kvm, "gfn_to_page")) == 1                  # only the SCB was pinned
    assert kvm.host_refs == {}


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_unaligned_scb_is_a_specification_exception_before_any_pin(policy):
    """``if (unlikely(scb_addr & 0x1ffUL)) return kvm_s390_inject_program_int(vcpu, PGM_SPECIFICATION)``."""
    host, kvm, vcpu, _ = s390_vm(policy, None)
    r = vsie(vcpu, 0x2100)
    assert (r.outcome, r.code, r.errno) == (VsieOutcome.PROGRAM, Pgm.SPECIFICATION, 0)
    assert kvm_facts(kvm, "gfn_to_page") == []


def test_an_scb_in_use_by_another_vcpu_is_left_alone():
    """get_vsie_page() NULL: "double use of sie control block - simply do nothing"."""
    host, kvm, vcpu, _ = s390_vm("series", None)
    other = kvm.create_vcpu()
    r, page = vsie_enter(vcpu, 0x2000, ScbFields())
    assert r.outcome == VsieOutcome.RAN
    assert vsie(other, 0x2000).outcome == VsieOutcome.BUSY
    assert len(kvm_facts(kvm, "gfn_to_page")) == 1
    vsie_exit(vcpu, page)
    assert vsie(other, 0x2000).outcome == VsieOutcome.RAN and kvm.host_refs == {}


# ---- the race: a driver frees its memory while guest 3 runs ------------------------------------------------------

def test_driver_teardown_while_guest_3_runs_is_a_use_after_free_only_in_legacy():
    """The pin is not tracked by the mmu_notifier: v6.12's unshadow_scb() store and unpin_guest_page()
    hit the page the driver freed; v6.13 never pinned it."""
    for policy, bad in (("legacy", {"INV-1", "INV-3", "INV-5", "INV-8"}), ("series", set())):
        host, kvm, vcpu, drv = s390_vm(policy, free_rule="free")
        r, page = vsie_enter(vcpu, DEV_GPA, ScbFields())
        drv.teardown(host.mm)
        if page is not None:
            vsie_exit(vcpu, page)
        assert r.outcome == (VsieOutcome.RAN if policy == "legacy" else VsieOutcome.PROGRAM)
        uaf = [f for f in host.journal.facts if f.kind == "uaf"]
        assert {f.caller for f in uaf} == ({"unshadow_scb", "kvm_release_pfn_dirty"} if bad else set())
        assert invariants(kvm) == bad, policy


# ---- scenarios and the CLI ------------------------------------------------------------------------------------------

S390_SCENARIOS = ["s390-vsie-scb-driver-pfnmap", "s390-vsie-sca-driver-pfnmap", "s390-vsie-driver-teardown",
                  "s390-vsie-unpin-release", "s390-vsie-scb-reserved-mixedmap"]


@pytest.mark.parametrize("name", S390_SCENARIOS)
def test_bundled_scenario_differs_between_the_policies(name):
    sc = load_scenario(name)
    assert "patch 8" in sc.source
    legacy, series = run(sc, "legacy"), run(sc, "series")
    assert legacy.expected_match and series.expected_match, legacy.mismatches + series.mismatches
    assert [s.facts for s in legacy.steps] != [s.facts for s in series.steps]
    callers = {f.caller for s in legacy.steps + series.steps for f in s.facts}
    assert callers & {"kvm_release_pfn_dirty", "kvm_release_page_dirty", "gfn_to_page"}


def test_run_trace_shows_the_vsie_functions():
    r = CliRunner().invoke(cli, ["run", "s390-vsie-sca-driver-pfnmap", "--trace"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for name in ("user=pin_scb", "user=pin_blocks(sca)", "kvm_release_pfn_dirty", "kvm_release_page_dirty",
                 "validity EINVAL value=0x34"):
        assert name in r.output, name


def test_vsie_ops_on_another_arch_are_a_clear_error():
    from kvmsim.scenarios.loader import loads
    sc = loads('name = "x"\n[vm]\npolicy = "series"\narch = "x86"\n[[step]]\nop = "vsie_run"\nscb = 0x2000\n')
    rr = run(sc, "series")
    assert rr.steps[0].res.result == "error" and 'arch = "s390"' in rr.steps[0].res.value
