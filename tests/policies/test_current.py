"""The ``current`` protocol (upstream v6.18): each difference from v6.13 (``series``), on the model and in
the bundled scenarios.  Every assertion on ``current`` here fails under ``series``."""

from __future__ import annotations

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm import dirty
from kvmsim.kvm.gmem import GuestMemfd, kvm_gmem_bind
from kvmsim.policies import POLICY_NAMES, get_policy, resolve, shipped_policies
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.loader import POLICIES as SCENARIO_POLICIES
from kvmsim.scenarios.runner import run
from kvmsim.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEM
from kvmsim.mm.vma import VM, VmaKind
from tests.helpers import make_vm

PAGE = 4096
MMAP, INIT_SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED


def test_current_is_a_shipped_policy_everywhere_a_policy_is_named():
    assert "current" in POLICY_NAMES and "current" in shipped_policies() and "current" in SCENARIO_POLICIES
    p = get_policy("current")
    assert p.name == "current" and "v6.18" in p.title
    assert resolve(p, "x86").dirty_ring_reset is dirty.kvm_dirty_ring_reset_v617
    assert resolve(get_policy("series"), "x86").dirty_ring_reset is dirty.kvm_dirty_ring_reset_v612
    assert resolve(p, "x86").mmu_613_other is True          # v6.18 includes v6.13's other MMU changes


# ---- dirty-ring reset (v6.17) --------------------------------------------------------------------------

def _ring_vm(policy, gfns=(0, 1), pages=128):
    _, kvm, _, vcpu = make_vm(policy, arch="x86", pages=pages, kind=VmaKind.ANON, page_size=None,
                              flags=int(KVM_MEM.LOG_DIRTY_PAGES), ring=4096)
    for g in gfns:
        assert vcpu.write(g * PAGE, 1).exit.value == "ok"
    assert len(dirty.kvm_dirty_ring_harvest(kvm, vcpu)) == len(gfns)
    return kvm, vcpu


def _refaults(kvm, vcpu, gfn) -> int:
    """Ring entries a new guest write to ``gfn`` produces (0: its SPTE was left writable)."""
    before = len(vcpu.dirty_ring)
    vcpu.write(gfn * PAGE, 2)
    return len(vcpu.dirty_ring) - before


@pytest.mark.parametrize("policy,cleared,rearmed", [("series", 2, True), ("current", 1, False)])
def test_a_signal_during_the_reset(policy, cleared, rearmed):
    """v6.17 stops at the pending signal and returns the count so far; the entry it consumed sat in the
    pending batch, so its gfn is not write-protected again (a later write is not logged)."""
    kvm, vcpu = _ring_vm(policy)
    flushes = kvm.journal.counters.get("tlb_flush", 0)
    assert dirty.kvm_reset_dirty_rings(kvm, signal_after=1) == cleared
    assert kvm.journal.counters.get("tlb_flush", 0) == flushes + 1        # one flush per call, both
    assert vcpu.dirty_ring_harvested == 2 - cleared
    assert (_refaults(kvm, vcpu, 0) == 1) is rearmed


@pytest.mark.parametrize("policy,cleared", [("series", 2), ("current", 0)])
def test_a_signal_pending_at_entry_resets_nothing_and_does_not_flush(policy, cleared):
    kvm, vcpu = _ring_vm(policy)
    flushes = kvm.journal.counters.get("tlb_flush", 0)
    assert dirty.kvm_reset_dirty_rings(kvm, signal_after=0) == cleared
    assert kvm.journal.counters.get("tlb_flush", 0) == flushes + (1 if cleared else 0)
    if not cleared:                            # nothing consumed: the next call resets both
        assert dirty.kvm_reset_dirty_rings(kvm) == 2
        assert _refaults(kvm, vcpu, 0) == 1


@pytest.mark.parametrize("policy,cleared", [("series", 3), ("current", 2)])
def test_the_reset_is_bounded_per_call(policy, cleared, monkeypatch):
    """INT_MAX entries per call (the model lowers the bound to 2 to reach it)."""
    monkeypatch.setattr(dirty, "INT_MAX", 2)
    kvm, vcpu = _ring_vm(policy, gfns=(0, 1, 2))
    assert dirty.kvm_reset_dirty_rings(kvm) == cleared
    assert vcpu.dirty_ring_harvested == 3 - cleared


@pytest.mark.parametrize("policy", ["series", "current"])
@pytest.mark.parametrize("gfns,batches", [((0, 1, 5), 1), ((5, 0), 1), ((0, 100), 2), ((0, 64), 2), ((64, 0), 2)])
def test_resets_are_coalesced_within_bits_per_long(policy, gfns, batches):
    kvm, vcpu = _ring_vm(policy, gfns=gfns)
    before = kvm.journal.counters.get("kvm_reset_dirty_gfn", 0)
    assert dirty.kvm_reset_dirty_rings(kvm) == len(gfns)
    assert kvm.journal.counters.get("kvm_reset_dirty_gfn", 0) - before == batches
    assert all(_refaults(kvm, vcpu, g) == 1 for g in gfns)      # every gfn write-protected again


# ---- guest_memfd mmap and gmem-only memslots (v6.18) ----------------------------------------------------

@pytest.mark.parametrize("private_mem,flags,series_ok,current_ok", [
    (False, MMAP, False, True), (False, MMAP | INIT_SHARED, False, True), (False, INIT_SHARED, False, True),
    (True, MMAP, False, True), (True, MMAP | INIT_SHARED, False, False), (False, 4, False, False),
    (False, 0, True, True)])
def test_create_guest_memfd_flags(private_mem, flags, series_ok, current_ok):
    for policy, ok in (("series", series_ok), ("current", current_ok)):
        _, kvm, _, _ = make_vm(policy, arch="x86", pages=0, has_private_mem=private_mem)
        if ok:
            assert GuestMemfd(kvm, 2 * PAGE, flags).flags == flags
        else:
            with pytest.raises(ModelError) as e:
                GuestMemfd(kvm, 2 * PAGE, flags)
            assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("policy,ok", [("series", False), ("current", True)])
def test_a_default_vm_takes_guest_memfd_memslots_in_v618(policy, ok):
    host, kvm, _, _ = make_vm(policy, arch="x86", pages=0, has_private_mem=False)
    vma = host.mm.mmap(2 * PAGE, "anon")
    gmem = GuestMemfd(kvm, 2 * PAGE, 0)
    if ok:
        kvm.set_user_memory_region(1, 0, 2 * PAGE, vma.start, int(KVM_MEM.GUEST_MEMFD), guest_memfd=gmem,
                                   guest_memfd_offset=0)
    else:
        with pytest.raises(ModelError) as e:
            kvm.set_user_memory_region(1, 0, 2 * PAGE, vma.start, int(KVM_MEM.GUEST_MEMFD), guest_memfd=gmem,
                                       guest_memfd_offset=0)
        assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("flags,from_gmem", [(MMAP | INIT_SHARED, True), (0, False)])
def test_shared_faults_of_a_gmem_only_slot_come_from_guest_memfd(flags, from_gmem):
    """v6.18 fault_from_gmem(): a slot bound to an mmap-able guest_memfd is gmem only; without MMAP the
    shared fault still GUPs userspace_addr."""
    host, kvm, _, _ = make_vm("current", arch="x86", pages=0, has_private_mem=False)
    vma = host.mm.mmap(2 * PAGE, "anon")
    gmem = GuestMemfd(kvm, 2 * PAGE, flags)
    kvm.set_user_memory_region(1, 0, 2 * PAGE, vma.start, int(KVM_MEM.GUEST_MEMFD), guest_memfd=gmem,
                               guest_memfd_offset=0)
    slot = kvm.memslots[0].by_id[1]
    assert slot.gmem_only is from_gmem
    vcpu = kvm.create_vcpu()
    assert vcpu.write(0, 7).exit.value == "ok"
    assert (kvm.journal.counters.get("kvm_gmem_get_pfn", 0) == 1) is from_gmem
    assert (int(gmem.pages[0]) >= 0) is from_gmem                   # the folio lives in the file's page cache
    assert (host.mm.host_access(vma.start, False) == 7) is not from_gmem


def test_kvm_gmem_bind_marks_gmem_only_from_the_file_flags():
    _, kvm, _, _ = make_vm("current", arch="x86", pages=0, has_private_mem=False)

    class Slot:
        id, npages, base_gfn, gmem_only = 3, 1, 0, False
    s = Slot()
    kvm_gmem_bind(kvm, s, GuestMemfd(kvm, PAGE, MMAP), 0)
    assert s.gmem_only is True


# ---- arm64 cacheable PFNMAP (v6.17) ---------------------------------------------------------------------

def _step_counters(name, policy):
    r = run(load_scenario(name), policy)
    assert r.expected_match, r.mismatches
    return r


@pytest.mark.parametrize("policy,noncacheable,cacheable", [("series", 1, 0), ("current", 0, 1)])
def test_cacheable_pfnmap_is_mapped_cacheable_with_fwb(policy, noncacheable, cacheable):
    r = _step_counters("current-arm64-cacheable-pfnmap", policy)
    gpu = r.steps[0].counters
    assert (gpu.get("s2_noncacheable", 0), gpu.get("s2_cacheable_pfnmap", 0)) == (noncacheable, cacheable)
    assert r.steps[1].counters.get("s2_noncacheable", 0) == 1           # the MMIO BAR stays Device


@pytest.mark.parametrize("policy,slot_errno,read", [("series", None, "ok"), ("current", "EINVAL", "efault")])
def test_cacheable_pfnmap_is_refused_without_fwb(policy, slot_errno, read):
    r = _step_counters("current-arm64-cacheable-pfnmap-refused", policy)
    assert r.steps[0].res.errno_name == slot_errno
    assert r.steps[3].res.result == read
    assert r.counters.get("kvm_get", 0) == r.counters.get("kvm_put", 0)   # nothing held after the refusal


def test_cacheable_pfnmap_gating_is_arm64s_own_namespace():
    from kvmsim.arm64.versions import ARM64_V613, ARM64_V618
    assert resolve(get_policy("current"), "arm64").arch_ops is ARM64_V618
    assert resolve(get_policy("series"), "arm64").arch_ops is ARM64_V613
    assert ARM64_V613.pfnmap_fault_check is None and ARM64_V618.pfnmap_fault_check is not None


# ---- RISC-V THP G-stage leaves: not in v6.18 --------------------------------------------------------------

def test_riscv_has_no_thp_leaves_in_current():
    """"RISC-V: KVM: Transparent huge page support" (ed7ae7a34bea) was merged after v6.18: a RISC-V fault on
    THP-backed memory maps a 4K G-stage leaf under current as under series."""
    for policy in ("series", "current"):
        host, kvm, vma, vcpu = make_vm(policy, arch="riscv", size=2 << 20, kind=VmaKind.ANON, page_size=None)
        vma.flags |= VM.HUGEPAGE
        vcpu.write(0, 1)
        assert kvm.journal.counters.get("gstage_block_pmd", 0) == 0
        assert kvm.journal.counters.get("thp_adjust", 0) == 0


# ---- every scenario for current, each difference's three outcomes ----------------------------------------

@pytest.mark.parametrize("name", ["current-dirty-ring-reset-signal", "current-gmem-mmap-shared-fault",
                                  "current-arm64-cacheable-pfnmap", "current-arm64-cacheable-pfnmap-refused"])
def test_current_scenarios_match_and_differ_from_series(name):
    sc = load_scenario(name)
    assert sc.policies == ("legacy", "series", "current")
    res = {p: run(sc, p) for p in sc.policies}
    assert all(r.expected_match for r in res.values()), {p: r.mismatches for p, r in res.items()}
    outcome = {p: [(s.res.result, s.res.errno_name, s.res.value, sorted(s.counters.items())) for s in r.steps]
               for p, r in res.items()}
    assert outcome["current"] != outcome["series"]


# ---- conformance runs the host's own protocol ----------------------------------------------------------

@pytest.mark.parametrize("release,protocol", [("6.18.44-fc-v669", "current"), ("6.14.0", "current"),
                                              ("7.0.1", "current"), ("6.13.12", "series"), ("6.12.9", "legacy"),
                                              ("5.10.0", "legacy")])
def test_conformance_maps_the_host_release_to_a_protocol(release, protocol):
    from kvmsim.backend.conformance import host_protocol, model_backend
    assert host_protocol(release) == protocol
    b = model_backend(protocol)
    assert b.policy == protocol
    b.close()


def test_the_gmem_conformance_cases_tell_current_from_series():
    """The v6.18 guest_memfd cases (run against /dev/kvm by ``kvmsim conform``) give different answers under
    the two protocols, so running the host's own protocol matters."""
    from kvmsim.backend.conformance import CASES, model_backend, run_case
    cases = [c for c in CASES if c.name in ("gmem-create-flags-1", "gmem-mmap", "gmem-shared-memslot")]
    out = {}
    for p in ("series", "current"):
        b = model_backend(p)
        out[p] = [run_case(c, b) for c in cases]
        b.close()
    assert out["series"][0] == errno.EINVAL and out["current"][0] == 0
    assert all(a != b for a, b in zip(out["series"], out["current"]))
    assert out["current"][2][1:3] == ((0x77).to_bytes(8, "little"), (0x78).to_bytes(8, "little"))
